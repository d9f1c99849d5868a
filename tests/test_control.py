"""
The control socket, over a real unix socket, with real QMP clients:
``qemu.qmp``'s QMPClient, raw sockets (for what a well-behaved client never
sends) and ``qmp-shell`` as a subprocess.

The backend is an in-memory object implementing ControlBackend: it is the
server's collaborator (the daemon), recording what it was asked, not a stand-in
for anything the server itself does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from qreset.control import (
    COMMANDS,
    OPTIONAL_COMMANDS,
    ControlBackend,
    ControlError,
    ControlServer,
    Framer,
    peer_allowed,
)
from qreset.errors import QResetError
from tests.control_helpers import FakeBackend, backend, sockdir

__all__ = ["backend", "sockdir"]  # fixtures from tests/control_helpers.py

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
async def server(sockdir: Path, backend: FakeBackend) -> AsyncIterator[ControlServer]:
    srv = ControlServer(sockdir / "c.sock", backend, max_request=4096, max_buffer=64 * 1024)
    await srv.start()
    yield srv
    await srv.close()


@contextlib.asynccontextmanager
async def qmp_client(path: Path) -> AsyncIterator[QMPClient]:
    qmp = QMPClient("test")
    await qmp.connect(str(path))
    try:
        yield qmp
    finally:
        await qmp.disconnect()


class Raw:
    """A raw line-reading client, for the bytes a QMPClient would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> Raw:
        r, w = await asyncio.open_unix_connection(str(path), limit=1 << 20)
        return cls(r, w)

    async def send(self, data: bytes | dict[str, Any]) -> None:
        self.writer.write(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")
        await self.writer.drain()

    async def recv(self) -> dict[str, Any] | None:
        line = await asyncio.wait_for(self.reader.readline(), 5)
        if not line:
            return None
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    async def negotiate(self) -> None:
        greeting = await self.recv()
        assert greeting is not None
        assert "QMP" in greeting
        await self.send({"execute": "qmp_capabilities"})
        assert await self.recv() == {"return": {}}

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def test_fake_backend_satisfies_protocol() -> None:
    assert isinstance(FakeBackend(), ControlBackend)


# ---------------------------------------------------------------- protocol


async def test_greeting_and_negotiation(server: ControlServer) -> None:
    raw = await Raw.open(server.path)
    greeting = await raw.recv()
    assert greeting == {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 1, "major": 0}, "package": "qreset 0.1.0"},
            "capabilities": [],
        }
    }
    await raw.send({"execute": "query-vms", "id": "early"})
    assert await raw.recv() == {
        "error": {"class": "CommandNotFound",
                  "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
        "id": "early",
    }
    await raw.send({"execute": "qmp_capabilities", "id": 7})
    assert await raw.recv() == {"return": {}, "id": 7}
    await raw.send({"execute": "qmp_capabilities", "arguments": {}})
    reply = await raw.recv()
    assert reply is not None
    assert reply["error"]["class"] == "CommandNotFound"
    await raw.send({"execute": "query-status", "id": [1, {"a": None}]})
    assert await raw.recv() == {"return": {"version": "0.1.0", "vms": 1, "resets": 0}, "id": [1, {"a": None}]}
    await raw.close()


async def test_commands_through_qmpclient(server: ControlServer, backend: FakeBackend) -> None:
    async with qmp_client(server.path) as qmp:
        assert qmp.greeting is not None
        names = [c["name"] for c in await qmp.execute("query-commands")]  # type: ignore[attr-defined]
        assert sorted(names) == sorted(set(COMMANDS) - set(OPTIONAL_COMMANDS))
        assert "reset-vm" in names
        assert "qmp_capabilities" in names
        assert await qmp.execute("query-vms") == [
            {"name": "vm1", "state": "running", "devices": ["0000:01:00.0"]}
        ]
        assert await qmp.execute("query-devices") == [{"address": "0000:01:00.0", "vm": "vm1"}]
        await qmp.execute("query-devices", {"vm": "vm2"})
        await qmp.execute("query-plan", {"vm": "vm1"})
        assert len((await qmp.execute("query-resets"))["resets"]) == 3  # type: ignore[index]
        page = await qmp.execute("query-resets", {"vm": "vm1", "limit": 2, "before": "1.5/c", "since": 1,
                                                  "until": 2.5})
        assert page == {"resets": [{"vm": "vm1", "ok": True, "n": 0}, {"vm": "vm1", "ok": True, "n": 1}],
                        "next": None}
        assert await qmp.execute("reset-vm", {"vm": "vm1"}) == {"vm": "vm1", "ok": True}
        await qmp.execute("add-vm", {"name": "g", "qmp": "/run/g.qmp"})
        await qmp.execute("add-vm", {"name": "h", "qmp": "/run/h.qmp", "devices": ["0000:02:00.0"],
                                     "mode": "sbr"})
        assert await qmp.execute("remove-vm", {"name": "g"}) == {"name": "g", "released": False}
        await qmp.execute("remove-vm", {"name": "h", "release": True})
        await qmp.execute("doctor")
        await qmp.execute("doctor", {"functions": ["0000:01:00.0"]})
        await qmp.execute("query-status")
    assert backend.calls == [
        ("query_vms", ()),
        ("query_devices", (None,)),
        ("query_devices", ("vm2",)),
        ("query_plan", ("vm1",)),
        ("query_resets", (None, 20, None, None, None)),
        ("query_resets", ("vm1", 2, "1.5/c", 1.0, 2.5)),
        ("reset_vm", ("vm1",)),
        ("add_vm", ("g", "/run/g.qmp", [], None)),
        ("add_vm", ("h", "/run/h.qmp", ["0000:02:00.0"], "sbr")),
        ("remove_vm", ("g", False)),
        ("remove_vm", ("h", True)),
        ("doctor", ([],)),
        ("doctor", (["0000:01:00.0"],)),
        ("query_status", ()),
    ]
    assert backend.type_violations == []


@pytest.mark.parametrize(
    ("command", "arguments", "desc"),
    [
        ("query-plan", {}, "query-plan: Parameter 'vm' is missing"),
        ("query-plan", {"vm": 3}, "query-plan: Invalid parameter type for 'vm', expected: string"),
        ("query-plan", {"vm": None}, "query-plan: Invalid parameter type for 'vm', expected: string"),
        ("query-plan", {"vm": "a", "force": True}, "query-plan: Parameter 'force' is unexpected"),
        ("query-resets", {"limit": "5"},
         "query-resets: Invalid parameter type for 'limit', expected: integer"),
        ("query-resets", {"limit": True},
         "query-resets: Invalid parameter type for 'limit', expected: integer"),
        ("query-resets", {"limit": 1.5},
         "query-resets: Invalid parameter type for 'limit', expected: integer"),
        ("query-resets", {"limit": 0}, "query-resets: Parameter 'limit' must be between 1 and 1000"),
        ("query-resets", {"limit": 1001}, "query-resets: Parameter 'limit' must be between 1 and 1000"),
        ("query-resets", {"since": "10m"},
         "query-resets: Invalid parameter type for 'since', expected: number"),
        ("query-resets", {"until": False},
         "query-resets: Invalid parameter type for 'until', expected: number"),
        ("query-resets", {"before": 5},
         "query-resets: Invalid parameter type for 'before', expected: string"),
        ("query-resets", {"vm": None}, "query-resets: Invalid parameter type for 'vm', expected: string"),
        ("add-vm", {"name": "x"}, "add-vm: Parameter 'qmp' is missing"),
        ("add-vm", {"name": "x", "qmp": "q", "devices": "0000:01:00.0"},
         "add-vm: Invalid parameter type for 'devices', expected: array of strings"),
        ("add-vm", {"name": "x", "qmp": "q", "devices": [1]},
         "add-vm: Invalid parameter type for 'devices', expected: array of strings"),
        ("remove-vm", {"name": "x", "release": "yes"},
         "remove-vm: Invalid parameter type for 'release', expected: boolean"),
        ("remove-vm", {"name": "x", "release": 1},
         "remove-vm: Invalid parameter type for 'release', expected: boolean"),
        ("doctor", {"functions": [None]},
         "doctor: Invalid parameter type for 'functions', expected: array of strings"),
        ("query-vms", {"vm": "x"}, "query-vms: Parameter 'vm' is unexpected"),
    ],
)
async def test_argument_validation(
    server: ControlServer, backend: FakeBackend, command: str, arguments: dict[str, Any], desc: str,
) -> None:
    async with qmp_client(server.path) as qmp:
        with pytest.raises(ExecuteError) as info:
            await qmp.execute(command, arguments)
        assert info.value.error_class == "GenericError"
        assert info.value.error.error.desc == desc
        # The connection is still usable.
        assert await qmp.execute("query-status") == {"version": "0.1.0", "vms": 1, "resets": 0}
    assert [c[0] for c in backend.calls] == ["query_status"]


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b'{"execute": "query-vms", "id": 1, "oob": 1}',
         "QMP input member 'oob' is unexpected"),
        (b'{"execute": 5, "id": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "query-vms", "arguments": [], "id": 1}',
         "QMP input member 'arguments' must be an object"),
        (b'{"arguments": {}, "id": 1}', "QMP input lacks member 'execute'"),
    ],
)
async def test_malformed_envelope_keeps_id(server: ControlServer, data: bytes, desc: str) -> None:
    raw = await Raw.open(server.path)
    await raw.negotiate()
    await raw.send(data + b"\n")
    assert await raw.recv() == {"error": {"class": "GenericError", "desc": desc}, "id": 1}
    await raw.close()


