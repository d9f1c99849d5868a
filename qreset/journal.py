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
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from qreset.journal_read import (
    INFO_PHASES,
    REGISTRY_PHASES,
    TERMINAL_PHASES,
    JournalError,
    finished_cycles,
    iter_history,
    read_records,
    registered_vms,
    unfinished_cycles,
)

__all__ = [
    "INFO_PHASES", "REGISTRY_PHASES", "TERMINAL_PHASES", "Journal", "JournalError",
    "finished_cycles", "iter_history", "read_records", "registered_vms", "unfinished_cycles",
]

logger = logging.getLogger(__name__)

def _torn_tail(path: Path) -> bool:
    """Whether ``path`` is a non-empty file whose last byte is not a newline."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


class Journal:
    """Append-only JSON-lines journal at ``path``; call :meth:`open` first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None  # aiofiles' async text file; typed loosely by the stubs
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        try:
            await aiofiles.os.makedirs(self.path.parent, exist_ok=True)
            torn = await asyncio.to_thread(_torn_tail, self.path)
            self._file = await aiofiles.open(self.path, "a", encoding="utf-8")
            if torn:
                # The previous daemon died mid-line: end that line, or the next
                # record would be glued to it and lost at the next read.
                logger.warning("%s: the last line was torn (daemon killed mid-write); ending it",
                               self.path)
                await self._file.write("\n")
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
