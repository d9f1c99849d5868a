"""
A crowd of idle connections on the control socket (issue 10, item 8): with
every slot taken by connections that never negotiate or never ask anything,
the libvirt hook's ``add-vm`` still gets through, and a connection that does
not negotiate is closed on its own. Real unix sockets, the real hook as a
subprocess, the server's default limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qreset.control import ControlServer
from qreset.control.server import DEFAULT_MAX_CLIENTS

ROOT = Path(__file__).resolve().parent.parent


class RegistryBackend:
    """The daemon's side of add-vm, recorded (the server's collaborator, not a stand-in for it)."""

    def __init__(self) -> None:
        self.added: list[tuple[str, str, list[str], str | None]] = []

    async def query_vms(self) -> list[dict[str, Any]]:
        return []

    async def query_devices(self, vm: str | None) -> list[dict[str, Any]]:
        return []

    async def query_plan(self, vm: str) -> dict[str, Any]:
        return {}

    async def query_resets(self, vm: str | None, limit: int, before: str | None,
                           since: float | None, until: float | None) -> dict[str, Any]:
        return {"resets": [], "next": None}

    async def reset_vm(self, vm: str) -> dict[str, Any]:
        return {}

    async def add_vm(self, name: str, qmp: str, devices: list[str], mode: str | None) -> dict[str, Any]:
        self.added.append((name, qmp, devices, mode))
        return {"name": name}

    async def remove_vm(self, name: str, release: bool) -> dict[str, Any]:
        return {}

    async def doctor(self, functions: list[str]) -> list[dict[str, Any]]:
        return []

    async def query_status(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qrx", dir="/tmp"))  # sun_path holds 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def crowd(path: Path, n: int, *, negotiate: bool) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """``n`` connections that read their greeting (and negotiate if asked), then sit idle."""
    writers = []
    try:
        for _ in range(n):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writers.append(writer)
            assert "QMP" in json.loads(await asyncio.wait_for(reader.readline(), 5))
            if negotiate:
                writer.write(b'{"execute": "qmp_capabilities"}')
                assert json.loads(await asyncio.wait_for(reader.readline(), 5)) == {"return": {}}
        yield writers
    finally:
        for writer in writers:
            writer.close()


XML = """<domain type='kvm'>
  <name>guest1</name>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
    </hostdev>
  </devices>
</domain>
"""


async def run_hook(sock: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qreset", "hook", "guest1", "started", "begin", "-", "--socket", str(sock),
        "--timeout", "20", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(XML.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("negotiated", [False, True], ids=["greeted", "negotiated"])
async def test_hook_gets_in_past_a_full_crowd_of_idle_connections(sockdir: Path, negotiated: bool) -> None:
    backend = RegistryBackend()
    async with ControlServer(sockdir / "c.sock", backend) as srv, \
            crowd(srv.path, DEFAULT_MAX_CLIENTS + 8, negotiate=negotiated):
        rc, out, err = await run_hook(srv.path)
        assert (rc, out, err) == (0, "", "")
        assert backend.added == [("guest1", "/run/qreset/guest1.qmp", ["0000:01:00.0"], "stop-on-reset")]
        assert srv.clients <= DEFAULT_MAX_CLIENTS + 1


async def test_connection_that_does_not_negotiate_is_closed(sockdir: Path) -> None:
    async with ControlServer(sockdir / "t.sock", RegistryBackend(), negotiate_timeout=0.3) as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        assert "QMP" in json.loads(await reader.readline())
        writer.write(b'{"execute": "query-vms"}')  # anything but qmp_capabilities: no reprieve
        assert json.loads(await reader.readline())["error"]["class"] == "CommandNotFound"
        farewell = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert farewell == {"error": {"class": "GenericError",
                                      "desc": "no qmp_capabilities within 0.3 s; closing the connection"}}
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # A client that negotiates in time stays connected however long it then idles.
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        await reader.readline()
        writer.write(b'{"execute": "qmp_capabilities"}')
        assert json.loads(await reader.readline()) == {"return": {}}
        await asyncio.sleep(0.6)
        writer.write(b'{"execute": "query-status", "id": 1}')
        assert json.loads(await asyncio.wait_for(reader.readline(), 5)) == {"return": {}, "id": 1}
        writer.close()