@pytest.mark.parametrize(
    ("data", "desc_start"),
    [
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b'"query-vms"', "QMP input must be a JSON object"),
        (b"nonsense", "JSON parse error"),
        (b'{"execute": }', "JSON parse error"),
        (b'{"execute": "query-vms", "execute": "query-status"}', "JSON parse error, duplicate key"),
        (b'{"execute": "query-resets", "arguments": {"limit": NaN}}', "JSON parse error"),
        (b'{"execute": "\xff\xfe"}', "JSON parse error"),
        (b"[" * 1900 + b"]" * 1900, "JSON parse error, nesting too deep"),
        (b"}", "JSON parse error"),
    ],
)
async def test_malformed_json_gets_error_and_connection_survives(
    server: ControlServer, data: bytes, desc_start: str,
) -> None:
    raw = await Raw.open(server.path)
    await raw.negotiate()
    await raw.send(data + b"\n")
    reply = await raw.recv()
    assert reply is not None
    assert "id" not in reply
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(desc_start), reply
    await raw.send({"execute": "query-status", "id": "after"})
    reply = await raw.recv()
    assert reply is not None
    assert reply["id"] == "after"
    assert "return" in reply
    await raw.close()


async def test_framing_back_to_back_and_split(server: ControlServer) -> None:
    """Objects back to back with or without whitespace, and split at every byte."""
    raw = await Raw.open(server.path)
    await raw.recv()
    stream = (b'{"execute":"qmp_capabilities","id":0}{"execute":"query-status","id":1}  \n\t'
              b'{"execute":"query-plan","arguments":{"vm":"a \\" } ] { b"},"id":2}\r\n'
              b'{"execute":"query-devices","id":3}')
    for i in range(len(stream)):
        await raw.send(stream[i:i + 1])
    ids = []
    for _ in range(4):
        reply = await raw.recv()
        assert reply is not None
        assert "return" in reply, reply
        ids.append(reply["id"])
    assert ids == [0, 1, 2, 3]
    await raw.close()


