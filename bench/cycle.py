"""
Per-cycle overhead of the daemon, both modes, on real QEMU guests (TCG).

One self-rebooting guest owning the demo host's FLR NIC (configs/sim/demo.toml,
0000:01:00.0); the daemon runs in-process on the simulated host. For every
cycle, the overhead is the time from the guest's reset event to the guest
resumed, minus the simulated reset method's own delay (the FLR's 100 ms ×
time_scale plus its ready time, read from the sim's ``reset_log``):
everything the daemon adds — QMP round trips, the park toggle or stop/cont,
journal fsyncs, planning, the engine's save/rescan/diff.

Two clocks: *from receipt* starts when the daemon read the event off the
socket; *from QEMU* starts at the event's QMP timestamp (so it includes the
event's trip through QEMU's monitor and our reader). In stop-on-reset mode,
``event→stop`` is how long the guest ran after QEMU's reset before it was
stopped.

    .venv/bin/python -m bench.cycle [--cycles 60] [--time-scale 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

from qreset.config import parse_config
from qreset.daemon import Daemon
from qreset.pci.sim import ResetRecord, SimHost
from tests.qemu_helpers import guests, short_tmpdir

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "sim" / "demo.toml"
NIC1 = "0000:01:00.0"


def union_ms(records: list[ResetRecord], t0: float, t1: float) -> float:
    """Length of the union of the reset intervals inside [t0, t1], in ms."""
    spans = sorted((max(r.start, t0), min(r.end, t1)) for r in records if r.end >= t0 and r.start <= t1)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None and cur_s is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None and cur_s is not None:
        total += cur_e - cur_s
    return total * 1000.0


def pct(values: list[float], p: float) -> float:
    data = sorted(values)
    k = max(0, min(len(data) - 1, -(-len(data) * p // 100) - 1))
    return data[int(k)]


async def measure(mode: str, cycles: int, time_scale: float) -> dict[str, list[float]]:
    with short_tmpdir() as wd, guests(wd, "bench", paused=True) as (g,):
        host = SimHost.from_toml(DEMO, time_scale=time_scale)
        cfg = parse_config({
            "daemon": {"journal": str(wd / "journal.jsonl"), "control_socket": ""},
            "policy": {"mode": mode, "connect_backoff_max": 0.3},
            "vm": [{"name": "bench", "qmp": str(g.qmp_path), "device": [{"host": NIC1}]}],
        }, "bench")
        daemon = Daemon(cfg, host=host, control=False)
        task = asyncio.create_task(daemon.run(), name="daemon")
        try:
            await daemon.wait_event("QRESET_VM_CONNECTED", timeout=20, past=True)
            ctl = await g.ctl()
            await ctl.execute("cont")
            await ctl.disconnect()
            async with asyncio.timeout(cycles * 2.0 + 30):
                while daemon.monitors["bench"].cycles < cycles + 1:
                    await asyncio.sleep(0.1)
        finally:
            daemon.request_stop()
            await task
        rows: list[dict[str, Any]] = [r for r in daemon.history if r["vm"] == "bench"][1:cycles + 1]
    out: dict[str, list[float]] = {k: [] for k in (
        "total", "reset", "overhead", "overhead_qemu", "engine_extra", "event_to_stop")}
    for r in rows:
        if r["outcome"] != "resumed":
            raise SystemExit(f"cycle {r['cycle']} did not resume cleanly: {r['error']}")
        rep = r["report"]
        t0, t1 = rep["started"], rep["started"] + rep["duration"]
        reset = union_ms(host.reset_log, t0, t1)
        total = r["durations"]["total_ms"]
        out["total"].append(total)
        out["reset"].append(reset)
        out["overhead"].append(total - reset)
        out["overhead_qemu"].append((r["t"] - r["event_ts"]) * 1000.0 - reset)
        out["engine_extra"].append(r["durations"]["engine_ms"] - reset)
        if "event_to_stop_ms" in r["durations"]:
            out["event_to_stop"].append(r["durations"]["event_to_stop_ms"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=60, help="cycles measured per mode (>= 50)")
    ap.add_argument("--time-scale", type=float, default=0.01, help="sim time scale (FLR = 100 ms × this)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    print(f"qreset per-cycle overhead: {args.cycles} cycles per mode, one guest, FLR of {NIC1}, "
          f"sim time_scale {args.time_scale}")
    print(f"{'mode':<14} {'metric':<34} {'median':>9} {'p99':>9} {'max':>9}  (ms)")
    for mode in ("park", "stop-on-reset"):
        res = asyncio.run(measure(mode, args.cycles, args.time_scale))
        labels = {
            "total": "event→resumed (from receipt)",
            "reset": "  of which the reset method itself",
            "overhead": "overhead (from receipt)",
            "overhead_qemu": "overhead (from QEMU's timestamp)",
            "engine_extra": "  of which engine beyond the reset",
            "event_to_stop": "event→stop (guest ran after reset)",
        }
        for key, label in labels.items():
            vals = res[key]
            if not vals:
                continue
            print(f"{mode:<14} {label:<34} {statistics.median(vals):9.2f} {pct(vals, 99):9.2f} "
                  f"{max(vals):9.2f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
