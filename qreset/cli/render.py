"""
Text output of the control-socket clients: aligned tables of rows, UTC
times, one line per event. Pure functions of the data; no I/O.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["cell", "format_event", "humanize", "status_cell", "table"]


#: Keys that name an item of a list of objects (a VM's devices as dicts).
LABEL_KEYS = ("address", "name", "id", "vm")


def label(item: Mapping[str, Any]) -> str | None:
    return next((str(item[k]) for k in LABEL_KEYS if isinstance(item.get(k), str | int)), None)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, list) and all(isinstance(v, dict) and label(v) for v in value):
        return ",".join(str(label(v)) for v in value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def is_flat(value: Any) -> bool:
    """Fits in a table cell: a scalar, a list of scalars or of labelled objects."""
    if isinstance(value, list):
        return all(not isinstance(v, dict | list) or (isinstance(v, dict) and label(v)) for v in value)
    return not isinstance(value, dict)


def table(rows: Sequence[Mapping[str, Any]], first: Sequence[str] = ()) -> list[str]:
    """
    Rows of dicts as aligned text columns. Columns are the keys with flat
    values, ``first`` ones leading, then in order of first appearance; nested
    values are left to ``--json``.
    """
    columns: list[str] = [c for c in first if any(c in r for r in rows)]
    for row in rows:
        for key, value in row.items():
            if key not in columns and is_flat(value):
                columns.append(key)
    if not columns:
        return []
    cells = [[c.upper() for c in columns]] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells]


def when(value: Any) -> Any:
    """UNIX times (the journal's ``t``) shown as UTC timestamps."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))
    return value


TIME_KEYS = ("t", "time", "started", "ended", "since", "start_time")


def humanize(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: when(v) if k in TIME_KEYS else v for k, v in row.items()}


# ---------------------------------------------------------------- commands


def status_cell(key: str, value: Any) -> str:
    """A status value; counters by name and percentile blocks as ``k=v`` pairs (unset ones left out)."""
    if key in TIME_KEYS:
        return cell(when(value))
    if isinstance(value, dict) and all(not isinstance(v, dict | list) for v in value.values()):
        return " ".join(f"{k}={cell(v)}" for k, v in value.items() if v is not None) or "-"
    return cell(value)



def format_event(event: Mapping[str, Any]) -> str:
    """One line: UTC time with microseconds, event name, data as key=value."""
    ts = event.get("timestamp")
    when = "-"
    if isinstance(ts, dict) and isinstance(ts.get("seconds"), int):
        micro = ts.get("microseconds", 0)
        micro = micro if isinstance(micro, int) else 0
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts["seconds"])) + f".{micro:06d}Z"
    data = event.get("data")
    parts = [when, str(event.get("event", "?"))]
    if isinstance(data, dict):
        parts += [f"{k}={cell(v)}" for k, v in data.items()]
    elif data is not None:
        parts.append(cell(data))
    return " ".join(parts)