def test_framer_unit() -> None:
    f = Framer()
    assert f.feed(b' {"a": "}"} 12 [1,[2]]{"b') == [b'{"a": "}"}', b"12", b"[1,[2]]"]
    assert f.pending == 3
    assert f.feed(b'": 1}') == [b'{"b": 1}']
    assert f.pending == 0
    assert f.feed(b"tru") == []
    assert f.flush() == b"tru"


async def test_oversized_request_is_refused_and_disconnected(server: ControlServer) -> None:
    # An object that never ends: refused once it passes max_request (4096 here).
    raw = await Raw.open(server.path)
    await raw.negotiate()
    await raw.send(b'{"execute": "query-plan", "arguments": {"vm": "' + b"x" * 8000)
    reply = await raw.recv()
    assert reply == {"error": {"class": "GenericError",
                               "desc": "request exceeds 4096 bytes; closing the connection"}}
    assert await raw.recv() is None  # disconnected
    await raw.close()
    # A complete object that is too large, in one write.
    raw = await Raw.open(server.path)
    await raw.negotiate()
    await raw.send(json.dumps({"execute": "query-plan", "arguments": {"vm": "y" * 5000}}).encode())
    reply = await raw.recv()
    assert reply is not None
    assert reply["error"]["desc"].startswith("request exceeds")
    assert await raw.recv() is None
    await raw.close()
    # Whitespace between objects does not count, and the server still serves.
    raw = await Raw.open(server.path)
    await raw.negotiate()
    await raw.send(b" \n" * 5000 + b'{"execute": "query-status", "id": 1}')
    reply = await raw.recv()
    assert reply is not None
    assert reply["id"] == 1
    assert "return" in reply
    await raw.close()


