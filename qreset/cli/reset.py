"""``qreset reset BDF...``: plan, reset, rescan and restore some functions now.

The same engine the daemon runs for a guest reset, driven once from the
command line: plan the functions as one VM's (``--vm``), refuse exactly as
``qreset plan`` would, then reset every domain concurrently, printing each
domain's timeline as it happens::

    +    103.2ms  bus:0000:00:1c.0  poll  0000:01:00.0 ready after 3 poll(s)

and a summary: what was reset and how, what was restored (and verified),
what changed identity (never written to: re-probe or re-plug it).

Exit status: 0 every domain came back clean, 1 refused or some domain did
not (reset failed, function absent, identity changed, restore unverified),
2 bad arguments or an unreadable host. ``--time-scale`` speeds up the
simulated host's delays (``--sim`` only).
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
    parse_plan_arguments,
    policy_from_arguments,
    print_json,
    unknown_functions,
)

if TYPE_CHECKING:
    from qreset.engine import CycleReport, DomainResult
    from qreset.pci.address import PciAddress
    from qreset.plan import Plan


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Plan the resets of some functions (as one VM's), reset every domain now (in\n"
        "parallel, under the same per-domain locks as the daemon), rescan config space\n"
        "and restore only what changed; escalate instead when a function changed identity."
    )
    parser.epilog = (
        "examples:\n"
        "  qreset reset --sim configs/sim/gpu-audio.toml --time-scale 0.1 01:00.0\n"
        "  qreset reset 0000:03:00.0 --dry-run\n"
        "  qreset reset --sim configs/sim/demo.toml 05:01.0 --allow 05:02.0 --json\n"
        "exit status: 0 all domains clean, 1 refused or not clean, 2 bad arguments"
    )
    add_plan_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="plan and print, touch nothing")
    parser.add_argument("--time-scale", type=float, default=None, metavar="F",
                        help="multiply the simulated host's delays by F (--sim only; default 1.0)")
    add_host_arguments(parser)
    add_json_argument(parser)


def _print_plan(plan: Plan) -> None:
    print(f"plan for {plan.vm} (policy {plan.policy.takeover.value}): {'OK' if plan.ok else 'REFUSED'}")
    for d in plan.domains:
        print(f"  {d.key}: {d.kind.value} reset by {d.method.value}, covers "
              + ", ".join(str(a) for a in d.covers))
    for d in plan.refused_domains:
        print(f"  REFUSED {d.key}: {d.kind.value} reset ({d.method.value})")
    for b in plan.refusals:
        print(f"  refused: {b}")
    for a, why in plan.left_to_qemu:
        print(f"  left to QEMU: {a}: {why}")


def _phases(res: DomainResult) -> str:
    return " ".join(f"{k} {v * 1000:.1f}" for k, v in res.phases.items() if v > 0.0) + " ms"


def _print_summary(report: CycleReport) -> None:
    print(f"summary: {'OK' if report.ok else 'NOT CLEAN'}: {len(report.domains)} domain(s) "
          f"in {report.duration * 1000:.1f} ms")
    for res in report.domains:
        d = res.domain
        print(f"  {d.key}: {d.method.value} {'ok' if res.ok else 'FAILED'} [{_phases(res)}]")
        if res.error:
            print(f"      error: {res.error}")
        for f in res.functions:
            if f.change == "none":
                what = "unchanged, nothing written"
            elif f.change == "state":
                what = (f"state restored ({f.writes} write(s)), "
                        f"{'verified' if f.verified else 'NOT verified'}")
            elif f.change == "identity":
                what = "IDENTITY CHANGED, not restored (re-probe / re-plug it)"
            else:
                what = "ABSENT"
            print(f"      {f.address}: {what}")
            if f.diff is not None and f.change in ("identity", "absent"):
                print(f"          {f.diff.summary()}")
            if f.error and f.change not in ("absent",):
                print(f"          error: {f.error}")
    if report.identity_changed:
        print("  identity changed: " + ", ".join(map(str, report.identity_changed)))


async def _run(args: argparse.Namespace, mine: list[PciAddress], allow: frozenset[PciAddress],
               others: dict[str, list[PciAddress]], time_scale: float) -> int:
    from qreset.cli.common import open_host
    from qreset.engine import Engine
    from qreset.errors import ConfigError, QResetError

    try:
        host = open_host(args, time_scale)
    except ConfigError as exc:
        return fail(str(exc))
    try:
        engine = Engine(host)
        try:
            topo = await engine.topology()
        except QResetError as exc:
            return fail(f"cannot read the host: {exc}")
        unknown = unknown_functions(topo, [*mine, *allow, *(a for v in others.values() for a in v)])
        if unknown is not None:
            return fail(unknown)
        policy = policy_from_arguments(args, allow)
        plan = await engine.plan(args.vm, mine, {args.vm: mine, **others}, policy)
        if not plan.ok or args.dry_run:
            if args.json:
                print_json({"ok": plan.ok, "dry_run": args.dry_run, "plan": plan.to_json()})
            else:
                _print_plan(plan)
            return 0 if plan.ok else 1
        if not args.json:
            _print_plan(plan)
        progress = None if args.json else (lambda e: print(e.line(), flush=True))
        report = await engine.run(plan, progress)
        if args.json:
            print_json(report.to_json())
        else:
            _print_summary(report)
        return 0 if report.ok else 1
    finally:
        await host.close()


def run(args: argparse.Namespace) -> int:
    try:
        mine, allow, others = parse_plan_arguments(args)
    except BadArguments as exc:
        return fail(str(exc))
    if args.time_scale is not None:
        if args.sim is None:
            return fail("--time-scale applies to a simulated host only (--sim FILE)")
        if not args.time_scale >= 0.0:
            return fail(f"--time-scale {args.time_scale}: must be >= 0")
    bad_host = host_argument_error(args)
    if bad_host is not None:
        return fail(bad_host)
    scale = 1.0 if args.time_scale is None else args.time_scale
    return asyncio.run(_run(args, mine, allow, others, scale))
