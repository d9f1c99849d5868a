"""
The daemon with a journal it cannot write (real QEMU guests, real filesystems).

What safety requires (qreset/journal.py, docs/operators.md): a journal that
cannot be written never keeps a guest parked and never stops resets; the
daemon runs degraded and says so (status, metrics, log).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qreset.pci.address import PciAddress
from qreset.pci.sim import SimHost
from tests.daemon_helpers import DEMO, NIC1, make_config, running, wait_running
from tests.journal_helpers import fill, tmpfs
from tests.qemu_helpers import guests, have_qemu, read_journal, short_tmpdir, status

qemu = pytest.mark.skipif(not have_qemu(), reason="qemu-system-x86_64 not installed")


@qemu
@pytest.mark.qemu
async def test_a_read_only_journal_at_start_still_resumes_the_guest_left_parked() -> None:
    """
    The predecessor died with the guest parked; the journal's filesystem is now
    read-only. The daemon used to exit 1 (a crash loop under Restart=on-failure,
    the guest parked for good); it now reads the journal, runs degraded, says
    so, and finishes the cycle: the guest runs.
    """
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,), tmpfs(wd / "state") as fs:
        ctl = await g.ctl()
        try:
            await ctl.execute("set-action", {"reboot": "shutdown", "shutdown": "pause"})
            await ctl.execute("cont")  # the guest resets itself and is parked, as by a daemon
            async with asyncio.timeout(10):
                while await status(ctl) != "shutdown":
                    await asyncio.sleep(0.01)
            base = {"t": time.time(), "vm": "vm1", "cycle": "vm1-dead-1"}
            jpath = fs / "journal.jsonl"
            jpath.write_text("".join(json.dumps(r) + "\n" for r in (
                {**base, "phase": "cycle-start"}, {**base, "phase": "parked"},
                {**base, "phase": "engine-done", "ok": True, "identity_changed": []})))
            await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,ro", str(fs)], check=True)
            cfg = make_config(wd, {"vm1": (g, [NIC1])})
            cfg = cfg.model_copy(update={"daemon": cfg.daemon.model_copy(update={"journal": jpath})})
            host = SimHost.from_toml(DEMO, time_scale=0.01)
            async with running(cfg, host) as daemon:
                async with asyncio.timeout(10):
                    while daemon.monitors["vm1"].cycles < 1:
                        await asyncio.sleep(0.01)
                first = daemon.history[0]
                st = await daemon.query_status()
                async with asyncio.timeout(5):  # it reboots on: parked now and then
                    while (guest := await status(ctl)) != "running":
                        await asyncio.sleep(0.01)
        finally:
            await ctl.disconnect()
    assert first["cycle"] == "vm1-dead-1"
    assert first["recovered"] is True
    assert first["vm_resumed"] is True
    assert guest == "running"
    assert "Read-only file system" in st["journal_degraded"]


@qemu
@pytest.mark.qemu
@pytest.mark.parametrize("mode", ["park", "stop-on-reset"])
async def test_a_full_disk_still_resets_and_resumes_and_the_journal_recovers(mode: str) -> None:
    """
    ENOSPC while running used to abort every cycle: the guest resumed on a
    device that was never reset. Now cycles reset and finish as usual, the
    status says the journal is degraded, and when space returns it is
    written again.
    """
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,), tmpfs(wd / "state") as fs:
        jpath = fs / "journal.jsonl"
        cfg = make_config(wd, {"vm1": (g, [NIC1])}, mode)
        cfg = cfg.model_copy(update={"daemon": cfg.daemon.model_copy(update={"journal": jpath})})
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        async with running(cfg, host) as daemon:
            daemon.journal.retry_s = 0.2
            filler = fill(fs)
            summaries = []
            for _ in range(10):  # the journal file's last page still takes a few records
                summaries.append(await daemon.reset_vm("vm1"))
                if daemon.journal.degraded is not None:
                    break
            full = await daemon.query_status()
            resets_while_full = [r for r in host.reset_log if PciAddress.parse(NIC1) in r.affected]
            summaries.append(await daemon.reset_vm("vm1"))
            filler.unlink()
            async with asyncio.timeout(10):
                while daemon.journal.degraded is not None:
                    await asyncio.sleep(0.05)
            after = await daemon.reset_vm("vm1")
            healthy = await daemon.query_status()
            guest = await wait_running(g)
        records = read_journal(jpath)
    assert full["journal_degraded"] is not None
    assert "No space left on device" in full["journal_degraded"]
    assert [s["outcome"] for s in summaries] == ["resumed"] * len(summaries)
    assert len(resets_while_full) >= len(summaries) - 1
    assert healthy["journal_degraded"] is None
    assert after["outcome"] == "resumed"
    assert any(r["cycle"] == after["cycle"] and r["phase"] == "resumed" for r in records)
    assert guest == "running"


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_qreset_run_refuses_a_journal_that_is_not_a_file_in_one_line(tmp_path: Path, kind: str) -> None:
    """A FIFO journal hung start-up (and SIGTERM was not heard); now: exit 2, one line naming it."""
    journal = tmp_path / "journal.jsonl"
    if kind == "fifo":
        import os

        os.mkfifo(journal)
    else:
        journal.mkdir()
    cfg = tmp_path / "qreset.toml"
    cfg.write_text(f'[daemon]\njournal = "{journal}"\ncontrol_socket = ""\n')
    proc = subprocess.run([sys.executable, "-m", "qreset", "run", "--config", str(cfg), "--sim", str(DEMO)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "INFO" not in line]
    assert len(errors) == 1, proc.stderr
    assert str(journal) in errors[0]
    assert "Traceback" not in proc.stderr


async def test_add_vm_on_a_degraded_journal_says_it_was_not_persisted(tmp_path: Path) -> None:
    """The hook learns that a restart would forget the VM (``persisted: false``)."""
    from qreset.config import parse_config
    from qreset.daemon import Daemon

    with tmpfs(tmp_path / "ro", ro=True) as fs:
        cfg = parse_config({"daemon": {"journal": str(fs / "journal.jsonl"), "control_socket": ""},
                            "sim": {"topology": str(DEMO), "time_scale": 0.01}}, "test")
        daemon = Daemon(cfg, host=SimHost.from_toml(DEMO, time_scale=0.01), control=False)
        task = asyncio.create_task(daemon.run())
        try:
            async with asyncio.timeout(10):
                await daemon.started.wait()
            added = await daemon.add_vm("vm9", str(tmp_path / "vm9.qmp"), [NIC1], None)
            st = await daemon.query_status()
        finally:
            daemon.request_stop()
            await asyncio.wait_for(task, 30)
    assert added["added"] is True
    assert added["persisted"] is False
    assert "Read-only file system" in st["journal_degraded"]
