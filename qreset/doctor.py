"""
Doctor: explain, per function, how it can be reset and what stands in the way.

Pure code over a :class:`~qreset.topology.Topology` (no I/O): for each function
it lists every way to reset it (its function-level methods; the kernel's
``bus`` method when it is alone below its bridge or in a hotplug slot; a
VFIO hot reset; the bridge's ``reset_subordinate``; a userspace secondary bus
reset), what each of those would also hit (with drivers and IOMMU groups),
and the problems that make assignment or reset hard, each with a remedy in one
sentence. ``qreset doctor`` prints this; the planner makes its own decisions
(it also knows which VM owns what) but the vocabulary is the same.

The rules are the kernel's (drivers/pci/pci.c, drivers/vfio/pci/vfio_pci_core.c,
drivers/iommu/iommu.c); see :mod:`qreset.topology` for the scopes.
"""

from __future__ import annotations

__all__ = [
    "PROBLEM_CODES", "FunctionReport", "Hit", "Problem", "Report", "ResetOption", "Severity",
    "diagnose", "diagnose_function", "host_notes",
]

from collections.abc import Iterable

from qreset.doctor_host import _reset_method_exposed, host_notes
from qreset.doctor_model import (
    _CLASS_BRIDGE,
    PORT_DRIVERS,
    PROBLEM_CODES,
    VFIO_DRIVER,
    FunctionReport,
    Hit,
    Problem,
    Report,
    ResetOption,
    Severity,
)
from qreset.pci.address import PciAddress
from qreset.topology import ResetKind, ResetScope, Topology


def _hits(topo: Topology, addrs: Iterable[PciAddress], exclude: PciAddress) -> tuple[Hit, ...]:
    out = []
    for a in sorted(addrs):
        if a == exclude:
            continue
        info = topo.node(a).info
        out.append(Hit(a, info.driver, info.iommu_group))
    return tuple(out)


def _host_driver(hit: Hit) -> bool:
    return hit.driver is not None and hit.driver != VFIO_DRIVER and hit.driver not in PORT_DRIVERS


def _names(addrs: Iterable[PciAddress]) -> str:
    return ", ".join(str(a) for a in sorted(addrs))


def _is_bridge_class(topo: Topology, addr: PciAddress) -> bool:
    return (topo.node(addr).info.class_code >> 16) == _CLASS_BRIDGE or topo.is_bridge(addr)


def _options(topo: Topology, addr: PciAddress) -> list[ResetOption]:
    opts: list[ResetOption] = []
    methods = topo.function_methods(addr)
    if not methods and not _reset_method_exposed(topo):
        methods = topo.config_methods(addr)

    def scoped(scope: ResetScope, method: str, note: str) -> ResetOption:
        hits = _hits(topo, scope.affected, addr)
        blocked = [h for h in hits if _host_driver(h)]
        if method == "vfio_hot_reset":
            # The ioctl is issued on the device itself: it must be bound to vfio-pci too.
            me = Hit(addr, topo.node(addr).info.driver, topo.node(addr).info.iommu_group)
            if me.driver != VFIO_DRIVER:
                blocked.insert(0, me)
        return ResetOption(scope.kind, method, scope.target, hits, tuple(blocked), note)

    fscope = topo.function_scope(addr)
    for m in methods:
        vfs = " (a PF reset also resets its VFs)" if len(fscope.affected) > 1 else ""
        opts.append(scoped(fscope, m, f"echo 1 > reset (reset_method={m}){vfs}"))

    kbus = topo.kernel_bus_scope(addr)
    if kbus is not None and ("bus" in topo.node(addr).info.reset_methods or not _reset_method_exposed(topo)):
        how = f"hotplug slot {kbus.slot}" if kbus.kind is ResetKind.SLOT else f"alone below {kbus.target}"
        opts.append(scoped(kbus, "bus", f"kernel reset_method=bus ({how}): the kernel saves and restores"))
    # VFIO only binds endpoints; a bridge is never the device a hot reset is issued on.
    hot = None if topo.is_bridge(addr) else topo.hot_reset_scope(addr)
    if hot is not None:
        opts.append(scoped(hot, "vfio_hot_reset",
                           "VFIO_DEVICE_PCI_HOT_RESET: every hit function must be bound to vfio-pci "
                           "and held by no QEMU (neither its group nor, with iommufd, its cdev)"))
    bus = topo.bus_scope(addr)
    if bus is not None:
        if topo.node(bus.target).info.has_reset_subordinate:
            opts.append(scoped(bus, "reset_subordinate",
                               f"echo 1 > {bus.target}/reset_subordinate (Linux 6.13+): "
                               "the kernel saves and restores"))
        pciehp = topo.slot_scope(addr) is not None
        opts.append(scoped(bus, "user_sbr",
                           f"Secondary Bus Reset bit of {bus.target}'s Bridge Control; "
                           "qreset restores state"
                           + ("; pciehp may take the link-down as a surprise removal "
                              "(pciehp_reset_slot masks it, userspace cannot)" if pciehp else "")))
    return opts


