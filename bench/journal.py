"""
The journal: append throughput under 64 concurrent appenders, and start-up
cost with a large journal. Figures printed, with ratios against the old
implementation measured in the same process (no wall-clock asserts).

Append: ``--appenders`` tasks (default 64, as 64 guests resetting at once)
each append ``--per`` cycle-sized records (~1 KB, like a terminal summary) to
a journal on the disk holding ``--dir`` (default /var/tmp: not a tmpfs,
where fsync would cost nothing). Compared:

- ``old``: the implementation before group commit (aiofiles write + flush +
  one fsync per record, under one lock: appenders queue for each other's
  fsync);
- ``sync``: ``append(record)``: each returns once an fsync covers its record,
  concurrent appends sharing one (group commit);
- ``nosync``: ``append(record, sync=False)``: returns once written to the
  kernel; fsynced by the next group commit.

Start-up: a legacy single-file journal of ``--startup-mb`` MB (default 200)
of realistic records with a VM registry and an open cycle at the end. Each
reader runs in a child process (so its peak RSS is its own, read with
``getrusage``): ``old`` reads as the daemon did before (``read_text`` of the
whole file, every record in a list, then the folds); ``first`` is the new
start-up on that file (streamed fold of the file, which it then rotates,
plus the in-memory history from ``iter_history``); ``next`` is the start
after that (only the checkpoint segment is read).

    .venv/bin/python -m bench.journal [--appenders 64] [--per 20] [--startup-mb 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiofiles

from qreset.daemon import START_HISTORY
from qreset.journal import Journal, iter_history
from qreset.journal_read import finished_cycles, registered_vms, unfinished_cycles


class OldJournal:
    """The append path before group commit (qreset/journal.py at 26125a0), for the baseline."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._file = await aiofiles.open(self.path, "a", encoding="utf-8")

    async def close(self) -> None:
        await self._file.close()

    async def append(self, record: dict[str, Any]) -> dict[str, Any]:
        rec = {"t": round(time.time(), 6), **record}
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        async with self._lock:
            await self._file.write(line)
            await self._file.flush()
            await asyncio.to_thread(os.fsync, self._file.fileno())
        return rec


def summary(vm: str, n: int) -> dict[str, Any]:
    """A terminal record shaped like vm.py's cycle summary (~1 KB)."""
    cid = f"{vm}-{1700000000 + n}-4242-{n}"
    return {
        "vm": vm, "cycle": cid, "phase": "resumed", "outcome": "resumed", "mode": "park",
        "trigger": {"event": "SHUTDOWN", "reason": "guest-reset", "guest": True},
        "event_ts": 1700000000.0 + n, "vm_resumed": True, "devices": ["0000:01:00.0"],
        "durations": {"event_to_parked_ms": 1.2, "engine_ms": 112.5, "resume_ms": 3.1, "total_ms": 118.0},
        "error": None,
        "report": {"ok": True, "started": 1700000000.0 + n, "duration": 0.11, "domains": [
            {"key": "function:0000:01:00.0", "method": "flr", "functions": ["0000:01:00.0"],
             "ok": True, "durations": {"save_ms": 0.4, "reset_ms": 100.2, "ready_ms": 1.1,
                                       "rescan_ms": 0.9, "restore_ms": 0.0},
             "diff": {"0000:01:00.0": "none"}, "error": None}],
            "identity_changed": [], "restored": [], "plan": {"policy": "all", "refusals": []}},
    }


