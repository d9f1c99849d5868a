"""
One synchronous QMP command to the daemon's control socket.

For short-lived callers that must start fast: the libvirt hook (run
synchronously by libvirtd for every guest start and stop), ``qreset release
VM`` and ``qreset launch``'s registration. A blocking socket and :mod:`json`,
no event loop: importing ``qemu.qmp`` (even its ``legacy`` synchronous
wrapper, which runs asyncio underneath) costs a short-lived process about
60 ms of CPU, more than everything else the hook does (``bench/hook_startup.py``).
The long-lived clients (``qreset status``/``events``) use ``qemu.qmp``.

The exchange is QMP's (QEMU ``docs/interop/qmp-spec.rst``): read the greeting,
``qmp_capabilities``, then ``{"execute": ..., "arguments": ..., "id": N}`` and
read until the message with that id, skipping events. Servers end each
message with a newline (QEMU ``monitor/qmp.c`` writes ``\\r\\n``, our control
server ``\\n``), so messages are read line by line.

Error replies become :class:`ControlReplyError` (with the QMP error class); no
listener, a refusal in place of the greeting, a hang-up or a timeout become
:class:`DaemonUnreachable`.
"""

from __future__ import annotations

import json
import socket
from typing import IO, Any

from qreset.errors import QResetError

#: The daemon's control socket unless told otherwise. The same path as
#: ``qreset.config.DEFAULT_CONTROL_SOCKET`` (tested), kept here so that the
#: hook need not import the configuration stack (pydantic) to know it.
DEFAULT_SOCKET = "/run/qreset/qreset.sock"

#: Longest reply line accepted (a release report of many functions is a few KiB;
#: the bound only stops a broken peer from filling our memory).
MAX_LINE = 16 * 1024 * 1024


class DaemonUnreachable(QResetError):
    """Nothing usable answers on the control socket (not running, refused, hung up, timed out)."""


class ControlReplyError(QResetError):
    """The daemon answered with a QMP error; ``error_class`` is its class."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.error_class = error_class
        self.desc = desc


def _read(stream: IO[bytes], where: str) -> dict[str, Any]:
    line = stream.readline(MAX_LINE + 1)
    if not line:
        raise DaemonUnreachable(f"{where}: the daemon closed the connection")
    if len(line) > MAX_LINE:
        raise DaemonUnreachable(f"{where}: reply longer than {MAX_LINE} bytes")
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise DaemonUnreachable(f"{where}: not a QMP message: {exc}") from None
    if not isinstance(msg, dict):
        raise DaemonUnreachable(f"{where}: not a QMP message: {line[:80]!r}")
    return msg


def _execute(sock: socket.socket, stream: IO[bytes], msg_id: int, command: str,
             arguments: dict[str, Any]) -> Any:
    request: dict[str, Any] = {"execute": command, "id": msg_id}
    if arguments:
        request["arguments"] = arguments
    sock.sendall(json.dumps(request).encode() + b"\n")
    while True:
        reply = _read(stream, command)
        if "event" in reply:
            continue  # events may arrive between request and reply
        if reply.get("id") != msg_id:
            raise DaemonUnreachable(f"{command}: reply for another request: {str(reply)[:80]}")
        if "error" in reply:
            err = reply["error"]
            if not isinstance(err, dict):
                err = {"desc": str(err)}
            raise ControlReplyError(command, str(err.get("class", "GenericError")), str(err.get("desc", err)))
        return reply.get("return")


def call(socket_path: str, command: str, timeout: float = 60.0, **arguments: Any) -> Any:
    """Connect, negotiate, run ``command``, return its ``return`` value (``timeout`` per step)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(socket_path)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise DaemonUnreachable(f"daemon not reachable at {socket_path}: {why}") from None
        with sock.makefile("rb") as stream:
            greeting = _read(stream, "greeting")
            if "QMP" not in greeting:
                # The server refuses (permission, too many clients) with an error instead.
                err = greeting.get("error")
                desc = err.get("desc") if isinstance(err, dict) else greeting
                raise DaemonUnreachable(f"{socket_path} refused the session: {desc}")
            _execute(sock, stream, 0, "qmp_capabilities", {})
            return _execute(sock, stream, 1, command, arguments)
    except TimeoutError:
        raise DaemonUnreachable(
            f"{command}: no answer from {socket_path} within {timeout:g} s") from None
    except OSError as exc:
        raise DaemonUnreachable(f"{command}: connection to {socket_path} failed: "
                                f"{exc.strerror or exc}") from None
    finally:
        sock.close()
