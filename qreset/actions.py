"""
QEMU's run-state actions (``-action``/``set-action``): what qreset found, sets and puts back.

Park mode needs ``reboot=shutdown,shutdown=pause``; stop-on-reset needs no
action at all and changes none. The rule (issue 9: libvirt's ``-no-shutdown``
fake reboot broke when qreset reset ``shutdown`` to ``poweroff``): never
change an action qreset did not set, and put back exactly what it found.

QEMU has no query for them (``set-action`` but no ``query-action``,
qapi/run-state.json), so :func:`startup_actions` reads them from the QEMU
process's command line (/proc/PID/cmdline of the QMP peer). QEMU resolves the
options in order, a later one overriding (softmmu/vl.c, qemu-options.hx):

* ``-no-shutdown``  → ``shutdown=pause``
* ``-no-reboot``    → ``reboot=shutdown``
* ``-action reboot=R,shutdown=S[,panic=P,watchdog=W]``

and otherwise ``reboot=reset``, ``shutdown=poweroff`` (qemu-options.hx).
Where the command line cannot be read (another PID namespace, a proxy in
between) the documented default is QEMU's own defaults: libvirt guests
(started with ``-no-shutdown``) are served in stop-on-reset mode, which never
changes an action, so the default only concerns QEMUs started by hand or by
``qreset launch`` without ``-no-shutdown``/``-no-reboot``/``-action``.

Because a QEMU's command line does not change, a restarted daemon reads the
same originals. Still, each change is journaled (phase ``actions``, with the
QEMU identity, ``found`` and ``set``; ``set`` null once put back), so a daemon
that cannot read the command line, or that serves the VM in the other mode
now, puts back what the first daemon found rather than QEMU's defaults
(:func:`last_actions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

#: QEMU's defaults (qemu-options.hx, ``-action``): the only keys qreset ever changes.
DEFAULT_ACTIONS: dict[str, str] = {"reboot": "reset", "shutdown": "poweroff"}
#: What park mode sets (see qreset.cycle): a guest reset parks the guest.
PARK_ACTIONS: dict[str, str] = {"reboot": "shutdown", "shutdown": "pause"}
#: Journal phase of the records below (an informational phase: never a cycle).
PHASE = "actions"


def startup_actions(argv: Sequence[str] | None) -> dict[str, str] | None:
    """The reboot/shutdown actions a QEMU command line sets up; None if ``argv`` is None."""
    if argv is None:
        return None
    actions = dict(DEFAULT_ACTIONS)
    args = list(argv[1:])
    i = 0
    while i < len(args):
        opt = args[i]
        name = opt[2:] if opt.startswith("--") else opt[1:] if opt.startswith("-") else None
        value: str | None = None
        if name is not None and "=" in name:  # --action=reboot=... is accepted too
            name, value = name.split("=", 1)
        if name == "no-shutdown":
            actions["shutdown"] = "pause"
        elif name == "no-reboot":
            actions["reboot"] = "shutdown"
        elif name == "action":
            if value is None and i + 1 < len(args):
                i += 1
                value = args[i]
            for item in (value or "").split(","):
                key, _, val = item.partition("=")
                if key in actions and val:
                    actions[key] = val
        i += 1
    return actions


def last_actions(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per VM, its last well-formed ``actions`` record (what a new daemon must know)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.get("phase") != PHASE:
            continue
        found, set_ = rec.get("found"), rec.get("set")
        if isinstance(found, dict) and all(isinstance(v, str) for v in found.values()) \
                and (set_ is None or isinstance(set_, dict)):
            out[rec["vm"]] = rec
    return out


def originals(journaled: dict[str, Any] | None, qemu: str | None,
              argv: Sequence[str] | None) -> tuple[dict[str, str], str]:
    """
    What to put back on this QEMU, and where that comes from: the journal (a
    daemon set actions on this very process and did not put them back), the
    command line, or QEMU's defaults.
    """
    if journaled is not None and journaled.get("set") and qemu is not None \
            and journaled.get("qemu") == qemu:
        return {k: str(v) for k, v in journaled["found"].items() if k in DEFAULT_ACTIONS}, "journal"
    found = startup_actions(argv)
    if found is not None:
        return found, "command line"
    return dict(DEFAULT_ACTIONS), "QEMU's defaults (command line unreadable)"


def pending_restore(journaled: dict[str, Any] | None, qemu: str | None) -> dict[str, str] | None:
    """Actions a previous daemon set on this QEMU and never put back (their originals), if any."""
    if journaled is None or not journaled.get("set") or qemu is None or journaled.get("qemu") != qemu:
        return None
    return {k: str(v) for k, v in journaled["found"].items() if k in DEFAULT_ACTIONS}