class CheckingBackend(FakeBackend):
    async def check_devices(self, name: str, devices: list[str]) -> dict[str, Any]:
        self._record("check_devices", name, devices)
        return {"safe": not devices, "reasons": [f"{d} shares a bus with vm1" for d in devices]}


async def test_optional_check_devices(sockdir: Path) -> None:
    """check-devices (the libvirt hook's question) is served only by a backend that has it."""
    async with ControlServer(sockdir / "k.sock", CheckingBackend()) as srv, qmp_client(srv.path) as qmp:
        names = [c["name"] for c in await qmp.execute("query-commands")]  # type: ignore[attr-defined]
        assert "check-devices" in names
        assert await qmp.execute("check-devices", {"name": "g", "devices": ["0000:02:00.0"]}) == {
            "safe": False, "reasons": ["0000:02:00.0 shares a bus with vm1"],
        }
        with pytest.raises(ExecuteError, match="Parameter 'devices' is missing"):
            await qmp.execute("check-devices", {"name": "g"})
    async with ControlServer(sockdir / "l.sock", FakeBackend()) as srv, qmp_client(srv.path) as qmp:
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("check-devices", {"name": "g", "devices": []})
        assert info.value.error_class == "CommandNotFound"


# ---------------------------------------------------------------- backend errors


async def test_backend_errors_become_one_line_generic_errors(
    server: ControlServer, backend: FakeBackend, caplog: pytest.LogCaptureFixture,
) -> None:
    async with qmp_client(server.path) as qmp:
        backend.fail = QResetError("reset of vm1 would hit 0000:01:00.1 owned by vm2")
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("reset-vm", {"vm": "vm1"})
        assert info.value.error.error.desc == "reset of vm1 would hit 0000:01:00.1 owned by vm2"
        backend.fail = KeyError("multi\nline")
        with caplog.at_level("DEBUG", logger="qreset.control"), pytest.raises(ExecuteError) as info:
            await qmp.execute("query-vms")
        assert info.value.error.error.desc == "internal error: KeyError: 'multi\\nline'"
        assert any(r.exc_info for r in caplog.records), "traceback logged at DEBUG"
        backend.fail = None
        assert await qmp.execute("query-status") == {"version": "0.1.0", "vms": 1, "resets": 0}


async def test_unserialisable_reply_is_an_error(server: ControlServer, backend: FakeBackend) -> None:
    async def bad_status() -> dict[str, Any]:
        return {"load": float("nan")}

    backend.query_status = bad_status  # type: ignore[method-assign]
    async with qmp_client(server.path) as qmp:
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("query-status")
        assert info.value.error.error.desc.startswith("internal error: reply not serialisable")
        assert len(await qmp.execute("query-vms")) == 1  # type: ignore[arg-type]


