"""
The driver of a monitor's cycles: carries out what the machines of qreset.cycle and
qreset.recovery yield, over this VM's QMP connection.

Each :class:`~qreset.cycle.Command` gets a bound and comes back as a
:class:`~qreset.cycle.Reply` or a :class:`~qreset.cycle.Failed` that says why
in one line (QEMU's error, "no reply within 5s (QEMU not answering)", or
the connection lost); records go to the journal (``sync=False`` for the
stop-on-reset intent); a :class:`~qreset.cycle.Sleep` ends early when the
daemon is leaving. The driver decides nothing about the cycle itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any, cast

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from qreset import qmp_events
from qreset.config import Mode
from qreset.cycle import (
    RESET_SETTLE_TIMEOUT,
    Action,
    Command,
    CycleMachine,
    CycleSpec,
    Emit,
    EngineDone,
    Failed,
    FailKind,
    Input,
    Log,
    Outcome,
    Record,
    Reply,
    RunEngine,
    Sleep,
    Slept,
    Written,
)
from qreset.errors import QResetError
from qreset.recovery import Verdict, recover
from qreset.vm_base import MonitorBase, VmState, cycle_ids, event_time

if TYPE_CHECKING:
    from qreset.vm import VmMonitor


class CycleDriver(MonitorBase):
    """Mixed into :class:`qreset.vm.VmMonitor` (bottom half: the VM's own task)."""

    async def _trigger(self, client: QMPClient, event: Mapping[str, Any]) -> None:
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        assert isinstance(data, dict)
        if self.stopped_reason:
            # Stopped on purpose: nothing may start a cycle that would resume it.
            self._log.info("%s(%s) while stopped on purpose (%s): no cycle", event.get("event"),
                           data.get("reason"), self.stopped_reason)
            return
        await self._cycle(client, event.get("event"), data, asyncio.get_running_loop().time(),
                          event_time(event))

    def _spec(self, event: object, data: Mapping[str, Any], t_event: float, wall: float) -> CycleSpec:
        settings = self.ctx.settings()
        return CycleSpec(
            vm=self.name, cid=f"{self.name}-{int(time.time())}-{os.getpid()}-{next(cycle_ids)}",
            mode=self.mode,
            trigger={"event": event, "reason": data.get("reason"), "guest": data.get("guest")},
            devices=self.owned, t_event=t_event, wall_event=wall,
            on_identity_change=settings.on_identity_change, cycle_timeout=settings.cycle_timeout,
            qemu=self._qemu_id)

    async def _cycle(self, client: QMPClient, event: object, data: Mapping[str, Any],
                     t_event: float, wall: float) -> None:
        loop = asyncio.get_running_loop()
        async with self._cycle_lock:
            waiters: list[asyncio.Future[dict[str, Any]]] = []
            if data.get("reason") == "host-qmp-system-reset":
                waiters, self._reset_waiters = self._reset_waiters, []
            spec = dataclasses.replace(self._spec(event, data, t_event, wall), requested=bool(waiters))
            machine = CycleMachine(spec, clock=loop.time, wall=time.time, status=None)
            self._machine = machine
            self.state = VmState.CYCLE
            # stop-on-reset: watch the run state while the cycle holds the guest (see
            # Reply.events and _run_engine): another manager may resume it behind us.
            watch = qmp_events.Listener(("STOP", "RESUME")) if self.mode is Mode.STOP_ON_RESET else None
            self._runstate = watch
            if watch is not None:
                client.register_listener(watch)
            try:
                out = await self._drive(client, machine.run())
            except asyncio.CancelledError:
                # The daemon is being torn down mid-cycle: never leave the guest parked.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(RESET_SETTLE_TIMEOUT):
                        await self._drive(client, machine.resume(cont=True))
                    await self.ctx.journal.append({
                        "vm": self.name, "cycle": machine.spec.cid, "phase": "failed",
                        "outcome": "failed", "error": "cancelled; VM resumed", "vm_resumed": True,
                        "mode": self.mode.value, "devices": [str(a) for a in self.owned]})
                raise
            finally:
                self._machine = None
                if watch is not None:
                    self._runstate = None
                    with contextlib.suppress(Exception):
                        client.remove_listener(watch)
                if self.state is VmState.CYCLE:
                    self.state = VmState.RUNNING if self.connected else VmState.WAITING
            if machine.status is not None:
                self.status = machine.status
            if out is None:  # absorbed: the cycle that absorbed it answers the waiters
                summary = self.last_cycle or {"vm": self.name, "outcome": "resumed",
                                              "vm_resumed": True, "error": None}
            else:
                summary = self._finish(out)
            for fut in waiters:
                if not fut.done():
                    fut.set_result(summary)

    def _finish(self, out: Outcome) -> dict[str, Any]:
        """Book-keeping of an ended cycle (the machine has journaled its summary)."""
        summary = out.summary
        outcome = str(summary.get("outcome"))
        if out.stopped_reason:
            self.stopped_reason, self.state = out.stopped_reason, VmState.STOPPED
        elif summary.get("vm_resumed"):
            self.stopped_reason = None
        if out.interrupted and self._qemu_id is not None and not out.stopped_reason:
            self._interrupted = (self._qemu_id, str(summary["cycle"]))
        self.cycles += 1
        self.failures += outcome != "resumed"
        self.last_cycle = summary
        self.ctx.cycle_done(cast("VmMonitor", self), summary)  # the only subclass
        keys = ("vm", "cycle", "outcome", "mode", "vm_resumed", "durations", "error")
        self.ctx.emit("QRESET_RESET_COMPLETED" if outcome == "resumed" else "QRESET_RESET_FAILED",
                      {k: summary.get(k) for k in keys} | ({"recovered": True} if summary.get("recovered")
                                                          else {}))
        log = self._log.info if outcome == "resumed" else self._log.warning
        durations = summary.get("durations") or {}
        log("cycle %s %s in %.1f ms (engine %.1f ms, %d QMP commands)%s", summary["cycle"], outcome,
            durations.get("total_ms", durations.get("recovery_ms", 0.0)), durations.get("engine_ms", 0.0),
            summary.get("qmp_commands", 0), f": {summary['error']}" if summary.get("error") else "")
        return summary

    async def _drive(self, client: QMPClient, steps: Generator[Action, Input, Any]) -> Any:
        """Carry out what a machine yields until it returns; return its value."""
        result: Input = None
        while True:
            try:
                action = steps.send(result)
            except StopIteration as stop:
                return stop.value
            result = await self._perform(client, action)

    async def _perform(self, client: QMPClient, action: Action) -> Input:
        if isinstance(action, Command):
            watch = self._runstate if action.execute == "stop" else None
            if watch is not None:
                watch.clear()  # from here on: what this stop caused
            try:
                async with asyncio.timeout(action.timeout):
                    value = await client.execute(action.execute, dict(action.arguments or {}) or None)
                if watch is None:
                    return Reply(value)
                # QEMU sends a command's events before its reply: they are queued by now.
                return Reply(value, events=tuple(str(e.get("event")) for e in watch.clear()))
            except TimeoutError:
                return Failed(f"{action.execute}: no reply within {action.timeout:g}s (QEMU not answering)",
                              FailKind.TIMEOUT)
            except ExecuteError as exc:
                return Failed(f"{action.execute}: {exc}", FailKind.REFUSED)
            except (QMPError, OSError, EOFError) as exc:
                kind = FailKind.REFUSED if self.connected else FailKind.GONE
                return Failed(f"{action.execute}: {exc or type(exc).__name__}", kind)
        if isinstance(action, Record):
            try:
                return Written(await self.ctx.journal.append(action.record, sync=action.sync))
            except QResetError as exc:
                return Written(action.record, error=str(exc))
        if isinstance(action, RunEngine):
            if self._runstate is None:
                return await self._run_engine(action)
            guard = asyncio.create_task(self._hold_against_resumes(client, self._runstate),
                                        name=f"vm[{self.name}].hold")
            try:
                done = await self._run_engine(action)
            finally:
                guard.cancel()
                await asyncio.gather(guard, return_exceptions=True)
            return EngineDone(done.report, done.error, restops=self._restops)
        if isinstance(action, Sleep):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(action.seconds):
                    await self._closing.wait()
            return Slept(closing=self._closing.is_set())
        if isinstance(action, Emit):
            self.ctx.emit(action.name, action.data)
        elif isinstance(action, Log):
            self._log.log(action.level, "%s", action.message)
        return None

    async def _hold_against_resumes(self, client: QMPClient, watch: EventListener) -> None:
        """
        While the engine runs, answer every ``RESUME`` with ``stop`` at once.

        In stop-on-reset mode the guest is not ours alone: libvirt's fake reboot
        (``on_poweroff=restart``, ``virsh reboot --mode acpi``) sends
        ``system_reset`` and then its own ``cont``, which can come after our
        ``stop`` and let the guest run on devices being reset. Counts how many
        times that happened in ``_restops``.
        """
        self._restops = 0
        pending = [str(e.get("event")) for e in watch.clear()]  # since our stop replied
        resumed = bool(pending) and pending[-1] == "RESUME"
        while True:
            if resumed:
                with contextlib.suppress(QMPError, OSError, TimeoutError):
                    async with asyncio.timeout(RESET_SETTLE_TIMEOUT):
                        await client.execute("stop")
                    self._restops += 1
                    self._log.warning("the guest was resumed by another manager during the engine: "
                                      "stopped again")
            event = await watch.get()
            resumed = event.get("event") == "RESUME"

    async def _run_engine(self, action: RunEngine) -> EngineDone:
        try:
            async with asyncio.timeout(action.timeout):
                return EngineDone(await self.ctx.run_engine(self.name, action.devices))
        except TimeoutError:
            return EngineDone(None, f"engine did not finish within cycle_timeout={action.timeout:g}s")
        except QResetError as exc:
            return EngineDone(None, str(exc))
        except Exception as exc:  # the VM must be resumed whatever the engine did
            self._log.debug("engine crashed", exc_info=True)
            return EngineDone(None, f"engine error: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------
    # at connect: finish what a lost connection or a dead daemon left

    async def _recover(self, client: QMPClient) -> None:
        if await self._resume_interrupted(client):
            return
        records, self._unfinished = self._unfinished, []
        loop = asyncio.get_running_loop()
        spec = self._spec("recovery", {}, loop.time(), time.time())
        verdict, out, machine = await self._drive(
            client, recover(spec, records, self.status, loop.time, time.time))
        if verdict is Verdict.RUN_CYCLE:
            # Parked, yet no journal record: the previous daemon died between the
            # SHUTDOWN and its first write. Run the cycle now, as if the event just came.
            self._log.warning("found the guest parked with no journal record: running its cycle")
            await self._cycle(client, "SHUTDOWN", {"reason": "guest-reset", "guest": True,
                                                   "recovered": True}, loop.time(), time.time())
        elif out is not None and not out.left_open:
            if machine is not None and machine.status is not None:
                self.status = machine.status
            self._finish(out)
        else:
            self._keep_previous_stop()

    def _keep_previous_stop(self) -> None:
        """A previous daemon left this very QEMU stopped on purpose: it stays so (and says why)."""
        last, self._last = self._last, None
        if last is None or last.get("outcome") != "stopped" or self._qemu_id is None \
                or last.get("qemu") != self._qemu_id or self.status == "running":
            return
        reason = last.get("stopped_reason") or last.get("error")
        self.stopped_reason = str(reason) if reason else f"left stopped by cycle {last.get('cycle')}"
        self._log.warning("left stopped on purpose by a previous daemon (cycle %s): %s; it stays "
                          "stopped until resumed", last.get("cycle"), self.stopped_reason)

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
        loop = asyncio.get_running_loop()
        machine = CycleMachine(self._spec("reconnect", {}, loop.time(), time.time()),
                               clock=loop.time, wall=time.time, status=self.status)
        end = await self._drive(client, machine.resume(cont=True))
        if end is not None:
            raise QResetError(f"VM {self.name}: could not resume after reconnecting: "
                              f"{end.summary.get('error')}")
        with contextlib.suppress(QResetError):
            await self.ctx.journal.append({"vm": self.name, "cycle": cid, "phase": "note",
                                           "note": f"resumed on reconnect (status was {self.status})"})
        self.status = "running"
        return True
