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
and cached (:func:`register_map`). The registers themselves (names, widths,
read-only bits, restore order) are tables in :mod:`qreset.diff_tables`; this
module is the algorithm: layout, offset map, per-dword classification.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from qreset.diff_tables import (
    EXT_PARAM_AT,
    CapKey,
    Layout,
    Register,
    RegKind,
    cap_param,
    ext_param,
    registers_of,
)
from qreset.pci import regs
from qreset.pci.cfgspace import present, u16, walk_capabilities
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
    # The parameters live in the capability's first dword (standard) or in
    # the dwords EXT_PARAM_AT names (extended): the walk must count them as read.
    caps = tuple([(cid, pos, cap_param(raw, cid, pos)) for cid, pos in walk.capabilities])
    ext = tuple([(cid, pos, ver << 8 | ext_param(raw, cid, pos)) for cid, pos, ver in walk.ext_capabilities])
    extra = {pos + EXT_PARAM_AT[cid] for cid, pos, _ in ext if cid in EXT_PARAM_AT}
    return (n, htype, caps, ext), walk.read | extra if extra else walk.read


def layout_of(raw: bytes) -> Layout:
    """The capability layout of ``raw``: :func:`qreset.pci.cfgspace.walk_capabilities`
    (the kernel's walk rules) plus each capability's register-set parameter."""
    return _walk(bytes(raw))[0]


@functools.lru_cache(maxsize=512)
def register_map(layout: Layout) -> dict[int, tuple[Register, ...]]:
    """dword offset → the registers inside that dword, for one layout (cached)."""
    return {off: tuple(e[0] for e in entries) for off, (entries, _) in _dword_map(layout).items()}


#: One register inside its dword: (register, bit shift, value mask).
_Entry = tuple[Register, int, int]


@functools.lru_cache(maxsize=512)
def _dword_map(layout: Layout) -> dict[int, tuple[tuple[_Entry, ...], int]]:
    """dword offset → (its registers with shift/mask, mask of the bytes they cover)."""
    size = layout[0]
    table: dict[int, list[Register]] = {}
    for reg in registers_of(layout):
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
