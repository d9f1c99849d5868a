"""The journal on its own: torn tails, streaming reads, history over segments."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from qreset.journal import Journal, iter_history, read_records, registered_vms, unfinished_cycles


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
