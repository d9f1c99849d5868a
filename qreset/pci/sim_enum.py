"""
Enumeration of a simulated host: what the kernel does at boot, done once at load time.

:class:`Enumeration` turns a validated :class:`~qreset.pci.sim_model.TopologySpec`
into :class:`SimFunction` objects the way Linux enumerates and sets up a real
host:

* bus numbers: every slot of a bus is scanned first, then each bridge is
  descended depth-first and given the next bus number
  (``pci_scan_child_bus_extend`` in drivers/pci/probe.c); VFs are added last,
  as when ``sriov_numvfs`` is written at boot, at Routing ID = PF + offset +
  stride * i (``pci_iov_virtfn_bus``/``devfn`` in drivers/pci/iov.c);
* ``reset_method``: ``pci_init_reset_methods`` runs from ``pci_device_add``
  before the function joins ``bus->devices`` and before ``dev->subordinate`` is
  set, so ``bus`` is listed for the first function scanned on a non-root bus
  even when it is a bridge or function 0 of a multifunction device;
* resources: BARs and bridge windows are packed per bus, largest alignment
  first (in the spirit of ``pbus_size_mem``/``__pci_bus_assign_resources`` in
  drivers/pci/setup-bus.c), 64-bit prefetchable BARs above 4 GiB;
* IOMMU groups: ``pci_device_group`` in drivers/iommu/iommu.c, devices probed
  in enumeration order.
"""

from __future__ import annotations

from qreset.errors import ConfigError
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.sim_config import ConfigImage, get, put
from qreset.pci.sim_function import SimFunction, probe_methods, read_ids
from qreset.pci.sim_model import FunctionSpec, TopologySpec
from qreset.pci.sim_resources import assign_resources, resources_of
from qreset.pci.sim_setup import configure

# One function's own code lives in sim_function; importable from here as before.
__all__ = ["Enumeration", "SimFunction", "probe_methods", "read_ids"]


