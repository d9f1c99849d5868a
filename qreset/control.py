"""
The daemon's control socket: a QMP server.

Why QMP and not a home-made protocol: every QEMU user already has the
tools — ``qmp-shell /run/qreset/control.sock`` works, ``qemu.qmp``'s
``QMPClient`` is the client library of ``qreset status``/``history``/
``events`` — and the framing, the error shape and the event shape are
specified (QEMU ``docs/interop/qmp-spec.rst``) rather than invented.

What a client sees, exactly as from a QEMU monitor:

1. the greeting ``{"QMP": {"version": ..., "capabilities": []}}``;
2. nothing but ``qmp_capabilities`` is accepted until it has been sent
   (``CommandNotFound``, "Expecting capabilities negotiation with
   'qmp_capabilities'", as ``monitor/qmp.c`` answers);
3. then ``{"execute": NAME, "arguments": {...}, "id": ANY}`` →
   ``{"return": ..., "id": ANY}`` or
   ``{"error": {"class": ..., "desc": ...}, "id": ANY}``;
4. events ``{"event": NAME, "data": {...}, "timestamp": {...}}`` at any
   time after negotiation.

The commands are served by a :class:`ControlBackend` (the daemon). This module
only speaks the protocol: framing, negotiation, argument validation (with
QAPI's wording, ``qapi/qobject-input-visitor.c``), access control and
back-pressure. It never lets a client hurt the daemon:

- the socket is created mode 0600 and the peer's uid is checked with
  ``SO_PEERCRED`` (root or the daemon's own uid only);
- a request is bounded in size (``max_request``); a longer one gets an error
  and the connection is closed;
- malformed input (bad JSON, not an object, wrong argument types) gets a QMP
  error reply and the connection carries on;
- a backend exception becomes a ``GenericError`` carrying one line; the
  server keeps serving;
- :meth:`ControlServer.emit` never blocks: each client has a bounded
  output backlog and a client that does not keep up is dropped;
- a command that is running when its client goes away (or the server
  closes) runs to completion — a reset cycle is never abandoned halfway,
  since that could leave a guest parked.

Run states of a connection (explicit, as ``qemu.qmp``'s ``Runstate``):
``GREETED`` (greeting sent, waiting for ``qmp_capabilities``) →
``NEGOTIATED`` (commands and events) → ``CLOSING``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from qreset import __version__
from qreset.errors import QResetError

logger = logging.getLogger(__name__)

__all__ = [
    "COMMANDS",
    "ControlBackend",
    "ControlError",
    "ControlServer",
    "peer_allowed",
]

#: The greeting's version block. The "qemu" triple is what a QMP client
#: parses as the server version; we put ours there (0.1.0) and name the
#: program in "package", as QEMU puts its distribution package name there.
_VERSION_MAJOR, _VERSION_MINOR, _VERSION_MICRO = (int(p) for p in __version__.split(".")[:3])

#: sockaddr_un.sun_path is 108 bytes including the NUL (Linux ``include/uapi/linux/un.h``
#: UNIX_PATH_MAX).
_UNIX_PATH_MAX = 108

#: Default bytes waiting to be sent to one client (beyond the kernel's socket
#: buffer) before it counts as stuck and is dropped.
DEFAULT_MAX_BUFFER = 1024 * 1024

#: Default cap on simultaneous clients (each costs a file descriptor and two tasks).
DEFAULT_MAX_CLIENTS = 64

#: query-resets without a limit returns this many cycles; no more than
#: _MAX_LIMIT may be asked for in one reply.
DEFAULT_RESETS_LIMIT = 20
_MAX_LIMIT = 10_000

_WHITESPACE = frozenset(b" \t\r\n")


class ControlError(QResetError):
    """The control socket cannot be set up (path too long, in use, not creatable)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"control socket {path}: {why}")
        self.path = path
        self.why = why


