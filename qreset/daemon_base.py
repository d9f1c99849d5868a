"""
The daemon's shared state and run states, apart from what it does with them.

:class:`DaemonCore` holds what the daemon's parts share — the configuration,
the journal, the engine and host, the served VMs and where each came from,
the cycle statistics and the event ring — so that the parts can live in
modules of their own and be read one concern at a time:

- :mod:`qreset.daemon` — life cycle (start, serve, stop) and the
  :class:`~qreset.vm.CycleContext` the monitors call;
- :mod:`qreset.daemon_registry` — the VM registry (configured, added at run
  time, replayed from the journal; add/remove/check);
- :mod:`qreset.daemon_backend` — the control socket's read side and requests
  (:class:`qreset.control.ControlBackend`);
- :mod:`qreset.daemon_stats` — counters, latencies and the event ring.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from qreset.config import Config
from qreset.daemon_stats import CycleStats, EventRing
from qreset.engine import Engine
from qreset.errors import QResetError
from qreset.journal import Journal
from qreset.pci.address import PciAddress
from qreset.pci.host import PciHost
from qreset.plan import Policy, Takeover
from qreset.vm import MonitorSettings, VmError, VmMonitor

if TYPE_CHECKING:
    from collections import deque

    from qreset.control import ControlServer
    from qreset.metrics import MetricsServer


class DaemonState(enum.Enum):
    """Run states (explicit, like qemu.qmp's ``Runstate``)."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class DaemonError(QResetError):
    """The daemon cannot start or serve a request."""


class DaemonCore:
    """State shared by the daemon's parts (see the module docstring)."""

    def __init__(self, config: Config, *, host: PciHost | None = None, control: bool = True) -> None:
        self.config = config
        self.state = DaemonState.CREATED
        self.policy = Policy(
            takeover=Takeover(config.policy.takeover.value),
            allow=frozenset(config.policy.allow),
        )
        self.journal = Journal(config.daemon.journal, segment_bytes=config.daemon.journal_segment_bytes,
                               segments=config.daemon.journal_segments)
        self.monitors: dict[str, VmMonitor] = {}
        #: :meth:`ownership`'s map (None: to be rebuilt).
        self._ownership: Mapping[str, Sequence[PciAddress]] | None = None
        #: Where each served VM came from: "config", "runtime" (add-vm) or "journal" (replayed).
        self.origins: dict[str, str] = {}
        self.stats = CycleStats()
        self.ring = EventRing()
        self.started = asyncio.Event()
        self._host = host
        self._own_host = host is None
        self._engine: Engine | None = None
        self._control = control
        self._server: ControlServer | None = None
        self._metrics: MetricsServer | None = None
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Per VM, the run-state actions a previous daemon journaled (qreset.actions).
        self._journaled_actions: dict[str, dict[str, Any]] = {}
        #: Serialises add-vm/remove-vm: a replacement awaits the old monitor's end.
        self._registry_lock = asyncio.Lock()
        self._t_start = time.monotonic()
        self._settings = MonitorSettings(
            on_identity_change=config.policy.on_identity_change,
            cycle_timeout=config.policy.cycle_timeout,
            connect_backoff_max=config.policy.connect_backoff_max,
        )

    @property
    def history(self) -> deque[dict[str, Any]]:
        """The most recent cycle summaries, oldest first (older ones: the journal)."""
        return self.stats.history

    @property
    def host(self) -> PciHost:
        if self._host is None:
            raise DaemonError("the daemon has not opened its host yet")
        return self._host

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise DaemonError("the daemon has not started its engine yet")
        return self._engine

    def settings(self) -> MonitorSettings:
        return self._settings

    def ownership(self) -> Mapping[str, Sequence[PciAddress]]:
        """
        Every served VM's functions, read-only. Built once and kept until a monitor
        is added or removed (:meth:`monitors_changed`) or a monitor's devices are
        set (:meth:`devices_changed`): every cycle reads it, and with 256 VMs
        rebuilding it per cycle was most of the daemon's CPU outside planning.
        """
        if self._ownership is None:
            self._ownership = MappingProxyType({name: m.owned for name, m in self.monitors.items()})
        return self._ownership

    def devices_changed(self, vm: str) -> None:
        self._ownership = None

    def monitors_changed(self) -> None:
        """A monitor was added to or removed from :attr:`monitors`."""
        self._ownership = None

    def _monitor(self, vm: str) -> VmMonitor:
        try:
            return self.monitors[vm]
        except KeyError:
            known = ", ".join(sorted(self.monitors)) or "none"
            raise VmError(f"no VM named {vm!r} (known: {known})") from None

    def _describe(self, m: VmMonitor) -> dict[str, Any]:
        origin = self.origins.get(m.name, "runtime")
        # Replayed from the journal and not seen since this daemon started: its QEMU
        # may be gone for good (the guest stopped while no daemon ran to hear it).
        return m.describe() | {"origin": origin, "stale": origin == "journal" and m.connects == 0}
