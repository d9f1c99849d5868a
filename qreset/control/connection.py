"""
One client connection of the control socket: its protocol state and its
output, with replies and events accounted apart.

Why apart: a client asks for its replies and reads them, however large
(a page of ``query-resets`` is MiBs); events arrive whether it reads or
not. Counting both as one backlog dropped a client in the middle of the
reply it was reading, as soon as any event came (issue 10, item 7). So:

- a **reply** is written and then awaited (``drain()``): the connection's
  reader task, which executes that client's requests in order, waits until
  the kernel took most of it. The client's pace is the only limit; a client
  that stops reading its own reply for :attr:`reply_timeout` seconds is
  dropped, so it cannot hold a slot forever.
- an **event** is never awaited (:meth:`push_event` runs in the emitter's
  context and must not block the daemon): it goes into the transport's
  buffer, and the bytes of events still buffered are bounded by
  ``max_backlog``. Past it, the client does not keep up and is dropped.

The transport's buffer is one FIFO holding both; since bytes leave it in
order, the cumulative count of bytes written and the ranges of the replies
tell how much of what is still buffered is events.

Run states (explicit, as ``qemu.qmp``'s ``Runstate``): ``GREETED`` (greeting
sent, waiting for ``qmp_capabilities``) → ``NEGOTIATED`` (commands and
events) → ``CLOSING``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from qreset.control.framing import encode

logger = logging.getLogger("qreset.control")

__all__ = ["Connection", "State"]


class ClientLog(logging.LoggerAdapter[logging.Logger]):
    """
    The control logger with the client's number in front of each message. Not a
    child logger per client (``getChild(f"client{n}")``): logging keeps every
    logger ever named in its manager for the life of the process, so each
    connection (a ``qreset status``, a hook call) left one behind, ~1 KB
    (bench.memgrowth with ``--status-every``).
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"client{(self.extra or {}).get('client')}: {msg}", kwargs


class State(enum.Enum):
    GREETED = "greeted"
    NEGOTIATED = "negotiated"
    CLOSING = "closing"


class Connection:
    """
    One client. ``max_backlog``: bytes of events waiting for this client
    before it is dropped; ``reply_timeout``: seconds a reply may wait for the
    client to read it.
    """

    def __init__(self, ident: int, writer: asyncio.StreamWriter, *, max_backlog: int,
                 reply_timeout: float) -> None:
        self.ident = ident
        self.writer = writer
        self.state = State.GREETED
        self.max_backlog = max_backlog
        self.reply_timeout = reply_timeout
        self.log = ClientLog(logger, {"client": ident})
        self.reader_task: asyncio.Task[None] | None = None
        #: True while the reader task is in its read loop (and may be cancelled to stop it).
        self.reading = False
        #: monotonic time of the greeting (the negotiation deadline counts from it).
        self.greeted_at = time.monotonic()
        #: monotonic time of the last request or reply: the eviction order when the server is full.
        self.last_active = self.greeted_at
        #: A request of this client is being executed (such a client is never evicted).
        self.busy = False
        self._written = 0  # bytes handed to the transport, cumulative
        self._replies: deque[tuple[int, int]] = deque()  # [start, end) of replies maybe still buffered

    @property
    def closing(self) -> bool:
        return self.state is State.CLOSING

    # -- output --------------------------------------------------------------

    def _usable(self) -> bool:
        if self.state is State.CLOSING:
            return False
        if self.writer.transport.is_closing():  # the peer went away; the reader will see EOF
            self.state = State.CLOSING
            return False
        return True

    def _write(self, data: bytes, *, reply: bool) -> None:
        start = self._written
        self.writer.transport.write(data)
        self._written += len(data)
        if reply:
            self._replies.append((start, self._written))

    def event_backlog(self) -> int:
        """Bytes of events written and not yet taken by the kernel (replies excluded)."""
        buffered = self.writer.transport.get_write_buffer_size()
        sent = self._written - buffered
        while self._replies and self._replies[0][1] <= sent:
            self._replies.popleft()
        replies = sum(end - max(start, sent) for start, end in self._replies)
        return max(0, buffered - replies)

    def push_event(self, data: bytes) -> bool:
        """Queue an encoded event; False (and the client is dropped) when its event backlog is full."""
        if not self._usable():
            return False
        backlog = self.event_backlog()
        if backlog > self.max_backlog:
            self.log.warning("client does not read its events (%d bytes waiting); dropping it", backlog)
            self.drop()
            return False
        self._write(data, reply=False)
        return True

    def send_now(self, msg: Mapping[str, Any]) -> None:
        """
        Write a message without waiting for it to be read: the greeting, or a
        last error before :meth:`finish`. Raises TypeError/ValueError if it is
        not JSON.
        """
        data = encode(msg)
        if self._usable():
            self._write(data, reply=True)

    async def reply(self, msg: Mapping[str, Any]) -> None:
        """
        Send a reply and wait until the client has taken most of it. Raises
        TypeError/ValueError (before sending anything) if it is not JSON.
        """
        data = encode(msg)
        if not self._usable():
            return
        self._write(data, reply=True)
        try:
            await asyncio.wait_for(self.writer.drain(), self.reply_timeout)
        except TimeoutError:
            self.log.warning("client did not read its reply within %g s; dropping it", self.reply_timeout)
            self.drop()
        except (ConnectionError, OSError):
            self.state = State.CLOSING  # gone; the reader sees EOF
        self.last_active = time.monotonic()

    # -- closing -------------------------------------------------------------

    def stop_reader(self) -> None:
        if self.reading and self.reader_task is not None and self.reader_task is not asyncio.current_task():
            self.reader_task.cancel()

    def finish(self) -> None:
        """Close after what is buffered has been sent (orderly end, e.g. after a final error)."""
        self.state = State.CLOSING
        self.writer.close()

    def drop(self) -> None:
        """Close now, discarding what is buffered (a slow or abusive client)."""
        self.state = State.CLOSING
        self.writer.transport.abort()  # also cuts short a flushing close(); no-op once closed
        self.stop_reader()
