"""
The one root exception of qreset and its structured subclasses.

Every error qreset raises on purpose derives from :class:`QResetError`, so a
caller (the daemon's cycle runner, the CLI's ``main``) can catch exactly one
type and turn it into a one-line message. Subclasses carry the fields a caller
needs to act (the address, the path, the key) instead of only a string, the
way ``qemu.qmp``'s ``ExecuteError`` carries ``error_class``/``sent``/``received``.
"""

from __future__ import annotations


class QResetError(Exception):
    """Root of every error qreset raises deliberately."""


class AddressError(QResetError, ValueError):
    """A PCI address that does not parse. ``text`` is what was given."""

    def __init__(self, text: str, why: str) -> None:
        super().__init__(f"bad PCI address {text!r}: {why}")
        self.text = text
        self.why = why


class HostError(QResetError):
    """
    Host PCI access failed: a sysfs file is missing, unreadable or holds
    garbage, or a write was refused. ``path`` names the file (or the simulated
    equivalent) so the one-line message says where.
    """

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


class NoSuchFunction(HostError):
    """The function does not exist (or no longer exists) on the host."""


class ResetFailed(HostError):
    """A reset method was invoked and failed (EIO, ENOTTY, timeout...)."""


class ConfigError(QResetError):
    """A configuration or topology file is invalid. ``where`` is file[:key]."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where = where
        self.why = why


class ProtocolError(QResetError):
    """A QMP peer (QEMU or a control-socket client) sent something malformed."""
