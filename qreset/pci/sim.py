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

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qreset.errors import HostError, NoSuchFunction, ResetFailed
from qreset.pci import regs, reset_method
from qreset.pci.address import PciAddress
from qreset.pci.host import (
    FunctionInfo,
    PciHost,
    RuntimeState,
    SlotInfo,
)
from qreset.pci.sim_config import (
    get,
)
from qreset.pci.sim_enum import Enumeration, SimFunction, probe_methods, read_ids, resources_of
from qreset.pci.sim_model import (
    TopologySpec,
    load_topology,
    read_topology,
)

__all__ = ["ConfigWrite", "Fault", "ResetRecord", "SimHost"]

log = logging.getLogger(__name__)

# Kernel delays (drivers/pci/pci.c), in spec seconds before time scaling.
FLR_WAIT = 0.100            # pcie_flr(): msleep(100) after Initiate FLR
AF_FLR_WAIT = 0.100         # pci_af_flr(): msleep(100)
PM_D3HOT_DELAY = 0.010      # pci_pm_reset(): pci_dev_d3_sleep(), d3hot_delay default 10 ms
SBR_ASSERT = 0.002          # pci_reset_secondary_bus(): "Trst of 1 ms, double this" -> msleep(2)
# pci_bridge_wait_for_secondary_bus(): 100 ms after the link is up (PCIe r6.0 sec 6.6.1; the
# delay is pci_bus_max_d3cold_delay(), PCI_PM_D3COLD_WAIT = 100 ms by default), then poll the
# children up to PCI_RESET_WAIT (1000 ms) in total on links <= 5 GT/s, or up to
# PCIE_RESET_READY_POLL_MS on faster ones. A bridge that is not PCIe waits Tpvrh + Trhfa =
# 1000 ms + delay. (The kernel returns without waiting for a PCIe-to-PCI bridge, which is not a
# "downstream port"; the sim, like the API it implements, gives every conventional secondary
# bus the 1100 ms, because the devices on it need Trhfa whatever the kernel does.)
SBR_WAIT_PCIE = 0.100
SBR_WAIT_CONVENTIONAL = 1.100
SBR_POLL_SLOW_LINK = 1.000  # PCI_RESET_WAIT
DEVICE_SPECIFIC_WAIT = 0.100  # quirk resets mostly do an FLR-like 100 ms wait
READY_POLL_LIMIT = 60.0     # PCIE_RESET_READY_POLL_MS = 60000
# pci_reset_fn_methods[] names (drivers/pci/pci.c), what reset_method_store knows.
_KERNEL_METHODS = frozenset({"device_specific", "acpi", "flr", "af_flr", "pm", "bus", "cxl_bus"})