class Enumeration:
    """The functions of one simulated host after boot (see the module docstring)."""

    def __init__(self, top: TopologySpec, source: str) -> None:
        self.topology = top
        self.source = source
        self._fns: dict[PciAddress, SimFunction] = {}
        self._order: list[SimFunction] = []
        self._by_name: dict[str, SimFunction] = {}
        self._enumerate()

    @property
    def functions(self) -> dict[PciAddress, SimFunction]:
        return self._fns

    @property
    def order(self) -> list[SimFunction]:
        return self._order

    @property
    def by_name(self) -> dict[str, SimFunction]:
        return self._by_name

    def _enumerate(self) -> None:
        top = self.topology
        domain = top.host.domain
        kids: dict[str | None, list[FunctionSpec]] = {}
        for spec in top.function:
            kids.setdefault(spec.parent, []).append(spec)
        slot_numbers = {spec.name: i + 1 for i, spec in enumerate(s for s in top.function if s.slot)}
        max_bus = 0

        def scan(bus: int, parent: SimFunction | None) -> None:
            nonlocal max_bus
            specs = sorted(kids.get(None if parent is None else parent.spec.name, []),
                           key=lambda s: ((s.dev or 0), s.fn))
            devs: dict[int, list[FunctionSpec]] = {}
            for s in specs:
                devs.setdefault(s.dev or 0, []).append(s)
            added: list[SimFunction] = []
            for s in specs:
                multi = len(devs[s.dev or 0]) > 1
                f = SimFunction(s, PciAddress(domain, bus, s.dev or 0, s.fn), parent, multi,
                                ConfigImage(0, bytearray(), bytearray(), bytearray()),
                                port_number=len(added),
                                slot_number=slot_numbers[s.name] if s.slot else None)
                f.img = f.rebuild()
                added.append(f)
                self._add(f)
                # reset_method is decided now, before f joins bus->devices (see module docstring).
                f.reset_methods = probe_methods(f, alone=len(added) == 1)
                f.has_reset_attr = bool(f.reset_methods)
            if parent is not None:
                parent.children.extend(added)
            # pci_iov_bus_range(): VFs whose Routing ID lands on later bus numbers reserve them.
            for f in added:
                sr = f.spec.sriov
                if sr is not None and sr.num_vfs:
                    last = (f.addr.bus << 8 | f.addr.devfn) + sr.offset + sr.stride * (sr.num_vfs - 1)
                    max_bus = max(max_bus, last >> 8)
            for f in added:
                if f.is_bridge:
                    max_bus += 1
                    f.asg.primary, f.asg.secondary = bus, max_bus
                    scan(max_bus, f)
                    f.asg.subordinate = max_bus

        scan(0, None)
        # SR-IOV: VFs appear when sriov_numvfs is written (after boot enumeration).
        for pf in list(self._order):
            s = pf.spec.sriov
            if s is not None:
                for i in range(s.num_vfs):
                    self._new_vf(pf, i)
        assign_resources(self._order)
        for f in self._order:
            f.cfg = configure(f.img, f.spec, f.asg, is_vf=f.physfn is not None,
                              num_vfs=len(f.virtfns))
            f.driver = f.spec.driver
            f.driver_override = f.spec.driver_override
            f.ids = read_ids(f)
            f.resources = resources_of(f)
        self._assign_groups()

    def _new_vf(self, pf: SimFunction, i: int) -> SimFunction:
        """VF ``i`` of ``pf`` at Routing ID PF + offset + stride * i (pci_iov_add_virtfn)."""
        s = pf.spec.sriov
        assert s is not None
        rid = (pf.addr.bus << 8 | pf.addr.devfn) + s.offset + s.stride * i
        vspec = FunctionSpec.model_validate({
            "name": f"{pf.spec.name}.vf{i}", "type": "endpoint", "parent": pf.spec.parent,
            "dev": (rid >> 3) & 0x1F, "fn": rid & 7, "vendor": pf.spec.vendor,
            "device": s.vf_device, "class": pf.spec.class_code, "revision": pf.spec.revision,
            "subsystem_vendor": pf.spec.subsystem_vendor,
            "subsystem_device": pf.spec.subsystem_device,
            "bars": s.vf_bars, "pm": False,
            "msix": {"vectors": s.vf_msix, "bar": 3} if s.vf_msix else False,
            "flr": s.vf_flr, "aer": False, "ready_ms": s.vf_ready_ms,
            "driver": s.vf_drivers[i] if i < len(s.vf_drivers) else s.vf_driver,
        })
        vf = SimFunction(vspec, PciAddress(pf.addr.domain, rid >> 8, (rid >> 3) & 0x1F, rid & 7),
                         pf.parent, False, ConfigImage(0, bytearray(), bytearray(), bytearray()),
                         physfn=pf, vf_index=i)
        vf.img = vf.rebuild()
        other = self._fns.get(vf.addr)
        if other is not None and (other.present or other.physfn is not pf):
            raise ConfigError(f"{self.source}:function ({pf.spec.name!r}).sriov",
                              f"VF{i} at {vf.addr} collides with another function")
        pf.virtfns.append(vf)
        if pf.parent is not None:
            pf.parent.children.append(vf)
        self._add(vf)
        vf.reset_methods = probe_methods(vf, alone=False)
        vf.has_reset_attr = bool(vf.reset_methods)
        return vf

    def set_num_vfs(self, pf: SimFunction, n: int) -> list[SimFunction]:
        """``echo N > sriov_numvfs`` after boot (sriov_enable/sriov_disable in drivers/pci/iov.c).

        The kernel refuses to go from one non-zero count to another (EBUSY);
        callers write 0 first. Disabling removes the VFs (their struct
        pci_dev is freed); enabling adds VF 0..N-1 with the PF's VF BARs,
        default drivers and IOMMU groups, and sets NumVFs + VF Enable. Returns
        the VFs added.
        """
        s = pf.spec.sriov
        assert s is not None
        o = pf.img.ext_caps[regs.EXT_CAP_ID_SRIOV]
        if n == 0:
            for vf in pf.virtfns:
                vf.present = False
                vf.driver = None
                vf.driver_override = None
            put(pf.cfg, o + regs.SRIOV_CTRL, 2, get(pf.cfg, o + regs.SRIOV_CTRL, 2)
                   & ~(regs.SRIOV_CTRL_VFE | regs.SRIOV_CTRL_MSE))
            put(pf.cfg, o + regs.SRIOV_NUM_VF, 2, 0)
            return []
        put(pf.cfg, o + regs.SRIOV_NUM_VF, 2, n)
        put(pf.cfg, o + regs.SRIOV_CTRL, 2, get(pf.cfg, o + regs.SRIOV_CTRL, 2)
               | regs.SRIOV_CTRL_VFE | regs.SRIOV_CTRL_MSE)
        added: list[SimFunction] = []
        for i in range(n):
            vf = pf.virtfns[i] if i < len(pf.virtfns) else self._new_vf(pf, i)
            vf.present = True
            for slot in vf.img.bars:
                base = pf.asg.vf_bar_addr.get(slot.index, 0)
                vf.asg.bar_addr[slot.index] = base + slot.size * vf.vf_index if base else 0
            vf.cfg = configure(vf.img, vf.spec, vf.asg, is_vf=True)
            vf.driver = vf.spec.driver
            vf.driver_override = None
            vf.ids = read_ids(vf)
            vf.resources = resources_of(vf)
            if vf.group is None:
                vf.group = self._group_for(vf)
                if vf.group is None:
                    vf.group = 1 + max((g.group for g in self._order if g.group is not None), default=-1)
            added.append(vf)
        return added

    def _add(self, f: SimFunction) -> None:
        f.order = len(self._order)
        self._fns[f.addr] = f
        self._order.append(f)
        self._by_name[f.spec.name] = f

    def _assign_groups(self) -> None:
        """pci_device_group() (drivers/iommu/iommu.c), devices probed in enumeration order."""
        next_group = 0
        for f in self._order:
            if f.spec.iommu_group is not None:
                f.group = f.spec.iommu_group
                next_group = max(next_group, f.group + 1)
                continue
            g = self._group_for(f)
            if g is None:
                g = next_group
                next_group += 1
            f.group = g

    def _acs_flags_enabled(self, f: SimFunction) -> bool:
        o = f.img.ext_caps.get(regs.EXT_CAP_ID_ACS)
        if o is None:
            return False
        cap = get(f.cfg, o + regs.ACS_CAP, 2)
        ctrl = get(f.cfg, o + regs.ACS_CTRL, 2)
        flags = regs.ACS_ISOLATION & (cap | regs.ACS_EC)
        return (ctrl & flags) == flags

    def _acs_enabled(self, f: SimFunction) -> bool:
        """pci_acs_enabled(dev, REQ_ACS_FLAGS) in drivers/pci/pci.c."""
        if not f.spec.is_pcie:
            return False
        t = f.spec.type
        if t == "pcie_pci_bridge":
            return False
        if t in ("root_port", "downstream_port"):
            return self._acs_flags_enabled(f)
        if t in ("endpoint", "upstream_port", "legacy_endpoint", "rc_endpoint") and f.multifunction:
            return self._acs_flags_enabled(f)
        return True

    def _acs_path_enabled(self, start: SimFunction) -> bool:
        p: SimFunction | None = start
        while p is not None:
            if not self._acs_enabled(p):
                return False
            p = p.parent
        return True

    def _group_for(self, f: SimFunction) -> int | None:
        # 1. DMA aliases (pci_for_each_dma_alias): a PCIe-to-PCI or conventional bridge
        #    above f takes over f's requester ID, so f joins that bridge's group.
        pdev = f
        p = f.parent
        while p is not None:
            if p.spec.type not in ("root_port", "upstream_port", "downstream_port"):
                pdev = p
                if p.group is not None:
                    return p.group
            p = p.parent
        # 2. Walk up while the path to the root lacks ACS isolation.
        p = pdev.parent
        while p is not None:
            if self._acs_path_enabled(p):
                break
            if p.group is not None:
                return p.group
            p = p.parent
        # 3. Multifunction siblings without ACS share a group (get_pci_function_alias_group).
        if f.multifunction and not self._acs_enabled(f):
            for sib in self._order:
                if (sib is not f and sib.group is not None and sib.parent is f.parent
                        and sib.addr.bus == f.addr.bus and sib.addr.device == f.addr.device
                        and not self._acs_enabled(sib)):
                    return sib.group
        return None
