"""
One QEMU instance, seen from the daemon: its QMP connection and its reset cycles.

A :class:`VmMonitor` is the body of one named task in the daemon's TaskGroup
(``vm[NAME]``). It connects to the VM's QMP socket when the socket appears,
reconnects with jittered exponential backoff after QEMU restarts (aiomqtt's
``random.uniform(0, 1.5 ** min(10, attempt))``, capped by
``policy.connect_backoff_max``), and never blocks the other VMs: everything
slow (the engine) is awaited inside this VM's task only; the engine's domain
locks are what serialize VMs sharing a reset domain.

Two coordination modes (see /work/shared/reference/qmp-reset-flow.md, checked
on QEMU 7.2):

``park``
    At connect: ``set-action reboot=shutdown,shutdown=pause``. A guest reset
    then becomes ``SHUTDOWN {reason: guest-reset}`` + ``STOP`` *before* QEMU's
    own system reset ran (status ``shutdown``). The cycle runs the engine, then
    finishes the reset with the toggle that works in that state::

        set-action reboot=reset ; system_reset ; (status → prelaunch)
        set-action reboot=shutdown ; cont

    (``system_reset`` alone is turned into another shutdown, and ``cont`` then
    fails with "Resetting the Virtual Machine is required".) A SHUTDOWN whose
    reason is a real poweroff keeps its meaning: QEMU would have exited, so
    the daemon sends ``quit`` and journals it.

``stop-on-reset``
    For hosts where another manager (libvirt) interprets SHUTDOWN: on the
    ``RESET`` event, ``stop`` at once, run the engine, ``cont``. QEMU's reset
    has already run and the guest ran briefly; the event-to-stop latency is
    measured and journaled.

Every path out of a cycle resumes the VM — engine error, ``cycle_timeout``,
refused plan, cancellation — except the deliberate one: a device came back
with a different identity and ``on_identity_change = "stop"``, which leaves
the VM stopped, with the reason in the journal and an event.

Labels as in qemu.qmp: methods called from the daemon (control socket,
shutdown) are the *upper half*; :meth:`VmMonitor.run` and what it calls are
the *bottom half*, running in the VM's own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import Runstate
from qemu.qmp.qmp_client import NegotiationError

from qreset.config import Mode, OnIdentityChange
from qreset.errors import QResetError
from qreset.inventory import AssignedDevice, merge, read_inventory
from qreset.journal import Journal
from qreset.pci.address import PciAddress

logger = logging.getLogger(__name__)

#: SHUTDOWN reasons that are reboots once reboot=shutdown (qapi/run-state.json ShutdownCause).
REBOOT_REASONS = frozenset({"guest-reset", "host-qmp-system-reset"})
#: SHUTDOWN reasons after which QEMU exits whatever the shutdown action (QEMU's
#: qmp_quit and qemu_system_killed force SHUTDOWN_ACTION_POWEROFF, softmmu/runstate.c).
EXITS_ANYWAY = frozenset({"host-qmp-quit", "host-signal"})
#: Events a monitor listens to.
EVENTS = ("SHUTDOWN", "RESET", "STOP", "RESUME", "DEVICE_DELETED")
#: How long connecting (greeting + negotiation) may take. Our bound, not QEMU's: a
#: live QEMU greets at once (monitor_qmp_event), so 5 s only catches a hung one.
CONNECT_TIMEOUT = 5.0
#: How long QEMU may take to leave the ``shutdown`` state after ``system_reset``.
#: Our bound: the reset request runs at the main loop's next iteration
#: (qemu_system_reset_request -> main_loop_should_exit), milliseconds on QEMU 7.2.
RESET_SETTLE_TIMEOUT = 5.0
#: Poll period while waiting for that (5 ms: a fraction of the measured park cycle).
STATUS_POLL = 0.005
#: Bound on a status query made for the control socket (a query must not hang a client).
STATUS_QUERY_TIMEOUT = 2.0

_cycle_ids = itertools.count(1)


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


class EngineReport(Protocol):
    """What the monitor reads from the engine's ``CycleReport``."""

    @property
    def ok(self) -> bool: ...

    @property
    def identity_changed(self) -> Sequence[PciAddress]: ...

    def to_json(self) -> dict[str, Any]: ...


class CycleContext(Protocol):
    """What a monitor needs from the daemon (implemented by :class:`qreset.daemon.Daemon`)."""

    journal: Journal

    async def run_engine(self, vm: str, owned: Sequence[PciAddress]) -> EngineReport: ...

    def emit(self, name: str, data: dict[str, Any]) -> None: ...

    def cycle_done(self, monitor: VmMonitor, summary: dict[str, Any]) -> None: ...

    def settings(self) -> MonitorSettings: ...


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    on_identity_change: OnIdentityChange = OnIdentityChange.STOP
    cycle_timeout: float = 120.0
    connect_backoff_max: float = 30.0


