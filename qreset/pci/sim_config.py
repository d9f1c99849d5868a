"""
Building the config space of a simulated function from its TOML description.

:func:`build_image` turns a :class:`~qreset.pci.sim_model.FunctionSpec` into a
:class:`ConfigImage`: the power-on bytes plus a write mask and a
write-1-to-clear mask per byte, the way QEMU models devices
(``PCIDevice.config/wmask/w1cmask`` in hw/pci/pci.c): a write stores
``(old & ~wmask) | (new & wmask)`` and clears ``old & new & w1cmask``, so
read-only fields (IDs, capability bits, BAR size bits) ignore writes and BAR
sizing (write all-ones, read back the size mask) just works.

:func:`configure` then puts a function in the state firmware and the kernel
leave it in after boot (BARs at addresses, Command Memory+Bus Master, bus
numbers and windows on bridges, PCIe error reporting, ACS enabled...). A
secondary bus reset or FLR brings the function back to the power-on bytes,
which is what makes the difference between a restored and an unrestored
function visible.

Register layouts are from include/uapi/linux/pci_regs.h (see qreset.pci.regs)
and the PCI Express Base Spec r6.0 (sections 7.5.3 PCIe capability, 7.8.4 AER,
7.7.8 ACS, 9.3.3 SR-IOV, 7.8.6 Resizable BAR, 7.8.2 LTR).
"""

from __future__ import annotations

from qreset.pci import regs
from qreset.pci.sim_extcaps import put_ext_caps
from qreset.pci.sim_image import BarSlot, ConfigImage, ImageWriter, bar_slots, get, log2, put, put_bar
from qreset.pci.sim_model import AfSpec, FunctionSpec, MsiSpec, MsixSpec, PmSpec

# The image types and register access live in sim_image, the extended
# capabilities in sim_extcaps; what was public here stays importable from here.
__all__ = ["DEFAULT_IDS", "DEVCTL_DEFAULT", "PCIE_TYPE", "BarSlot", "ConfigImage", "build_image",
           "default_pm", "get", "put"]

# PCI Express Device/Port Type per simulated function kind (PCI_EXP_TYPE_*).
PCIE_TYPE = {
    "root_port": regs.EXP_TYPE_ROOT_PORT,
    "upstream_port": regs.EXP_TYPE_UPSTREAM,
    "downstream_port": regs.EXP_TYPE_DOWNSTREAM,
    "pcie_pci_bridge": regs.EXP_TYPE_PCI_BRIDGE,
    "endpoint": regs.EXP_TYPE_ENDPOINT,
    "legacy_endpoint": regs.EXP_TYPE_LEG_END,
    "rc_endpoint": regs.EXP_TYPE_RC_END,
}

# Default IDs for bridges a file does not spell out (real parts).
DEFAULT_IDS: dict[str, tuple[int, int, int]] = {
    "root_port": (0x8086, 0xA110, 0x060400),        # Intel 100-series PCIe Root Port #1
    "upstream_port": (0x10B5, 0x8747, 0x060400),    # PLX/Broadcom PEX 8747 upstream
    "downstream_port": (0x10B5, 0x8747, 0x060400),  # PEX 8747 downstream
    "pcie_pci_bridge": (0x1B21, 0x1080, 0x060401),  # ASMedia ASM1083/1085 PCIe-to-PCI bridge
    "pci_bridge": (0x8086, 0x244E, 0x060401),       # Intel 82801 PCI bridge
}

# PCI_COMMAND bits the sim lets software write: IO, MEMORY, MASTER, SPECIAL,
# INVALIDATE, VGA_PALETTE, PARITY, SERR, FAST_BACK, INTX_DISABLE (QEMU
# pci_init_wmask writes IO|MEMORY|MASTER|INTX_DISABLE plus the rest for bridges).
_COMMAND_WMASK = 0x07FF & ~0x0080
# PCI_STATUS error bits are write-1-to-clear (PCI_STATUS_SIG_SYSTEM_ERROR ...).
_STATUS_W1C = 0xF900
# PCI_EXP_DEVCTL default after reset: MRRS 512 (2<<12), Enable No Snoop (1<<11),
# Enable Relaxed Ordering (1<<4) (PCIe r6.0 sec 7.5.3.4).
DEVCTL_DEFAULT = 0x2810
_PCI_PM_CAP_VER3 = 0x0003          # PMC version 3 (PCI PM spec 1.2)
_PCI_PM_SIZE = 8                   # PCI_PM_SIZEOF
_PCI_EXP_SIZE = 0x3C               # PCI_CAP_EXP_ENDPOINT_SIZEOF_V2
_PCI_AF_SIZE = 6
_PCI_MSIX_SIZE = 12                # PCI_CAP_MSIX_SIZEOF



