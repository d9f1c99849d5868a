"""
Topology: how the host's functions hang off bridges and slots, and what a
reset of any one of them would also hit.

Built once from a :class:`~qreset.pci.host.PciHost` (:meth:`Topology.load`),
then pure: every question below answers from memory, following the kernel's
rules in ``drivers/pci/pci.c`` (``pci_reset_function``,
``pci_probe_reset_slot``/``pci_slot_resettable``, ``pci_probe_reset_bus``/
``pci_bus_resettable``, ``pci_parent_bus_reset``, ``pci_dev_reset_slot_function``)
and, for what a VFIO hot reset hits, ``vfio_pci_for_each_slot_or_bus`` in
``drivers/vfio/pci/vfio_pci_core.c``.

Conservative by design: where the tree is ambiguous (a bridge whose bus
numbers disagree with the parent links sysfs reports), the affected sets are
the union of both views, because over-estimating a reset domain only makes the
planner refuse, while under-estimating it resets a device nobody planned for.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qreset import topology_facts
from qreset.errors import NoSuchFunction
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.cfgspace import u16, u32
from qreset.pci.host import PciHost, SlotInfo
from qreset.topology_read import FunctionNode, load_nodes, refresh_nodes

__all__ = ["FUNCTION_METHODS", "FunctionNode", "ResetKind", "ResetScope", "Topology"]

logger = logging.getLogger(__name__)


class ResetKind(enum.StrEnum):
    """How wide a reset is."""

    FUNCTION = "function"  # FLR, AF FLR, PM, device-specific, ACPI: one function
    SLOT = "slot"          # hotplug slot reset: every function in the slot and below
    BUS = "bus"            # secondary bus reset of a bridge: everything below it


#: Kernel reset_method names that reset only the function itself.
FUNCTION_METHODS: tuple[str, ...] = ("device_specific", "acpi", "flr", "af_flr", "pm")


@dataclass(frozen=True, slots=True)
class ResetScope:
    """One way to reset, and every function it hits.

    ``target`` is the function itself for a FUNCTION reset and the bridge
    whose secondary bus is reset for SLOT/BUS. ``affected`` includes every
    function hit (for BUS: all functions on the bridge's secondary bus and on
    every subordinate bus; never the bridge itself).
    """

    kind: ResetKind
    target: PciAddress
    affected: frozenset[PciAddress]
    slot: str | None = None


    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value, "target": str(self.target),
            "affected": [str(a) for a in sorted(self.affected)], "slot": self.slot,
        }



class Topology:
    """The host's PCI tree. Construct with :meth:`load` (I/O) or directly (tests)."""

    def __init__(
        self,
        functions: Mapping[PciAddress, FunctionNode],
        slots: list[SlotInfo],
        iommu: bool,
        host_name: str = "host",
        kernel: str | None = None,
    ) -> None:
        self.functions = dict(sorted(functions.items()))
        self.slots = list(slots)
        self.iommu = iommu
        self.host_name = host_name
        #: The host kernel's release when known (``PciHost.kernel_release``).
        self.kernel = kernel
        # Parent links: sysfs's canonical path first; when it says "root bus"
        # but a bridge in the tree claims this bus as its secondary, trust the
        # bridge (a hand-built or partial tree may omit parent).
        self._parent: dict[PciAddress, PciAddress | None] = {}
        for addr, node in self.functions.items():
            parent = node.info.parent
            if parent is None:
                parent = self._bridge_with_secondary(addr.domain, addr.bus)
            self._parent[addr] = parent
        # Indexes: the tree is immutable once built (functions may be replaced
        # with new nodes for the same addresses, never added or removed).
        self._by_bus: dict[tuple[int, int], list[PciAddress]] = {}
        self._vfs: dict[PciAddress, set[PciAddress]] = {}
        for addr, n in self.functions.items():
            self._by_bus.setdefault((addr.domain, addr.bus), []).append(addr)
            if n.info.physfn is not None:
                self._vfs.setdefault(n.info.physfn, set()).add(addr)
        self._children: dict[PciAddress, list[PciAddress]] = {}
        for addr, parent in self._parent.items():
            if parent is not None:
                self._children.setdefault(parent, []).append(addr)

    # -- construction ------------------------------------------------------

    @classmethod
    async def load(cls, host: PciHost) -> Topology:
        """Read every function's attributes and config space from ``host``.

        All functions are read concurrently (one named task each). A function
        that disappears between the listing and the read (hot removal) is
        left out with a warning; an unreadable config space decodes as absent
        (``parse_config(b"")``) so the rest of the tree still loads.
        """
        nodes, slots, iommu = await load_nodes(host)
        return cls(nodes, slots, iommu, host.name, host.kernel_release())

    async def refresh(self, host: PciHost, addrs: Iterable[PciAddress]) -> Topology:
        """This topology with what changes at run time made current for ``addrs``.

        Driver binding (libvirt binds managed devices to vfio-pci at domain
        start and back at stop), ``reset_method`` and VFs are re-read for each
        of ``addrs`` (:meth:`PciHost.runtime`: a few sysfs reads each); one
        listing of the host's functions finds hot-added and removed ones (and
        VFs from an ``sriov_numvfs`` write): only those are read in full, and
        a PF whose VFs came or went is re-read too. Returns ``self`` when
        nothing changed, else a new :class:`Topology` (this one is immutable).
        """
        nodes = await refresh_nodes(host, self.functions, addrs)
        return self if nodes is None else Topology(nodes, self.slots, self.iommu, self.host_name,
                                                    self.kernel)

    def neighbourhood(self, addrs: Iterable[PciAddress]) -> frozenset[PciAddress]:
        """Every function a reset of any of ``addrs`` could hit (function, slot or bus
        scope), and ``addrs`` themselves: what a plan for ``addrs`` looks at."""
        out: set[PciAddress] = set()
        for a in addrs:
            out.add(a)
            if a not in self.functions:
                continue
            out |= self.function_scope(a).affected
            for scope in (self.slot_scope(a), self.bus_scope(a)):
                if scope is not None:
                    out |= scope.affected
        return frozenset(out)

    # -- basic lookups -----------------------------------------------------

    def node(self, addr: PciAddress) -> FunctionNode:
        """The node for ``addr``; raises NoSuchFunction naming it."""
        try:
            return self.functions[addr]
        except KeyError:
            raise NoSuchFunction(str(addr), f"no such PCI function on {self.host_name}") from None

    def __contains__(self, addr: object) -> bool:
        return addr in self.functions

    def parent(self, addr: PciAddress) -> PciAddress | None:
        """The bridge above ``addr`` (None on a root bus)."""
        self.node(addr)
        return self._parent[addr]

    def children(self, bridge: PciAddress) -> tuple[PciAddress, ...]:
        """Functions directly on ``bridge``'s secondary bus, sorted."""
        return tuple(sorted(self._children.get(bridge, ())))

    def roots(self) -> tuple[PciAddress, ...]:
        """Functions on a root bus (no bridge above them), sorted."""
        return tuple(a for a, p in self._parent.items() if p is None)

    def ancestors(self, addr: PciAddress) -> tuple[PciAddress, ...]:
        """Bridges from ``addr``'s parent up to the root bus (nearest first)."""
        out: list[PciAddress] = []
        cur = self.parent(addr)
        while cur is not None and cur not in out:
            out.append(cur)
            cur = self._parent.get(cur)
        return tuple(out)

    def is_bridge(self, addr: PciAddress) -> bool:
        """Whether ``addr`` is a PCI-to-PCI bridge (type 1 header or has functions below it)."""
        return self.node(addr).config.is_bridge or addr in self._children

    def bus_of(self, addr: PciAddress) -> frozenset[PciAddress]:
        """Every function on the same bus as ``addr`` (including it)."""
        self.node(addr)
        return frozenset(self._by_bus.get((addr.domain, addr.bus), ()))

    def same_device(self, addr: PciAddress) -> frozenset[PciAddress]:
        """Every function of ``addr``'s device (same bus and device number), including it."""
        self.node(addr)
        return frozenset(a for a in self._by_bus.get((addr.domain, addr.bus), ()) if a.device == addr.device)

    def below(self, bridge: PciAddress) -> frozenset[PciAddress]:
        """Every function below ``bridge``: its secondary bus and all subordinate buses.

        The union of the bridge's bus-number window ``[secondary, subordinate]``
        (what a secondary bus reset electrically reaches) and every function
        reachable through the parent links; never the bridge itself.
        """
        self.node(bridge)
        stack = list(self._children.get(bridge, ()))
        window = self._bus_window(bridge)
        if window is not None:
            lo, hi = window
            for bus in range(lo, hi + 1):
                stack.extend(self._by_bus.get((bridge.domain, bus), ()))
        found: set[PciAddress] = set()
        while stack:
            cur = stack.pop()
            if cur in found or cur == bridge:
                continue
            found.add(cur)
            stack.extend(self._children.get(cur, ()))
        found.discard(bridge)
        return frozenset(found)

    def _bus_window(self, bridge: PciAddress) -> tuple[int, int] | None:
        cfg = self.functions[bridge].config
        sec, sub = cfg.secondary_bus, cfg.subordinate_bus
        # An unconfigured bridge reads secondary 0; all-ones means it is gone.
        if not cfg.present or sec is None or sub is None or sec in (0, 0xFF) or sub < sec:
            return None
        return sec, sub

    def _bridge_with_secondary(self, domain: int, bus: int) -> PciAddress | None:
        for addr, node in self.functions.items():
            cfg = node.config
            if (addr.domain == domain and cfg.is_bridge and cfg.present
                    and cfg.secondary_bus == bus and bus != 0):
                return addr
        return None

    # -- reset methods and scopes -----------------------------------------

    def function_methods(self, addr: PciAddress) -> tuple[str, ...]:
        """The function-level reset methods of ``addr`` (reset_method ∩ FUNCTION_METHODS), in order."""
        return tuple(m for m in self.node(addr).info.reset_methods if m in FUNCTION_METHODS)

    def vfs_of(self, addr: PciAddress) -> frozenset[PciAddress]:
        """The SR-IOV VFs of ``addr`` present in the tree (empty unless it is a PF)."""
        info = self.node(addr).info
        vfs = {v for v in info.virtfns if v in self.functions}
        vfs.update(self._vfs.get(addr, ()))
        return frozenset(vfs)

    def function_scope(self, addr: PciAddress) -> ResetScope:
        """What a function-level reset of ``addr`` hits: itself, and its VFs if it is a PF.

        A PF's FLR resets its SR-IOV capability, clearing VF Enable, so every
        VF goes through reset too (SR-IOV spec r1.1 sec 2.2.2); the kernel
        saves and restores only the PF (``pci_reset_function`` ->
        ``pci_restore_iov_state`` re-enables VFs but not their state).
        """
        return ResetScope(ResetKind.FUNCTION, addr, frozenset({addr}) | self.vfs_of(addr))

    def config_methods(self, addr: PciAddress) -> tuple[str, ...]:
        """Function-level methods config space advertises, probed like the kernel."""
        return topology_facts.config_methods(self, addr)

    def slot_of(self, addr: PciAddress) -> SlotInfo | None:
        """The ``/sys/bus/pci/slots`` entry whose address is ``addr``'s bus and device."""
        self.node(addr)
        for slot in self.slots:
            if slot.address.lower() == addr.slot:
                return slot
        return None

    def slot_scope(self, addr: PciAddress) -> ResetScope | None:
        """The slot reset that would hit ``addr``, if its slot can be reset.

        ``pci_probe_reset_slot`` succeeds only through a hotplug controller's
        ``reset_slot`` op, and only pciehp has one (``pciehp_reset_slot``):
        shpchp (SHPC bridges such as QEMU's pci-bridge/pcie-pci-bridge) and
        acpiphp slots have a ``power`` file but no ``reset_slot``. So the slot
        must be a hotplug slot whose bridge is a PCIe Root or Downstream Port
        with Slot Implemented and Hot-Plug Capable (``set_pcie_hotplug_bridge``
        in drivers/pci/probe.c, which is what pciehp binds to). Seen in the lab:
        an SHPC slot behind a pcie-pci-bridge gets a bus reset, not a slot reset.
        The kernel saves and restores the functions in the slot and everything
        below them (``pci_slot_resettable``/``pci_slot_save_and_disable_locked``),
        but ``pciehp_reset_slot`` asserts a secondary bus reset on the port
        (``pci_bridge_secondary_bus_reset``): the whole link goes down, so every
        function on the port's secondary bus is hit, also one the slot's device
        number does not name (an ARI device's functions 8 and up sit at device
        numbers 1-31). Over-estimating only makes the planner refuse.
        """
        slot = self.slot_of(addr)
        parent = self._parent[addr]
        if slot is None or not slot.hotplug or parent is None or not self.pciehp_port(parent):
            return None
        affected: set[PciAddress] = set(self.below(parent))
        for fn in self.same_device(addr):
            affected.add(fn)
            if self.is_bridge(fn):
                affected |= self.below(fn)
        return ResetScope(ResetKind.SLOT, parent, frozenset(affected), slot.name)

    def pciehp_port(self, bridge: PciAddress) -> bool:
        """Whether pciehp drives ``bridge``'s slot: a Root/Downstream Port whose
        PCIe Capabilities say Slot Implemented and whose Slot Capabilities say
        Hot-Plug Capable (PCI_EXP_FLAGS_SLOT, PCI_EXP_SLTCAP_HPC in pci_regs.h)."""
        cfg = self.node(bridge).config
        cap = cfg.find_cap(regs.CAP_ID_EXP)
        if cap is None or cfg.pcie_type not in topology_facts.ACS_PORT_TYPES:
            return False
        if not u16(cfg.raw, cap.offset + regs.EXP_FLAGS) & regs.EXP_FLAGS_SLOT:
            return False
        return bool(u32(cfg.raw, cap.offset + regs.EXP_SLTCAP) & regs.EXP_SLTCAP_HPC)

    def bus_scope(self, addr: PciAddress) -> ResetScope | None:
        """The secondary bus reset of ``addr``'s parent bridge (None on a root bus).

        ``pci_bus_reset`` needs ``bus->self``: a root bus has no bridge to
        assert Secondary Bus Reset on.
        """
        parent = self.parent(addr)
        if parent is None:
            return None
        return ResetScope(ResetKind.BUS, parent, self.below(parent))

    def hot_reset_scope(self, addr: PciAddress) -> ResetScope | None:
        """What VFIO_DEVICE_PCI_HOT_RESET on ``addr`` would hit: slot if possible, else bus.

        ``vfio_pci_dev_set_hot_reset``/``vfio_pci_for_each_slot_or_bus``: the
        slot variant when ``pci_probe_reset_slot(pdev->slot)`` succeeds, else
        the whole bus walk from ``pdev->bus`` (every subordinate bus).
        """
        return self.slot_scope(addr) or self.bus_scope(addr)

    def kernel_bus_scope(self, addr: PciAddress) -> ResetScope | None:
        """What the kernel's own ``bus`` reset_method would hit, or None if it cannot.

        ``pci_reset_bus_function``: first ``pci_dev_reset_slot_function`` (not
        multifunction, not a bridge, in a hotplug slot), else
        ``pci_parent_bus_reset`` (not on a root bus, not a bridge, and the
        only function on its bus).
        """
        node = self.node(addr)
        if self.is_bridge(addr):
            return None
        slot = self.slot_scope(addr)
        if slot is not None and not node.config.multifunction:
            return slot
        parent = self._parent[addr]
        if parent is None or self.bus_of(addr) != {addr}:
            return None
        return ResetScope(ResetKind.BUS, parent, self.below(parent))

    # -- IOMMU groups and ACS ---------------------------------------------

    def group_members(self, group: int) -> frozenset[PciAddress]:
        """Every function in IOMMU group ``group``."""
        return frozenset(a for a, n in self.functions.items() if n.info.iommu_group == group)

    def groups(self) -> dict[int, frozenset[PciAddress]]:
        """Every IOMMU group and its members, sorted by group number."""
        ids = sorted({n.info.iommu_group for n in self.functions.values() if n.info.iommu_group is not None})
        return {g: self.group_members(g) for g in ids}

    def is_pcie(self, addr: PciAddress) -> bool:
        return self.node(addr).config.find_cap(regs.CAP_ID_EXP) is not None

    def config_complete(self, addr: PciAddress) -> bool:
        """Whether enough config space was read to see the capability list."""
        return topology_facts.config_complete(self, addr)

    def conventional_bus(self, bridge: PciAddress) -> bool:
        """Whether ``bridge``'s secondary bus is conventional PCI (or PCI-X)."""
        return topology_facts.conventional_bus(self, bridge)

    def acs_isolated(self, port: PciAddress) -> bool | None:
        """ACS isolation of a root or downstream port; None for other functions."""
        return topology_facts.acs_isolated(self, port)

    def non_acs_ports(self, addrs: Iterable[PciAddress]) -> tuple[PciAddress, ...]:
        """Root/downstream ports above any of ``addrs`` without ACS isolation, sorted."""
        found: set[PciAddress] = set()
        for a in addrs:
            for anc in self.ancestors(a):
                if self.acs_isolated(anc) is False:
                    found.add(anc)
        return tuple(sorted(found))

    # -- description ---------------------------------------------------------

    def describe(self, addr: PciAddress) -> dict[str, Any]:
        """One function as JSON-ready data (``qreset topology --json``)."""
        return topology_facts.describe(self, addr)
