"""
How long ``qreset hook`` takes, start to exit, as libvirt runs it.

libvirt runs hooks synchronously for every guest start, stop and migration,
so the hook's start-up time is added to each of them. Measured here: the
median (and spread) of ``--runs`` runs of

- ``qreset hook g migrate begin -``: an operation the hook ignores (the floor:
  interpreter, argparse, the subcommand registry);
- ``qreset hook g started begin -`` with a domain XML carrying two PCI
  hostdevs on stdin, against an absent daemon: parse the XML, try the
  control socket, warn on stderr, exit 0 (the path every guest start takes
  on a host where qreset is installed but not running);
- ``python -c pass``: the interpreter alone, for reference.

Each is a fresh process, as under libvirt. Usage::

    .venv/bin/python bench/hook_startup.py [--runs 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

DOMAIN_XML = """\
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>g</name>
  <uuid>3e3fce45-4f53-4fa7-bb32-11f34168b82b</uuid>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/></source>
    </hostdev>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=qreset0,path=/run/qreset/g.qmp,server=on,wait=off'/>
    <qemu:arg value='-mon'/>
    <qemu:arg value='chardev=qreset0,mode=control'/>
  </qemu:commandline>
</domain>
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(argv: Sequence[str], stdin: bytes, runs: int) -> tuple[list[float], list[float]]:
    """
    Wall-clock and CPU (user + system) seconds of ``runs`` fresh processes;
    each must exit 0 and print nothing on stdout. The CPU time is what the
    hook costs even on a busy host, where wall-clock also measures the
    scheduler.
    """
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(runs):
        cpu0 = _children_cpu()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, input=stdin, capture_output=True, check=False)
        wall.append(time.perf_counter() - t0)
        cpu.append(_children_cpu() - cpu0)
        if proc.returncode != 0 or proc.stdout:
            raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}, stdout {proc.stdout!r}, "
                             f"stderr {proc.stderr.decode(errors='replace').strip()!r}")
    return wall, cpu


def summary(times: tuple[list[float], list[float]]) -> dict[str, float]:
    wall, cpu = sorted(times[0]), times[1]
    return {
        "median_ms": round(statistics.median(wall) * 1000, 1),
        "min_ms": round(wall[0] * 1000, 1),
        "p90_ms": round(wall[min(len(wall) - 1, int(len(wall) * 0.9))] * 1000, 1),
        "max_ms": round(wall[-1] * 1000, 1),
        "cpu_median_ms": round(statistics.median(cpu) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    qreset = [sys.executable, "-m", "qreset"]
    with tempfile.TemporaryDirectory(prefix="qrb") as tmp:
        absent = str(Path(tmp) / "control.sock")  # nothing listens here
        cases = {
            "python -c pass": ([sys.executable, "-c", "pass"], b""),
            "hook migrate (ignored op)": ([*qreset, "hook", "g", "migrate", "begin", "-"], b""),
            "hook started, daemon absent": (
                [*qreset, "hook", "g", "started", "begin", "-", "--socket", absent],
                DOMAIN_XML.encode(),
            ),
        }
        measure(cases["hook migrate (ignored op)"][0], b"", 2)  # warm the page cache / .pyc files
        results = {name: summary(measure(argv, stdin, args.runs)) for name, (argv, stdin) in cases.items()}
    if args.json:
        print(json.dumps({"runs": args.runs, "results": results}, indent=2))
        return 0
    print(f"qreset hook start-up, {args.runs} runs each (fresh process per run)")
    print(f"  {'case':<30} {'median':>8} {'min':>8} {'p90':>8} {'max':>8} {'CPU med':>8}")
    for name, s in results.items():
        print(f"  {name:<30} {s['median_ms']:>6.1f}ms {s['min_ms']:>6.1f}ms "
              f"{s['p90_ms']:>6.1f}ms {s['max_ms']:>6.1f}ms {s['cpu_median_ms']:>6.1f}ms")
    print("  (wall-clock; CPU = user + system time of the process, less sensitive to host load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
