"""
Pages of finished reset cycles for ``query-resets`` / ``qreset history``.

Why pages: a busy host ends thousands of cycles an hour and each summary
carries its plan and report (a few KiB); one reply holding all of them is
MiBs that the daemon must buffer and the client must parse at once. A page
is at most ``limit`` cycles, newest first, and ends with a cursor (``next``)
naming the last cycle given; the next request passes it as ``before`` and
gets the cycles that ended earlier.

The cursor names the last row given: its cycle id and end time ``t``. The
next page skips rows up to that cycle, so it needs no state in the daemon
and reads the same from any source ordered newest first (the in-memory ring,
the journal's segments), even where concurrent cycles' end times are not
quite in file order. Should the cursor's cycle be gone (fallen out of the
ring, rotated out of the journal: everything older is gone too), the scan
gives up once rows are :data:`ORDER_SLACK_S` older than the cursor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from qreset.errors import QResetError

__all__ = ["ORDER_SLACK_S", "CursorError", "page", "row_key"]

_SEP = "/"

#: How far out of time order a source may give its rows, in seconds: end times
#: are taken when a record is written, and concurrent cycles may write in a
#: different order than they took their times. Our bound, generous: the
#: journal writes a record within milliseconds of its time.
ORDER_SLACK_S = 60.0


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
    page, and stops once rows are :data:`ORDER_SLACK_S` older than ``since``,
    so a streaming source is never read to its end for one page.
    """
    if limit < 1:
        raise QResetError(f"limit must be at least 1, got {limit}")
    cursor = decode_cursor(before) if before is not None else None
    rows: list[dict[str, Any]] = []
    for row in newest_first:
        when, cycle = row_key(row)
        if since is not None and when < since - ORDER_SLACK_S:
            break
        if cursor is not None:  # still before the previous page's last row
            if cycle == cursor[1]:
                cursor = None
            elif when < cursor[0] - ORDER_SLACK_S:
                break  # that row is gone, and with it everything older
            continue
        if (since is not None and when < since) or (until is not None and when > until):
            continue
        if vm is not None and row.get("vm") != vm:
            continue
        if len(rows) == limit:
            return {"resets": rows, "next": encode_cursor(row_key(rows[-1]))}
        rows.append(dict(row))
    return {"resets": rows, "next": None}