async def test_command_survives_client_disconnect_and_close_waits(
    server: ControlServer, backend: FakeBackend,
) -> None:
    backend.reset_gate = asyncio.Event()
    raw = await Raw.open(server.path)
    await raw.negotiate()
    await raw.send({"execute": "reset-vm", "arguments": {"vm": "vm1"}})
    for _ in range(100):
        if backend.calls:
            break
        await asyncio.sleep(0.01)
    await raw.close()
    await asyncio.sleep(0.05)
    assert backend.reset_done == []
    closing = asyncio.create_task(server.close())
    await asyncio.sleep(0.05)
    assert not closing.done(), "close() waits for the running reset"
    backend.reset_gate.set()
    await asyncio.wait_for(closing, 5)
    assert backend.reset_done == ["vm1"]
    assert not server.path.exists()


# ---------------------------------------------------------------- events


async def test_events_reach_negotiated_clients_only(server: ControlServer) -> None:
    raw = await Raw.open(server.path)
    await raw.recv()  # greeting, not negotiated
    async with qmp_client(server.path) as qmp:
        with qmp.listener(("RESET_DONE",)) as listener:
            before = time.time()
            server.emit("RESET_DONE", {"vm": "vm1", "ok": True})
            event = await asyncio.wait_for(listener.get(), 5)
        assert event["event"] == "RESET_DONE"
        assert event["data"] == {"vm": "vm1", "ok": True}
        ts = event["timestamp"]
        assert isinstance(ts, dict)
        assert 0 <= ts["microseconds"] < 1_000_000
        assert before - 1 <= ts["seconds"] + ts["microseconds"] / 1e6 <= time.time() + 1
        # Replies and events interleave on one connection.
        assert await qmp.execute("query-status") == {"version": "0.1.0", "vms": 1, "resets": 0}
    # The un-negotiated client got nothing but can still negotiate and work.
    await raw.send({"execute": "qmp_capabilities", "id": "n"})
    assert await raw.recv() == {"return": {}, "id": "n"}
    await raw.close()


async def test_slow_client_is_dropped_without_blocking(server: ControlServer) -> None:
    slow = await Raw.open(server.path)
    await slow.negotiate()  # then never reads again
    async with qmp_client(server.path) as fast:
        with fast.listener(("BIG",)) as listener:
            assert server.clients == 2
            payload = {"blob": "z" * 30_000}
            worst = 0.0
            received = 0
            for i in range(200):
                t0 = time.perf_counter()
                server.emit("BIG", {**payload, "i": i})
                worst = max(worst, time.perf_counter() - t0)
                # The fast client keeps up.
                event = await asyncio.wait_for(listener.get(), 5)
                assert isinstance(event["data"], dict)
                assert event["data"]["i"] == i
                received += 1
            assert received == 200
            # emit() is synchronous: had it waited for the slow reader, the loop would
            # have stalled and the fast client's wait_for above timed out. The bound
            # only flags a pathological copy; it is loose so a loaded host cannot trip it.
            assert worst < 1.0, f"emit blocked for {worst:.3f} s"
            for _ in range(100):
                if server.clients == 1:
                    break
                await asyncio.sleep(0.01)
            assert server.clients == 1, "the slow client was dropped"
            assert await fast.execute("query-vms")
    await slow.close()


class BigBackend(FakeBackend):
    async def query_resets(self, vm: str | None, limit: int, before: str | None,
                           since: float | None, until: float | None) -> dict[str, Any]:
        self._record("query_resets", vm, limit, before, since, until)
        return {"resets": [{"n": i, "report": "r" * 10_000} for i in range(limit)], "next": None}


async def test_large_reply_is_not_the_clients_backlog(sockdir: Path) -> None:
    """
    A reply the client asked for and has not read yet is not a backlog of
    unread events: events emitted meanwhile do not get the client dropped
    (issue 10, item 7), and the client gets the whole reply, then the events.
    """
    backend = BigBackend()
    async with ControlServer(sockdir / "big.sock", backend, max_buffer=64 * 1024) as server:
        raw = Raw(*await asyncio.open_unix_connection(str(server.path), limit=16 << 20))
        await raw.negotiate()
        await raw.send({"execute": "query-resets", "arguments": {"limit": 500}, "id": 1})  # ~5 MB
        for _ in range(500):
            if backend.calls:
                break
            await asyncio.sleep(0.01)
        for _ in range(20):
            await asyncio.sleep(0)  # the reply is written; the client has read none of it
        for i in range(10):
            server.emit("TICK", {"i": i})
        reply = await raw.recv()
        assert reply is not None
        assert reply["id"] == 1
        assert len(reply["return"]["resets"]) == 500
        assert [(await raw.recv() or {}).get("data") for _ in range(10)] == [{"i": i} for i in range(10)]
        assert server.clients == 1
        await raw.close()


