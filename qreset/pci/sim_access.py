"""
The simulated host's config space: what a config read returns, what a write does.

:class:`SimConfigSpace` holds the enumerated functions (:mod:`qreset.pci.sim_enum`)
and answers config accesses the way hardware behind the kernel does: a function
behind a bridge without bus numbers, in reset, or whose PF has VF Enable clear
reads all-ones; one not ready yet answers CRS (Vendor ID 0x0001, PCIe r6.0 sec
2.3.2); writes go through the write masks and have hardware's side effects
(Secondary Bus Reset, Initiate FLR, AF FLR, D3hot -> D0, Resizable BAR). A
function that goes through reset comes back at power-on defaults after its
ready time, taking any :class:`~qreset.pci.sim_fault.Fault` injected for it.
Resets the kernel does are in :mod:`qreset.pci.sim_reset`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from qreset.errors import HostError, NoSuchFunction, ResetFailed
from qreset.pci import regs, sim_fault
from qreset.pci.address import PciAddress
from qreset.pci.host import PciHost
from qreset.pci.sim_config import get
from qreset.pci.sim_enum import Enumeration, SimFunction
from qreset.pci.sim_fault import ConfigWrite, Fault, RecentLog, ResetRecord
from qreset.pci.sim_model import TopologySpec
from qreset.pci.sim_resources import resources_of

log = logging.getLogger("qreset.pci.sim")


class SimConfigSpace(PciHost):
    """Config-space model of a simulated host (the base of :class:`~qreset.pci.sim.SimHost`)."""

    def __init__(self, top: TopologySpec, name: str, time_scale: float = 1.0) -> None:
        self.name = f"sim:{name}"
        self.source = name
        self.time_scale = time_scale
        self.topology = top
        self.iommu = top.host.iommu
        self.config_writes: RecentLog[ConfigWrite] = RecentLog(sim_fault.CONFIG_WRITES_MAX)
        #: IOMMU groups another process (QEMU) has open: opening them gives EBUSY.
        self.vfio_held: set[int] = set()  # see qreset.pci.sim_vfio
        self.reset_log: RecentLog[ResetRecord] = RecentLog(sim_fault.RESET_LOG_MAX)
        boot = Enumeration(top, name)
        self._enum = boot
        self._fns = boot.functions
        self._order = boot.order
        self._by_name = boot.by_name

    def kernel_release(self) -> str | None:
        return self.topology.host.kernel

    def has_reset_subordinate(self, f: SimFunction) -> bool:
        """A bridge's ``reset_subordinate``: upstream since Linux 6.13 (commit 2fa046449a82,
        "PCI: Add 'reset_subordinate' to reset hierarchy below bridge", on every bridge:
        pci_bridge_attrs in drivers/pci/pci-sysfs.c), backported to some stable kernels,
        so a function's ``reset_subordinate`` in the topology overrides the kernel's."""
        if not f.is_bridge:
            return False
        if f.spec.reset_subordinate is not None:
            return f.spec.reset_subordinate
        return self.topology.host.kernel_at_least(6, 13)

    def _path(self, addr: PciAddress, attr: str = "") -> str:
        p = f"{self.name}/bus/pci/devices/{addr}"
        return f"{p}/{attr}" if attr else p

    def _get(self, addr: PciAddress) -> SimFunction:
        f = self._fns.get(addr)
        if f is None or not f.present:
            raise NoSuchFunction(self._path(addr), "no such PCI function")
        return f

    def _now(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return 0.0

    def _below(self, bridge: SimFunction, physical: bool = False) -> list[SimFunction]:
        """Every function on bridge's secondary bus and below, in enumeration order:
        the ones the kernel knows (present), or with ``physical`` also removed ones."""
        out: list[SimFunction] = []
        stack = list(bridge.children)
        while stack:
            f = stack.pop()
            if f.present or physical:
                out.append(f)
            stack.extend(f.children)
        return sorted(out, key=lambda f: f.order)

    def _reachable(self, f: SimFunction) -> bool:
        """Whether a config request gets to f: every bridge above forwards its bus, none in reset."""
        if f.physfn is not None:
            o = f.physfn.img.ext_caps[regs.EXT_CAP_ID_SRIOV]
            pf = f.physfn
            if not self._reachable(pf) or not self._ready(pf):
                return False
            ctrl = get(pf.cfg, o + regs.SRIOV_CTRL, 2)
            if not ctrl & regs.SRIOV_CTRL_VFE or get(pf.cfg, o + regs.SRIOV_NUM_VF, 2) <= f.vf_index:
                return False
        bus = f.addr.bus
        p = f.parent
        while p is not None:
            if get(p.cfg, regs.BRIDGE_CONTROL, 2) & regs.BRIDGE_CTL_BUS_RESET:
                return False
            if not p.cfg[regs.SECONDARY_BUS] <= bus <= p.cfg[regs.SUBORDINATE_BUS]:
                return False
            if not self._ready(p):
                return False
            bus = p.addr.bus
            p = p.parent
        return True

    def _ready(self, f: SimFunction) -> bool:
        return not f.never_ready and self._now() >= f.ready_at

    def _view(self, f: SimFunction) -> bytes:
        size = f.img.size
        if not self._reachable(f):
            return b"\xff" * size
        if not self._ready(f):
            # CRS Software Visibility: Vendor ID reads 0x0001 (PCIe r6.0 sec 2.3.2).
            return regs.CRS_VENDOR_ID.to_bytes(2, "little") + b"\xff" * (size - 2)
        return bytes(f.cfg)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds * self.time_scale)

    async def read_config(self, addr: PciAddress, size: int = 4096) -> bytes:
        f = self._get(addr)
        if f.cfg_blocked:
            # pci_user_read_config_*() wait while the kernel holds cfg access (pci_wait_cfg).
            await f.cfg_free.wait()
        return self._view(f)[:max(0, size)]

    async def write_config(self, addr: PciAddress, offset: int, data: bytes) -> None:
        f = self._get(addr)
        data = bytes(data)
        if len(data) not in (1, 2, 4) or offset % len(data) or offset < 0 or offset + len(data) > f.img.size:
            raise HostError(self._path(addr, "config"),
                            f"Invalid argument: {len(data)}-byte write at {offset:#x}")
        if f.cfg_blocked:
            await f.cfg_free.wait()
        self.config_writes.append(ConfigWrite(addr, offset, data, self._now()))
        if not self._reachable(f) or not self._ready(f):
            return  # master abort / CRS: the write goes nowhere
        old = bytes(f.cfg)
        self._store(f, offset, data)
        self._after_write(f, offset, data, old)

    def _store(self, f: SimFunction, offset: int, data: bytes) -> None:
        for i, b in enumerate(data):
            o = offset + i
            wm, w1 = f.img.wmask[o], f.img.w1cmask[o]
            f.cfg[o] = ((f.cfg[o] & ~wm) | (b & wm)) & ~(b & w1) & 0xFF

    def _after_write(self, f: SimFunction, offset: int, data: bytes, old: bytes) -> None:
        """Side effects of writes: SBR, userspace FLR/AF FLR, PM D3hot->D0, VF enable."""
        end = offset + len(data)
        now = self._now()

        def touched(reg: int, width: int = 2) -> bool:
            return offset < reg + width and reg < end

        if f.is_bridge and touched(regs.BRIDGE_CONTROL):
            was = get(old, regs.BRIDGE_CONTROL, 2) & regs.BRIDGE_CTL_BUS_RESET
            now_set = get(f.cfg, regs.BRIDGE_CONTROL, 2) & regs.BRIDGE_CTL_BUS_RESET
            if now_set and not was:
                f.sbr_since = now
                log.debug("%s: secondary bus reset asserted", f.addr)
            elif was and not now_set:
                start = f.sbr_since if f.sbr_since is not None else now
                f.sbr_since = None
                hit = self._below(f, physical=True)
                for g in hit:
                    self._power_on(g, now)
                self.reset_log.append(ResetRecord("sbr", f.addr, frozenset(g.addr for g in hit), start, now))
                log.debug("%s: secondary bus reset released, %d function(s) at power-on defaults",
                          f.addr, len(hit))
        exp = f.cap(regs.CAP_ID_EXP)
        if exp is not None and touched(exp + regs.EXP_DEVCTL):
            value = int.from_bytes(bytes(data), "little") << (8 * (offset - (exp + regs.EXP_DEVCTL)))
            devcap = get(f.cfg, exp + regs.EXP_DEVCAP, 4)
            if offset <= exp + regs.EXP_DEVCTL + 1 < end and value & regs.EXP_DEVCTL_BCR_FLR \
                    and devcap & regs.EXP_DEVCAP_FLR:
                self._user_reset(f, "flr-user", now)
        af = f.cap(regs.CAP_ID_AF)
        if (af is not None and offset <= af + regs.AF_CTRL < end
                and data[af + regs.AF_CTRL - offset] & regs.AF_CTRL_FLR
                and f.cfg[af + regs.AF_CAP] & regs.AF_CAP_FLR):
            self._user_reset(f, "af_flr-user", now)
        rebar = f.img.ext_caps.get(regs.EXT_CAP_ID_REBAR)
        if rebar is not None and touched(rebar + regs.REBAR_CTRL, 4):
            field = (get(f.cfg, rebar + regs.REBAR_CTRL, 4) >> 8) & 0x3F
            if not get(f.cfg, rebar + regs.REBAR_CAP, 4) & (1 << (field + 4)):
                f.cfg[rebar + regs.REBAR_CTRL + 1] = old[rebar + regs.REBAR_CTRL + 1]  # unsupported size
            else:
                self._apply_rebar(f, clear=True)
        pm = f.cap(regs.CAP_ID_PM)
        if pm is not None and touched(pm + regs.PM_CTRL):
            before = get(old, pm + regs.PM_CTRL, 2)
            after = get(f.cfg, pm + regs.PM_CTRL, 2)
            if (before & 3) == 3 and (after & 3) == 0 and not after & regs.PM_CTRL_NO_SOFT_RESET:
                self._user_reset(f, "pm-user", now)

    def _function_reset(self, f: SimFunction) -> list[SimFunction]:
        """A function-level reset of f. A PF's reset clears VF Enable, so its VFs
        go through reset too (SR-IOV spec r1.1 sec 2.2.2) and the kernel, which
        saves only f, does not restore them."""
        now = self._now()
        hit = [f, *[v for v in f.virtfns if v.present]]
        for g in hit:
            self._power_on(g, now)
        return hit

    def _user_reset(self, f: SimFunction, method: str, now: float) -> None:
        hit = self._function_reset(f)
        self.reset_log.append(ResetRecord(method, f.addr, frozenset(g.addr for g in hit), now, now))

    def _take_faults(self, f: SimFunction, kinds: set[str]) -> list[Fault]:
        taken = [x for x in f.faults if x.kind in kinds]
        f.faults = [x for x in f.faults if x.kind not in kinds or x.persistent]
        return taken

    def _power_on(self, f: SimFunction, now: float) -> None:
        """f goes through a conventional reset: power-on config, ready after its ready time."""
        extra = 0.0
        f.never_ready = False
        for fault in self._take_faults(f, {"crs", "slow", "new_identity"}):
            if fault.kind == "crs" and fault.seconds is None:
                f.never_ready = True
            elif fault.kind in ("crs", "slow"):
                extra += fault.seconds or 0.0
            else:
                self._new_identity(f, fault)
        if f.spec.rebar is not None:  # a resized BAR goes back to its power-on size
            f.img = f.rebuild()
        f.cfg = bytearray(f.img.por)
        f.ready_at = now + (f.spec.ready_ms / 1000.0 + extra) * self.time_scale

    def _new_identity(self, f: SimFunction, fault: Fault) -> None:
        update: dict[str, Any] = {}
        if fault.device_id is not None:
            update["device"] = fault.device_id
        if fault.revision is not None:
            update["revision"] = fault.revision
        if fault.bar_sizes is not None:
            slots = f.img.bars
            sizes = {}
            for k, v in fault.bar_sizes:
                idx = slots[-1 - k].index if k < 0 and -1 - k < len(slots) else k
                sizes[idx] = v
            bars = []
            for slot, bar in zip(slots, f.spec.bars, strict=False):
                bars.append(bar.model_copy(update={"size": sizes.get(slot.index, slot.size)}))
            update["bars"] = tuple(bars)
        spec = f.spec.model_copy(update=update)
        f.img = f.rebuild(spec)
        f.spec = spec
        # The kernel's struct resource keeps the old start; the size follows the new BAR.
        f.resources = resources_of(f)

    def _apply_rebar(self, f: SimFunction, clear: bool) -> None:
        """Make the BAR's size follow the Resizable BAR Control size field (PCIe r6.0 sec 7.8.6)."""
        o = f.img.ext_caps[regs.EXT_CAP_ID_REBAR]
        ctrl = get(f.cfg, o + regs.REBAR_CTRL, 4)
        size = 1 << (20 + ((ctrl >> 8) & 0x3F))
        for slot in f.img.bars:
            if slot.index != ctrl & 7 or slot.size == size:
                continue
            slot.size = size
            off = regs.BASE_ADDRESS_0 + 4 * slot.index
            mask = ~(size - 1)
            f.img.wmask[off:off + 4] = (mask & 0xFFFFFFF0).to_bytes(4, "little")
            if slot.type == "mem64":
                f.img.wmask[off + 4:off + 8] = ((mask >> 32) & 0xFFFFFFFF).to_bytes(4, "little")
            if clear:  # the BAR's address is undefined after a resize; read it as 0
                f.cfg[off:off + 4] = slot.low_bits.to_bytes(4, "little")
                if slot.type == "mem64":
                    f.cfg[off + 4:off + 8] = bytes(4)

    def _slow_extra(self, funcs: Iterable[SimFunction]) -> float:
        extra = 0.0
        for f in funcs:
            for fault in f.faults:
                if fault.kind == "slow":
                    extra = max(extra, fault.seconds or 0.0)
        return extra

    def _check_eio(self, f: SimFunction, attr: str) -> None:
        if self._take_faults(f, {"eio"}):
            raise ResetFailed(self._path(f.addr, attr), "Input/output error")
