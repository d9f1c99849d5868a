"""
Reading the journal back: streaming, over its rotated segments, in bounded memory.

The writer (:mod:`qreset.journal`) keeps the active file at the configured
path (``journal.jsonl``) and, once it grows past a size bound, moves it to
``journal.jsonl.1`` (shifting ``.1`` to ``.2`` ... and dropping the oldest)
and starts a new active file whose first line is a **checkpoint**: one record
(``phase: "checkpoint"``) carrying everything a restart needs from the
segments before it — the records of every open cycle, the ``add-vm``
record of every VM registered at run time, and each VM's last ``actions``
record (QEMU run-state actions qreset set: :mod:`qreset.actions`). So:

- start-up (:func:`load_recovery`) reads only the active segment, line by
  line, folding records into a :class:`RecoveryState` (a checkpoint replaces
  the state, later records update it): its time and memory are bounded by
  the segment size, not by the journal's age;
- history (:func:`iter_history`) reads segments newest first, each from its
  end, yielding terminal records lazily: a page costs what it shows.

Nothing here ever reads a whole file into memory (a 200 MB journal used to
take 21 s and 1.9 GB at start), and nothing opens a path that is not a
regular file (opening a FIFO blocks until a writer comes: the daemon hung at
start and ignored SIGTERM). Damaged lines are skipped with a warning: a
cycle that loses its terminal record looks unfinished, the safe reading.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from qreset.errors import ConfigError, QResetError

logger = logging.getLogger(__name__)

#: Phases after which a cycle needs nothing more from anyone.
TERMINAL_PHASES = frozenset({"resumed", "stopped", "failed", "poweroff"})
#: Phases that only inform (e.g. ``note``: the QMP connection was lost mid-cycle).
#: Older daemons wrote notes under the cycle id ``-``, shared by every VM: counted
#: as a cycle, that group never ends and made each restart "recover" a cycle
#: that was never open (and ``cont`` a guest that another manager holds stopped).
INFO_PHASES = frozenset({"note", "actions"})
#: Registration of a VM at run time (``add-vm``) and its end (``remove-vm``): not cycles.
REGISTRY_PHASES = frozenset({"add-vm", "remove-vm"})
#: The first record of a segment: the state the segments before it left (see module doc).
CHECKPOINT = "checkpoint"
#: QEMU run-state actions set/found (qreset.actions.PHASE): informational, but a restart needs the last.
ACTIONS = "actions"

#: Bytes read per step when reading a segment backwards (history).
BLOCK = 64 * 1024
#: A line longer than this is damage, not a record (a checkpoint of 256 VMs is ~0.5 MB).
MAX_LINE = 64 * 1024 * 1024
#: Closed cycle ids remembered while folding, so a late record of a finished
#: cycle does not reopen it; bounded so a months-long run stays flat.
CLOSED_REMEMBERED = 65536
#: Clock slack when stopping a ``since`` scan early (records are appended in
#: time order, but the wall clock may step back a little under NTP).
SINCE_SLACK_S = 300.0


class JournalError(QResetError):
    """The journal cannot be opened or written (names the path)."""


def segment_paths(path: Path, keep: int | None = None) -> list[Path]:
    """The journal's files, newest first: ``path``, ``path.1``, ``path.2``, ... (those that exist)."""
    out = [path] if path.exists() else []
    n = 1
    while keep is None or n <= keep:
        seg = path.with_name(f"{path.name}.{n}")
        if not seg.exists():
            break
        out.append(seg)
        n += 1
    return out


def check_regular(path: Path) -> None:
    """
    Raise ConfigError when ``path`` exists and is not a regular file (FIFO,
    device, directory, socket): a configuration error, named in one line.
    Never opens it, so never blocks.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalError(f"{path}: cannot check journal: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a named pipe (FIFO)"
                if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise ConfigError("[daemon] journal", f"{path} is {kind}; the journal must be a regular file")


def open_regular(path: Path) -> BinaryIO | None:
    """``path`` opened for binary reading (None if absent); refuses non-regular files without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"{path}: cannot read journal: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        check_regular(path)  # names what it is
        raise JournalError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


