"""
VMs registered at run time (``add-vm``) survive a restart of the daemon.

The libvirt hook registers a guest once, at ``started``; if the daemon then
restarts (``systemctl restart qreset``, or a crash and ``Restart=on-failure``)
nobody registers it again until the guest itself restarts. So ``add-vm`` and
``remove-vm`` are journaled and replayed at start. These tests restart a real
daemon process (SIGTERM and SIGKILL) under a real self-rebooting QEMU and
check the guest's resets are coordinated again with no new ``add-vm``; that
``remove-vm`` is honoured across a restart; that the configuration wins a
clash; and that the hook's ``reconnect`` (libvirtd restarted) re-registers a
guest idempotently.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qreset.config import parse_config
from qreset.daemon import Daemon
from qreset.errors import ConfigError
from qreset.journal import registered_vms, unfinished_cycles
from qreset.pci.sim import SimHost
from qreset.qmpsync import DaemonUnreachable, call
from tests.conftest import ROOT
from tests.hook_helpers import commandline_args, daemon_on, domain_xml, hook
from tests.qemu_helpers import (
    QemuGuest,
    guests,
    have_qemu,
    read_journal,
    short_tmpdir,
    status,
    wait_journal_record,
)

DEMO = ROOT / "configs" / "sim" / "demo.toml"
NIC1 = "0000:01:00.0"       # configs/sim/demo.toml: FLR, own root port
GPU = "0000:03:00.0"
SOUND = "0000:06:02.0"

qemu = pytest.mark.skipif(not have_qemu(), reason="qemu-system-x86_64 not installed (scripts/install-deps)")


async def ctl_call(sock: Path, command: str, **arguments: Any) -> Any:
    return await asyncio.to_thread(call, str(sock), command, 10.0, **arguments)


async def vm_row(sock: Path, name: str) -> dict[str, Any] | None:
    rows = await ctl_call(sock, "query-vms")
    assert isinstance(rows, list)
    return next((r for r in rows if r["name"] == name), None)


async def start_daemon(cfg: Path, sock: Path, log: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qreset", "run", "--config", str(cfg),
        stdout=subprocess.DEVNULL, stderr=log.open("ab"), cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    async with asyncio.timeout(15):
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"daemon exited {proc.returncode}: {log.read_text()}")
            if sock.exists():
                try:
                    await ctl_call(sock, "query-status")
                    return proc
                except DaemonUnreachable:
                    pass  # bound, not serving yet
            await asyncio.sleep(0.05)



async def wait_cycles(sock: Path, name: str, n: int, timeout: float) -> dict[str, Any]:
    """query-vms's row for ``name`` once this daemon has run ``n`` cycles of it."""
    async with asyncio.timeout(timeout):
        while True:
            row = await vm_row(sock, name)
            if row is not None and row["cycles"] >= n:
                return row
            await asyncio.sleep(0.1)


