"""
The cycle state machines (qreset.cycle, qreset.recovery) fed event sequences, without QEMU.

Each test plays QEMU, the journal and the engine by answering what the
machine yields (:class:`Script`), then checks what it sent and how it ended.
The sequences include those that broke in the reliability issue: a QEMU that
stops answering mid-resume, a SHUTDOWN already absorbed while the guest was
left stopped on purpose, the stop-on-reset crash window.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator
from typing import Any

import pytest

from qreset.config import Mode, OnIdentityChange
from qreset.cycle import (
    RESUME_REFUSALS,
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
    Phase,
    Record,
    Reply,
    RunEngine,
    Sleep,
    Slept,
    Written,
)
from qreset.pci.address import PciAddress
from qreset.recovery import Verdict, recover

NIC = PciAddress.parse("0000:01:00.0")
QEMU_ID = "4242:1000"

Answer = Callable[[Command], Input]


class Script:
    """Drives a machine: QEMU answers from ``qemu``, the journal and engine always succeed."""

    def __init__(self, qemu: Answer, engine: EngineDone | None = None, closing: bool = False) -> None:
        self.qemu = qemu
        self.engine = engine or EngineDone(None, None)
        self.closing = closing
        self.actions: list[Action] = []
        self.t = 0.0

    def clock(self) -> float:
        self.t += 0.001
        return self.t

    def run(self, steps: Generator[Action, Input, Any], limit: int = 500) -> Any:
        result: Input = None
        for _ in range(limit):
            try:
                action = steps.send(result)
            except StopIteration as stop:
                return stop.value
            self.actions.append(action)
            result = self.answer(action)
        raise AssertionError(f"no end after {limit} actions: {self.actions[-5:]}")

    def answer(self, action: Action) -> Input:
        if isinstance(action, Command):
            return self.qemu(action)
        if isinstance(action, Record):
            return Written({"t": self.t, **action.record})
        if isinstance(action, RunEngine):
            return self.engine
        if isinstance(action, Sleep):
            return Slept(self.closing)
        return None

    @property
    def commands(self) -> list[tuple[str, dict[str, Any] | None]]:
        return [(a.execute, dict(a.arguments) if a.arguments else None)
                for a in self.actions if isinstance(a, Command)]

    def records(self, phase: str | None = None) -> list[Record]:
        return [a for a in self.actions if isinstance(a, Record)
                and (phase is None or a.record["phase"] == phase)]


def qemu_status(*statuses: str, refuse: dict[str, Failed] | None = None) -> Answer:
    """A QEMU whose query-status answers ``statuses`` in turn (the last one forever)."""
    seq = itertools.chain(statuses, itertools.repeat(statuses[-1]))
    refuse = refuse or {}

    def answer(cmd: Command) -> Input:
        if cmd.execute in refuse:
            return refuse[cmd.execute]
        if cmd.execute == "query-status":
            return Reply({"status": next(seq), "running": False})
        return Reply({})
    return answer


def spec(mode: Mode, reason: str = "guest-reset", devices: tuple[PciAddress, ...] = (NIC,),
         on_identity_change: OnIdentityChange = OnIdentityChange.STOP) -> CycleSpec:
    return CycleSpec(vm="vm1", cid="vm1-1", mode=mode,
                     trigger={"event": "SHUTDOWN" if mode is Mode.PARK else "RESET",
                              "reason": reason, "guest": reason == "guest-reset"},
                     devices=devices, t_event=0.0, wall_event=1000.0,
                     on_identity_change=on_identity_change, qemu=QEMU_ID)


def machine(s: Script, sp: CycleSpec) -> CycleMachine:
    return CycleMachine(sp, clock=s.clock, wall=lambda: 1000.0 + s.t)


class FakeReport:
    """Stands in for qreset.engine.CycleReport where only identity matters."""

    def __init__(self, changed: list[PciAddress]) -> None:
        self.identity_changed = changed
        self.ok = not changed
        self.plan = type("P", (), {"refusals": ()})()
        self.domains: list[Any] = []

    def to_json(self) -> dict[str, Any]:
        return {"identity_changed": [str(a) for a in self.identity_changed]}


def changed_engine() -> EngineDone:
    return EngineDone(FakeReport([NIC]), None)  # type: ignore[arg-type]


# -- stop-on-reset -----------------------------------------------------------


def test_stop_on_reset_journals_intent_unsynced_then_stops_before_anything_else() -> None:
    s = Script(qemu_status("paused"))
    out = s.run(machine(s, spec(Mode.STOP_ON_RESET)).run())
    first, second = s.actions[0], s.actions[1]
    assert isinstance(first, Record)
    assert first.record["phase"] == "cycle-start"
    assert first.sync is False            # no fsync in the window (journal contract)
    assert first.record["qemu"] == QEMU_ID
    assert second == Command("stop")
    # The engine's "before" snapshot comes after stop replied.
    kinds = [type(a).__name__ for a in s.actions]
    assert kinds.index("RunEngine") > 1
    assert s.commands == [("stop", None), ("cont", None)]   # the no-change path: nothing more
    assert isinstance(out, Outcome)
    assert out.summary["outcome"] == "resumed"
    assert out.summary["qmp_commands"] == 2
    assert [r.record["phase"] for r in s.records()] == ["cycle-start", "parked", "engine-done", "resumed"]
    # Fsynced before the engine: parked (the stop's latency, the guest held); after
    # it only the summary: engine-done is written to the kernel (a daemon crash keeps it).
    assert [r.sync for r in s.records()] == [False, True, False, True]
    assert "event_to_stop_ms" in out.summary["durations"]


def test_stop_on_reset_stalled_qemu_is_retried_until_it_answers() -> None:
    """QEMU SIGSTOPped mid-cycle: cont times out; the machine retries; the reason is real."""
    stalls = iter(range(3))
    problems: list[str | None] = []

    def qemu(cmd: Command) -> Input:
        if cmd.execute == "cont" and next(stalls, None) is not None:
            return Failed("cont: no reply within 5s (QEMU not answering)", FailKind.TIMEOUT)
        return Reply({})

    s = Script(qemu)
    m = machine(s, spec(Mode.STOP_ON_RESET))
    steps = m.run()
    # Watch the problem while the machine sleeps between retries.
    result: Input = None
    out = None
    while True:
        try:
            action = steps.send(result)
        except StopIteration as stop:
            out = stop.value
            break
        s.actions.append(action)
        if isinstance(action, Sleep):
            problems.append(m.problem)
            assert m.phase is Phase.RETRYING
        result = s.answer(action)
    assert isinstance(out, Outcome)
    assert out.summary["outcome"] == "resumed"
    assert out.summary["vm_resumed"] is True
    assert [c for c, _ in s.commands].count("cont") == 4
    assert problems == ["could not resume: cont: no reply within 5s (QEMU not answering)"] * 3
    assert m.problem is None
    notes = [r.record["note"] for r in s.records("note")]
    assert notes[0] == "could not resume: cont: no reply within 5s (QEMU not answering)"
    assert notes[-1] == "resumed after 3 retries"
    assert any(isinstance(a, Emit) and a.name == "QRESET_RESUME_PENDING" for a in s.actions)


def test_resume_refused_again_and_again_ends_stopped_with_the_reason() -> None:
    refused = Failed("cont: Resetting the Virtual Machine is required")
    s = Script(qemu_status("paused", refuse={"cont": refused}))
    out = s.run(machine(s, spec(Mode.STOP_ON_RESET)).run())
    assert isinstance(out, Outcome)
    assert out.summary["outcome"] == "stopped"
    assert out.stopped_reason is not None
    assert "Resetting the Virtual Machine is required" in out.stopped_reason
    assert [c for c, _ in s.commands].count("cont") == RESUME_REFUSALS


def test_connection_lost_at_cont_ends_the_cycle_for_a_resume_on_reconnect() -> None:
    s = Script(qemu_status("paused", refuse={"cont": Failed("cont: EOF", FailKind.GONE)}))
    out = s.run(machine(s, spec(Mode.STOP_ON_RESET)).run())
    assert out.summary["error"] == "QEMU went away during the cycle"
    assert out.summary["vm_resumed"] is False
    assert out.interrupted is True
    assert out.summary["phase"] == "failed"


def test_daemon_leaving_during_retries_leaves_the_cycle_open_for_the_next_daemon() -> None:
    s = Script(qemu_status("paused", refuse={"cont": Failed("cont: no reply", FailKind.TIMEOUT)}),
               closing=True)
    out = s.run(machine(s, spec(Mode.STOP_ON_RESET)).run())
    assert out.left_open is True
    assert [r.record["phase"] for r in s.records()] == ["cycle-start", "parked", "engine-done", "note"]


def test_stop_on_reset_identity_change_with_stop_leaves_it_paused() -> None:
    s = Script(qemu_status("paused"), engine=changed_engine())
    out = s.run(machine(s, spec(Mode.STOP_ON_RESET)).run())
    assert s.commands == [("stop", None)]
    assert out.summary["outcome"] == "stopped"
    assert out.stopped_reason == "identity changed: 0000:01:00.0 (on_identity_change=stop)"
    assert any(isinstance(a, Emit) and a.name == "QRESET_DEVICE_CHANGED" for a in s.actions)


def test_stop_timeout_never_resets_devices_and_ends_running() -> None:
    calls = iter([Failed("stop: no reply within 5s (QEMU not answering)", FailKind.TIMEOUT)])

    def qemu(cmd: Command) -> Input:
        return next(calls, Reply({})) if cmd.execute == "stop" else Reply({})

    s = Script(qemu)
    out = s.run(machine(s, spec(Mode.STOP_ON_RESET)).run())
    assert not any(isinstance(a, RunEngine) for a in s.actions)
    assert s.commands == [("stop", None), ("cont", None)]
    assert out.summary["vm_resumed"] is True
    assert "stop: no reply within 5s" in out.summary["error"]


# -- park --------------------------------------------------------------------


def test_park_no_change_path_sends_only_what_it_needs() -> None:
    s = Script(qemu_status("shutdown", "prelaunch"))
    out = s.run(machine(s, spec(Mode.PARK)).run())
    assert s.commands == [
        ("query-status", None),
        ("set-action", {"reboot": "reset"}), ("system_reset", None),
        ("set-action", {"reboot": "shutdown"}),
        ("query-status", None), ("cont", None),
    ]
    assert out.summary["qmp_commands"] == 6
    assert out.summary["outcome"] == "resumed"
    assert [r.record["phase"] for r in s.records()] == ["cycle-start", "engine-done", "resumed"]


def test_park_writes_one_fsynced_record_before_the_engine() -> None:
    """
    Park mode: the guest is held by QEMU before the cycle starts, so the intent and
    the status found are one record (one fsync before the engine, not two), and
    engine-done is only written (the summary's fsync covers it): one fsync wait
    before the engine and one after it, instead of three.
    """
    s = Script(qemu_status("shutdown", "prelaunch"))
    s.run(machine(s, spec(Mode.PARK)).run())
    start = s.records("cycle-start")
    assert len(start) == 1
    assert start[0].record["status"] == "shutdown"
    assert [(r.record["phase"], r.sync) for r in s.records()] == [
        ("cycle-start", True), ("engine-done", False), ("resumed", True)]
    kinds = [type(a).__name__ for a in s.actions]
    assert kinds.index("RunEngine") > kinds.index("Record")


@pytest.mark.parametrize(("status", "reason"), [
    ("running", "guest-reset"),             # absorbed by the cycle before: the guest runs
    ("running", "host-qmp-system-reset"),
    ("prelaunch", "guest-reset"),           # issue 10.2: left there on purpose, not parked
    ("paused", "guest-reset"),
])
def test_park_shutdown_already_absorbed_starts_no_cycle(status: str, reason: str) -> None:
    s = Script(qemu_status(status))
    m = machine(s, spec(Mode.PARK, reason))
    assert s.run(m.run()) is None
    assert s.commands == [("query-status", None)]
    assert s.records() == []
    assert m.phase is Phase.SKIPPED


def test_park_requested_reset_of_a_guest_that_never_ran_is_a_cycle() -> None:
    s = Script(qemu_status("prelaunch"))
    out = s.run(machine(s, spec(Mode.PARK, "host-qmp-system-reset")).run())
    assert out.summary["outcome"] == "resumed"
    assert ("system_reset", None) not in s.commands   # nothing to finish: QEMU never stopped it
    assert s.commands[-1] == ("cont", None)


def test_park_identity_change_finishes_the_reset_but_never_conts() -> None:
    s = Script(qemu_status("shutdown", "prelaunch"), engine=changed_engine())
    out = s.run(machine(s, spec(Mode.PARK)).run())
    assert ("system_reset", None) in s.commands
    assert ("set-action", {"reboot": "shutdown"}) in s.commands
    assert ("cont", None) not in s.commands
    assert out.summary["outcome"] == "stopped"
    assert out.summary["stopped_reason"] == out.stopped_reason


def test_park_stall_at_system_reset_retries_from_the_status_qemu_reports() -> None:
    """system_reset times out (QEMU stopped), QEMU later ran it: the retry asks, finds prelaunch, conts."""
    stalled = iter([True])
    statuses = iter(["shutdown", "prelaunch"])

    def qemu(cmd: Command) -> Input:
        if cmd.execute == "system_reset" and next(stalled, False):
            return Failed("system_reset: no reply within 5s (QEMU not answering)", FailKind.TIMEOUT)
        if cmd.execute == "query-status":
            return Reply({"status": next(statuses)})
        return Reply({})

    s = Script(qemu)
    out = s.run(machine(s, spec(Mode.PARK)).run())
    assert s.commands[3:] == [("query-status", None), ("set-action", {"reboot": "shutdown"}), ("cont", None)]
    assert out.summary["outcome"] == "resumed"


def test_engine_error_still_resumes_and_reports_it() -> None:
    s = Script(qemu_status("shutdown", "prelaunch"), engine=EngineDone(None, "engine did not finish"))
    out = s.run(machine(s, spec(Mode.PARK)).run())
    assert out.summary["outcome"] == "failed"
    assert out.summary["vm_resumed"] is True
    assert out.summary["error"] == "engine did not finish"


def test_journal_failure_before_stop_leaves_the_guest_alone() -> None:
    s = Script(qemu_status("running"))
    m = machine(s, spec(Mode.STOP_ON_RESET))
    steps = m.run()
    first = next(steps)
    assert isinstance(first, Record)
    out = None
    result: Input = Written(first.record, error="journal: No space left on device")
    while True:
        try:
            action = steps.send(result)
        except StopIteration as stop:
            out = stop.value
            break
        s.actions.append(action)
        result = s.answer(action)
    assert s.commands == []
    assert "No space left on device" in out.summary["error"]


# -- recovery ----------------------------------------------------------------


def _rec(phase: str, **kw: Any) -> dict[str, Any]:
    return {"vm": "vm1", "cycle": "vm1-dead", "phase": phase, **kw}


def test_recovery_of_an_intent_record_resumes_the_stopped_guest() -> None:
    """Issue 10.3: the daemon died right after stop: only cycle-start (written before stop) survives."""
    s = Script(qemu_status("paused"))
    verdict, out, _m = s.run(recover(spec(Mode.STOP_ON_RESET), [_rec("cycle-start", qemu=QEMU_ID)],
                                     "paused", s.clock, lambda: 0.0))
    assert verdict is Verdict.CLOSED
    assert s.commands == [("cont", None)]
    assert out.summary["vm_resumed"] is True
    assert out.summary["outcome"] == "failed"
    assert "before the engine finished" in out.summary["error"]


def test_recovery_never_touches_another_qemu_process() -> None:
    s = Script(qemu_status("prelaunch"))
    verdict, out, _m = s.run(recover(spec(Mode.PARK), [_rec("cycle-start", qemu="1:1")], "prelaunch",
                                     s.clock, lambda: 0.0))
    assert verdict is Verdict.CLOSED
    assert s.commands == []
    assert "is gone" in out.summary["error"]


def test_recovery_keeps_a_decided_stop() -> None:
    s = Script(qemu_status("prelaunch"))
    _v, out, _m = s.run(recover(spec(Mode.PARK), [_rec("cycle-start"), _rec("parked"),
                                                  _rec("engine-done", identity_changed=[str(NIC)])],
                                "prelaunch", s.clock, lambda: 0.0))
    assert ("cont", None) not in s.commands
    assert out.summary["outcome"] == "stopped"
    assert out.stopped_reason is not None


def test_recovery_paused_without_a_record_is_reported_not_resumed() -> None:
    s = Script(qemu_status("paused"))
    verdict, out, _m = s.run(recover(spec(Mode.STOP_ON_RESET), [], "paused", s.clock, lambda: 0.0))
    assert verdict is Verdict.NOTHING
    assert out is None
    assert s.commands == []
    assert any(isinstance(a, Log) and "not stopped by qreset" in a.message for a in s.actions)


def test_recovery_parked_without_a_record_runs_the_cycle() -> None:
    s = Script(qemu_status("shutdown"))
    verdict, _o, _m = s.run(recover(spec(Mode.PARK), [], "shutdown", s.clock, lambda: 0.0))
    assert verdict is Verdict.RUN_CYCLE


# -- stop-on-reset beside another manager (libvirt's fake reboot) -------------


def stop_events(*events: str) -> Answer:
    """A QEMU whose ``stop`` reply came with ``events`` (what the driver saw of it)."""

    def answer(cmd: Command) -> Input:
        if cmd.execute == "stop":
            return Reply({}, events=events)
        return Reply({})
    return answer


def test_stop_that_stopped_nothing_leaves_the_guest_to_its_manager() -> None:
    """A RESET of a guest its manager holds (prelaunch): our stop is a no-op, so no cont of ours."""
    s = Script(stop_events())
    out = s.run(machine(s, spec(Mode.STOP_ON_RESET)).run())
    assert s.commands == [("stop", None)]   # the engine ran; cont is the manager's to send
    assert [r.record.get("status") for r in s.records("parked")] == ["not-running"]
    assert isinstance(out, Outcome)
    assert out.summary["outcome"] == "resumed"
    assert any(isinstance(a, Log) and "its manager holds it" in a.message for a in s.actions)


def test_stop_that_stopped_the_guest_conts_it() -> None:
    s = Script(stop_events("STOP"))
    s.run(machine(s, spec(Mode.STOP_ON_RESET)).run())
    assert s.commands == [("stop", None), ("cont", None)]
    assert [r.record.get("status") for r in s.records("parked")] == ["paused"]


def test_a_manager_resume_stopped_by_the_guard_makes_the_final_cont_ours() -> None:
    """libvirt's cont came after our no-op stop; the driver stopped the guest again: we cont it."""
    s = Script(stop_events(), engine=EngineDone(None, None, restops=1))
    out = s.run(machine(s, spec(Mode.STOP_ON_RESET)).run())
    assert s.commands == [("stop", None), ("cont", None)]
    notes = [r.record["note"] for r in s.records("note")]
    assert any("resumed by another manager during the engine 1 time(s)" in n for n in notes), notes
    assert isinstance(out, Outcome)
    assert out.summary["vm_resumed"] is True
