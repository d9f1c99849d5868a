"""
Parallel reset domains: does resetting 8 independent domains take about as
long as resetting one?

Builds a simulated host with 16 root ports: 8 with an FLR-capable NIC alone
below (function-level domains) and 8 with a GPU without FLR alone below
(secondary-bus-reset domains), all bound to vfio-pci, and runs the real
engine (plan + execute + rescan + restore) with the simulator's real kernel
delays (``time_scale=1.0``: FLR 100 ms, bus reset 2 + 100 ms, ready times).

For each kind it prints: one domain, eight domains at once, the ratio (goal
≤ 1.2: the domains overlap instead of queueing), and the serial baseline
(the eight run one after another). The bus-reset case is run both with the
kernel's ``bus`` method and with the userspace SBR the executor does itself.

Run: ``.venv/bin/python bench/reset_parallel.py [--time-scale F] [--rounds N]``.
Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from qreset.engine import Engine, EngineSettings
from qreset.pci.address import PciAddress
from qreset.pci.sim import SimHost
from qreset.plan import Method, Policy

N = 8


def topology() -> dict[str, Any]:
    functions: list[dict[str, Any]] = [
        {"name": "hostbridge", "type": "pci_device", "dev": 0, "vendor": 0x8086, "device": 0x3E30,
         "class": 0x060000, "pm": False, "interrupt_pin": 0},
    ]
    for i in range(2 * N):
        flr = i < N
        functions.append({"name": f"rp{i}", "type": "root_port", "dev": 1 + i, "vendor": 0x8086,
                          "device": 0xA338, "acs": True, "msi": True})
        functions.append({
            "name": f"{'nic' if flr else 'gpu'}{i % N}", "parent": f"rp{i}", "type": "endpoint",
            "vendor": 0x8086 if flr else 0x10DE, "device": 0x1533 if flr else 0x1B80,
            "class": 0x020000 if flr else 0x030000, "flr": flr, "aer": True,
            "bars": [{"size": "128K"}, {"size": "16K", "index": 3}],
            "msi": {"vectors": 1}, "msix": {"vectors": 5, "bar": 3},
            # No_Soft_Reset: no PM reset either, so the GPUs need a bus reset.
            "pm": True if flr else {"no_soft_reset": True},
            "driver": "vfio-pci", "ready_ms": 10,
        })
    return {"host": {"description": "16 root ports: 8 FLR NICs, 8 no-FLR GPUs"}, "function": functions}


async def one_cycle(host: SimHost, owned: list[PciAddress], settings: EngineSettings) -> tuple[float, float]:
    """Wall and CPU seconds of one engine run (plan excluded)."""
    engine = Engine(host, settings)
    await engine.topology()
    plan = await engine.plan("bench", owned, {"bench": owned}, Policy())
    if not plan.ok or len(plan.domains) != len(owned):
        raise SystemExit(f"unexpected plan: {plan.to_json()}")
    t0, c0 = time.perf_counter(), time.process_time()
    report = await engine.run(plan)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not report.ok:
        raise SystemExit(f"cycle not clean: {[d.error for d in report.domains]}")
    return took, cpu


async def measure(kind: str, names: list[str], settings: EngineSettings, scale: float, rounds: int) -> None:
    host = SimHost.from_dict(topology(), "bench", time_scale=scale)
    addrs = [host.address_of(n) for n in names]
    ones = [await one_cycle(host, addrs[:1], settings) for _ in range(rounds)]
    manys = [await one_cycle(host, addrs, settings) for _ in range(rounds)]
    one = statistics.median(w for w, _ in ones)
    many = statistics.median(w for w, _ in manys)
    cpu = statistics.median(c for _, c in manys)
    serial = 0.0
    for a in addrs:
        serial += (await one_cycle(host, [a], settings))[0]
    method = {r.method for r in host.reset_log}
    print(f"{kind:<22} 1 domain {one * 1000:6.1f} ms | {N} domains {many * 1000:6.1f} ms "
          f"(CPU {cpu * 1000:4.1f} ms) | ratio {many / one:4.2f} (goal <= 1.2) | "
          f"serial {serial * 1000:6.1f} ms ({serial / many:3.1f}x) | "
          f"host resets: {', '.join(sorted(method))}")


async def main_async(scale: float, rounds: int) -> None:
    print(f"time_scale={scale}, median of {rounds} round(s); each cycle = plan-free run: "
          "lock, save, reset, poll, rescan, diff, restore, verify")
    await measure("FLR", [f"nic{i}" for i in range(N)], EngineSettings(), scale, rounds)
    await measure("bus reset (kernel)", [f"gpu{i}" for i in range(N)],
                  EngineSettings(bus_methods=(Method.KERNEL_BUS,)), scale, rounds)
    await measure("bus reset (user SBR)", [f"gpu{i}" for i in range(N)],
                  EngineSettings(bus_methods=(Method.USER_SBR,)), scale, rounds)
    print("CPU = process time of the 8-domain run; it includes the simulator's in-process")
    print("emulation of the kernel's save/restore (about 1.5 ms per reset on this machine),")
    print("which serializes on the one event loop where the real kernel would run in parallel.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main_async(args.time_scale, args.rounds))


if __name__ == "__main__":
    main()
