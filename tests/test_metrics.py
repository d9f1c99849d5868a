"""Cycle counters, their Prometheus rendering, and the metrics listener (TCP and unix socket)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qreset.config import parse_config
from qreset.errors import ConfigError
from qreset.metrics import Listen, MetricsServer, parse_listen, render
from tests.qemu_helpers import short_tmpdir


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text body, parsed by prometheus-client's own parser."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _status() -> dict[str, Any]:
    """A query-status reply as the daemon gives it (qreset.daemon.Daemon.query_status)."""
    return {
        "state": "running", "host": "sim:demo", "journal": "/var/lib/qreset/journal.jsonl",
        "uptime_s": 12.5, "vms": 2, "connected": 1,
        "cycles": 5, "failures": 1, "outcomes": {"resumed": 4, "stopped": 1},
        "resets_by_method": {"flr": 5, "bus": 1},
        "cycle_ms": {"count": 5, "p50": 30.0, "p90": 500.0, "p99": 500.0, "max": 500.0},
        "event_to_stop_ms": {"count": 0, "p50": None, "p90": None, "p99": None, "max": None},
    }


def test_render_matches_the_status() -> None:
    status = _status()
    body, ctype = render(status)
    assert ctype.startswith("text/plain")
    samples = _samples(body.decode())
    assert samples == {
        ("qreset_cycles_total", ()): 5,
        ("qreset_cycle_failures_total", ()): 1,
        ("qreset_cycle_outcomes_total", (("outcome", "resumed"),)): 4,
        ("qreset_cycle_outcomes_total", (("outcome", "stopped"),)): 1,
        ("qreset_resets_total", (("method", "bus"),)): 1,
        ("qreset_resets_total", (("method", "flr"),)): 5,
        ("qreset_cycle_seconds", (("quantile", "0.5"),)): pytest.approx(0.03),
        ("qreset_cycle_seconds", (("quantile", "0.9"),)): pytest.approx(0.5),
        ("qreset_cycle_seconds", (("quantile", "0.99"),)): pytest.approx(0.5),
        ("qreset_cycle_seconds_count", ()): 5,
        # No cycle in stop-on-reset mode yet: a count of 0 and no quantiles.
        ("qreset_event_to_stop_seconds_count", ()): 0,
        ("qreset_vms", ()): 2,
        ("qreset_vms_connected", ()): 1,
        ("qreset_uptime_seconds", ()): 12.5,
    }


def test_render_skips_what_a_status_lacks_or_garbles() -> None:
    body, _ = render({"cycles": "many", "failures": True, "resets_by_method": {"flr": None, "bus": 2},
                      "cycle_ms": {"p50": 3}, "outcomes": ["x"], "vms": [1, 2]})
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


def test_config_metrics_listen_is_checked_where_it_is_read() -> None:
    assert parse_config({}, "qreset.toml").metrics.listen is None
    ok = parse_config({"metrics": {"listen": "127.0.0.1:9477"}}, "qreset.toml")
    assert ok.metrics.listen == "127.0.0.1:9477"
    with pytest.raises(ConfigError) as info:
        parse_config({"metrics": {"listen": "0.0.0.0:9477"}}, "qreset.toml")
    assert str(info.value).startswith("qreset.toml: metrics.listen: 0.0.0.0 is not a loopback address")
    with pytest.raises(ConfigError, match=r"^qreset\.toml: metrics\.port: unknown key"):
        parse_config({"metrics": {"port": 9477}}, "qreset.toml")
