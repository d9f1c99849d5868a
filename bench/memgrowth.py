"""
Where the daemon's memory goes per cycle: the real daemon in-process, real
QEMU guests (:mod:`bench.firmware`, reset on demand with ``inject-nmi``), a
simulated host, and :mod:`tracemalloc` snapshots compared once warm.

``bench.scale`` sees RSS only from outside (/proc); this bench names the
allocation sites. It runs the :class:`qreset.daemon.Daemon` in the bench's
own event loop (no control socket), cycles its guests ``--warm`` times so
every bounded structure (history, latencies, event ring) is full, takes a
snapshot, cycles ``--cycles`` more, takes another, and prints:

- the allocation sites (grouped by traceback, the bench's own frames left
  out) whose live bytes grew the most between the two snapshots, with the
  growth per cycle;
- the containers (lists, dicts, deques...) that are the same object in both
  snapshots and hold more items in the second, with where they were
  allocated: what keeps the growing objects alive;
- the Python object types whose count grew (``gc.get_objects``), per cycle;
- the process's open fds at each snapshot (the daemon shares the process:
  the bench's own fds are fixed after start-up).

The bounds of the daemon's rings and of the simulated host's logs are
lowered (``--rings``) so that warm-up
takes hundreds of cycles, not tens of thousands: a structure that is
bounded reaches its bound during warm-up and then stays flat, whatever the
bound; one that keeps growing after it is a leak.

    .venv/bin/python -m bench.memgrowth --vms 8 --warm 400 --cycles 400
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections import Counter, deque
from pathlib import Path

from bench.scale_fleet import Fleet, Guest, make_plan
from qreset import daemon_stats, qmp_events
from qreset.config import load_config
from qreset.daemon import Daemon
from qreset.pci import sim_fault
from qreset.vm import VmState

#: Frames kept per allocation: enough to see which qreset call allocated through
#: asyncio/json/qemu.qmp internals.
FRAMES = 12


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def type_counts() -> Counter[str]:
    gc.collect()
    return Counter(type(o).__qualname__ for o in gc.get_objects())


class Driver:
    """Resets guests on demand and counts the daemon's finished cycles per VM."""

    def __init__(self, daemon: Daemon, guests: list[Guest], control: Path | None = None,
                 status_every: int = 0) -> None:
        self.daemon, self.guests = daemon, guests
        #: Every ``status_every`` cycles, ``query-status`` + ``query-vms`` on a new
        #: control connection (what ``qreset status`` does), if ``control`` is set.
        self.control, self.status_every = control, status_every
        self.statuses = 0
        #: Per guest, the cycle count its last injected NMI is to reach.
        self.sent = {g.name: 0 for g in guests}

    def done(self, g: Guest) -> int:
        return self.daemon.monitors[g.name].cycles

    async def cycles(self, n: int, timeout: float = 600.0) -> None:
        """At least ``n`` more cycles: inject into each guest whose firmware re-armed."""
        target = sum(self.done(g) for g in self.guests) + n
        sent = self.sent
        next_status = sum(self.done(g) for g in self.guests) + self.status_every
        async with asyncio.timeout(timeout):
            while (total := sum(self.done(g) for g in self.guests)) < target:
                if self.control is not None and self.status_every and total >= next_status:
                    next_status = total + self.status_every
                    await self.status()
                for g in self.guests:
                    # Re-armed (one more start than cycles) and its last NMI answered.
                    if g.starts() >= 1 + self.done(g) and sent[g.name] <= self.done(g) \
                            and g.ctl is not None:
                        sent[g.name] = self.done(g) + 1
                        await g.ctl.execute("inject-nmi")
                await asyncio.sleep(0.005)

    async def status(self) -> None:
        assert self.control is not None
        qmp = qmp_events.client("memgrowth-status")
        await qmp.connect(str(self.control))
        try:
            await qmp.execute("query-status")
            await qmp.execute("query-vms")
        finally:
            await qmp.disconnect()
        self.statuses += 1

    async def quiesce(self, timeout: float = 120.0) -> None:
        """No cycle in flight: a snapshot blocks the loop for seconds, which must not land
        in the middle of a cycle (its QMP commands would time out)."""
        async with asyncio.timeout(timeout):
            while any(self.sent[g.name] > self.done(g) or self.daemon.monitors[g.name].state
                      is VmState.CYCLE for g in self.guests):
                await asyncio.sleep(0.01)


def containers(min_len: int = 100) -> dict[int, tuple[str, int, str]]:
    """Every gc-tracked container with at least ``min_len`` items: id -> (type, len, site)."""
    gc.collect()
    out: dict[int, tuple[str, int, str]] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, list | dict | set | deque | tuple):
            continue
        n = len(obj)
        if n < min_len or isinstance(obj, str | bytes):
            continue
        tb = tracemalloc.get_object_traceback(obj)
        site = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(reversed(tb))[:6]) \
            if tb else "?"
        out[id(obj)] = (describe(obj), n, site)
    return out