async def test_event_burst_reaches_a_client_that_reads(sockdir: Path, backend: FakeBackend) -> None:
    """
    Many events in one loop iteration (the writer gets no turn in between):
    buffered for a reading client, not a reason to drop it, with the default
    backlog bound.
    """
    async with ControlServer(sockdir / "burst.sock", backend) as server, qmp_client(server.path) as qmp:
        with qmp.listener(("TICK",)) as listener:
            for i in range(3000):
                server.emit("TICK", {"i": i})
            got = [(await asyncio.wait_for(listener.get(), 5))["data"] for _ in range(3000)]
        assert got == [{"i": i} for i in range(3000)]
        assert server.clients == 1


def test_emit_with_unserialisable_data_does_not_raise(sockdir: Path, backend: FakeBackend) -> None:
    srv = ControlServer(sockdir / "x.sock", backend)
    srv.emit("X", {"bad": float("inf")})  # logged, not raised


# ---------------------------------------------------------------- access


def test_peer_allowed_decision() -> None:
    assert peer_allowed(0, 1000)
    assert peer_allowed(1000, 1000)
    assert not peer_allowed(1001, 1000)
    assert not peer_allowed(65534, 0)
    assert peer_allowed(0, 0)


async def test_socket_mode_is_0600_even_with_open_umask(sockdir: Path, backend: FakeBackend) -> None:
    old = os.umask(0)
    try:
        srv = ControlServer(sockdir / "sub" / "m.sock", backend)
        await srv.start()
    finally:
        os.umask(old)
    try:
        st_ = os.stat(srv.path)
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o600
        assert st_.st_uid == os.geteuid()
        assert os.umask(old) == old, "umask restored"
    finally:
        await srv.close()
    assert not srv.path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
async def test_other_uid_is_refused(sockdir: Path, backend: FakeBackend) -> None:
    """A real peer running as nobody: SO_PEERCRED says uid 65534, the server refuses."""
    srv = ControlServer(sockdir / "u.sock", backend)
    await srv.start()
    try:
        # Open the path so the connect() itself succeeds and the uid check is what refuses.
        os.chmod(sockdir, 0o755)
        os.chmod(srv.path, 0o666)
        code = (
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "sys.stdout.write(s.makefile('rb').read().decode())"
        )
        proc = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", "-c", code, str(srv.path), user=65534, group=65534,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err
        lines = out.decode().splitlines()
        assert [json.loads(x) for x in lines] == [
            {"error": {"class": "GenericError",
                       "desc": "permission denied: uid 65534 may not use this socket"}}
        ]
        assert backend.calls == []
        # root still gets in
        async with qmp_client(srv.path) as qmp:
            assert await qmp.execute("query-status")
    finally:
        await srv.close()


async def test_full_server_evicts_the_longest_idle_client(sockdir: Path, backend: FakeBackend) -> None:
    """A new client gets in when the server is full: the longest-idle one makes room."""
    srv = ControlServer(sockdir / "n.sock", backend, max_clients=2)
    await srv.start()
    try:
        old = QMPClient("old")
        await old.connect(str(srv.path))
        async with qmp_client(srv.path) as recent:
            with old.listener(("QRESET_CLIENT_EVICTED",)) as evicted:
                await recent.execute("query-status")  # recent is the more recently active
                async with qmp_client(srv.path) as newcomer:
                    assert await newcomer.execute("query-status")
                    event = await asyncio.wait_for(evicted.get(), 5)
                    data = event["data"]
                    assert isinstance(data, dict)
                    assert "the server is full (limit 2)" in data["reason"]
                    assert await recent.execute("query-status")
        with pytest.raises(EOFError):  # qemu.qmp reports the hang-up on disconnect
            await old.disconnect()
    finally:
        await srv.close()


