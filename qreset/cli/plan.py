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
    BadArguments,
    add_host_arguments,
    add_json_argument,
    add_plan_arguments,
    fail,
    host_argument_error,
    load_topology,
    parse_plan_arguments,
    policy_from_arguments,
    print_json,
    unknown_functions,
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
    add_plan_arguments(parser)
    parser.add_argument("--pm-last", action="store_true",
                        help="like QEMU, use a PM reset only when no slot/bus reset is allowed")
    add_host_arguments(parser)
    add_json_argument(parser)


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
    from qreset.errors import ConfigError, QResetError
    from qreset.plan import make_plan, owners_of

    try:
        mine, allow, others = parse_plan_arguments(args)
    except BadArguments as exc:
        return fail(str(exc))
    bad_host = host_argument_error(args)
    if bad_host is not None:
        return fail(bad_host)
    try:
        topo = asyncio.run(load_topology(args, time_scale=0.0))
    except ConfigError as exc:
        return fail(str(exc))
    except QResetError as exc:
        return fail(f"cannot read the host: {exc}")
    unknown = unknown_functions(topo, [*mine, *allow, *(a for v in others.values() for a in v)])
    if unknown is not None:
        return fail(unknown)
    policy = policy_from_arguments(args, allow)
    vms = {args.vm: mine, **others}
    owners = owners_of(topo, vms, args.vm)
    plan = make_plan(args.vm, mine, topo, owners, policy)
    if args.json:
        print_json(plan.to_json())
    else:
        _print_text(plan, topo, owners)
    return 0 if plan.ok else 1