def _problems(topo: Topology, addr: PciAddress, opts: list[ResetOption]) -> list[Problem]:
    node = topo.node(addr)
    info, cfg = node.info, node.config
    probs: list[Problem] = []
    fmethods = [o for o in opts if o.kind is ResetKind.FUNCTION]
    parent = topo.parent(addr)
    bus = topo.bus_scope(addr)

    if not cfg.present:
        probs.append(Problem(
            "not-present", Severity.BLOCKER,
            f"config space reads as absent (Vendor ID {cfg.vendor_id:#06x})",
            "the function is gone or not ready: rescan (echo 1 > /sys/bus/pci/rescan) or power-cycle it",
        ))
    elif not topo.config_complete(addr):
        probs.append(Problem(
            "config-short", Severity.WARNING,
            f"only {len(cfg.raw)} bytes of config space readable: capabilities (FLR, PM, ACS) are unknown",
            "run as root (sysfs gives unprivileged readers only the first 64 bytes)",
        ))
    for p in cfg.problems:
        probs.append(Problem("config-broken", Severity.WARNING, f"config space: {p}",
                             "the device's capability list is malformed; expect resets to misbehave"))

    # PM (D3hot->D0) is the weakest method: QEMU tries a bus reset before it for
    # a device without FLR (vfio_pci_reset in hw/vfio/pci.c).
    strong = [o for o in fmethods if o.method != "pm"]
    host_users = [h for h in (bus.affected if bus else ()) if h != addr
                  and _host_driver(Hit(h, topo.node(h).info.driver, None))]
    if not strong and host_users:
        by_driver = ", ".join(f"{h} ({topo.node(h).info.driver})" for h in sorted(host_users))
        only_pm = " (only a PM reset is left)" if fmethods else ""
        probs.append(Problem(
            "no-flr-shared-bus", Severity.WARNING if fmethods else Severity.BLOCKER,
            f"no FLR and shares its bus with functions bound to host drivers: {by_driver}{only_pm}",
            "bind those functions to vfio-pci and assign them with this one, "
            "or allow them explicitly in the policy if a reset under their driver is acceptable",
        ))
    if not fmethods:
        if not host_users and bus is not None and len(bus.affected) > 1:
            probs.append(Problem(
                "no-flr-bus-reset", Severity.WARNING,
                f"no function-level reset: only a bus reset of {bus.target}, which also hits "
                f"{_names(bus.affected - {addr})}",
                "assign every function below that bridge to the same VM so one bus reset covers them all",
            ))
        if parent is None:
            probs.append(Problem(
                "root-bus", Severity.BLOCKER if not opts else Severity.WARNING,
                "on the root bus: no bus reset possible (a root bus has no bridge to reset it)",
                "only a function-level reset can reset it; move the card to a slot behind a root port",
            ))
        if not opts:
            probs.append(Problem(
                "no-reset", Severity.BLOCKER, "no reset method at all",
                "nothing on the host can reset it: use a device-specific reset module "
                "(e.g. vendor-reset) or power-cycle the host between guests",
            ))
    elif fmethods[0].method == "pm" and len(fmethods) == 1:
        probs.append(Problem(
            "pm-only", Severity.INFO,
            "its only function-level reset is PM (D3hot to D0), which many devices implement as a no-op",
            "if the device keeps state across resets, prefer a bus reset of its bridge",
        ))

    if "bus" in info.reset_methods and topo.kernel_bus_scope(addr) is None:
        # pci_init_reset_methods() probes at enumeration, before the function joins
        # bus->devices: the "bus" entry can be stale (drivers/pci/probe.c, pci_device_add).
        probs.append(Problem(
            "stale-bus-method", Severity.INFO,
            "reset_method lists bus, but the kernel refuses it at reset time: "
            + ("it is a bridge" if topo.is_bridge(addr) else
               f"it shares bus {addr.bus:02x} with {_names(topo.bus_of(addr) - {addr})}"),
            "ignore the bus entry; reset the whole bus through its bridge instead",
        ))

    vfs = topo.vfs_of(addr)
    if vfs:
        hosted = [f"{v} ({topo.node(v).info.driver})" for v in sorted(vfs)
                  if _host_driver(Hit(v, topo.node(v).info.driver, None))]
        probs.append(Problem(
            "pf-resets-vfs", Severity.BLOCKER if hosted else Severity.WARNING,
            f"SR-IOV PF with {len(vfs)} VF(s): any reset of it (FLR included) also resets "
            f"{_names(vfs)}" + (f", including host-driver VFs {', '.join(hosted)}" if hosted else ""),
            "reset the VFs with their own FLR and leave the PF alone while VFs are in use",
        ))

    if parent is not None and topo.conventional_bus(parent):
        probs.append(Problem(
            "conventional-bus", Severity.WARNING,
            f"behind a conventional (PCIe-to-PCI) bridge {parent}: a bus reset hits every device on "
            f"that bus ({_names(topo.below(parent))}), and conventional buses need 1 s after reset",
            "assign every device on that bus to the same VM, or move the card to a PCIe slot",
        ))

    group = info.iommu_group
    if group is not None:
        shared = {a for a in topo.group_members(group) - {addr} if not _is_bridge_class(topo, a)}
        if shared:
            why = _group_reason(topo, addr, shared)
            probs.append(Problem(
                "iommu-group-shared", Severity.WARNING,
                f"IOMMU group {group} shared with {_names(shared)}{why}",
                "assign the whole group to one VM (every member bound to vfio-pci), "
                "or move the card to a slot whose port has ACS",
            ))

    if info.driver and _host_driver(Hit(addr, info.driver, None)) and not _is_bridge_class(topo, addr):
        probs.append(Problem(
            "host-driver", Severity.INFO, f"bound to host driver {info.driver}",
            f"bind it to vfio-pci (driverctl set-override {addr} vfio-pci) before assigning it",
        ))
    return probs


