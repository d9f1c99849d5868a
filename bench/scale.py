"""
Scale: N real QEMU guests on one ``qreset run``, many resetting at the same
instant, then a soak; every figure also as a ratio to a 1-VM run of the same
process.

Guests are ``qemu-system-x86_64 -accel tcg`` booting :mod:`bench.firmware`
(no SeaBIOS): idle in ``hlt`` at no CPU cost until the bench sends
``inject-nmi`` on their second monitor, and then a real guest reset through
port 0xCF9 that the daemon parks (``SHUTDOWN guest-reset``), resets the
guest's function on a simulated host for, and resumes. The host
(:func:`bench.scale_fleet.topology_toml`) has SR-IOV VFs behind PFs (one VF
per guest, an FLR each: independent domains) and conventional buses of 4
functions owned by 4 guests (one bus reset per cycle: a domain lock shared by
4 VMs, with consent in ``policy.allow``).

What it measures, from the daemon's journal (each cycle's terminal record:
``durations`` and the engine's per-domain ``phases``) and from /proc:

- cycles completed, failures, lost cycles (a ``cycle-start`` with no terminal
  record), injects that no cycle answered, guests not running at the end;
- event→resumed (``total_ms``) and its *overhead*: minus the reset method's
  own waits (the domain's ``assert`` + ``settle`` + ``poll`` phases), and also
  minus the wait for a shared domain's lock (shown apart);
- the cycle's parts: event→parked, engine, resume, and the rest (the journal
  appends between them), to locate the bottleneck;
- QMP commands per cycle when the daemon's summaries carry ``qmp_commands``;
- daemon RSS and open fds at start, over the soak and at the end; its fd limit;
- journal bytes per cycle; ``qreset status`` latency (the real CLI, timed) and
  a bare ``query-status`` round trip on the control socket, idle and under load;
- host load (``/proc/loadavg``) at start and end: the machine is shared.

    .venv/bin/python -m bench.scale --vms 256 --burst 64 --soak 600    # full
    .venv/bin/python -m bench.scale --ci                               # 32 VMs, 60 s; exit 1 on loss

Exit status 1 when any guest is left not running, any cycle is lost or failed,
or the run could not complete; the JSON (``--json FILE``) has every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from bench.scale_fleet import DAEMON_NOFILE, Daemon, Fleet, Guest, JournalTail, make_plan, raise_nofile
from bench.scale_stats import Tracker, percentile, render

#: Bound on one wave (inject → every injected guest's terminal record). Our bound:
#: far above a loaded cycle (seconds), so only a stuck cycle reaches it.
WAVE_TIMEOUT = 120.0
#: How long a guest may take to re-arm its NMI path after a cycle before it is skipped.
READY_TIMEOUT = 10.0
#: Period of the daemon's RSS/fd samples and of the status timings during the soak.
SAMPLE_EVERY = 30.0
STATUS_EVERY = 15.0
#: Seconds of idleness measured after connect (CPU of idle guests and of the daemon).
IDLE_WINDOW = 3.0


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


async def control_client(path: Path) -> QMPClient:
    c = QMPClient("bench-control")
    await c.connect(str(path))
    return c


async def wait_connected(ctl: Path, daemon: Daemon, n: int, timeout: float) -> float:
    t0 = time.monotonic()
    client: QMPClient | None = None
    try:
        while time.monotonic() - t0 < timeout:
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({daemon.proc.returncode}):\n{daemon.log_tail()}")
            if client is None and ctl.exists():
                with contextlib.suppress(Exception):
                    client = await control_client(ctl)
            if client is not None:
                st = await client.execute("query-status")
                if isinstance(st, dict) and st.get("connected") == n:
                    return time.monotonic() - t0
            await asyncio.sleep(0.2)
        raise RuntimeError(f"daemon did not connect to {n} guests within {timeout:.0f}s:\n"
                           f"{daemon.log_tail()}")
    finally:
        if client is not None:
            await client.disconnect()


async def time_status_cli(ctl: Path) -> float:
    """Wall time of ``qreset status`` (the real CLI: interpreter start + query), in ms."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qreset", "status", "--socket", str(ctl),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"qreset status failed ({proc.returncode}): {err.decode().strip()}")
    return (time.perf_counter() - t0) * 1000.0


