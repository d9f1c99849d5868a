"""Hand-made config spaces and topologies for the topology/doctor tests.

Builds real config-space bytes (decoded by the real ``parse_config``) so the
tests exercise the same decoding the host's data goes through; offsets are
from ``qreset.pci.regs`` (pci_regs.h).
"""

from __future__ import annotations

from collections.abc import Iterable

from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.config import parse_config
from qreset.pci.host import FunctionInfo, SlotInfo
from qreset.topology import FunctionNode, Topology

A = PciAddress.parse


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
    """4096 bytes of config space: PM cap at 0x40, PCIe cap at 0x50, ACS at 0x100."""
    b = bytearray(regs.CFG_SPACE_EXP_SIZE if pcie_type is not None else regs.CFG_SPACE_SIZE)

    def w16(off: int, v: int) -> None:
        b[off:off + 2] = v.to_bytes(2, "little")

    def w32(off: int, v: int) -> None:
        b[off:off + 4] = v.to_bytes(4, "little")

    w16(regs.VENDOR_ID, vendor)
    w16(regs.DEVICE_ID, device)
    w32(regs.CLASS_REVISION, (class_code << 8) | 0x01)
    b[regs.HEADER_TYPE] = (regs.HEADER_TYPE_BRIDGE if bridge else 0) | (
        regs.HEADER_TYPE_MFD if multifunction else 0)
    if bridge:
        b[regs.PRIMARY_BUS] = 0
        b[regs.SECONDARY_BUS] = secondary
        b[regs.SUBORDINATE_BUS] = subordinate
    caps: list[tuple[int, int]] = []
    if pm:
        caps.append((regs.CAP_ID_PM, 0x40))
    if pcie_type is not None:
        caps.append((regs.CAP_ID_EXP, 0x50))
    if caps:
        w16(regs.STATUS, regs.STATUS_CAP_LIST)
        b[regs.CAPABILITY_LIST] = caps[0][1]
        for i, (cid, off) in enumerate(caps):
            b[off] = cid
            b[off + 1] = caps[i + 1][1] if i + 1 < len(caps) else 0
    if pm:
        w16(0x40 + regs.PM_CTRL, 0)  # No_Soft_Reset clear: PM reset works
    if pcie_type is not None:
        w16(0x50 + regs.EXP_FLAGS, (pcie_type << 4) | 2 | (regs.EXP_FLAGS_SLOT if hotplug_slot else 0))
        if hotplug_slot:  # what pciehp binds to (set_pcie_hotplug_bridge)
            w32(0x50 + regs.EXP_SLTCAP, regs.EXP_SLTCAP_HPC)
        w32(0x50 + regs.EXP_DEVCAP, regs.EXP_DEVCAP_FLR if flr else 0)
        if acs is not None:
            w32(regs.EXT_CAP_START, regs.EXT_CAP_ID_ACS | (1 << 16))
            w16(regs.EXT_CAP_START + regs.ACS_CAP, acs[0])
            w16(regs.EXT_CAP_START + regs.ACS_CTRL, acs[1])
    return bytes(b)


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
