"""
The scale bench's on-demand guest (bench.firmware) and its bookkeeping (bench.scale_stats,
bench.scale_fleet.JournalTail): the image's layout, a real QEMU guest resetting exactly once
per injected NMI, and the lost-cycle / overhead arithmetic the bench's verdict rests on.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from bench import firmware
from bench.scale_fleet import MACHINE, JournalTail, make_plan
from bench.scale_stats import Tracker, cycle_figures
from tests.qemu_helpers import die_with_parent, have_qemu, qemu_command, short_tmpdir, track


def test_image_layout() -> None:
    img = firmware.image()
    assert len(img) == 0x10000
    # Reset vector: jmp far F000:0000, where the code starts with cli.
    assert img[0xFFF0:0xFFF5] == b"\xEA\x00\x00\x00\xF0"
    assert img[0] == 0xFA
    listing = firmware.listing()
    # The NMI vector points at the handler, whose first bytes write 0x06 to port 0xCF9.
    nmi = int(next(line for line in listing.splitlines() if "SYS_RST" in line).split()[0], 16)
    assert img[nmi:nmi + 6] == b"\xB0\x06\xBA\xF9\x0C\xEE"
    assert b"\xC7\x06\x08\x00" + nmi.to_bytes(2, "little") in img
    # LINT1 programmed as NMI (unmasked), or inject-nmi is dropped.
    assert b"\x66\x67\xC7\x05\x60\x03\xE0\xFE\x00\x84\x00\x00" in img


def _qemu(fw: Path, debug: Path, ctl: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([
        *qemu_command(), "-machine", MACHINE, "-accel", "tcg", "-m", "16", "-nodefaults", "-no-user-config",
        "-display", "none", "-bios", str(fw), "-debugcon", f"file:{debug}",
        "-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off", "-mon", "chardev=ctl,mode=control",
    ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent())  # noqa: PLW1509 - only prctl runs in it
    track(proc)
    return proc


@pytest.mark.qemu
@pytest.mark.skipif(not have_qemu(), reason="needs qemu-system-x86_64")
async def test_guest_resets_once_per_nmi() -> None:
    with short_tmpdir() as wd:
        fw = firmware.write_image(wd / "fw.bin")
        debug, ctl = wd / "debug", wd / "ctl"
        proc = _qemu(fw, debug, ctl)
        client = QMPClient("fw-test")
        try:
            async with asyncio.timeout(20):
                while not ctl.exists():
                    await asyncio.sleep(0.05)
                await client.connect(str(ctl))
                for n in range(1, 4):
                    while debug.read_bytes() != b"FR" * n:  # armed again after each reset
                        await asyncio.sleep(0.02)
                    await client.execute("inject-nmi")
                while debug.read_bytes() != b"FR" * 4:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)
                assert debug.read_bytes() == b"FR" * 4  # one reset per NMI, none of its own
                st = await client.execute("query-status")
                assert isinstance(st, dict)
                assert st["status"] == "running"
        finally:
            await client.disconnect()
            proc.terminate()
            proc.wait(timeout=10)


def _summary(vm: str, cid: str, total: float, assert_s: float, lock_s: float) -> dict[str, object]:
    return {"t": 100.5, "vm": vm, "cycle": cid, "phase": "resumed", "outcome": "resumed",
            "event_ts": 100.0,
            "durations": {"event_to_parked_ms": 5.0, "engine_ms": 20.0, "resume_ms": 7.0,
                          "total_ms": total},
            "report": {"domains": [{"phases": {"lock": lock_s, "assert": assert_s, "settle": 0.0,
                                               "poll": 0.001}}]}}


def test_figures_subtract_method_and_lock() -> None:
    f = cycle_figures(_summary("g0", "c1", 40.0, 0.010, 0.004))
    assert f["method"] == pytest.approx(11.0)
    assert f["overhead"] == pytest.approx(29.0)
    assert f["overhead_nolock"] == pytest.approx(25.0)
    assert f["journal"] == pytest.approx(8.0)   # 40 - 5 - 20 - 7
    assert f["durable"] == pytest.approx(500.0)
    assert cycle_figures({"vm": "g0", "phase": "failed", "error": "cancelled"}) == {}


def test_tracker_finds_lost_and_unanswered() -> None:
    t = Tracker(frozenset())
    t.injected.update({"g0": 2, "g1": 1})
    for rec in ({"vm": "g0", "cycle": "a", "phase": "cycle-start"},
                {"vm": "g0", "cycle": "a", "phase": "parked"},
                {"vm": "g0", "cycle": "x", "phase": "note"},
                _summary("g0", "a", 30.0, 0.001, 0.0),
                {"vm": "g0", "cycle": "b", "phase": "cycle-start"},   # never ends: lost
                {"vm": "g1", "cycle": "c", "phase": "cycle-start"},
                {"vm": "g1", "cycle": "c", "phase": "failed", "outcome": "failed"}):
        t.add(rec)
    s = t.summary()
    assert s["lost"] == ["b"]
    assert s["cycles"] == 2
    assert s["failures"] == 1
    assert s["unanswered"] == 0
    assert t.terminals("g0") == 1
    t.injected["g1"] += 1  # an NMI no cycle answered
    assert t.summary()["unanswered"] == 1


def test_journal_tail_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    tail = JournalTail(path)
    assert tail.read() == []
    with path.open("w") as f:
        f.write(json.dumps({"n": 1}) + "\n" + '{"n": 2')  # a torn last line waits
    assert [r["n"] for r in tail.read()] == [1]
    with path.open("a") as f:
        f.write("}\n")
    path.rename(tmp_path / "journal.jsonl.1")
    path.write_text(json.dumps({"n": 3}) + "\n")
    assert [r["n"] for r in tail.read()] == [2, 3]
    assert tail.rotations == 1
    tail.close()


def test_plan_shares_buses_and_gives_each_vm_one_function(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, 70, 0.01)
    assert len(plan.devices) == 70
    assert len(set(plan.devices.values())) == 70
    assert len(plan.shared) == 4
    text = plan.config.read_text()
    for vm in plan.shared:  # consent for the bus resets that hit the other VMs' functions
        assert f'"{plan.devices[vm]}"' in text.split("allow = ")[1].split("\n")[0]