async def time_query(ctl: Path, command: str = "query-status") -> float:
    """One control-socket command round trip on a fresh connection, in ms."""
    t0 = time.perf_counter()
    c = await control_client(ctl)
    try:
        await c.execute(command)
    finally:
        await c.disconnect()
    return (time.perf_counter() - t0) * 1000.0


class Run:
    """One bench run: N guests, one daemon, waves of injected resets."""

    def __init__(self, n: int, burst: int, time_scale: float, workdir: Path, nofile_soft: int,
                 journal_dir: Path | None = None, group_commit: bool = False) -> None:
        self.n, self.burst = n, burst
        self.plan = make_plan(workdir, n, time_scale, journal_dir)
        self.fleet = Fleet(self.plan)
        self.daemon = Daemon(self.plan, nofile_soft, group_commit)
        self.tail = JournalTail(self.plan.journal)
        self.track = Tracker(self.plan.shared)
        self.samples: list[dict[str, Any]] = []
        self.status_ms: dict[str, list[float]] = {}
        self.not_ready = 0
        self.stuck: set[str] = set()
        self.timeouts: list[str] = []

    def poll(self) -> None:
        for rec in self.tail.read():
            self.track.add(rec)

    async def wave(self, guests: list[Guest], phase: str) -> None:
        """Inject an NMI into every guest at once; wait until each one's cycle ended."""
        self.track.phase = phase
        self.poll()
        ready: list[Guest] = []
        deadline = time.monotonic() + READY_TIMEOUT
        # A guest that missed its NMI window once is not waited for again (the end check
        # reports it): a stuck guest must not stretch every later wave by READY_TIMEOUT.
        candidates = [g for g in guests if g.name not in self.stuck]
        self.not_ready += len(guests) - len(candidates)
        pending = candidates
        while pending:  # a guest is ready once its firmware re-armed LINT1 after the last reset
            pending = [g for g in pending if g.starts() < 1 + self.track.terminals(g.name)]
            ready = [g for g in candidates if g not in pending]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        self.not_ready += len(pending)
        self.stuck |= {g.name for g in pending}
        targets = {g.name: self.track.terminals(g.name) + 1 for g in ready}
        for g in ready:
            g.injected += 1
            self.track.injected[g.name] += 1
        await asyncio.gather(*(g.ctl.execute("inject-nmi") for g in ready if g.ctl is not None))
        deadline = time.monotonic() + WAVE_TIMEOUT
        while True:
            self.poll()
            left = [vm for vm, want in targets.items() if self.track.terminals(vm) < want]
            if not left:
                return
            if time.monotonic() > deadline:
                self.timeouts += left
                return
            await asyncio.sleep(0.02)

    async def sampler(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.samples.append(self.daemon.sample() | {"phase": self.track.phase,
                                                        "cycles": self.track.cycles_total})

    async def status_timer(self, key: str, every: float) -> None:
        while True:
            await self.time_status(key)
            await asyncio.sleep(every)

    async def time_status(self, key: str) -> None:
        try:
            cli = await time_status_cli(self.plan.control)
            raw = await time_query(self.plan.control)
        except Exception as exc:  # a status that fails under load is a finding, not a crash
            self.status_ms.setdefault(f"{key}:errors", []).append(0.0)
            logging.warning("qreset status under %s: %s", key, exc)
            return
        self.status_ms.setdefault(f"{key}:cli", []).append(cli)
        self.status_ms.setdefault(f"{key}:query-status", []).append(raw)

    async def execute(self, soak: float, rounds: int, profile: Path | None) -> dict[str, Any]:
        result: dict[str, Any] = {"vms": self.n, "burst": self.burst, "load_start": loadavg()}
        t_start = await self.fleet.start()
        result["guests_start_s"] = round(t_start, 1)
        self.daemon.start()
        result["connect_s"] = round(await wait_connected(self.plan.control, self.daemon, self.n,
                                                        120 + self.n), 2)
        self.poll()
        self.track.phase = "connect"
        # Idle: what do idle guests and an idle daemon cost (CPU seconds per second)?
        cpu0, dcpu0 = sum(g.cpu_seconds() for g in self.fleet.guests), self.daemon.sample()["cpu_s"]
        await asyncio.sleep(IDLE_WINDOW)
        result["idle_cpu_per_s"] = {
            "guests_total": round((sum(g.cpu_seconds() for g in self.fleet.guests) - cpu0)
                                  / IDLE_WINDOW, 4),
            "daemon": round((self.daemon.sample()["cpu_s"] - dcpu0) / IDLE_WINDOW, 4)}
        self.samples.append(self.daemon.sample() | {"phase": "start", "cycles": 0})
        await self.time_status("idle")
        guests = self.fleet.guests
        # The burst: every guest on a shared bus (lock contention) plus VF guests spread evenly.
        shared = [g for g in guests if g.name in self.plan.shared]
        rest = [g for g in guests if g.name not in self.plan.shared]
        want = max(0, min(self.burst, self.n) - len(shared))
        burst = shared[:self.burst] + [rest[i * len(rest) // want] for i in range(want)] if want \
            else shared[:self.burst]
        status_during = asyncio.create_task(self.time_status("burst"))
        await self.wave(burst, "burst")
        await status_during
        self.samples.append(self.daemon.sample() | {"phase": "after-burst",
                                                    "cycles": self.track.cycles_total})
        tasks = [asyncio.create_task(self.sampler(SAMPLE_EVERY)),
                 asyncio.create_task(self.status_timer("soak", STATUS_EVERY))] if soak else []
        spy = await start_profile(self.daemon.pid, profile, min(soak, 120.0)) if profile else None
        t_soak, i, done = time.monotonic(), 0, 0
        try:
            while (soak and time.monotonic() - t_soak < soak) or done < rounds:
                chunk = [guests[(i + k) % self.n] for k in range(min(self.burst, self.n))]
                i = (i + len(chunk)) % self.n
                await self.wave(chunk, "soak")
                done += 1
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        result["soak_s"] = round(time.monotonic() - t_soak, 1)
        result["waves"] = done
        await asyncio.sleep(1.0)
        self.poll()
        self.samples.append(self.daemon.sample() | {"phase": "end", "cycles": self.track.cycles_total})
        statuses = await self.fleet.statuses()
        result["not_running"] = {vm: st for vm, st in statuses.items() if st != "running"}
        result["load_end"] = loadavg()
        if spy is not None:
            result["profile"] = await finish_profile(spy, profile)
        return result

    async def close(self) -> int | None:
        rc = self.daemon.stop()
        self.poll()
        self.tail.close()
        await self.fleet.stop()
        return rc


async def start_profile(pid: int, out: Path | None, seconds: float) -> asyncio.subprocess.Process | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if out is None or not Path(spy).exists():
        logging.warning("py-spy not found: no profile")
        return None
    return await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
        "--format", "raw", "--output", str(out), "--nonblocking", "--threads",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def finish_profile(spy: asyncio.subprocess.Process, out: Path | None) -> str:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(150):
            await spy.wait()
    if spy.returncode is None:
        spy.terminate()
        await spy.wait()
    return str(out)


async def one_run(n: int, burst: int, soak: float, rounds: int, time_scale: float,
                  nofile_soft: int, profile: Path | None, keep: bool,
                  journal_dir: Path | None = None, group_commit: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"qrs{n}-", dir="/tmp"))
    run = Run(n, burst, time_scale, workdir, nofile_soft, journal_dir, group_commit)
    result: dict[str, Any] = {}
    try:
        result = await run.execute(soak, rounds, profile)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        rc = await run.close()
        result["daemon_exit"] = rc
        result["workdir"] = str(workdir)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
            run.plan.journal.unlink(missing_ok=True)
    result |= run.track.summary()
    result["not_ready_skipped"] = run.not_ready
    result["stuck"] = sorted(run.stuck)
    result["wave_timeouts"] = sorted(set(run.timeouts))
    result["journal_bytes"] = run.tail.bytes
    result["journal_rotations"] = run.tail.rotations
    result["journal_bytes_per_cycle"] = (round(run.tail.bytes / result["cycles"], 1)
                                         if result["cycles"] else None)
    result["daemon_samples"] = run.samples
    result["status_ms"] = {k: {"count": len(v), "p50": round(percentile(v, 50), 1),
                               "max": round(max(v), 1)} for k, v in run.status_ms.items() if v}
    return result


def verdict(res: dict[str, Any]) -> list[str]:
    """Why a run failed (empty: it passed)."""
    why = []
    if res.get("error"):
        why.append(f"run error: {res['error']}")
    if res.get("not_running"):
        why.append(f"{len(res['not_running'])} guest(s) not running: {res['not_running']}")
    if res.get("lost"):
        why.append(f"{len(res['lost'])} lost cycle(s) (started, never ended): {res['lost'][:5]}")
    if res.get("failures"):
        why.append(f"{res['failures']} failed cycle(s): {res.get('failure_errors')}")
    if res.get("stuck"):
        why.append(f"{len(res['stuck'])} guest(s) never re-armed after a cycle: {res['stuck'][:5]}")
    if res.get("unanswered"):
        why.append(f"{res['unanswered']} inject(s) answered by no cycle")
    return why


async def main_async(args: argparse.Namespace) -> int:
    soft, hard = raise_nofile()
    # 256 guests: two monitor sockets each in QEMU, one client socket each in the bench.
    need = 2 * args.vms + 64
    if hard < need:
        print(f"RLIMIT_NOFILE hard limit {hard} < {need} needed for {args.vms} guests", file=sys.stderr)
        return 2
    dsoft = min(args.daemon_nofile, hard)
    base = await one_run(1, 1, 0.0, args.baseline_cycles, args.time_scale, dsoft, None, args.keep,
                         args.journal_dir, args.group_commit_journal)
    full = await one_run(args.vms, args.burst, args.soak, 0, args.time_scale, dsoft, args.profile,
                         args.keep, args.journal_dir, args.group_commit_journal)
    out = {"args": vars(args) | {"profile": str(args.profile) if args.profile else None,
                                 "json": str(args.json) if args.json else None},
           "nofile": {"bench_soft_before": soft, "hard": hard, "daemon_started_with": dsoft},
           "baseline": base, "full": full, "cpus": os.cpu_count()}
    print(render(out))
    failed = {"baseline": verdict(base), "full": verdict(full)}
    out["verdict"] = {k: v for k, v in failed.items() if v}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    for name, why in failed.items():
        for w in why:
            print(f"FAIL ({name}): {w}")
    return 1 if any(failed.values()) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=256, help="guests on the daemon (default 256)")
    ap.add_argument("--burst", type=int, default=64, help="guests reset at the same instant (64)")
    ap.add_argument("--soak", type=float, default=600.0, help="seconds of waves after the burst (600)")
    ap.add_argument("--ci", action="store_true", help="reduced run: 32 guests, bursts of 16, 60 s")
    ap.add_argument("--baseline-cycles", type=int, default=100, help="cycles of the 1-VM run (100)")
    ap.add_argument("--time-scale", type=float, default=0.01,
                    help="sim time scale: FLR 100 ms × this (0.01)")
    ap.add_argument("--daemon-nofile", type=int, default=DAEMON_NOFILE,
                    help=f"fd soft limit the daemon is started with ({DAEMON_NOFILE}, systemd's default)")
    ap.add_argument("--journal-dir", type=Path,
                    help="put the daemon's journal here (e.g. /dev/shm: what fsync costs on this disk)")
    ap.add_argument("--group-commit-journal", action="store_true",
                    help="experiment: the daemon's journal appends with bench.scale_daemon's prototype "
                         "(os.write on the loop, one shared fsync) instead of qreset.journal's")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--profile", type=Path, help="py-spy record the daemon (raw stacks) into this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directories (journal, logs)")
    args = ap.parse_args(argv)
    if args.ci:
        args.vms, args.burst, args.soak = 32, 16, 60.0
    if args.vms < 1 or args.burst < 1 or args.soak < 0:
        ap.error("--vms and --burst must be >= 1, --soak >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