# -- public data types ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """What the next reset of a function does wrong (one-shot unless ``persistent``).

    * ``crs``: stays in Configuration Request Retry Status ``seconds`` longer
      (None: never comes back);
    * ``eio``: the reset write fails with EIO (nothing happens to the device);
    * ``new_identity``: comes back as different firmware (device ID, revision,
      BAR sizes);
    * ``slow``: the reset itself and the return to ready take ``seconds`` longer.
    """

    kind: Literal["crs", "eio", "new_identity", "slow"]
    seconds: float | None = None
    device_id: int | None = None
    revision: int | None = None
    bar_sizes: tuple[tuple[int, int], ...] | None = None
    persistent: bool = False

    @classmethod
    def crs(cls, seconds: float | None, *, persistent: bool = False) -> Fault:
        return cls("crs", seconds=seconds, persistent=persistent)

    @classmethod
    def eio(cls, *, persistent: bool = False) -> Fault:
        return cls("eio", persistent=persistent)

    @classmethod
    def new_identity(cls, device_id: int | None = None, revision: int | None = None,
                     bar_sizes: Mapping[int, int] | Sequence[int] | None = None,
                     *, persistent: bool = False) -> Fault:
        """``bar_sizes``: {BAR index: size}, or sizes in the order of the implemented BARs."""
        pairs: tuple[tuple[int, int], ...] | None = None
        if isinstance(bar_sizes, Mapping):
            pairs = tuple(sorted((int(k), int(v)) for k, v in bar_sizes.items()))
        elif bar_sizes is not None:
            pairs = tuple((-1 - i, int(v)) for i, v in enumerate(bar_sizes))  # resolved later
        return cls("new_identity", device_id=device_id, revision=revision, bar_sizes=pairs,
                   persistent=persistent)

    @classmethod
    def slow(cls, seconds: float, *, persistent: bool = False) -> Fault:
        return cls("slow", seconds=seconds, persistent=persistent)


@dataclass(frozen=True, slots=True)
class ConfigWrite:
    """One :meth:`SimHost.write_config` call (``t`` is ``loop.time()``)."""

    addr: PciAddress
    offset: int
    data: bytes
    t: float


@dataclass(frozen=True, slots=True)
class ResetRecord:
    """One reset: ``method`` is a kernel method name (``flr``, ``bus``...),
    ``subordinate`` for reset_subordinate, or ``sbr``/``flr-user``/``af_flr-user``/
    ``pm-user`` for resets software did through config writes. ``target`` is
    the function asked (reset_function) or the bridge (bus resets);
    ``affected`` every function that went through reset. Times are loop.time()."""

    method: str
    target: PciAddress
    affected: frozenset[PciAddress]
    start: float
    end: float


class SimHost(PciHost):
    """A simulated PCI host built from a TOML topology (see the module docstring)."""

    def __init__(self, top: TopologySpec, name: str, time_scale: float = 1.0) -> None:
        self.name = f"sim:{name}"
        self.source = name
        self.time_scale = time_scale
        self.topology = top
        self.iommu = top.host.iommu
        self.config_writes: list[ConfigWrite] = []
        self.reset_log: list[ResetRecord] = []
        boot = Enumeration(top, name)
        self._enum = boot
        self._fns = boot.functions
        self._order = boot.order
        self._by_name = boot.by_name

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], time_scale: float = 1.0) -> SimHost:
        """Load ``path``; raises ConfigError naming the file and key."""
        p = Path(path)
        return cls(read_topology(p), str(p), time_scale)

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str, time_scale: float = 1.0) -> SimHost:
        return cls(load_topology(data, name), name, time_scale)

    # -- lookups ----------------------------------------------------------------------

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

    # -- PciHost ----------------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds * self.time_scale)

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
            has_reset_subordinate=f.is_bridge and f.spec.reset_subordinate,
            resources=tuple(f.resources),
            physfn=f.physfn.addr if f.physfn is not None else None,
            virtfns=tuple(v.addr for v in f.virtfns if v.present),
            parent=f.parent.addr if f.parent is not None else None,
        )

    async def runtime(self, addr: PciAddress) -> RuntimeState:
        f = self._get(addr)
        return RuntimeState(f.driver, f.driver_override, f.reset_methods, f.has_reset_attr,
                            tuple(v.addr for v in f.virtfns if v.present))

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

    # -- resets -----------------------------------------------------------------------

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

    async def _wait_ready(self, funcs: Sequence[SimFunction], what: str,
                          limit: float = READY_POLL_LIMIT) -> None:
        """pci_dev_wait(): poll until the function answers, up to ``limit`` (spec seconds)."""
        deadline = self._now() + limit * self.time_scale
        for f in funcs:
            # A function behind a bridge without bus numbers reads all-ones: not ready either.
            while not (self._ready(f) and self._reachable(f)):
                now = self._now()
                if now >= deadline:
                    raise ResetFailed(self._path(f.addr, "reset"),
                                      f"not ready {round(limit * 1000)}ms after {what}; giving up")
                waiting = f.never_ready or f.ready_at <= now
                target = deadline if waiting else min(f.ready_at, deadline)
                await asyncio.sleep(max(target - now, 0.0) + 1e-4)

    def _slow_extra(self, funcs: Iterable[SimFunction]) -> float:
        extra = 0.0
        for f in funcs:
            for fault in f.faults:
                if fault.kind == "slow":
                    extra = max(extra, fault.seconds or 0.0)
        return extra

    def _restore(self, f: SimFunction, saved: bytes) -> None:
        """pci_restore_state(): write the saved state back; read-only bits keep their new value.
        Writes to a function that does not answer go nowhere."""
        if not (self._ready(f) and self._reachable(f)):
            return
        rebar = f.img.ext_caps.get(regs.EXT_CAP_ID_REBAR)
        if rebar is not None:  # pci_restore_rebar_state() resizes before the BARs are written
            f.cfg[rebar + regs.REBAR_CTRL + 1] = saved[rebar + regs.REBAR_CTRL + 1] & 0x3F
            self._apply_rebar(f, clear=False)
        for o in range(min(len(saved), f.img.size)):
            wm = f.img.wmask[o]
            f.cfg[o] = (f.cfg[o] & ~wm) | (saved[o] & wm)

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

    def _check_eio(self, f: SimFunction, attr: str) -> None:
        if self._take_faults(f, {"eio"}):
            raise ResetFailed(self._path(f.addr, attr), "Input/output error")

    # -- reset_method (drivers/pci/pci.c: reset_method_show/reset_method_store) -----------

    def _probe_now(self, f: SimFunction) -> tuple[str, ...]:
        """The methods that probe OK now (what ``default`` gives)."""
        alone = f.parent is None or all(g is f or not g.present for g in f.parent.children)
        return probe_methods(f, alone, enumerating=False)

    def read_reset_method(self, addr: PciAddress) -> str | None:
        """``cat reset_method``; None when the attribute is hidden (no method at enumeration)."""
        f = self._get(addr)
        return " ".join(f.reset_methods) + "\n" if f.has_reset_attr else None

    def write_reset_method(self, addr: PciAddress, text: str) -> None:
        """``echo TEXT > reset_method`` with the kernel's rules: ``""`` disables every method,
        ``default`` re-probes, else every name must be known and supported *now* or the
        write fails with EINVAL and the list stays as it was."""
        f = self._get(addr)
        path = self._path(addr, "reset_method")
        if not f.has_reset_attr:
            raise HostError(path, "No such file or directory")
        words = text.split()
        if words == ["default"]:
            f.reset_methods = self._probe_now(f)
            return
        supported = self._probe_now(f)
        for name in words:
            if name not in _KERNEL_METHODS:
                raise HostError(path, f"Invalid argument (Invalid reset method '{name}')")
            if name not in supported:
                raise HostError(path, f"Invalid argument (Unsupported reset method '{name}')")
        f.reset_methods = tuple(words)

    async def reset_function(self, addr: PciAddress, method: str | None = None) -> None:
        f = self._get(addr)
        if not f.has_reset_attr:
            raise ResetFailed(self._path(addr, "reset"), "No such file or directory (no reset method)")
        if method is None:
            await self._reset(f)
            return
        where = self._path(addr, "reset_method")

        def read() -> str | None:
            return self.read_reset_method(addr)

        def write(text: str) -> None:
            self.write_reset_method(addr, text)

        previous = reset_method.narrow(read, write, method, where)
        failure: BaseException | None = None
        try:
            await self._reset(f)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            try:
                reset_method.put_back(read, write, previous, where)
            except HostError:
                if failure is None:
                    raise

    async def _reset(self, f: SimFunction) -> None:
        """``echo 1 > reset``: pci_reset_function() with the methods enabled now."""
        addr = f.addr
        methods = f.reset_methods
        if not methods:
            raise ResetFailed(self._path(addr, "reset"), "Inappropriate ioctl for device")
        self._check_eio(f, "reset")
        async with f.lock:  # device_lock(): resets of one function queue up
            f.block_cfg()
            saved = bytes(f.cfg)
            start = self._now()
            hit: list[SimFunction] = []
            done = ""
            try:
                for m in methods:
                    done = m
                    if await self._do_method(f, m, hit):
                        return
                raise ResetFailed(self._path(addr, "reset"), "Inappropriate ioctl for device")
            finally:
                self._restore(f, saved)
                f.unblock_cfg()
                if hit:  # the device went through reset, even if it then failed to come back
                    self.reset_log.append(ResetRecord(
                        done, f.addr, frozenset(g.addr for g in hit), start, self._now()))
                    log.debug("%s: %s reset hit %d function(s) in %.1f ms", f.addr, done, len(hit),
                              (self._now() - start) * 1000)

    async def _do_method(self, f: SimFunction, m: str, hit: list[SimFunction]) -> bool:
        """Run one reset method on f, filling ``hit`` as functions go through reset.
        False = ENOTTY (the kernel tries the next method)."""
        slow = self._slow_extra([f])
        # The kernel probes through config reads: an unreachable function reads all-ones
        # (which claims FLR and No_Soft_Reset), and the reset's own writes go nowhere.
        view = self._view(f)
        reachable = self._reachable(f)
        if m in ("flr", "af_flr", "device_specific"):
            if m == "flr" and not get(view, (f.cap(regs.CAP_ID_EXP) or 0) + regs.EXP_DEVCAP, 4) \
                    & regs.EXP_DEVCAP_FLR:
                return False
            if reachable:
                hit.extend(self._function_reset(f))
            await self.sleep({"flr": FLR_WAIT, "af_flr": AF_FLR_WAIT}.get(m, DEVICE_SPECIFIC_WAIT) + slow)
            await self._wait_ready([f], m.upper() if m != "device_specific" else "device-specific reset")
            return True
        if m == "pm":
            pm = f.cap(regs.CAP_ID_PM)
            if pm is None or get(view, pm + regs.PM_CTRL, 2) & regs.PM_CTRL_NO_SOFT_RESET:
                return False
            await self.sleep(PM_D3HOT_DELAY)
            if reachable:
                hit.extend(self._function_reset(f))  # D3hot -> D0 with No_Soft_Reset clear
            await self.sleep(PM_D3HOT_DELAY + slow)
            await self._wait_ready([f], "PM D3hot->D0")
            return True
        if m == "bus":
            parent = f.parent
            if parent is None or f.is_bridge:
                return False  # root bus, or dev->subordinate
            slot = parent.spec.slot
            # pci_dev_reset_slot_function(): dev->slot is the port's slot (device 0 below it).
            slot_ok = slot is not None and slot.hotplug and not f.multifunction and f.addr.device == 0
            alone = all(g is f or not g.present for g in parent.children)
            if not (slot_ok or alone):
                return False
            hit.extend(self._below(parent, physical=True))
            if not await self._secondary_bus_reset(parent, hit, slow):
                hit.clear()
            await self._wait_ready([f], "bus reset", self._poll_limit(parent))
            return True
        return False

    @staticmethod
    def _conventional(bridge: SimFunction) -> bool:
        return bridge.spec.type in ("pcie_pci_bridge", "pci_bridge")

    def _poll_limit(self, bridge: SimFunction) -> float:
        """How long pci_bridge_wait_for_secondary_bus() polls after its fixed delay."""
        if not self._conventional(bridge) and bridge.spec.link_speed <= 2:  # <= 5 GT/s
            return SBR_POLL_SLOW_LINK - SBR_WAIT_PCIE
        return READY_POLL_LIMIT

    async def _secondary_bus_reset(self, bridge: SimFunction, hit: list[SimFunction], slow: float) -> bool:
        """pci_reset_secondary_bus() and the fixed delay of pci_bridge_wait_for_secondary_bus().
        False when the bridge does not answer, so its Bridge Control writes go nowhere."""
        reachable = self._reachable(bridge) and self._ready(bridge)
        if reachable:
            bc = get(bridge.cfg, regs.BRIDGE_CONTROL, 2)
            bridge.cfg[regs.BRIDGE_CONTROL] = (bc | regs.BRIDGE_CTL_BUS_RESET) & 0xFF
        await self.sleep(SBR_ASSERT)
        if reachable:
            bridge.cfg[regs.BRIDGE_CONTROL] = bc & ~regs.BRIDGE_CTL_BUS_RESET & 0xFF
            now = self._now()
            for g in hit:
                self._power_on(g, now)
        await self.sleep((SBR_WAIT_CONVENTIONAL if self._conventional(bridge) else SBR_WAIT_PCIE) + slow)
        return reachable

    async def _restore_below(self, bridge: SimFunction, saved: dict[SimFunction, bytes],
                             errors: list[ResetFailed]) -> None:
        """pci_bus_restore_locked(): restore each function on the bus; behind a bridge that
        is restored (bus numbers back), wait for the functions to answer, then go down."""
        for g in sorted((c for c in bridge.children if c in saved), key=lambda c: c.order):
            self._restore(g, saved[g])
            below = [c for c in g.children if c in saved and c.physfn is None]
            if g.is_bridge and below:
                try:
                    await self._wait_ready(below, "bus reset", self._poll_limit(g))
                except ResetFailed as exc:
                    errors.append(exc)
                await self._restore_below(g, saved, errors)

    async def reset_subordinate(self, bridge: PciAddress) -> None:
        b = self._get(bridge)
        if not (b.is_bridge and b.spec.reset_subordinate):
            raise HostError(self._path(bridge, "reset_subordinate"), "No such file or directory")
        self._check_eio(b, "reset_subordinate")
        hit = self._below(b)
        physical = self._below(b, physical=True)  # removed functions are still wired to the bus
        locks = [g.lock for g in [b, *hit]]
        # __pci_reset_bus(): pci_bus_trylock(); contention is EAGAIN, not a wait.
        if any(lk.locked() for lk in locks):
            raise ResetFailed(self._path(bridge, "reset_subordinate"), "Resource temporarily unavailable")
        for lk in locks:
            await lk.acquire()
        start = self._now()
        saved = {g: bytes(g.cfg) for g in hit}
        for g in hit:
            g.block_cfg()
        errors: list[ResetFailed] = []
        done = False
        try:
            done = await self._secondary_bus_reset(b, physical, self._slow_extra(hit))
            first = [g for g in hit if g.parent is b and g.physfn is None]
            try:
                await self._wait_ready(first, "bus reset", self._poll_limit(b))
            except ResetFailed as exc:
                errors.append(exc)
            await self._restore_below(b, saved, errors)
        finally:
            for g in hit:
                g.unblock_cfg()
            for lk in locks:
                lk.release()
            if done:
                self.reset_log.append(ResetRecord(
                    "subordinate", b.addr, frozenset(g.addr for g in physical), start, self._now()))
                log.debug("%s: reset_subordinate hit %d function(s)", b.addr, len(physical))
        if errors:
            raise errors[0]

    # -- remove / rescan / bind ---------------------------------------------------------

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

    # -- test hooks ---------------------------------------------------------------------

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

    # -- sysfs tree ---------------------------------------------------------------------

    def write_tree(self, root: Path) -> None:
        """Write a sysfs-shaped snapshot under ``root`` (see qreset.pci.sim_tree)."""
        from qreset.pci.sim_tree import write_tree

        write_tree(self, Path(root))

