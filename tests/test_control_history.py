"""query-resets paging (qreset.history.page): pages joined are the filtered history, in order."""

from __future__ import annotations

from typing import Any

import pytest

from qreset.history import ORDER_SLACK_S, CursorError, page


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
