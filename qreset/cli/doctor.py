"""``qreset doctor [BDF ...]``: how each function can be reset, what that hits, what blocks it."""

from __future__ import annotations

import argparse

from qreset.cli.common import (
    HostUnreadable,
    add_host_arguments,
    add_json_argument,
    fail,
    host_argument_error,
    print_json,
    print_text,
    read_topology,
    unknown_functions,
)
from qreset.cli.topology import class_name
from qreset.doctor import PROBLEM_CODES, FunctionReport, Hit, Problem, Report, diagnose
from qreset.errors import AddressError
from qreset.pci.address import PciAddress
from qreset.topology import ResetKind


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Explain, for each PCI function, every way the host can reset it (function-level\n"
        "methods, the kernel's bus method, a VFIO hot reset, the bridge's reset_subordinate,\n"
        "a userspace secondary bus reset), what else each one would hit (with drivers and\n"
        "IOMMU groups), and what blocks assigning or resetting it, with a remedy for each.\n"
        "Read-only: nothing is written to any device."
    )
    parser.epilog = (
        "examples:\n"
        "  qreset doctor                                   # every function of this machine\n"
        "  qreset doctor 0000:01:00.0 01:00.1              # just these (BB:DD.F means domain 0)\n"
        "  qreset doctor --sim configs/sim/gpu-audio.toml  # a simulated host\n"
        "  qreset doctor --json | jq '.functions[] | select(.problems != []) | .bdf'\n"
        "\n"
        "severities: blocker = cannot be reset safely as things stand; warning = can, at a\n"
        "cost worth knowing; info = context. Each problem has a stable 'code' in --json:\n"
        + "".join(f"  {code:<21} {what}\n" for code, what in PROBLEM_CODES.items())
        + "\n"
        "exit status: 0 when the host could be inspected (whatever was found), 1 when\n"
        "reading the host failed, 2 on bad arguments (bad or unknown BDF, missing or invalid\n"
        "--sim file, missing --sysfs-root)."
    )
    parser.add_argument("bdfs", nargs="*", metavar="BDF",
                        help="functions to examine (DDDD:BB:DD.F or BB:DD.F); default: all")
    add_host_arguments(parser)
    add_json_argument(parser)


def _hit(h: Hit) -> str:
    group = "-" if h.iommu_group is None else h.iommu_group
    return f"{h.address} ({h.driver or 'no driver'}, group {group})"


def _problem(p: Problem, indent: str) -> list[str]:
    return [f"{indent}[{p.severity.value}] {p.message}", f"{indent}    fix: {p.remedy}"]


def render_function(f: FunctionReport) -> list[str]:
    group = "-" if f.iommu_group is None else f.iommu_group
    lines = [
        f"{f.address}  {f.vendor:04x}:{f.device:04x} {class_name(f.class_code)}  "
        f"driver={f.driver or '-'}  group={group}  parent={f.parent or 'root bus'}",
        f"  reset: {f.summary}",
    ]
    if f.options:
        lines.append("  options:")
    for o in f.options:
        also = "; ".join(_hit(h) for h in o.hits) or "nothing else"
        what = "function-level" if o.kind is ResetKind.FUNCTION else f"{o.kind.value} reset of {o.target}"
        lines.append(f"    {o.method:<18} {what}, also hits: {also}")
        if o.kind is not ResetKind.FUNCTION and o.note:
            lines.append("    " + " " * 18 + " " + o.note)
        if o.blocked_by:
            lines.append("    " + " " * 18 + " blocked by: "
                         + ", ".join(f"{h.address} ({h.driver or 'no driver'})" for h in o.blocked_by))
    if f.is_bridge:
        lines.append("  (bridge: not a device to assign; not diagnosed)")
    for p in f.problems:
        lines.extend(_problem(p, "  "))
    return lines


def render(report: Report) -> list[str]:
    lines = [f"{report.host}: {len(report.functions)} function(s) examined"]
    for n in report.notes:
        lines.extend(_problem(n, "  "))
    for f in report.functions:
        lines.append("")
        lines.extend(render_function(f))
    return lines


def run(args: argparse.Namespace) -> int:
    if (err := host_argument_error(args)) is not None:
        return fail(err)
    try:
        wanted = [PciAddress.parse(b) for b in args.bdfs]
    except AddressError as exc:
        return fail(str(exc))
    try:
        topo = read_topology(args)
    except HostUnreadable as exc:
        return fail(str(exc), exc.code)
    if (unknown := unknown_functions(topo, wanted)) is not None:
        return fail(unknown)
    report = diagnose(topo, wanted or None)
    if args.json:
        print_json(report.to_json())
    else:
        print_text("\n".join(render(report)))
    return 0
