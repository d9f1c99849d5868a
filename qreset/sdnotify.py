"""
A self-contained ``sd_notify`` (the systemd notification protocol).

systemd's ``Type=notify`` waits for ``READY=1`` on the datagram socket named
by ``$NOTIFY_SOCKET`` (see sd_notify(3) and systemd's own "minimal
implementation" in its man page): an ``AF_UNIX``/``SOCK_DGRAM`` socket; a
leading ``@`` means the Linux abstract namespace (a NUL byte). It is twenty
lines, so qreset carries it instead of depending on libsystemd bindings.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op returning False.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STOPPING=1"``, ``"STATUS=..."``).

    Returns True when a message was sent. Errors are swallowed on purpose: a
    daemon must not die because its supervisor's socket went away.
    """
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path or not path.startswith(("/", "@")):
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    """``READY=1`` (plus an optional ``STATUS=`` line): sockets exist, VMs are being served."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    """``STOPPING=1``: shutdown has begun (parked VMs are being resumed)."""
    return notify("STOPPING=1")
