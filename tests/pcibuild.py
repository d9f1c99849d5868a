"""The tests' one config-space builder, and the hand-made host built with it.

:class:`Cfg` lays out real config-space bytes (decoded by the real
``parse_config``, fed to lspci by the oracle) with the register offsets of
``qreset.pci.regs`` (pci_regs.h). On top of it: :func:`endpoint`, a PCIe
function carrying every capability the rescan diff maps (the diff and restore
tests), :func:`config`, a device shaped by a few flags (topology, plan and
doctor tests), and :func:`sample`, a host with every shape the reset rules
distinguish.
"""

from __future__ import annotations

from collections.abc import Iterable

from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.cfgspace import parse_config, u16
from qreset.pci.host import (
    IORESOURCE_MEM,
    IORESOURCE_MEM_64,
    IORESOURCE_PREFETCH,
    FunctionInfo,
    Resource,
    SlotInfo,
)
from qreset.topology import FunctionNode, Topology

A = PciAddress.parse


class Cfg:
    """A config space under construction (little-endian, like the bus)."""

    def __init__(
        self,
        size: int = regs.CFG_SPACE_EXP_SIZE,
        *,
        vendor: int = 0x8086,
        device: int = 0x10D3,
        header: int = regs.HEADER_TYPE_NORMAL,
        class_code: int = 0x020000,
        revision: int = 0x01,
        multifunction: bool = False,
    ) -> None:
        self.b = bytearray(size)
        self.w16(regs.VENDOR_ID, vendor)
        self.w16(regs.DEVICE_ID, device)
        self.w32(regs.CLASS_REVISION, (class_code << 8) | revision)
        self.w8(regs.HEADER_TYPE, header | (regs.HEADER_TYPE_MFD if multifunction else 0))
        self.header = header

    def w8(self, off: int, v: int) -> Cfg:
        self.b[off] = v
        return self

    def w16(self, off: int, v: int) -> Cfg:
        self.b[off:off + 2] = v.to_bytes(2, "little")
        return self

    def w32(self, off: int, v: int) -> Cfg:
        self.b[off:off + 4] = v.to_bytes(4, "little")
        return self

    def caps(self, entries: Iterable[tuple[int, int]], start: int | None = None) -> Cfg:
        """Chain standard capabilities ``(id, offset)`` in the order given."""
        entries = list(entries)
        self.w16(regs.STATUS, u16(bytes(self.b), regs.STATUS) | regs.STATUS_CAP_LIST)
        if start is None:
            start = 0x14 if self.header == regs.HEADER_TYPE_CARDBUS else regs.CAPABILITY_LIST
        self.w8(start, entries[0][1] if entries else 0)
        for i, (cap_id, off) in enumerate(entries):
            nxt = entries[i + 1][1] if i + 1 < len(entries) else 0
            self.w8(off, cap_id).w8(off + 1, nxt)
        return self

    def ext(self, entries: Iterable[tuple[int, int, int]]) -> Cfg:
        """Chain extended capabilities ``(id, offset, version)`` in the order given."""
        entries = list(entries)
        for i, (cap_id, off, ver) in enumerate(entries):
            nxt = entries[i + 1][1] if i + 1 < len(entries) else 0
            self.w32(off, cap_id | (ver << 16) | (nxt << 20))
        return self

    def pcie(self, off: int, port_type: int, *, flr: bool = False) -> Cfg:
        """Fill a PCIe capability's flags (version 2) and DevCap at ``off``."""
        self.w16(off + regs.EXP_FLAGS, 2 | (port_type << 4))
        self.w32(off + regs.EXP_DEVCAP, regs.EXP_DEVCAP_FLR if flr else 0)
        return self

    def bytes(self, length: int | None = None) -> bytes:
        return bytes(self.b if length is None else self.b[:length])


# -- endpoint(): every capability the rescan diff maps, at these offsets -------------------------

