"""The daemon tests' shared helpers: the demo host's functions, a daemon config for
real QEMU guests, the daemon run in-process, and waits on guests and cycles.

Used by tests/test_daemon.py, tests/test_robustness.py and tests/test_cycle_qemu.py
(test modules import helpers from here, never from each other).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from qreset.config import Config, parse_config
from qreset.daemon import Daemon
from qreset.pci.address import PciAddress
from qreset.pci.sim import ResetRecord, SimHost
from tests.conftest import ROOT
from tests.qemu_helpers import QemuGuest, status

DEMO = ROOT / "configs" / "sim" / "demo.toml"
# configs/sim/demo.toml
NIC1 = "0000:01:00.0"       # FLR, own root port
GPU = "0000:03:00.0"        # no FLR, multifunction with GPU_AUDIO: bus reset of 00:03.0
GPU_AUDIO = "0000:03:00.1"
LPT = "0000:06:01.0"        # conventional, bus reset of 05:00.0 only
SOUND = "0000:06:02.0"      # conventional, same bus as LPT, PM reset
A = PciAddress.parse


def make_config(workdir: Path, vms: dict[str, tuple[QemuGuest, Sequence[str]]], mode: str = "park",
                time_scale: float = 0.01, **policy: Any) -> Config:
    return parse_config({
        "daemon": {"journal": str(workdir / "journal.jsonl"), "control_socket": ""},
        "sim": {"topology": str(DEMO), "time_scale": time_scale},
        "policy": {"mode": mode, "connect_backoff_max": 0.3, **policy},
        "vm": [{"name": name, "qmp": str(g.qmp_path), "device": [{"host": d} for d in devs]}
               for name, (g, devs) in vms.items()],
    }, "test")


@asynccontextmanager
async def running(cfg: Config, host: SimHost, control: bool = False) -> AsyncIterator[Daemon]:
    daemon = Daemon(cfg, host=host, control=control)
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        async with asyncio.timeout(10):
            await daemon.started.wait()
        for vm in cfg.vm:
            await daemon.wait_event("QRESET_VM_CONNECTED", about(vm.name), timeout=10, past=True)
        yield daemon
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 30)


def about(vm: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: bool(event["vm"] == vm)


async def wait_running(guest: QemuGuest, timeout: float = 5.0) -> str:
    """A self-rebooting guest is parked now and then: wait until it is seen running."""
    ctl = await guest.ctl()
    try:
        async with asyncio.timeout(timeout):
            while (st := await status(ctl)) != "running":
                await asyncio.sleep(0.01)
        return st
    finally:
        await ctl.disconnect()


async def wait_cycles(daemon: Daemon, vm: str, n: int, timeout: float) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while daemon.monitors[vm].cycles < n:
            await asyncio.sleep(0.05)
    return [r for r in daemon.history if r["vm"] == vm]


def journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def touching(log: Iterable[ResetRecord], addrs: Iterable[str]) -> list[ResetRecord]:
    want = {A(a) for a in addrs}
    return [r for r in log if r.affected & want]


def assert_no_concurrent_overlap(records: Sequence[ResetRecord]) -> None:
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            if a.affected & b.affected:
                assert a.end <= b.start or b.end <= a.start, f"overlapping resets: {a} and {b}"
