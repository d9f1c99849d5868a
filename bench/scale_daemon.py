"""
``qreset run`` for the scale bench, optionally with an experimental journal.

``python -m bench.scale_daemon [--group-commit] run --config FILE`` runs the
real CLI. With ``--group-commit`` the daemon's :class:`qreset.journal.Journal`
gets a prototype append path (monkeypatched here, for measurement only; the
journal's owner decides what lands in qreset/journal.py):

- the line is written with one ``os.write`` on an ``O_APPEND`` descriptor
  from the event loop (a page-cache write of ~2 KB; the shipped path makes
  three thread-pool round trips per record: aiofiles ``write``, ``flush``,
  then ``to_thread(fsync)``, all under the journal lock);
- ``sync=True`` callers then wait for a *shared* fsync: one fsync in flight
  at a time, covering every line written before it started (group commit),
  so N concurrent cycles pay about two fsyncs of latency, not N.

Same durability promise per record: ``append`` returns after the line is in
the kernel (``sync=False``) or on disk (``sync=True``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any


def install() -> None:
    from qreset.journal import Journal, JournalError

    async def open_(self: Any) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise JournalError(f"{self.path}: cannot open journal: {exc.strerror or exc}") from None
        self._file = self  # "is open" for the rest of the class
        self._written = self._synced = 0
        self._flush = None  # the fsync in flight (an asyncio.Future), if any

    async def close(self: Any) -> None:
        fd, self._file = getattr(self, "_fd", None), None
        if fd is not None:
            self._fd = None
            await asyncio.to_thread(os.fsync, fd)
            os.close(fd)

    async def _fsync(self: Any) -> None:
        target = self._written
        try:
            await asyncio.to_thread(os.fsync, self._fd)
        finally:
            self._synced = max(self._synced, target)

    async def append(self: Any, record: dict[str, Any], *, sync: bool = True) -> dict[str, Any]:
        rec = {"t": round(time.time(), 6), **record}
        data = (json.dumps(rec, separators=(",", ":"), default=str) + "\n").encode()
        if self._file is None:
            raise JournalError(f"{self.path}: journal is not open")
        try:
            view = memoryview(data)
            while view:  # no await in between: lines never interleave
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise JournalError(f"{self.path}: cannot write journal: {exc.strerror or exc}") from None
        self._written += 1
        mine = self._written
        while sync and self._synced < mine:
            if self._flush is None or self._flush.done():
                self._flush = asyncio.ensure_future(_fsync(self))
            try:
                await asyncio.shield(self._flush)
            except OSError as exc:
                raise JournalError(f"{self.path}: cannot sync journal: {exc.strerror or exc}") from None
        return rec

    Journal.open = open_  # type: ignore[method-assign]
    Journal.close = close  # type: ignore[method-assign]
    Journal.append = append  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--group-commit"]:
        install()
        argv = argv[1:]
    from qreset.cli import main as qreset_main

    return qreset_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
