"""
Who is at the other end of a QMP socket.

:func:`open_qmp` connects the UNIX socket itself and hands the connected
socket to ``QMPClient.connect`` (qemu.qmp accepts a ``socket.socket``
there), so the peer's credentials are read from our own socket object
instead of qemu.qmp's private stream.

:func:`qemu_identity` names the process: ``PID:STARTTIME`` from SO_PEERCRED
(socket(7)) and field 22 of /proc/PID/stat (proc(5): start time in clock
ticks since boot), so a reused PID is not taken for the same process.

The run-state actions QEMU was started with are read from the same peer's
command line by :mod:`qreset.actions`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient


@dataclass(frozen=True, slots=True)
class Peer:
    """The process behind a QMP socket (``pid`` 0 when unknown)."""

    pid: int = 0

    @property
    def identity(self) -> str | None:
        return qemu_identity(self.pid)

    def cmdline(self, proc: Path = Path("/proc")) -> list[str] | None:
        if self.pid <= 0:
            return None
        try:
            raw = (proc / str(self.pid) / "cmdline").read_bytes()
        except OSError:
            return None
        return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] or None


async def open_qmp(client: QMPClient, path: Path) -> Peer:
    """Connect ``client`` to the UNIX socket ``path``; return who answered."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
        peer = Peer(_peer_pid(sock))
    except BaseException:
        sock.close()
        raise
    # From here the transport owns the socket (and closes it, on failure too).
    await client.connect(sock)
    return peer


def _peer_pid(sock: socket.socket) -> int:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])
    except (OSError, struct.error):
        return 0


def qemu_identity(pid: int, proc: Path = Path("/proc")) -> str | None:
    """``PID:STARTTIME`` of process ``pid``, or None when it cannot be read."""
    if pid <= 0:
        return None
    try:
        stat = (proc / str(pid) / "stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]  # field 22; fields 1-2 end at the last ')'
    except (OSError, IndexError):
        return None
    return f"{pid}:{start}"
