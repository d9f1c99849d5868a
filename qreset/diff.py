"""
Rescan diff: did a reset change a function's state, or the function itself?

Pure code, no I/O. :func:`diff_config` takes the config space (and the sysfs
``resource`` lines) saved before a reset and read again after it, and says:

``NONE``
    byte-identical (and same resources): the fast path, nothing is written.
    Also the verdict when only volatile or unclassified bytes differ.
``STATE``
    only writable registers differ (command, BARs, bridge windows, PCIe
    control registers, MSI/MSI-X control...): :mod:`qreset.restore` writes
    exactly those back.
``IDENTITY``
    the function came back as something else: vendor/device/revision/class/
    subsystem ids, header type, the capability layout, read-only capability
    fields, BAR sizes or flags. Nothing is ever written to it; the caller
    escalates (re-probe, device_del/device_add).
``ABSENT``
    it reads all-ones or still answers CRS after the readiness poll.

Every differing register is reported with its name, offset and both values.
Status registers (Status, Device/Link/Slot Status, AER status, PME status...)
are reported as ``volatile`` and do not count as a change: they move on their
own. Bytes no register here describes (vendor-specific capabilities,
reserved space) are reported as ``other`` and do not count either, because
we could neither restore them nor tell whether they moved on their own.

Speed matters (the guest is parked while this runs): an unchanged function
costs one ``bytes`` comparison; a changed one walks only the differing dwords,
looked up in an offset→register map that is built once per capability layout
and cached (:func:`register_map`). Register names, widths and which bits are
read-only come from ``include/uapi/linux/pci_regs.h`` and the PCIe Base Spec
r6.0 chapter 7; the restore order each register carries follows
``pci_restore_state`` in ``drivers/pci/pci.c`` (see :mod:`qreset.restore`).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from qreset.pci import regs
from qreset.pci.config import present, u16, u32, walk_capabilities
from qreset.pci.host import (
    IORESOURCE_IO,
    IORESOURCE_MEM,
    IORESOURCE_MEM_64,
    IORESOURCE_PREFETCH,
    Resource,
)

__all__ = [
    "Change",
    "Diff",
    "RegKind",
    "Register",
    "RegisterDiff",
    "diff_config",
    "layout_of",
    "present",
    "register_map",
]


class Change(enum.StrEnum):
    """What a reset did to one function (see the module docstring)."""

    NONE = "none"
    STATE = "state"
    IDENTITY = "identity"
    ABSENT = "absent"


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


class RegisterDiff(NamedTuple):
    """One differing register: where, both values, and what the difference means.

    A NamedTuple rather than a dataclass: a changed function makes a few dozen
    of these and construction cost shows in the per-function budget.
    """

    name: str
    offset: int
    size: int
    before: int
    after: int
    kind: RegKind
    register: Register | None = None

    def to_json(self) -> dict[str, Any]:
        width = self.size * 2
        return {
            "name": self.name,
            "offset": f"{self.offset:#05x}",
            "size": self.size,
            "before": f"{self.before:#0{width + 2}x}",
            "after": f"{self.after:#0{width + 2}x}",
            "kind": self.kind.value,
        }


@dataclass(frozen=True, slots=True)
class Diff:
    """The verdict for one function and every register behind it."""

    change: Change
    registers: tuple[RegisterDiff, ...] = ()
    reasons: tuple[str, ...] = field(default=())

    @property
    def state_registers(self) -> tuple[RegisterDiff, ...]:
        """The differing writable registers (what :mod:`qreset.restore` writes)."""
        return tuple(r for r in self.registers if r.kind is RegKind.STATE)

    @property
    def identity_registers(self) -> tuple[RegisterDiff, ...]:
        return tuple(r for r in self.registers if r.kind is RegKind.IDENTITY)

    def summary(self) -> str:
        """One line for logs and timelines."""
        if self.change is Change.NONE:
            extra = f" ({len(self.registers)} volatile/other)" if self.registers else ""
            return "unchanged" + extra
        if self.change is Change.ABSENT:
            return "absent: " + "; ".join(self.reasons)
        if self.change is Change.STATE:
            return "state: " + ", ".join(r.name for r in self.state_registers)
        names = [r.name for r in self.identity_registers] + list(self.reasons)
        return "identity: " + "; ".join(names)

    def to_json(self) -> dict[str, Any]:
        return {
            "change": self.change.value,
            "reasons": list(self.reasons),
            "registers": [r.to_json() for r in self.registers],
        }


NO_CHANGE = Diff(Change.NONE)

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


def _header_registers(htype: int) -> list[Register]:
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

def _cap_param(raw: bytes, cap_id: int, pos: int) -> int:
    if cap_id == regs.CAP_ID_MSI:
        return u16(raw, pos + regs.MSI_FLAGS) & (regs.MSI_FLAGS_64BIT | regs.MSI_FLAGS_MASKBIT)
    if cap_id == regs.CAP_ID_EXP:
        return u16(raw, pos + regs.EXP_FLAGS) & (regs.EXP_FLAGS_VERS | regs.EXP_FLAGS_TYPE)
    return 0


#: Extended capabilities whose register set depends on a field past their
#: header: the offset of that field (PCI_VC_PORT_CAP1, PCI_REBAR_CTRL).
_EXT_PARAM_AT = {regs.EXT_CAP_ID_VC: 4, regs.EXT_CAP_ID_REBAR: regs.REBAR_CTRL}


def _ext_param(raw: bytes, cap_id: int, pos: int) -> int:
    if cap_id == regs.EXT_CAP_ID_VC:
        return u32(raw, pos + 4) & 0x7  # PCI_VC_PORT_CAP1 Extended VC Count
    if cap_id == regs.EXT_CAP_ID_REBAR:
        return (u32(raw, pos + regs.REBAR_CTRL) & regs.REBAR_CTRL_NBAR_MASK) >> regs.REBAR_CTRL_NBAR_SHIFT
    return 0


@functools.lru_cache(maxsize=256)
def _walk(raw: bytes) -> tuple[Layout, frozenset[int]]:
    """The layout of ``raw`` and the dwords the walk read to find it.

    Cached by content: the saved ("before") config space of a function is
    diffed again and again, and ``bytes`` caches its hash. Knowing which
    dwords the walk read lets :func:`diff_config` skip walking the "after"
    copy when none of them changed (the walk is a function of those bytes only).
    """
    n = len(raw)
    htype = raw[regs.HEADER_TYPE] & regs.HEADER_TYPE_MASK if n > regs.HEADER_TYPE else 0xFF
    walk = walk_capabilities(raw)
    read = set(walk.read)
    # The parameters live in the capability's first dword (standard) or in
    # the dwords _EXT_PARAM_AT names (extended): the walk must count them as read.
    caps = tuple((c.id, c.offset, _cap_param(raw, c.id, c.offset)) for c in walk.capabilities)
    ext: list[CapKey] = []
    for c in walk.ext_capabilities:
        if c.id in _EXT_PARAM_AT:
            read.add(c.offset + _EXT_PARAM_AT[c.id])
        ext.append((c.id, c.offset, c.version << 8 | _ext_param(raw, c.id, c.offset)))
    return (n, htype, caps, tuple(ext)), frozenset(read)


def layout_of(raw: bytes) -> Layout:
    """The capability layout of ``raw``: :func:`qreset.pci.config.walk_capabilities`
    (the kernel's walk rules) plus each capability's register-set parameter."""
    return _walk(bytes(raw))[0]


def _cap_registers(cap_id: int, pos: int, param: int) -> list[Register]:
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


def _ext_registers(cap_id: int, pos: int, param: int) -> list[Register]:
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


@functools.lru_cache(maxsize=512)
def register_map(layout: Layout) -> dict[int, tuple[Register, ...]]:
    """dword offset → the registers inside that dword, for one layout (cached)."""
    return {off: tuple(e[0] for e in entries) for off, (entries, _) in _dword_map(layout).items()}


#: One register inside its dword: (register, bit shift, value mask).
_Entry = tuple[Register, int, int]


@functools.lru_cache(maxsize=512)
def _dword_map(layout: Layout) -> dict[int, tuple[tuple[_Entry, ...], int]]:
    """dword offset → (its registers with shift/mask, mask of the bytes they cover)."""
    size, htype, caps, ext = layout
    regs_list = _header_registers(htype)
    for cap_id, pos, param in caps:
        regs_list += _cap_registers(cap_id, pos, param)
    for cap_id, pos, param in ext:
        regs_list += _ext_registers(cap_id, pos, param)
    table: dict[int, list[Register]] = {}
    for reg in regs_list:
        if reg.offset + reg.size > size or reg.offset // 4 != (reg.offset + reg.size - 1) // 4:
            continue  # past the end (short read) or crossing a dword: not describable
        table.setdefault(reg.offset & ~3, []).append(reg)
    out: dict[int, tuple[tuple[_Entry, ...], int]] = {}
    for off, rs in table.items():
        entries: list[_Entry] = []
        covered = 0
        for reg in sorted(rs, key=lambda r: r.offset):
            shift = 8 * (reg.offset - off)
            mask = (1 << (8 * reg.size)) - 1
            covered |= mask << shift
            entries.append((reg, shift, mask))
        out[off] = (tuple(entries), covered)
    return out


# -- the diff itself -------------------------------------------------------------

def _differing_dwords(before: bytes, after: bytes) -> list[tuple[int, int, int]]:
    """(offset, before, after) of each differing dword: 256-byte chunks, then 32, then lanes.

    Slice comparisons are memcmp in C; a differing 32-byte block is turned
    into two integers once and split into its eight dword lanes with shifts,
    so the ~20 changed dwords of a 4 KiB space after a bus reset cost a few
    dozen comparisons and no per-dword slicing.
    """
    n = min(len(before), len(after))
    out: list[tuple[int, int, int]] = []
    for big in range(0, n, 256):
        if before[big:big + 256] == after[big:big + 256]:
            continue
        for mid in range(big, min(big + 256, n), 32):
            bb = before[mid:mid + 32]
            ab = after[mid:mid + 32]
            if bb == ab:
                continue
            ib = int.from_bytes(bb, "little")
            ia = int.from_bytes(ab, "little")
            x = ib ^ ia
            shift = 0
            while x:
                if x & 0xFFFFFFFF:
                    out.append((mid + shift // 8, (ib >> shift) & 0xFFFFFFFF, (ia >> shift) & 0xFFFFFFFF))
                x >>= 32
                shift += 32
    return out


def _classify(reg: Register, b: int, a: int) -> RegKind:
    if reg.kind is not S:
        return reg.kind
    x = b ^ a
    ident = reg.ident
    if reg.bar:
        # PCI 3.0 sec 6.2.5.1: bit 0 says I/O; I/O BARs have bit 1 reserved,
        # memory BARs have type (bits 1-2) and prefetchable (bit 3), all RO.
        ident |= 0x3 if b & regs.BASE_ADDRESS_SPACE_IO else 0xF
    if x & ident:
        return ID
    if x & ~reg.ignore:
        return S
    return V


_EMPTY: tuple[tuple[_Entry, ...], int] = ((), 0)


_RES_TYPE = IORESOURCE_IO | IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_MEM_64


def _resource_reasons(before: Sequence[Resource], after: Sequence[Resource]) -> list[str]:
    """BAR sizes or types that differ (sysfs ``resource``): identity reasons."""
    out: list[str] = []
    if len(before) != len(after):
        out.append(f"resource has {len(after)} lines, was {len(before)}")
    for i, (b, a) in enumerate(zip(before, after, strict=False)):
        if b.size != a.size:
            out.append(f"resource {i} size {b.size:#x} -> {a.size:#x}")
        elif b.flags & _RES_TYPE != a.flags & _RES_TYPE:
            out.append(f"resource {i} flags {b.flags:#x} -> {a.flags:#x}")
    return out


def _layout_reasons(lb: Layout, la: Layout) -> list[str]:
    out: list[str] = []
    if lb[1] != la[1]:
        out.append(f"header type {lb[1]:#x} -> {la[1]:#x}")
    if lb[2] != la[2]:
        out.append("capability list " + _caps_text(lb[2]) + " -> " + _caps_text(la[2]))
    if lb[3] != la[3]:
        out.append("extended capability list " + _caps_text(lb[3]) + " -> " + _caps_text(la[3]))
    return out


def _caps_text(caps: tuple[CapKey, ...]) -> str:
    return "[" + " ".join(f"{cid:#x}@{pos:#x}/{param:#x}" for cid, pos, param in caps) + "]"


def diff_config(
    before: bytes,
    after: bytes,
    before_resources: Sequence[Resource] = (),
    after_resources: Sequence[Resource] = (),
) -> Diff:
    """Classify what changed between ``before`` and ``after`` (see the module docstring)."""
    if before == after and tuple(before_resources) == tuple(after_resources):
        return NO_CHANGE
    if not present(after):
        vendor = u16(after, regs.VENDOR_ID)
        why = ("answers CRS (Vendor ID 0x0001)" if vendor == regs.CRS_VENDOR_ID
               else f"reads Vendor ID {vendor:#06x}")
        return Diff(Change.ABSENT, (), (why,))
    reasons: list[str] = []
    if len(before) != len(after):
        reasons.append(f"config space is {len(after)} bytes, was {len(before)}")
    reasons += _resource_reasons(before_resources, after_resources)
    lb, read = _walk(bytes(before))
    dwords = _differing_dwords(before, after)
    # The walk depends only on the dwords it read: if none changed, neither did the layout.
    changed_layout = len(before) != len(after) or any(off in read for off, _b, _a in dwords)
    la = _walk(bytes(after))[0] if changed_layout else lb
    if lb != la:
        reasons += _layout_reasons(lb, la)
    table = _dword_map(lb)
    out: list[RegisterDiff] = []
    for off, bd, ad in dwords:
        entries, covered = table.get(off, _EMPTY)
        for reg, shift, mask in entries:
            b = (bd >> shift) & mask
            a = (ad >> shift) & mask
            if b != a:
                out.append(RegisterDiff(reg.name, reg.offset, reg.size, b, a, _classify(reg, b, a), reg))
        if (bd ^ ad) & ~covered & 0xFFFFFFFF:
            out.append(RegisterDiff(f"config[{off:#05x}]", off, 4, bd, ad, RegKind.OTHER))
    kinds = {r.kind for r in out}
    if reasons or ID in kinds:
        change = Change.IDENTITY
    elif S in kinds:
        change = Change.STATE
    else:
        change = Change.NONE
    return Diff(change, tuple(out), tuple(reasons))