def snapshot() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "*/bench/*", all_frames=True),
    ))


def show(stat: tracemalloc.StatisticDiff, per: int, args_depth: int = 6) -> str:
    # Most recent call first: where the object was allocated, then who called.
    frames = [f for f in reversed(stat.traceback) if "/asyncio/" not in f.filename]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[:args_depth])
    return (f"{stat.size_diff / per:+9.1f} B/cycle {stat.count_diff / per:+6.2f} obj/cycle "
            f"({stat.size / 1024:8.1f} KiB live)  {where}")


def describe(obj: object) -> str:
    if isinstance(obj, dict):
        return f"dict{sorted(map(str, obj))[:6]}"
    if isinstance(obj, list | tuple | set | frozenset):
        return f"{type(obj).__qualname__}[{len(obj)}]"
    return type(obj).__qualname__


async def run(args: argparse.Namespace) -> int:
    # Bounded rings reach their bound within warm-up (see the module docstring).
    daemon_stats.HISTORY_MAX = daemon_stats.EVENTS_MAX = args.rings
    daemon_stats.LATENCIES_MAX = args.rings
    sim_fault.RESET_LOG_MAX = sim_fault.CONFIG_WRITES_MAX = args.rings
    workdir = Path(tempfile.mkdtemp(prefix="qrmem-", dir="/tmp"))
    plan = make_plan(workdir, args.vms, args.time_scale)
    fleet = Fleet(plan)
    tracemalloc.start(FRAMES)
    try:
        await fleet.start()
        daemon = Daemon(load_config(plan.config), control=args.status_every > 0)
        task = asyncio.create_task(daemon.run(), name="daemon")
        async with asyncio.timeout(60):
            await daemon.started.wait()
            while sum(m.connected for m in daemon.monitors.values()) < args.vms:
                await asyncio.sleep(0.05)
        drive = Driver(daemon, fleet.guests, plan.control, args.status_every)
        t0 = time.monotonic()
        await drive.cycles(args.warm)
        await drive.quiesce()
        fds = [open_fds()]
        big0 = containers()
        snap0, types0 = snapshot(), type_counts()
        c0 = daemon.stats.counters["cycles"]
        await drive.cycles(args.cycles)
        await drive.quiesce()
        c1 = daemon.stats.counters["cycles"]
        fds.append(open_fds())
        big1 = containers()
        snap1, types1 = snapshot(), type_counts()
        per = max(1, c1 - c0)
        diff = snap1.compare_to(snap0, "traceback")
        grown = sum(s.size_diff for s in diff)
        print(f"{args.vms} VMs, {c0} warm-up cycles, then {per} measured "
              f"({time.monotonic() - t0:.0f} s in all); rings bounded at {args.rings}; "
              f"{drive.statuses} status queries")
        print(f"traced memory: {grown / per:+.1f} B/cycle over the measured cycles; "
              f"open fds {fds[0]} -> {fds[1]}; failures {daemon.stats.counters['failures']}")
        print("top allocation sites by growth:")
        for stat in [s for s in diff if s.size_diff > 0][:args.top]:
            print("  " + show(stat, per))
        print("object types by growth:")
        for name, n in ((k, types1[k] - types0.get(k, 0)) for k in types1):
            if n >= per // 4 and n > 0:
                print(f"  {n / per:+6.2f}/cycle {name} ({types1[name]} live)")
        print("containers that grew (same object in both snapshots):")
        for key, (kind, n1, site) in sorted(big1.items(), key=lambda kv: -kv[1][1]):
            n0 = big0.get(key, (kind, 0, site))[1]
            if n1 > n0 and "/bench/" not in site and "memgrowth" not in site:
                print(f"  {kind[:60]:<60} {n0:>7} -> {n1:<7} ({(n1 - n0) / per:+.2f}/cycle)  {site}")
        daemon.request_stop()
        await asyncio.wait_for(task, 60)
        return 0
    finally:
        tracemalloc.stop()
        await fleet.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=8, help="guests (8)")
    ap.add_argument("--warm", type=int, default=400, help="cycles before the first snapshot (400)")
    ap.add_argument("--cycles", type=int, default=400, help="cycles between the snapshots (400)")
    ap.add_argument("--rings", type=int, default=64,
                    help="bound of the daemon's history, latencies and event ring (64)")
    ap.add_argument("--time-scale", type=float, default=0.01, help="sim time scale (0.01)")
    ap.add_argument("--top", type=int, default=15, help="allocation sites shown (15)")
    ap.add_argument("--status-every", type=int, default=0,
                    help="serve the control socket and query it (status, VMs) every N cycles (0: no socket)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
