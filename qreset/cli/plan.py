"""``qreset plan BDF...``: show what a reset of some functions would do, touching nothing.

Reads the host (real sysfs, a sysfs tree, or a simulated host), builds the
topology, and prints the planner's answer: each domain with its method and
every function it covers, QEMU's own predicted behaviour per function, what
is left to QEMU (``--policy gaps``) and any refusal naming the blocking
function and its owner. Exit 0 when the plan is OK, 1 when refused, 2 on bad
arguments (unparsable or unknown addresses, bad ``--other``, unreadable host).

Ownership here comes from drivers only, plus ``--other VM=BDF,BDF`` for the
functions other VMs hold (the daemon knows its VMs and passes them itself).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from qreset.cli.common import (
    add_host_arguments,
    add_json_argument,
    fail,
    host_argument_error,
    load_topology,
    print_json,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qreset.pci.address import PciAddress
    from qreset.plan import Owner, Plan
    from qreset.topology import Topology


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Plan the resets of some functions (as if they were one VM's) without touching\n"
        "anything: reset domains, methods, covered functions, what QEMU itself would do,\n"
        "and refusals naming each blocking function and its owner."
    )
    parser.epilog = (
        "examples:\n"
        "  qreset plan 0000:01:00.0 0000:01:00.1\n"
        "  qreset plan --sim configs/sim/gpu-audio.toml 01:00.0 --policy gaps\n"
        "  qreset plan --sim configs/sim/demo.toml 05:01.0 --other vm2=05:02.0 --allow 05:02.0 --json\n"
        "exit status: 0 plan OK, 1 refused, 2 bad arguments"
    )
    parser.add_argument("functions", nargs="+", metavar="BDF", help="functions of the VM to plan for")
    parser.add_argument("--vm", default="cli", help="name of the VM the functions belong to (default: cli)")
    parser.add_argument("--policy", choices=("all", "gaps"), default="all",
                        help="all: reset everything ourselves; gaps: only what QEMU's reset cannot")
    parser.add_argument("--allow", nargs="+", action="extend", default=[], metavar="BDF",
                        help="functions of other VMs or host drivers a reset may hit anyway")
    parser.add_argument("--other", action="append", default=[], metavar="VM=BDF,BDF",
                        help="functions held by another VM (repeatable)")
    parser.add_argument("--vfio-ioctl-ok", action="store_true",
                        help="the VFIO groups are idle: VFIO hot reset may be planned")
    parser.add_argument("--pm-last", action="store_true",
                        help="like QEMU, use a PM reset only when no slot/bus reset is allowed")
    add_host_arguments(parser)
    add_json_argument(parser)


class _BadArgs(ValueError):
    pass


def _parse_others(items: list[str], vm: str) -> dict[str, list[PciAddress]]:
    from qreset.errors import AddressError
    from qreset.pci.address import PciAddress

    out: dict[str, list[PciAddress]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise _BadArgs(f"--other {item!r}: expected VM=BDF[,BDF...]")
        if name == vm:
            raise _BadArgs(f"--other {item!r}: {name} is the VM being planned (--vm)")
        try:
            out.setdefault(name, []).extend(PciAddress.parse(b) for b in rest.split(",") if b.strip())
        except AddressError as exc:
            raise _BadArgs(f"--other {item!r}: {exc}") from None
    return out


def _print_text(plan: Plan, topo: Topology, owners: Mapping[PciAddress, Owner]) -> None:
    from qreset.plan import OwnerKind

    def label(a: PciAddress) -> str:
        node = topo.functions.get(a)
        drv = (node.info.driver if node else None) or "no driver"
        mine = " *" if a in plan.owned else ""
        owner = owners.get(a)
        held = f" held by {owner.name}" if owner is not None and owner.kind is OwnerKind.OTHER_VM else ""
        allowed = " (allowed)" if a in plan.policy.allow else ""
        return f"{a} [{drv}]{held}{allowed}{mine}"

    print(f"plan for {plan.vm} on {topo.host_name} (policy {plan.policy.takeover.value}): "
          f"{'OK' if plan.ok else 'REFUSED'}")
    for d in plan.domains:
        print(f"  domain {d.key}: {d.kind.value} reset, method {d.method.value}")
        for a in d.covers:
            print(f"      covers {label(a)}")
        if d.reason:
            print(f"      why: {d.reason}")
    for d in plan.refused_domains:
        print(f"  REFUSED domain {d.key}: {d.kind.value} reset ({d.method.value})")
        for a in d.covers:
            print(f"      would hit {label(a)}")
    for b in plan.refusals:
        print(f"  refused: {b}")
    if plan.qemu:
        print("  QEMU's own reset (predicted):")
        for q in plan.qemu:
            print(f"      {q.function}: {q.action.value}: {q.detail}")
    for a, why in plan.left_to_qemu:
        print(f"  left to QEMU: {a}: {why}")
    print("  (* = the VM's functions)")


def run(args: argparse.Namespace) -> int:
    from qreset.errors import AddressError, ConfigError, QResetError
    from qreset.pci.address import PciAddress
    from qreset.plan import Policy, Takeover, make_plan, owners_of

    try:
        mine = [PciAddress.parse(b) for b in args.functions]
        allow = frozenset(PciAddress.parse(b) for b in args.allow)
        others = _parse_others(args.other, args.vm)
    except (AddressError, _BadArgs) as exc:
        return fail(str(exc))
    clash = sorted(set(mine) & {a for v in others.values() for a in v})
    if clash:
        return fail(f"{', '.join(map(str, clash))} listed both for {args.vm} and in --other")
    bad_host = host_argument_error(args)
    if bad_host is not None:
        return fail(bad_host)
    try:
        topo = asyncio.run(load_topology(args, time_scale=0.0))
    except ConfigError as exc:
        return fail(str(exc))
    except QResetError as exc:
        return fail(f"cannot read the host: {exc}")
    unknown = [str(a) for a in [*mine, *allow, *(a for v in others.values() for a in v)]
               if a not in topo.functions]
    if unknown:
        return fail(f"no such PCI function on {topo.host_name}: {', '.join(unknown)}")
    policy = Policy(takeover=Takeover(args.policy), allow=allow, vfio_ioctl_ok=args.vfio_ioctl_ok,
                    pm_suffices=not args.pm_last)
    vms = {args.vm: mine, **others}
    owners = owners_of(topo, vms, args.vm)
    plan = make_plan(args.vm, mine, topo, owners, policy)
    if args.json:
        print_json(plan.to_json())
    else:
        _print_text(plan, topo, owners)
    return 0 if plan.ok else 1
