"""
Work the daemon did per QMP message for nothing (found in ``bench.scale``'s
py-spy profile, see README "Benchmarks"): counted, not timed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from qemu.qmp.message import Message

from qreset import qmp_events
from qreset.control import ControlServer
from tests.control_helpers import FakeBackend, sockdir

__all__ = ["sockdir"]  # a fixture (tests/control_helpers.py)


@pytest.mark.parametrize("debug", [False, True])
async def test_a_daemon_client_formats_messages_only_to_log_them(
        sockdir: Path, debug: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    qemu.qmp pretty-prints (json.dumps indent=2, pure Python) every message it
    sends or receives for a debug line, logged or not: 16% of the daemon's CPU.
    """
    formatted: list[Message] = []
    plain = Message.__str__

    def counting(msg: Message) -> str:
        formatted.append(msg)
        return plain(msg)

    monkeypatch.setattr(Message, "__str__", counting)
    qmp_log = logging.getLogger("qemu.qmp")
    level = qmp_log.level
    qmp_log.setLevel(logging.DEBUG if debug else logging.INFO)  # setLevel: clears the cache
    try:
        async with ControlServer(sockdir / "c.sock", FakeBackend()) as srv:
            qmp = qmp_events.client("test")
            await qmp.connect(str(srv.path))
            try:
                for _ in range(5):
                    await qmp.execute("query-status")
            finally:
                await qmp.disconnect()
    finally:
        qmp_log.setLevel(level)
    if debug:  # the debug lines are still there when asked for
        assert len(formatted) >= 10
    else:
        assert formatted == []