@qemu
@pytest.mark.qemu
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_vm_added_at_run_time_is_served_again_after_a_restart(how: str) -> None:
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,):
        sock, jpath, cfg = wd / "c.sock", wd / "journal.jsonl", wd / "qreset.toml"
        cfg.write_text(
            f'[daemon]\njournal = "{jpath}"\ncontrol_socket = "{sock}"\n'
            f'[sim]\ntopology = "{DEMO}"\ntime_scale = 0.01\n'
            '[policy]\nmode = "park"\nconnect_backoff_max = 0.3\n')
        d1 = await start_daemon(cfg, sock, wd / "d1.log")
        d2: asyncio.subprocess.Process | None = None
        ctl = await g.ctl()
        try:
            # As the hook does at 'started' (libvirt's mode), with a configured device.
            added = await ctl_call(sock, "add-vm", name="vm1", qmp=str(g.qmp_path), devices=[NIC1],
                                   mode="stop-on-reset")
            await ctl.execute("cont")
            before = await wait_cycles(sock, "vm1", 2, 20)
            sig = signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL
            d1.send_signal(sig)
            rc1 = await asyncio.wait_for(d1.wait(), 20)
            t0, wall0 = time.monotonic(), time.time()
            d2 = await start_daemon(cfg, sock, wd / "d2.log")
            replayed = await vm_row(sock, "vm1")
            # Two guest resets coordinated by the new daemon. (After SIGKILL, a cycle
            # d1 left open may come first, finished by recovery: not counted here.)
            async with asyncio.timeout(20):
                while True:
                    rows = (await ctl_call(sock, "query-resets", vm="vm1", limit=20))["resets"]
                    resets = [r for r in rows if r["t"] >= wall0 and not r.get("recovered")]
                    if len(resets) >= 2:
                        break
                    await asyncio.sleep(0.1)
            served_after = time.monotonic() - t0
            after = await vm_row(sock, "vm1")
            assert after is not None
            async with asyncio.timeout(5):   # stopped only during cycles
                while await status(ctl) != "running":
                    await asyncio.sleep(0.01)
            d2.send_signal(signal.SIGTERM)
            rc2 = await asyncio.wait_for(d2.wait(), 20)
        finally:
            await ctl.disconnect()
            for p in (d1, d2):
                if p is not None and p.returncode is None:
                    p.kill()
                    await p.wait()
        records = read_journal(jpath)
        log2 = (wd / "d2.log").read_text()

    assert added["added"] is True
    assert added["persisted"] is True
    assert before["origin"] == "runtime"
    assert rc1 == (0 if how == "SIGTERM" else -signal.SIGKILL)
    # The new daemon serves vm1 with what add-vm said, from the journal alone.
    assert replayed is not None, log2
    assert (replayed["origin"], replayed["qmp"], replayed["mode"], replayed["devices"]) == (
        "journal", str(g.qmp_path), "stop-on-reset", [NIC1])
    assert after["connected"] is True
    assert after["stale"] is False
    for cycle in resets:       # coordinated: the NIC's FLR under a stopped guest, then resumed
        assert cycle["outcome"] == "resumed", cycle
        assert [d["key"] for d in cycle["report"]["domains"]] == [f"function:{NIC1}"]
    # Exactly one registration was ever journaled: the restart added none.
    assert [r["phase"] for r in records if r["phase"] in ("add-vm", "remove-vm")] == ["add-vm"]
    assert rc2 == 0, log2
    print(f"{how}: vm1 coordinated again ({after['cycles']} cycles) {served_after:.2f} s "
          "after the new daemon was started")


async def test_remove_vm_is_honoured_and_config_wins_across_a_restart() -> None:
    with short_tmpdir() as wd:
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        async with daemon_on(wd, host) as d1:
            await d1.add_vm("kept", str(wd / "kept.qmp"), [NIC1], None)
            await d1.add_vm("gone", str(wd / "gone.qmp"), [GPU], "stop-on-reset")
            await d1.add_vm("clash", str(wd / "clash.qmp"), [SOUND], None)
            removed = await d1.remove_vm("gone", release=False)
        # The next daemon's configuration has a VM named "clash" of its own.
        cfg = parse_config({
            "daemon": {"journal": str(wd / "journal.jsonl"), "control_socket": ""},
            "sim": {"topology": str(DEMO), "time_scale": 0.01},
            "policy": {"connect_backoff_max": 0.3},
            "vm": [{"name": "clash", "qmp": str(wd / "configured.qmp")}],
        }, "test")
        d2 = Daemon(cfg, host=host, control=False)
        task = asyncio.create_task(d2.run())
        try:
            async with asyncio.timeout(10):
                await d2.started.wait()
            served = {r["name"]: r for r in await d2.query_vms()}
            # Identical add-vm: a no-op. Different, for a stale replayed VM: replaces it.
            again = await d2.add_vm("kept", str(wd / "kept.qmp"), [NIC1], "park")
            with pytest.raises(ConfigError, match=r"'clash' already exists with qmp .*configured\.qmp"):
                await d2.add_vm("clash", str(wd / "clash.qmp"), [SOUND], None)
            replaced = await d2.add_vm("kept", str(wd / "kept2.qmp"), [NIC1], None)
            with pytest.raises(ConfigError, match=r"'kept' already exists with qmp .*kept2\.qmp"):
                await d2.add_vm("kept", str(wd / "kept.qmp"), [NIC1], None)  # no longer stale
        finally:
            d2.request_stop()
            await asyncio.wait_for(task, 30)
        records = read_journal(wd / "journal.jsonl")

    assert removed["persisted"] is True
    assert set(served) == {"kept", "clash"}
    assert (served["kept"]["origin"], served["kept"]["stale"], served["kept"]["devices"]) == (
        "journal", True, [NIC1])                  # its QEMU is gone: kept, marked stale
    assert (served["clash"]["origin"], served["clash"]["qmp"]) == ("config", str(wd / "configured.qmp"))
    assert again["added"] is False
    assert again["stale"] is True
    assert replaced["added"] is True
    assert replaced["qmp"] == str(wd / "kept2.qmp")
    assert replaced["origin"] == "runtime"
    regs = [(r["phase"], r["vm"]) for r in records if r["phase"] in ("add-vm", "remove-vm")]
    assert regs == [("add-vm", "kept"), ("add-vm", "gone"), ("add-vm", "clash"), ("remove-vm", "gone"),
                    ("add-vm", "kept")]
    # None of this looks like a reset cycle to the next start.
    assert unfinished_cycles(records) == {}
    assert list(registered_vms(records)) == ["clash", "kept"]


