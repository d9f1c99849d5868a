"""
The daemon's counters: kept in memory, shown by ``qreset status``, served as Prometheus text.

Two parts, so that the numbers have one source:

- :class:`CycleStats` (no dependency): the daemon calls :meth:`CycleStats.observe`
  once per finished reset cycle and merges :meth:`CycleStats.snapshot` into
  its ``query-status`` reply. The snapshot is small, JSON-safe and flat
  enough for ``qreset status`` to print as it is::

      {"cycles": 40, "failures": 1, "identity_changes": 0,
       "resets_by_method": {"flr": 38, "bus": 2},
       "latency_ms": {"count": 40, "p50": 21.4, "p90": 30.2, "p99": 41.0, "max": 41.0, "sum": 890.1},
       "per_vm": {"vm1": {"cycles": 20, "failures": 0}, ...}}

  Latency is what the daemon measures per cycle (guest reset event to VM
  resumed). Percentiles are nearest-rank over the last :data:`WINDOW`
  cycles, so a long-running daemon reports the recent past, not its boot.

- :class:`MetricsServer` (the optional ``metrics`` extra, ``prometheus-client``):
  serves a ``query-status`` snapshot as Prometheus text on a unix socket or a
  loopback TCP port (``[metrics] listen = "unix:/run/qreset/metrics.sock"``
  or ``"127.0.0.1:9477"``). It renders whatever the status callable returns
  at scrape time (:func:`render`), so ``qreset status --json`` and a scrape
  always agree. Only loopback addresses are accepted: the metrics name VMs and
  host PCI addresses, and qreset has no authentication beyond the peer uid of
  its unix sockets.

The HTTP side is the minimum a scraper needs (``GET /metrics``, one request
per connection, bounded request size and time); content negotiation and
escaping are prometheus-client's (``choose_encoder``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qreset.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from qreset.engine import CycleReport

logger = logging.getLogger(__name__)

#: Cycles kept for the latency percentiles.
WINDOW = 1024
#: The quantiles reported (as p50, p90, p99).
QUANTILES = (0.5, 0.9, 0.99)

#: Bytes of request line + headers read before giving up on a client.
MAX_REQUEST = 8192
#: Seconds a client has to send its request.
REQUEST_TIMEOUT = 5.0


# --------------------------------------------------------------------------
# Counters


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list (``q`` in 0..1)."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class CycleStats:
    """Counters of finished reset cycles (see the module docstring). Event-loop side only."""

    def __init__(self, window: int = WINDOW) -> None:
        self.cycles = 0
        self.failures = 0
        self.identity_changes = 0
        self.resets_by_method: collections.Counter[str] = collections.Counter()
        self.per_vm: dict[str, collections.Counter[str]] = {}
        self._latencies: collections.deque[float] = collections.deque(maxlen=window)
        self._latency_sum = 0.0
        self._latency_count = 0

    def observe(
        self,
        vm: str,
        *,
        ok: bool,
        methods: Iterable[str] = (),
        latency: float | None = None,
        identity_changes: int = 0,
    ) -> None:
        """
        Count one finished cycle of ``vm``: ``ok`` is its verdict, ``methods``
        the reset method of each domain it ran (``Method.value``), ``latency``
        seconds from the guest's reset event to the VM running again (None
        when it did not resume), ``identity_changes`` functions that came back
        as another device.
        """
        self.cycles += 1
        vm_counts = self.per_vm.setdefault(vm, collections.Counter())
        vm_counts["cycles"] += 1
        if not ok:
            self.failures += 1
            vm_counts["failures"] += 1
        self.identity_changes += identity_changes
        self.resets_by_method.update(methods)
        if latency is not None and math.isfinite(latency) and latency >= 0:
            self._latencies.append(latency)
            self._latency_sum += latency
            self._latency_count += 1

    def observe_report(self, report: CycleReport, latency: float | None = None) -> None:
        """:meth:`observe` from an engine :class:`~qreset.engine.CycleReport`."""
        self.observe(
            report.plan.vm,
            ok=report.ok,
            methods=[d.domain.method.value for d in report.domains],
            latency=latency,
            identity_changes=len(report.identity_changed),
        )

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe counters for ``query-status`` (milliseconds for latency: read by people)."""
        latency: dict[str, Any] = {"count": self._latency_count,
                                   "sum": round(self._latency_sum * 1000, 3)}
        if self._latencies:
            ordered = sorted(self._latencies)
            for q in QUANTILES:
                latency[f"p{round(q * 100)}"] = round(percentile(ordered, q) * 1000, 3)
            latency["max"] = round(ordered[-1] * 1000, 3)
        return {
            "cycles": self.cycles,
            "failures": self.failures,
            "identity_changes": self.identity_changes,
            "resets_by_method": dict(sorted(self.resets_by_method.items())),
            "latency_ms": latency,
            "per_vm": {vm: {"cycles": c["cycles"], "failures": c["failures"]}
                       for vm, c in sorted(self.per_vm.items())},
        }


