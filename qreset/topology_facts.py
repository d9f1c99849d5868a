"""
Facts about one function of a :class:`~qreset.topology.Topology` read from its
config space: whether enough of it was read, whether a bridge's secondary bus
is conventional, ACS isolation of a port, and the JSON description
``qreset topology --json`` prints. Pure functions over the topology (the
methods of the same names delegate here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.cfgspace import u16

if TYPE_CHECKING:
    from qreset.topology import Topology

#: PCIe port types that lead to a link below them (``pcie_downstream_port()`` in
#: drivers/pci/pci.h); ACS on these decides IOMMU group isolation.
ACS_PORT_TYPES = (regs.EXP_TYPE_ROOT_PORT, regs.EXP_TYPE_DOWNSTREAM)


def config_complete(topo: Topology, addr: PciAddress) -> bool:
    """Whether enough config space was read to see the capability list.

    Unprivileged sysfs reads stop at 64 bytes, before any capability.
    """
    cfg = topo.node(addr).config
    return cfg.present and len(cfg.raw) >= regs.CFG_SPACE_SIZE


def conventional_bus(topo: Topology, bridge: PciAddress) -> bool:
    """Whether ``bridge``'s secondary bus is conventional PCI (or PCI-X).

    True for a PCIe-to-PCI bridge (``PCI_EXP_TYPE_PCI_BRIDGE``) and for a
    bridge with no PCIe capability at all (a PCI-to-PCI bridge);
    ``pci_bridge_wait_for_secondary_bus`` waits 1000 ms + delay after a
    reset of a non-PCIe bus (PCI Local Bus 3.0 Trhfa). False when config
    space was too short to tell.
    """
    cfg = topo.node(bridge).config
    if not cfg.is_bridge or not topo.config_complete(bridge):
        return False
    ptype = cfg.pcie_type
    return ptype is None or ptype == regs.EXP_TYPE_PCI_BRIDGE


def acs_isolated(topo: Topology, port: PciAddress) -> bool | None:
    """ACS isolation of a root or downstream port; None for other functions.

    ``pci_acs_flags_enabled`` in drivers/pci/pci.c: the required flags are
    SV|RR|CR|UF (``regs.ACS_ISOLATION``) restricted to those the ACS
    Capability register advertises ("features missing from the capability
    field can be assumed as hard-wired enabled"); each must be set in the
    ACS Control register. No ACS capability means not isolated.
    """
    cfg = topo.node(port).config
    if cfg.pcie_type not in ACS_PORT_TYPES:
        return None
    cap = cfg.find_ext_cap(regs.EXT_CAP_ID_ACS)
    if cap is None:
        return False
    acs_cap = u16(cfg.raw, cap.offset + regs.ACS_CAP)
    ctrl = u16(cfg.raw, cap.offset + regs.ACS_CTRL)
    if acs_cap == 0xFFFF or ctrl == 0xFFFF:
        return False
    required = regs.ACS_ISOLATION & (acs_cap | regs.ACS_EC)
    return (ctrl & required) == required


def describe(topo: Topology, addr: PciAddress) -> dict[str, Any]:
    """One function as JSON-ready data (``qreset topology --json``).

    IDs, class and capability IDs are integers (simplest for scripts);
    addresses are strings in the kernel's ``DDDD:BB:DD.F`` form.
    """
    node = topo.node(addr)
    info, cfg = node.info, node.config
    slot = topo.slot_of(addr)
    hot = topo.hot_reset_scope(addr)
    out: dict[str, Any] = {
        "bdf": str(addr),
        "vendor": info.vendor,
        "device": info.device,
        "class": info.class_code,
        "revision": info.revision,
        "subsystem_vendor": info.subsystem_vendor,
        "subsystem_device": info.subsystem_device,
        "driver": info.driver,
        "driver_override": info.driver_override,
        "iommu_group": info.iommu_group,
        "reset_methods": list(info.reset_methods),
        "function_methods": list(topo.function_methods(addr)),
        "parent": str(p) if (p := topo._parent[addr]) is not None else None,
        "is_bridge": topo.is_bridge(addr),
        "pcie_type": cfg.pcie_type,
        "multifunction": cfg.multifunction,
        "present": cfg.present,
        "config_size": len(cfg.raw),
        "capabilities": [{"id": c.id, "offset": c.offset} for c in cfg.capabilities],
        "ext_capabilities": [
            {"id": c.id, "offset": c.offset, "version": c.version} for c in cfg.ext_capabilities
        ],
        "slot": {"name": slot.name, "hotplug": slot.hotplug} if slot else None,
        "physfn": str(info.physfn) if info.physfn else None,
        "virtfns": [str(v) for v in info.virtfns],
        "hot_reset_scope": hot.to_json() if hot else None,
    }
    if topo.is_bridge(addr):
        out["secondary_bus"] = cfg.secondary_bus
        out["subordinate_bus"] = cfg.subordinate_bus
        out["has_reset_subordinate"] = info.has_reset_subordinate
        out["conventional_bus"] = topo.conventional_bus(addr)
        out["acs_isolated"] = topo.acs_isolated(addr)
    return out


def config_methods(topo: Topology, addr: PciAddress) -> tuple[str, ...]:
    """Function-level methods config space advertises, probed like the kernel.

    For hosts whose kernel has no ``reset_method`` (before 5.15): ``flr``
    (``pcie_has_flr``), ``af_flr`` (``pci_af_flr`` probe) and ``pm``
    (``pci_pm_reset`` probe: PM cap without No_Soft_Reset), in the kernel's
    order (``pci_reset_fn_methods`` in drivers/pci/pci.c). Device-specific
    and ACPI methods are invisible from config space.
    """
    cfg = topo.node(addr).config
    out: list[str] = []
    if cfg.present and cfg.has_flr:
        out.append("flr")
    if cfg.present and cfg.has_af_flr:
        out.append("af_flr")
    if cfg.present and cfg.has_pm_reset:
        out.append("pm")
    return tuple(out)