def test_registered_vms_folds_adds_and_removes_and_skips_damaged_records() -> None:
    def add(vm: str, qmp: object = "/q", devices: object = (), mode: object = "park") -> dict[str, Any]:
        devs = list(devices) if isinstance(devices, tuple) else devices
        return {"vm": vm, "cycle": f"reg-{vm}", "phase": "add-vm", "qmp": qmp, "devices": devs,
                "mode": mode}

    recs = [add("a"), add("b", devices=(NIC1,)), {"vm": "a", "cycle": "reg-x", "phase": "remove-vm"},
            add("c", qmp=None), add("d", devices="0000:01:00.0"), add("e", mode=3),
            add("b", qmp="/q2"), {"vm": "z", "cycle": "reg-y", "phase": "remove-vm"}]
    got = registered_vms(recs)
    assert list(got) == ["b"]
    assert got["b"]["qmp"] == "/q2"
    assert unfinished_cycles(recs) == {}


@qemu
@pytest.mark.qemu
async def test_hook_reconnect_registers_the_guest_once() -> None:
    with short_tmpdir() as wd:
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        sock = wd / "c.sock"
        qmp = wd / "vm1.qreset.qmp"
        xml = domain_xml("vm1", [NIC1], qmp)
        # The guest runs; the daemon never heard of it (it was down at 'started',
        # or lost its journal). libvirtd restarts and calls 'reconnect'.
        guest = QemuGuest("vm1", wd, extra=commandline_args(xml))
        guest.start()
        try:
            await guest.await_sockets()
            async with daemon_on(wd, host) as daemon:
                outs = []
                for _ in range(2):  # twice: libvirtd may restart again; the second is a no-op
                    rc, out, err = await hook(sock, "vm1", "reconnect", "begin", "-", xml=xml)
                    outs.append((rc, out, err))
                monitor = daemon.monitors["vm1"]
                async with asyncio.timeout(20):
                    while monitor.cycles < 2:
                        await asyncio.sleep(0.05)
                again = await daemon.add_vm("vm1", str(qmp), [NIC1], "stop-on-reset")
                with pytest.raises(ConfigError, match=r"'vm1' already exists with devices 0000:01:00.0"):
                    await daemon.add_vm("vm1", str(qmp), [GPU], "stop-on-reset")
                history = [c for c in daemon.history if c["vm"] == "vm1"]
                still = daemon.monitors["vm1"] is monitor
        finally:
            guest.stop()
        records = read_journal(wd / "journal.jsonl")

    assert outs == [(0, "", "")] * 2
    assert monitor.mode.value == "stop-on-reset"
    assert monitor.qmp == qmp
    assert again["added"] is False
    assert still
    assert [r["phase"] for r in records if r["phase"] in ("add-vm", "remove-vm")] == ["add-vm"]
    assert history
    assert all(c["outcome"] == "resumed" for c in history)
    assert all(c["report"]["domains"][0]["key"] == f"function:{NIC1}" for c in history)


