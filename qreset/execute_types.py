"""
What the executor reports and is tuned with: settings, progress events, per-function
outcomes and per-domain results (plain data, JSON-safe through ``to_json``).

:mod:`qreset.execute` runs the domains; :mod:`qreset.engine` re-exports these
for callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qreset.diff import Change, Diff
from qreset.pci.address import PciAddress
from qreset.pci.host import FunctionInfo, PciHost, Resource
from qreset.plan import Domain, Method

#: Phases timed per domain, in order (``lock`` is the wait for the domain locks).
PHASES: tuple[str, ...] = ("lock", "save", "assert", "settle", "poll", "rescan", "restore", "verify")

PCIE_RESET_READY_POLL = 60.0   # PCIE_RESET_READY_POLL_MS (drivers/pci/pci.c)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Timing and method knobs of the engine (host seconds: scaled on the simulated host)."""

    #: Give up on a function still answering CRS / all-ones after this long (PCIE_RESET_READY_POLL_MS).
    poll_timeout: float = PCIE_RESET_READY_POLL
    #: First readiness-poll delay; doubled after each poll like pci_dev_wait (``delay = 1`` ms).
    poll_interval: float = 0.001
    #: Cap on one poll delay (pci_dev_wait has none; capping keeps the tail responsive).
    poll_max_interval: float = 1.0
    #: Bound on one kernel reset call (sysfs reset / reset_subordinate / VFIO ioctl),
    #: which polls for readiness inside the kernel for up to 60 s itself.
    reset_timeout: float = 2 * PCIE_RESET_READY_POLL
    #: How long the save phase waits for a function that does not answer (CRS or
    #: all-ones) before falling back to its last good snapshot. Our bound, not the
    #: spec's: the guest is parked meanwhile, and the reset that follows is what
    #: usually brings such a function back. PCI_RESET_WAIT (1000 ms) is the
    #: kernel's wait for a device after a reset on a slow link.
    save_ready_timeout: float = 1.0
    #: Bus reset methods in preference order; None keeps the policy's.
    bus_methods: tuple[Method, ...] | None = None


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One step of one domain, for live timelines (``qreset reset``, the daemon's events)."""

    domain_key: str
    phase: str
    elapsed: float
    message: str

    def line(self) -> str:
        return f"+{self.elapsed * 1000:9.1f}ms  {self.domain_key}  {self.phase}  {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain_key, "phase": self.phase,
                "elapsed": round(self.elapsed, 6), "message": self.message}


@dataclass(slots=True)
class FunctionOutcome:
    """What the cycle did to one covered function."""

    address: PciAddress
    change: str = "none"
    restored: bool = False
    verified: bool = False
    writes: int = 0
    diff: Diff | None = None
    polls: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        if self.change == Change.NONE.value:
            return True
        return self.change == Change.STATE.value and self.restored and self.verified

    def to_json(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "change": self.change,
            "restored": self.restored,
            "verified": self.verified,
            "writes": self.writes,
            "polls": self.polls,
            "error": self.error,
            "diff": self.diff.to_json() if self.diff is not None else None,
        }


@dataclass(slots=True)
class DomainResult:
    """The outcome of one domain: ok only if every function came back clean."""

    domain: Domain
    ok: bool = False
    error: str | None = None
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    functions: list[FunctionOutcome] = field(default_factory=list)
    #: When the domain got its locks and when it finished, seconds since the run began.
    start: float = 0.0
    end: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = self.domain
        return {
            "key": d.key,
            "kind": d.kind.value,
            "method": d.method.value,
            "target": str(d.target),
            "covers": [str(a) for a in d.covers],
            "ok": self.ok,
            "error": self.error,
            "phases": {k: round(v, 6) for k, v in self.phases.items()},
            "start": round(self.start, 6),
            "end": round(self.end, 6),
            "functions": [f.to_json() for f in self.functions],
        }


#: ``FunctionOutcome.change`` of a function that did not answer before the reset and
#: had no earlier good snapshot: nothing to compare with, so neither "none" nor "identity".
NOT_READY = "not_ready"


@dataclass(slots=True)
class _Saved:
    raw: bytes
    info: FunctionInfo

    @property
    def resources(self) -> tuple[Resource, ...]:
        return self.info.resources


#: A listener for live progress (called in the domain tasks; must not block).
Progress = Callable[[ProgressEvent], None]


def _wall(host: PciHost, seconds: float) -> float:
    """Host seconds → wall seconds (the simulated host runs ``time_scale`` times faster)."""
    scale = getattr(host, "time_scale", 1.0)
    return seconds * float(scale) if isinstance(scale, int | float) else seconds


#: Wall seconds below which a scaled bound on one kernel reset call never goes.
#: Only the simulated host's *reset* is time-scaled; the event loop running it is
#: not: with ``time_scale`` 0.01 the kernel's 120 s bound became 1.2 s, and a loop
#: busy with 64 guests' cycles (bench.scale) lags past that, failing resets a real
#: host would have allowed. 10 s stays well under the unscaled bound
#: (2 x PCIE_RESET_READY_POLL_MS, 120 s) yet far above any loop lag seen.
RESET_WALL_FLOOR = 10.0


def _reset_wall_limit(host: PciHost, seconds: float) -> float:
    """The wall-clock bound on one kernel reset call of ``seconds`` host seconds.

    Scaled like :func:`_wall`, but never below :data:`RESET_WALL_FLOOR` (nor
    above ``seconds`` itself: a real host, scale 1, keeps its exact bound).
    """
    return max(_wall(host, seconds), min(seconds, RESET_WALL_FLOOR))
