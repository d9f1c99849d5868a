"""`qreset run` in park mode serving a nested QEMU whose guest reboots itself (shared by the lab tests).

The nested guest (tests/guest.py: a boot sector that resets the machine through
port 0xCF9) owns lab functions through vfio-pci, opened through VFIO groups or
(``iommufd=True``) through VFIO device cdevs bound to ``-object iommufd``. In
park mode a guest reset becomes SHUTDOWN + pause (set-action
reboot=shutdown,shutdown=pause), so the guest can only boot again if the
daemon finished the cycle: every boot after the first is proof that a
coordinated reset completed and the VM was resumed. The kernel's kprobe lines
show the FLRs happening (:func:`check_flr_cycles`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qreset.inventory import AssignedDevice, read_inventory
from qreset.pci.address import PciAddress
from tests.guest import count_boots, write_boot_image
from tests.lab.labhost import QRESET, REPO, KernelLog
from tests.lab.nested import nested_qemu

CYCLES = 3


def journal_terminal(path: Path) -> list[dict[str, Any]]:
    """The journal's finished cycles (resumed, stopped, failed, poweroff), in order."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if rec.get("phase") in ("resumed", "stopped", "failed", "poweroff"):
                out.append(rec)
    return out


@dataclass
class ParkRun:
    """What one park-mode run saw."""

    cycles: list[dict[str, Any]]
    boots_at_last_cycle: int
    boots: int
    status: object
    daemon_log: str
    #: qreset's inventory of the nested QEMU, read over the test's own QMP monitor.
    inventory: list[AssignedDevice]
    kernel: KernelLog


async def park_cycles(devices: Sequence[PciAddress], work: Path, iommufd: bool = False,
                      cycles: int = CYCLES) -> ParkRun:
    """Run the nested guest under ``qreset run`` (park mode) until ``cycles`` cycles ended
    and the guest booted once more; the devices must be bound to vfio-pci already."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    daemon_qmp = work / "l2-daemon.qmp"
    journal = work / "journal.jsonl"
    config = work / "qreset.toml"
    config.write_text(
        '[daemon]\ncontrol_socket = ""\njournal = "journal.jsonl"\n\n'
        '[policy]\nmode = "park"\ntakeover = "all"\n\n'
        f'[[vm]]\nname = "l2"\nqmp = "{daemon_qmp}"\n'
    )
    image = write_boot_image(work / "boot.img")
    debug = work / "debug.log"
    log = KernelLog(f"daemon park {'iommufd' if iommufd else 'group'}")
    extra = ["-drive", f"file={image},format=raw,if=ide", "-debugcon", f"file:{debug}"]
    async with nested_qemu("l2", devices, extra=extra, paused=True, monitors=[daemon_qmp],
                           iommufd=iommufd) as client:
        inventory = await read_inventory(client, "l2", [])
        daemon_log = work / "daemon.log"
        with open(daemon_log, "wb") as logf:
            daemon = await asyncio.create_subprocess_exec(
                *QRESET, "run", "--config", str(config), "-v", cwd=REPO,
                stdout=logf, stderr=logf, stdin=asyncio.subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 60
            # qreset.vm logs "connected (park mode, status ..., devices ...)" once it
            # has set the park actions: the guest may run from then on.
            while not re.search(rb"\bconnected \(park", daemon_log.read_bytes()):
                assert daemon.returncode is None, daemon_log.read_text()
                assert time.monotonic() < deadline, "daemon never connected:\n" + daemon_log.read_text()
                await asyncio.sleep(0.2)
            await client.execute("cont")
            deadline = time.monotonic() + 240
            while len(journal_terminal(journal)) < cycles:
                assert daemon.returncode is None, daemon_log.read_text()
                assert time.monotonic() < deadline, (
                    f"{len(journal_terminal(journal))} cycles, {count_boots(debug)} boots in 240 s:\n"
                    + daemon_log.read_text()[-4000:])
                await asyncio.sleep(0.5)
            # The guest keeps rebooting: it runs again after the last cycle we saw.
            boots = count_boots(debug)
            deadline = time.monotonic() + 60
            while count_boots(debug) == boots and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            status = await client.execute("query-status")
        finally:
            if daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(daemon.wait(), 60)
                except TimeoutError:
                    daemon.kill()
                    await daemon.wait()
    run = ParkRun(journal_terminal(journal), boots, count_boots(debug), status,
                  daemon_log.read_text(), inventory, log)
    print(f"{len(run.cycles)} cycles, {run.boots} boots; cycle durations (ms):")
    for c in run.cycles:
        print("  ", c["outcome"], {k: v for k, v in c["durations"].items() if k.endswith("_ms")})
    return run


def check_flr_cycles(run: ParkRun, devices: Sequence[PciAddress], cycles: int = CYCLES) -> list[str]:
    """Every cycle resumed the guest after qreset FLRed each device; returns the kernel's FLR lines."""
    assert run.boots > run.boots_at_last_cycle, "the guest did not run again after the cycles"
    # Running, or parked in the middle of the next cycle: never an error state.
    assert isinstance(run.status, dict)
    assert run.status["status"] in ("running", "shutdown", "prelaunch", "paused"), run.status
    assert len(run.cycles) >= cycles, run.cycles
    for c in run.cycles[:cycles]:
        assert c["outcome"] == "resumed", c
        assert c["vm_resumed"] is True
        assert sorted(c["devices"]) == sorted(map(str, devices))
        report = c["report"]
        assert report["ok"], report
        covered = sorted(a for d in report["domains"] for a in d["covers"])
        assert covered == sorted(map(str, devices))
        assert {d["method"] for d in report["domains"]} == {"flr"}
    # Kernel witness: qreset's FLRs (one per device and cycle) on top of QEMU's own.
    flrs = [line for line in run.kernel.lines() if "qreset_flr:" in line]
    assert len(flrs) >= len(devices) * cycles, len(flrs)
    return flrs
