"""
One QEMU instance, seen from the daemon: its QMP session, and the driver of its reset cycles.

A :class:`VmMonitor` is the body of one named task in the daemon's TaskGroup
(``vm[NAME]``). It connects to the VM's QMP socket when the socket appears,
reconnects with jittered backoff after QEMU restarts (:mod:`qreset.backoff`,
capped by ``policy.connect_backoff_max``), and never blocks the other VMs:
everything slow (the engine) is awaited inside this VM's task only; the
engine's domain locks are what serialize VMs sharing a reset domain.

What a cycle does is decided by the pure state machines of
:mod:`qreset.cycle` (both modes) and :mod:`qreset.recovery` (at connect); this
module only carries out what they yield (:meth:`VmMonitor._drive`): QMP
commands with a bound, journal records, the engine, sleeps that a closing
daemon cuts short.

Session duties that are not cycles:

* at connect, park mode sets ``reboot=shutdown,shutdown=pause`` after reading
  what QEMU had (:mod:`qreset.actions`), and puts exactly that back when the
  VM is removed or the daemon leaves; stop-on-reset changes no action;
* a SHUTDOWN that is a real poweroff under ``shutdown=pause`` (park mode,
  when QEMU would have exited) gets ``quit``;
* a VM left stopped on purpose (identity change, a resume QEMU kept
  refusing) stays stopped: no event starts a cycle for it and ``reset-vm`` is
  refused, until someone resumes it (a ``RESUME`` event) or a new QEMU runs.

Labels as in qemu.qmp: methods called from the daemon (control socket,
shutdown) are the *upper half*; :meth:`VmMonitor.run` and what it calls are
the *bottom half*, running in the VM's own task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from qemu.qmp import ConnectError, EventListener, QMPClient, QMPError
from qemu.qmp.protocol import Runstate
from qemu.qmp.qmp_client import NegotiationError

from qreset import qmp_events
from qreset.backoff import backoff_delay
from qreset.config import Mode
from qreset.cycle import RESET_SETTLE_TIMEOUT
from qreset.errors import QResetError
from qreset.inventory import merge, read_inventory
from qreset.qemu_peer import open_qmp
from qreset.vm_actions import ActionKeeper
from qreset.vm_base import CycleContext, MonitorSettings, VmError, VmState
from qreset.vm_cycles import CycleDriver

__all__ = ["CycleContext", "MonitorSettings", "VmError", "VmMonitor", "VmState", "backoff_delay"]


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
#: Bound on a status query made for the control socket (a query must not hang a client).
STATUS_QUERY_TIMEOUT = 2.0

class VmMonitor(CycleDriver, ActionKeeper):
    """The QMP side of one VM: connection, inventory, events; cycles via :class:`CycleDriver`."""

    # ------------------------------------------------------------------
    # upper half: called from the daemon / control socket

    def describe(self) -> dict[str, Any]:
        m = self._machine
        return {
            "name": self.name, "qmp": str(self.qmp), "mode": self.mode.value,
            "state": self.state.value, "connected": self.connected, "status": self.status,
            "devices": [str(a) for a in self.owned], "cycles": self.cycles,
            "failures": self.failures, "stopped_reason": self.stopped_reason,
            "problem": self.problem, "cycle": None if m is None else {
                "id": m.spec.cid, "phase": m.phase.value, "qmp_commands": m.commands},
        }

    async def refresh_status(self) -> str | None:
        client = self._client
        if client is None or not self.connected:
            return None
        try:
            async with asyncio.timeout(STATUS_QUERY_TIMEOUT):
                reply = await client.execute("query-status")
            if isinstance(reply, dict) and isinstance(reply.get("status"), str):
                self.status = reply["status"]
        except TimeoutError:
            self.status = None  # QEMU does not answer: its status is not known
        except (QMPError, OSError):
            pass
        return self.status

    async def request_reset(self) -> dict[str, Any]:
        """Reset the VM on demand (``system_reset``) and wait for the cycle it causes."""
        client = self._client
        if client is None or not self.connected:
            raise VmError(f"VM {self.name}: not connected to {self.qmp}")
        if self.stopped_reason:
            raise VmError(f"VM {self.name}: left stopped on purpose ({self.stopped_reason}); "
                          "resume it first")
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
        """Ask :meth:`run` to finish: the cycle in progress completes, QEMU gets its actions back."""
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
                    delay = backoff_delay(0, 0.05, scale=0.05)  # well under one guest reboot
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
        # No default listener, no event history: see qreset.qmp_events (one connection
        # lives as long as its QEMU, and qemu.qmp would keep every event it heard).
        client = qmp_events.client(self.name)
        try:
            # A hung QEMU accepts but never greets: bound it, or shutdown would hang too.
            async with asyncio.timeout(CONNECT_TIMEOUT):
                peer = await open_qmp(client, self.qmp)
        except (QMPError, OSError, TimeoutError) as exc:
            self._log.debug("connect %s: %s", self.qmp, exc or type(exc).__name__)
            with contextlib.suppress(Exception):
                await client.disconnect()
            # QEMU is there but an event of a busy guest overtook the reply to
            # qmp_capabilities (qemu.qmp 0.0.6 then fails the negotiation): retry soon.
            self._retry_soon = isinstance(exc, ConnectError) and isinstance(exc.exc, NegotiationError)
            return False
        listener = qmp_events.Listener(EVENTS)
        client.register_listener(listener)
        self._client = client
        self._qemu_id, self._qemu_argv = peer.identity, peer.cmdline()
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
        await self._set_actions(client)
        await self._refresh_inventory(client)
        self.status = await self._status_of(client)
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
            # Each with how QEMU opened it (group/iommufd: qreset.inventory.backend_of).
            self._log.info("devices: %s", ", ".join(
                str(d.host) + (f" ({d.backend.value})" if d.backend else "") for d in self.devices) or "none")

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
                            "vm": self.name, "cycle": self._machine.spec.cid if self._machine else "-",
                            "phase": "note", "note": "QMP connection lost during a cycle"})
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
            if self.stopped_reason:  # someone resumed a VM we had left stopped
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
                await self._trigger(client, event)
            elif reason in EXITS_ANYWAY:
                self._log.info("QEMU is exiting (%s)", reason)
            else:
                await self._poweroff(client, reason)
        elif self.mode is Mode.STOP_ON_RESET and name == "RESET":
            await self._trigger(client, event)
