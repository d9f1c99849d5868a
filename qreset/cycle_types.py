"""
The vocabulary of the cycle machines (qreset.cycle, qreset.recovery): what they
yield (actions), what they are sent back (inputs), what a cycle starts from
(:class:`CycleSpec`) and how it ends (:class:`Outcome`).
"""

from __future__ import annotations

import enum
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

from qreset.config import Mode, OnIdentityChange
from qreset.engine import CycleReport
from qreset.pci.address import PciAddress

#: Bound on one QMP command of a cycle. Ours: a live QEMU answers in
#: milliseconds (QMP is served by its main loop), so 5 s only catches a stalled one.
COMMAND_TIMEOUT = 5.0


class Phase(enum.Enum):
    """Where a cycle is (explicit, shown by the monitor)."""

    CHECKING = "checking"    # park: is the guest still parked?
    STOPPING = "stopping"    # stop-on-reset: intent journaled, stop sent
    HELD = "held"            # the guest cannot run; journal + engine
    RESUMING = "resuming"
    RETRYING = "retrying"    # resume failed; waiting to try again
    ENDED = "ended"
    SKIPPED = "skipped"      # not a cycle (an absorbed SHUTDOWN)


class FailKind(enum.Enum):
    REFUSED = "refused"   # QEMU answered with an error
    TIMEOUT = "timeout"   # no answer within the bound (QEMU stalled)
    GONE = "gone"         # the connection is lost


# -- outputs ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Command:
    execute: str
    arguments: Mapping[str, Any] | None = None
    timeout: float = COMMAND_TIMEOUT


@dataclass(frozen=True, slots=True)
class Record:
    record: dict[str, Any]
    #: False: written to the kernel now, fsynced later (journal contract).
    sync: bool = True


@dataclass(frozen=True, slots=True)
class RunEngine:
    devices: tuple[PciAddress, ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Emit:
    name: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    message: str


Action = Command | Record | RunEngine | Sleep | Emit | Log


# -- inputs ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Reply:
    value: object = None
    #: The run-state events (``STOP``/``RESUME``) QEMU emitted while the command ran.
    #: QEMU sends a command's events before its reply on the same socket (a ``stop``
    #: of a running VM emits ``STOP`` inside ``do_vm_stop``), so a ``stop`` whose
    #: reply came without a ``STOP`` found the guest not running (``prelaunch``,
    #: or paused by someone else): it changed nothing. None: not watched.
    events: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """A command that did not succeed; ``error`` is one line saying why."""

    error: str
    kind: FailKind = FailKind.REFUSED


@dataclass(frozen=True, slots=True)
class Written:
    """A record as the journal wrote it (with ``t``), or ``error`` if it could not."""

    record: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class EngineDone:
    report: CycleReport | None = None
    error: str | None = None
    #: How often another manager resumed the guest while the engine ran (libvirt's
    #: fake reboot sends its own ``cont``) and the driver stopped it again at once.
    restops: int = 0


@dataclass(frozen=True, slots=True)
class Slept:
    #: The daemon is leaving: stop retrying, leave the cycle open for the next daemon.
    closing: bool = False


Input = Reply | Failed | Written | EngineDone | Slept | None
Steps = Generator[Action, Input, Any]


@dataclass(frozen=True, slots=True)
class CycleSpec:
    """What the monitor knows when a cycle starts."""

    vm: str
    cid: str
    mode: Mode
    trigger: dict[str, Any]
    devices: tuple[PciAddress, ...]
    t_event: float                 # clock() when the event was read
    wall_event: float              # QEMU's event timestamp (UNIX time)
    on_identity_change: OnIdentityChange = OnIdentityChange.STOP
    cycle_timeout: float = 120.0
    #: Identity of the QEMU process (journaled, so a restart can tell it apart).
    qemu: str | None = None
    #: qreset itself asked for this reset (``reset-vm``): the cycle ends with the
    #: guest running, as the operator who asked expects, even if it found the
    #: guest not running (a QEMU started with ``-S``).
    requested: bool = False


@dataclass
class Outcome:
    """How a cycle ended: the summary (as journaled) and what the monitor must know."""

    summary: dict[str, Any]
    #: Set when the VM is left stopped on purpose (identity change, resume refused).
    stopped_reason: str | None = None
    #: The connection was lost with the guest not resumed: resume on reconnect.
    interrupted: bool = False
    #: The daemon is leaving mid-retry: no terminal record; the next daemon recovers.
    left_open: bool = False
