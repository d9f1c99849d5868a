"""
Decoding PCI configuration space.

Pure code, no I/O: :func:`parse_config` takes whatever bytes a read returned
(64 bytes unprivileged, 256 for conventional functions, 4096 for PCIe ones as
root, or garbage) and returns a :class:`ConfigSpace`. It never raises: a
function that is absent or still answering Configuration Request Retry Status
decodes as not ``present``, and broken capability chains (a pointer into the
header, a loop, a read past the end) end the walk with a note in ``problems``.
That matters because the daemon rescans devices right after a reset, exactly
when they are most likely to return nonsense.

The walk rules follow ``__pci_find_next_cap_ttl`` (at most 48 standard
capabilities, pointers below 0x40 end the list, low two bits ignored) and
``pci_find_next_ext_capability`` (at most (4096-256)/8 headers, a zero or
all-ones header ends the list, a ``next`` below 0x100 ends it) in
``drivers/pci/pci.c``; the list starts where ``__pci_bus_find_cap_start``
says (0x34, or 0x14 for CardBus; no list for other header types). The
extended list is walked whenever the bytes reach past 0x100, as the kernel
does whenever ``dev->cfg_size`` is 4096 (host bridges included).

Two deliberate departures, each noted in ``problems``: a Status register
reading 0xffff is taken as a failed read and its list is not walked, and a
list cut short by a short read (an unprivileged 64-byte read) says so
instead of looking like "no capabilities".

tests/test_lspci_oracle.py checks all of this against lspci (pciutils) on
real, simulated, hand-made and random config spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from qreset.pci import regs

#: At most this many standard capabilities (``__pci_find_next_cap_ttl``: PCI_FIND_CAP_TTL = 48).
CAP_TTL = 48
#: At most this many extended capability headers (``pci_find_next_ext_capability``:
#: ttl = (PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE) / 8).
EXT_CAP_TTL = (regs.CFG_SPACE_EXP_SIZE - regs.CFG_SPACE_SIZE) // 8
# CardBus header (pci_regs.h): capability pointer, subsystem IDs.
_CB_CAPABILITY_LIST = 0x14
_CB_SUBSYSTEM_VENDOR_ID = 0x40
_CB_SUBSYSTEM_ID = 0x42


def u8(data: bytes, off: int) -> int:
    """Byte at ``off``, or 0xff past the end (what a master abort reads as)."""
    return data[off] if 0 <= off < len(data) else 0xFF


def u16(data: bytes, off: int) -> int:
    """Little-endian word at ``off``, 0xffff when not fully inside ``data``."""
    if off >= 0 and off + 2 <= len(data):
        return data[off] | (data[off + 1] << 8)
    return 0xFFFF


def u32(data: bytes, off: int) -> int:
    """Little-endian dword at ``off``, 0xffffffff when not fully inside ``data``."""
    if off >= 0 and off + 4 <= len(data):
        return int.from_bytes(data[off:off + 4], "little")
    return 0xFFFFFFFF


def present(data: bytes) -> bool:
    """Whether ``data`` is a responding function (not all-ones, zero, or CRS).

    All-ones is judged on the Command/Status dword, as ``pci_dev_wait`` does
    without CRS Software Visibility (drivers/pci/pci.c), not on Vendor ID: a
    VF's Vendor and Device ID read FFFFh in hardware (SR-IOV r1.1 sec
    3.4.1.1/3.4.1.2) while the rest of its header answers.
    """
    return u16(data, regs.VENDOR_ID) not in (0x0000, regs.CRS_VENDOR_ID) \
        and u32(data, regs.COMMAND) != 0xFFFFFFFF


class Capability(NamedTuple):
    """A standard capability: its ID and where its header sits.

    NamedTuples (here and below), not dataclasses: the rescan diff walks
    every changed function's lists while the guest is parked, and a frozen
    dataclass costs several times as much to build.
    """

    id: int
    offset: int


class ExtCapability(NamedTuple):
    """A PCIe extended capability: ID, header offset and capability version."""

    id: int
    offset: int
    version: int


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """Decoded configuration space. ``raw`` is the input, unchanged."""

    raw: bytes
    vendor_id: int
    device_id: int
    command: int
    status: int
    revision: int
    class_code: int
    cache_line_size: int
    latency_timer: int
    header_type: int
    multifunction: bool
    bars: tuple[int, ...]
    subsystem_vendor: int | None
    subsystem_id: int | None
    interrupt_line: int
    interrupt_pin: int
    primary_bus: int | None
    secondary_bus: int | None
    subordinate_bus: int | None
    bridge_control: int | None
    capabilities: tuple[Capability, ...]
    ext_capabilities: tuple[ExtCapability, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def present(self) -> bool:
        """False for all-ones / all-zero reads and CRS (Vendor ID 0x0001); see :func:`present`."""
        return present(self.raw)

    @property
    def is_bridge(self) -> bool:
        return self.header_type == regs.HEADER_TYPE_BRIDGE

    def find_cap(self, cap_id: int) -> Capability | None:
        for cap in self.capabilities:
            if cap.id == cap_id:
                return cap
        return None

    def find_ext_cap(self, cap_id: int) -> ExtCapability | None:
        for cap in self.ext_capabilities:
            if cap.id == cap_id:
                return cap
        return None

    # -- PCIe capability fields the reset logic needs --------------------

    @property
    def pcie_type(self) -> int | None:
        """Device/Port Type from PCIe Capabilities (``PCI_EXP_FLAGS_TYPE``), or None."""
        cap = self.find_cap(regs.CAP_ID_EXP)
        if cap is None:
            return None
        return (u16(self.raw, cap.offset + regs.EXP_FLAGS) & regs.EXP_FLAGS_TYPE) >> 4

    @property
    def has_flr(self) -> bool:
        """DevCap FLR bit (``pcie_has_flr()`` in drivers/pci/pci.c)."""
        cap = self.find_cap(regs.CAP_ID_EXP)
        return cap is not None and bool(
            u32(self.raw, cap.offset + regs.EXP_DEVCAP) & regs.EXP_DEVCAP_FLR
        ) and u32(self.raw, cap.offset + regs.EXP_DEVCAP) != 0xFFFFFFFF

    @property
    def has_af_flr(self) -> bool:
        """AF capability with TP and FLR (``pci_af_flr()`` probe)."""
        cap = self.find_cap(regs.CAP_ID_AF)
        if cap is None:
            return False
        af = u8(self.raw, cap.offset + regs.AF_CAP)
        return af != 0xFF and bool(af & regs.AF_CAP_TP) and bool(af & regs.AF_CAP_FLR)

    @property
    def has_pm_reset(self) -> bool:
        """PM capability without No_Soft_Reset (``pci_pm_reset()`` probe)."""
        cap = self.find_cap(regs.CAP_ID_PM)
        if cap is None:
            return False
        ctrl = u16(self.raw, cap.offset + regs.PM_CTRL)
        return ctrl != 0xFFFF and not ctrl & regs.PM_CTRL_NO_SOFT_RESET


def _cap_start(htype: int) -> int | None:
    """Where the first capability pointer lives (``__pci_bus_find_cap_start``).

    0x34 for type 0 and type 1 headers, 0x14 for CardBus bridges, and no
    capability list at all for any other header type.
    """
    if htype in (regs.HEADER_TYPE_NORMAL, regs.HEADER_TYPE_BRIDGE):
        return regs.CAPABILITY_LIST
    if htype == regs.HEADER_TYPE_CARDBUS:
        return _CB_CAPABILITY_LIST
    return None


class CapabilityWalk(NamedTuple):
    """Both capability lists of one config space, as the kernel would walk them.

    ``read`` holds the dword offsets the walk looked at (Status, Header Type,
    the list pointer, every header visited): the result is a function of
    those bytes alone, so a caller holding two copies that agree on them
    knows both walk the same without walking the second (:mod:`qreset.diff`).
    """

    capabilities: tuple[Capability, ...]
    ext_capabilities: tuple[ExtCapability, ...]
    problems: tuple[str, ...]
    read: frozenset[int]


def walk_capabilities(data: bytes) -> CapabilityWalk:
    """Walk the standard and extended capability lists of ``data``; never raises.

    The one walker of the package (parse_config and the rescan diff both use
    it): the rules and their departures are in the module docstring. It
    walks whatever it is given; judging whether the function answers at all
    is :func:`present`'s job.
    """
    problems: list[str] = []
    read: set[int] = {regs.STATUS & ~3, regs.HEADER_TYPE & ~3}
    htype = u8(data, regs.HEADER_TYPE) & regs.HEADER_TYPE_MASK
    caps = _walk_caps(data, htype, problems, read)
    ext = _walk_ext_caps(data, problems, read)
    return CapabilityWalk(caps, ext, tuple(problems), frozenset(read))


def _walk_caps(data: bytes, htype: int, problems: list[str], read: set[int]) -> tuple[Capability, ...]:
    n = len(data)
    status = u16(data, regs.STATUS)
    if status == 0xFFFF and n >= regs.STATUS + 2:
        # The kernel would walk (the Cap List bit is set), but a real Status
        # register has reserved bits that read 0: all-ones is a failed read,
        # and a list walked out of it would invent reset capabilities.
        problems.append("status reads 0xffff: capability list not walked")
        return ()
    if not status & regs.STATUS_CAP_LIST:
        return ()
    start = _cap_start(htype)
    if start is None or n <= start:
        return ()
    read.add(start & ~3)
    caps: list[Capability] = []
    seen: set[int] = set()
    pos = u8(data, start)
    for _ in range(CAP_TTL):
        if pos < 0x40:
            # The kernel ends the list here too; zero is the normal end, any
            # other value below 0x40 is a pointer into the header.
            if pos:
                problems.append(f"capability pointer {pos:#x} points into the header")
            break
        pos &= ~3
        read.add(pos)
        if pos + 2 > n:
            if n >= regs.CFG_SPACE_SIZE:
                problems.append(f"capability pointer {pos:#x} is past the end")
            else:
                # An unprivileged read stops at 64 bytes: the list is there but
                # unread, which is not the same as "no capabilities".
                problems.append(
                    f"capability at {pos:#x} not read (only {n} bytes of config space)"
                )
            break
        if pos in seen:
            problems.append(f"capability list loops back to {pos:#x}")
            break
        seen.add(pos)
        cap_id = data[pos]
        if cap_id == 0xFF:
            break
        caps.append(Capability(cap_id, pos))
        pos = data[pos + 1]
    else:
        # The TTL ran out; only a problem if the last entry points on.
        if pos >= 0x40:
            problems.append(f"capability list longer than {CAP_TTL} entries")
    return tuple(caps)


def _walk_ext_caps(data: bytes, problems: list[str], read: set[int]) -> tuple[ExtCapability, ...]:
    n = len(data)
    if n < regs.EXT_CAP_START + 4:
        return ()
    caps: list[ExtCapability] = []
    seen: set[int] = set()
    pos = regs.EXT_CAP_START
    for _ in range(EXT_CAP_TTL):
        read.add(pos)
        # pos + 4 <= n holds here (checked above and before each move).
        header = int.from_bytes(data[pos:pos + 4], "little")
        # A zero or all-ones header means no (more) extended capabilities.
        if header in (0, 0xFFFFFFFF):
            break
        if pos in seen:
            problems.append(f"extended capability list loops back to {pos:#x}")
            break
        seen.add(pos)
        caps.append(ExtCapability(header & 0xFFFF, pos, (header >> 16) & 0xF))
        nxt = (header >> 20) & 0xFFC
        if nxt == 0:
            break
        if nxt < regs.EXT_CAP_START:
            problems.append(f"extended capability at {pos:#x} points into the header ({nxt:#x})")
            break
        if nxt + 4 > n:
            problems.append(f"extended capability pointer {nxt:#x} is past the end")
            break
        pos = nxt
    else:
        problems.append(f"extended capability list longer than {EXT_CAP_TTL} entries")
    return tuple(caps)


def parse_config(data: bytes) -> ConfigSpace:
    """Decode ``data``; never raises (see the module docstring)."""
    data = bytes(data)
    problems: list[str] = []
    if len(data) < regs.CFG_SPACE_UNPRIV_SIZE:
        problems.append(f"only {len(data)} bytes of config space")
    vendor = u16(data, regs.VENDOR_ID)
    hdr = u8(data, regs.HEADER_TYPE)
    htype = hdr & regs.HEADER_TYPE_MASK
    is_bridge = htype == regs.HEADER_TYPE_BRIDGE
    is_cardbus = htype == regs.HEADER_TYPE_CARDBUS
    # pci_setup_device: 6 BARs (type 0), 2 (type 1), 1 (CardBus: socket registers).
    nbars = 2 if is_bridge else (1 if is_cardbus else 6)
    bars = tuple(u32(data, regs.BASE_ADDRESS_0 + 4 * i) for i in range(nbars))
    if present(data):
        walk = walk_capabilities(data)
        caps, ext = walk.capabilities, walk.ext_capabilities
        problems += walk.problems
    else:
        caps, ext = (), ()
    return ConfigSpace(
        raw=data,
        vendor_id=vendor,
        device_id=u16(data, regs.DEVICE_ID),
        command=u16(data, regs.COMMAND),
        status=u16(data, regs.STATUS),
        revision=u8(data, regs.REVISION_ID),
        class_code=u32(data, regs.CLASS_REVISION) >> 8,
        cache_line_size=u8(data, regs.CACHE_LINE_SIZE),
        latency_timer=u8(data, regs.LATENCY_TIMER),
        header_type=htype,
        multifunction=bool(hdr & regs.HEADER_TYPE_MFD) and hdr != 0xFF,
        bars=bars,
        subsystem_vendor=None if is_bridge else u16(
            data, _CB_SUBSYSTEM_VENDOR_ID if is_cardbus else regs.SUBSYSTEM_VENDOR_ID
        ),
        subsystem_id=None if is_bridge else u16(data, _CB_SUBSYSTEM_ID if is_cardbus else regs.SUBSYSTEM_ID),
        interrupt_line=u8(data, regs.INTERRUPT_LINE),
        interrupt_pin=u8(data, regs.INTERRUPT_PIN),
        primary_bus=u8(data, regs.PRIMARY_BUS) if is_bridge else None,
        secondary_bus=u8(data, regs.SECONDARY_BUS) if is_bridge else None,
        subordinate_bus=u8(data, regs.SUBORDINATE_BUS) if is_bridge else None,
        bridge_control=u16(data, regs.BRIDGE_CONTROL) if is_bridge else None,
        capabilities=caps,
        ext_capabilities=ext,
        problems=tuple(problems),
    )
