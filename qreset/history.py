"""
Pages of finished reset cycles for ``query-resets`` / ``qreset history``.

Why pages: a busy host ends thousands of cycles an hour and each summary
carries its plan and report (a few KiB); one reply holding all of them is
MiBs that the daemon must buffer and the client must parse at once. A page
is at most ``limit`` cycles, newest first, and ends with a cursor (``next``)
naming the last cycle given; the next request passes it as ``before`` and
gets the cycles that ended earlier.

The cursor is the last row's (end time ``t``, cycle id), compared as a pair:
it needs no state in the daemon, survives rows falling out of the in-memory
ring or the journal being rotated between pages, and reads the same from
any source of rows ordered newest first. A wall-clock step backwards while
cycles end can misplace those cycles across a page boundary; nothing else does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from qreset.errors import QResetError

__all__ = ["CursorError", "page", "row_key"]

_SEP = "/"


class CursorError(QResetError):
    """A ``before`` cursor that no ``next`` of ours could have been."""


def row_key(row: Mapping[str, Any]) -> tuple[float, str]:
    """A cycle's place in history: its end time (journal ``t``; the event's time without one) and id."""
    t = row.get("t", row.get("event_ts"))
    when = float(t) if isinstance(t, int | float) and not isinstance(t, bool) else 0.0
    return when, str(row.get("cycle", ""))


def encode_cursor(key: tuple[float, str]) -> str:
    return f"{key[0]!r}{_SEP}{key[1]}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    when, sep, cycle = cursor.partition(_SEP)
    try:
        value = float(when)
    except ValueError:
        value = math.nan
    if not sep or not math.isfinite(value):
        raise CursorError(f"'before' is not a cursor returned as 'next': {cursor[:80]!r}")
    return value, cycle


def page(newest_first: Iterable[Mapping[str, Any]], *, vm: str | None, limit: int,
         before: str | None, since: float | None, until: float | None) -> dict[str, Any]:
    """
    ``{"resets": [...], "next": CURSOR | None}`` from rows ordered newest
    first. ``since``/``until`` bound the end time (inclusive); ``next`` is
    None when no older matching row exists. Reads at most one row past the
    page (and stops at the first row older than ``since``), so a streaming
    source is never read to its end for one page.
    """
    if limit < 1:
        raise QResetError(f"limit must be at least 1, got {limit}")
    start = decode_cursor(before) if before is not None else None
    rows: list[dict[str, Any]] = []
    for row in newest_first:
        key = row_key(row)
        if since is not None and key[0] < since:
            break
        if start is not None and key >= start:
            continue
        if until is not None and key[0] > until:
            continue
        if vm is not None and row.get("vm") != vm:
            continue
        if len(rows) == limit:
            return {"resets": rows, "next": encode_cursor(row_key(rows[-1]))}
        rows.append(dict(row))
    return {"resets": rows, "next": None}
