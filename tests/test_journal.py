"""The journal on its own: torn tails, streaming reads, history over segments."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from qreset.actions import last_actions
from qreset.errors import ConfigError
from qreset.journal import (
    Journal,
    iter_history,
    read_records,
    registered_vms,
    segment_paths,
    unfinished_cycles,
)
from qreset.journal_read import load_recovery
from tests.journal_helpers import fill, tmpfs


def _lines(path: Path) -> list[dict[str, Any]]:
    return list(read_records(path))


async def test_a_torn_tail_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    """
    A daemon killed mid-write leaves a last line without its newline; the
    next daemon's first record used to be glued to it (one malformed line)
    and lost at the next read, e.g. the recovery of the cycle left open.
    """
    path = tmp_path / "journal.jsonl"
    start = {"t": 1.0, "vm": "vm1", "cycle": "c1", "phase": "cycle-start"}
    path.write_text(json.dumps(start) + "\n" + '{"t": 2.0, "vm": "vm1", "cycle": "c1", "pha')
    journal = Journal(path)
    await journal.open()
    try:
        await journal.append({"vm": "vm1", "cycle": "c1", "phase": "resumed", "outcome": "resumed"})
    finally:
        await journal.close()
    recs = _lines(path)
    assert [r["phase"] for r in recs] == ["cycle-start", "resumed"]
    assert unfinished_cycles(recs) == {}


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _cycle(vm: str, n: int, t: float, outcome: str = "resumed") -> list[dict[str, Any]]:
    cid = f"{vm}-{n}"
    return [{"t": t, "vm": vm, "cycle": cid, "phase": "cycle-start"},
            {"t": t + 0.1, "vm": vm, "cycle": cid, "phase": outcome, "outcome": outcome}]


def test_history_is_newest_first_over_segments_with_filters_and_paging(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    old = [r for n in range(5) for r in _cycle("vm1" if n % 2 else "vm2", n, 100.0 + n)]
    new = [r for n in range(5, 10) for r in _cycle("vm1" if n % 2 else "vm2", n, 100.0 + n)]
    _write(path.with_name("journal.jsonl.1"), old)
    _write(path, [{"t": 104.5, "vm": "", "cycle": "checkpoint", "phase": "checkpoint",
                   "open": [], "registry": []}, *new])
    every = [r["cycle"] for r in iter_history(path)]
    assert every == [f"{'vm1' if n % 2 else 'vm2'}-{n}" for n in range(9, -1, -1)]
    assert [r["cycle"] for r in iter_history(path, vm="vm1")] == ["vm1-9", "vm1-7", "vm1-5", "vm1-3",
                                                                   "vm1-1"]
    assert [r["cycle"] for r in iter_history(path, since=103.0, until=107.0)] == ["vm2-6",
        "vm1-5", "vm2-4", "vm1-3"]
    first = [r["cycle"] for r in iter_history(path, limit=3)]
    second = [r["cycle"] for r in iter_history(path, limit=3, before=first[-1])]
    assert first + second == every[:6]
    assert list(iter_history(path, before="no-such-cycle")) == []


def test_history_reads_a_segment_bigger_than_a_block_and_skips_damage(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    recs = [r for n in range(3000) for r in _cycle("vm1", n, 1000.0 + n)]
    lines = [json.dumps(r) + "\n" for r in recs]
    lines.insert(len(lines) // 2, "garbage resumed\n")
    path.write_text("".join(lines) + '{"torn')
    got = [r["cycle"] for r in iter_history(path)]
    assert got == [f"vm1-{n}" for n in range(2999, -1, -1)]


def test_the_streaming_fold_matches_the_grouping_it_replaces() -> None:
    """Per VM, the latest cycle without a terminal record; later finished cycles supersede."""
    recs: list[dict[str, Any]] = [
        {"vm": "a", "cycle": "a1", "phase": "cycle-start"},
        {"vm": "b", "cycle": "b1", "phase": "cycle-start"},
        {"vm": "a", "cycle": "a1", "phase": "parked"},
        {"vm": "a", "cycle": "-", "phase": "note"},
        {"vm": "b", "cycle": "b1", "phase": "resumed"},
        {"vm": "b", "cycle": "b1", "phase": "parked"},      # late record of a finished cycle
        {"vm": "c", "cycle": "c1", "phase": "cycle-start"},
        {"vm": "c", "cycle": "c2", "phase": "poweroff"},    # a later finished cycle supersedes c1
        {"vm": "d", "cycle": "d1", "phase": "cycle-start"},
        {"vm": "d", "cycle": "d2", "phase": "cycle-start"},
        {"vm": "d", "cycle": "d1", "phase": "parked"},      # late record of the superseded cycle
        {"vm": "e", "cycle": "reg-1", "phase": "add-vm", "qmp": "/q", "devices": [], "mode": None},
    ]
    got = unfinished_cycles(recs)
    assert {vm: [r["phase"] for r in rs] for vm, rs in got.items()} == {
        "a": ["cycle-start", "parked"], "d": ["cycle-start"]}
    assert got["d"][0]["cycle"] == "d2"
    assert list(registered_vms(recs)) == ["e"]


def test_read_records_streams_without_reading_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    _write(path, _cycle("vm1", 1, time.time()))
    it = read_records(path)
    first = next(iter(it))
    assert first["phase"] == "cycle-start"


# ----------------------------------------------------------------------
# group commit, degraded mode, rotation (the writer)


async def test_concurrent_sync_appends_share_fsyncs(tmp_path: Path) -> None:
    """64 appenders at once: every record durable on return, far fewer fsyncs than records."""
    journal = Journal(tmp_path / "journal.jsonl")
    await journal.open()
    try:
        await asyncio.gather(*(journal.append({"vm": f"vm{i}", "cycle": f"c{i}", "phase": "parked"})
                               for i in range(64)))
        fsyncs = journal.fsyncs
    finally:
        await journal.close()
    assert len(_lines(tmp_path / "journal.jsonl")) == 64
    assert 1 <= fsyncs < 64


async def test_an_unsynced_append_is_in_the_file_when_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    await journal.open()
    try:
        await journal.append({"vm": "vm1", "cycle": "c1", "phase": "parked"}, sync=False)
        seen = _lines(path)  # another reader, before any fsync: the kernel has it
        await journal.flush()
    finally:
        await journal.close()
    assert [r["phase"] for r in seen] == ["parked"]


async def test_a_full_filesystem_degrades_the_journal_and_it_recovers(tmp_path: Path) -> None:
    """
    ENOSPC while running: append never raises, ``degraded`` says why, and when
    space returns the journal writes again, starting with a checkpoint that
    holds the cycle left open while records were lost.
    """
    with tmpfs(tmp_path / "fs") as fs:
        path = fs / "journal.jsonl"
        journal = Journal(path, retry_s=0.1)
        await journal.open()
        try:
            await journal.append({"vm": "vm1", "cycle": "c1", "phase": "cycle-start"})
            filler = fill(fs)
            # The file's last page still takes writes: go past it.
            for n in range(200):
                await journal.append({"vm": "vm1", "cycle": f"c{n}", "phase": "resumed", "pad": "x" * 64})
                if journal.degraded is not None:
                    break
            await journal.append({"vm": "vm2", "cycle": "c2", "phase": "cycle-start"}, sync=False)
            degraded = journal.degraded
            filler.unlink()
            async with asyncio.timeout(10):
                while journal.degraded is not None:
                    await asyncio.sleep(0.05)
            await journal.append({"vm": "vm2", "cycle": "c2", "phase": "parked"})
        finally:
            await journal.close()
        recovered = load_recovery(path)
    assert degraded is not None
    assert "No space left on device" in degraded
    assert {vm: [r["phase"] for r in recs] for vm, recs in recovered.unfinished().items()} == {
        "vm2": ["cycle-start", "parked"]}


async def test_an_unwritable_journal_at_start_degrades_instead_of_failing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", ro=True) as fs:
        journal = Journal(fs / "journal.jsonl")
        await journal.open()
        try:
            rec = await journal.append({"vm": "vm1", "cycle": "c1", "phase": "cycle-start"})
            degraded = journal.degraded
        finally:
            await journal.close()
    assert rec["phase"] == "cycle-start"
    assert degraded is not None
    assert "Read-only file system" in degraded


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
async def test_a_journal_that_is_not_a_regular_file_is_a_configuration_error(
        tmp_path: Path, kind: str) -> None:
    path = tmp_path / "journal.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path("/dev/full")
    journal = Journal(path)
    with pytest.raises(ConfigError) as info:
        async with asyncio.timeout(5):  # a FIFO used to block here forever
            await journal.open()
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


async def test_rotation_keeps_what_a_restart_needs_in_the_active_segment(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, segment_bytes=4096, segments=3)
    written: list[dict[str, Any]] = []
    await journal.open()
    try:
        written.append(await journal.append({"vm": "kept", "cycle": "reg-1", "phase": "add-vm",
                                             "qmp": "/q", "devices": [], "mode": "park"}))
        written.append(await journal.append({"vm": "open", "cycle": "o1", "phase": "cycle-start"}))
        written.append(await journal.append({"vm": "open", "cycle": "act-1", "phase": "actions",
                                             "qemu": "q1", "found": {"reboot": "reset"},
                                             "set": {"reboot": "shutdown"}}))
        for n in range(200):
            for phase in ("cycle-start", "parked", "resumed"):
                written.append(await journal.append(
                    {"vm": "busy", "cycle": f"b{n}", "phase": phase, "pad": "x" * 40},
                    sync=n % 2 == 0))
        written.append(await journal.append({"vm": "open", "cycle": "o1", "phase": "parked"}))
        rotations = journal.rotations
    finally:
        await journal.close()
    segments = segment_paths(path)
    assert rotations > 3
    assert [p.name for p in segments] == ["journal.jsonl", "journal.jsonl.1", "journal.jsonl.2",
                                          "journal.jsonl.3"]
    assert all(p.stat().st_size <= 4096 + 1024 for p in segments)
    assert next(iter(read_records(path)))["phase"] == "checkpoint"
    state = load_recovery(path)  # the active segment alone
    assert state.unfinished() == unfinished_cycles(written)
    assert state.registered() == registered_vms(written)
    assert state.actions() == last_actions(written)
    assert list(state.actions()) == ["open"]
    history = [r["cycle"] for r in iter_history(path, vm="busy")]
    assert history == [f"b{n}" for n in range(199, 199 - len(history), -1)]
    assert len(history) > 10


@pytest.mark.parametrize("moved", [True, False], ids=["after-move", "before-move"])
async def test_a_rotation_cut_short_by_a_crash_is_finished_or_undone(tmp_path: Path, moved: bool) -> None:
    path = tmp_path / "journal.jsonl"
    old = [{"t": 1.0, "vm": "vm1", "cycle": "c1", "phase": "cycle-start"}]
    ckpt = {"t": 2.0, "vm": "", "cycle": "checkpoint", "phase": "checkpoint", "open": old,
            "registry": []}
    _write(path.with_name("journal.jsonl.1") if moved else path, old)
    path.with_name("journal.jsonl.next").write_text(json.dumps(ckpt) + ("\n" if moved else ""))
    journal = Journal(path)
    state = await journal.open()
    await journal.close()
    assert not path.with_name("journal.jsonl.next").exists()
    assert [r["phase"] for r in state.unfinished()["vm1"]] == ["cycle-start"]


def test_a_degraded_status_is_a_metric() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from qreset.metrics import render

    def gauge(status: dict[str, Any]) -> float:
        text = render(status)[0].decode()
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "qreset_journal_degraded")

    assert gauge({"journal_degraded": "cannot write: No space left on device"}) == 1
    assert gauge({"journal_degraded": None}) == 0
