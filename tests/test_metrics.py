"""Cycle counters, their Prometheus rendering, and the metrics listener (TCP and unix socket)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qreset.engine import Engine
from qreset.errors import ConfigError
from qreset.metrics import CycleStats, Listen, MetricsServer, parse_listen, percentile, render
from qreset.pci.sim import Fault, SimHost
from qreset.plan import Policy
from tests.qemu_helpers import short_tmpdir


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text body, parsed by prometheus-client's own parser."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_and_nearest_rank_percentiles() -> None:
    stats = CycleStats()
    latencies = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    random.Random(6).shuffle(latencies)
    for i, lat in enumerate(latencies):
        vm = "vm1" if i % 2 else "vm2"
        stats.observe(vm, ok=i % 10 != 0, methods=["flr"] if i % 4 else ["flr", "bus"], latency=lat)
    snap = stats.snapshot()
    assert snap["cycles"] == 100
    assert snap["failures"] == 10
    assert snap["resets_by_method"] == {"bus": 25, "flr": 100}
    assert snap["per_vm"] == {"vm1": {"cycles": 50, "failures": 0}, "vm2": {"cycles": 50, "failures": 10}}
    lat = snap["latency_ms"]
    assert (lat["p50"], lat["p90"], lat["p99"], lat["max"]) == (50.0, 90.0, 99.0, 100.0)
    assert lat["count"] == 100
    assert lat["sum"] == pytest.approx(5050.0)


def test_percentile_window_forgets_old_cycles_but_sum_and_count_do_not() -> None:
    stats = CycleStats(window=10)
    for _ in range(50):
        stats.observe("vm", ok=True, latency=1.0)
    for _ in range(10):
        stats.observe("vm", ok=True, latency=0.002)
    lat = stats.snapshot()["latency_ms"]
    assert lat["max"] == 2.0
    assert lat["p99"] == 2.0
    assert lat["count"] == 60
    assert lat["sum"] == pytest.approx(50_020.0)


def test_unresumed_and_nonsense_latencies_are_not_samples() -> None:
    stats = CycleStats()
    stats.observe("vm", ok=False, latency=None)
    stats.observe("vm", ok=False, latency=float("nan"))
    stats.observe("vm", ok=False, latency=-1.0)
    snap = stats.snapshot()
    assert snap["cycles"] == 3
    assert snap["failures"] == 3
    assert snap["latency_ms"] == {"count": 0, "sum": 0.0}


def test_percentile_helper_edges() -> None:
    assert percentile([5.0], 0.99) == 5.0
    assert percentile([1.0, 2.0], 0.5) == 1.0
    assert percentile([1.0, 2.0], 0.51) == 2.0


async def test_observe_report_counts_the_engine_s_methods_and_identity_changes(sim_dir: Path) -> None:
    host = SimHost.from_toml(sim_dir / "nic-flr.toml", time_scale=0.01)
    nic = host.address_of("nic")
    engine = Engine(host)
    stats = CycleStats()
    stats.observe_report(await engine.reset("vm1", [nic], {"vm1": [nic]}, Policy()), latency=0.01)
    host.inject(nic, Fault.new_identity(device_id=0x1539))
    stats.observe_report(await engine.reset("vm1", [nic], {"vm1": [nic]}, Policy()), latency=None)
    snap = stats.snapshot()
    assert snap["cycles"] == 2
    assert snap["failures"] == 1
    assert snap["identity_changes"] == 1
    assert snap["resets_by_method"] == {"flr": 2}
    assert snap["latency_ms"]["count"] == 1


def _status() -> dict[str, Any]:
    stats = CycleStats()
    for lat in (0.010, 0.020, 0.030, 0.040):
        stats.observe("vm1", ok=True, methods=["flr"], latency=lat)
    stats.observe("vm-2", ok=False, methods=["bus", "flr"], latency=0.5, identity_changes=1)
    return {"state": "running", "vms": [{"name": "vm1"}, {"name": "vm-2"}], **stats.snapshot()}


def test_render_matches_the_snapshot() -> None:
    status = _status()
    body, ctype = render(status)
    assert ctype.startswith("text/plain")
    samples = _samples(body.decode())
    assert samples[("qreset_cycles_total", ())] == 5
    assert samples[("qreset_cycle_failures_total", ())] == 1
    assert samples[("qreset_identity_changes_total", ())] == 1
    assert samples[("qreset_resets_total", (("method", "flr"),))] == 5
    assert samples[("qreset_resets_total", (("method", "bus"),))] == 1
    assert samples[("qreset_vm_cycles_total", (("vm", "vm-2"),))] == 1
    assert samples[("qreset_vm_cycle_failures_total", (("vm", "vm1"),))] == 0
    assert samples[("qreset_cycle_latency_seconds_count", ())] == 5
    assert samples[("qreset_cycle_latency_seconds_sum", ())] == pytest.approx(0.6)
    assert samples[("qreset_cycle_latency_seconds", (("quantile", "0.5"),))] == pytest.approx(0.03)
    assert samples[("qreset_cycle_latency_seconds", (("quantile", "0.99"),))] == pytest.approx(0.5)
    assert samples[("qreset_vms", ())] == 2


def test_render_skips_what_a_status_lacks_or_garbles() -> None:
    body, _ = render({"cycles": "many", "failures": True, "resets_by_method": {"flr": None, "bus": 2},
                      "latency_ms": {"count": 1}, "per_vm": ["x"]})
    samples = _samples(body.decode())
    assert samples == {("qreset_resets_total", (("method", "bus"),)): 2}


def test_openmetrics_on_request() -> None:
    body, ctype = render(_status(), accept="application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


@pytest.mark.parametrize(("text", "expected"), [
    ("unix:/run/qreset/metrics.sock", Listen(path=Path("/run/qreset/metrics.sock"))),
    ("127.0.0.1:9477", Listen(host="127.0.0.1", port=9477)),
    ("127.0.0.53:9477", Listen(host="127.0.0.53", port=9477)),
    ("[::1]:9477", Listen(host="::1", port=9477)),
    ("localhost:0", Listen(host="localhost", port=0)),
])
def test_parse_listen(text: str, expected: Listen) -> None:
    assert parse_listen(text) == expected
    assert parse_listen(str(expected)) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("0.0.0.0:9477", "not a loopback address"),
    ("192.168.1.5:9477", "not a loopback address"),
    ("example.com:9477", "loopback IP or localhost"),
    ("unix:metrics.sock", "must be absolute"),
    ("9477", "expected 'unix:/path' or 'HOST:PORT'"),
    ("127.0.0.1:http", "port must be a number"),
    ("127.0.0.1:70000", "0-65535"),
])
def test_parse_listen_refuses(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(text, where="qreset.toml: metrics.listen")
    assert why in str(info.value)
    assert str(info.value).startswith("qreset.toml: metrics.listen")
    assert "\n" not in str(info.value)


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                request: bytes) -> tuple[str, dict[str, str], bytes]:
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return lines[0], headers, body


class Source:
    """The status callable the daemon would pass (its query_status); counts calls."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status = status
        self.calls = 0
        self.fail = False

    async def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("daemon is shutting down")
        return self.status


