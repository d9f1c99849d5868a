"""``qreset topology``: the host PCI tree annotated with reset methods, IOMMU groups and drivers."""

from __future__ import annotations

import argparse
import logging

from qreset.cli.common import (
    HostUnreadable,
    add_host_arguments,
    add_json_argument,
    fail,
    host_argument_error,
    print_json,
    print_text,
    read_topology,
)
from qreset.pci.address import PciAddress
from qreset.topology import Topology

logger = logging.getLogger(__name__)

#: (base class, subclass) -> short name, from the PCI Code and ID Assignment spec
#: (the same table lspci prints from pci.ids); anything else shows as hex.
CLASS_NAMES: dict[int, str] = {
    0x0100: "SCSI", 0x0101: "IDE", 0x0104: "RAID", 0x0106: "SATA", 0x0107: "SAS", 0x0108: "NVMe",
    0x0180: "storage",
    0x0200: "Ethernet", 0x0207: "InfiniBand", 0x0280: "network",
    0x0300: "VGA", 0x0302: "3D controller", 0x0380: "display",
    0x0401: "audio", 0x0403: "HD audio",
    0x0600: "host bridge", 0x0601: "ISA bridge", 0x0604: "PCI bridge", 0x0680: "bridge",
    0x0c03: "USB", 0x0c05: "SMBus", 0x1200: "accelerator",
    0xFF00: "unassigned class",
}


def class_name(class_code: int) -> str:
    return CLASS_NAMES.get(class_code >> 8, f"class {class_code:06x}")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Show the host's PCI tree like 'lspci -t', each function annotated with its\n"
        "vendor:device, class, bound driver, IOMMU group and the kernel's reset methods\n"
        "(sysfs reset_method). Bridges show their bus range, ACS isolation, whether their\n"
        "secondary bus is conventional PCI, hotplug slots and reset_subordinate.\n"
        "Read-only: nothing is written to any device."
    )
    parser.epilog = (
        "examples:\n"
        "  qreset topology                                  # this machine's /sys\n"
        "  qreset topology --sim configs/sim/switch.toml    # a simulated host\n"
        "  qreset topology --json | jq '.[] | select(.driver == \"vfio-pci\") | .bdf'\n"
        "\n"
        "--json prints a list with one object per function: bdf, vendor, device, class\n"
        "(integers), driver, iommu_group, reset_methods, parent (bridge BDF or null),\n"
        "capabilities [{id, offset}], ext_capabilities [{id, offset, version}] (ids as\n"
        "integers), slot, hot_reset_scope, and for bridges secondary_bus, subordinate_bus,\n"
        "acs_isolated, conventional_bus, has_reset_subordinate.\n"
        "\n"
        "reset=- means the kernel exposes no reset_method for that function: no method\n"
        "works, or the kernel is older than 5.15 ('config:' then shows what config space\n"
        "advertises)."
    )
    add_host_arguments(parser)
    add_json_argument(parser)


def _annotation(topo: Topology, addr: PciAddress) -> str:
    node = topo.node(addr)
    info, cfg = node.info, node.config
    parts = [
        f"{info.vendor:04x}:{info.device:04x}",
        class_name(info.class_code),
        f"driver={info.driver or '-'}",
        f"group={'-' if info.iommu_group is None else info.iommu_group}",
        f"reset={','.join(info.reset_methods) or '-'}",
    ]
    if not info.reset_methods and (cm := topo.config_methods(addr)):
        parts.append(f"(config: {','.join(cm)})")
    if not cfg.present:
        parts.append("[not present]")
    if topo.is_bridge(addr):
        if cfg.secondary_bus is not None:
            parts.append(f"bus [{cfg.secondary_bus:02x}-{cfg.subordinate_bus or 0:02x}]")
        acs = topo.acs_isolated(addr)
        if acs is not None:
            parts.append("ACS" if acs else "no-ACS")
        if topo.conventional_bus(addr):
            parts.append("conventional")
        if info.has_reset_subordinate:
            parts.append("reset_subordinate")
    slot = topo.slot_of(addr)
    if slot is not None:
        parts.append(f"slot {slot.name}{' (hotplug)' if slot.hotplug else ''}")
    return "  ".join(parts)


def _short(addr: PciAddress) -> str:
    return f"{addr.bus:02x}:{addr.device:02x}.{addr.function}"


def render_tree(topo: Topology) -> list[str]:
    """The tree as text lines, roots grouped by root bus, children under their bridge."""
    lines: list[str] = []
    n = len(topo.functions)
    facts = [f"{n} function{'s' * (n != 1)}"]
    if not topo.iommu:
        facts.append("no IOMMU groups (cannot assign devices)")
    if not any(node.info.reset_methods for node in topo.functions.values()):
        facts.append("kernel exposes no reset_method (older than 5.15, or no method works)")
    lines.append(f"{topo.host_name}: {', '.join(facts)}")

    def walk(addr: PciAddress, prefix: str, last: bool) -> None:
        lines.append(f"{prefix}{'`-- ' if last else '|-- '}{_short(addr)}  {_annotation(topo, addr)}")
        kids = topo.children(addr)
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("    " if last else "|   "), i == len(kids) - 1)

    roots = topo.roots()
    buses = sorted({(a.domain, a.bus) for a in roots})
    for dom, bus in buses:
        lines.append(f"[{dom:04x}:{bus:02x}]")
        on_bus = [a for a in roots if (a.domain, a.bus) == (dom, bus)]
        for i, addr in enumerate(on_bus):
            walk(addr, "", i == len(on_bus) - 1)
    return lines


def run(args: argparse.Namespace) -> int:
    if (err := host_argument_error(args)) is not None:
        return fail(err)
    try:
        topo = read_topology(args)
    except HostUnreadable as exc:
        return fail(str(exc), exc.code)
    if args.json:
        print_json([topo.describe(a) for a in topo.functions])
    else:
        print_text("\n".join(render_tree(topo)))
    return 0