async def test_full_server_of_busy_clients_refuses(sockdir: Path, backend: FakeBackend) -> None:
    """A client whose command runs (a reset cycle) is never evicted: the newcomer is refused."""
    backend.reset_gate = asyncio.Event()
    srv = ControlServer(sockdir / "b.sock", backend, max_clients=1)
    await srv.start()
    try:
        busy = await Raw.open(srv.path)
        await busy.negotiate()
        await busy.send({"execute": "reset-vm", "arguments": {"vm": "vm1"}, "id": 1})
        for _ in range(100):
            if backend.calls:
                break
            await asyncio.sleep(0.01)
        raw = await Raw.open(srv.path)
        assert await raw.recv() == {"error": {"class": "GenericError", "desc": "too many clients (limit 1)"}}
        assert await raw.recv() is None
        await raw.close()
        backend.reset_gate.set()
        assert await busy.recv() == {"return": {"vm": "vm1", "ok": True}, "id": 1}
        await busy.close()
    finally:
        await srv.close()


# ---------------------------------------------------------------- lifecycle


async def test_stale_socket_is_replaced_live_one_refused(sockdir: Path, backend: FakeBackend) -> None:
    path = sockdir / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    srv = ControlServer(path, backend)
    await srv.start()
    try:
        with pytest.raises(ControlError, match="another process is serving it"):
            await ControlServer(path, backend).start()
        async with qmp_client(path) as qmp:
            assert await qmp.execute("query-status")
    finally:
        await srv.close()
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await ControlServer(path, backend).start()


async def test_path_too_long(backend: FakeBackend) -> None:
    with pytest.raises(ControlError, match="path longer than 107 bytes"):
        await ControlServer("/tmp/" + "d" * 120 + "/c.sock", backend).start()


async def test_close_disconnects_clients(sockdir: Path, backend: FakeBackend) -> None:
    srv = ControlServer(sockdir / "c.sock", backend)
    await srv.start()
    raw = await Raw.open(srv.path)
    await raw.negotiate()
    await srv.close()
    assert await raw.recv() is None
    assert not srv.path.exists()
    await raw.close()
    await srv.close()  # idempotent


# ---------------------------------------------------------------- qmp-shell


