"""
Reconciling a QEMU's state with the journal when a monitor connects (pure, like qreset.cycle).

A daemon can die anywhere in a cycle. What the next one finds at connect:

* an open cycle in the journal (``cycle-start`` with no terminal record):
  the previous daemon held this guest, or was about to (stop-on-reset writes
  its intent before ``stop``). If the record names another QEMU process, that
  QEMU is gone and this one is none of our business: the cycle is closed with
  nothing sent. Otherwise the guest is resumed (the park toggle or ``cont``)
  — or left stopped when the dead daemon had decided so (identity change,
  ``on_identity_change = "stop"``) — and the cycle is closed as ``resumed``
  if its engine had finished, else ``failed`` (nobody knows whether the
  devices were reset);
* no open cycle, park mode, status ``shutdown``: the daemon died between the
  SHUTDOWN and its first write: the monitor runs the cycle now
  (:attr:`Verdict.RUN_CYCLE`);
* no open cycle, stop-on-reset, status ``paused``: not stopped by qreset as far
  as the journal knows (someone else paused it): left alone, with a log line.

:func:`recover` yields the same actions as a cycle (qreset.cycle) and returns a
:class:`Verdict` and, when it closed a cycle, its :class:`~qreset.cycle.Outcome`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Generator, Sequence
from typing import Any

from qreset.config import Mode, OnIdentityChange
from qreset.cycle import (
    Action,
    CycleMachine,
    CycleSpec,
    Input,
    Log,
    Outcome,
    Record,
    Written,
    identity_reason,
)


class Verdict(enum.Enum):
    NOTHING = "nothing"
    RUN_CYCLE = "run-cycle"     # park: found parked with no record: run the cycle now
    CLOSED = "closed"           # an open cycle was finished (see the Outcome)


def recover(spec: CycleSpec, records: Sequence[dict[str, Any]], status: str | None,
            clock: Callable[[], float], wall: Callable[[], float],
            ) -> Generator[Action, Input, tuple[Verdict, Outcome | None, CycleMachine | None]]:
    """Reconcile one VM (``spec.qemu`` is the QEMU connected now; ``spec.cid`` unused)."""
    if not records:
        if spec.mode is Mode.PARK and status == "shutdown":
            return Verdict.RUN_CYCLE, None, None
        if spec.mode is Mode.STOP_ON_RESET and status == "paused":
            yield _log(logging.WARNING, "found the guest paused with no open cycle in the journal: "
                                        "not stopped by qreset, leaving it paused")
        return Verdict.NOTHING, None, None
    cid = str(records[0]["cycle"])
    phases = [str(r.get("phase")) for r in records]
    engine_done = "engine-done" in phases
    done = next((r for r in records if r.get("phase") == "engine-done"), {})
    listed = done.get("identity_changed")
    # A hand-edited or damaged record: only a list of addresses is a decision to keep.
    changed = [a for a in listed if isinstance(a, str)] if isinstance(listed, list) else []
    stop_it = bool(changed) and spec.on_identity_change is OnIdentityChange.STOP
    recorded_qemu = next((r["qemu"] for r in records if isinstance(r.get("qemu"), str)), None)
    yield _log(logging.WARNING, f"cycle {cid} was left open by a previous daemon (phases "
                                f"{','.join(phases)}; QEMU status {status})")
    machine = CycleMachine(CycleSpec(
        vm=spec.vm, cid=cid, mode=spec.mode, trigger={}, devices=spec.devices, t_event=clock(),
        wall_event=wall(), on_identity_change=spec.on_identity_change, qemu=spec.qemu),
        clock=clock, wall=wall, status=status)
    t0 = clock()
    stopped_reason: str | None = None
    error: str | None
    interrupted = False
    if recorded_qemu is not None and spec.qemu is not None and recorded_qemu != spec.qemu:
        # That QEMU is gone; this one never was held by us (it may be in prelaunch
        # under its manager's control): send nothing.
        outcome, error, resumed = "failed", (
            f"the QEMU of this cycle ({recorded_qemu}) is gone; this one ({spec.qemu}) "
            "was not touched"), False
    else:
        end = yield from machine.resume(cont=not stop_it)
        if end is None:
            outcome, error, resumed = ("resumed", None, True) if engine_done else (
                "failed", "previous daemon died before the engine finished: the devices may not "
                "have been reset", True)
            if stop_it:
                stopped_reason = identity_reason(changed)
                outcome, error, resumed = "stopped", stopped_reason, False
        else:
            outcome, error, resumed = end.summary["outcome"], (
                f"recovery could not resume the VM: {end.summary.get('error')}"), False
            stopped_reason, interrupted = end.stopped_reason, end.interrupted
            if end.left_open:
                return Verdict.CLOSED, Outcome({**end.summary, "cycle": cid}, left_open=True), machine
    summary: dict[str, Any] = {
        "vm": spec.vm, "cycle": cid, "phase": outcome, "outcome": outcome, "recovered": True,
        "mode": spec.mode.value, "status_found": status, "vm_resumed": resumed, "error": error,
        "stopped_reason": stopped_reason, "qemu": spec.qemu, "qmp_commands": machine.commands,
        "durations": {"recovery_ms": round((clock() - t0) * 1000.0, 3)},
        "devices": [str(a) for a in spec.devices], "report": None,
    }
    got = yield Record(summary)
    if isinstance(got, Written) and not got.error:
        summary = got.record
    yield _log(logging.INFO, f"recovered cycle {cid}: {outcome} (QEMU status was {status})")
    return Verdict.CLOSED, Outcome(summary, stopped_reason, interrupted), machine



def _log(level: int, message: str) -> Action:
    return Log(level, message)
