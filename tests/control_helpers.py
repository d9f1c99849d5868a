"""The control tests' shared helpers: a backend that records what the server passes it,
and the fixtures for it and for a short socket directory.

Used by tests/test_control.py and tests/test_cli_client.py (test modules import
helpers from here, never from each other).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


class FakeBackend:
    """Records calls; checks that the server only ever passes well-typed arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.type_violations: list[str] = []
        self.reset_gate: asyncio.Event | None = None
        self.reset_done: list[str] = []
        self.fail: BaseException | None = None

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail is not None:
            raise self.fail

    def _check(self, name: str, value: object, *types: type) -> None:
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            self.type_violations.append(f"{name}={value!r}")

    async def query_vms(self) -> list[dict[str, Any]]:
        self._record("query_vms")
        return [{"name": "vm1", "state": "running", "devices": ["0000:01:00.0"]}]

    async def query_devices(self, vm: str | None) -> list[dict[str, Any]]:
        self._check("vm", vm, str, type(None))
        self._record("query_devices", vm)
        return [{"address": "0000:01:00.0", "vm": vm or "vm1"}]

    async def query_plan(self, vm: str) -> dict[str, Any]:
        self._check("vm", vm, str)
        self._record("query_plan", vm)
        return {"vm": vm, "domains": []}

    async def query_resets(self, vm: str | None, limit: int, before: str | None,
                           since: float | None, until: float | None) -> dict[str, Any]:
        self._check("vm", vm, str, type(None))
        self._check("limit", limit, int)
        self._check("before", before, str, type(None))
        self._check("since", since, float, type(None))
        self._check("until", until, float, type(None))
        self._record("query_resets", vm, limit, before, since, until)
        return {"resets": [{"vm": vm or "vm1", "ok": True, "n": i} for i in range(min(limit, 3))],
                "next": None}

    async def reset_vm(self, vm: str) -> dict[str, Any]:
        self._check("vm", vm, str)
        self._record("reset_vm", vm)
        if self.reset_gate is not None:
            await self.reset_gate.wait()
        self.reset_done.append(vm)
        return {"vm": vm, "ok": True}

    async def add_vm(self, name: str, qmp: str, devices: list[str], mode: str | None) -> dict[str, Any]:
        self._check("name", name, str)
        self._check("qmp", qmp, str)
        self._check("devices", devices, list)
        self._check("mode", mode, str, type(None))
        self._record("add_vm", name, qmp, devices, mode)
        return {"name": name}

    async def remove_vm(self, name: str, release: bool) -> dict[str, Any]:
        self._check("name", name, str)
        self._check("release", release, bool)
        self._record("remove_vm", name, release)
        return {"name": name, "released": release}

    async def doctor(self, functions: list[str]) -> list[dict[str, Any]]:
        self._check("functions", functions, list)
        self._record("doctor", functions)
        return [{"address": f} for f in functions]

    async def query_status(self) -> dict[str, Any]:
        self._record("query_status")
        return {"version": "0.1.0", "vms": 1, "resets": 0}


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short path: sun_path holds 107 bytes, pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="qrc", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()