PM, MSI, EXP, MSIX = 0x40, 0x50, 0x70, 0xB0
AER, DSN, LTR, ACS, SRIOV, REBAR = 0x100, 0x140, 0x150, 0x160, 0x170, 0x1B0


def endpoint(bridge: bool = False) -> bytes:
    """A PCIe function with PM, MSI (64-bit, maskable), PCIe v2, MSI-X; AER, DSN, LTR, ACS, SR-IOV, REBAR."""
    c = Cfg(vendor=0x8086, device=0x1533, class_code=0x020000, revision=0x03,
            header=regs.HEADER_TYPE_BRIDGE if bridge else regs.HEADER_TYPE_NORMAL)
    c.w16(regs.COMMAND, 0x0406).w8(regs.CACHE_LINE_SIZE, 0x10).w32(regs.BASE_ADDRESS_0, 0xF7000000)
    if bridge:
        c.w32(0x18, 0x00020100)         # primary 0, secondary 1, subordinate 2
        c.w32(0x20, 0xF7F0F700)         # memory window
        c.w16(0x3E, 0x0012)             # bridge control: SERR, VGA...
    else:
        c.w32(0x14, 0xE000000C)         # 64-bit prefetchable BAR1/2
        c.w32(0x1C, 0x0000E001)         # I/O BAR3
        c.w32(0x2C, 0x00011028)
    c.w8(regs.INTERRUPT_LINE, 0x0B).w8(regs.INTERRUPT_PIN, 0x01)
    c.caps([(regs.CAP_ID_PM, PM), (regs.CAP_ID_MSI, MSI), (regs.CAP_ID_EXP, EXP), (regs.CAP_ID_MSIX, MSIX)])
    c.w16(PM + 2, 0xC823).w16(PM + 4, 0x0008)
    c.w16(MSI + 2, 0x0181).w32(MSI + 4, 0xFEE00000).w16(MSI + 12, 0x4021)  # 64-bit, maskable, enabled
    c.w16(EXP + 2, 0x0002 | (regs.EXP_TYPE_ROOT_PORT << 4 if bridge else 0))
    c.w32(EXP + 4, 0x10008FC0).w16(EXP + 8, 0x2937).w16(EXP + 0x10, 0x0040).w16(EXP + 0x12, 0x1011)
    c.w16(EXP + 0x28, 0x0400)
    c.w16(MSIX + 2, 0x8004).w32(MSIX + 4, 0x3)
    c.ext([(regs.EXT_CAP_ID_ERR, AER, 2), (regs.EXT_CAP_ID_DSN, DSN, 1), (regs.EXT_CAP_ID_LTR, LTR, 1),
           (regs.EXT_CAP_ID_ACS, ACS, 1), (regs.EXT_CAP_ID_SRIOV, SRIOV, 1),
           (regs.EXT_CAP_ID_REBAR, REBAR, 1)])
    c.w32(AER + regs.ERR_UNCOR_MASK, 0x00400000).w32(AER + regs.ERR_CAP, 0x000000A0)
    c.w32(DSN + 4, 0xDEADBEEF)
    c.w32(LTR + 4, 0x10031003)
    c.w16(ACS + regs.ACS_CAP, 0x001F).w16(ACS + regs.ACS_CTRL, 0x001D)
    c.w16(SRIOV + regs.SRIOV_TOTAL_VF, 8).w16(SRIOV + regs.SRIOV_NUM_VF, 4)
    c.w16(SRIOV + regs.SRIOV_CTRL, regs.SRIOV_CTRL_VFE | regs.SRIOV_CTRL_MSE)
    c.w16(SRIOV + regs.SRIOV_VF_DID, 0x1520)
    c.w32(REBAR + regs.REBAR_CAP, 0x0000F000).w32(REBAR + regs.REBAR_CTRL, 0x00000820)  # 1 BAR, size 8
    return c.bytes()


