"""
One synchronous QMP command to the daemon's control socket.

For short-lived callers (the libvirt hook, ``qreset release VM``) that must
start fast: qemu.qmp's synchronous ``legacy.QEMUMonitorProtocol``, no event
loop of our own. Error replies become :class:`DaemonError` (checked on the
raw reply, so the behaviour does not depend on how a qemu.qmp version's
``cmd()`` treats errors); an unreachable daemon is :class:`DaemonUnreachable`.
"""

from __future__ import annotations

from typing import Any

from qreset.errors import QResetError


class DaemonUnreachable(QResetError):
    """Nothing answers on the control socket (daemon not running?)."""


class DaemonError(QResetError):
    """The daemon answered with a QMP error; ``error_class`` is its class."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.error_class = error_class
        self.desc = desc


def call(socket_path: str, command: str, timeout: float = 60.0, **arguments: Any) -> Any:
    """Run ``command`` and return its ``return`` value."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(socket_path)
    try:
        qmp.settimeout(timeout)
        try:
            qmp.connect(negotiate=True)
        except (OSError, Exception) as exc:  # qemu.qmp wraps OSError in ConnectError
            raise DaemonUnreachable(f"daemon not reachable at {socket_path}: {exc}") from None
        reply = qmp.cmd_raw(command, arguments or None)
    except OSError as exc:
        raise DaemonUnreachable(f"{command}: connection to {socket_path} failed: {exc}") from None
    finally:
        qmp.close()
    if "error" in reply:
        err = reply["error"]
        raise DaemonError(command, str(err.get("class", "GenericError")), str(err.get("desc", err)))
    return reply.get("return")
