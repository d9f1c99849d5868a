"""
Who gets into the control server: the peer's uid (:mod:`qreset.control.access`)
and room. When ``max_clients`` are connected a newcomer evicts the
longest-idle client (un-negotiated ones first; never one whose command is
running), so leaked or hostile idle connections cannot keep the libvirt hook
out (issue 10, item 8). Split from :mod:`qreset.control.server`, which calls
:func:`admit` for each connection.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from qreset.control.access import peer_allowed, peer_credentials
from qreset.control.connection import Connection, State
from qreset.control.framing import encode, error_reply


def event_message(event: str, data: dict[str, Any]) -> dict[str, Any]:
    """A QMP event message stamped now (``timestamp``: seconds and microseconds, as QEMU)."""
    now = time.time()
    seconds = int(now)
    return {
        "event": event,
        "data": data,
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
    }


def admit(client: Connection, clients: Collection[Connection], *, check_uid: bool, own_uid: int,
          max_clients: int) -> bool:
    """Peer-uid check and room; on refusal the error is sent and the client finished."""
    sock = client.writer.get_extra_info("socket")
    peer = "unknown"
    if sock is not None:
        try:
            pid, uid, _gid = peer_credentials(sock)
        except OSError as exc:
            client.log.warning("cannot read peer credentials: %s", exc)
            client.send_now(error_reply("permission denied: peer credentials unavailable"))
            return False
        peer = f"pid {pid} uid {uid}"
        if check_uid and not peer_allowed(uid, own_uid):
            client.log.warning("refusing %s: only root and uid %d may connect", peer, own_uid)
            client.send_now(error_reply(f"permission denied: uid {uid} may not use this socket"))
            return False
    if sum(1 for c in clients if not c.closing) > max_clients \
            and not evict_one(clients, client, max_clients):
        client.log.warning("refusing %s: %d clients already connected, all busy",
                           peer, max_clients)
        client.send_now(error_reply(f"too many clients (limit {max_clients})"))
        return False
    client.log.debug("connected: %s", peer)
    return True


def evict_one(clients: Collection[Connection], newcomer: Connection, max_clients: int) -> bool:
    """
    Make room: close the longest-idle client that is not running a
    command, un-negotiated ones first (a QMP client negotiates at once;
    one that has not is leaked or hostile). False if every client is busy.
    """
    idle = [c for c in clients
            if c is not newcomer and not c.closing and not c.busy]
    if not idle:
        return False
    victim = min(idle, key=lambda c: (c.state is State.NEGOTIATED, c.last_active))
    victim.log.warning("evicted (%s, idle %.0f s): %d clients connected, a new one came",
                       victim.state.value, time.monotonic() - victim.last_active, max_clients)
    why = (f"the server is full (limit {max_clients}) and this connection was "
           "the longest idle; closing it")
    if victim.state is State.NEGOTIATED:
        # An event, not an id-less error: a QMP client takes an error without an id
        # for a server parse failure. It then sees the connection close.
        victim.push_event(encode(event_message("QRESET_CLIENT_EVICTED", {"reason": why})))
    else:
        victim.send_now(error_reply(why))
    victim.finish()
    return True
