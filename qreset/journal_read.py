"""
Reading the journal back: streaming, over its rotated segments, in bounded memory.

The writer (:mod:`qreset.journal`) keeps the active file at the configured
path (``journal.jsonl``) and, once it grows past a size bound, moves it to
``journal.jsonl.1`` (shifting ``.1`` to ``.2`` ... and dropping the oldest)
and starts a new active file whose first line is a **checkpoint**: one record
(``phase: "checkpoint"``) carrying everything a restart needs from the
segments before it — the records of every open cycle, the ``add-vm``
record of every VM registered at run time, and each VM's last ``actions``
record (QEMU run-state actions qreset set: :mod:`qreset.actions`). So:

- start-up (:func:`load_recovery`) reads only the active segment, line by
  line, folding records into a :class:`RecoveryState` (a checkpoint replaces
  the state, later records update it): its time and memory are bounded by
  the segment size, not by the journal's age;
- history (:func:`iter_history`) reads segments newest first, each from its
  end, yielding terminal records lazily: a page costs what it shows.

Nothing here ever reads a whole file into memory (a 200 MB journal used to
take 21 s and 1.9 GB at start), and nothing opens a path that is not a
regular file (opening a FIFO blocks until a writer comes: the daemon hung at
start and ignored SIGTERM). Damaged lines are skipped with a warning: a
cycle that loses its terminal record looks unfinished, the safe reading.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The primitives and the recovery fold live apart (journal_segments,
# journal_recovery); their public names stay importable from here.
from qreset.journal_recovery import (
    RecoveryState,
    finished_cycles,
    load_recovery,
    registered_vms,
    unfinished_cycles,
    valid_actions,
    valid_add,
)
from qreset.journal_segments import (
    ACTIONS,
    BLOCK,
    CHECKPOINT,
    CLOSED_PER_VM,
    CLOSED_VMS,
    INFO_PHASES,
    MAX_LINE,
    REGISTRY_PHASES,
    SINCE_SLACK_S,
    TERMINAL_PHASES,
    JournalError,
    check_regular,
    open_regular,
    parse_line,
    raw_lines,
    read_lines_backwards,
    read_records,
    segment_paths,
)

__all__ = [
    "ACTIONS", "BLOCK", "CHECKPOINT", "CLOSED_PER_VM", "CLOSED_VMS", "INFO_PHASES",
    "MAX_LINE",
    "REGISTRY_PHASES", "SINCE_SLACK_S", "TERMINAL_PHASES", "JournalError", "RecoveryState",
    "check_regular", "finished_cycles", "iter_history", "load_recovery", "open_regular",
    "parse_line", "raw_lines", "read_lines_backwards", "read_records", "registered_vms",
    "segment_paths", "unfinished_cycles", "valid_actions", "valid_add",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------
# history


_TERMINAL_BYTES = tuple(p.encode() for p in TERMINAL_PHASES)


def iter_history(path: Path, vm: str | None = None, since: float | None = None,
                 until: float | None = None, limit: int | None = None,
                 before: str | None = None) -> Iterator[dict[str, Any]]:
    """
    Past cycles from the journal, **newest first**: the terminal record of
    each (phase ``resumed``/``stopped``/``failed``/``poweroff``; the one with
    the cycle's whole summary), over every retained segment (``path``, then
    ``path.1``, ``path.2``...), each read backwards a block at a time.

    :param vm: only this VM's cycles.
    :param since: only records with ``t >= since`` (UNIX time). The scan stops
        at the first record older than ``since`` by more than
        :data:`SINCE_SLACK_S`, so a recent window costs little.
    :param until: only records with ``t < until``.
    :param limit: at most this many records (None: all).
    :param before: a cycle id (paging cursor: the last ``cycle`` of the previous
        page): only records older than that cycle's terminal record. Nothing is
        yielded if it is not found.

    Blocking file I/O: call it in a thread from the event loop
    (``await asyncio.to_thread(lambda: list(iter_history(...)))``). Memory is
    one block and one line, whatever the journal's size. Records written with
    ``append(..., sync=False)`` are visible as soon as ``append`` returned.
    """
    if limit is not None and limit <= 0:
        return
    vm_bytes = json.dumps(vm).encode() if vm is not None else None
    waiting_for = before
    count = 0
    for seg in segment_paths(path):
        try:
            lines = read_lines_backwards(seg)
            for raw in lines:
                # Cheap filters on the raw line before parsing it.
                if not any(p in raw for p in _TERMINAL_BYTES):
                    continue
                if vm_bytes is not None and vm_bytes not in raw:
                    continue
                rec = parse_line(raw, str(seg))
                if rec is None or rec.get("phase") not in TERMINAL_PHASES:
                    continue
                if vm is not None and rec["vm"] != vm:
                    continue
                if waiting_for is not None:
                    if rec["cycle"] == waiting_for:
                        waiting_for = None
                    continue
                t = rec.get("t")
                if isinstance(t, int | float) and not isinstance(t, bool):
                    if since is not None and t < since - SINCE_SLACK_S:
                        return
                    if (since is not None and t < since) or (until is not None and t >= until):
                        continue
                elif since is not None or until is not None:
                    continue
                yield rec
                count += 1
                if limit is not None and count >= limit:
                    return
        except JournalError as exc:  # a segment rotated away or unreadable: the others still count
            logger.warning("%s", exc)
