"""
``qreset status`` / ``history`` / ``events`` as subprocesses against a real
ControlServer started here (the socket path given with --socket or
$QRESET_SOCKET). The backend is the in-memory daemon stand-in of
tests/test_control.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qreset.cli.history import parse_time
from qreset.cli.render import format_event, table
from qreset.control import ControlServer, Framer
from qreset.errors import QResetError
from qreset.history import page as history_page
from tests.control_helpers import FakeBackend, backend, sockdir

__all__ = ["backend", "sockdir"]  # fixtures from tests/control_helpers.py

ROOT = Path(__file__).resolve().parent.parent


class HistoryBackend(FakeBackend):
    """Serves ``rows`` (newest first) a page at a time, as the daemon does."""

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.rows = rows if rows is not None else [
            {"t": 1764072000.5, "vm": "vm1", "cycle": "c2", "phase": "resumed", "ok": True,
             "phases": {"assert": 0.1}},
            {"t": 1764071000.0, "vm": "vm2", "cycle": "c1", "phase": "failed", "ok": False,
             "error": "0000:02:00.0: FLR timed out"},
        ]

    async def query_resets(self, vm: str | None, limit: int, before: str | None,
                           since: float | None, until: float | None) -> dict[str, Any]:
        self._record("query_resets", vm, limit, before, since, until)
        if vm == "ghost":
            raise QResetError("unknown VM 'ghost'")
        return history_page(self.rows, vm=vm, limit=limit, before=before, since=since, until=until)


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
    assert backend.calls[-1:] == [("query_resets", ("vm2", 5, None, None, None))]

    rc, out, err = await qreset("history", "--socket", str(server.path))
    assert (rc, err) == (0, "")
    assert backend.calls[-1:] == [("query_resets", (None, 20, None, None, None))]
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


# ---------------------------------------------------------------- history at scale


def _rows(n: int, blob: int) -> list[dict[str, Any]]:
    """``n`` cycle summaries of about ``blob`` bytes each, newest first."""
    return [{"t": 1764072000.0 - i, "vm": f"vm{i % 2 + 1}", "cycle": f"c{n - i}", "phase": "resumed",
             "outcome": "resumed", "report": {"detail": "r" * blob}} for i in range(n)]


async def test_history_pages_through_a_busy_daemon(sockdir: Path) -> None:
    """
    ``history --limit 2000`` of big cycles while the daemon emits events all
    the time (issue 10, item 7): the CLI asks page by page and gets every row.
    """
    backend = HistoryBackend(_rows(2500, 3000))  # ~7.5 MB of history
    async with ControlServer(sockdir / "h.sock", backend) as srv:
        stop = asyncio.Event()

        async def busy() -> None:
            while not stop.is_set():
                srv.emit("QRESET_RESET_COMPLETED", {"vm": "vm1", "outcome": "resumed"})
                await asyncio.sleep(0.001)

        emitter = asyncio.create_task(busy())
        try:
            rc, out, err = await qreset("history", "--socket", str(srv.path), "--limit", "2000", "--json")
        finally:
            stop.set()
            await emitter
    assert (rc, err) == (0, "")
    assert [r["cycle"] for r in json.loads(out)] == [r["cycle"] for r in backend.rows[:2000]]
    calls = [args for name, args in backend.calls if name == "query_resets"]
    assert len(calls) == 10
    assert {args[1] for args in calls} == {200}
    assert calls[0][2] is None
    assert all(isinstance(args[2], str) for args in calls[1:])  # each page continues the last


async def test_history_text_pages_and_filters(sockdir: Path) -> None:
    backend = HistoryBackend(_rows(450, 10))
    async with ControlServer(sockdir / "t.sock", backend) as srv:
        rc, out, err = await qreset("history", "--socket", str(srv.path), "--vm", "vm2", "--limit", "300",
                                    "--since", "2025-11-25T11:55:00", "--until", "2025-11-25T12:00:00Z")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["T", "VM", "CYCLE", "PHASE", "OUTCOME"]
    body = lines[1:]
    # vm2 is every second row; t runs from 12:00:00 (row 0) back one second per row.
    assert len(body) == 150
    assert all(line.split()[2] == "vm2" for line in body)
    assert body[0].split()[:2] == ["2025-11-25", "11:59:59"]
    assert body[-1].split()[:2] == ["2025-11-25", "11:55:01"]
    widths = {len(line.split("vm2")[0]) for line in body}
    assert len(widths) == 1, "pages keep the columns aligned"
    calls = [args for name, args in backend.calls if name == "query_resets"]
    assert calls[0][3:] == (1764071700.0, 1764072000.0)


async def test_history_reply_cut_short_is_one_line(sockdir: Path) -> None:
    """A daemon that dies in the middle of a large reply: one line on stderr, exit 1, no traceback."""
    path = sockdir / "cut.sock"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = Framer()  # qemu.qmp ends its messages with no newline

        async def request() -> dict[str, Any]:
            while True:
                texts = framer.feed(await reader.read(4096))
                if texts:
                    msg = json.loads(texts[0])
                    assert isinstance(msg, dict)
                    return msg

        writer.write(json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0},
                                                     "package": ""}, "capabilities": []}}).encode() + b"\n")
        negotiate = await request()
        ident = {"id": negotiate["id"]} if "id" in negotiate else {}
        writer.write(json.dumps({"return": {}} | ident).encode() + b"\n")
        assert (await request())["execute"] == "query-resets"
        writer.write(b'{"return": {"resets": [{"report": "' + b"x" * 3_000_000)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.transport.abort()  # the daemon died mid-reply

    server = await asyncio.start_unix_server(handle, path=str(path))
    async with server:
        rc, out, err = await qreset("history", "--socket", str(path), "--limit", "100")
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1, err[:2000]
    assert err.startswith("qreset: ")
    assert "Traceback" not in err
    assert len(err) < 400
    assert "query-resets" in err or "history" in err


def test_parse_time() -> None:
    now = 1764072000.0
    assert parse_time("10m", now) == now - 600
    assert parse_time("2h", now) == now - 7200
    assert parse_time("1.5d", now) == now - 1.5 * 86400
    assert parse_time("90s", now) == now - 90
    assert parse_time("2025-11-25T12:00:00", now) == 1764072000.0
    assert parse_time("2025-11-25T13:00:00+01:00", now) == 1764072000.0
    assert parse_time("2025-11-25", now) == 1764028800.0
    for bad in ("yesterday", "10 minutes", "-5m", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="not an ISO 8601 time"):
            parse_time(bad, now)


async def test_history_bad_time_is_usage_error(server: ControlServer) -> None:
    rc, out, err = await qreset("history", "--socket", str(server.path), "--since", "yesterday")
    assert (rc, out) == (2, "")
    assert "--since: not an ISO 8601 time nor a time ago like 10m or 2h: 'yesterday'" in err


async def test_history_help_has_examples() -> None:
    rc, out, _err = await qreset("history", "--help")
    assert rc == 0
    assert "--since TIME" in out
    assert "qreset history --vm vm1 --since 2h" in out


async def test_events_stop_when_stdout_reader_goes(server: ControlServer) -> None:
    """``qreset events | head -1``: the follower ends (exit 0, nothing on stderr) once nobody reads."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qreset", "events", "--socket", str(server.path),
            stdout=w, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
    finally:
        os.close(w)
    await _wait_negotiated(server, 1)
    server.emit("QRESET_RESET_STARTED", {"vm": "vm1"})
    _out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert (proc.returncode, err) == (0, b"")
