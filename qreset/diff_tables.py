"""
The register tables of the rescan diff: every config-space register qreset can describe.

Pure data and the small functions that lay it out, no algorithm: for one
capability *layout* (header type, and each capability with the read-only
field that changes its register set), :func:`registers_of` lists every
register with its name, offset, width, what a difference in it means
(:class:`RegKind`) and, for writable ones, where :mod:`qreset.restore` puts it
in ``pci_restore_state``'s order (:class:`Group`, ``seq``). :mod:`qreset.diff`
turns the list into its offset map and classifies differences with it.

Register names, widths and which bits are read-only come from
``include/uapi/linux/pci_regs.h`` and the PCIe Base Spec r6.0 chapter 7; the
restore order follows ``pci_restore_state`` in ``drivers/pci/pci.c``. This
module is a table, so it is long on purpose.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qreset.pci import regs
from qreset.pci.cfgspace import u16, u32

__all__ = [
    "EXT_PARAM_AT", "CapKey", "Group", "Layout", "RegKind", "Register", "cap_param", "cap_registers",
    "ext_param", "ext_registers", "header_registers", "registers_of",
]


class RegKind(enum.StrEnum):
    """What a difference in one register means."""

    STATE = "state"        # writable configuration: restorable
    IDENTITY = "identity"  # read-only description of the function: it changed
    VOLATILE = "volatile"  # status bits, RW1C, self-clearing: moves on its own
    OTHER = "other"        # not described here (vendor-specific, reserved)


class Group(enum.IntEnum):
    """Restore order, after ``pci_restore_state`` in drivers/pci/pci.c (Linux 6.18).

    PM comes first because ``pci_power_up`` (D0) precedes ``pci_restore_state``
    in the kernel's reset paths; registers the kernel does not restore but
    that are writable (ARI control...) come last.
    """

    PM = 0
    LTR = 1      # pci_restore_pcie_state -> pci_restore_ltr_state (before DEVCTL2's LTR enable)
    L1SS = 2     # pci_restore_aspm_l1ss_state
    PCIE = 3     # DEVCTL, LNKCTL, SLTCTL, RTCTL, DEVCTL2, LNKCTL2, SLTCTL2
    PASID = 4
    PRI = 5
    ATS = 6
    VC = 7
    REBAR = 8
    DPC = 9
    PTM = 10
    TPH = 11
    AER = 12     # pci_restore_aer_state
    HEADER = 13  # pci_restore_config_space
    PCIX = 14
    MSI = 15     # pci_restore_msi_state (MSI and MSI-X)
    ACS = 16     # pci_enable_acs
    IOV = 17     # pci_restore_iov_state
    LAST = 18


@dataclass(frozen=True, slots=True)
class Register:
    """One register inside one dword of config space.

    ``ignore`` are bits that move on their own inside a writable register
    (RW1C status, self-clearing commands); ``ident`` are read-only bits
    inside a writable register, whose change means a different function.
    ``bar`` marks a Base Address Register, whose read-only low bits depend
    on its type (PCI 3.0 sec 6.2.5.1: bit 0 I/O; memory BARs bits 1-3).
    ``retry`` is ``pci_restore_config_dword``'s retry count (10 for BARs).
    """

    name: str
    offset: int
    size: int
    kind: RegKind
    group: Group = Group.LAST
    seq: int = 0
    ignore: int = 0
    ident: int = 0
    bar: bool = False
    retry: int = 0


S = RegKind.STATE
ID = RegKind.IDENTITY
V = RegKind.VOLATILE

# -- the standard header -----------------------------------------------------

# pci_restore_config_space (drivers/pci/pci.c, Linux 6.18): the dword ranges
# written, in order, each walked from the highest dword down.
#   type 0: 10..15, then BARs 4..9 with retry 10, then 0..3
#   type 1: 12..15, 9..11 (forced on Intel S3), 0..8
#   other:  0..15
_HEADER_ORDER: dict[int, tuple[tuple[int, int], ...]] = {
    regs.HEADER_TYPE_NORMAL: ((10, 15), (4, 9), (0, 3)),
    regs.HEADER_TYPE_BRIDGE: ((12, 15), (9, 11), (0, 8)),
}


def _header_seq(htype: int, offset: int) -> int:
    order = _HEADER_ORDER.get(htype, ((0, 15),))
    rank = 0
    for lo, hi in order:
        for index in range(hi, lo - 1, -1):
            if index == offset // 4:
                return rank * 4 + (offset & 3)
            rank += 1
    return 64 + offset


def _common_header() -> list[tuple[str, int, int, RegKind]]:
    return [
        ("Vendor ID", regs.VENDOR_ID, 2, ID),
        ("Device ID", regs.DEVICE_ID, 2, ID),
        ("Command", regs.COMMAND, 2, S),
        ("Status", regs.STATUS, 2, V),
        ("Revision ID", regs.REVISION_ID, 1, ID),
        ("Class Code", regs.CLASS_PROG, 3, ID),
        ("Cache Line Size", regs.CACHE_LINE_SIZE, 1, S),
        ("Latency Timer", regs.LATENCY_TIMER, 1, S),
        ("Header Type", regs.HEADER_TYPE, 1, ID),
        ("BIST", regs.BIST, 1, V),
    ]


def header_registers(htype: int) -> list[Register]:
    """The registers of the type 0, type 1 or (common part only) other header."""
    spec = _common_header()
    bars: list[int] = []
    if htype == regs.HEADER_TYPE_NORMAL:
        bars = [regs.BASE_ADDRESS_0 + 4 * i for i in range(6)]
        spec += [
            ("CardBus CIS Pointer", regs.CARDBUS_CIS, 4, ID),
            ("Subsystem Vendor ID", regs.SUBSYSTEM_VENDOR_ID, 2, ID),
            ("Subsystem ID", regs.SUBSYSTEM_ID, 2, ID),
            ("Expansion ROM", regs.ROM_ADDRESS, 4, S),
            ("Capabilities Pointer", regs.CAPABILITY_LIST, 1, ID),
            ("Interrupt Line", regs.INTERRUPT_LINE, 1, S),
            ("Interrupt Pin", regs.INTERRUPT_PIN, 1, ID),
            ("Min_Gnt", regs.MIN_GNT, 1, ID),
            ("Max_Lat", regs.MAX_LAT, 1, ID),
        ]
    elif htype == regs.HEADER_TYPE_BRIDGE:
        bars = [regs.BASE_ADDRESS_0, regs.BASE_ADDRESS_0 + 4]
        spec += [
            ("Primary Bus", regs.PRIMARY_BUS, 1, S),
            ("Secondary Bus", regs.SECONDARY_BUS, 1, S),
            ("Subordinate Bus", regs.SUBORDINATE_BUS, 1, S),
            ("Secondary Latency Timer", regs.SEC_LATENCY_TIMER, 1, S),
            ("Secondary Status", regs.SEC_STATUS, 2, V),
            ("Prefetchable Base Upper 32", regs.PREF_BASE_UPPER32, 4, S),
            ("Prefetchable Limit Upper 32", regs.PREF_LIMIT_UPPER32, 4, S),
            ("I/O Base Upper 16", regs.IO_BASE_UPPER16, 2, S),
            ("I/O Limit Upper 16", regs.IO_LIMIT_UPPER16, 2, S),
            ("Capabilities Pointer", regs.CAPABILITY_LIST, 1, ID),
            ("Expansion ROM", regs.ROM_ADDRESS1, 4, S),
            ("Interrupt Line", regs.INTERRUPT_LINE, 1, S),
            ("Interrupt Pin", regs.INTERRUPT_PIN, 1, ID),
            ("Bridge Control", regs.BRIDGE_CONTROL, 2, S),
        ]
    out = [
        Register(name, off, size, kind, Group.HEADER, _header_seq(htype, off))
        for name, off, size, kind in spec
    ]
    out += [
        Register(f"BAR {i}", off, 4, S, Group.HEADER, _header_seq(htype, off), bar=True, retry=10
                 if htype == regs.HEADER_TYPE_NORMAL else 0)
        for i, off in enumerate(bars)
    ]
    if htype == regs.HEADER_TYPE_BRIDGE:
        # Window registers: the low nibble of I/O base/limit says 16/32-bit
        # decode and of prefetchable base/limit 32/64-bit (PCI-to-PCI Bridge
        # spec 1.2 sec 3.2.5.6/3.2.5.10): read-only, so identity bits.
        for name, off, size, ident in (
            ("I/O Base", regs.IO_BASE, 1, 0x0F),
            ("I/O Limit", regs.IO_LIMIT, 1, 0x0F),
            ("Memory Base", regs.MEMORY_BASE, 2, 0x000F),
            ("Memory Limit", regs.MEMORY_LIMIT, 2, 0x000F),
            ("Prefetchable Memory Base", regs.PREF_MEMORY_BASE, 2, 0x000F),
            ("Prefetchable Memory Limit", regs.PREF_MEMORY_LIMIT, 2, 0x000F),
        ):
            out.append(Register(name, off, size, S, Group.HEADER, _header_seq(htype, off), ident=ident))
    return out


# -- capability layouts --------------------------------------------------------

#: (id, offset, parameter) of one capability; the parameter is the read-only
#: field that changes the capability's register set (MSI 64-bit/mask bits,
#: PCIe version and type, VC count, resizable BAR count).
CapKey = tuple[int, int, int]
#: (config size, header type, standard caps, extended caps): everything the
#: register map depends on. Two config spaces with the same layout share one map.
Layout = tuple[int, int, tuple[CapKey, ...], tuple[CapKey, ...]]


def cap_param(raw: bytes, cap_id: int, pos: int) -> int:
    """The register-set parameter of the standard capability ``cap_id`` at ``pos`` (0: none)."""
    if cap_id == regs.CAP_ID_MSI:
        return u16(raw, pos + regs.MSI_FLAGS) & (regs.MSI_FLAGS_64BIT | regs.MSI_FLAGS_MASKBIT)
    if cap_id == regs.CAP_ID_EXP:
        return u16(raw, pos + regs.EXP_FLAGS) & (regs.EXP_FLAGS_VERS | regs.EXP_FLAGS_TYPE)
    return 0


#: Extended capabilities whose register set depends on a field past their
#: header: the offset of that field (PCI_VC_PORT_CAP1, PCI_REBAR_CTRL).
EXT_PARAM_AT = {regs.EXT_CAP_ID_VC: 4, regs.EXT_CAP_ID_REBAR: regs.REBAR_CTRL}


def ext_param(raw: bytes, cap_id: int, pos: int) -> int:
    """The register-set parameter of the extended capability ``cap_id`` at ``pos`` (0: none)."""
    if cap_id == regs.EXT_CAP_ID_VC:
        return u32(raw, pos + 4) & 0x7  # PCI_VC_PORT_CAP1 Extended VC Count
    if cap_id == regs.EXT_CAP_ID_REBAR:
        return (u32(raw, pos + regs.REBAR_CTRL) & regs.REBAR_CTRL_NBAR_MASK) >> regs.REBAR_CTRL_NBAR_SHIFT
    return 0


def cap_registers(cap_id: int, pos: int, param: int) -> list[Register]:
    """The registers of one standard capability at ``pos`` (pci_regs.h offsets)."""
    out: list[Register] = [Register(f"Cap {cap_id:#04x} header", pos, 2, ID)]

    def r(name: str, off: int, size: int, kind: RegKind, group: Group = Group.LAST,
          seq: int = 0, ignore: int = 0, ident: int = 0) -> None:
        out.append(Register(name, pos + off, size, kind, group, seq, ignore, ident))

    if cap_id == regs.CAP_ID_PM:
        r("PM Capabilities", regs.PM_PMC, 2, ID)
        # PMCSR: PowerState and PME_En are RW, PME_Status is RW1C, No_Soft_Reset RO.
        r("PM Control/Status", regs.PM_CTRL, 2, S, Group.PM, 0,
          ignore=regs.PM_CTRL_PME_STATUS, ident=regs.PM_CTRL_NO_SOFT_RESET)
        r("PM Bridge Extensions", 6, 1, ID)
        r("PM Data", 7, 1, V)
    elif cap_id == regs.CAP_ID_MSI:
        is64 = bool(param & regs.MSI_FLAGS_64BIT)
        mask = bool(param & regs.MSI_FLAGS_MASKBIT)
        # __pci_restore_msi_state writes the message, then the mask, then the
        # control word (enable) last.  Multiple Message Capable (bits 1-3),
        # 64-bit and per-vector masking capable are read-only.
        r("MSI Control", regs.MSI_FLAGS, 2, S, Group.MSI, 9, ident=0x018E)
        r("MSI Address", regs.MSI_ADDRESS_LO, 4, S, Group.MSI, 1)
        if is64:
            r("MSI Upper Address", regs.MSI_ADDRESS_HI, 4, S, Group.MSI, 2)
        data = regs.MSI_DATA_64 if is64 else regs.MSI_DATA_32
        r("MSI Data", data, 2, S, Group.MSI, 3)
        r("MSI Extended Data", data + 2, 2, S, Group.MSI, 4)
        if mask:
            m = regs.MSI_MASK_64 if is64 else regs.MSI_MASK_32
            r("MSI Mask", m, 4, S, Group.MSI, 5)
            r("MSI Pending", m + 4, 4, V)
    elif cap_id == regs.CAP_ID_MSIX:
        r("MSI-X Control", regs.MSIX_FLAGS, 2, S, Group.MSI, 9, ident=regs.MSIX_FLAGS_QSIZE)
        r("MSI-X Table Offset/BIR", regs.MSIX_TABLE, 4, ID)
        r("MSI-X PBA Offset/BIR", regs.MSIX_PBA, 4, ID)
    elif cap_id == regs.CAP_ID_EXP:
        version = param & regs.EXP_FLAGS_VERS
        r("PCIe Capabilities", regs.EXP_FLAGS, 2, ID)
        r("Device Capabilities", regs.EXP_DEVCAP, 4, ID)
        # Initiate FLR (bit 15) always reads 0.
        r("Device Control", regs.EXP_DEVCTL, 2, S, Group.PCIE, 0, ignore=regs.EXP_DEVCTL_BCR_FLR)
        r("Device Status", regs.EXP_DEVSTA, 2, V)
        r("Link Capabilities", regs.EXP_LNKCAP, 4, ID)
        # Retrain Link (bit 5) always reads 0 (PCIe r6.0 sec 7.5.3.7).
        r("Link Control", regs.EXP_LNKCTL, 2, S, Group.PCIE, 1, ignore=0x0020)
        r("Link Status", regs.EXP_LNKSTA, 2, V)
        r("Slot Capabilities", regs.EXP_SLTCAP, 4, ID)
        r("Slot Control", regs.EXP_SLTCTL, 2, S, Group.PCIE, 2)
        r("Slot Status", regs.EXP_SLTSTA, 2, V)
        r("Root Control", regs.EXP_RTCTL, 2, S, Group.PCIE, 3)
        r("Root Capabilities", regs.EXP_RTCAP, 2, ID)
        r("Root Status", regs.EXP_RTSTA, 4, V)
        if version >= 2:
            r("Device Capabilities 2", regs.EXP_DEVCAP2, 4, ID)
            r("Device Control 2", regs.EXP_DEVCTL2, 2, S, Group.PCIE, 4)
            r("Device Status 2", regs.EXP_DEVSTA2, 2, V)
            r("Link Capabilities 2", regs.EXP_LNKCAP2, 4, ID)
            r("Link Control 2", regs.EXP_LNKCTL2, 2, S, Group.PCIE, 5)
            r("Link Status 2", regs.EXP_LNKSTA2, 2, V)
            r("Slot Capabilities 2", regs.EXP_SLTCAP2, 4, ID)
            r("Slot Control 2", regs.EXP_SLTCTL2, 2, S, Group.PCIE, 6)
            r("Slot Status 2", regs.EXP_SLTSTA2, 2, V)
    elif cap_id == regs.CAP_ID_PCIX:
        r("PCI-X Command", 2, 2, S, Group.PCIX, 0)   # PCI_X_CMD
        r("PCI-X Status", 4, 4, V)                   # PCI_X_STATUS
    elif cap_id == regs.CAP_ID_AF:
        r("AF Capabilities", regs.AF_CAP, 1, ID)
        r("AF Control", regs.AF_CTRL, 1, V)          # Initiate FLR: write-only trigger
        r("AF Status", regs.AF_STATUS, 1, V)
    return out


def ext_registers(cap_id: int, pos: int, param: int) -> list[Register]:
    """The registers of one extended capability at ``pos`` (pci_regs.h offsets)."""
    out: list[Register] = [Register(f"ExtCap {cap_id:#06x} header", pos, 4, ID)]
    count = param & 0xFF

    def r(name: str, off: int, size: int, kind: RegKind, group: Group = Group.LAST,
          seq: int = 0, ignore: int = 0, ident: int = 0) -> None:
        out.append(Register(name, pos + off, size, kind, group, seq, ignore, ident))

    if cap_id == regs.EXT_CAP_ID_ERR:
        # pci_restore_aer_state: UNCOR_MASK, UNCOR_SEVER, COR_MASK, CAP, ROOT_COMMAND.
        r("AER Uncorrectable Status", regs.ERR_UNCOR_STATUS, 4, V)
        r("AER Uncorrectable Mask", regs.ERR_UNCOR_MASK, 4, S, Group.AER, 0)
        r("AER Uncorrectable Severity", regs.ERR_UNCOR_SEVER, 4, S, Group.AER, 1)
        r("AER Correctable Status", regs.ERR_COR_STATUS, 4, V)
        r("AER Correctable Mask", regs.ERR_COR_MASK, 4, S, Group.AER, 2)
        # First Error Pointer (bits 0-4) and the *_CAPABLE bits (5, 7, 9, 12) are RO/volatile.
        r("AER Capabilities and Control", regs.ERR_CAP, 4, S, Group.AER, 3, ignore=0x1F,
          ident=0x12A0)
        for i in range(4):
            r(f"AER Header Log {i}", 0x1C + 4 * i, 4, V)
        r("AER Root Error Command", regs.ERR_ROOT_COMMAND, 4, S, Group.AER, 4)
        r("AER Root Error Status", 0x30, 4, V)
        r("AER Error Source ID", 0x34, 4, V)
    elif cap_id == regs.EXT_CAP_ID_VC:
        r("VC Port Capabilities 1", 0x04, 4, ID)
        r("VC Port Capabilities 2", 0x08, 4, ID)
        r("VC Port Control", 0x0C, 2, S, Group.VC, 0)
        r("VC Port Status", 0x0E, 2, V)
        for i in range(count + 1):
            base = 0x10 + 12 * i
            r(f"VC{i} Resource Capabilities", base, 4, ID)
            r(f"VC{i} Resource Control", base + 4, 4, S, Group.VC, 1 + i)
            r(f"VC{i} Resource Status", base + 8, 4, V)
    elif cap_id == regs.EXT_CAP_ID_DSN:
        r("Serial Number Low", 0x04, 4, ID)
        r("Serial Number High", 0x08, 4, ID)
    elif cap_id == regs.EXT_CAP_ID_ACS:
        r("ACS Capabilities", regs.ACS_CAP, 2, ID)
        r("ACS Control", regs.ACS_CTRL, 2, S, Group.ACS, 0)
    elif cap_id == regs.EXT_CAP_ID_ARI:
        r("ARI Capabilities", 0x04, 2, ID)
        r("ARI Control", 0x06, 2, S, Group.LAST, 0)
    elif cap_id == regs.EXT_CAP_ID_ATS:
        r("ATS Capabilities", 0x04, 2, ID)
        r("ATS Control", 0x06, 2, S, Group.ATS, 0)
    elif cap_id == regs.EXT_CAP_ID_SRIOV:
        # sriov_restore_state (drivers/pci/iov.c): VF BARs, System Page Size,
        # NumVFs, then Control (VF Enable) last.
        r("SR-IOV Capabilities", regs.SRIOV_CAP, 4, ID)
        r("SR-IOV Control", regs.SRIOV_CTRL, 2, S, Group.IOV, 9)
        r("SR-IOV Status", regs.SRIOV_STATUS, 2, V)
        r("SR-IOV InitialVFs", regs.SRIOV_INITIAL_VF, 2, ID)
        r("SR-IOV TotalVFs", regs.SRIOV_TOTAL_VF, 2, ID)
        r("SR-IOV NumVFs", regs.SRIOV_NUM_VF, 2, S, Group.IOV, 8)
        r("SR-IOV Function Dependency Link", regs.SRIOV_FUNC_LINK, 2, ID)
        # First VF Offset / VF Stride follow NumVFs and ARI: derived, not identity.
        r("SR-IOV First VF Offset", regs.SRIOV_VF_OFFSET, 2, V)
        r("SR-IOV VF Stride", regs.SRIOV_VF_STRIDE, 2, V)
        r("SR-IOV VF Device ID", regs.SRIOV_VF_DID, 2, ID)
        r("SR-IOV Supported Page Sizes", regs.SRIOV_SUP_PGSIZE, 4, ID)
        r("SR-IOV System Page Size", regs.SRIOV_SYS_PGSIZE, 4, S, Group.IOV, 7)
        for i in range(6):
            r(f"SR-IOV VF BAR {i}", regs.SRIOV_BAR + 4 * i, 4, S, Group.IOV, i)
        r("SR-IOV Migration State Array", 0x3C, 4, ID)
    elif cap_id == regs.EXT_CAP_ID_PRI:
        # pci_restore_pri_state: allocation first, then control (enable).
        r("PRI Control", 0x04, 2, S, Group.PRI, 1)
        r("PRI Status", 0x06, 2, V)
        r("PRI Outstanding Capacity", 0x08, 4, ID)
        r("PRI Outstanding Allocation", 0x0C, 4, S, Group.PRI, 0)
    elif cap_id == regs.EXT_CAP_ID_REBAR:
        for i in range(max(count, 1)):
            r(f"Resizable BAR {i} Capability", regs.REBAR_CAP + 8 * i, 4, ID)
            # Only BAR Size (bits 8-13) is writable; index and count are RO.
            r(f"Resizable BAR {i} Control", regs.REBAR_CTRL + 8 * i, 4, S, Group.REBAR, i,
              ident=0xFFFFFFFF & ~0x3F00)
    elif cap_id == regs.EXT_CAP_ID_LTR:
        r("LTR Max Snoop Latency", regs.LTR_MAX_SNOOP_LAT, 2, S, Group.LTR, 0)
        r("LTR Max No-Snoop Latency", regs.LTR_MAX_NOSNOOP_LAT, 2, S, Group.LTR, 1)
    elif cap_id == regs.EXT_CAP_ID_L1SS:
        # pci_restore_aspm_l1ss_state writes CTL2 before CTL1.
        r("L1 PM Substates Capabilities", 0x04, 4, ID)
        r("L1 PM Substates Control 1", 0x08, 4, S, Group.L1SS, 1)
        r("L1 PM Substates Control 2", 0x0C, 4, S, Group.L1SS, 0)
    elif cap_id == regs.EXT_CAP_ID_PASID:
        r("PASID Capabilities", 0x04, 2, ID)
        r("PASID Control", 0x06, 2, S, Group.PASID, 0)
    elif cap_id == regs.EXT_CAP_ID_DPC:
        r("DPC Capabilities", 0x04, 2, ID)
        r("DPC Control", 0x06, 2, S, Group.DPC, 0)
        r("DPC Status", 0x08, 2, V)
        r("DPC Error Source ID", 0x0A, 2, V)
    elif cap_id == regs.EXT_CAP_ID_PTM:
        r("PTM Capabilities", 0x04, 4, ID)
        r("PTM Control", 0x08, 4, S, Group.PTM, 0)
    elif cap_id == regs.EXT_CAP_ID_TPH:
        r("TPH Requester Capabilities", 0x04, 4, ID)
        r("TPH Requester Control", 0x08, 4, S, Group.TPH, 0)
    return out


def registers_of(layout: Layout) -> list[Register]:
    """Every register of a config space with ``layout``: header, then each capability."""
    _size, htype, caps, ext = layout
    out = header_registers(htype)
    for cap_id, pos, param in caps:
        out += cap_registers(cap_id, pos, param)
    for cap_id, pos, param in ext:
        out += ext_registers(cap_id, pos, param)
    return out