def _parse(raw: bytes, where: str) -> dict[str, Any] | None:
    if not raw.strip():
        return None
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logger.warning("%s: skipping malformed journal line (%s)", where,
                       getattr(exc, "msg", None) or exc)
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("vm"), str) \
            or not isinstance(rec.get("cycle"), str):
        logger.warning("%s: skipping journal line without vm/cycle", where)
        return None
    return rec


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of one segment, streamed; over-long lines skipped with a warning."""
    f = open_regular(path)
    if f is None:
        return
    with f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE)
            if not raw:
                return
            lineno += 1
            if len(raw) == MAX_LINE and not raw.endswith(b"\n"):
                logger.warning("%s:%d: skipping a journal line over %d bytes", path, lineno, MAX_LINE)
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE)
                continue
            yield lineno, raw


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every well-formed record of one segment, in order, streamed line by line."""
    for lineno, raw in _raw_lines(path):
        rec = _parse(raw, f"{path}:{lineno}")
        if rec is not None:
            yield rec


def read_lines_backwards(path: Path) -> Iterator[bytes]:
    """The lines of one segment, last first, reading ``BLOCK`` bytes at a time from the end."""
    f = open_regular(path)
    if f is None:
        return
    with f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            step = min(BLOCK, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + tail
            lines = chunk.split(b"\n")
            tail = lines[0]
            for line in reversed(lines[1:]):
                if line:
                    yield line
            if len(tail) > MAX_LINE:
                logger.warning("%s: skipping a journal line over %d bytes", path, MAX_LINE)
                tail = b""  # the rest of that line is dropped as it comes
        if tail:
            yield tail


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
    _closed: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)

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
        if (vm, cid) in self._closed:
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
        self._closed[vm, cid] = None
        if len(self._closed) > CLOSED_REMEMBERED:
            self._closed.popitem(last=False)

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
    for lineno, raw in _raw_lines(path):
        head = _HEAD.match(raw)
        if head is not None and head[3] not in _FULL and raw.rstrip().endswith(b"}"):
            state.feed({"vm": _string(head[1]), "cycle": _string(head[2]),
                        "phase": head[3].decode(), _RAW: (lineno, raw)})
            continue
        rec = _parse(raw, f"{path}:{lineno}")
        if rec is not None:
            state.feed(rec)
    for vm, (cid, recs) in list(state.open.items()):
        full = [r if _RAW not in r else _parse(r[_RAW][1], f"{path}:{r[_RAW][0]}") for r in recs]
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


# ----------------------------------------------------------------------
# history


_TERMINAL_BYTES = tuple(p.encode() for p in TERMINAL_PHASES)


def iter_history(path: Path, vm: str | None = None, since: float | None = None,
                 until: float | None = None, limit: int | None = None,
                 before: str | None = None) -> Iterator[dict[str, Any]]:
    """
    Past cycles from the journal, **newest first**: the terminal record of
    each (phase ``resumed``/``stopped``/``failed``/``poweroff``; the one with
    the cycle's whole summary), over every retained segment (``path``, then
    ``path.1``, ``path.2``...), each read backwards a block at a time.

    :param vm: only this VM's cycles.
    :param since: only records with ``t >= since`` (UNIX time). The scan stops
        at the first record older than ``since`` by more than
        :data:`SINCE_SLACK_S`, so a recent window costs little.
    :param until: only records with ``t < until``.
    :param limit: at most this many records (None: all).
    :param before: a cycle id (paging cursor: the last ``cycle`` of the previous
        page): only records older than that cycle's terminal record. Nothing is
        yielded if it is not found.

    Blocking file I/O: call it in a thread from the event loop
    (``await asyncio.to_thread(lambda: list(iter_history(...)))``). Memory is
    one block and one line, whatever the journal's size. Records written with
    ``append(..., sync=False)`` are visible as soon as ``append`` returned.
    """
    if limit is not None and limit <= 0:
        return
    vm_bytes = json.dumps(vm).encode() if vm is not None else None
    waiting_for = before
    count = 0
    for seg in segment_paths(path):
        try:
            lines = read_lines_backwards(seg)
            for raw in lines:
                # Cheap filters on the raw line before parsing it.
                if not any(p in raw for p in _TERMINAL_BYTES):
                    continue
                if vm_bytes is not None and vm_bytes not in raw:
                    continue
                rec = _parse(raw, str(seg))
                if rec is None or rec.get("phase") not in TERMINAL_PHASES:
                    continue
                if vm is not None and rec["vm"] != vm:
                    continue
                if waiting_for is not None:
                    if rec["cycle"] == waiting_for:
                        waiting_for = None
                    continue
                t = rec.get("t")
                if isinstance(t, int | float) and not isinstance(t, bool):
                    if since is not None and t < since - SINCE_SLACK_S:
                        return
                    if (since is not None and t < since) or (until is not None and t >= until):
                        continue
                elif since is not None or until is not None:
                    continue
                yield rec
                count += 1
                if limit is not None and count >= limit:
                    return
        except JournalError as exc:  # a segment rotated away or unreadable: the others still count
            logger.warning("%s", exc)