@qemu
@pytest.mark.qemu
async def test_stale_replayed_vm_connects_at_once_when_the_hook_says_its_guest_started(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replayed VM whose QEMU was gone waits out a long backoff unless told the guest is back."""
    with short_tmpdir() as wd:
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        sock = wd / "c.sock"
        guest = QemuGuest("vm1", wd, paused=True)
        xml = domain_xml("vm1", [NIC1], guest.qmp_path)
        async with daemon_on(wd, host) as d1:
            await d1.add_vm("vm1", str(guest.qmp_path), [NIC1], "stop-on-reset")
        # Every retry after the first waits 30 s, as a backoff grown to its cap does.
        monkeypatch.setattr("qreset.vm.backoff_delay", lambda attempt, cap: 30.0)
        async with daemon_on(wd, host) as d2:
            monitor = d2.monitors["vm1"]
            await asyncio.sleep(0.3)                         # QEMU absent: into the long wait
            stale = (await d2.query_vms())[0]
            guest.start()
            try:
                await guest.await_sockets()
                t0 = time.monotonic()
                rc, out, err = await hook(sock, "vm1", "started", "begin", "-", xml=xml)
                await d2.wait_event("QRESET_VM_CONNECTED", lambda e: e["vm"] == "vm1", timeout=10,
                                    past=True)
                connected_after = time.monotonic() - t0
                row = (await d2.query_vms())[0]
                ctl = await guest.ctl()
                try:
                    await ctl.execute("cont")
                    async with asyncio.timeout(20):
                        while monitor.cycles < 1:
                            await asyncio.sleep(0.05)
                finally:
                    await ctl.disconnect()
                same = d2.monitors["vm1"] is monitor
            finally:
                guest.stop()

    assert (rc, out, err) == (0, "", "")
    assert (stale["origin"], stale["stale"], stale["connected"]) == ("journal", True, False)
    assert connected_after < 3.0                 # not the 30 s backoff
    assert (row["stale"], row["connected"]) == (False, True)
    assert same                                  # a no-op: the same monitor, nudged
    print(f"stale VM connected {connected_after:.2f} s after the hook's add-vm")


@qemu
@pytest.mark.qemu
async def test_daemon_sigkilled_mid_cycle_of_a_runtime_vm_next_daemon_finishes_it() -> None:
    """The open cycle of a VM known only from add-vm is finished by the next daemon, as a configured one's."""
    lpt = "0000:06:01.0"    # a bus reset with SOUND (consented): long enough, at time_scale 1, to kill in
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,):
        sock, jpath, cfg = wd / "c.sock", wd / "journal.jsonl", wd / "qreset.toml"
        cfg.write_text(
            f'[daemon]\njournal = "{jpath}"\ncontrol_socket = "{sock}"\n'
            f'[sim]\ntopology = "{DEMO}"\ntime_scale = 1.0\n'
            f'[policy]\nmode = "park"\nallow = ["{SOUND}"]\nconnect_backoff_max = 0.3\n')
        d1 = await start_daemon(cfg, sock, wd / "d1.log")
        d2: asyncio.subprocess.Process | None = None
        ctl = await g.ctl()
        try:
            await ctl_call(sock, "add-vm", name="vm1", qmp=str(g.qmp_path), devices=[lpt])
            async with asyncio.timeout(10):
                while not (await vm_row(sock, "vm1") or {}).get("connected"):
                    await asyncio.sleep(0.05)
            await ctl.execute("cont")
            parked = await asyncio.to_thread(
                wait_journal_record, jpath, lambda r: r.get("phase") == "cycle-start", 20)  # park: held
            d1.send_signal(signal.SIGKILL)
            await asyncio.wait_for(d1.wait(), 5)
            held = await status(ctl)
            t0 = time.monotonic()
            d2 = await start_daemon(cfg, sock, wd / "d2.log")
            async with asyncio.timeout(10):
                while await status(ctl) != "running":
                    await asyncio.sleep(0.01)
            resumed_after = time.monotonic() - t0
            done = await asyncio.to_thread(
                wait_journal_record, jpath,
                lambda r: r.get("cycle") == parked["cycle"] and r.get("recovered"), 5)
            d2.send_signal(signal.SIGTERM)
            await asyncio.wait_for(d2.wait(), 20)
        finally:
            await ctl.disconnect()
            for p in (d1, d2):
                if p is not None and p.returncode is None:
                    p.kill()
                    await p.wait()
        log2 = (wd / "d2.log").read_text()

    assert held == "shutdown"                    # parked, with no daemon to finish the cycle
    assert "has an open cycle but is not configured" not in log2
    assert done["vm"] == "vm1"
    assert done["vm_resumed"] is True
    # How soon is a figure (docs/operators.md, bench), not a wall-clock assert: Python's
    # start alone took 2-3 s on a loaded 2-core host. The guest running again is the check.
    print(f"runtime VM parked at SIGKILL resumed {resumed_after:.2f} s after the new daemon was started")
