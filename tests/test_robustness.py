"""
Bad input never strands a guest: odd QMP replies, damaged journals, shared devices.

QEMU is real (tests/qemu_helpers.py); where a test needs a reply real QEMU
never sends, a :class:`tests.qmp_proxy.QmpProxy` sits between the daemon and
QEMU and rewrites just that reply. Each test checks the three things the
quality bar asks: one clear line naming what and where, the daemon still
serving, the guest running (never left parked).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from qreset.config import Config, parse_config
from qreset.errors import QResetError
from qreset.pci.address import PciAddress
from qreset.pci.sim import SimHost
from tests.daemon_helpers import DEMO, NIC1, running, wait_running
from tests.qemu_helpers import guests, have_qemu, short_tmpdir, status
from tests.qmp_proxy import Cut, Fail, QmpProxy, Reply, Rule

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not have_qemu(), reason="qemu-system-x86_64 not installed (scripts/install-deps)"),
]

NOT_ON_HOST = "0000:7f:00.0"


def config(workdir: Path, qmp: Path, devices: list[str], mode: str = "park") -> Config:
    return parse_config({
        "daemon": {"journal": str(workdir / "journal.jsonl"), "control_socket": ""},
        "sim": {"topology": str(DEMO), "time_scale": 0.01},
        "policy": {"mode": mode, "connect_backoff_max": 0.3},
        "vm": [{"name": "vm1", "qmp": str(qmp), "device": [{"host": d} for d in devices]}],
    }, "test")


def qom_get(dev: str, prop: str, action: Reply | Fail) -> Rule:
    return Rule("qom-get", action, {"path": f"/machine/peripheral/{dev}", "property": prop})


async def test_odd_inventory_replies_are_skipped_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    """
    query-pci with a string vendor and a null class, vfio-pci devices whose
    host is not a BDF, has no address at all, or is not on the host: before,
    ``int("x")`` escaped the inventory, the monitor crashed at every connect
    (after set-action had made resets park the guest) and the VM was never served.
    """
    rules = [
        Rule("query-pci", Reply([{"bus": 0, "devices": [
            {"bus": 0, "slot": 1, "function": 0, "id": {"vendor": "x", "device": None},
             "class_info": None, "qdev_id": "hd0"}]}])),
        Rule("qom-list", Reply([{"name": n, "type": "child<vfio-pci>"} for n in ("hd0", "hd1", "hd2")]),
             {"path": "/machine/peripheral"}),
        qom_get("hd0", "sysfsdev", Fail("Property 'vfio-pci.sysfsdev' not found")),
        qom_get("hd0", "host", Reply(NOT_ON_HOST)),
        qom_get("hd1", "sysfsdev", Reply("")),
        qom_get("hd1", "host", Reply("zz:zz.9")),
        qom_get("hd2", "sysfsdev", Reply("/sys/bus/mdev/devices/0f3c1c4e-0000-4000-8000-000000000000")),
        qom_get("hd2", "host", Reply("")),
    ]
    caplog.set_level(logging.WARNING)
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,):
        async with QmpProxy(wd / "proxy.sock", g.qmp_path, rules):
            host = SimHost.from_toml(DEMO, time_scale=0.01)
            async with running(config(wd, wd / "proxy.sock", [NIC1]), host) as daemon:
                mon = daemon.monitors["vm1"]
                owned = [str(a) for a in mon.owned]
                summary = await daemon.reset_vm("vm1")
                st = await wait_running(g)
                vms = await daemon.query_vms()
    assert owned == [NIC1, NOT_ON_HOST]      # hd0 through its host property; hd1/hd2 skipped
    assert summary["vm_resumed"] is True
    assert summary["outcome"] == "failed"
    assert NOT_ON_HOST in summary["error"]
    assert st == "running"
    assert vms[0]["connected"] is True
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("qreset")]
    assert any("/machine/peripheral/hd1" in m and "zz:zz.9" in m for m in lines), lines
    assert any("/machine/peripheral/hd2" in m and "no host PCI address" in m for m in lines), lines
    assert all("\n" not in m for m in lines)
    assert not any(r.exc_info for r in caplog.records)  # no traceback: nothing crashed


def _write_journal(path: Path, records: list[dict[str, Any]], garbage: bool = True) -> None:
    lines = [json.dumps(r) for r in records]
    if garbage:
        lines[1:1] = ["not json at all", "[1, 2, 3]", '{"vm": 5, "cycle": "x"}', "\x00\x01"]
    path.write_text("\n".join(lines) + "\n")


async def test_an_old_note_record_is_not_a_cycle_to_recover() -> None:
    """
    The "QMP connection lost during a cycle" note used to be written under the
    cycle id ``-``: at the next start it looked like an open cycle, and the
    "recovery" sent ``cont`` to a guest held in prelaunch (-S) by whoever
    started it. Garbage lines around it are skipped.
    """
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,):
        base = {"t": time.time(), "vm": "vm1"}
        _write_journal(wd / "journal.jsonl", [
            {**base, "cycle": "vm1-1", "phase": "cycle-start"},
            {**base, "cycle": "-", "phase": "note", "note": "QMP connection lost during a cycle"},
            {**base, "cycle": "vm1-1", "phase": "failed", "outcome": "failed"},
        ])
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        async with running(config(wd, g.qmp_path, [NIC1]), host) as daemon:
            await asyncio.sleep(0.5)
            cycles = daemon.monitors["vm1"].cycles
            ctl = await g.ctl()
            try:
                st = await status(ctl)
            finally:
                await ctl.disconnect()
    assert cycles == 0
    assert st == "prelaunch"  # still held; nobody asked for it to run


@pytest.mark.parametrize("listed", [5, NIC1], ids=["number", "string"])
async def test_damaged_identity_record_does_not_decide_recovery(listed: object) -> None:
    """
    An open cycle whose engine-done record lists ``identity_changed`` as a
    number crashed the monitor at every connect (iterating an int); as a
    string, its characters were read as changed devices and the guest was
    left stopped. Only a list of addresses is a decision to keep.
    """
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,):
        base = {"t": time.time(), "vm": "vm1", "cycle": "vm1-dead-1"}
        _write_journal(wd / "journal.jsonl", [
            {**base, "phase": "cycle-start"}, {**base, "phase": "parked"},
            {**base, "phase": "engine-done", "ok": True, "identity_changed": listed},
        ])
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        async with running(config(wd, g.qmp_path, [NIC1]), host) as daemon:
            first = daemon.history[-1]
    assert first["recovered"] is True
    assert first["outcome"] == "resumed"
    assert first["vm_resumed"] is True


async def test_a_device_another_vm_owns_is_never_reset_for_this_one() -> None:
    """
    vm1's configuration lists NIC1; vm2's QEMU reports a vfio-pci device on
    NIC1 too. vm2's reset must not touch NIC1 (vm1's guest may be using it):
    the cycle fails with one line naming both VMs, and vm2 is resumed.
    """
    rules = [
        Rule("qom-list", Reply([{"name": "hd0", "type": "child<vfio-pci>"}]),
             {"path": "/machine/peripheral"}),
        qom_get("hd0", "sysfsdev", Reply(f"/sys/bus/pci/devices/{NIC1}")),
        qom_get("hd0", "host", Reply("")),
    ]
    with short_tmpdir() as wd, guests(wd, "vm1", "vm2", paused=True) as (g1, g2):
        async with QmpProxy(wd / "proxy.sock", g2.qmp_path, rules):
            cfg = parse_config({
                "daemon": {"journal": str(wd / "journal.jsonl"), "control_socket": ""},
                "sim": {"topology": str(DEMO), "time_scale": 0.01},
                "policy": {"mode": "park", "connect_backoff_max": 0.3},
                "vm": [{"name": "vm1", "qmp": str(g1.qmp_path), "device": [{"host": NIC1}]},
                       {"name": "vm2", "qmp": str(wd / "proxy.sock")}],
            }, "test")
            host = SimHost.from_toml(DEMO, time_scale=0.01)
            async with running(cfg, host) as daemon:
                vm2_devices = [str(a) for a in daemon.monitors["vm2"].owned]
                summary = await daemon.reset_vm("vm2")
                st = await wait_running(g2)
    assert vm2_devices == [NIC1]
    assert not [r for r in host.reset_log if PciAddress.parse(NIC1) in r.affected]
    assert summary["outcome"] == "failed"
    assert summary["vm_resumed"] is True
    assert f"{NIC1} is listed for VM vm2 and for VM vm1" in summary["error"]
    assert st == "running"


@pytest.mark.parametrize(("mode", "execute", "arguments"), [
    ("park", "set-action", {"reboot": "reset"}),
    ("park", "system_reset", {}),
    ("park", "set-action", {"reboot": "shutdown"}),
    ("park", "cont", {}),
    ("stop-on-reset", "cont", {}),
], ids=["park-set-action-reset", "park-system_reset", "park-set-action-shutdown", "park-cont",
        "stop-cont"])
async def test_connection_lost_at_each_resume_step(mode: str, execute: str,
                                                   arguments: dict[str, Any]) -> None:
    """
    The QMP connection drops at one step of a cycle's resume while QEMU lives
    on: the cycle fails with one line, the daemon reconnects, and the guest
    runs again. Before, after the guest's own reset (``prelaunch``) or in
    stop-on-reset mode (``paused``) nothing resumed it: the cycle was closed
    as failed and a reconnect found no open cycle.
    """
    rules = [Rule(execute, Cut(), arguments, times=1)]
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,):
        async with QmpProxy(wd / "proxy.sock", g.qmp_path, rules) as proxy:
            host = SimHost.from_toml(DEMO, time_scale=0.01)
            async with running(config(wd, wd / "proxy.sock", [NIC1], mode), host) as daemon:
                ctl = await g.ctl()
                try:
                    failed = asyncio.create_task(daemon.wait_event("QRESET_RESET_FAILED", timeout=10))
                    await ctl.execute("cont")  # the guest resets itself a few times a second
                    event = await failed
                    await daemon.wait_event("QRESET_VM_CONNECTED", timeout=10)
                    # It keeps rebooting (parked now and then): it must be seen running.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(3):
                            while (st := await status(ctl)) != "running":
                                await asyncio.sleep(0.01)
                finally:
                    await ctl.disconnect()
                connected = daemon.monitors["vm1"].connected
    assert rules[0].hits == 1, proxy.seen
    assert event["error"] == "QEMU went away during the cycle"
    assert event["vm_resumed"] is False
    assert connected
    assert st == "running"


async def test_add_vm_and_remove_vm_bad_requests_get_one_line_each() -> None:
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,):
        (wd / "plain").write_text("")
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        async with running(config(wd, g.qmp_path, [NIC1]), host) as daemon:
            errors: dict[str, str] = {}
            cases: dict[str, tuple[str, str, list[str]]] = {
                "relative": ("vm2", "qmp.sock", []),
                "empty": ("vm2", "", []),
                "directory": ("vm2", str(wd), []),
                "file": ("vm2", str(wd / "plain"), []),
                "duplicate": ("vm1", str(wd / "other.sock"), []),
                "same-socket": ("vm2", str(g.qmp_path), []),
                "owned": ("vm2", str(wd / "other.sock"), [NIC1]),
                "bad-bdf": ("vm2", str(wd / "other.sock"), ["zz:00.0"]),
            }
            for case, (name, qmp, devices) in cases.items():
                with pytest.raises(QResetError) as info:
                    await daemon.add_vm(name, qmp, devices, None)
                errors[case] = str(info.value)
            with pytest.raises(QResetError) as info:
                await daemon.remove_vm("nope", release=False)
            errors["remove-unknown"] = str(info.value)
            vms = sorted(m["name"] for m in await daemon.query_vms())
            st = await wait_running_or_prelaunch(g)
    assert vms == ["vm1"]
    assert st == "prelaunch"
    assert all("\n" not in e for e in errors.values())
    assert "absolute" in errors["relative"]
    assert "absolute" in errors["empty"]
    assert f"{wd} exists and is not a socket" in errors["directory"]
    assert "plain exists and is not a socket" in errors["file"]
    assert "already exists" in errors["duplicate"]
    assert "already used by VM 'vm1'" in errors["same-socket"]
    assert f"{NIC1} already assigned to VM 'vm1'" in errors["owned"]
    assert "zz:00.0" in errors["bad-bdf"]
    assert "'nope'" in errors["remove-unknown"]
    assert "vm1" in errors["remove-unknown"]


async def wait_running_or_prelaunch(g: Any) -> str:
    ctl = await g.ctl()
    try:
        return await status(ctl)
    finally:
        await ctl.disconnect()
