"""
A simulated PCI host: the :class:`~qreset.pci.host.PciHost` the demo and the tests run against.

``SimHost.from_toml("configs/sim/switch.toml", time_scale=0.01)`` builds a host
from a topology file (schema: :mod:`qreset.pci.sim_model`, bytes:
:mod:`qreset.pci.sim_config`, boot-time enumeration: :mod:`qreset.pci.sim_enum`,
sysfs tree: :mod:`qreset.pci.sim_tree`) and then behaves like the kernel's
sysfs would:

* Enumeration is the kernel's (``pci_scan_child_bus_extend``): every slot of
  a bus first, then depth-first into each bridge, bus numbers handed out in
  that order; VFs are added last (as when ``sriov_numvfs`` is written at boot).
  Functions come up "configured" (BARs assigned, Memory + Bus Master on, bus
  numbers and windows on bridges, ACS enabled...), as firmware and the kernel
  leave them.
* ``reset_method`` is computed the way ``pci_init_reset_methods`` does it *at
  enumeration time* (drivers/pci/probe.c calls it from pci_init_capabilities,
  before the device joins ``bus->devices`` and before ``dev->subordinate`` is
  set). So ``bus`` is listed for the first function scanned on a non-root bus,
  even a bridge or function 0 of a multifunction device, which is what the
  6.1 lab reported (``[flr bus]`` on switch ports). Doing the reset re-checks
  at run time (``pci_parent_bus_reset``: no ``dev->subordinate``, alone on
  the bus; or ``pci_dev_reset_slot_function``: a hotplug slot, not
  multifunction) and fails with ENOTTY where the real kernel would.
* The kernel reset path (``reset_function``/``reset_subordinate``) saves,
  resets, waits with the kernel's delays and restores config space through
  the write masks: read-only fields that changed (a new identity, new BAR
  sizes) stay changed, everything else reads back identical.
* A userspace secondary bus reset (Bridge Control bit 6 set, then cleared,
  via :meth:`SimHost.write_config`) restores nothing: every function below
  comes back at power-on defaults after its ready time, answering Vendor ID
  0x0001 (CRS) until then; bridges below lose their bus numbers, so what sits
  behind them reads all-ones until software restores the bridges top-down.
* IOMMU groups follow ``pci_device_group`` in drivers/iommu/iommu.c.
* :meth:`SimHost.info` reports what the kernel cached at enumeration (like
  sysfs ``vendor``/``device``): a changed identity shows in config space, and
  for BAR sizes in ``resource``, until ``remove`` + ``rescan``.
* Writes to the Initiate FLR bit (PCIe DevCtl), the AF FLR bit and a PM
  D3hot -> D0 transition without No_Soft_Reset reset the function too, like
  hardware does; a PF's reset also resets its VFs (VF Enable clears).

Every delay is a real ``asyncio.sleep`` of ``spec seconds * time_scale``; there
is no global lock, so resets of independent functions overlap in time (see
:attr:`SimHost.reset_log`). Faults (:class:`Fault`) make the next reset of a
function misbehave.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qreset.errors import HostError, NoSuchFunction
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.host import FunctionInfo, RuntimeState, SlotInfo
from qreset.pci.sim_config import get
from qreset.pci.sim_enum import SimFunction, probe_methods, read_ids
from qreset.pci.sim_fault import ConfigWrite, Fault, ResetRecord
from qreset.pci.sim_model import load_topology, read_topology
from qreset.pci.sim_resources import resources_of
from qreset.pci.sim_vfio import SimHotReset

__all__ = ["ConfigWrite", "Fault", "ResetRecord", "SimHost"]


class SimHost(SimHotReset):
    """A simulated PCI host built from a TOML topology (see the module docstring).

    The layers, one module each: config space and faults (:mod:`~qreset.pci.sim_access`),
    the kernel's resets (:mod:`~qreset.pci.sim_reset`), the VFIO hot reset
    (:mod:`~qreset.pci.sim_vfio`); this class adds enumeration-level operations
    (remove, rescan, bind, VFs), the sysfs-shaped views and the test hooks.
    """

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], time_scale: float = 1.0) -> SimHost:
        """Load ``path``; raises ConfigError naming the file and key."""
        p = Path(path)
        return cls(read_topology(p), str(p), time_scale)

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str, time_scale: float = 1.0) -> SimHost:
        return cls(load_topology(data, name), name, time_scale)

    async def functions(self) -> list[PciAddress]:
        return sorted(a for a, f in self._fns.items() if f.present)

    async def info(self, addr: PciAddress) -> FunctionInfo:
        f = self._get(addr)
        vendor, device, klass, rev, svid, sdid = f.ids
        return FunctionInfo(
            address=f.addr, vendor=vendor, device=device, class_code=klass, revision=rev,
            subsystem_vendor=svid, subsystem_device=sdid, driver=f.driver,
            driver_override=f.driver_override,
            iommu_group=f.group if self.iommu else None,
            reset_methods=f.reset_methods, has_reset=f.has_reset_attr,
            has_reset_subordinate=self.has_reset_subordinate(f),
            resources=tuple(f.resources),
            physfn=f.physfn.addr if f.physfn is not None else None,
            virtfns=tuple(v.addr for v in f.virtfns if v.present),
            parent=f.parent.addr if f.parent is not None else None,
        )

    async def runtime(self, addr: PciAddress) -> RuntimeState:
        f = self._get(addr)
        return RuntimeState(f.driver, f.driver_override, f.reset_methods, f.has_reset_attr,
                            tuple(v.addr for v in f.virtfns if v.present))

    async def remove(self, addr: PciAddress) -> None:
        f = self._get(addr)
        for g in [f, *f.virtfns, *self._below(f)] if f.is_bridge else [f, *f.virtfns]:
            g.present = False
            g.driver = None
            g.driver_override = None  # the struct pci_dev (and its override) is freed

    async def rescan(self, bridge: PciAddress | None = None) -> None:
        top = None if bridge is None else self._get(bridge)

        def under(g: SimFunction) -> bool:
            p = g.parent
            while p is not None and p is not top:
                p = p.parent
            return p is top

        for g in self._order:
            if top is not None and not under(g):
                continue
            if g.present or (g.parent is not None and not g.parent.present):
                continue
            if g.physfn is not None and not g.physfn.present:
                continue
            if not self._reachable(g) or not self._ready(g):
                continue
            g.present = True
            if g.is_bridge and g.cfg[regs.SECONDARY_BUS] == 0:
                # pci_scan_bridge_extend(): a bridge without bus numbers gets them assigned.
                g.cfg[regs.PRIMARY_BUS] = g.asg.primary
                g.cfg[regs.SECONDARY_BUS] = g.asg.secondary
                g.cfg[regs.SUBORDINATE_BUS] = g.asg.subordinate
            # A new struct pci_dev: IDs re-read, unassigned BARs get their addresses back.
            for slot in g.img.bars:
                off = regs.BASE_ADDRESS_0 + 4 * slot.index
                if g.physfn is None and get(g.cfg, off, 4) & ~0xF == 0:
                    addr = g.asg.bar_addr.get(slot.index, 0)
                    g.cfg[off:off + 4] = ((addr & 0xFFFFFFFF) | slot.low_bits).to_bytes(4, "little")
                    if slot.type == "mem64":
                        g.cfg[off + 4:off + 8] = (addr >> 32).to_bytes(4, "little")
            g.ids = read_ids(g)
            g.resources = resources_of(g)
            g.driver = g.driver_override or g.spec.driver
            # A new struct pci_dev: pci_device_add() probes the reset methods
            # before it joins the bus, next to what is present now.
            alone = g.parent is None or all(h is g or not h.present for h in g.parent.children)
            g.reset_methods = probe_methods(g, alone)
            g.has_reset_attr = bool(g.reset_methods)

    async def bind(self, addr: PciAddress, driver: str | None) -> None:
        f = self._get(addr)
        f.driver_override = driver
        native = f.spec.native_driver or (f.spec.driver if f.spec.driver != "vfio-pci" else None)
        f.driver = driver if driver is not None else native

    async def slots(self) -> list[SlotInfo]:
        out = []
        for f in self._order:
            if f.spec.slot is not None and f.present:
                addr = f"{f.addr.domain:04x}:{f.asg.secondary:02x}:00"
                out.append(SlotInfo(f.spec.slot.name, addr, f.spec.slot.hotplug))
        return out

    async def has_iommu_groups(self) -> bool:
        return self.iommu

    def inject(self, addr: PciAddress, fault: Fault) -> None:
        """Make the next reset that hits ``addr`` misbehave (see :class:`Fault`)."""
        self._get(addr).faults.append(fault)

    def clear_faults(self) -> None:
        for f in self._order:
            f.faults.clear()

    def set_driver(self, addr: PciAddress, name: str | None) -> None:
        self._get(addr).driver = name

    def set_num_vfs(self, pf: PciAddress, n: int) -> list[PciAddress]:
        """``echo N > sriov_numvfs`` at run time; returns the VFs that appeared.

        sriov_numvfs_store (drivers/pci/iov.c): N above TotalVFs is EINVAL, a
        change from one non-zero count to another is EBUSY (write 0 first).
        """
        f = self._get(pf)
        path = self._path(pf, "sriov_numvfs")
        if f.spec.sriov is None:
            raise HostError(path, "No such file or directory (not an SR-IOV PF)")
        if not 0 <= n <= f.spec.sriov.total_vfs:
            raise HostError(path, f"Invalid argument: {n} VFs (TotalVFs {f.spec.sriov.total_vfs})")
        now = sum(1 for v in f.virtfns if v.present)
        if n == now:
            return []
        if n and now:
            raise HostError(path, f"Device or resource busy: {now} VFs already enabled")
        return [v.addr for v in self._enum.set_num_vfs(f, n)]

    def write_count(self, addr: PciAddress | None = None) -> int:
        return sum(1 for w in self.config_writes if addr is None or w.addr == addr)

    def address_of(self, name: str) -> PciAddress:
        """The address the topology's function ``name`` was enumerated at."""
        try:
            return self._by_name[name].addr
        except KeyError:
            raise NoSuchFunction(f"{self.name}:{name}", "no function has that name") from None

    def names(self) -> dict[str, PciAddress]:
        return {n: f.addr for n, f in self._by_name.items()}

    def config_now(self, addr: PciAddress) -> bytes:
        """What a config read would return right now (no waiting): for write_tree and tests."""
        return self._view(self._get(addr))

    def write_tree(self, root: Path) -> None:
        """Write a sysfs-shaped snapshot under ``root`` (see qreset.pci.sim_tree)."""
        from qreset.pci.sim_tree import write_tree

        write_tree(self, Path(root))