@dataclass
class _Cycle:
    """Book-keeping of the cycle in progress (bottom half only)."""

    cid: str
    mode: Mode
    trigger: dict[str, Any]
    t_event: float                 # loop.time() when the event was received
    wall_event: float              # QEMU's event timestamp (UNIX time)
    durations: dict[str, float] = field(default_factory=dict)
    #: QEMU's run status when the cycle began (park mode checks it first).
    status: str | None = None
    waiters: list[asyncio.Future[dict[str, Any]]] = field(default_factory=list)


def backoff_delay(attempt: int, cap: float) -> float:
    """aiomqtt's jittered exponential backoff, capped."""
    return min(cap, random.uniform(0, 1.5 ** min(10, attempt)))


def _event_time(event: Mapping[str, Any]) -> float:
    ts = event.get("timestamp")
    if isinstance(ts, dict):
        try:
            return int(ts["seconds"]) + int(ts["microseconds"]) / 1e6
        except (KeyError, TypeError, ValueError):
            pass
    return time.time()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class VmMonitor:
    """The QMP side of one VM: connection, inventory, events and reset cycles."""

    def __init__(
        self,
        name: str,
        qmp: Path,
        mode: Mode,
        configured: Sequence[PciAddress],
        ctx: CycleContext,
        unfinished: list[dict[str, Any]] | None = None,
    ) -> None:
        self.name = name
        self.qmp = qmp
        self.mode = mode
        self.configured = tuple(configured)
        self.ctx = ctx
        self.devices: list[AssignedDevice] = merge([], self.configured)
        self.state = VmState.WAITING
        #: QEMU's run status as last seen (query-status / events); None when not connected.
        self.status: str | None = None
        self.cycles = 0
        self.failures = 0
        self.connects = 0
        self.last_cycle: dict[str, Any] | None = None
        self.stopped_reason: str | None = None
        self._unfinished = unfinished or []
        self._client: QMPClient | None = None
        self._cycle_lock = asyncio.Lock()
        self._closing = asyncio.Event()
        #: Ends the backoff wait early: set by close() and nudge().
        self._wake = asyncio.Event()
        self._reset_waiters: list[asyncio.Future[dict[str, Any]]] = []
        self._gone_announced = False
        self._retry_soon = False
        #: The id of the cycle in progress (for notes written from outside it).
        self._cycle_id: str | None = None
        #: Which QEMU process this connection talks to (see :func:`qemu_identity`).
        self._qemu_id: str | None = None
        #: (QEMU identity, cycle id) of a cycle that lost its connection with the
        #: guest still stopped: the next connection to that same QEMU resumes it.
        self._interrupted: tuple[str, str] | None = None
        self._log = logger.getChild(name)

    # ------------------------------------------------------------------
    # upper half: called from the daemon / control socket

    @property
    def owned(self) -> tuple[PciAddress, ...]:
        return tuple(d.host for d in self.devices)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "qmp": str(self.qmp), "mode": self.mode.value,
            "state": self.state.value, "connected": self.connected, "status": self.status,
            "devices": [str(a) for a in self.owned], "cycles": self.cycles,
            "failures": self.failures, "stopped_reason": self.stopped_reason,
        }

    async def refresh_status(self) -> str | None:
        client = self._client
        if client is None or not self.connected:
            return None
        with contextlib.suppress(QMPError, OSError, TimeoutError):
            async with asyncio.timeout(STATUS_QUERY_TIMEOUT):
                self.status = await self._query_status(client)
        return self.status

    async def request_reset(self) -> dict[str, Any]:
        """Reset the VM on demand (``system_reset``) and wait for the cycle it causes."""
        client = self._client
        if client is None or not self.connected:
            raise VmError(f"VM {self.name}: not connected to {self.qmp}")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._reset_waiters.append(fut)
        try:
            await client.execute("system_reset")
        except QMPError as exc:
            self._reset_waiters.remove(fut)
            raise VmError(f"VM {self.name}: system_reset failed: {exc}") from None
        # The cycle's own bounds (engine, resume) plus 5 s of slack for QMP round trips.
        timeout = self.ctx.settings().cycle_timeout + 2 * RESET_SETTLE_TIMEOUT + 5.0
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise VmError(f"VM {self.name}: no reset cycle completed within {timeout:.0f}s") from None
        finally:
            if fut in self._reset_waiters:
                self._reset_waiters.remove(fut)

    async def close(self) -> None:
        """Ask :meth:`run` to finish: the cycle in progress completes, QEMU gets its default actions back."""
        self._closing.set()
        self._wake.set()

    def nudge(self) -> None:
        """
        Try to connect now, not at the end of the backoff, which may have grown
        to ``connect_backoff_max`` while QEMU was away: someone (an identical
        ``add-vm`` from libvirt's hook) says QEMU is there, and every reset
        before we connect goes uncoordinated.
        """
        if not self.connected:
            self._wake.set()

    # ------------------------------------------------------------------
    # bottom half: the VM's task

    async def run(self) -> None:
        """Connect, serve, reconnect — until :meth:`close`."""
        attempt = 0
        announced_wait = False
        try:
            while not self._closing.is_set():
                self.state = VmState.WAITING
                if not self.qmp.exists():
                    if not announced_wait:
                        self._log.info("waiting for QMP socket %s", self.qmp)
                        announced_wait = True
                else:
                    served = await self._session()
                    if served:
                        attempt = 0
                        announced_wait = False
                        continue  # reconnect at once: QEMU may be restarting right now
                if self._retry_soon:
                    self._retry_soon = False
                    delay = random.uniform(0.01, 0.05)  # jittered, yet well under one guest reboot
                else:
                    delay = backoff_delay(attempt, self.ctx.settings().connect_backoff_max)
                    attempt += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                if self._wake.is_set() and not self._closing.is_set():
                    self._wake.clear()
                    attempt = 0  # nudged: QEMU is said to be there, the backoff starts over
        finally:
            self.state = VmState.CLOSED
            self.status = None

    async def _session(self) -> bool:
        """One connection. Returns True if it got as far as serving events."""
        client = QMPClient(self.name)
        try:
            # A hung QEMU accepts but never greets: bound it, or shutdown would hang too.
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await client.connect(str(self.qmp))
        except (QMPError, OSError, TimeoutError) as exc:
            self._log.debug("connect %s: %s", self.qmp, exc or type(exc).__name__)
            with contextlib.suppress(Exception):
                await client.disconnect()
            # QEMU is there but an event of a busy guest overtook the reply to
            # qmp_capabilities (qemu.qmp 0.0.6 then fails the negotiation): retry soon.
            self._retry_soon = isinstance(exc, ConnectError) and isinstance(exc.exc, NegotiationError)
            return False
        listener = EventListener(EVENTS)
        client.register_listener(listener)
        self._client = client
        self._qemu_id = qemu_identity(client)
        self._gone_announced = False
        self.connects += 1
        served = False
        try:
            self.state = VmState.CONNECTING
            async with asyncio.timeout(CONNECT_TIMEOUT + self.ctx.settings().cycle_timeout):
                await self._on_connect(client)  # may finish a recovered cycle
            if self.status == "running":
                self.stopped_reason = None  # a new QEMU, or someone resumed it meanwhile
            served = True
            self.state = VmState.STOPPED if self.stopped_reason else VmState.RUNNING
            self.ctx.emit("QRESET_VM_CONNECTED", {
                "vm": self.name, "qmp": str(self.qmp), "mode": self.mode.value,
                "devices": [str(a) for a in self.owned], "status": self.status,
            })
            self._log.info("connected (%s mode, status %s, devices %s)", self.mode.value,
                           self.status, ", ".join(map(str, self.owned)) or "none")
            await self._serve(client, listener)
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            self._log.warning("QMP session ended: %s", exc or type(exc).__name__)
        except QResetError as exc:
            self._log.error("%s", exc)
        finally:
            self._client = None
            client.remove_listener(listener)
            with contextlib.suppress(Exception):
                await client.disconnect()
            if served:
                self._announce_gone()
        return served

    def _announce_gone(self) -> None:
        """Say once per connection that it is gone (as soon as noticed, even mid-cycle)."""
        if self._gone_announced:
            return
        self._gone_announced = True
        self.status = None
        self.ctx.emit("QRESET_VM_DISCONNECTED", {"vm": self.name, "qmp": str(self.qmp)})
        self._log.info("disconnected")

    async def _on_connect(self, client: QMPClient) -> None:
        if self.mode is Mode.PARK:
            try:
                await client.execute("set-action", {"reboot": "shutdown", "shutdown": "pause"})
            except ExecuteError as exc:
                raise QResetError(f"VM {self.name}: set-action refused ({exc}): park mode needs "
                                  "QEMU >= 6.0; use mode = \"stop-on-reset\"") from None
        else:
            # Undo a park-mode leftover: QEMU's defaults (qemu-options.hx: -action).
            await client.execute("set-action", {"reboot": "reset", "shutdown": "poweroff"})
        await self._refresh_inventory(client)
        self.status = await self._query_status(client)
        await self._recover(client)

    async def _refresh_inventory(self, client: QMPClient) -> None:
        before = self.owned
        try:
            self.devices = await read_inventory(client, self.name, self.configured)
        except (QMPError, QResetError) as exc:
            self._log.warning("inventory over QMP failed (%s); using configured devices", exc)
            self.devices = merge([], self.configured)
        except Exception as exc:  # an odd reply must not stop the VM being served (parked forever)
            self._log.warning("inventory over QMP failed (%s: %s); using configured devices",
                              type(exc).__name__, exc)
            self.devices = merge([], self.configured)
        if self.owned != before:
            self._log.info("devices: %s", ", ".join(map(str, self.owned)) or "none")

    async def _serve(self, client: QMPClient, listener: EventListener) -> None:
        events = asyncio.create_task(self._consume(client, listener), name=f"vm[{self.name}].events")
        gone = asyncio.create_task(self._wait_gone(client), name=f"vm[{self.name}].watch")
        closing = asyncio.create_task(self._closing.wait(), name=f"vm[{self.name}].closing")
        try:
            done, _ = await asyncio.wait({events, gone, closing}, return_when=asyncio.FIRST_COMPLETED)
            if events in done:
                events.result()  # re-raise what ended the consumer
            elif gone in done:
                in_cycle = self._cycle_lock.locked()
                self._announce_gone()
                if in_cycle:
                    self._log.warning("QEMU went away in the middle of a cycle")
                    with contextlib.suppress(Exception):
                        await self.ctx.journal.append({
                            "vm": self.name, "cycle": self._cycle_id or "-", "phase": "note",
                            "note": "QMP connection lost during a cycle"})
                # Let the cycle notice on its own (its next QMP command fails) and record it.
                async with self._cycle_lock:
                    pass
            else:
                self.state = VmState.CLOSING
                await self._release(client)
        finally:
            for task in (events, gone, closing):
                task.cancel()
            await asyncio.gather(events, gone, closing, return_exceptions=True)

    async def _wait_gone(self, client: QMPClient) -> None:
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()

    async def _release(self, client: QMPClient) -> None:
        """Daemon leaving: give QEMU its default actions back, resume a guest parked meanwhile."""
        async with self._cycle_lock:
            with contextlib.suppress(QMPError, OSError, TimeoutError):
                async with asyncio.timeout(RESET_SETTLE_TIMEOUT):
                    await client.execute("set-action", {"reboot": "reset", "shutdown": "poweroff"})
                    status = await self._query_status(client)
                    if status == "shutdown" and self.mode is Mode.PARK:
                        # A guest reset raced with our leaving: finish it with QEMU's own reset.
                        self._log.info("finishing a reset that arrived while closing")
                        await self._finish_park(client, resume=True, keep_parking=False)
                    self._log.info("default actions restored (reboot=reset, shutdown=poweroff)")

    async def _consume(self, client: QMPClient, listener: EventListener) -> None:
        async for event in listener:
            await self._on_event(client, event)

    async def _on_event(self, client: QMPClient, event: Mapping[str, Any]) -> None:
        name = event.get("event")
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        assert isinstance(data, dict)
        reason = str(data.get("reason", ""))
        self._log.debug("event %s %s", name, data)
        if name == "STOP":
            self.status = "paused" if self.status == "running" else self.status
        elif name == "RESUME":
            self.status = "running"
            if self.state is VmState.STOPPED:  # the operator resumed a VM we had left stopped
                self._log.info("resumed by someone else; was stopped: %s", self.stopped_reason)
                self.state, self.stopped_reason = VmState.RUNNING, None
        if self._closing.is_set():
            return
        if name == "DEVICE_DELETED":
            # A hot-unplugged vfio-pci device is no longer this VM's (QEMU 7.2 has no
            # DEVICE_ADDED event: a hot-plugged one is picked up at the next connect).
            await self._refresh_inventory(client)
        elif self.mode is Mode.PARK and name == "SHUTDOWN":
            if reason in REBOOT_REASONS:
                await self._cycle(client, event)
            elif reason in EXITS_ANYWAY:
                self._log.info("QEMU is exiting (%s)", reason)
            else:
                await self._poweroff(client, reason)
        elif self.mode is Mode.STOP_ON_RESET and name == "RESET":
            await self._cycle(client, event)

    async def _poweroff(self, client: QMPClient, reason: str) -> None:
        """A real poweroff under shutdown=pause: QEMU paused where it would have exited. Exit it."""
        self._log.info("guest powered off (%s): sending quit, as QEMU would have exited", reason)
        with contextlib.suppress(Exception):
            await self.ctx.journal.append({
                "vm": self.name, "cycle": f"{self.name}-poweroff-{os.getpid()}-{next(_cycle_ids)}",
                "phase": "poweroff", "reason": reason, "action": "quit"})
        with contextlib.suppress(QMPError, OSError):
            await client.execute("quit")

    # ------------------------------------------------------------------
    # the cycle

    async def _cycle(self, client: QMPClient, event: Mapping[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        t_event = loop.time()
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        assert isinstance(data, dict)
        async with self._cycle_lock:
            cyc = _Cycle(
                cid=f"{self.name}-{int(time.time())}-{os.getpid()}-{next(_cycle_ids)}",
                mode=self.mode,
                trigger={"event": event.get("event"), "reason": data.get("reason"),
                         "guest": data.get("guest")},
                t_event=t_event, wall_event=_event_time(event),
            )
            if data.get("reason") == "host-qmp-system-reset":
                cyc.waiters, self._reset_waiters = self._reset_waiters, []
            if self.mode is Mode.PARK and not await self._still_parked(client, cyc):
                return
            self.state = VmState.CYCLE
            self._cycle_id = cyc.cid
            try:
                summary = await self._run_cycle(client, cyc)
            except (QResetError, QMPError, OSError) as exc:
                # e.g. the journal's disk is full: the cycle cannot be recorded, but
                # the guest must not stay parked because of it.
                summary = await self._abort(client, cyc, exc)
            except asyncio.CancelledError:
                # The daemon is being torn down mid-cycle: never leave the guest parked.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(RESET_SETTLE_TIMEOUT):
                        await self._resume(client)
                    await self.ctx.journal.append({
                        "vm": self.name, "cycle": cyc.cid, "phase": "failed",
                        "outcome": "failed", "error": "cancelled; VM resumed"})
                raise
            finally:
                self._cycle_id = None
                if self.state is VmState.CYCLE:
                    self.state = VmState.RUNNING if self.connected else VmState.WAITING
            for fut in cyc.waiters:
                if not fut.done():
                    fut.set_result(summary)

    async def _still_parked(self, client: QMPClient, cyc: _Cycle) -> bool:
        """Whether a SHUTDOWN event still describes QEMU's state.

        A ``system_reset`` sent while the guest was already parked (``reset-vm``
        during a cycle) queues a second SHUTDOWN that the first cycle's own reset
        has already absorbed: by the time it is read the guest runs again, and
        resetting its devices now would pull them from under a running guest.
        """
        try:
            cyc.status = await self._query_status(client)
        except (QMPError, QResetError):
            return True  # let the cycle meet the error and report it
        if cyc.status != "running":  # shutdown (parked), or prelaunch/paused: the guest cannot run
            return True
        self._log.info("%s(%s) already handled (QEMU status %s): no cycle", cyc.trigger["event"],
                       cyc.trigger["reason"], cyc.status)
        for fut in cyc.waiters:
            if not fut.done():
                fut.set_result(self.last_cycle or {"vm": self.name, "outcome": "resumed",
                                                   "vm_resumed": True, "error": None})
        return False

    async def _abort(self, client: QMPClient, cyc: _Cycle, exc: BaseException) -> dict[str, Any]:
        """A cycle broke outside the engine: resume the guest anyway, say why once."""
        self._log.error("cycle %s aborted: %s; resuming the VM", cyc.cid, exc)
        resumed = False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2 * RESET_SETTLE_TIMEOUT):
                await self._resume(client)
                resumed = True
        if not resumed:
            self._note_interrupted(cyc, keep_stopped=False)
        summary: dict[str, Any] = {
            "vm": self.name, "cycle": cyc.cid, "phase": "failed", "outcome": "failed",
            "mode": cyc.mode.value, "trigger": cyc.trigger, "event_ts": round(cyc.wall_event, 6),
            "vm_resumed": resumed, "devices": [str(a) for a in self.owned],
            "durations": dict(cyc.durations), "error": f"cycle aborted: {exc}", "report": None,
        }
        self.cycles += 1
        self.failures += 1
        self.last_cycle = summary
        with contextlib.suppress(Exception):
            summary = await self.ctx.journal.append(summary)
        self.ctx.cycle_done(self, summary)
        self.ctx.emit("QRESET_RESET_FAILED", {k: summary[k] for k in (
            "vm", "cycle", "outcome", "mode", "vm_resumed", "durations", "error")})
        return summary

    async def _run_cycle(self, client: QMPClient, cyc: _Cycle) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        journal = self.ctx.journal
        settings = self.ctx.settings()
        base = {"vm": self.name, "cycle": cyc.cid}
        stop_latency: dict[str, float] = {}
        if cyc.mode is Mode.STOP_ON_RESET:
            # Stop first, write later: every millisecond here is guest time after QEMU's reset.
            try:
                await client.execute("stop")
            except QMPError as exc:
                return await self._end(cyc, "failed", None, f"stop failed: {exc}", resumed=False)
            t_stop = loop.time()
            stop_latency = {"recv_to_stop_ms": _ms(t_stop - cyc.t_event),
                            "event_to_stop_ms": _ms(max(0.0, time.time() - cyc.wall_event))}
        await journal.append({**base, "phase": "cycle-start", "mode": cyc.mode.value,
                              "trigger": cyc.trigger, "devices": [str(a) for a in self.owned],
                              **stop_latency})
        self.ctx.emit("QRESET_RESET_STARTED", {**base, "mode": cyc.mode.value, "trigger": cyc.trigger,
                                               "devices": [str(a) for a in self.owned]})
        cyc.durations.update(stop_latency)
        try:
            self.status = cyc.status or await self._query_status(client)
        except QMPError as exc:
            return await self._end(cyc, "failed", None, f"QEMU went away before the reset: {exc}",
                                   resumed=False)
        cyc.durations["event_to_parked_ms"] = _ms(loop.time() - cyc.t_event)
        await journal.append({**base, "phase": "parked", "status": self.status})

        # --- the engine: every affected function reset while the guest cannot run
        report: EngineReport | None = None
        error: str | None = None
        t0 = loop.time()
        if self.owned:
            try:
                async with asyncio.timeout(settings.cycle_timeout):
                    report = await self.ctx.run_engine(self.name, self.owned)
                if not report.ok:
                    error = _report_error(report)
            except TimeoutError:
                error = f"engine did not finish within cycle_timeout={settings.cycle_timeout:g}s"
            except QResetError as exc:
                error = str(exc)
            except Exception as exc:  # the VM must be resumed whatever the engine did
                self._log.debug("engine crashed", exc_info=True)
                error = f"engine error: {type(exc).__name__}: {exc}"
        cyc.durations["engine_ms"] = _ms(loop.time() - t0)
        changed = list(report.identity_changed) if report is not None else []
        await journal.append({**base, "phase": "engine-done", "ok": report is not None and report.ok,
                              "error": error, "engine_ms": cyc.durations["engine_ms"],
                              "identity_changed": [str(a) for a in changed]})

        # --- identity change: escalate, never restore blindly
        stop_it = bool(changed) and settings.on_identity_change is OnIdentityChange.STOP
        for addr in changed:
            self.ctx.emit("QRESET_DEVICE_CHANGED", {
                **base, "function": str(addr),
                "action": settings.on_identity_change.value,
                "detail": "device came back with a different identity; config space not restored",
            })

        # --- resume (or leave stopped on purpose)
        t1 = loop.time()
        try:
            async with asyncio.timeout(2 * RESET_SETTLE_TIMEOUT):
                await self._resume(client, cont=not stop_it)
        except (QMPError, OSError, TimeoutError) as exc:
            why = f"could not resume: {exc or type(exc).__name__}"
            self._note_interrupted(cyc, keep_stopped=stop_it)
            if not self.connected:
                why = "QEMU went away during the cycle"
            return await self._end(cyc, "failed", report, _join(error, why), resumed=False)
        cyc.durations["resume_ms"] = _ms(loop.time() - t1)
        if stop_it:
            self.stopped_reason = ("identity changed: " + ", ".join(map(str, changed))
                                   + " (on_identity_change=stop)")
            return await self._end(cyc, "stopped", report, _join(error, self.stopped_reason), resumed=False)
        self.stopped_reason = None
        if error:
            return await self._end(cyc, "failed", report, error, resumed=True)
        return await self._end(cyc, "resumed", report, None, resumed=True)

    async def _end(self, cyc: _Cycle, outcome: str, report: EngineReport | None,
                   error: str | None, *, resumed: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        cyc.durations["total_ms"] = _ms(loop.time() - cyc.t_event)
        summary: dict[str, Any] = {
            "vm": self.name, "cycle": cyc.cid, "phase": outcome, "outcome": outcome,
            "mode": cyc.mode.value, "trigger": cyc.trigger, "event_ts": round(cyc.wall_event, 6),
            "vm_resumed": resumed,
            "devices": [str(a) for a in self.owned], "durations": dict(cyc.durations),
            "error": error, "report": report.to_json() if report is not None else None,
        }
        self.cycles += 1
        if outcome != "resumed":
            self.failures += 1
        if outcome == "stopped":
            self.state = VmState.STOPPED
        self.last_cycle = summary
        with contextlib.suppress(QResetError):
            summary = await self.ctx.journal.append(summary)
        self.ctx.cycle_done(self, summary)
        event = "QRESET_RESET_COMPLETED" if outcome == "resumed" else "QRESET_RESET_FAILED"
        self.ctx.emit(event, {k: summary[k] for k in (
            "vm", "cycle", "outcome", "mode", "vm_resumed", "durations", "error")})
        log = self._log.info if outcome == "resumed" else self._log.warning
        log("cycle %s %s in %.1f ms (engine %.1f ms)%s", cyc.cid, outcome,
            cyc.durations["total_ms"], cyc.durations.get("engine_ms", 0.0),
            f": {error}" if error else "")
        return summary

    async def _resume(self, client: QMPClient, cont: bool = True) -> None:
        if self.mode is Mode.PARK:
            await self._finish_park(client, resume=cont, keep_parking=True)
        else:
            status = await self._query_status(client)
            if cont and status != "running":
                await client.execute("cont")
                self.status = "running"

    async def _finish_park(self, client: QMPClient, *, resume: bool, keep_parking: bool) -> None:
        """Finish a parked reset: the set-action toggle around system_reset, then cont."""
        status = await self._query_status(client)
        if status == "shutdown":
            await client.execute("set-action", {"reboot": "reset"})
            try:
                await client.execute("system_reset")
                # The reset request is served by QEMU's main loop: wait until it ran.
                status = await self._wait_status_change(client, "shutdown")
            finally:
                if keep_parking:
                    await client.execute("set-action", {"reboot": "shutdown"})
        if resume and status != "running":
            await client.execute("cont")
            status = "running"
        self.status = status

    async def _wait_status_change(self, client: QMPClient, leaving: str) -> str:
        async with asyncio.timeout(RESET_SETTLE_TIMEOUT):
            while True:
                status = await self._query_status(client)
                if status != leaving:
                    return status
                await asyncio.sleep(STATUS_POLL)

    @staticmethod
    async def _query_status(client: QMPClient) -> str:
        reply = await client.execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise QResetError(f"query-status: unexpected reply {reply!r}")
        return str(reply["status"])

    # ------------------------------------------------------------------
    # recovery of a cycle a previous daemon left open

    def _note_interrupted(self, cyc: _Cycle, *, keep_stopped: bool) -> None:
        """The connection broke before the guest was resumed: resume it on reconnect."""
        if keep_stopped or self._qemu_id is None:
            return
        self._interrupted = (self._qemu_id, cyc.cid)

    async def _resume_interrupted(self, client: QMPClient) -> bool:
        """
        Finish a cycle whose connection broke with the guest still parked/stopped.

        Only when this is the same QEMU process (a new one started with -S is in
        ``prelaunch`` too, and ``cont`` would start it behind its manager's back)
        and it is still where the cycle left it.
        """
        pending, self._interrupted = self._interrupted, None
        if pending is None:
            return False
        qemu_id, cid = pending
        expected = {"shutdown", "prelaunch"} if self.mode is Mode.PARK else {"paused"}
        if qemu_id != self._qemu_id or self.status not in expected:
            return False
        self._log.warning("cycle %s lost its QMP connection with the guest %s: resuming it",
                          cid, self.status)
        async with asyncio.timeout(2 * RESET_SETTLE_TIMEOUT):
            await self._resume(client)
        with contextlib.suppress(QResetError):
            await self.ctx.journal.append({"vm": self.name, "cycle": cid, "phase": "note",
                                           "note": f"resumed on reconnect (status was {self.status})"})
        self.status = "running"
        return True

    async def _recover(self, client: QMPClient) -> None:
        if await self._resume_interrupted(client):
            return
        records, self._unfinished = self._unfinished, []
        status = self.status
        if not records:
            if self.mode is Mode.PARK and status == "shutdown":
                # Parked, yet no journal record: the previous daemon died between the
                # SHUTDOWN and its first write. Run the cycle now, as if the event just came.
                self._log.warning("found the guest parked with no journal record: running its cycle")
                await self._cycle(client, {"event": "SHUTDOWN", "data": {
                    "reason": "guest-reset", "guest": True, "recovered": True}})
            return
        cid = str(records[0]["cycle"])
        phases = [r.get("phase") for r in records]
        engine_done = "engine-done" in phases
        self._log.warning("cycle %s was left open by a previous daemon (phases %s; QEMU status %s)",
                          cid, ",".join(str(p) for p in phases), status)
        done = next((r for r in records if r.get("phase") == "engine-done"), {})
        listed = done.get("identity_changed")
        # A hand-edited or damaged record: only a list of addresses means a decision to keep.
        changed = [a for a in listed if isinstance(a, str)] if isinstance(listed, list) else []
        # The previous daemon had decided to leave the VM stopped: keep to it.
        stop_it = bool(changed) and self.ctx.settings().on_identity_change is OnIdentityChange.STOP
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(2 * RESET_SETTLE_TIMEOUT):
                await self._resume(client, cont=not stop_it)
            outcome = "resumed" if engine_done else "failed"
            error = None if engine_done else (
                "previous daemon died before the engine finished: the devices may not have been reset")
            resumed = True
            if stop_it:
                self.stopped_reason = ("identity changed: " + ", ".join(changed)
                                       + " (on_identity_change=stop)")
                outcome, error, resumed = "stopped", self.stopped_reason, False
        except (QMPError, OSError, TimeoutError, QResetError) as exc:
            outcome, error, resumed = "failed", f"recovery could not resume the VM: {exc}", False
        summary: dict[str, Any] = {
            "vm": self.name, "cycle": cid, "phase": outcome, "outcome": outcome, "recovered": True,
            "mode": self.mode.value, "status_found": status, "vm_resumed": resumed, "error": error,
            "durations": {"recovery_ms": _ms(time.monotonic() - t0)},
            "devices": [str(a) for a in self.owned], "report": None,
        }
        self.cycles += 1
        self.failures += outcome != "resumed"
        self.last_cycle = summary
        with contextlib.suppress(QResetError):
            summary = await self.ctx.journal.append(summary)
        self.ctx.cycle_done(self, summary)
        self.ctx.emit("QRESET_RESET_COMPLETED" if outcome == "resumed" else "QRESET_RESET_FAILED",
                      {k: summary[k] for k in ("vm", "cycle", "outcome", "mode", "vm_resumed",
                                               "durations", "error")} | {"recovered": True})
        self._log.info("recovered cycle %s: %s (QEMU status was %s)", cid, outcome, status)


def qemu_identity(client: QMPClient) -> str | None:
    """
    ``PID:STARTTIME`` of the process at the other end of the QMP socket, or None.

    From the socket's peer credentials (SO_PEERCRED, socket(7)) and field 22 of
    /proc/PID/stat (proc(5): start time in clock ticks since boot), so a reused
    PID is not taken for the same process. Used to tell a QEMU that we parked
    and reconnected to from a new QEMU in the same state.
    """
    # qemu.qmp keeps its stream private; read-only use of the transport's socket.
    writer = getattr(client, "_writer", None)
    sock = writer.get_extra_info("socket") if writer is not None else None  # asyncio TransportSocket
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]  # field 22; fields 1-2 end at the last ')'
    except (OSError, IndexError, struct.error):
        return None
    return f"{pid}:{start}"


def _join(a: str | None, b: str | None) -> str | None:
    return "; ".join(x for x in (a, b) if x) or None


def _report_error(report: EngineReport) -> str:
    """One line saying why a report is not ok (refusals first, then domain errors)."""
    data = report.to_json()
    parts: list[str] = []
    plan = data.get("plan") if isinstance(data.get("plan"), dict) else None
    if plan:
        for r in plan.get("refusals") or []:
            parts.append(f"refused: {r if isinstance(r, str) else _fmt_refusal(r)}")
    changed = data.get("identity_changed") or []
    if changed:
        parts.append("identity changed: " + ", ".join(map(str, changed))
                     + " (config space not restored: escalated)")
    for d in data.get("domains") or []:
        if changed and isinstance(d, dict) and not d.get("error"):
            continue  # already said why
        if isinstance(d, dict) and not d.get("ok", True):
            parts.append(f"{d.get('domain', d.get('key', '?'))}: {d.get('error') or 'failed'}")
    return "; ".join(parts) or "engine reported failure"


def _fmt_refusal(r: object) -> str:
    if isinstance(r, dict):
        return f"{r.get('function')} ({r.get('owner')}): {r.get('reason')}"
    return str(r)
