"""
The daemon's control socket: a QMP server.

Why QMP and not a home-made protocol: every QEMU user already has the
tools — ``qmp-shell /run/qreset/qreset.sock`` works (the path is
``daemon.control_socket``, see :mod:`qreset.config`), ``qemu.qmp``'s
``QMPClient`` is the client library of ``qreset status``/``history``/
``events`` — and the framing, the error shape and the event shape are
specified (QEMU ``docs/interop/qmp-spec.rst``) rather than invented.

One concern per module:

- :mod:`~qreset.control.framing`: the JSON stream in and out, strict
  decoding, the error message shape;
- :mod:`~qreset.control.schema`: the command table, each command's
  arguments as a pydantic model, the backend protocol (:class:`ControlBackend`);
- :mod:`~qreset.control.access`: the 0600 socket file and the peer-uid check;
- :mod:`~qreset.control.connection`: one client's state and output (replies
  awaited, events bounded);
- :mod:`~qreset.control.server`: accepting, admission and eviction,
  negotiation, dispatch, event fan-out.
"""

from qreset.control.access import ControlError, peer_allowed, peer_credentials
from qreset.control.framing import Framer
from qreset.control.schema import COMMANDS, OPTIONAL_COMMANDS, ControlBackend, validate_arguments
from qreset.control.server import ControlServer

__all__ = [
    "COMMANDS",
    "OPTIONAL_COMMANDS",
    "ControlBackend",
    "ControlError",
    "ControlServer",
    "Framer",
    "peer_allowed",
    "peer_credentials",
    "validate_arguments",
]