async def test_tcp_listener_serves_scrapes_and_refuses_the_rest() -> None:
    source = Source(_status())
    async with MetricsServer("127.0.0.1:0", source) as server:
        port = server.port
        assert port > 0

        async def get(request: bytes) -> tuple[str, dict[str, str], bytes]:
            return await _http(*await asyncio.open_connection("127.0.0.1", port), request)

        line, headers, body = await get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert line == "HTTP/1.0 200 OK"
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert _samples(body.decode())[("qreset_cycles_total", ())] == 5
        # Scrapes read the status anew each time.
        source.status = {**source.status, "cycles": 6}
        _line, _h, body = await get(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert _samples(body.decode())[("qreset_cycles_total", ())] == 6
        assert source.calls == 2
        assert (await get(b"HEAD /metrics HTTP/1.0\r\n\r\n"))[2] == b""
        assert (await get(b"GET /admin HTTP/1.0\r\n\r\n"))[0] == "HTTP/1.0 404 Not Found"
        assert (await get(b"POST /metrics HTTP/1.0\r\n\r\n"))[0] == "HTTP/1.0 405 Method Not Allowed"
        assert (await get(b"hello\r\n\r\n"))[0] == "HTTP/1.0 400 Bad Request"
        huge = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await get(huge))[0] == "HTTP/1.0 431 Request Header Fields Too Large"
        source.fail = True
        line, _h, body = await get(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert line == "HTTP/1.0 503 Service Unavailable"
        assert b"shutting down" in body
        source.fail = False
        # ...and it still serves after all that.
        assert (await get(b"GET /metrics HTTP/1.0\r\n\r\n"))[0] == "HTTP/1.0 200 OK"


async def test_unix_listener_mode_0600_and_removed_at_close() -> None:
    with short_tmpdir() as tmp:
        path = tmp / "metrics.sock"
        async with MetricsServer(f"unix:{path}", Source(_status())):
            assert path.is_socket()
            assert path.stat().st_mode & 0o777 == 0o600
            line, _h, body = await _http(*await asyncio.open_unix_connection(str(path)),
                                         b"GET /metrics HTTP/1.0\r\n\r\n")
            assert line == "HTTP/1.0 200 OK"
            assert _samples(body.decode())[("qreset_vms", ())] == 2
        assert not path.exists()


async def test_port_in_use_is_one_config_error() -> None:
    async with MetricsServer("127.0.0.1:0", Source({})) as first:
        second = MetricsServer(f"127.0.0.1:{first.port}", Source({}))
        with pytest.raises(ConfigError, match=r"127\.0\.0\.1:\d+.*cannot listen"):
            await second.start()
