"""``qreset release VM|BDF...``: reset functions returned to the host, re-probe changed ones."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from qreset.cli.common import add_host_arguments, add_json_argument, fail, print_json
from qreset.qmpsync import DEFAULT_SOCKET


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Reset every function a VM had (the whole reset domain where needed), rescan config\n"
        "space, and re-probe (remove + rescan of the parent bridge) the devices whose identity\n"
        "changed, so host drivers bind to the device as it now is. Unchanged devices are not\n"
        "re-probed."
    )
    parser.epilog = (
        "examples:\n"
        "  qreset release vm1                          # ask the daemon: VM vm1 is gone\n"
        "  qreset release 0000:06:00.0 0000:06:00.1    # these functions, directly on /sys\n"
        "  qreset release --sim configs/sim/gpu-audio.toml 01:00.0 --json"
    )
    parser.add_argument("targets", nargs="+", metavar="VM|BDF",
                        help="a VM name known to the daemon, or host PCI addresses")
    add_host_arguments(parser)
    parser.add_argument("--socket", default=os.environ.get("QRESET_SOCKET", DEFAULT_SOCKET),
                        help="daemon control socket, used when a VM name is given")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="simulated host only: multiply every delay by this")
    add_json_argument(parser)


async def _local(args: argparse.Namespace, bdfs: list[str]) -> int:
    from qreset.cli.common import open_host
    from qreset.engine import Engine
    from qreset.pci.address import PciAddress
    from qreset.plan import Policy
    from qreset.release import release

    functions = [PciAddress.parse(b) for b in bdfs]
    host = open_host(args, time_scale=args.time_scale)
    try:
        engine = Engine(host)
        report = await release(engine, "release", functions, {}, Policy())
    finally:
        await host.close()
    if args.json:
        print_json(report.to_json())
    else:
        for d in report.cycle.domains:
            state = "ok" if d.ok else f"FAILED: {d.error}"
            print(f"{d.domain.method.value:>18} {d.domain.key}: {state}")
        for b in report.cycle.plan.refusals:
            print(f"refused: {b}")
        if report.removed:
            print("re-probed (identity changed): " + ", ".join(map(str, report.removed)))
        else:
            print("no identity change: nothing re-probed")
    return 0 if report.ok else 1


def _remote(args: argparse.Namespace, vm: str) -> int:
    from qreset.errors import QResetError
    from qreset.qmpsync import call

    try:
        result = call(args.socket, "remove-vm", timeout=300, name=vm, release=True)
    except QResetError as exc:
        return fail(str(exc), 1)
    if args.json:
        print_json(result)
    else:
        print(result)
    return 0


def run(args: argparse.Namespace) -> int:
    from qreset.errors import QResetError
    from qreset.pci.address import PciAddress

    targets: list[str] = args.targets
    bdfs: list[str] = []
    for t in targets:
        try:
            PciAddress.parse(t)
            bdfs.append(t)
        except QResetError:
            pass
    if bdfs and len(bdfs) != len(targets):
        return fail("give either one VM name or PCI addresses, not both")
    if not bdfs:
        if len(targets) != 1:
            return fail("give one VM name (or PCI addresses)")
        return _remote(args, targets[0])
    try:
        return asyncio.run(_local(args, bdfs))
    except QResetError as exc:
        print(f"qreset: {exc}", file=sys.stderr)
        return 2