#: endpoint() and the resources its BARs decode to (sysfs ``resource``).
BASE = endpoint()
RES = (Resource(0xF7000000, 0xF701FFFF, IORESOURCE_MEM),
       Resource(0xE0000000, 0xE00FFFFF, IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_MEM_64))


def changed(base: bytes, *edits: tuple[int, int, int]) -> bytes:
    """``base`` with ``(offset, size, value)`` writes applied."""
    b = bytearray(base)
    for off, size, v in edits:
        b[off:off + size] = v.to_bytes(size, "little")
    return bytes(b)


# -- config(), node(), sample(): the hand-made host of the topology/plan/doctor tests -----------

def config(
    *,
    vendor: int = 0x8086,
    device: int = 0x1234,
    class_code: int = 0x020000,
    bridge: bool = False,
    multifunction: bool = False,
    secondary: int = 0,
    subordinate: int = 0,
    pcie_type: int | None = regs.EXP_TYPE_ENDPOINT,
    flr: bool = False,
    pm: bool = False,
    acs: tuple[int, int] | None = None,
    hotplug_slot: bool = False,
) -> bytes:
    """4096 bytes of config space (256 without PCIe): PM cap at 0x40, PCIe cap at 0x50, ACS at 0x100."""
    c = Cfg(regs.CFG_SPACE_EXP_SIZE if pcie_type is not None else regs.CFG_SPACE_SIZE,
            vendor=vendor, device=device, class_code=class_code, revision=0x01,
            header=regs.HEADER_TYPE_BRIDGE if bridge else regs.HEADER_TYPE_NORMAL,
            multifunction=multifunction)
    if bridge:
        c.w8(regs.PRIMARY_BUS, 0).w8(regs.SECONDARY_BUS, secondary).w8(regs.SUBORDINATE_BUS, subordinate)
    caps: list[tuple[int, int]] = []
    if pm:
        caps.append((regs.CAP_ID_PM, 0x40))
    if pcie_type is not None:
        caps.append((regs.CAP_ID_EXP, 0x50))
    if caps:
        c.caps(caps)
    if pm:
        c.w16(0x40 + regs.PM_CTRL, 0)  # No_Soft_Reset clear: PM reset works
    if pcie_type is not None:
        c.w16(0x50 + regs.EXP_FLAGS, (pcie_type << 4) | 2 | (regs.EXP_FLAGS_SLOT if hotplug_slot else 0))
        if hotplug_slot:  # what pciehp binds to (set_pcie_hotplug_bridge)
            c.w32(0x50 + regs.EXP_SLTCAP, regs.EXP_SLTCAP_HPC)
        c.w32(0x50 + regs.EXP_DEVCAP, regs.EXP_DEVCAP_FLR if flr else 0)
        if acs is not None:
            c.ext([(regs.EXT_CAP_ID_ACS, regs.EXT_CAP_START, 1)])
            c.w16(regs.EXT_CAP_START + regs.ACS_CAP, acs[0]).w16(regs.EXT_CAP_START + regs.ACS_CTRL, acs[1])
    return c.bytes()


def node(
    bdf: str,
    raw: bytes,
    *,
    parent: str | None = None,
    driver: str | None = None,
    group: int | None = None,
    methods: Iterable[str] = (),
    reset_subordinate: bool = False,
) -> FunctionNode:
    cfg = parse_config(raw)
    methods = tuple(methods)
    info = FunctionInfo(
        address=A(bdf), vendor=cfg.vendor_id, device=cfg.device_id, class_code=cfg.class_code,
        revision=cfg.revision, subsystem_vendor=0, subsystem_device=0, driver=driver,
        driver_override=None, iommu_group=group, reset_methods=methods, has_reset=bool(methods),
        has_reset_subordinate=reset_subordinate, resources=(), physfn=None, virtfns=(),
        parent=A(parent) if parent else None,
    )
    return FunctionNode(info, cfg)


