"""
The journal's segments as bytes and lines: the phase names, the bounds, and
the primitives the readers share (:mod:`qreset.journal_read`).

Which segments exist (``PATH``, ``PATH.1`` …), opening only regular files
(opening a FIFO blocks until a writer comes: the daemon hung at start and
ignored SIGTERM), lines streamed forwards or read backwards a block at a
time, and one line parsed with damage skipped and a warning. Nothing here
reads a whole file into memory.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from qreset.errors import ConfigError, QResetError

#: The readers log as one module (qreset.journal_read), as before the split.
logger = logging.getLogger("qreset.journal_read")

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
#: Closed cycle ids remembered per VM while folding, so a late record of a
#: finished cycle does not reopen it. A VM runs one cycle at a time (its
#: monitor's cycle lock), so a late record is of one of its last cycles. Per VM,
#: not per cycle: one set of the last 65 536 ids of all VMs grew by an entry
#: per cycle for 65 536 cycles (~13 MB; still growing 36 min into a run at
#: bench.scale's 30 cycles/s: bench.memgrowth).
CLOSED_PER_VM = 4
#: VMs whose closed cycle ids are remembered (the least recently closed is
#: forgotten first): VM names come and go (``qreset launch`` names a VM after
#: QEMU's pid), so this set is bounded too.
CLOSED_VMS = 4096
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


def parse_line(raw: bytes, where: str) -> dict[str, Any] | None:
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


def raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
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
    for lineno, raw in raw_lines(path):
        rec = parse_line(raw, f"{path}:{lineno}")
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
