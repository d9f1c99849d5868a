"""
The state one VM's monitor keeps, and the types it shares with the daemon.

:class:`MonitorBase` holds it; :class:`qreset.vm.VmMonitor` (the QMP session),
:class:`qreset.vm_cycles.CycleDriver` (carries out the cycle machines) and
:class:`qreset.vm_actions.ActionKeeper` (run-state actions, poweroff, leaving)
are its three concerns, one module each.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.protocol import Runstate

from qreset.config import Mode, OnIdentityChange
from qreset.cycle import CycleMachine
from qreset.engine import CycleReport
from qreset.errors import QResetError
from qreset.inventory import AssignedDevice, merge
from qreset.journal import Journal
from qreset.pci.address import PciAddress
from qreset.qemu_model import VfioBackend

if TYPE_CHECKING:
    from qreset.vm import VmMonitor

logger = logging.getLogger("qreset.vm")

cycle_ids = itertools.count(1)


class VmState(enum.Enum):
    """Run state of one monitor (explicit, like qemu.qmp's ``Runstate``)."""

    WAITING = "waiting"        # no connection; waiting for the socket / backing off
    CONNECTING = "connecting"  # connected; set-action, inventory, recovery
    RUNNING = "running"        # watching events
    CYCLE = "in-cycle"         # a reset cycle is running
    STOPPED = "stopped"        # left stopped on purpose (identity change)
    CLOSING = "closing"
    CLOSED = "closed"


class VmError(QResetError):
    """A request about a VM that cannot be served (unknown, not connected...)."""


class CycleContext(Protocol):
    """What a monitor needs from the daemon (implemented by :class:`qreset.daemon.Daemon`)."""

    journal: Journal

    async def run_engine(self, vm: str, owned: Sequence[PciAddress]) -> CycleReport: ...

    def emit(self, name: str, data: dict[str, Any]) -> None: ...

    def cycle_done(self, monitor: VmMonitor, summary: dict[str, Any]) -> None: ...

    def settings(self) -> MonitorSettings: ...

    def devices_changed(self, vm: str) -> None:
        """``vm``'s devices were set (its ownership map entry is stale)."""


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    on_identity_change: OnIdentityChange = OnIdentityChange.STOP
    cycle_timeout: float = 120.0
    connect_backoff_max: float = 30.0


def event_time(event: Mapping[str, Any]) -> float:
    ts = event.get("timestamp")
    if isinstance(ts, dict):
        try:
            return int(ts["seconds"]) + int(ts["microseconds"]) / 1e6
        except (KeyError, TypeError, ValueError):
            pass
    return time.time()


class MonitorBase:
    """The state of one VM's monitor, shared by its session (qreset.vm), its cycle
    driver (qreset.vm_cycles) and its run-state actions (qreset.vm_actions)."""

    def __init__(
        self,
        name: str,
        qmp: Path,
        mode: Mode,
        configured: Sequence[PciAddress],
        ctx: CycleContext,
        unfinished: list[dict[str, Any]] | None = None,
        actions: dict[str, Any] | None = None,
        last: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.qmp = qmp
        self.mode = mode
        self.configured = tuple(configured)
        self.ctx = ctx
        self._devices: tuple[AssignedDevice, ...] = ()
        self._backends: Mapping[PciAddress, VfioBackend] = MappingProxyType({})
        self._owned: tuple[PciAddress, ...] = ()
        self.devices = merge([], self.configured)
        self.state = VmState.WAITING
        #: QEMU's run status as last seen (query-status / events); None when not connected.
        self.status: str | None = None
        self.cycles = 0
        self.failures = 0
        self.connects = 0
        self.last_cycle: dict[str, Any] | None = None
        self.stopped_reason: str | None = None
        self._unfinished = unfinished or []
        #: The last finished cycle a previous daemon journaled for this VM (a stop to keep).
        self._last = last
        #: The last journaled ``actions`` record of this VM (qreset.actions).
        self._actions_rec = actions
        #: What park mode found on this QEMU and must put back (None: nothing set).
        self._found_actions: dict[str, str] | None = None
        self._client: QMPClient | None = None
        self._cycle_lock = asyncio.Lock()
        self._closing = asyncio.Event()
        #: Ends the backoff wait early: set by close() and nudge().
        self._wake = asyncio.Event()
        self._reset_waiters: list[asyncio.Future[dict[str, Any]]] = []
        self._gone_announced = False
        self._retry_soon = False
        #: The cycle in progress (for its id, phase and problem).
        self._machine: CycleMachine | None = None
        #: stop-on-reset cycles: STOP/RESUME events while the cycle holds the guest.
        self._runstate: EventListener | None = None
        #: How often the cycle's guard stopped a guest another manager resumed.
        self._restops = 0
        #: Which QEMU process this connection talks to (qreset.qemu_peer).
        self._qemu_id: str | None = None
        self._qemu_argv: list[str] | None = None
        #: (QEMU identity, cycle id) of a cycle that lost its connection with the
        #: guest still stopped: the next connection to that same QEMU resumes it.
        self._interrupted: tuple[str, str] | None = None
        self._log = logger.getChild(name)

    @property
    def devices(self) -> Sequence[AssignedDevice]:
        """The VM's assigned functions (inventory over QMP merged with the configured)."""
        return self._devices

    @devices.setter
    def devices(self, devices: Sequence[AssignedDevice]) -> None:
        # Set only here (connect, DEVICE_DELETED): ``owned`` is read on every cycle and
        # every ownership map, so it is built once per change, and the daemon's
        # ownership map is told to rebuild (bench.scale: rebuilding both per call was
        # 12.6% of the daemon's samples with 256 VMs).
        self._devices = tuple(devices)
        self._owned = tuple(d.host for d in self._devices)
        self._backends = MappingProxyType(
            {d.host: d.backend for d in self._devices if d.backend is not None})
        self.ctx.devices_changed(self.name)

    @property
    def owned(self) -> tuple[PciAddress, ...]:
        return self._owned

    @property
    def backends(self) -> Mapping[PciAddress, VfioBackend]:
        """How QEMU opened each function it showed (group or iommufd: the planner's
        predictions of QEMU's own reset depend on it); configured-only ones are absent."""
        return self._backends

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    @property
    def problem(self) -> str | None:
        """Why the guest is not running although it should be (a resume being retried)."""
        return self._machine.problem if self._machine is not None else None
