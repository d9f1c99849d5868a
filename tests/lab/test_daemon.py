"""`qreset run` in park mode serving a nested QEMU whose guest reboots itself, on the real kernel.

The nested guest (tests/guest.py: a boot sector that resets the machine through
port 0xCF9) owns two lab functions through vfio-pci. In park mode a guest
reset becomes SHUTDOWN + pause (set-action reboot=shutdown,shutdown=pause), so
the guest can only boot again if the daemon finished the cycle: every boot
after the first is proof that a coordinated reset completed and the VM was
resumed. The kernel's kprobe lines show the FLRs happening.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest import count_boots, write_boot_image
from tests.lab.labhost import QRESET, REPO, KernelLog, Roles, bind_group_vfio
from tests.lab.nested import nested_qemu

pytestmark = pytest.mark.lab

WORK = Path("/run/qreset-lab-daemon")
CYCLES = 3


def journal_terminal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if rec.get("phase") in ("resumed", "stopped", "failed", "poweroff"):
                out.append(rec)
    return out


async def test_park_mode_cycles_on_real_devices(roles: Roles, witnesses: list[str]) -> None:
    devices = [roles["virtio1"], roles["nvme1"]]
    for d in devices:
        bind_group_vfio(d)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    daemon_qmp = WORK / "l2-daemon.qmp"
    journal = WORK / "journal.jsonl"
    config = WORK / "qreset.toml"
    config.write_text(
        '[daemon]\ncontrol_socket = ""\njournal = "journal.jsonl"\n\n'
        '[policy]\nmode = "park"\ntakeover = "all"\n\n'
        f'[[vm]]\nname = "l2"\nqmp = "{daemon_qmp}"\n'
    )
    image = write_boot_image(WORK / "boot.img")
    debug = WORK / "debug.log"
    log = KernelLog("daemon park")
    extra = ["-drive", f"file={image},format=raw,if=ide", "-debugcon", f"file:{debug}"]
    async with nested_qemu("l2", devices, extra=extra, paused=True, monitors=[daemon_qmp]) as client:
        daemon_log = WORK / "daemon.log"
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
            while len(journal_terminal(journal)) < CYCLES:
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
    cycles = journal_terminal(journal)
    print(f"{len(cycles)} cycles, {count_boots(debug)} boots; cycle durations (ms):")
    for c in cycles:
        print("  ", c["outcome"], {k: v for k, v in c["durations"].items() if k.endswith("_ms")})
    assert count_boots(debug) > boots, "the guest did not run again after the cycles"
    # Running, or parked in the middle of the next cycle: never an error state.
    assert isinstance(status, dict)
    assert status["status"] in ("running", "shutdown", "prelaunch", "paused"), status
    for c in cycles[:CYCLES]:
        assert c["outcome"] == "resumed", c
        assert c["vm_resumed"] is True
        assert sorted(c["devices"]) == sorted(map(str, devices))
        report = c["report"]
        assert report["ok"], report
        covered = sorted(a for d in report["domains"] for a in d["covers"])
        assert covered == sorted(map(str, devices))
        assert {d["method"] for d in report["domains"]} == {"flr"}
    # Kernel witness: qreset's FLRs (2 per cycle) on top of QEMU's own.
    flrs = [line for line in log.lines() if "qreset_flr:" in line]
    assert len(flrs) >= 2 * CYCLES, len(flrs)
