"""
The daemon's journal: an append-only file of JSON lines, one per cycle phase.

Why a journal and not only a log: a daemon that is killed while a guest is
parked leaves that guest stopped, and only the daemon knows it parked it. The
journal is what a new daemon reads at start to find those guests and finish
their cycles (see :meth:`Journal.unfinished`). So every phase that changes
what a restart must do is written *and fsynced* before the daemon moves on:
``cycle-start`` (a guest is about to be parked/stopped), ``parked``,
``engine-done``, and one terminal record: ``resumed``, ``stopped`` (left
stopped on purpose), ``failed`` (ended, VM resumed or gone) or ``poweroff``.

Each line is a JSON object with at least ``t`` (UNIX time), ``vm``,
``cycle`` (a string id unique across daemon runs) and ``phase``. The terminal
record of a cycle carries its whole summary (plan, per-phase durations,
outcome), which is what ``qreset history`` shows.

A torn last line (the daemon died mid-write) is skipped with a warning, never
a crash: the cycle it belonged to then looks unfinished, which is the safe
reading.

The journal also records the VMs registered at run time (``add-vm`` from the
libvirt hook or ``qreset launch``) and their removal, phases ``add-vm`` and
``remove-vm`` (:data:`REGISTRY_PHASES`), fsynced like cycle records: only the
control socket ever told the daemon about those VMs, so without the record a
restarted daemon (``systemctl restart``, or a crash and ``Restart=on-failure``)
would leave them uncoordinated until libvirt restarts the guest.
:func:`registered_vms` folds them into the set a new daemon must serve again.
Each has its own cycle id (``reg-...``) and never opens or ends a cycle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from qreset.errors import QResetError

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


class JournalError(QResetError):
    """The journal cannot be opened or written (names the path)."""


class Journal:
    """Append-only JSON-lines journal at ``path``; call :meth:`open` first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None  # aiofiles' async text file; typed loosely by the stubs
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        try:
            await aiofiles.os.makedirs(self.path.parent, exist_ok=True)
            self._file = await aiofiles.open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise JournalError(f"{self.path}: cannot open journal: {exc.strerror or exc}") from None

    async def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                await file.close()
            except OSError as exc:  # the last flush failed: already reported per record
                logger.warning("%s: closing the journal: %s", self.path, exc.strerror or exc)

    async def append(self, record: dict[str, Any], *, sync: bool = True) -> dict[str, Any]:
        """Write one record (adds ``t``), flush and (``sync``) fsync it; returns the record written.

        ``sync=False``: written to the kernel (survives a daemon crash), not fsynced.
        """
        rec = {"t": round(time.time(), 6), **record}
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        async with self._lock:
            if self._file is None:
                raise JournalError(f"{self.path}: journal is not open")
            try:
                await self._file.write(line)
                await self._file.flush()
                if not sync:
                    return rec
                # fsync blocks on the disk: off the event loop like any other blocking call.
                await asyncio.to_thread(os.fsync, self._file.fileno())
            except OSError as exc:
                raise JournalError(f"{self.path}: cannot write journal: {exc.strerror or exc}") from None
        return rec

    def read(self) -> list[dict[str, Any]]:
        """Every well-formed record, in order (synchronous: used once at start-up)."""
        return list(read_records(self.path))

    def unfinished(self) -> dict[str, list[dict[str, Any]]]:
        """Per VM, the records of its last cycle if it has no terminal record."""
        return unfinished_cycles(self.read())


def read_records(path: Path) -> Iterable[dict[str, Any]]:
    if path.exists() and not path.is_file():
        logger.warning("%s is not a regular file: no journal to read back", path)
        return
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalError(f"{path}: cannot read journal: {exc.strerror or exc}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            logger.warning("%s:%d: skipping malformed journal line (%s)", path, lineno, exc.msg)
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("vm"), str) \
                or not isinstance(rec.get("cycle"), str):
            logger.warning("%s:%d: skipping journal line without vm/cycle", path, lineno)
            continue
        yield rec


def unfinished_cycles(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group records by cycle; return, per VM, the latest cycle lacking a terminal phase."""
    cycles: dict[str, list[dict[str, Any]]] = {}
    order: list[str] = []
    for rec in records:
        if rec.get("phase") in INFO_PHASES or rec.get("phase") in REGISTRY_PHASES:
            continue  # says something about a cycle, or a registration; never opens one
        cid = rec["cycle"]
        if cid not in cycles:
            cycles[cid] = []
            order.append(cid)
        cycles[cid].append(rec)
    out: dict[str, list[dict[str, Any]]] = {}
    for cid in order:
        recs = cycles[cid]
        vm = recs[0]["vm"]
        if any(r.get("phase") in TERMINAL_PHASES for r in recs):
            out.pop(vm, None)  # a later finished cycle supersedes an older open one
        else:
            out[vm] = recs
    return out


def finished_cycles(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The terminal record of every cycle, oldest first (what ``history`` shows)."""
    return [r for r in records if r.get("phase") in TERMINAL_PHASES]


def registered_vms(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """
    The VMs registered at run time and not removed since, by name, in the
    order they were (last) added: each value is the ``add-vm`` record (with
    ``qmp``, ``devices``, ``mode``). A later ``add-vm`` of the same name
    replaces the earlier one. A record missing a field or with one of the
    wrong type is skipped with a warning (hand-edited or damaged journal).
    """
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        phase = rec.get("phase")
        if phase not in REGISTRY_PHASES:
            continue
        vm = rec["vm"]
        if phase == "remove-vm":
            out.pop(vm, None)
            continue
        devices = rec.get("devices")
        mode = rec.get("mode")
        if not isinstance(rec.get("qmp"), str) or not isinstance(devices, list) \
                or not all(isinstance(d, str) for d in devices) \
                or not (mode is None or isinstance(mode, str)):
            logger.warning("journal: add-vm record of VM %s lacks qmp/devices/mode; ignoring it", vm)
            continue
        out.pop(vm, None)  # re-added: its place is now at the end
        out[vm] = rec
    return out