def default_pm(spec: FunctionSpec) -> PmSpec | None:
    """``pm = true``: bridges get No_Soft_Reset set (what switch and root ports report), others clear."""
    if spec.pm is True:
        return PmSpec(no_soft_reset=spec.is_bridge)
    return spec.pm or None


def build_image(spec: FunctionSpec, *, multifunction: bool, is_vf: bool = False,
                port_number: int = 0, slot_number: int | None = None,
                slot_hotplug: bool = False) -> ConfigImage:
    """The power-on config space of ``spec`` (see the module docstring)."""
    pcie = spec.is_pcie
    img = ImageWriter(regs.CFG_SPACE_EXP_SIZE if pcie else regs.CFG_SPACE_SIZE)
    vendor, device, klass = DEFAULT_IDS.get(spec.type, (0, 0, 0))
    vendor = spec.vendor if spec.vendor is not None else vendor
    device = spec.device if spec.device is not None else device
    klass = spec.class_code if spec.class_code is not None else klass
    bridge = spec.is_bridge

    img.put(regs.VENDOR_ID, 2, vendor)
    img.put(regs.DEVICE_ID, 2, device)
    cmd_wmask = _COMMAND_WMASK & ~regs.COMMAND_MEMORY if is_vf else _COMMAND_WMASK
    img.put(regs.COMMAND, 2, 0, cmd_wmask)
    img.put(regs.STATUS, 2, regs.STATUS_CAP_LIST, 0, _STATUS_W1C)
    img.put(regs.REVISION_ID, 1, spec.revision)
    img.put(regs.CLASS_PROG, 3, klass)
    img.put(regs.CACHE_LINE_SIZE, 1, 0, 0xFF)
    img.put(regs.LATENCY_TIMER, 1, 0, 0 if pcie else 0xFF)
    htype = regs.HEADER_TYPE_BRIDGE if bridge else regs.HEADER_TYPE_NORMAL
    img.put(regs.HEADER_TYPE, 1, htype | (regs.HEADER_TYPE_MFD if multifunction else 0))
    bars = [] if is_vf else bar_slots(spec.bars)
    for slot in bars:
        put_bar(img, regs.BASE_ADDRESS_0 + 4 * slot.index, slot)
    rom_size = 0 if spec.rom is None else spec.rom
    if bridge:
        for off in (regs.PRIMARY_BUS, regs.SECONDARY_BUS, regs.SUBORDINATE_BUS, regs.SEC_LATENCY_TIMER):
            img.put(off, 1, 0, 0xFF)
        # 32-bit I/O decode (low nibble 1), 64-bit prefetchable decode (low nibble 1).
        img.put(regs.IO_BASE, 1, 0x01, 0xF0)
        img.put(regs.IO_LIMIT, 1, 0x01, 0xF0)
        img.put(regs.SEC_STATUS, 2, 0, 0, _STATUS_W1C)
        img.put(regs.MEMORY_BASE, 2, 0, 0xFFF0)
        img.put(regs.MEMORY_LIMIT, 2, 0, 0xFFF0)
        img.put(regs.PREF_MEMORY_BASE, 2, 0x0001, 0xFFF0)
        img.put(regs.PREF_MEMORY_LIMIT, 2, 0x0001, 0xFFF0)
        img.put(regs.PREF_BASE_UPPER32, 4, 0, 0xFFFFFFFF)
        img.put(regs.PREF_LIMIT_UPPER32, 4, 0, 0xFFFFFFFF)
        img.put(regs.IO_BASE_UPPER16, 2, 0, 0xFFFF)
        img.put(regs.IO_LIMIT_UPPER16, 2, 0, 0xFFFF)
        if rom_size:
            img.put(regs.ROM_ADDRESS1, 4, 0, (~(rom_size - 1) & 0xFFFFF800) | 1)
        # Bridge Control: parity, SERR, ISA, VGA, VGA16, master abort, bus reset
        # (bit 6), fast back-to-back, discard timers (PCI-to-PCI Bridge spec 1.2 sec 3.2.5.18).
        img.put(regs.BRIDGE_CONTROL, 2, 0, 0x0BFF, 0x0400)
    else:
        img.put(regs.SUBSYSTEM_VENDOR_ID, 2, spec.subsystem_vendor)
        img.put(regs.SUBSYSTEM_ID, 2, spec.subsystem_device)
        if rom_size and not is_vf:
            img.put(regs.ROM_ADDRESS, 4, 0, (~(rom_size - 1) & 0xFFFFF800) | 1)
    img.put(regs.INTERRUPT_LINE, 1, 0, 0xFF)
    img.put(regs.INTERRUPT_PIN, 1, 0 if is_vf else spec.interrupt_pin)

    caps: dict[int, int] = {}
    chain: list[tuple[int, int]] = []  # (id, size)
    if spec.pm:
        chain.append((regs.CAP_ID_PM, _PCI_PM_SIZE))
    msi = MsiSpec() if spec.msi is True else (spec.msi or None)
    if msi is not None:
        chain.append((regs.CAP_ID_MSI, 24))
    if pcie:
        chain.append((regs.CAP_ID_EXP, _PCI_EXP_SIZE))
    msix = MsixSpec() if spec.msix is True else (spec.msix or None)
    if msix is not None:
        chain.append((regs.CAP_ID_MSIX, _PCI_MSIX_SIZE))
    af = AfSpec() if spec.af is True else (spec.af or None)
    if af is not None:
        chain.append((regs.CAP_ID_AF, _PCI_AF_SIZE))
    pos = 0x40
    prev_next = regs.CAPABILITY_LIST
    for cap_id, size in chain:
        img.data[prev_next] = pos
        img.data[pos] = cap_id
        caps[cap_id] = pos
        prev_next = pos + 1
        pos = (pos + size + 3) & ~3
    if not chain:
        img.put(regs.STATUS, 2, 0, 0, _STATUS_W1C)

    if regs.CAP_ID_PM in caps:
        o = caps[regs.CAP_ID_PM]
        pm = default_pm(spec)
        assert isinstance(pm, PmSpec)
        img.put(o + regs.PM_PMC, 2, _PCI_PM_CAP_VER3 | 0xC800)  # PME from D3hot/D3cold
        ctrl = regs.PM_CTRL_NO_SOFT_RESET if pm.no_soft_reset else 0
        img.put(o + regs.PM_CTRL, 2, ctrl, regs.PM_CTRL_STATE_MASK | regs.PM_CTRL_PME_ENABLE,
                regs.PM_CTRL_PME_STATUS)
    if msi is not None:
        o = caps[regs.CAP_ID_MSI]
        flags = (log2(msi.vectors) << 1) | (regs.MSI_FLAGS_64BIT if msi.addr64 else 0)
        flags |= regs.MSI_FLAGS_MASKBIT if msi.per_vector_mask else 0
        img.put(o + regs.MSI_FLAGS, 2, flags, regs.MSI_FLAGS_ENABLE | 0x0070)
        img.put(o + regs.MSI_ADDRESS_LO, 4, 0, 0xFFFFFFFC)
        data_off = regs.MSI_DATA_64 if msi.addr64 else regs.MSI_DATA_32
        if msi.addr64:
            img.put(o + regs.MSI_ADDRESS_HI, 4, 0, 0xFFFFFFFF)
        img.put(o + data_off, 2, 0, 0xFFFF)
        if msi.per_vector_mask:
            mask_off = regs.MSI_MASK_64 if msi.addr64 else regs.MSI_MASK_32
            img.put(o + mask_off, 4, 0, (1 << msi.vectors) - 1)
    if pcie:
        _put_pcie(img, caps[regs.CAP_ID_EXP], spec, port_number, slot_number, slot_hotplug)
    if msix is not None:
        o = caps[regs.CAP_ID_MSIX]
        img.put(o + regs.MSIX_FLAGS, 2, msix.vectors - 1, regs.MSIX_FLAGS_ENABLE | regs.MSIX_FLAGS_MASKALL)
        img.put(o + regs.MSIX_TABLE, 4, (msix.table_offset & ~7) | msix.bar)
        pba = msix.pba_offset if msix.pba_offset is not None else msix.table_offset + 16 * msix.vectors
        img.put(o + regs.MSIX_PBA, 4, ((pba + 7) & ~7) | msix.bar)
    if af is not None:
        o = caps[regs.CAP_ID_AF]
        img.put(o + 2, 1, _PCI_AF_SIZE)
        img.put(o + regs.AF_CAP, 1, (regs.AF_CAP_TP if af.tp else 0) | (regs.AF_CAP_FLR if af.flr else 0))
        img.put(o + regs.AF_CTRL, 1, 0, 0)  # FLR bit is an action, handled by the sim
        img.put(o + regs.AF_STATUS, 1, 0)

    ext: dict[int, int] = {}
    vf_bars: list[BarSlot] = []
    if pcie:
        vf_bars = put_ext_caps(img, spec, ext)
    return ConfigImage(img.size, img.data, img.wmask, img.w1c, caps, ext, bars, rom_size, vf_bars)


