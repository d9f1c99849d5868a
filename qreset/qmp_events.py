"""
QMP clients and event listeners for long-lived connections: they keep no
event they have delivered and format no message nobody logs.

A daemon holds one QMP connection per VM for as long as the VM runs (weeks),
and qemu.qmp keeps every event it ever received on such a connection, twice
(qemu.qmp 0.0.6, the version constraints.txt pins, ``qemu/qmp/events.py``):

- ``EventListener.put`` appends each accepted event to ``_history`` ("a
  historical record", never trimmed, kept across ``clear()``) before
  queueing it, so even a listener whose queue is always read grows by every
  event it hears;
- ``Events.__init__`` registers a default all-events listener on every
  client (``client.events``) whose *queue* nobody here reads: it fills with
  every event of the connection.

Measured with :mod:`bench.memgrowth` (8 guests, a simulated host): 8
``Message`` objects, ~6.6 KB of the daemon's ~8.6 KB of traced growth per
reset cycle, came from these two. :func:`quiet` makes the default
listener accept nothing and :class:`Listener` queues without a history; what a consumer has
read is then garbage as soon as it is done with it.

qemu.qmp also pretty-prints every message it sends or receives
(``AsyncProtocol._cb_outbound``/``_cb_inbound``: ``logger.debug("--> %s",
str(msg))``, where ``str`` is ``json.dumps(indent=2)``, the pure-Python
encoder) whether or not DEBUG is on: 16% of the daemon's CPU in a py-spy
profile of ``bench.scale`` (256 guests, 64 at once). :class:`QuietClient`
overrides those two hooks (documented for subclasses to override) to format
only when the line would be logged.
"""

from __future__ import annotations

import logging

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.message import Message

__all__ = ["Listener", "QuietClient", "client", "quiet"]


class QuietClient(QMPClient):
    """A :class:`~qemu.qmp.QMPClient` that formats a message only to log it."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_outbound(msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_inbound(msg)
        return msg


class Listener(EventListener):
    """
    An :class:`~qemu.qmp.EventListener` without its unbounded history: an event
    is queued for the consumer and nothing else keeps it (``history`` stays
    empty; qreset reads events from the queue only).
    """

    async def put(self, event: Message) -> None:
        # EventListener.put minus ``self._history.append(event)`` (qemu.qmp 0.0.6).
        if self.accept(event):
            await self._queue.put(event)


def client(name: str) -> QMPClient:
    """A new :class:`QuietClient` made :func:`quiet`."""
    return quiet(QuietClient(name))


def quiet(qmp: QMPClient) -> QMPClient:
    """
    Make ``qmp``'s default all-events listener (``qmp.events``) take no event,
    for connections that register their own :class:`Listener` (or want none):
    unread, the default one queues every event forever, and read, it still
    keeps each in its history.
    """
    # qemu.qmp refuses to remove its default listener (remove_listener raises
    # ListenerError), but its filter is public and runtime-configurable: accepting
    # nothing, it neither queues nor records.
    qmp.events.event_filter = _nothing
    return qmp


def _nothing(_event: Message) -> bool:
    return False
