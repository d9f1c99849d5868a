"""
What a restart needs from the journal: open cycles, the run-time registry and
each VM's last run-state actions, folded from the active segment
(:func:`load_recovery`; why only that segment: :mod:`qreset.journal_read`).
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qreset.journal_segments import (
    ACTIONS,
    CHECKPOINT,
    CLOSED_PER_VM,
    CLOSED_VMS,
    INFO_PHASES,
    REGISTRY_PHASES,
    TERMINAL_PHASES,
    parse_line,
    raw_lines,
)

logger = logging.getLogger("qreset.journal_read")

# ----------------------------------------------------------------------
# what a restart needs: open cycles and the run-time registry


def valid_actions(rec: dict[str, Any]) -> bool:
    """The shape qreset.actions.last_actions accepts."""
    found, set_ = rec.get("found"), rec.get("set")
    return isinstance(found, dict) and all(isinstance(v, str) for v in found.values()) \
        and (set_ is None or isinstance(set_, dict))


def valid_add(rec: dict[str, Any]) -> bool:
    devices = rec.get("devices")
    mode = rec.get("mode")
    return isinstance(rec.get("qmp"), str) and isinstance(devices, list) \
        and all(isinstance(d, str) for d in devices) and (mode is None or isinstance(mode, str))


@dataclass
class RecoveryState:
    """
    The fold of records a restart needs, fed one record at a time in journal
    order (:meth:`feed`). Memory: the open cycles (one per VM at most, a few
    records each), the registry (one record per VM) and a bounded set of
    recently closed cycle ids; never the records of finished cycles.
    """

    #: VM name → (cycle id, the records of its latest cycle, which has no terminal record).
    open: dict[str, tuple[str, list[dict[str, Any]]]] = field(default_factory=dict)
    #: VM name → its ``add-vm`` record, in the order VMs were (last) added.
    registry: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: VM name → its last ``actions`` record (QEMU run-state actions set and found: qreset.actions).
    actions_by_vm: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: VM name → its last closed cycle ids (:data:`CLOSED_PER_VM`), least recently closed VM first.
    _closed: OrderedDict[str, deque[str]] = field(default_factory=OrderedDict)

    def feed(self, rec: dict[str, Any]) -> None:
        phase = rec.get("phase")
        if phase == CHECKPOINT:
            self._restore(rec)
        elif phase in REGISTRY_PHASES:
            self._register(rec)
        elif phase == ACTIONS:
            if valid_actions(rec):
                self.actions_by_vm[rec["vm"]] = rec
        elif phase not in INFO_PHASES:  # a note says something about a cycle, never opens one
            self._cycle(rec)

    def _cycle(self, rec: dict[str, Any]) -> None:
        vm, cid = rec["vm"], rec["cycle"]
        current = self.open.get(vm)
        if cid in self._closed.get(vm, ()):
            return  # a late record of a finished cycle
        if current is not None and current[0] == cid:
            current[1].append(rec)
        else:
            if current is not None:  # a later cycle supersedes an older open one
                self._close(vm, current[0])
            self.open[vm] = (cid, [rec])
        if rec.get("phase") in TERMINAL_PHASES:
            self.open.pop(vm, None)
            self._close(vm, cid)

    def _close(self, vm: str, cid: str) -> None:
        ids = self._closed.pop(vm, None)
        if ids is None:
            ids = deque(maxlen=CLOSED_PER_VM)
        ids.append(cid)
        self._closed[vm] = ids  # now the most recently closed
        if len(self._closed) > CLOSED_VMS:
            self._closed.popitem(last=False)

    def closed_remembered(self) -> int:
        """How many closed cycle ids the fold keeps (bounded: see :data:`CLOSED_PER_VM`)."""
        return sum(len(ids) for ids in self._closed.values())

    def _register(self, rec: dict[str, Any]) -> None:
        vm = rec["vm"]
        if rec.get("phase") == "remove-vm":
            self.registry.pop(vm, None)
        elif not valid_add(rec):
            logger.warning("journal: add-vm record of VM %s lacks qmp/devices/mode; ignoring it", vm)
        else:
            self.registry.pop(vm, None)  # re-added: its place is now at the end
            self.registry[vm] = rec

    def _restore(self, rec: dict[str, Any]) -> None:
        self.open.clear()
        self.registry.clear()
        self.actions_by_vm.clear()
        for key in ("open", "registry", "actions"):
            items = rec.get(key)
            if items is None and key == "actions":
                continue  # a checkpoint from before actions were journaled
            if not isinstance(items, list):
                logger.warning("journal: checkpoint without a %s list; ignoring that part", key)
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("vm"), str) \
                        and isinstance(item.get("cycle"), str):
                    self.feed(item)

    def checkpoint(self) -> dict[str, Any]:
        """The record that starts a new segment: this state, for a restart to read alone."""
        return {"vm": "", "cycle": CHECKPOINT, "phase": CHECKPOINT,
                "open": [r for _cid, recs in self.open.values() for r in recs],
                "registry": list(self.registry.values()),
                "actions": list(self.actions_by_vm.values())}

    def unfinished(self) -> dict[str, list[dict[str, Any]]]:
        """Per VM, the records of its last cycle if it has no terminal record."""
        return {vm: list(recs) for vm, (_cid, recs) in self.open.items()}

    def registered(self) -> dict[str, dict[str, Any]]:
        return dict(self.registry)

    def actions(self) -> dict[str, dict[str, Any]]:
        """Per VM, its last well-formed ``actions`` record (as qreset.actions.last_actions)."""
        return dict(self.actions_by_vm)


#: The head of a record as the writer lays out cycle records (``t``, ``vm``,
#: ``cycle``, ``phase`` first): enough to fold it without parsing the rest.
_HEAD = re.compile(rb'\{"t":[-+.0-9eE]+,"vm":("(?:[^"\\]|\\.)*"),"cycle":("(?:[^"\\]|\\.)*"),'
                   rb'"phase":"([a-z-]+)"')
_RAW = "_raw"
#: Records a head does not describe: parsed in full.
_FULL = frozenset(p.encode() for p in (CHECKPOINT, *REGISTRY_PHASES, *INFO_PHASES))


def _string(quoted: bytes) -> str:
    """A JSON string literal's value (the common case without escapes, fast)."""
    if b"\\" in quoted:
        value = json.loads(quoted)
        assert isinstance(value, str)
        return value
    return quoted[1:-1].decode("utf-8", errors="replace")


