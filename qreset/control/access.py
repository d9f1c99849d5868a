"""
Who may talk to the control socket, and the socket file itself.

Two locks, because the commands reset devices and start or stop serving
VMs: the socket is created mode 0600 (never connectable by others, not even
between ``bind()`` and ``chmod()``), and each peer's uid is read with
``SO_PEERCRED`` (socket(7)) and checked: root or the daemon's own uid only.
The second lock holds for a socket someone chmod'ed or a directory with
looser permissions.

Also here: a socket file left by a daemon that died is replaced, one that a
live daemon serves is not (two daemons would fight over every VM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from qreset.errors import QResetError

logger = logging.getLogger("qreset.control")

__all__ = ["ControlError", "listen", "peer_allowed", "peer_credentials"]

#: sockaddr_un.sun_path is 108 bytes including the NUL (Linux ``include/uapi/linux/un.h``
#: UNIX_PATH_MAX).
UNIX_PATH_MAX = 108

#: Our bound: a live server accepts at once; only a hung holder of the socket takes longer.
_PROBE_TIMEOUT = 2.0


class ControlError(QResetError):
    """The control socket cannot be set up (path too long, in use, not creatable)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"control socket {path}: {why}")
        self.path = path
        self.why = why


def peer_allowed(peer_uid: int, own_uid: int) -> bool:
    """Whether a peer may use the socket: root, or the uid the daemon runs as."""
    return peer_uid in (0, own_uid)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected AF_UNIX socket (``SO_PEERCRED``, socket(7))."""
    fmt = "3i"  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, raw)
    return pid, uid, gid


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def listen(path: Path, on_connect: Handler, limit: int) -> asyncio.AbstractServer:
    """Bind ``path`` mode 0600 and start accepting. Raises :class:`ControlError`."""
    where = str(path)
    if len(os.fsencode(where)) >= UNIX_PATH_MAX:
        raise ControlError(where, f"path longer than {UNIX_PATH_MAX - 1} bytes")
    await _remove_stale(where)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlError(where, f"cannot create directory: {exc.strerror}") from None
    # bind() creates the file with mode 0777 & ~umask: narrow the umask so
    # the socket is never connectable by others, not even briefly.
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_connect, path=where, limit=limit)
    except OSError as exc:
        raise ControlError(where, f"cannot listen: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(where, 0o600)
    return server


async def _remove_stale(where: str) -> None:
    """Remove a socket file left by a daemon that died; refuse if one is alive."""
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(where, exc.strerror or str(exc)) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(where, "exists and is not a socket")
    try:
        _r, w = await asyncio.wait_for(asyncio.open_unix_connection(where), _PROBE_TIMEOUT)
    except TimeoutError:
        raise ControlError(where, "a process holds it but does not answer") from None
    except (ConnectionRefusedError, FileNotFoundError):
        logger.info("removing stale control socket %s", where)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        return
    except OSError as exc:
        raise ControlError(where, exc.strerror or str(exc)) from None
    w.close()
    raise ControlError(where, "another process is serving it (is qreset already running?)")
