"""
One reset cycle as a pure state machine: inputs in, QMP commands and journal records out.

A cycle is a generator (:meth:`CycleMachine.run`) that *yields* what it wants
done — a :class:`Command` for QEMU, a :class:`Record` for the journal, the
:class:`RunEngine` step, a :class:`Sleep` between resume retries, an
:class:`Emit`/:class:`Log` — and is *sent* what came of it (:class:`Reply`,
:class:`Failed`, :class:`Written`, :class:`EngineDone`, :class:`Slept`).
It performs no I/O and reads no clock but the one it is given, so every
sequence (a QEMU that stops answering, a connection lost at any step, a
SHUTDOWN that another reset already absorbed) is tested by feeding it
(tests/test_cycle*.py). :class:`qreset.vm.VmMonitor` is the driver that
carries the actions out over QMP (see /work/shared/reference/qmp-reset-flow.md
for the QEMU side, checked on QEMU 7.2).

``park`` (the guest was parked by ``reboot=shutdown,shutdown=pause``)::

    query-status (must be "shutdown": otherwise the SHUTDOWN was already absorbed)
    journal cycle-start (with the status found) ; engine ; journal engine-done (not fsynced)
    set-action reboot=reset ; system_reset ; set-action reboot=shutdown
    query-status until it left "shutdown" ; cont ; journal the summary

``stop-on-reset`` (QEMU already reset, the guest is running)::

    journal cycle-start (written, not fsynced: a daemon crash keeps it) ; stop
    journal parked ; engine ; journal engine-done (not fsynced) ; cont ; journal the summary

Nothing but the intent record comes before ``stop``: every millisecond there
is guest time on devices QEMU has just reset. The engine's "before"
snapshot (its save phase) is taken after ``stop`` replied.

Every way out of a cycle ends with the guest running or stopped with a
visible reason. A resume that fails because QEMU does not answer (stalled,
SIGSTOPped) is retried with backoff until it succeeds (the monitor shows
:attr:`CycleMachine.problem` meanwhile); QEMU refusing it is retried a few
times, then the VM is declared stopped with the refusal as its reason; a lost
connection ends the cycle (the monitor resumes the guest when it reconnects
to the same QEMU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qreset.config import Mode, OnIdentityChange
from qreset.cycle_resume import (
    RESET_SETTLE_TIMEOUT,
    RESUME_REFUSALS,
    STATUS_POLL,
)
from qreset.cycle_resume import resume as resume_cycle
from qreset.cycle_types import (
    COMMAND_TIMEOUT,
    Action,
    Command,
    CycleSpec,
    Emit,
    EngineDone,
    Failed,
    FailKind,
    Input,
    Log,
    Outcome,
    Phase,
    Record,
    Reply,
    RunEngine,
    Sleep,
    Slept,
    Steps,
    Written,
)
from qreset.engine import CycleReport

__all__ = [
    "COMMAND_TIMEOUT", "RESET_SETTLE_TIMEOUT", "RESUME_REFUSALS", "STATUS_POLL", "Action", "Command",
    "CycleMachine", "CycleSpec", "Emit", "EngineDone", "FailKind", "Failed", "Input", "Log", "Outcome",
    "Phase", "Record", "Reply", "RunEngine", "Sleep", "Slept", "Steps", "Written", "identity_reason",
    "parked", "report_error",
]


@dataclass
class CycleMachine:
    """One cycle; drive :meth:`run` (see the module docstring)."""

    spec: CycleSpec
    clock: Callable[[], float]
    wall: Callable[[], float]
    phase: Phase = Phase.CHECKING
    #: Why the guest is not running although it should be (shown while retrying).
    problem: str | None = None
    #: QMP commands sent by this cycle (issue 13: the no-change path sends only what it needs).
    commands: int = 0
    #: QEMU's run status as last learnt by the cycle.
    status: str | None = None
    #: stop-on-reset: whether our ``stop`` is what keeps the guest from running (see
    #: :attr:`Reply.events`); only then is the final ``cont`` ours to send.
    holding: bool = True
    durations: dict[str, float] = field(default_factory=dict)

    # -- helpers ---------------------------------------------------------

    @property
    def _base(self) -> dict[str, Any]:
        return {"vm": self.spec.vm, "cycle": self.spec.cid}

    def _ms_since(self, t0: float) -> float:
        return _ms(self.clock() - t0)

    def _cmd(self, execute: str, arguments: Mapping[str, Any] | None = None,
             timeout: float = COMMAND_TIMEOUT) -> Generator[Action, Input, Reply | Failed]:
        self.commands += 1
        got = yield Command(execute, arguments, timeout)
        assert isinstance(got, Reply | Failed), got
        return got

    def _record(self, record: dict[str, Any], sync: bool = True) -> Generator[Action, Input, Written]:
        got = yield Record({**self._base, **record}, sync)
        assert isinstance(got, Written), got
        return got

    def _status(self) -> Generator[Action, Input, str | Failed]:
        got = yield from self._cmd("query-status")
        if isinstance(got, Failed):
            return got
        value = got.value.get("status") if isinstance(got.value, dict) else None
        if not isinstance(value, str):
            return Failed(f"query-status: unexpected reply {got.value!r}")
        self.status = value
        return value

    # -- the cycle -------------------------------------------------------

    def run(self) -> Generator[Action, Input, Outcome | None]:
        """The whole cycle. Returns None when there was no cycle to run (park: absorbed)."""
        if self.spec.mode is Mode.PARK:
            return (yield from self._park())
        return (yield from self._stop_on_reset())

    def _start_record(self) -> dict[str, Any]:
        return {"phase": "cycle-start", "mode": self.spec.mode.value, "trigger": self.spec.trigger,
                "devices": [str(a) for a in self.spec.devices], "qemu": self.spec.qemu}

    def _park(self) -> Generator[Action, Input, Outcome | None]:
        status = yield from self._status()
        if isinstance(status, Failed):
            if status.kind is FailKind.GONE:
                return (yield from self._end("failed", None, f"QEMU went away before the reset: "
                                             f"{status.error}", resumed=False))
            # Silence or nonsense: the guest may be parked; nothing was reset. Resume it.
            return (yield from self._abort(f"query-status failed: {status.error}", held=True))
        if not parked(status, self.spec.trigger.get("reason")):
            self.phase = Phase.SKIPPED
            yield Log(logging.INFO, f"{self.spec.trigger['event']}({self.spec.trigger['reason']}) "
                                    f"already handled (QEMU status {status}): no cycle")
            return None
        # The guest is already held (QEMU parked it before we heard of it): the
        # intent and the status found are one record, one fsync, not two.
        w = yield from self._record({**self._start_record(), "status": status})
        if w.error:
            return (yield from self._abort(w.error, held=True))
        yield Emit("QRESET_RESET_STARTED", self._started_event())
        self.phase = Phase.HELD
        self.durations["event_to_parked_ms"] = self._ms_since(self.spec.t_event)
        return (yield from self._engine_and_resume())

    def _stop_on_reset(self) -> Generator[Action, Input, Outcome | None]:
        self.phase = Phase.STOPPING
        # Journal before acting (a daemon killed after the stop must find a record),
        # but no fsync in the window: written to the kernel, it survives our crash.
        w = yield from self._record(self._start_record(), sync=False)
        if w.error:  # not stopped yet: the guest runs on, the devices were not reset
            return (yield from self._end("failed", None, f"cycle aborted: {w.error}", resumed=True))
        got = yield from self._cmd("stop")
        t_stop, wall_stop = self.clock(), self.wall()
        if isinstance(got, Failed):
            if got.kind is FailKind.GONE:
                return (yield from self._end("failed", None, "QEMU went away before the reset",
                                             resumed=False, interrupted=True))
            if got.kind is FailKind.TIMEOUT:
                # The stop may still run when QEMU wakes up: make sure the guest ends running.
                return (yield from self._abort(f"stop: {got.error}", held=True))
            return (yield from self._end("failed", None, f"stop failed: {got.error}", resumed=True))
        # Did our stop stop anything? A guest its manager holds in prelaunch (libvirt's
        # fake reboot: system_reset of a -no-shutdown QEMU, then its own cont) is not
        # running: stop is a no-op there, and the manager's cont may come at any time.
        # The driver stops the guest again on every RESUME while the engine runs; the
        # final cont is ours to send only if it is our stop that holds the guest.
        self.holding = got.events is None or "STOP" in got.events or self.spec.requested
        if not self.holding:
            yield Log(logging.INFO, f"cycle {self.spec.cid}: stop found the guest not running (its "
                                    "manager holds it, e.g. libvirt's fake reboot); a resume by the "
                                    "manager during the cycle is stopped again; the guest is left to it")
        self.status = "paused" if self.holding else None
        self.phase = Phase.HELD
        self.durations.update({
            "recv_to_stop_ms": _ms(t_stop - self.spec.t_event),
            "event_to_stop_ms": _ms(max(0.0, wall_stop - self.spec.wall_event)),
        })
        yield Emit("QRESET_RESET_STARTED", self._started_event())
        self.durations["event_to_parked_ms"] = self._ms_since(self.spec.t_event)
        held = "paused" if self.holding else "not-running"
        w = yield from self._record({"phase": "parked", "status": held,
                                     "recv_to_stop_ms": self.durations["recv_to_stop_ms"],
                                     "event_to_stop_ms": self.durations["event_to_stop_ms"]})
        if w.error:
            return (yield from self._abort(w.error, held=True))
        return (yield from self._engine_and_resume())

    def _started_event(self) -> dict[str, Any]:
        return {**self._base, "mode": self.spec.mode.value, "trigger": self.spec.trigger,
                "devices": [str(a) for a in self.spec.devices]}

    def _engine_and_resume(self) -> Generator[Action, Input, Outcome]:
        spec = self.spec
        t0 = self.clock()
        report: CycleReport | None = None
        error: str | None = None
        if spec.devices:
            got = yield RunEngine(spec.devices, spec.cycle_timeout)
            assert isinstance(got, EngineDone), got
            report, error = got.report, got.error
            if report is not None and not report.ok and error is None:
                error = report_error(report)
            if got.restops:
                # Our own stop holds the guest now: the final cont is ours again.
                self.holding = True
                note = (f"the guest was resumed by another manager during the engine "
                        f"{got.restops} time(s) and stopped again at once")
                yield Log(logging.WARNING, f"cycle {spec.cid}: {note}")
                yield from self._record({"phase": "note", "note": note})
        self.durations["engine_ms"] = self._ms_since(t0)
        changed = list(report.identity_changed) if report is not None else []
        # Written, not fsynced (the terminal record's fsync covers it): a daemon
        # crash keeps the line (os.write), and what it decides after one — resume,
        # or keep an identity-change stop — is read back by qreset.recovery. Only a
        # host crash loses it, and that takes this QEMU too: recovery then finds
        # another QEMU and sends nothing.
        w = yield from self._record({
            "phase": "engine-done", "ok": report is not None and report.ok and error is None,
            "error": error, "engine_ms": self.durations["engine_ms"],
            "identity_changed": [str(a) for a in changed]}, sync=False)
        if w.error:
            return (yield from self._abort(w.error, held=True, report=report))
        for addr in changed:
            yield Emit("QRESET_DEVICE_CHANGED", {
                **self._base, "function": str(addr), "action": spec.on_identity_change.value,
                "detail": "device came back with a different identity; config space not restored"})
        stop_it = bool(changed) and spec.on_identity_change is OnIdentityChange.STOP
        reason = identity_reason([str(a) for a in changed]) if stop_it else None
        t1 = self.clock()
        end = yield from self.resume(cont=not stop_it)
        if isinstance(end, Outcome):  # gone, given up or left open
            end_error = _join(error, end.summary.get("error"))
            return (yield from self._end(end.summary["outcome"], report, end_error, resumed=False,
                                         interrupted=end.interrupted and not stop_it,
                                         stopped_reason=end.stopped_reason or reason,
                                         left_open=end.left_open))
        self.durations["resume_ms"] = self._ms_since(t1)
        if stop_it:
            return (yield from self._end("stopped", report, _join(error, reason), resumed=False,
                                         stopped_reason=reason))
        return (yield from self._end("failed" if error else "resumed", report, error, resumed=True))

    def _abort(self, why: str, *, held: bool, report: CycleReport | None = None,
               ) -> Generator[Action, Input, Outcome]:
        """The cycle broke outside the engine: resume the guest anyway, say why once."""
        yield Log(logging.ERROR, f"cycle {self.spec.cid} aborted: {why}; resuming the VM")
        error = f"cycle aborted: {why}"
        if held:
            end = yield from self.resume(cont=True)
            if isinstance(end, Outcome):
                return (yield from self._end(end.summary["outcome"], report,
                                             _join(error, end.summary.get("error")), resumed=False,
                                             interrupted=end.interrupted,
                                             stopped_reason=end.stopped_reason,
                                             left_open=end.left_open))
        return (yield from self._end("failed", report, error, resumed=True))

    # -- resume (with retries): qreset.cycle_resume -----------------------

    def resume(self, *, cont: bool) -> Generator[Action, Input, Outcome | None]:
        """See :func:`qreset.cycle_resume.resume`."""
        return (yield from resume_cycle(self, cont=cont))

    # -- the end -----------------------------------------------------------

    def _end(self, outcome: str, report: CycleReport | None, error: str | None, *, resumed: bool,
             interrupted: bool = False, stopped_reason: str | None = None,
             left_open: bool = False) -> Generator[Action, Input, Outcome]:
        self.phase = Phase.ENDED
        self.durations["total_ms"] = self._ms_since(self.spec.t_event)
        summary: dict[str, Any] = {
            **self._base, "phase": outcome, "outcome": outcome, "mode": self.spec.mode.value,
            "trigger": self.spec.trigger, "event_ts": round(self.spec.wall_event, 6),
            "vm_resumed": resumed, "devices": [str(a) for a in self.spec.devices],
            "durations": dict(self.durations), "qmp_commands": self.commands, "error": error,
            "stopped_reason": stopped_reason, "qemu": self.spec.qemu,
            "report": report.to_json() if report is not None else None,
        }
        if not left_open:  # leaving it open is what tells the next daemon to finish it
            w = yield from self._record(summary)
            if not w.error:
                summary = w.record
        return Outcome(summary, stopped_reason, interrupted, left_open)


def parked(status: str | None, reason: object) -> bool:
    """
    Whether a SHUTDOWN still describes QEMU's state, so that a cycle is due.

    ``shutdown``: parked by the event. ``prelaunch``: a ``system_reset`` of a
    guest that never ran (-S) is turned into a SHUTDOWN that changes nothing
    (vm_stop only stops a running VM, softmmu/cpus.c do_vm_stop): the reset was
    asked for, the guest cannot run, so the cycle runs. Anything else is a
    SHUTDOWN already absorbed: a ``system_reset`` sent while the guest was
    parked queues a second SHUTDOWN that the first cycle's reset absorbed, and
    by now the guest runs; a guest-reset SHUTDOWN found in ``prelaunch`` is one
    whose cycle ended with the guest there (never a reason to resume it).
    """
    return status == "shutdown" or (status == "prelaunch" and reason == "host-qmp-system-reset")


def identity_reason(changed: Sequence[str]) -> str:
    return "identity changed: " + ", ".join(changed) + " (on_identity_change=stop)"


def report_error(report: CycleReport) -> str:
    """One line saying why a report is not ok (refusals first, then domain errors)."""
    parts = [f"refused: {r.function} ({r.owner}): {r.reason}" for r in report.plan.refusals]
    changed = report.identity_changed
    if changed:
        parts.append("identity changed: " + ", ".join(map(str, changed))
                     + " (config space not restored: escalated)")
    for d in report.domains:
        if changed and not d.error:
            continue  # already said why
        if not d.ok:
            parts.append(f"{d.domain.key}: {d.error or 'failed'}")
    return "; ".join(parts) or "engine reported failure"


def _join(a: str | None, b: str | None) -> str | None:
    return "; ".join(x for x in (a, b) if x) or None


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