ACS_ALL = (regs.ACS_SV | regs.ACS_RR | regs.ACS_CR | regs.ACS_UF, regs.ACS_ISOLATION)


def sample(iommu: bool = True) -> Topology:
    """A host with every shape the rules distinguish.

    ::

      00:00.0 host bridge                              (root bus)
      00:01.0 root port (ACS) -> bus 01..05
        01:00.0 switch upstream port -> 02..05
          02:00.0 downstream port (ACS, pciehp hotplug slot "4") -> 03
            03:00.0 NIC, FLR, vfio-pci, group 3
          02:01.0 downstream port (no ACS, Hot-Plug Capable, no slot in sysfs) -> 04
            04:00.0 GPU, no FLR, multifunction, vfio-pci, group 4
            04:00.1 HDMI audio, PM only, snd_hda_intel, group 4
          02:02.0 downstream port (ACS) -> 05
            05:00.0 device with no reset method, vfio-pci, group 5
      00:02.0 endpoint on the root bus, FLR, group 1
      00:1e.0 PCIe-to-PCI bridge -> 06
        06:01.0 conventional NIC, vfio-pci, group 6
        06:02.0 conventional SATA, ahci, group 6
    """
    rp = regs.EXP_TYPE_ROOT_PORT
    dp = regs.EXP_TYPE_DOWNSTREAM
    nodes = [
        node("00:00.0", config(class_code=0x060000, pcie_type=None), group=0),
        node("00:01.0", config(bridge=True, secondary=1, subordinate=5, pcie_type=rp, acs=ACS_ALL,
                               class_code=0x060400), driver="pcieport", group=2),
        node("01:00.0", config(bridge=True, secondary=2, subordinate=5, pcie_type=regs.EXP_TYPE_UPSTREAM,
                               class_code=0x060400), parent="00:01.0", driver="pcieport", group=2),
        node("02:00.0", config(bridge=True, secondary=3, subordinate=3, pcie_type=dp, acs=ACS_ALL,
                               class_code=0x060400, hotplug_slot=True),
             parent="01:00.0", driver="pcieport", group=2),
        node("02:01.0", config(bridge=True, secondary=4, subordinate=4, pcie_type=dp,
                               class_code=0x060400, hotplug_slot=True),
             parent="01:00.0", driver="pcieport", group=4,
             reset_subordinate=True),
        node("02:02.0", config(bridge=True, secondary=5, subordinate=5, pcie_type=dp, acs=ACS_ALL,
                               class_code=0x060400), parent="01:00.0", driver="pcieport", group=2),
        node("03:00.0", config(flr=True), parent="02:00.0", driver="vfio-pci", group=3,
             methods=("flr", "bus")),
        node("04:00.0", config(vendor=0x10DE, class_code=0x030000, multifunction=True),
             parent="02:01.0", driver="vfio-pci", group=4),
        node("04:00.1", config(vendor=0x10DE, class_code=0x040300, multifunction=True, pm=True),
             parent="02:01.0", driver="snd_hda_intel", group=4, methods=("pm",)),
        node("05:00.0", config(), parent="02:02.0", driver="vfio-pci", group=5, methods=("bus",)),
        node("00:02.0", config(flr=True), group=1, methods=("flr",), driver="e1000e"),
        node("00:1e.0", config(bridge=True, secondary=6, subordinate=6,
                               pcie_type=regs.EXP_TYPE_PCI_BRIDGE, class_code=0x060400), group=6),
        node("06:01.0", config(pcie_type=None), parent="00:1e.0", driver="vfio-pci", group=6),
        node("06:02.0", config(pcie_type=None, class_code=0x010601, pm=True), parent="00:1e.0",
             driver="ahci", group=6, methods=("pm",)),
    ]
    slots = [SlotInfo("4", "0000:03:00", True), SlotInfo("9", "0000:05:00", False)]
    return Topology({n.address: n for n in nodes}, slots, iommu, "sample")