def load_recovery(path: Path) -> RecoveryState:
    """
    What a restart needs, from the active segment alone (blocking: run it in
    a thread). Most records belong to cycles that end: a line that starts with
    the writer's usual head and looks whole is folded from its head alone,
    and parsed in full only if its cycle is still open at the end (several
    times faster than parsing every summary).
    """
    state = RecoveryState()
    for lineno, raw in raw_lines(path):
        head = _HEAD.match(raw)
        if head is not None and head[3] not in _FULL and raw.rstrip().endswith(b"}"):
            state.feed({"vm": _string(head[1]), "cycle": _string(head[2]),
                        "phase": head[3].decode(), _RAW: (lineno, raw)})
            continue
        rec = parse_line(raw, f"{path}:{lineno}")
        if rec is not None:
            state.feed(rec)
    for vm, (cid, recs) in list(state.open.items()):
        full = [r if _RAW not in r else parse_line(r[_RAW][1], f"{path}:{r[_RAW][0]}") for r in recs]
        kept = [r for r in full if r is not None]
        if kept:
            state.open[vm] = (cid, kept)
        else:
            del state.open[vm]
    return state


def unfinished_cycles(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group records by cycle; return, per VM, the latest cycle lacking a terminal phase."""
    state = RecoveryState()
    for rec in records:
        state.feed(rec)
    return state.unfinished()


def finished_cycles(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The terminal record of every cycle, oldest first."""
    return [r for r in records if r.get("phase") in TERMINAL_PHASES]


def registered_vms(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """
    The VMs registered at run time and not removed since, by name, in the
    order they were (last) added: each value is the ``add-vm`` record (with
    ``qmp``, ``devices``, ``mode``). A later ``add-vm`` of the same name
    replaces the earlier one. A record missing a field or with one of the
    wrong type is skipped with a warning (hand-edited or damaged journal).
    """
    state = RecoveryState()
    for rec in records:
        if rec.get("phase") in REGISTRY_PHASES:
            state.feed(rec)
    return state.registered()