async def test_qmp_shell(server: ControlServer, sockdir: Path) -> None:
    """The stock qmp-shell (shipped with qemu.qmp) drives the socket."""
    script = (
        "query-vms\n"
        "query-resets vm=vm1 limit=2\n"
        "query-plan\n"
        "reset-vm vm=vm1\n"
        "no-such-command\n"
    )
    env = {**os.environ, "HOME": str(sockdir)}  # qmp-shell writes ~/.qmp-shell_history
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "qmp-shell"), str(server.path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(script.encode()), 30)
    assert proc.returncode == 0, err
    text = out.decode()
    assert "Connected to QEMU 0.1.0" in text
    replies = [json.loads(line.split(") ", 1)[1]) for line in text.splitlines()
               if line.startswith("(QEMU) {")]
    assert replies == [
        {"return": [{"name": "vm1", "state": "running", "devices": ["0000:01:00.0"]}]},
        {"return": {"resets": [{"vm": "vm1", "ok": True, "n": 0}, {"vm": "vm1", "ok": True, "n": 1}],
                    "next": None}},
        {"error": {"class": "GenericError", "desc": "query-plan: Parameter 'vm' is missing"}},
        {"return": {"vm": "vm1", "ok": True}},
        {"error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}},
    ]


async def test_qmp_shell_pretty(server: ControlServer, sockdir: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "qmp-shell"), "-p", str(server.path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": str(sockdir)},
    )
    out, err = await asyncio.wait_for(proc.communicate(b"query-status\n"), 30)
    assert proc.returncode == 0, err
    body = out.decode().split("(QEMU) ", 1)[1].rsplit("(QEMU)", 1)[0]
    assert json.loads(body) == {"return": {"resets": 0, "version": "0.1.0", "vms": 1}}


# ---------------------------------------------------------------- fuzz


class _ThreadServer:
    """A ControlServer on its own event loop in a thread, for synchronous hypothesis tests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backend = FakeBackend()
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, self.backend, max_request=2048)
        self.thread = threading.Thread(target=self.loop.run_forever, name="control-fuzz", daemon=True)

    def __enter__(self) -> _ThreadServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[_ThreadServer]:
    d = Path(tempfile.mkdtemp(prefix="qrf", dir="/tmp"))
    with _ThreadServer(d / "f.sock") as srv:
        yield srv
    shutil.rmtree(d, ignore_errors=True)


def _exchange(path: Path, payload: bytes, negotiate: bool) -> list[dict[str, Any]]:
    """Send payload, half-close, read everything until the server hangs up."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        prefix = b'{"execute": "qmp_capabilities"}\n' if negotiate else b""
        s.sendall(prefix + payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    assert data.endswith(b"\n"), data[-200:]
    messages = [json.loads(line) for line in data.splitlines()]
    assert all(isinstance(m, dict) for m in messages)
    assert "QMP" in messages[0]
    for m in messages[1:]:
        assert set(m) <= {"return", "error", "id"}, m
        assert ("return" in m) != ("error" in m), m
        if "error" in m:
            assert isinstance(m["error"]["class"], str)
            assert isinstance(m["error"]["desc"], str)
            assert "\n" not in m["error"]["desc"]
    return messages[1:]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

arg_names = st.sampled_from(
    sorted({a for c in COMMANDS.values() for a in c.arguments.model_fields} | {"x", ""}))


def _typed_request(command: str) -> st.SearchStrategy[dict[str, Any]]:
    """A request naming only the command's own arguments, with values of any type."""
    own = dict.fromkeys(COMMANDS[command].arguments.model_fields, json_values)
    return st.fixed_dictionaries(
        {"execute": st.just(command), "arguments": st.fixed_dictionaries({}, optional=own)},
        optional={"id": json_values},
    )


targeted_requests = st.sampled_from(sorted(COMMANDS)).flatmap(_typed_request)

random_requests = st.fixed_dictionaries(
    {"execute": st.sampled_from([*sorted(COMMANDS), "quit", ""])},
    optional={
        "arguments": st.dictionaries(arg_names, json_values, max_size=4) | json_values,
        "id": json_values,
    },
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(payload=st.binary(max_size=3000), negotiate=st.booleans())
def test_fuzz_random_bytes(fuzz_server: _ThreadServer, payload: bytes, negotiate: bool) -> None:
    _exchange(fuzz_server.path, payload, negotiate)


@FUZZ
@given(value=json_values)
def test_fuzz_random_json(fuzz_server: _ThreadServer, value: Any) -> None:
    replies = _exchange(fuzz_server.path, json.dumps(value).encode() + b"\n", True)
    assert replies[0] == {"return": {}}
    if not isinstance(value, dict):
        assert len(replies) >= 2
        assert all("error" in r for r in replies[1:])


@FUZZ
@given(batch=st.lists(targeted_requests | random_requests, min_size=1, max_size=4))
def test_fuzz_requests_with_wrong_types(fuzz_server: _ThreadServer, batch: list[dict[str, Any]]) -> None:
    payload = b"".join(json.dumps(r).encode() + b" " for r in batch)
    replies = _exchange(fuzz_server.path, payload, True)[1:]
    if len(payload) <= fuzz_server.server.max_request:
        assert len(replies) == len(batch)
        for request, reply in zip(batch, replies, strict=True):
            assert reply.get("id") == request.get("id")
    assert fuzz_server.backend.type_violations == []


def test_fuzz_server_still_serves(fuzz_server: _ThreadServer) -> None:
    async def good() -> Any:
        async with qmp_client(fuzz_server.path) as qmp:
            return await qmp.execute("query-vms")

    assert asyncio.run(good()) == [{"name": "vm1", "state": "running", "devices": ["0000:01:00.0"]}]
    assert fuzz_server.backend.type_violations == []