@runtime_checkable
class ControlBackend(Protocol):
    """
    What the daemon provides to the control socket, one method per command.

    Every method returns JSON-serialisable data (dicts, lists, str, int,
    float, bool, None; anything else is sent as its ``str()``). A method
    raises :class:`QResetError` for a failure the client should read
    (unknown VM, plan refused...); its message is sent as one line.
    """

    async def query_vms(self) -> list[dict[str, Any]]: ...

    async def query_devices(self, vm: str | None) -> list[dict[str, Any]]: ...

    async def query_plan(self, vm: str) -> dict[str, Any]: ...

    async def query_resets(self, vm: str | None, limit: int) -> list[dict[str, Any]]: ...

    async def reset_vm(self, vm: str) -> dict[str, Any]: ...

    async def add_vm(self, name: str, qmp: str, devices: list[str], mode: str | None) -> dict[str, Any]: ...

    async def remove_vm(self, name: str, release: bool) -> dict[str, Any]: ...

    async def doctor(self, functions: list[str]) -> list[dict[str, Any]]: ...

    async def query_status(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------
# Command schema and argument validation


class _ArgType(enum.Enum):
    """Argument types, named as QAPI names them in its error messages."""

    STR = "string"
    INT = "integer"
    BOOL = "boolean"
    STR_LIST = "array of strings"


@dataclass(frozen=True)
class _Arg:
    name: str
    type: _ArgType
    required: bool = False
    default: Any = None


@dataclass(frozen=True)
class _Command:
    name: str
    args: tuple[_Arg, ...]
    help: str


#: Every command, in the order query-commands lists them.
COMMANDS: dict[str, _Command] = {
    c.name: c
    for c in (
        _Command("qmp_capabilities", (_Arg("enable", _ArgType.STR_LIST, default=[]),),
                 "leave capabilities negotiation mode"),
        _Command("query-commands", (), "list the commands this server accepts"),
        _Command("query-status", (), "daemon state and counters"),
        _Command("query-vms", (), "the VMs the daemon serves"),
        _Command("query-devices", (_Arg("vm", _ArgType.STR),), "assigned devices (of one VM or all)"),
        _Command("query-plan", (_Arg("vm", _ArgType.STR, required=True),),
                 "what a reset of this VM would do, touching nothing"),
        _Command("query-resets",
                 (_Arg("vm", _ArgType.STR), _Arg("limit", _ArgType.INT, default=DEFAULT_RESETS_LIMIT)),
                 "past reset cycles, newest first"),
        _Command("reset-vm", (_Arg("vm", _ArgType.STR, required=True),),
                 "run a reset cycle for this VM now"),
        _Command("add-vm",
                 (_Arg("name", _ArgType.STR, required=True), _Arg("qmp", _ArgType.STR, required=True),
                  _Arg("devices", _ArgType.STR_LIST, default=[]), _Arg("mode", _ArgType.STR)),
                 "start serving a VM"),
        _Command("remove-vm",
                 (_Arg("name", _ArgType.STR, required=True), _Arg("release", _ArgType.BOOL, default=False)),
                 "stop serving a VM (release: reset its functions for the host)"),
        _Command("doctor", (_Arg("functions", _ArgType.STR_LIST, default=[]),),
                 "explain how functions can be reset and what blocks it"),
        _Command("check-devices",
                 (_Arg("name", _ArgType.STR, required=True),
                  _Arg("devices", _ArgType.STR_LIST, required=True)),
                 "whether a VM with these devices may start (libvirt hook); optional"),
    )
}

#: Commands served only when the backend has the method (not part of
#: ControlBackend): command -> backend method name. ``qreset hook`` calls
#: check-devices at prepare/start; a backend without it answers
#: CommandNotFound and query-commands does not list it.
OPTIONAL_COMMANDS: dict[str, str] = {"check-devices": "check_devices"}


class _CommandError(Exception):
    """A request-level failure: becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        desc = _one_line(desc)
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def _type_ok(value: object, kind: _ArgType) -> bool:
    if kind is _ArgType.STR:
        return isinstance(value, str)
    if kind is _ArgType.INT:
        # JSON true/false decode to bool, a subclass of int: not an integer here.
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is _ArgType.BOOL:
        return isinstance(value, bool)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate_arguments(command: str, arguments: Mapping[str, object]) -> dict[str, Any]:
    """
    Check ``arguments`` against the command's schema; return them with
    defaults filled in. Raises :class:`_CommandError` with QAPI's wording
    (``Parameter 'x' is missing``, ``Parameter 'x' is unexpected``,
    ``Invalid parameter type for 'x', expected: string``).
    """
    spec = COMMANDS[command]
    known = {a.name: a for a in spec.args}
    for key in arguments:
        if key not in known:
            raise _CommandError(f"Parameter '{_printable(key)}' is unexpected")
    out: dict[str, Any] = {}
    for arg in spec.args:
        if arg.name not in arguments:
            if arg.required:
                raise _CommandError(f"Parameter '{arg.name}' is missing")
            out[arg.name] = list(arg.default) if isinstance(arg.default, list) else arg.default
            continue
        value = arguments[arg.name]
        if not _type_ok(value, arg.type):
            raise _CommandError(f"Invalid parameter type for '{arg.name}', expected: {arg.type.value}")
        out[arg.name] = value
    return out


# --------------------------------------------------------------------------
# Framing


class _Framer:
    """
    Splits the incoming byte stream into JSON texts.

    QMP messages are JSON objects sent back to back; newlines are a
    convention, not the delimiter (QEMU's ``qobject/json-streamer.c`` counts
    braces). We do the same: a text starting with ``{`` or ``[`` ends where
    its brackets balance (outside strings); anything else is a stray token
    that ends at whitespace or at the next ``{``/``[``, and is reported as
    malformed by the decoder. Scanning state is kept across reads so a large
    message is scanned once, not once per chunk.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = -1  # start of the current text, -1 between texts
        self._depth = 0  # 0 with _start >= 0: a stray scalar token
        self._in_str = False
        self._esc = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the complete texts now available (possibly none)."""
        self.buf += data
        out: list[bytes] = []
        buf = self.buf
        i = self._pos
        n = len(buf)
        while i < n:
            b = buf[i]
            if self._start < 0:
                if b in _WHITESPACE:
                    i += 1
                    continue
                self._start = i
                self._depth = 1 if b in b"{[" else 0
                i += 1
                continue
            if self._depth == 0:  # stray token
                if b in _WHITESPACE or b in b"{[":
                    out.append(bytes(buf[self._start:i]))
                    self._start = -1
                    continue  # re-examine b as the start of the next text
                i += 1
                continue
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif b == 0x5C:  # backslash
                    self._esc = True
                elif b == 0x22:  # quote
                    self._in_str = False
            elif b == 0x22:
                self._in_str = True
            elif b in b"{[":
                self._depth += 1
            elif b in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[self._start:i + 1]))
                    self._start = -1
            i += 1
        # Drop consumed bytes so the buffer only holds the pending text.
        cut = self._start if self._start >= 0 else i
        del buf[:cut]
        self._pos = i - cut
        self._start = min(0, self._start)
        return out

    def flush(self) -> bytes:
        """At EOF: the pending stray token, if any (an unterminated object is dropped)."""
        if self._start >= 0 and self._depth == 0:
            return bytes(self.buf[self._start:])
        return b""

    @property
    def pending(self) -> int:
        """Bytes of the incomplete text waiting for more input."""
        return len(self.buf) if self._start >= 0 else 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # QEMU's json-parser.c: "Duplicate key"
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def decode(text: bytes) -> Any:
    """Strict JSON (no NaN/Infinity, no duplicate keys); raises ``_CommandError``."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise _CommandError(f"JSON parse error, {exc.msg} (byte {exc.pos})") from None
    except UnicodeDecodeError:
        raise _CommandError("JSON parse error, invalid UTF-8") from None
    except RecursionError:
        raise _CommandError("JSON parse error, nesting too deep") from None
    except ValueError as exc:
        raise _CommandError(f"JSON parse error, {exc}") from None


def _encode(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, default=str, allow_nan=False, ensure_ascii=True).encode() + b"\n"


def _error(desc: str, error_class: str = "GenericError", msg_id: Any = None, *,
           has_id: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        reply["id"] = msg_id
    return reply


# --------------------------------------------------------------------------
# Access control


def peer_allowed(peer_uid: int, own_uid: int) -> bool:
    """
    Whether a peer may use the socket: root, or the uid the daemon runs as.
    The 0600 mode already keeps others out; this is the second lock, for a
    socket path someone chmod'ed or a directory with looser permissions.
    """
    return peer_uid in (0, own_uid)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected AF_UNIX socket (``SO_PEERCRED``, socket(7))."""
    fmt = "3i"  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, raw)
    return pid, uid, gid


# --------------------------------------------------------------------------
# Connections


class _State(enum.Enum):
    GREETED = "greeted"
    NEGOTIATED = "negotiated"
    CLOSING = "closing"


class _Client:
    """
    One connection. Its reader task reads and executes requests in order;
    replies and events are written straight into the transport, whose
    buffer is the client's bounded queue: once more than ``max_buffer``
    bytes wait for a client that does not read, it is dropped. Bounding
    bytes rather than messages lets a burst of small events through to a
    client that is merely not scheduled yet, and still stops a stuck one.
    """

    def __init__(self, ident: int, writer: asyncio.StreamWriter, max_buffer: int) -> None:
        self.ident = ident
        self.writer = writer
        self.state = _State.GREETED
        self.max_buffer = max_buffer
        self.log = logger.getChild(f"client{ident}")
        self.reader_task: asyncio.Task[None] | None = None
        #: True while the reader task is in its read loop (and may be cancelled to stop it).
        self.reading = False

    @property
    def closing(self) -> bool:
        return self.state is _State.CLOSING

    def send(self, msg: Mapping[str, Any]) -> bool:
        """Send a message (raises TypeError/ValueError if it is not JSON)."""
        return self.push(_encode(msg))

    def push(self, data: bytes) -> bool:
        """Send encoded bytes; False (and the client is dropped) when its backlog is full."""
        if self.state is _State.CLOSING:
            return False
        transport = self.writer.transport
        if transport.is_closing():  # the peer went away; the reader will see EOF
            self.state = _State.CLOSING
            return False
        backlog = transport.get_write_buffer_size()
        if backlog > self.max_buffer:
            self.log.warning("client does not read its messages (%d bytes waiting); dropping it", backlog)
            self.drop()
            return False
        transport.write(data)
        return True

    def stop_reader(self) -> None:
        if self.reading and self.reader_task is not None and self.reader_task is not asyncio.current_task():
            self.reader_task.cancel()

    def finish(self) -> None:
        """Close after what is buffered has been sent (orderly end, e.g. after a final error)."""
        self.state = _State.CLOSING
        self.writer.close()

    def drop(self) -> None:
        """Close now, discarding what is buffered (a slow or abusive client)."""
        self.state = _State.CLOSING
        self.writer.transport.abort()  # also cuts short a flushing close(); no-op once closed
        self.stop_reader()


class ControlServer:
    """
    The control socket. ``start()`` binds and serves; ``close()`` stops
    accepting, disconnects the clients and removes the socket file.

    :param path: the socket path (``/run/qreset/control.sock`` in production)
    :param backend: serves the commands (the daemon)
    :param check_uid: refuse peers that are neither root nor our uid
    :param max_request: largest request in bytes; a longer one is refused
        and the client disconnected
    :param max_buffer: bytes waiting to be sent to one client before it is dropped
    :param max_clients: simultaneous clients; more are refused
    """

    def __init__(
        self,
        path: str | Path,
        backend: ControlBackend,
        *,
        check_uid: bool = True,
        max_request: int = 64 * 1024,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.path = Path(path)
        self.backend = backend
        self.check_uid = check_uid
        self.max_request = max_request
        self.max_buffer = max_buffer
        self.max_clients = max_clients
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[int, _Client] = {}
        self._ids = itertools.count(1)
        self._running: set[asyncio.Task[Any]] = set()  # backend calls in flight
        self._own_uid = os.geteuid()
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "query-status": lambda a: self.backend.query_status(),
            "query-vms": lambda a: self.backend.query_vms(),
            "query-devices": lambda a: self.backend.query_devices(a["vm"]),
            "query-plan": lambda a: self.backend.query_plan(a["vm"]),
            "query-resets": lambda a: self.backend.query_resets(a["vm"], a["limit"]),
            "reset-vm": lambda a: self.backend.reset_vm(a["vm"]),
            "add-vm": lambda a: self.backend.add_vm(a["name"], a["qmp"], a["devices"], a["mode"]),
            "remove-vm": lambda a: self.backend.remove_vm(a["name"], a["release"]),
            "doctor": lambda a: self.backend.doctor(a["functions"]),
        }
        check = getattr(backend, OPTIONAL_COMMANDS["check-devices"], None)
        if callable(check):
            self._handlers["check-devices"] = lambda a: check(a["name"], a["devices"])

    @property
    def clients(self) -> int:
        """Number of connected clients (negotiated or not)."""
        return len(self._clients)

    @property
    def negotiated(self) -> int:
        """Number of clients past qmp_capabilities (the ones that receive events)."""
        return sum(1 for c in self._clients.values() if c.state is _State.NEGOTIATED)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket (mode 0600) and start accepting. Raises :class:`ControlError`."""
        if self._server is not None:
            raise ControlError(str(self.path), "already started")
        where = str(self.path)
        if len(os.fsencode(where)) >= _UNIX_PATH_MAX:
            raise ControlError(where, f"path longer than {_UNIX_PATH_MAX - 1} bytes")
        await self._remove_stale()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlError(where, f"cannot create directory: {exc.strerror}") from None
        # bind() creates the file with mode 0777 & ~umask: narrow the umask so
        # the socket is never connectable by others, not even briefly.
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, path=where, limit=self.max_request,
            )
        except OSError as exc:
            raise ControlError(where, f"cannot listen: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        os.chmod(where, 0o600)
        logger.info("control socket listening on %s", where)

    async def _remove_stale(self) -> None:
        """Remove a socket file left by a daemon that died; refuse if one is alive."""
        where = str(self.path)
        try:
            st = os.lstat(where)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError(where, exc.strerror or str(exc)) from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(where, "exists and is not a socket")
        try:
            # 2 s: a live server accepts at once; only a hung holder of the socket takes longer.
            _r, w = await asyncio.wait_for(asyncio.open_unix_connection(where), 2.0)
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

    async def close(self) -> None:
        """
        Stop accepting, disconnect every client, remove the socket file.
        Commands still running are awaited (their replies discarded): a
        reset cycle is not abandoned halfway.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for client in list(self._clients.values()):
            client.drop()
        tasks = [c.reader_task for c in self._clients.values() if c.reader_task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._running:
            logger.info("waiting for %d running command(s) to finish", len(self._running))
            await asyncio.gather(*self._running, return_exceptions=True)
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        logger.info("control socket %s closed", self.path)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- events ------------------------------------------------------------

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """
        Broadcast an event to every negotiated client. Never blocks and never
        raises for a client's sake: a client whose backlog is full is dropped.
        Call it from the event loop's thread (it writes to asyncio transports).
        """
        now = time.time()
        seconds = int(now)
        msg = {
            "event": event,
            "data": data,
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
        }
        try:
            encoded = _encode(msg)
        except (TypeError, ValueError) as exc:
            logger.error("event %s not serialisable, not sent: %s", event, exc)
            return
        for client in list(self._clients.values()):
            if client.state is _State.NEGOTIATED:
                client.push(encoded)

    # -- connection handling -----------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ident = next(self._ids)
        client = _Client(ident, writer, self.max_buffer)
        # asyncio runs this callback in a task of its own: name it after the client.
        task = asyncio.current_task()
        assert task is not None
        task.set_name(f"qreset.control[{ident}]")
        client.reader_task = task
        self._clients[ident] = client
        try:
            if not self._admit(client):
                return
            client.send(self._greeting())
            client.reading = True
            await self._read_loop(client, reader)
        except asyncio.CancelledError:
            pass
        except Exception:
            # A bug here must not take the daemon down; this client goes.
            client.log.exception("connection handler failed")
        finally:
            client.reading = False
            client.finish()
            try:
                # Let the last replies (a refusal, "request too large") go out.
                await asyncio.wait_for(writer.wait_closed(), 5.0)
            except (TimeoutError, asyncio.CancelledError, ConnectionError, OSError):
                client.drop()
            self._clients.pop(ident, None)
            client.log.debug("disconnected")

    def _admit(self, client: _Client) -> bool:
        """Peer-uid and client-count checks; on refusal the error is sent and the client finished."""
        sock = client.writer.get_extra_info("socket")
        peer = "unknown"
        if sock is not None:
            try:
                pid, uid, _gid = peer_credentials(sock)
            except OSError as exc:
                client.log.warning("cannot read peer credentials: %s", exc)
                client.send(_error("permission denied: peer credentials unavailable"))
                return False
            peer = f"pid {pid} uid {uid}"
            if self.check_uid and not peer_allowed(uid, self._own_uid):
                client.log.warning("refusing %s: only root and uid %d may connect", peer, self._own_uid)
                client.send(_error(f"permission denied: uid {uid} may not use this socket"))
                return False
        if len(self._clients) > self.max_clients:
            client.log.warning("refusing %s: %d clients already connected", peer, self.max_clients)
            client.send(_error(f"too many clients (limit {self.max_clients})"))
            return False
        client.log.debug("connected: %s", peer)
        return True

    @staticmethod
    def _greeting() -> dict[str, Any]:
        return {
            "QMP": {
                "version": {
                    "qemu": {"micro": _VERSION_MICRO, "minor": _VERSION_MINOR, "major": _VERSION_MAJOR},
                    "package": f"qreset {__version__}",
                },
                "capabilities": [],
            }
        }

    async def _read_loop(self, client: _Client, reader: asyncio.StreamReader) -> None:
        framer = _Framer()
        while not client.closing:
            try:
                data = await reader.read(65536)
            except (ConnectionError, OSError) as exc:
                client.log.debug("read failed: %s", exc)
                return
            if not data:
                tail = framer.flush()
                if tail:
                    await self._handle_text(client, tail)
                return
            for text in framer.feed(data):
                if len(text) > self.max_request:
                    self._too_big(client)
                    return
                await self._handle_text(client, text)
                if client.closing:
                    return
            if framer.pending > self.max_request:
                self._too_big(client)
                return

    def _too_big(self, client: _Client) -> None:
        client.log.warning("request larger than %d bytes; disconnecting", self.max_request)
        client.send(_error(f"request exceeds {self.max_request} bytes; closing the connection"))
        client.finish()

    async def _handle_text(self, client: _Client, text: bytes) -> None:
        msg_id: Any = None
        has_id = False
        try:
            request = decode(text)
            if not isinstance(request, dict):
                raise _CommandError("QMP input must be a JSON object")
            if "id" in request:
                msg_id, has_id = request["id"], True
            command, arguments = self._parse_request(request)
            reply = {"return": await self._dispatch(client, command, arguments)}
        except _CommandError as exc:
            reply = _error(exc.desc, exc.error_class)
        if has_id:
            reply["id"] = msg_id
        try:
            client.send(reply)
        except (TypeError, ValueError) as exc:
            client.log.error("reply not serialisable: %s", exc)
            client.send(_error(f"internal error: reply not serialisable: {exc}",
                               msg_id=msg_id, has_id=has_id))

    @staticmethod
    def _parse_request(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Check the envelope as ``qapi/qmp-dispatch.c`` does (same messages)."""
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise _CommandError("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise _CommandError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise _CommandError(f"QMP input member '{_printable(key)}' is unexpected")
        if "execute" not in request:
            raise _CommandError("QMP input lacks member 'execute'")
        return request["execute"], request.get("arguments", {})

    async def _dispatch(self, client: _Client, command: str, arguments: dict[str, Any]) -> Any:
        if client.state is _State.GREETED and command != "qmp_capabilities":
            # monitor/qmp.c, qmp_dispatch with the capabilities-only command list
            raise _CommandError("Expecting capabilities negotiation with 'qmp_capabilities'",
                                "CommandNotFound")
        if command not in COMMANDS or (command in OPTIONAL_COMMANDS and command not in self._handlers):
            raise _CommandError(f"The command {_printable(command)} has not been found", "CommandNotFound")
        args = validate_arguments(command, arguments)
        if command == "qmp_capabilities":
            if client.state is _State.NEGOTIATED:
                # monitor/qmp-cmds-control.c, qmp_qmp_capabilities
                raise _CommandError("Capabilities negotiation is already complete, command ignored",
                                    "CommandNotFound")
            if args["enable"]:
                # We offer no capability (no "oob"), so any is unknown.
                raise _CommandError(
                    f"Parameter 'enable' does not accept value '{_printable(args['enable'][0])}'"
                )
            client.state = _State.NEGOTIATED
            return {}
        if command == "query-commands":
            return [{"name": name} for name in COMMANDS
                    if name not in OPTIONAL_COMMANDS or name in self._handlers]
        if command == "query-resets" and not 1 <= args["limit"] <= _MAX_LIMIT:
            raise _CommandError(f"Parameter 'limit' must be between 1 and {_MAX_LIMIT}")
        return await self._call_backend(client, command, args)

    async def _call_backend(self, client: _Client, command: str, args: dict[str, Any]) -> Any:
        """
        Run one backend method in its own task, shielded: if the client
        disconnects or the server closes meanwhile, the command still runs to
        its end (a reset cycle must not stop halfway) and close() waits for it.
        """
        coro = self._handlers[command](args)
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(f"qreset.control[{client.ident}].{command}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except QResetError as exc:
            raise _CommandError(_one_line(str(exc))) from None
        except Exception as exc:
            client.log.debug("%s failed", command, exc_info=True)
            client.log.error("%s failed: %s: %s", command, type(exc).__name__, _one_line(str(exc)))
            raise _CommandError(_one_line(f"internal error: {type(exc).__name__}: {exc}")) from None


def _printable(name: str, limit: int = 64) -> str:
    """A client-supplied name made safe for a one-line message: escaped, shortened."""
    shown = name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line or "unknown error"

