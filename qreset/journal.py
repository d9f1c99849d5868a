"""
The daemon's journal: an append-only file of JSON lines, one per cycle phase.

Why a journal and not only a log: a daemon that is killed while a guest is
parked leaves that guest stopped, and only the daemon knows it parked it. The
journal is what a new daemon reads at start to find those guests and finish
their cycles. Records: ``cycle-start`` (a guest is about to be parked or
stopped), ``parked``, ``engine-done``, and one terminal record: ``resumed``,
``stopped`` (left stopped on purpose), ``failed`` (ended, VM resumed or gone)
or ``poweroff``; ``add-vm``/``remove-vm`` for VMs registered at run time
(only the control socket told the daemon about those: without the record a
restarted daemon would leave them uncoordinated). Each line is a JSON object
with at least ``t`` (UNIX time), ``vm``, ``cycle`` and ``phase``; the terminal
record carries the cycle's whole summary (what ``qreset history`` shows).

**Durability.** :meth:`Journal.append` writes the line to the kernel at once
(``os.write`` on an ``O_APPEND`` descriptor): from then on it survives a
daemon crash; only a host crash can lose it, and that kills QEMU too. With
``sync=True`` (the default) it also returns only once an ``fsync`` covers the
line. fsyncs are **group commits**: one flusher task runs one fsync at a time
(in a thread), covering every line written before it started, so 64 cycles
appending at once share a few fsyncs instead of queueing for 64. With
``sync=False`` the line is fsynced by the next group commit or at the latest
:data:`LAZY_SYNC_S` later. (``aiofiles`` is not used here any more: each of
its writes is a thread round trip, and the contract is "written to the kernel
when append returns", which one ``os.write`` gives.)

**Degraded mode: what safety requires.** The journal serves recovery; it must
never be the reason a guest stays parked. So when it cannot be written (at
start: the directory is read-only or missing and cannot be created; while
running: ENOSPC, EIO, an fsync that does not return within
:data:`SYNC_TIMEOUT_S`), the journal goes *degraded*: :attr:`Journal.degraded`
says why, :meth:`append` returns without writing and never raises, cycles go
on and reset devices as usual (a reset without a journal beats no reset), and
every guest is still resumed or left stopped with its reason in the log and
events. What is lost is only what a *daemon crash during* the degraded time
would need: the record of a cycle in progress and run-time registrations.
It is logged once when entered and once when left, shown by ``qreset status``
(``journal_degraded``) and the metric ``qreset_journal_degraded``. The
flusher retries every :data:`RETRY_S` (and at the next append after that):
when the file takes writes again it writes a checkpoint (below) of the open
cycles and registered VMs, so what was missed is whole again.

**Rotation.** When the active file passes ``segment_bytes`` it becomes
``PATH.1`` (``.1`` → ``.2`` ..., at most ``segments`` kept) and a new active
file starts with one ``checkpoint`` record: the open cycles and the registry
(see :mod:`qreset.journal_read`). Start-up then reads only the active file,
and ``qreset history`` reads all retained segments
(:func:`~qreset.journal_read.iter_history`). The checkpoint is written and
fsynced to ``PATH.next`` before anything is renamed; a crash between the
renames is finished at the next start (:func:`qreset.journal_files.finish_rotation`).

A journal path that exists and is not a regular file (FIFO, device,
directory) is a configuration error (:class:`~qreset.errors.ConfigError`, one
line naming it): it is never opened, so start-up never blocks on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from qreset.journal_files import finish_rotation, open_active, rotate_files, write_all
from qreset.journal_read import (
    INFO_PHASES,
    REGISTRY_PHASES,
    TERMINAL_PHASES,
    JournalError,
    RecoveryState,
    check_regular,
    finished_cycles,
    iter_history,
    load_recovery,
    read_records,
    registered_vms,
    segment_paths,
    unfinished_cycles,
)

__all__ = [
    "INFO_PHASES", "REGISTRY_PHASES", "TERMINAL_PHASES", "Journal", "JournalError", "RecoveryState",
    "finished_cycles", "iter_history", "read_records", "registered_vms", "segment_paths",
    "unfinished_cycles",
]

logger = logging.getLogger(__name__)

#: Size past which the active file is rotated (our choice: start-up reads at most this).
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
#: Rotated segments kept besides the active file (history reach vs. disk: 9 × 16 MiB at most).
DEFAULT_SEGMENTS = 8
#: While degraded, seconds between attempts to write again (our choice).
RETRY_S = 5.0
#: A ``sync=False`` record is fsynced at the latest this long after it was written (our choice).
LAZY_SYNC_S = 1.0
#: An fsync (or a rotation) not done within this long degrades the journal rather than
#: holding a cycle, and so a parked guest, behind a stuck disk (our choice).
SYNC_TIMEOUT_S = 10.0


def _why(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


class Journal:
    """Append-only JSON-lines journal at ``path``; :meth:`open` reads it back and opens it."""

    def __init__(self, path: Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 segments: int = DEFAULT_SEGMENTS, retry_s: float = RETRY_S) -> None:
        self.path = path
        self.segment_bytes = segment_bytes
        self.segments = max(1, segments)
        self.retry_s = retry_s
        #: Why records are not being kept (None: they are). See the module docstring.
        self.degraded: str | None = None
        #: The fold of every record (open cycles, registry): what a checkpoint writes.
        self.state = RecoveryState()
        self.rotations = 0
        #: fsyncs run (each a group commit covering every record written before it).
        self.fsyncs = 0
        self._opened = False
        self._closing = False
        self._fd: int | None = None
        self._size = 0
        self._torn = False          # the file may end mid-line (a write failed half-way)
        self._complete = True       # state holds everything the file did (False: unreadable at start)
        self._seq = 0               # records written to the kernel
        self._synced = 0            # records an fsync has covered
        self._dropped = 0           # records not written (degraded)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._gate: asyncio.Future[None] | None = None  # set while rotating: appends wait
        self._rotate_wanted = False
        self._lazy: asyncio.TimerHandle | None = None
        self._last_try = 0.0
        self._flusher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------
    # open / close

    async def open(self) -> RecoveryState:
        """
        Read back what a restart needs (the active segment only, streamed) and
        open the file for appending. Raises ConfigError if the path is not a
        regular file; an unreadable or unwritable journal only degrades it.
        """
        with contextlib.suppress(JournalError):  # cannot even stat it: degraded below
            check_regular(self.path)  # ConfigError: a FIFO, device or directory
        try:
            await asyncio.to_thread(finish_rotation, self.path)
            self.state = await asyncio.to_thread(load_recovery, self.path)
        except (OSError, JournalError) as exc:
            self._complete = False
            logger.error("%s: cannot read the journal back (%s): open cycles and VMs added at run "
                         "time by the previous daemon are not known", self.path, _why(exc))
        self._opened = True
        try:
            self._open_file()
        except OSError as exc:
            self._degrade(f"cannot open {self.path}: {_why(exc)}")
        self._flusher = asyncio.create_task(self._flush_loop(), name=f"journal[{self.path.name}].flush")
        if self._size > self.segment_bytes:
            self._want_rotation()
        return self.state

    def _open_file(self) -> None:
        self._fd, self._size = open_active(self.path)
        self._torn = False

    async def close(self) -> None:
        """Fsync what was written and close; waits for a rotation or fsync in progress."""
        if not self._opened:
            return
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._flusher), SYNC_TIMEOUT_S)
            self._flusher.cancel()
            self._flusher = None
        if self._lazy is not None:
            self._lazy.cancel()
        self._release(all_=True)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._opened = False

    # ------------------------------------------------------------------
    # append (event loop side)

    async def append(self, record: dict[str, Any], *, sync: bool = True) -> dict[str, Any]:
        """
        Write one record (adds ``t``) and return it. ``sync=True``: return once
        an fsync covers it (a group commit shared with concurrent appends);
        ``sync=False``: once it is written to the kernel. Never raises once
        opened: a failure degrades the journal (see the module docstring).
        """
        if not self._opened:
            raise JournalError(f"{self.path}: journal is not open")
        rec = {"t": round(time.time(), 6), **record}
        line = (json.dumps(rec, separators=(",", ":"), default=str) + "\n").encode()
        if self._gate is not None and not await self._wait(self._gate, "a rotation"):
            return rec
        if isinstance(rec.get("vm"), str) and isinstance(rec.get("cycle"), str):
            self.state.feed(rec)
        if self.degraded is not None or self._fd is None:
            self._dropped += 1
            if time.monotonic() - self._last_try >= self.retry_s:
                self._wake.set()  # try writing again now
            return rec
        try:
            self._write(line)
        except OSError as exc:
            self._dropped += 1
            self._degrade(f"cannot write {self.path}: {_why(exc)}")
            return rec
        seq = self._seq
        if sync:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((seq, fut))
            self._wake.set()
            await self._wait(fut, "an fsync")
        elif self._lazy is None:
            self._lazy = asyncio.get_running_loop().call_later(LAZY_SYNC_S, self._wake.set)
        return rec

    def _write(self, line: bytes) -> None:
        assert self._fd is not None
        try:
            write_all(self._fd, line)
        except OSError:
            self._torn = True  # maybe half a line: ended before the next write
            raise
        self._size += len(line)
        self._seq += 1
        if self._size > self.segment_bytes:
            self._want_rotation()

    async def _wait(self, fut: asyncio.Future[None], what: str) -> bool:
        """Wait for ``fut`` at most SYNC_TIMEOUT_S; past it, degrade rather than hold a cycle."""
        try:
            await asyncio.wait_for(asyncio.shield(fut), SYNC_TIMEOUT_S)
        except TimeoutError:
            self._degrade(f"{what} of {self.path} did not finish within {SYNC_TIMEOUT_S:g} s")
            return False
        return True

    def _want_rotation(self) -> None:
        self._rotate_wanted = True
        self._wake.set()

    def _release(self, upto: int = 0, *, all_: bool = False) -> None:
        while self._waiters and (all_ or self._waiters[0][0] <= upto):
            _seq, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _degrade(self, why: str) -> None:
        if self.degraded is None:
            logger.error("journal degraded, records are not kept: %s. Cycles go on (a reset without "
                         "a journal beats none); a daemon crash now would not find them. Retrying "
                         "every %g s", why, self.retry_s)
            self._last_try = time.monotonic()
        self.degraded = why
        self._release(all_=True)
        self._wake.set()  # the flusher now waits with a retry timeout

    # ------------------------------------------------------------------
    # the flusher (one task: fsyncs, rotations, recovery; blocking work in threads)

    async def _flush_loop(self) -> None:
        while True:
            busy = self._closing or (self.degraded is None and (
                self._rotate_wanted or (bool(self._waiters) and self._synced < self._seq)))
            if not busy:
                try:
                    async with asyncio.timeout(self.retry_s if self.degraded is not None else None):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
            if self._lazy is not None:
                self._lazy.cancel()
                self._lazy = None
            try:
                if self.degraded is not None:
                    if not self._closing and time.monotonic() - self._last_try >= self.retry_s:
                        await self._recover()
                elif self._rotate_wanted and not self._closing:
                    await self._rotate()
                elif self._synced < self._seq:
                    await self._sync()
            except Exception as exc:  # a bug here must not hold cycles: degrade and go on
                logger.debug("journal flusher error", exc_info=True)
                self._degrade(f"journal error: {type(exc).__name__}: {exc}")
            if self.degraded is not None:
                self._release(all_=True)
            if self._closing and (self.degraded is not None or self._synced >= self._seq):
                return

    async def _sync(self) -> None:
        target, fd = self._seq, self._fd
        assert fd is not None
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError as exc:
            self._degrade(f"cannot fsync {self.path}: {_why(exc)}")
            return
        self.fsyncs += 1
        self._synced = max(self._synced, target)
        self._release(self._synced)

    def _checkpoint_line(self) -> bytes:
        rec = {"t": round(time.time(), 6), **self.state.checkpoint()}
        return (json.dumps(rec, separators=(",", ":"), default=str) + "\n").encode()

    async def _rotate(self) -> None:
        self._rotate_wanted = False
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gate = gate  # appends wait: the checkpoint is the state as of now
        target, old = self._seq, self._fd
        assert old is not None
        try:
            new = await asyncio.to_thread(rotate_files, self.path, self.segments, old,
                                          self._checkpoint_line())
        except OSError as exc:
            self._degrade(f"cannot rotate {self.path}: {_why(exc)}")
            return
        finally:
            self._gate = None
            gate.set_result(None)
        self._fd, self._size, self._torn = new, os.fstat(new).st_size, False
        with contextlib.suppress(OSError):
            os.close(old)
        self.rotations += 1
        self._synced = max(self._synced, target)
        self._release(self._synced)
        logger.info("%s: rotated (segment over %d bytes; %d kept)", self.path, self.segment_bytes,
                    self.segments)

    async def _recover(self) -> None:
        """Degraded: try to write again; on success, a checkpoint makes the file whole again."""
        self._last_try = time.monotonic()
        dropped = self._dropped
        ckpt = self._checkpoint_line() if self._complete else b""
        try:
            await asyncio.to_thread(self._reopen, ckpt)
        except (OSError, JournalError) as exc:
            logger.debug("journal still degraded: %s", _why(exc))
            return
        except Exception as exc:  # ConfigError: the path became a FIFO or a directory
            logger.debug("journal still degraded: %s", exc)
            return
        was, self.degraded = self.degraded, None
        self._synced = self._seq
        logger.warning("journal writable again (was: %s)%s", was,
                       "; a checkpoint holds the open cycles and VMs added meanwhile" if ckpt else "")
        if self._dropped != dropped and self._complete:  # appended while we retried
            try:
                self._write(self._checkpoint_line())
            except OSError as exc:
                self._degrade(f"cannot write {self.path}: {_why(exc)}")
                return
            self._wake.set()
        if self._size > self.segment_bytes:
            self._want_rotation()

    def _reopen(self, checkpoint: bytes) -> None:
        """Thread side of a recovery attempt (degraded: no append writes meanwhile)."""
        if self._fd is None:
            self._open_file()
        assert self._fd is not None
        if self._torn:
            write_all(self._fd, b"\n")
            self._torn = False
        try:
            write_all(self._fd, checkpoint)
        except OSError:
            self._torn = True
            raise
        os.fsync(self._fd)
        self._size = os.fstat(self._fd).st_size

    # ------------------------------------------------------------------

    def unfinished(self) -> dict[str, list[dict[str, Any]]]:
        """Per VM, the records of its last cycle if it has no terminal record."""
        return self.state.unfinished()

    async def flush(self) -> None:
        """Return once everything written so far is fsynced (or the journal is degraded)."""
        if self._opened and self.degraded is None and self._synced < self._seq:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((self._seq, fut))
            self._wake.set()
            await self._wait(fut, "an fsync")
