"""
``qreset history``: past reset cycles from the daemon, newest first.

The daemon answers ``query-resets`` a page at a time (at most
:data:`qreset.control.schema.MAX_RESETS_LIMIT` cycles, each a few KiB with
its plan and report) with a ``next`` cursor; this command asks for pages of
:data:`HISTORY_PAGE`, passes each ``next`` back as ``before``, and prints
every page as it arrives: a long history neither waits for nor holds one
huge reply, and ``| head`` stops the paging (see :func:`qreset.cli.stdout_closed`).
``--json`` prints one JSON array, written as the pages come; after a
failure it is left unterminated (and the exit status is 1), so no reader
mistakes a part for the whole.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import QMPClient

from qreset.cli import stdout_closed
from qreset.cli.client import (
    ClientError,
    add_client_arguments,
    connect,
    disconnect,
    execute,
    run_client,
    short,
    socket_path,
)
from qreset.cli.render import cell, humanize, table

#: Cycles asked for per query-resets request: a few KiB each, so a page is
#: well under the client's read buffer and the first rows print at once.
HISTORY_PAGE = 200

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

HISTORY_EPILOG = """\
TIME is an ISO 8601 date/time (UTC unless it carries an offset) or a time
ago: a number and s, m, h, d or w.

examples:
  qreset history                            the last 20 cycles
  qreset history --vm vm1 --since 2h        vm1's cycles of the last two hours
  qreset history --since 2026-12-01 --until 2026-12-02T06:00 --limit 5000
  qreset history --since 10m --json | jq '.[] | select(.outcome != "resumed")'
"""



def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value



def parse_time(text: str, now: float | None = None) -> float:
    """
    ``--since``/``--until``: an ISO 8601 date/time (naive means UTC, as
    ``history`` prints UTC) or a time ago (``90s``, ``10m``, ``2h``, ``1d``,
    ``1w``), as UNIX seconds. Raises ArgumentTypeError naming the value.
    """
    value = text.strip()
    match = _RELATIVE.match(value)
    if match:
        ago = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        return (time.time() if now is None else now) - ago
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time nor a time ago like 10m or 2h: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()




def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = HISTORY_EPILOG
    parser.add_argument("--vm", metavar="NAME", default=None, help="only this VM's cycles")
    parser.add_argument("--since", metavar="TIME", type=parse_time, default=None,
                        help="only cycles that ended at or after TIME")
    parser.add_argument("--until", metavar="TIME", type=parse_time, default=None,
                        help="only cycles that ended at or before TIME")
    parser.add_argument("--limit", metavar="N", type=_positive, default=20,
                        help="at most N cycles, newest first (default: %(default)s)")
    add_client_arguments(parser)


def run(args: argparse.Namespace) -> int:
    query = HistoryQuery(args.vm, args.since, args.until, args.limit)
    return run_client("history", _history(socket_path(args), query, args.json))


class HistoryQuery:
    """What ``qreset history`` asks for; :meth:`pages` yields it a page at a time."""

    def __init__(self, vm: str | None, since: float | None, until: float | None, limit: int) -> None:
        self.vm, self.since, self.until, self.limit = vm, since, until, limit

    async def pages(self, qmp: QMPClient) -> AsyncIterator[list[dict[str, Any]]]:
        """Each page's rows, newest first, until ``limit`` rows or the oldest matching cycle."""
        left = self.limit
        before: str | None = None
        while left > 0:
            arguments: dict[str, object] = {"limit": min(left, HISTORY_PAGE)}
            for key, value in (("vm", self.vm), ("since", self.since), ("until", self.until),
                               ("before", before)):
                if value is not None:
                    arguments[key] = value
            reply = await execute(qmp, "query-resets", arguments)
            if not isinstance(reply, dict) or not isinstance(reply.get("resets"), list):
                raise ClientError(f"query-resets: unexpected reply: {short(str(reply))}")
            rows = [r for r in reply["resets"] if isinstance(r, dict)][:left]
            left -= len(rows)
            yield rows
            before = reply.get("next")
            if not isinstance(before, str) or not rows or stdout_closed():
                return


class HistoryTable:
    """The text table, printed a page at a time with the first page's columns (widened if needed)."""

    FIRST = ("t", "time", "vm", "cycle", "phase", "ok", "outcome", "trigger", "duration")

    def __init__(self) -> None:
        self.columns: list[str] = []
        self.widths: list[int] = []

    def print_page(self, rows: list[dict[str, Any]]) -> None:
        rows = [humanize(r) for r in rows]
        if not self.columns:
            header = table(rows, first=self.FIRST)
            if not header:
                return
            self.columns = [c.lower() for c in header[0].split()]
            self.widths = [len(c) for c in self.columns]
            print_header = True
        else:
            print_header = False
        cells = [[cell(r.get(c)) for c in self.columns] for r in rows]
        self.widths = [max([w, *(len(line[i]) for line in cells)]) for i, w in enumerate(self.widths)]
        lines = ([[c.upper() for c in self.columns]] if print_header else []) + cells
        for line in lines:
            print("  ".join(v.ljust(w) for v, w in zip(line, self.widths, strict=True)).rstrip())


async def _history(path: str, query: HistoryQuery, as_json: bool) -> int:
    qmp = await connect(path)
    shown = 0
    text = HistoryTable()
    try:
        async for rows in query.pages(qmp):
            if as_json:
                # One JSON array, written as the pages come.
                for row in rows:
                    body = json.dumps(row, indent=2, default=str).replace("\n", "\n  ")
                    sys.stdout.write(("[\n  " if shown == 0 else ",\n  ") + body)
                    shown += 1
            else:
                text.print_page(rows)
                shown += len(rows)
            sys.stdout.flush()
    finally:
        await disconnect(qmp)
    # Only now: after a failure (exit 1) the array stays open, so no reader takes it as whole.
    if as_json:
        sys.stdout.write("[]\n" if shown == 0 else "\n]\n")
    elif shown == 0:
        print("no reset cycles" + (f" for {query.vm}" if query.vm else ""))
    return 0
