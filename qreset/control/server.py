"""
The control server: accepts connections, runs each client's requests in
order, answers the protocol's own commands, and fans events out.

What a client sees, exactly as from a QEMU monitor (``docs/interop/qmp-spec.rst``):

1. the greeting ``{"QMP": {"version": ..., "capabilities": []}}``;
2. nothing but ``qmp_capabilities`` is accepted until it has been sent
   (``CommandNotFound``, "Expecting capabilities negotiation with
   'qmp_capabilities'", as ``monitor/qmp.c`` answers);
3. then ``{"execute": NAME, "arguments": {...}, "id": ANY}`` →
   ``{"return": ..., "id": ANY}`` or
   ``{"error": {"class": ..., "desc": ...}, "id": ANY}``;
4. events ``{"event": NAME, "data": {...}, "timestamp": {...}}`` at any
   time after negotiation.

It never lets a client hurt the daemon or lock others out:

- peers are checked (:mod:`qreset.control.access`), requests bounded
  (``max_request``; a longer one gets an error and the connection closes);
- malformed input gets a QMP error reply and the connection carries on; a
  backend exception becomes a ``GenericError`` carrying one line;
- :meth:`ControlServer.emit` never blocks (:mod:`qreset.control.connection`
  bounds each client's unread events; replies are awaited instead);
- a connection must send ``qmp_capabilities`` within ``negotiate_timeout``
  seconds of its greeting, and when ``max_clients`` are connected a new one
  evicts the longest-idle client (un-negotiated ones first; never one whose
  command is running), so leaked or hostile idle connections cannot keep the
  libvirt hook out (issue 10, item 8);
- a command that is running when its client goes away (or the server
  closes) runs to completion: a reset cycle is never abandoned halfway,
  since that could leave a guest parked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

from qreset import __version__
from qreset.control.access import ControlError, listen
from qreset.control.admission import admit, event_message
from qreset.control.connection import Connection, State
from qreset.control.framing import (
    Framer,
    RequestError,
    decode,
    encode,
    error_reply,
    greeting,
    one_line,
    parse_request,
    printable,
)
from qreset.control.schema import COMMANDS, ControlBackend, QmpCapabilities, validate_arguments
from qreset.errors import QResetError

logger = logging.getLogger("qreset.control")

__all__ = ["ControlServer"]

#: Our version, as the greeting's "qemu" triple (see :func:`~qreset.control.framing.greeting`).
_VERSION = tuple(int(p) for p in __version__.split(".")[:3])

#: Default bytes of events waiting for one client (beyond the kernel's socket
#: buffer) before it counts as stuck and is dropped.
DEFAULT_MAX_BUFFER = 1024 * 1024
#: Default cap on simultaneous clients (each costs a file descriptor and a task).
DEFAULT_MAX_CLIENTS = 64
#: Our bound, not QMP's (QEMU waits forever): every QMP client sends
#: qmp_capabilities right after the greeting; 5 s covers a loaded host.
DEFAULT_NEGOTIATE_TIMEOUT = 5.0
#: Our bound: seconds a client may leave its own reply unread before it is dropped.
DEFAULT_REPLY_TIMEOUT = 30.0
#: Our bound: how long close() lets a last message (a refusal) go out.
_CLOSE_FLUSH_TIMEOUT = 5.0


class ControlServer:
    """
    The control socket. ``start()`` binds and serves; ``close()`` stops
    accepting, disconnects the clients and removes the socket file.

    :param path: the socket path (``daemon.control_socket``, by default
        ``/run/qreset/qreset.sock``)
    :param backend: serves the commands (the daemon)
    :param check_uid: refuse peers that are neither root nor our uid
    :param max_request: largest request in bytes; a longer one is refused
        and the client disconnected
    :param max_buffer: bytes of events waiting for one client before it is dropped
    :param max_clients: simultaneous clients; one more evicts the longest-idle one
    :param negotiate_timeout: seconds from the greeting to ``qmp_capabilities``
    :param reply_timeout: seconds a client may leave its reply unread
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
        negotiate_timeout: float = DEFAULT_NEGOTIATE_TIMEOUT,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.backend = backend
        self.check_uid = check_uid
        self.max_request = max_request
        self.max_buffer = max_buffer
        self.max_clients = max_clients
        self.negotiate_timeout = negotiate_timeout
        self.reply_timeout = reply_timeout
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._running: set[asyncio.Task[Any]] = set()  # backend calls in flight
        self._own_uid = os.geteuid()
        #: Commands served: every one the backend has a method for.
        self._served = [name for name, c in COMMANDS.items()
                        if c.method is None or callable(getattr(backend, c.method, None))]

    @property
    def clients(self) -> int:
        """Number of connected clients (negotiated or not)."""
        return len(self._clients)

    @property
    def negotiated(self) -> int:
        """Number of clients past qmp_capabilities (the ones that receive events)."""
        return sum(1 for c in self._clients.values() if c.state is State.NEGOTIATED)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket (mode 0600) and start accepting. Raises :class:`ControlError`."""
        if self._server is not None:
            raise ControlError(str(self.path), "already started")
        self._server = await listen(self.path, self._on_connect, self.max_request)
        logger.info("control socket listening on %s", self.path)

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
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
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
        raises for a client's sake: a client whose event backlog is full is
        dropped. Call it from the event loop's thread (it writes to asyncio
        transports).
        """
        msg = event_message(event, data)
        try:
            encoded = encode(msg)
        except (TypeError, ValueError) as exc:
            logger.error("event %s not serialisable, not sent: %s", event, exc)
            return
        for client in list(self._clients.values()):
            if client.state is State.NEGOTIATED:
                client.push_event(encoded)

    # -- connection handling -----------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ident = next(self._ids)
        client = Connection(ident, writer, max_backlog=self.max_buffer, reply_timeout=self.reply_timeout)
        # asyncio runs this callback in a task of its own: name it after the client.
        task = asyncio.current_task()
        assert task is not None
        task.set_name(f"qreset.control[{ident}]")
        client.reader_task = task
        self._clients[ident] = client
        try:
            if not admit(client, self._clients.values(), check_uid=self.check_uid,
                         own_uid=self._own_uid, max_clients=self.max_clients):
                return
            client.send_now(greeting(_VERSION, f"qreset {__version__}"))
            client.greeted_at = time.monotonic()
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
                # Let the last messages (a refusal, "request too large") go out.
                await asyncio.wait_for(writer.wait_closed(), _CLOSE_FLUSH_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError, ConnectionError, OSError):
                client.drop()
            self._clients.pop(ident, None)
            client.log.debug("disconnected")

    async def _read(self, client: Connection, reader: asyncio.StreamReader) -> bytes | None:
        """Next bytes from the client; None when it did not negotiate in time (it was told)."""
        if client.state is not State.GREETED:
            return await reader.read(65536)
        remaining = client.greeted_at + self.negotiate_timeout - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(reader.read(65536), remaining)
        except TimeoutError:
            client.log.info("no qmp_capabilities within %g s; disconnecting", self.negotiate_timeout)
            client.send_now(error_reply(
                f"no qmp_capabilities within {self.negotiate_timeout:g} s; closing the connection"))
            client.finish()
            return None

    async def _read_loop(self, client: Connection, reader: asyncio.StreamReader) -> None:
        framer = Framer()
        while not client.closing:
            try:
                data = await self._read(client, reader)
            except (ConnectionError, OSError) as exc:
                client.log.debug("read failed: %s", exc)
                return
            if data is None:
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

    def _too_big(self, client: Connection) -> None:
        client.log.warning("request larger than %d bytes; disconnecting", self.max_request)
        client.send_now(error_reply(f"request exceeds {self.max_request} bytes; closing the connection"))
        client.finish()

    async def _handle_text(self, client: Connection, text: bytes) -> None:
        msg_id: Any = None
        has_id = False
        client.busy = True
        client.last_active = time.monotonic()
        try:
            try:
                request = decode(text)
                if isinstance(request, dict) and "id" in request:
                    msg_id, has_id = request["id"], True
                command, arguments = parse_request(request)
                reply = {"return": await self._dispatch(client, command, arguments)}
            except RequestError as exc:
                reply = error_reply(exc.desc, exc.error_class)
            if has_id:
                reply["id"] = msg_id
            try:
                await client.reply(reply)
            except (TypeError, ValueError) as exc:
                client.log.error("reply not serialisable: %s", exc)
                await client.reply(error_reply(f"internal error: reply not serialisable: {exc}",
                                               msg_id=msg_id, has_id=has_id))
        finally:
            client.busy = False

    async def _dispatch(self, client: Connection, command: str, arguments: dict[str, Any]) -> Any:
        if client.state is State.GREETED and command != "qmp_capabilities":
            # monitor/qmp.c, qmp_dispatch with the capabilities-only command list
            raise RequestError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
        if command not in self._served:
            raise RequestError(f"The command {printable(command)} has not been found", "CommandNotFound")
        args = validate_arguments(command, arguments)
        if command == "qmp_capabilities":
            if client.state is State.NEGOTIATED:
                # monitor/qmp-cmds-control.c, qmp_qmp_capabilities
                raise RequestError("Capabilities negotiation is already complete, command ignored",
                                   "CommandNotFound")
            enable = args.enable if isinstance(args, QmpCapabilities) else []
            if enable:
                # We offer no capability (no "oob"), so any is unknown.
                raise RequestError(f"Parameter 'enable' does not accept value '{printable(enable[0])}'")
            client.state = State.NEGOTIATED
            return {}
        if command == "query-commands":
            return [{"name": name} for name in self._served]
        return await self._call_backend(client, command, args.model_dump())

    async def _call_backend(self, client: Connection, command: str, kwargs: dict[str, Any]) -> Any:
        """
        Run one backend method in its own task, shielded: if the client
        disconnects or the server closes meanwhile, the command still runs to
        its end (a reset cycle must not stop halfway) and close() waits for it.
        """
        method = getattr(self.backend, str(COMMANDS[command].method))
        task: asyncio.Task[Any] = asyncio.ensure_future(method(**kwargs))
        task.set_name(f"qreset.control[{client.ident}].{command}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except QResetError as exc:
            raise RequestError(one_line(str(exc))) from None
        except Exception as exc:
            client.log.debug("%s failed", command, exc_info=True)
            client.log.error("%s failed: %s: %s", command, type(exc).__name__, one_line(str(exc)))
            raise RequestError(one_line(f"internal error: {type(exc).__name__}: {exc}")) from None