# --------------------------------------------------------------------------
# Prometheus text


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """Prometheus metric families for a ``query-status`` reply (keys it lacks are skipped)."""
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        SummaryMetricFamily,
    )

    def counter(key: str, name: str, doc: str) -> Iterator[Metric]:
        value = _number(status.get(key))
        if value is not None:
            yield CounterMetricFamily(name, doc, value=value)

    yield from counter("cycles", "qreset_cycles", "Reset cycles finished")
    yield from counter("failures", "qreset_cycle_failures", "Reset cycles that did not come back clean")
    yield from counter("identity_changes", "qreset_identity_changes",
                       "Functions that came back from a reset as another device")
    methods = status.get("resets_by_method")
    if isinstance(methods, Mapping):
        fam = CounterMetricFamily("qreset_resets", "Reset domains run, by reset method", labels=["method"])
        for method, count in sorted(methods.items()):
            if (n := _number(count)) is not None:
                fam.add_metric([str(method)], n)
        yield fam
    per_vm = status.get("per_vm")
    if isinstance(per_vm, Mapping):
        cycles = CounterMetricFamily("qreset_vm_cycles", "Reset cycles finished, by VM", labels=["vm"])
        fails = CounterMetricFamily("qreset_vm_cycle_failures", "Failed reset cycles, by VM", labels=["vm"])
        for vm, counts in sorted(per_vm.items()):
            if isinstance(counts, Mapping):
                if (n := _number(counts.get("cycles"))) is not None:
                    cycles.add_metric([str(vm)], n)
                if (n := _number(counts.get("failures"))) is not None:
                    fails.add_metric([str(vm)], n)
        yield cycles
        yield fails
    latency = status.get("latency_ms")
    if isinstance(latency, Mapping):
        count, total = _number(latency.get("count")), _number(latency.get("sum"))
        if count is not None and total is not None:
            summary = SummaryMetricFamily(
                "qreset_cycle_latency_seconds",
                f"Guest reset event to VM resumed; quantiles over the last {WINDOW} cycles",
                count_value=int(count), sum_value=total / 1000,
            )
            for q in QUANTILES:
                if (v := _number(latency.get(f"p{round(q * 100)}"))) is not None:
                    summary.add_sample("qreset_cycle_latency_seconds", {"quantile": str(q)}, v / 1000)
            yield summary
    vms = status.get("vms")
    n_vms = len(vms) if isinstance(vms, list | Mapping) else _number(vms)
    if n_vms is not None:
        yield GaugeMetricFamily("qreset_vms", "VMs the daemon serves", value=float(n_vms))


class _StatusCollector:
    def __init__(self, status: Mapping[str, Any]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        return list(families(self._status))


def render(status: Mapping[str, Any], accept: str = "") -> tuple[bytes, str]:
    """(body, content type) of a ``query-status`` reply as Prometheus text (``accept``: the request's)."""
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


# --------------------------------------------------------------------------
# The listener


@dataclass(frozen=True, slots=True)
class Listen:
    """Where metrics are served: a unix socket path, or a loopback host and port."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str, where: str = "[metrics] listen") -> Listen:
    """``unix:/path``, ``127.0.0.1:9477``, ``[::1]:9477`` or ``localhost:9477``; ConfigError otherwise."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ConfigError(where, f"unix socket path must be absolute, got {path!r}")
        return Listen(path=Path(path))
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(where, f"expected 'unix:/path' or 'HOST:PORT', got {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(where, f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(where, f"port must be 0-65535, got {port}")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ConfigError(where, f"host must be a loopback IP or localhost, got {host!r}") from None
        if not loopback:
            raise ConfigError(where, f"{host} is not a loopback address; metrics are served on "
                              "localhost or a unix socket only (put a proxy in front to export them)")
    return Listen(host=host, port=port)


StatusSource = Callable[[], Awaitable[Mapping[str, Any]]]


class MetricsServer:
    """Serve ``source()`` (the daemon's ``query_status``) as Prometheus text at :attr:`listen`."""

    def __init__(self, listen: Listen | str, source: StatusSource) -> None:
        self.listen = parse_listen(listen) if isinstance(listen, str) else listen
        self._source = source
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0); 0 for a unix socket or before start."""
        if self._server is None or self.listen.path is not None:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and listen; ConfigError (naming the address) when that is impossible."""
        try:
            # prometheus-client is imported here, so a missing extra fails at start, clearly.
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ConfigError("[metrics] listen",
                              "needs the 'metrics' extra: pip install 'qreset[metrics]'") from None
        where = str(self.listen)
        try:
            if self.listen.path is not None:
                path = self.listen.path
                with contextlib.suppress(FileNotFoundError):
                    if path.is_socket():
                        path.unlink()  # a previous daemon's; the control socket guards against two daemons
                path.parent.mkdir(parents=True, exist_ok=True)
                old = os.umask(0o177)
                try:
                    self._server = await asyncio.start_unix_server(
                        self._serve, path=str(path), limit=MAX_REQUEST)
                finally:
                    os.umask(old)
            else:
                self._server = await asyncio.start_server(
                    self._serve, self.listen.host, self.listen.port, limit=MAX_REQUEST)
        except OSError as exc:
            raise ConfigError(f"[metrics] listen {where}", f"cannot listen: {exc.strerror or exc}") from None
        logger.info("metrics served at %s", where if not self.port else f"{self.listen.host}:{self.port}")

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        if self.listen.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.listen.path.unlink()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.set_name("qreset.metrics.client")
        try:
            status, ctype, body = await self._respond(reader)
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            logger.debug("metrics client: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except TimeoutError:
            return "408 Request Timeout", text, b"request timeout\n"
        except asyncio.LimitOverrunError:
            return "431 Request Header Fields Too Large", text, b"request too large\n"
        except asyncio.IncompleteReadError as exc:
            head = exc.partial  # a client that sent its request line and closed its side
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", text, b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"only GET\n"
        if target not in ("/metrics", "/"):
            return "404 Not Found", text, b"metrics are at /metrics\n"
        accept = next((line.split(":", 1)[1].strip() for line in lines[1:]
                       if line.lower().startswith("accept:")), "")
        try:
            status = await self._source()
        except Exception as exc:  # the daemon's status must not take the listener down
            logger.error("metrics: status unavailable: %s", exc)
            return "503 Service Unavailable", text, f"status unavailable: {exc}\n".encode()
        body, ctype = render(status, accept)
        return "200 OK", ctype, b"" if method == "HEAD" else body
