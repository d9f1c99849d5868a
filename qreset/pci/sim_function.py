"""
One simulated function: its spec, config space, what the kernel caches about
it, and what the kernel reads from it (:func:`read_ids`, :func:`probe_methods`).
Split from :mod:`qreset.pci.sim_enum` (which builds these at load time and
keeps importing them under their old names).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.host import Resource
from qreset.pci.sim_config import BarSlot, ConfigImage, build_image, default_pm, get
from qreset.pci.sim_model import AfSpec, FunctionSpec
from qreset.pci.sim_setup import Assigned

if TYPE_CHECKING:
    from qreset.pci.sim import Fault

@dataclass(eq=False)
class SimFunction:
    """One simulated function: its spec, its config space now (``cfg``) and at power-on
    (``img.por``, with the write masks), and what the kernel knows about it (``ids``,
    ``resources``, ``reset_methods``, ``group``, ``driver``: cached at enumeration, the
    way struct pci_dev caches them). ``ready_at`` is the loop time until which it
    answers CRS after a reset."""

    spec: FunctionSpec
    addr: PciAddress
    parent: SimFunction | None
    multifunction: bool
    img: ConfigImage
    asg: Assigned = field(default_factory=Assigned)
    cfg: bytearray = field(default_factory=bytearray)
    children: list[SimFunction] = field(default_factory=list)   # functions on the secondary bus
    physfn: SimFunction | None = None
    virtfns: list[SimFunction] = field(default_factory=list)
    vf_index: int = 0
    driver: str | None = None
    driver_override: str | None = None
    group: int | None = None
    reset_methods: tuple[str, ...] = ()
    #: sysfs shows ``reset``/``reset_method`` when a method probed OK when the
    #: function was added (pci_dev_reset_method_attr_is_visible), whatever is written later.
    has_reset_attr: bool = False
    present: bool = True
    ids: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
    resources: list[Resource] = field(default_factory=list)
    ready_at: float = 0.0
    never_ready: bool = False
    sbr_since: float | None = None
    faults: list[Fault] = field(default_factory=list)
    order: int = 0
    _lock: asyncio.Lock | None = None
    _cfg_free: asyncio.Event | None = None
    cfg_blocked: int = 0
    port_number: int = 0              # what build_image() was given, to rebuild the same layout
    slot_number: int | None = None

    def rebuild(self, spec: FunctionSpec | None = None) -> ConfigImage:
        """The power-on image of ``spec`` (default: the current one) with this function's layout."""
        spec = spec or self.spec
        img = build_image(spec, multifunction=self.multifunction, is_vf=self.physfn is not None,
                          port_number=self.port_number, slot_number=self.slot_number,
                          slot_hotplug=bool(self.slot_hotplug))
        if self.physfn is not None:  # a VF's BARs live in its PF's SR-IOV capability
            img.bars = [BarSlot(b.index, b.size, b.type, b.prefetch) for b in self.physfn.img.vf_bars]
            sriov = self.physfn.spec.sriov
            if sriov is not None and sriov.vf_config_ids == "ffff":
                img.por[regs.VENDOR_ID:regs.DEVICE_ID + 2] = b"\xff\xff\xff\xff"
        return img

    @property
    def slot_hotplug(self) -> bool:
        return bool(self.spec.slot and self.spec.slot.hotplug)

    @property
    def is_bridge(self) -> bool:
        return self.spec.is_bridge

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @property
    def cfg_free(self) -> asyncio.Event:
        if self._cfg_free is None:
            self._cfg_free = asyncio.Event()
            if not self.cfg_blocked:
                self._cfg_free.set()
        return self._cfg_free

    def block_cfg(self) -> None:
        self.cfg_blocked += 1
        self.cfg_free.clear()

    def unblock_cfg(self) -> None:
        self.cfg_blocked -= 1
        if not self.cfg_blocked:
            self.cfg_free.set()

    def cap(self, cap_id: int) -> int | None:
        return self.img.caps.get(cap_id)


def read_ids(f: SimFunction) -> tuple[int, int, int, int, int, int]:
    """What the kernel caches in struct pci_dev (and sysfs shows): read from config space,
    except a VF's vendor/device, which pci_iov_add_virtfn() takes from the PF."""
    c = f.cfg
    sub = (0, 0) if f.is_bridge else (get(c, regs.SUBSYSTEM_VENDOR_ID, 2), get(c, regs.SUBSYSTEM_ID, 2))
    vendor, device = get(c, 0, 2), get(c, 2, 2)
    if f.physfn is not None and f.physfn.spec.sriov is not None:
        vendor, device = f.physfn.ids[0], f.physfn.spec.sriov.vf_device
    return (vendor, device, get(c, regs.CLASS_REVISION, 4) >> 8, c[regs.REVISION_ID], *sub)


def probe_methods(f: SimFunction, alone: bool, enumerating: bool = True) -> tuple[str, ...]:
    """pci_init_reset_methods() (drivers/pci/pci.c, pci_reset_fn_methods order).

    ``alone``: no other function on f's bus (pci_parent_bus_reset). While
    ``enumerating`` (pci_device_add) that is "the first function scanned" and
    ``dev->subordinate`` is not set yet, so a bridge gets ``bus`` too; later
    (``reset_method`` = ``default``, or a name's probe in reset_method_store)
    it is the bus as it is now, and a bridge never does.
    """
    s = f.spec
    out: list[str] = []
    if s.device_specific:
        out.append("device_specific")
    if s.is_pcie and s.flr:
        out.append("flr")
    af = AfSpec() if s.af is True else (s.af or None)
    if af is not None and af.tp and af.flr:
        out.append("af_flr")
    pm = default_pm(s)
    if pm is not None and not pm.no_soft_reset:
        out.append("pm")
    if f.parent is not None and (enumerating or not f.is_bridge):
        # pci_reset_bus_function(): pci_dev_reset_slot_function() (hotplug slot, not
        # multifunction), else pci_parent_bus_reset() (alone on the bus).
        slot = f.parent.spec.slot
        slot_ok = slot is not None and slot.hotplug and not f.multifunction and f.addr.device == 0
        if slot_ok or alone:
            out.append("bus")
    return tuple(out)