def _put_pcie(img: ImageWriter, o: int, spec: FunctionSpec, port_number: int,
              slot_number: int | None, slot_hotplug: bool) -> None:
    ptype = PCIE_TYPE[spec.type]
    is_port = ptype in (regs.EXP_TYPE_ROOT_PORT, regs.EXP_TYPE_DOWNSTREAM)
    has_slot = is_port and slot_number is not None
    flags = 2 | (ptype << 4) | (regs.EXP_FLAGS_SLOT if has_slot else 0)
    img.put(o + regs.EXP_FLAGS, 2, flags)
    devcap = 0x1 | 0x8000  # MPS 256 supported; Role-Based Error Reporting
    if spec.flr:
        devcap |= regs.EXP_DEVCAP_FLR
    img.put(o + regs.EXP_DEVCAP, 4, devcap)
    # Bit 15 (Bridge Config Retry / Initiate FLR) is an action the sim handles; reads 0.
    img.put(o + regs.EXP_DEVCTL, 2, DEVCTL_DEFAULT, 0x7FFF)
    img.put(o + regs.EXP_DEVSTA, 2, 0, 0, 0x000F)
    width = 16
    lnkcap = spec.link_speed | (width << 4) | 0xC00 | (port_number << 24)
    if is_port:
        lnkcap |= regs.EXP_LNKCAP_DLLLARC
    if ptype != regs.EXP_TYPE_RC_END:
        img.put(o + regs.EXP_LNKCAP, 4, lnkcap)
        img.put(o + regs.EXP_LNKCTL, 2, 0, 0x0FDB)  # ASPM, RCB, LD, CCC, ES, ... (retrain is an action)
        lnksta = spec.link_speed | (width << 4) | (regs.EXP_LNKSTA_DLLLA if is_port else 0)
        img.put(o + regs.EXP_LNKSTA, 2, lnksta, 0, 0xC000)
    if has_slot:
        assert slot_number is not None
        sltcap = (slot_number << 19) | (regs.EXP_SLTCAP_HPC | 0x20 | 0x1F if slot_hotplug else 0)
        img.put(o + regs.EXP_SLTCAP, 4, sltcap)
        img.put(o + regs.EXP_SLTCTL, 2, 0x03C0 if slot_hotplug else 0, 0x1FFF)
        img.put(o + regs.EXP_SLTSTA, 2, 0x0040 if slot_hotplug else 0, 0, 0x011F)  # presence detect
    if ptype == regs.EXP_TYPE_ROOT_PORT:
        img.put(o + regs.EXP_RTCTL, 2, 0, 0x001F)
        img.put(o + regs.EXP_RTSTA, 4, 0, 0, 0x00010000)
    devcap2 = 0x1F  # completion timeout ranges A-D + disable
    if spec.ltr:
        devcap2 |= 0x800  # PCI_EXP_DEVCAP2_LTR
    if ptype in (regs.EXP_TYPE_DOWNSTREAM, regs.EXP_TYPE_ROOT_PORT):
        devcap2 |= 0x20  # PCI_EXP_DEVCAP2_ARI (forwarding)
    img.put(o + regs.EXP_DEVCAP2, 4, devcap2)
    img.put(o + regs.EXP_DEVCTL2, 2, 0, 0x07FF)
    if ptype != regs.EXP_TYPE_RC_END:
        img.put(o + regs.EXP_LNKCAP2, 4, sum(1 << s for s in range(1, spec.link_speed + 1)))
        img.put(o + regs.EXP_LNKCTL2, 2, spec.link_speed, 0xFFFF)
