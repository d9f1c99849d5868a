"""
``qreset status`` / ``history`` / ``events`` as subprocesses against a real
ControlServer started here (the socket path given with --socket or
$QRESET_SOCKET). The backend is the in-memory daemon stand-in of
tests/test_control.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qreset.cli.client import format_event, table
from qreset.control import ControlServer
from qreset.errors import QResetError
from tests.test_control import FakeBackend, backend, sockdir

__all__ = ["backend", "sockdir"]  # fixtures re-used from test_control

ROOT = Path(__file__).resolve().parent.parent


class HistoryBackend(FakeBackend):
    async def query_resets(self, vm: str | None, limit: int) -> list[dict[str, Any]]:
        self._record("query_resets", vm, limit)
        if vm == "ghost":
            raise QResetError("unknown VM 'ghost'")
        rows = [
            {"t": 1764072000.5, "vm": "vm1", "cycle": "c2", "phase": "resumed", "ok": True,
             "phases": {"assert": 0.1}},
            {"t": 1764071000.0, "vm": "vm2", "cycle": "c1", "phase": "failed", "ok": False,
             "error": "0000:02:00.0: FLR timed out"},
        ]
        return [r for r in rows if vm is None or r["vm"] == vm][:limit]


@pytest.fixture
async def server(sockdir: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(sockdir / "c.sock", HistoryBackend())
    await srv.start()
    yield srv
    await srv.close()


async def qreset(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qreset", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})}, cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_text(server: ControlServer) -> None:
    rc, out, err = await qreset("status", "--socket", str(server.path))
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"qreset daemon at {server.path}"
    assert "  version  0.1.0" in lines
    header = next(line for line in lines if line.startswith("NAME"))
    assert header.split() == ["NAME", "STATE", "DEVICES"]
    assert lines[-1].split() == ["vm1", "running", "0000:01:00.0"]


async def test_status_json_and_env_socket(server: ControlServer) -> None:
    rc, out, err = await qreset("status", "--json", env={"QRESET_SOCKET": str(server.path)})
    assert (rc, err) == (0, "")
    assert json.loads(out) == {
        "status": {"version": "0.1.0", "vms": 1, "resets": 0},
        "vms": [{"name": "vm1", "state": "running", "devices": ["0000:01:00.0"]}],
    }


async def test_history(server: ControlServer) -> None:
    backend = server.backend
    assert isinstance(backend, HistoryBackend)
    sock = str(server.path)
    rc, out, err = await qreset("history", "--socket", sock, "--vm", "vm2", "--limit", "5", "--json")
    assert (rc, err) == (0, "")
    assert [r["cycle"] for r in json.loads(out)] == ["c1"]
    assert backend.calls[-1:] == [("query_resets", ("vm2", 5))]

    rc, out, err = await qreset("history", "--socket", str(server.path))
    assert (rc, err) == (0, "")
    assert backend.calls[-1:] == [("query_resets", (None, 20))]
    lines = out.splitlines()
    assert lines[0].split() == ["T", "VM", "CYCLE", "PHASE", "OK", "ERROR"]
    assert lines[1].split() == ["2025-11-25", "12:00:00", "vm1", "c2", "resumed", "yes", "-"]
    assert lines[2].split()[2:6] == ["vm2", "c1", "failed", "no"]
    assert lines[2].endswith("0000:02:00.0: FLR timed out")

    rc, out, err = await qreset("history", "--socket", str(server.path), "--vm", "nobody")
    assert (rc, out.strip(), err) == (0, "no reset cycles for nobody", "")


async def test_history_backend_error(server: ControlServer) -> None:
    rc, out, err = await qreset("history", "--socket", str(server.path), "--vm", "ghost")
    assert (rc, out) == (1, "")
    assert err == "qreset: query-resets: unknown VM 'ghost'\n"


async def test_history_bad_limit_is_usage_error(server: ControlServer) -> None:
    rc, _out, err = await qreset("history", "--socket", str(server.path), "--limit", "0")
    assert rc == 2
    assert "must be at least 1" in err


@pytest.mark.parametrize("command", ["status", "history", "events"])
async def test_daemon_not_running(sockdir: Path, command: str) -> None:
    missing = sockdir / "none.sock"
    rc, out, err = await qreset(command, "--socket", str(missing))
    assert (rc, out) == (1, "")
    assert err == f"qreset: daemon not running (no control socket at {missing})\n"
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    rc, out, err = await qreset(command, "--socket", str(stale))
    assert (rc, out) == (1, "")
    assert err == f"qreset: daemon not running (nothing listening on {stale})\n"


async def test_refused_session_is_one_line(sockdir: Path) -> None:
    async with ControlServer(sockdir / "z.sock", FakeBackend(), max_clients=0) as srv:
        rc, out, err = await qreset("status", "--socket", str(srv.path))
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith(f"qreset: {srv.path} refused the session:")
    assert "too many clients (limit 0)" in err


async def _wait_negotiated(server: ControlServer, n: int) -> None:
    for _ in range(500):
        if server.negotiated == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.negotiated} clients negotiated, expected {n}")


async def _start_events(server: ControlServer, *extra: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qreset", "events", "--socket", str(server.path), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    await _wait_negotiated(server, 1)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_events_json_until_signal(server: ControlServer, sig: signal.Signals) -> None:
    proc = await _start_events(server, "--json")
    assert proc.stdout is not None
    server.emit("RESET_START", {"vm": "vm1", "cycle": "c3"})
    server.emit("RESET_DONE", {"vm": "vm1", "cycle": "c3", "ok": True})
    first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
    second = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
    assert first["event"] == "RESET_START"
    assert first["data"] == {"vm": "vm1", "cycle": "c3"}
    assert set(first["timestamp"]) == {"seconds", "microseconds"}
    assert second["event"] == "RESET_DONE"
    assert second["data"]["ok"] is True
    proc.send_signal(sig)
    rest, err = await asyncio.wait_for(proc.communicate(), 10)
    assert (proc.returncode, rest, err) == (0, b"", b"")


async def test_events_text_and_daemon_exit(server: ControlServer) -> None:
    proc = await _start_events(server)
    assert proc.stdout is not None
    server.emit("VM_ADDED", {"vm": "g", "devices": ["0000:02:00.0", "0000:02:00.1"]})
    line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
    stamp, name, *fields = line.split()
    assert stamp.endswith("Z")
    assert len(stamp) == len("2026-11-25T13:00:00.000000Z")
    assert (name, fields) == ("VM_ADDED", ["vm=g", "devices=0000:02:00.0,0000:02:00.1"])
    await server.close()  # the daemon goes away
    rest, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 1
    assert rest == b""
    assert err.decode() == f"qreset: the daemon at {server.path} closed the connection\n"


class EmptyBackend(FakeBackend):
    async def query_vms(self) -> list[dict[str, Any]]:
        return []


async def test_status_without_vms(sockdir: Path) -> None:
    async with ControlServer(sockdir / "e.sock", EmptyBackend()) as srv:
        rc, out, err = await qreset("status", "--socket", str(srv.path))
    assert (rc, err) == (0, "")
    assert out.splitlines()[-1] == "no VMs"


def test_table_and_event_formatting() -> None:
    rows: list[dict[str, Any]] = [
        {"name": "a", "devices": ["x", "y"], "nested": {"k": 1}, "ok": True, "raw": [[1]]},
        {"name": "bb", "extra": None, "load": 0.25,
         "devices": [{"address": "0000:01:00.0", "state": "ok"}, {"address": "0000:01:00.1"}]},
    ]
    assert table(rows, first=("ok",)) == [
        "OK   NAME  DEVICES                    EXTRA  LOAD",
        "yes  a     x,y                        -      -",
        "-    bb    0000:01:00.0,0000:01:00.1  -      0.25",
    ]
    assert table([]) == []
    event = {"event": "E", "data": {"a": 1, "b": [1, 2]},
             "timestamp": {"seconds": 1764072000, "microseconds": 5}}
    assert format_event(event) == "2025-11-25T12:00:00.000005Z E a=1 b=1,2"
