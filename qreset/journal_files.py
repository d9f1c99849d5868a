"""
The journal's file operations (thread side): open the active segment, rotate.

Kept apart from :mod:`qreset.journal` (the event-loop side: appends, group
commit, degraded mode) because everything here blocks on the disk and runs
in a thread, or once at start.

A rotation is crash-safe by its order: the checkpoint goes to ``PATH.next``
and is fsynced, the old file is fsynced, segments shift (``.1`` → ``.2`` …),
``PATH`` becomes ``PATH.1``, ``PATH.next`` becomes ``PATH``, the directory is
fsynced. A crash before ``PATH`` moved leaves ``PATH`` whole (``.next`` is
dropped at the next start); a crash after leaves ``.next`` complete (it is
renamed into place): :func:`finish_rotation`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from qreset.journal_read import check_regular

logger = logging.getLogger(__name__)


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of ``data`` is written (a regular file may take part of it)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def finish_rotation(path: Path) -> None:
    """A rotation cut short by a crash: keep ``PATH.next`` only if the active file was moved away."""
    nxt = path.with_name(path.name + ".next")
    if not nxt.exists():
        return
    if path.exists():
        nxt.unlink()  # the checkpoint may be incomplete; the active file still has everything
    else:
        os.rename(nxt, path)  # fsynced before the old file was moved: complete
        logger.warning("%s: finished a rotation interrupted by a crash", path)


def open_active(path: Path) -> tuple[int, int]:
    """
    Open the active segment for appending (creating it and its directory):
    ``(fd, size)``. Ends a torn last line first. Raises OSError, or
    ConfigError if ``path`` is not a regular file (never blocks on a FIFO).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    check_regular(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            check_regular(path)
        size = st.st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # The previous daemon died mid-line: end that line, or the next
            # record would be glued to it and lost at the next read.
            logger.warning("%s: the last line was torn (daemon killed mid-write); ending it", path)
            write_all(fd, b"\n")
            size += 1
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def rotate_files(path: Path, segments: int, old_fd: int, checkpoint: bytes) -> int:
    """Thread side of a rotation: checkpoint to PATH.next (fsynced), shift segments, rename."""
    nxt = path.with_name(path.name + ".next")
    fd = os.open(nxt, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, checkpoint)
        os.fsync(fd)
        os.fsync(old_fd)  # every record before the checkpoint is durable in its segment
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            nxt.unlink()
        raise
    try:
        n = segments + 1
        while (extra := path.with_name(f"{path.name}.{n}")).exists():  # the bound was lowered
            extra.unlink()
            n += 1
        for n in range(segments - 1, 0, -1):
            seg = path.with_name(f"{path.name}.{n}")
            if seg.exists():
                os.rename(seg, path.with_name(f"{path.name}.{n + 1}"))
        os.rename(path, path.with_name(f"{path.name}.1"))
        os.rename(nxt, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        os.close(fd)  # PATH.next, if still there, is settled at the next start
        raise
    return fd
