"""
The daemon's counters as Prometheus text (the optional ``metrics`` extra).

The numbers have one source: the daemon's ``query-status`` reply, which
``qreset status`` prints (cycles, failures, outcomes, resets by method,
cycle and event-to-stop latency percentiles; see
:meth:`qreset.daemon.Daemon.query_status`). :class:`MetricsServer` calls the
same method at each scrape and renders the reply (:func:`render`), so a
scrape and ``qreset status --json`` always agree and nothing is counted twice.

Where: ``[metrics] listen = "unix:/run/qreset/metrics.sock"`` (mode 0600,
like the control socket) or ``"127.0.0.1:9477"``. Only loopback addresses
are accepted: the metrics name VMs, and qreset has no authentication beyond
the peer uid of its unix sockets; put a proxy in front to export further.

The HTTP side is the minimum a scraper needs (``GET /metrics``, one request
per connection, bounded request size and time); content negotiation and
escaping are prometheus-client's (``choose_encoder``), imported only when a
scrape is rendered.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qreset.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)

#: The quantiles of the daemon's percentile blocks (keys p50, p90, p99).
QUANTILES = (0.5, 0.9, 0.99)

#: Bytes of request line + headers read before giving up on a client.
MAX_REQUEST = 8192
#: Seconds a client has to send its request.
REQUEST_TIMEOUT = 5.0


# --------------------------------------------------------------------------
# Prometheus text


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _percentile_summary(name: str, doc: str, block: object) -> Iterator[Metric]:
    """A daemon percentile block ``{"count", "p50", "p90", "p99", "max"[, "sum"]}`` in ms → seconds."""
    from prometheus_client.metrics_core import SummaryMetricFamily

    if not isinstance(block, Mapping) or (count := _number(block.get("count"))) is None:
        return
    fam = SummaryMetricFamily(name, doc)
    for q in QUANTILES:
        if (v := _number(block.get(f"p{round(q * 100)}"))) is not None:
            fam.add_sample(name, {"quantile": str(q)}, v / 1000)
    fam.add_sample(f"{name}_count", {}, count)
    if (total := _number(block.get("sum"))) is not None:
        fam.add_sample(f"{name}_sum", {}, total / 1000)
    yield fam


def families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """Prometheus metric families for a ``query-status`` reply (keys it lacks are skipped)."""
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    def scalar(kind: type[CounterMetricFamily | GaugeMetricFamily], key: str, name: str,
               doc: str) -> Iterator[Metric]:
        if (value := _number(status.get(key))) is not None:
            yield kind(name, doc, value=value)

    def labelled(key: str, name: str, doc: str, label: str) -> Iterator[Metric]:
        counts = status.get(key)
        if isinstance(counts, Mapping):
            fam = CounterMetricFamily(name, doc, labels=[label])
            for what, count in sorted(counts.items(), key=lambda kv: str(kv[0])):
                if (n := _number(count)) is not None:
                    fam.add_metric([str(what)], n)
            yield fam

    yield from scalar(CounterMetricFamily, "cycles", "qreset_cycles", "Reset cycles finished")
    yield from scalar(CounterMetricFamily, "failures", "qreset_cycle_failures",
                      "Reset cycles that did not end with the VM resumed and its devices clean")
    yield from labelled("outcomes", "qreset_cycle_outcomes", "Reset cycles finished, by outcome", "outcome")
    yield from labelled("resets_by_method", "qreset_resets", "Reset domains run, by reset method", "method")
    yield from _percentile_summary(
        "qreset_cycle_seconds", "Reset cycle duration (recent cycles; quantiles by nearest rank)",
        status.get("cycle_ms"))
    yield from _percentile_summary(
        "qreset_event_to_stop_seconds", "Stop-on-reset mode: guest RESET event to VM stopped",
        status.get("event_to_stop_ms"))
    yield from scalar(GaugeMetricFamily, "vms", "qreset_vms", "VMs the daemon serves")
    yield from scalar(GaugeMetricFamily, "connected", "qreset_vms_connected",
                      "VMs whose QMP monitor is connected")
    yield from scalar(GaugeMetricFamily, "uptime_s", "qreset_uptime_seconds",
                      "Seconds since the daemon started")
    if "journal_degraded" in status:
        yield GaugeMetricFamily(
            "qreset_journal_degraded",
            "1 while the journal cannot be written: cycles go on, a daemon crash would not find them",
            value=1.0 if status["journal_degraded"] else 0.0)


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