def _group_reason(topo: Topology, addr: PciAddress, shared: set[PciAddress]) -> str:
    ports = topo.non_acs_ports([addr, *shared])
    if ports:
        return f" (no ACS on bridge {_names(ports)})"
    parent = topo.parent(addr)
    if parent is not None and topo.conventional_bus(parent):
        return f" (behind conventional bridge {parent}: requester IDs alias to the bridge)"
    if shared <= topo.same_device(addr):
        return " (functions of one multifunction device without ACS)"
    return ""


def diagnose_function(topo: Topology, addr: PciAddress) -> FunctionReport:
    """The report for one function (raises NoSuchFunction for an unknown one)."""
    node = topo.node(addr)
    opts = _options(topo, addr)
    bridge = _is_bridge_class(topo, addr)
    probs = [] if bridge else _problems(topo, addr, opts)
    return FunctionReport(
        address=addr, vendor=node.info.vendor, device=node.info.device,
        class_code=node.info.class_code, driver=node.info.driver,
        iommu_group=node.info.iommu_group, parent=topo.parent(addr),
        reset_methods=node.info.reset_methods, function_methods=topo.function_methods(addr),
        config_methods=topo.config_methods(addr), is_bridge=bridge,
        options=tuple(opts), problems=tuple(probs),
    )


def diagnose(topo: Topology, addrs: Iterable[PciAddress] | None = None) -> Report:
    """The full report for ``addrs`` (every function when None), in address order."""
    wanted = sorted(topo.functions) if addrs is None else sorted(set(addrs))
    return Report(
        host=topo.host_name, iommu=topo.iommu, reset_method_exposed=_reset_method_exposed(topo),
        notes=host_notes(topo), functions=tuple(diagnose_function(topo, a) for a in wanted),
    )
