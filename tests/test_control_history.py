"""
query-resets paging (qreset.history.page): pages joined are the filtered
history, in order; and ``qreset history`` against a real daemon and journal.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from qreset.config import parse_config
from qreset.daemon import HISTORY_MAX, Daemon
from qreset.history import ORDER_SLACK_S, CursorError, page
from qreset.pci.sim import SimHost

ROOT = Path(__file__).resolve().parent.parent


def _rows(n: int) -> list[dict[str, Any]]:
    """Newest first; two cycles end in the same second each time (equal t, ids decide)."""
    return [{"t": 1000.0 - i // 2, "vm": "ab"[i % 2], "cycle": f"c{n - i:04d}"} for i in range(n)]


def _all_pages(rows: list[dict[str, Any]], limit: int, **filters: Any) -> list[list[dict[str, Any]]]:
    pages = []
    before = None
    while True:
        got = page(rows, limit=limit, before=before, **filters)
        pages.append(got["resets"])
        before = got["next"]
        if before is None:
            return pages


@pytest.mark.parametrize("limit", [1, 3, 7, 100])
def test_pages_cover_everything_once(limit: int) -> None:
    rows = _rows(40)
    pages = _all_pages(rows, limit, vm=None, since=None, until=None)
    assert [r for p in pages for r in p] == rows
    assert all(len(p) == limit for p in pages[:-1])


def test_filters_and_cursor_together() -> None:
    rows = _rows(40)
    want = [r for r in rows if r["vm"] == "b" and 985 <= r["t"] <= 995]
    pages = _all_pages(rows, 2, vm="b", since=985.0, until=995.0)
    assert [r for p in pages for r in p] == want
    assert len(want) == 11


def test_stops_reading_one_past_the_page_and_past_since() -> None:
    read: list[int] = []

    def stream() -> Any:
        for i, row in enumerate(_rows(1000)):
            read.append(i)
            yield row

    got = page(stream(), vm=None, limit=5, before=None, since=None, until=None)
    assert len(got["resets"]) == 5
    assert got["next"] is not None
    assert len(read) == 6
    read.clear()
    got = page(stream(), vm=None, limit=500, before=None, since=900.0, until=None)
    assert len(got["resets"]) == 202  # t 1000..900, two rows a second
    assert len(read) == 2 * (100 + ORDER_SLACK_S) + 3  # rows down to t 840, then one older


def test_rows_slightly_out_of_time_order_are_paged_once() -> None:
    """Concurrent cycles may reach the journal in another order than their end times."""
    rows = _rows(30)
    rows[4]["t"], rows[5]["t"] = rows[5]["t"] - 0.5, rows[4]["t"] + 0.5
    for limit in (1, 2, 3, 5):
        pages = _all_pages(rows, limit, vm=None, since=None, until=None)
        assert [r for p in pages for r in p] == rows


def test_cursor_of_a_row_gone_gives_an_empty_last_page() -> None:
    rows = _rows(40)
    first = page(rows, vm=None, limit=10, before=None, since=None, until=None)
    rest = [r for r in rows[10:] if r["cycle"] != rows[9]["cycle"]]
    assert page(rest, vm=None, limit=10, before=first["next"], since=None, until=None) == {
        "resets": [], "next": None}


def test_last_page_has_no_next_and_bad_cursor_is_one_line() -> None:
    assert page(_rows(3), vm=None, limit=3, before=None, since=None, until=None)["next"] is None
    assert page([], vm=None, limit=3, before=None, since=None, until=None) == {"resets": [], "next": None}
    for bad in ("", "nonsense", "nan/c1", "inf/c1"):
        with pytest.raises(CursorError, match="'before' is not a cursor returned as 'next'"):
            page(_rows(3), vm=None, limit=3, before=bad, since=None, until=None)


# ---------------------------------------------------------------- the daemon, its journal and the CLI


async def test_history_reaches_past_cycles_in_the_journal(tmp_path: Path) -> None:
    """
    ``qreset history`` against a daemon whose journal holds more cycles than
    it keeps in memory (issue 13): the oldest ones are reached, by VM and time.
    """
    journal = tmp_path / "journal.jsonl"
    n = HISTORY_MAX + 2000
    t0 = 1_700_000_000.0
    with journal.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"t": t0 + i, "vm": f"vm{i % 2 + 1}", "cycle": f"vm-{i}",
                                "phase": "resumed", "outcome": "resumed"}) + "\n")
    sock = Path(tempfile.mkdtemp(prefix="qrh", dir="/tmp")) / "c.sock"  # sun_path holds 107 bytes
    cfg = parse_config({
        "daemon": {"journal": str(journal), "control_socket": str(sock)},
        "sim": {"topology": str(ROOT / "configs" / "sim" / "demo.toml")},
    }, "test")
    daemon = Daemon(cfg, host=SimHost.from_toml(ROOT / "configs" / "sim" / "demo.toml"))
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(30):
            await daemon.started.wait()
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0 + 99))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qreset", "history", "--socket", str(sock), "--vm", "vm2",
            "--until", when, "--limit", "1000", "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 30)
        shutil.rmtree(sock.parent, ignore_errors=True)
    assert (proc.returncode, err) == (0, b"")
    # The first 100 cycles, vm2's half of them, newest first: all older than the in-memory ring.
    assert [r["cycle"] for r in json.loads(out)] == [f"vm-{i}" for i in range(99, 0, -2)]
