"""
The end of a cycle's QEMU side: finish QEMU's reset and let the guest run,
retrying until it does (:func:`resume`). Driven by
:class:`qreset.cycle.CycleMachine` (its ``resume`` step), whose helpers
(``_cmd``, ``_status``, ``_record``) it uses: one machine, written in two files.

``park``: the ``set-action reboot=reset ; system_reset ; set-action
reboot=shutdown`` toggle that works in ``shutdown`` (qmp-reset-flow.md), then
``query-status`` until QEMU left ``shutdown`` and ``cont``. ``stop-on-reset``:
``cont`` when our ``stop`` is what holds the guest. QEMU refusing is retried
with backoff, :data:`RESUME_REFUSALS` refusals in a row leave the VM stopped
with that reason; a lost connection ends the cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import TYPE_CHECKING

from qreset.backoff import backoff_delay
from qreset.config import Mode
from qreset.cycle_types import Action, Emit, Failed, FailKind, Input, Log, Outcome, Phase, Sleep, Slept

if TYPE_CHECKING:
    from qreset.cycle import CycleMachine

#: How long QEMU may take to leave ``shutdown`` after ``system_reset``. Ours: the
#: reset request runs at the main loop's next iteration
#: (qemu_system_reset_request -> main_loop_should_exit), milliseconds on QEMU 7.2.
RESET_SETTLE_TIMEOUT = 5.0
#: Poll period while waiting for that (5 ms: a fraction of the measured park cycle).
STATUS_POLL = 0.005
#: Resume retries: backoff 0.1 s × aiomqtt's growth, at most every 5 s (ours).
RESUME_RETRY_SCALE = 0.1
RESUME_RETRY_MAX = 5.0
#: QEMU *refusing* the resume (an error reply, not silence) this many times in a
#: row is not going to change by itself: the VM is then stopped with that reason.
RESUME_REFUSALS = 5


def resume(m: CycleMachine, *, cont: bool) -> Generator[Action, Input, Outcome | None]:
    """
    Finish QEMU's side of the reset and (``cont``) let the guest run, retrying
    until it does. Returns None on success; an :class:`Outcome` skeleton when
    the cycle must end otherwise (connection gone, QEMU refusing for good,
    daemon leaving).
    """
    attempt = 0
    refusals = 0
    while True:
        m.phase = Phase.RESUMING
        got = yield from (_finish_park(m, cont) if m.spec.mode is Mode.PARK
                          else _finish_stop(m, cont))
        if got is None:
            if attempt:
                m.problem = None
                yield Log(logging.WARNING, f"cycle {m.spec.cid}: VM resumed after "
                                           f"{attempt} retr{'y' if attempt == 1 else 'ies'}")
                yield from m._record({"phase": "note", "note": f"resumed after {attempt} retries"})
            return None
        if got.kind is FailKind.GONE:
            return Outcome({"outcome": "failed", "error": "QEMU went away during the cycle"},
                           interrupted=True)
        refusals = refusals + 1 if got.kind is FailKind.REFUSED else 0
        m.problem = f"could not resume: {got.error}"
        if refusals >= RESUME_REFUSALS:
            reason = f"{m.problem} (refused {refusals} times; left stopped)"
            yield Log(logging.ERROR, f"cycle {m.spec.cid}: {reason}")
            return Outcome({"outcome": "stopped", "error": reason}, stopped_reason=reason)
        if attempt == 0:
            yield Log(logging.ERROR, f"cycle {m.spec.cid}: {m.problem}; retrying until "
                                     "QEMU answers")
            yield from m._record({"phase": "note", "note": m.problem})
            yield Emit("QRESET_RESUME_PENDING", {**m._base, "error": m.problem})
        m.phase = Phase.RETRYING
        slept = yield Sleep(backoff_delay(attempt, RESUME_RETRY_MAX, scale=RESUME_RETRY_SCALE))
        attempt += 1
        if isinstance(slept, Slept) and slept.closing:
            return Outcome({"outcome": "failed", "error": m.problem}, left_open=True)
        m.status = None  # unknown: the next attempt asks

def _finish_stop(m: CycleMachine, cont: bool) -> Generator[Action, Input, Failed | None]:
    if not cont or not m.holding:
        return None  # not ours to resume: its manager held it when the cycle began
    # We stopped it ourselves: no status query needed, and cont of a running VM is a no-op.
    got = yield from m._cmd("cont")
    if isinstance(got, Failed):
        return got
    m.status = "running"
    return None

def _finish_park(m: CycleMachine, cont: bool) -> Generator[Action, Input, Failed | None]:
    """The toggle that works in ``shutdown`` (qmp-reset-flow.md), then cont."""
    status = m.status
    if status is None:
        got = yield from m._status()
        if isinstance(got, Failed):
            return got
        status = got
    if status == "shutdown":
        for cmd, args in (("set-action", {"reboot": "reset"}), ("system_reset", None)):
            got_r = yield from m._cmd(cmd, args)
            if isinstance(got_r, Failed):
                return got_r
    # Always (also on a retry that found the reset done): park the next reset again.
    # Safe before the reset ran: system_reset's request is already a reset
    # (qemu_system_reset_request reads the action when it is called).
    got_r = yield from m._cmd("set-action", {"reboot": "shutdown"})
    if isinstance(got_r, Failed):
        return got_r
    polls = 0
    while status == "shutdown":  # the reset request is served by QEMU's main loop
        if polls * STATUS_POLL >= RESET_SETTLE_TIMEOUT:
            return Failed(f"QEMU still in 'shutdown' {RESET_SETTLE_TIMEOUT:g}s after system_reset",
                          FailKind.TIMEOUT)
        if polls:
            yield Sleep(STATUS_POLL)
        polls += 1
        got = yield from m._status()
        if isinstance(got, Failed):
            return got
        status = got
    if cont and status != "running":
        got_r = yield from m._cmd("cont")
        if isinstance(got_r, Failed):
            return got_r
        status = "running"
    m.status = status
    return None
