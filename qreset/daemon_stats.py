"""
What the daemon keeps in memory about its cycles and events (for ``query-status``,
``qreset status``, the metrics listener and the tests): counters, latency
percentiles, the recent cycle summaries and the recent events with waiters.

Pure bookkeeping, no I/O: :class:`qreset.daemon.Daemon` feeds it
(:meth:`CycleStats.record` from ``cycle_done``, :meth:`EventRing.emit` from
``emit``) and reads it back. Older cycles than the ring holds are read from the
journal (:func:`qreset.journal.iter_history`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

#: Full cycle summaries kept in memory: the last cycles for tests and for query_resets
#: while the journal is degraded (otherwise it reads the journal). A summary is ~12.6 KB
#: with its engine report (bench.scale): 10 000 of them were 250 MB of RSS.
HISTORY_MAX = 1024
#: Cycle latencies kept for query_status's percentiles (floats: ~100 KB for 10 000).
LATENCIES_MAX = 10_000
#: Events kept in memory (for tests and late readers).
EVENTS_MAX = 2_000


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p90/p99/max of ``values`` (None when empty)."""
    data = sorted(values)
    if not data:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}

    def rank(p: float) -> float:
        k = max(0, min(len(data) - 1, int(-(-p * len(data) // 100)) - 1))
        return round(data[k], 3)

    return {"count": len(data), "p50": rank(50), "p90": rank(90), "p99": rank(99),
            "max": round(data[-1], 3)}


class CycleStats:
    """Counters and latencies of finished cycles, and the most recent summaries."""

    def __init__(self) -> None:
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_MAX)
        self.counters: Counter[str] = Counter()
        self.latencies_ms: deque[float] = deque(maxlen=LATENCIES_MAX)
        self.stop_latencies_ms: deque[float] = deque(maxlen=LATENCIES_MAX)
        #: Each VM's last finished cycle, however long ago (a VM served again
        #: keeps its "stopped on purpose"): one per VM name, not one per cycle.
        self.last: dict[str, dict[str, Any]] = {}

    def load(self, past: Sequence[dict[str, Any]]) -> None:
        """Summaries read back from the journal at start, oldest first (not counted)."""
        self.history.extend(past)
        for summary in past:
            self._remember(summary)

    def last_of(self, vm: str) -> dict[str, Any] | None:
        """``vm``'s last finished cycle known to this daemon (None: none)."""
        return self.last.get(vm)

    def _remember(self, summary: dict[str, Any]) -> None:
        vm = summary.get("vm")
        if isinstance(vm, str):
            self.last[vm] = summary

    def record(self, summary: dict[str, Any]) -> None:
        """One finished cycle (its terminal journal record)."""
        self.history.append(summary)
        self._remember(summary)
        self.counters["cycles"] += 1
        outcome = str(summary.get("outcome"))
        self.counters[f"outcome:{outcome}"] += 1
        if outcome != "resumed":
            self.counters["failures"] += 1
        report = summary.get("report")
        if isinstance(report, dict):
            for dom in report.get("domains") or []:
                if isinstance(dom, dict):
                    self.counters[f"method:{dom.get('method')}"] += 1
        durations = summary.get("durations") or {}
        if "total_ms" in durations:
            self.latencies_ms.append(float(durations["total_ms"]))
        if "event_to_stop_ms" in durations:
            self.stop_latencies_ms.append(float(durations["event_to_stop_ms"]))

    def status(self) -> dict[str, Any]:
        """The cycle part of ``query-status``."""
        methods = {k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("method:")}
        outcomes = {k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("outcome:")}
        return {
            "cycles": self.counters["cycles"],
            "failures": self.counters["failures"],
            "outcomes": outcomes,
            "resets_by_method": methods,
            "cycle_ms": percentiles(list(self.latencies_ms)),
            "event_to_stop_ms": percentiles(list(self.stop_latencies_ms)),
        }


class _Waiter:
    __slots__ = ("fut", "name", "pred")

    def __init__(self, name: str, pred: Callable[[dict[str, Any]], bool] | None,
                 fut: asyncio.Future[dict[str, Any]]) -> None:
        self.name, self.pred, self.fut = name, pred, fut


class EventRing:
    """The recent events (``time, name, data``) and whoever waits for the next one."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, str, dict[str, Any]]] = deque(maxlen=EVENTS_MAX)
        self._waiters: list[_Waiter] = []

    def add(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((time.time(), name, data))
        for w in list(self._waiters):
            if w.name == name and not w.fut.done() and (w.pred is None or w.pred(data)):
                w.fut.set_result(data)
                self._waiters.remove(w)

    async def wait(self, name: str, pred: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float = 30.0, *, past: bool = False) -> dict[str, Any]:
        """The next event ``name`` matching ``pred`` (or one already seen if ``past``)."""
        if past:
            for _t, n, data in self.events:
                if n == name and (pred is None or pred(data)):
                    return data
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(name, pred, fut)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def cancel_waiters(self) -> None:
        for w in self._waiters:
            if not w.fut.done():
                w.fut.cancel()