async def appends(kind: str, directory: Path, appenders: int, per: int) -> float:
    """Appends per second with ``appenders`` concurrent tasks."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "journal.jsonl"
        journal: OldJournal | Journal = OldJournal(path) if kind == "old" else Journal(path)
        await journal.open()

        async def worker(i: int) -> None:
            for n in range(per):
                rec = summary(f"vm{i}", n)
                if isinstance(journal, Journal):
                    await journal.append(rec, sync=kind == "sync")
                else:
                    await journal.append(rec)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(appenders)))
        elapsed = time.perf_counter() - t0
        fsyncs = journal.fsyncs if isinstance(journal, Journal) else appenders * per
        await journal.close()
    rate = appenders * per / elapsed
    print(f"  {kind:7} {rate:9.0f} appends/s  ({appenders * per} records, {fsyncs} fsyncs, "
          f"{elapsed:.2f} s)")
    return rate


def make_legacy(path: Path, mb: int) -> None:
    """A never-rotated journal of ``mb`` MB: cycles of 8 VMs, a registry, an open cycle last."""
    target = mb * 1024 * 1024
    with path.open("w") as f:
        for i in range(8):
            f.write(json.dumps({"t": 1.0, "vm": f"added{i}", "cycle": f"reg-{i}", "phase": "add-vm",
                                "qmp": f"/run/qreset/added{i}.qmp", "devices": ["0000:02:00.0"],
                                "mode": "park"}) + "\n")
        n = 0
        while f.tell() < target:
            vm = f"vm{n % 8}"
            s = summary(vm, n)
            base = {"t": 1700000000.0 + n, "vm": vm, "cycle": s["cycle"]}
            for rec in ({**base, "phase": "cycle-start", "mode": "park", "trigger": s["trigger"],
                         "devices": s["devices"]},
                        {**base, "phase": "parked", "status": "shutdown"},
                        {**base, "phase": "engine-done", "ok": True, "error": None, "engine_ms": 112.5,
                         "identity_changed": []},
                        {"t": 1700000000.1 + n, **s}):
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            n += 1
        f.write(json.dumps({"t": 1800000000.0, "vm": "vm0", "cycle": "vm0-open", "phase": "cycle-start"})
                + "\n")


def child(mode: str, path: Path) -> None:
    """One start-up reader; prints {"s": seconds, "rss_mb": peak RSS, ...} as JSON."""
    t0 = time.perf_counter()
    history: Any
    if mode == "old":
        # What Daemon.run did before: Journal.read() (read_text, every record in a list).
        records = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
        history = deque(finished_cycles(records), maxlen=10_000)  # the daemon's HISTORY_MAX then
        unfinished, registered = unfinished_cycles(records), registered_vms(records)
    else:
        async def start() -> tuple[Any, list[dict[str, Any]]]:
            journal = Journal(path)
            state = await journal.open()
            past = await asyncio.to_thread(lambda: list(iter_history(path, limit=START_HISTORY)))
            await journal.close()
            return state, past

        state, history = asyncio.run(start())
        unfinished, registered = state.unfinished(), state.registered()
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"s": seconds, "rss_mb": rss_mb, "open": sorted(unfinished),
                      "registered": len(registered), "history": len(history)}))


def startup(mb: int, directory: Path) -> None:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "journal.jsonl"
        t0 = time.perf_counter()
        make_legacy(path, mb)
        print(f"start-up with a {path.stat().st_size / 2**20:.0f} MiB journal "
              f"(written in {time.perf_counter() - t0:.1f} s):")
        results = {}
        for mode in ("old", "first", "next"):
            out = subprocess.run([sys.executable, "-m", "bench.journal", "--child", mode, str(path)],
                                 capture_output=True, text=True, check=True).stdout
            results[mode] = r = json.loads(out.splitlines()[-1])
            print(f"  {mode:6} {r['s']:6.2f} s  peak RSS {r['rss_mb']:7.1f} MB  open cycles {r['open']}  "
                  f"registered {r['registered']}  history {r['history']}")
        old = results["old"]
        for mode in ("first", "next"):
            r = results[mode]
            print(f"  {mode} vs old: time ×{r['s'] / old['s']:.3f}, RSS ×{r['rss_mb'] / old['rss_mb']:.3f}")
        segs = sorted(p.name for p in Path(tmp).iterdir())
        print(f"  files after: {', '.join(segs)}; active {path.stat().st_size} bytes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--appenders", type=int, default=64)
    ap.add_argument("--per", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--startup-mb", type=int, default=200, help="0: skip the start-up figures")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return 0
    print(f"append: {args.appenders} concurrent appenders × {args.per} records, journal in {args.dir}, "
          f"{args.repeat} rounds (kinds interleaved, so load on the host hits each alike)")
    rates: dict[str, list[float]] = {"old": [], "sync": [], "nosync": []}
    for _ in range(args.repeat):
        for kind, got in rates.items():
            got.append(asyncio.run(appends(kind, args.dir, args.appenders, args.per)))
    for kind in ("sync", "nosync"):
        ratio = statistics.median(rates[kind]) / statistics.median(rates["old"])
        print(f"  {kind} vs old (medians): ×{ratio:.1f}")
    if args.startup_mb:
        startup(args.startup_mb, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
