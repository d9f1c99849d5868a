"""Rescan diff on hand-made config spaces: one test per register class."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qreset.diff import Change, RegKind, diff_config, layout_of, register_map
from qreset.pci import regs
from qreset.pci.cfgspace import parse_config
from qreset.pci.host import IORESOURCE_MEM, IORESOURCE_MEM_64, Resource
from qreset.restore import plan_writes
from tests.pcibuild import (
    ACS,
    AER,
    BASE,
    DSN,
    EXP,
    LTR,
    MSI,
    MSIX,
    PM,
    REBAR,
    RES,
    SRIOV,
    Cfg,
    changed,
    endpoint,
)


def test_identical_is_none_with_no_registers() -> None:
    d = diff_config(BASE, bytes(bytearray(BASE)), RES, RES)
    assert d.change is Change.NONE
    assert d.registers == ()


@pytest.mark.parametrize(("name", "edit"), [
    ("Command", (0x04, 2, 0)),
    ("BAR 0", (0x10, 4, 0)),
    ("BAR 1", (0x14, 4, 0x0000000C)),
    ("Cache Line Size", (0x0C, 1, 0)),
    ("Latency Timer", (0x0D, 1, 0x40)),
    ("Interrupt Line", (0x3C, 1, 0xFF)),
    ("Expansion ROM", (0x30, 4, 0xF7100001)),
    ("Device Control", (EXP + 8, 2, 0x2810)),
    ("Link Control", (EXP + 0x10, 2, 0)),
    ("Device Control 2", (EXP + 0x28, 2, 0)),
    ("MSI Control", (MSI + 2, 2, 0x0180)),
    ("MSI Address", (MSI + 4, 4, 0)),
    ("MSI Data", (MSI + 12, 2, 0)),
    ("MSI Mask", (MSI + 16, 4, 0xFFFFFFFF)),
    ("MSI-X Control", (MSIX + 2, 2, 0x0004)),
    ("PM Control/Status", (PM + 4, 2, 0x000B)),
    ("AER Uncorrectable Mask", (AER + regs.ERR_UNCOR_MASK, 4, 0)),
    ("AER Capabilities and Control", (AER + regs.ERR_CAP, 4, 0x000000A0 | 0x140)),
    ("LTR Max Snoop Latency", (LTR + 4, 2, 0)),
    ("ACS Control", (ACS + regs.ACS_CTRL, 2, 0)),
    ("SR-IOV Control", (SRIOV + regs.SRIOV_CTRL, 2, 0)),
    ("SR-IOV NumVFs", (SRIOV + regs.SRIOV_NUM_VF, 2, 0)),
    ("Resizable BAR 0 Control", (REBAR + regs.REBAR_CTRL, 4, 0x00000620)),
])
def test_writable_register_is_state(name: str, edit: tuple[int, int, int]) -> None:
    d = diff_config(BASE, changed(BASE, edit), RES, RES)
    assert d.change is Change.STATE, d.summary()
    [reg] = d.state_registers
    assert reg.name == name
    assert reg.offset == edit[0]
    assert reg.after == edit[2]
    assert reg.before == int.from_bytes(BASE[edit[0]:edit[0] + edit[1]], "little")


@pytest.mark.parametrize(("name", "edit"), [
    ("Vendor ID", (0x00, 2, 0x10EC)),
    ("Device ID", (0x02, 2, 0x1534)),
    ("Revision ID", (0x08, 1, 0x04)),
    ("Class Code", (0x09, 3, 0x020001)),
    ("Subsystem ID", (0x2E, 2, 0x0002)),
    ("Subsystem Vendor ID", (0x2C, 2, 0x1043)),
    ("CardBus CIS Pointer", (0x28, 4, 0x00000001)),
    ("Header Type", (0x0E, 1, 0x80)),                # multi-function bit, same layout
    ("Min_Gnt", (0x3E, 1, 0x01)),
    ("Max_Lat", (0x3F, 1, 0x01)),
    ("Interrupt Pin", (0x3D, 1, 0x02)),
    ("Device Capabilities", (EXP + 4, 4, 0x00008FC0)),
    ("Link Capabilities", (EXP + 0xC, 4, 0x00477C12)),
    ("MSI-X Table Offset/BIR", (MSIX + 4, 4, 0x2003)),
    ("Serial Number Low", (DSN + 4, 4, 0xCAFEF00D)),
    ("SR-IOV TotalVFs", (SRIOV + regs.SRIOV_TOTAL_VF, 2, 16)),
    ("SR-IOV VF Device ID", (SRIOV + regs.SRIOV_VF_DID, 2, 0x1521)),
    ("MSI-X Control", (MSIX + 2, 2, 0x8008)),       # table size is read-only
    ("PM Control/Status", (PM + 4, 2, 0x0000)),     # No_Soft_Reset is read-only
    ("BAR 1", (0x14, 4, 0xE0000004)),               # prefetchable flag is read-only
    ("BAR 3", (0x1C, 4, 0x0000E000)),               # I/O indicator is read-only
])
def test_read_only_register_is_identity(name: str, edit: tuple[int, int, int]) -> None:
    d = diff_config(BASE, changed(BASE, edit), RES, RES)
    assert d.change is Change.IDENTITY, d.summary()
    assert [r.name for r in d.identity_registers] == [name]


@pytest.mark.parametrize(("name", "edit"), [
    ("Status", (0x06, 2, regs.STATUS_CAP_LIST | 0x0008)),
    ("Device Status", (EXP + 0xA, 2, 0x0004)),
    ("Link Status", (EXP + 0x12, 2, 0x3011)),
    ("AER Uncorrectable Status", (AER + regs.ERR_UNCOR_STATUS, 4, 0x00004000)),
    ("AER Correctable Status", (AER + regs.ERR_COR_STATUS, 4, 0x1)),
    ("PM Control/Status", (PM + 4, 2, 0x8008)),      # PME_Status: RW1C
    ("MSI Pending", (MSI + 20, 4, 0x1)),
    ("SR-IOV Status", (SRIOV + regs.SRIOV_STATUS, 2, 1)),
])
def test_status_register_is_reported_but_no_change(name: str, edit: tuple[int, int, int]) -> None:
    d = diff_config(BASE, changed(BASE, edit), RES, RES)
    assert d.change is Change.NONE
    assert [(r.name, r.kind) for r in d.registers] == [(name, RegKind.VOLATILE)]


def test_unknown_bytes_are_other_and_no_change() -> None:
    d = diff_config(BASE, changed(BASE, (0x800, 4, 0x12345678)), RES, RES)
    assert d.change is Change.NONE
    [reg] = d.registers
    assert (reg.kind, reg.offset, reg.after) == (RegKind.OTHER, 0x800, 0x12345678)


def test_state_and_identity_together_is_identity() -> None:
    d = diff_config(BASE, changed(BASE, (0x04, 2, 0), (0x02, 2, 0x9999)), RES, RES)
    assert d.change is Change.IDENTITY
    assert {r.name for r in d.registers} == {"Command", "Device ID"}


def test_capability_layout_change_is_identity() -> None:
    # MSI-X dropped from the chain: PCIe's next pointer is 0 now.
    after = changed(BASE, (EXP + 1, 1, 0))
    d = diff_config(BASE, after, RES, RES)
    assert d.change is Change.IDENTITY
    assert any(r.startswith("capability list") for r in d.reasons)
    assert layout_of(after) != layout_of(BASE)


def test_extended_capability_version_change_is_identity() -> None:
    after = changed(BASE, (DSN, 4, regs.EXT_CAP_ID_DSN | 2 << 16 | LTR << 20))
    d = diff_config(BASE, after, RES, RES)
    assert d.change is Change.IDENTITY
    assert any(r.startswith("extended capability list") for r in d.reasons)


def test_msi_64bit_flag_change_is_identity() -> None:
    d = diff_config(BASE, changed(BASE, (MSI + 2, 2, 0x0101)), RES, RES)
    assert d.change is Change.IDENTITY


def test_bar_size_change_in_resource_is_identity() -> None:
    bigger = (Resource(0xF7000000, 0xF703FFFF, IORESOURCE_MEM), RES[1])
    d = diff_config(BASE, BASE, RES, bigger)
    assert d.change is Change.IDENTITY
    assert d.reasons == ("resource 0 size 0x20000 -> 0x40000",)


def test_bar_flags_change_in_resource_is_identity() -> None:
    nonpref = (RES[0], Resource(0xE0000000, 0xE00FFFFF, IORESOURCE_MEM | IORESOURCE_MEM_64))
    assert diff_config(BASE, BASE, RES, nonpref).change is Change.IDENTITY


def test_resource_start_move_alone_is_not_identity() -> None:
    moved = (Resource(0xF8000000, 0xF801FFFF, IORESOURCE_MEM), RES[1])
    assert diff_config(BASE, BASE, RES, moved).change is Change.NONE


@pytest.mark.parametrize(("after", "why"), [
    (b"\xff" * 4096, "0xffff"),
    (b"\x01\x00\x01\x00" + b"\x00" * 4092, "CRS"),
    (b"", "0xffff"),
])
def test_absent(after: bytes, why: str) -> None:
    d = diff_config(BASE, after, RES, RES)
    assert d.change is Change.ABSENT
    assert why in d.reasons[0]
    assert d.registers == ()


def test_bridge_windows_and_bus_numbers_are_state() -> None:
    base = endpoint(bridge=True)
    after = changed(base, (0x18, 4, 0), (0x20, 4, 0), (0x3E, 2, 0))
    d = diff_config(base, after)
    assert d.change is Change.STATE
    names = {r.name for r in d.state_registers}
    # Primary Bus was 0 before: not a difference, not reported.
    assert names == {"Secondary Bus", "Subordinate Bus", "Memory Base", "Memory Limit", "Bridge Control"}


@pytest.mark.parametrize(("name", "edit"), [
    ("Memory Base", (0x20, 2, 0xF701)),              # low nibble: read-only decode bits
    ("I/O Base", (0x1C, 1, 0x01)),                   # 16-bit -> 32-bit I/O decode
    ("Prefetchable Memory Limit", (0x26, 2, 0x0001)),  # 32-bit -> 64-bit prefetchable
    ("Interrupt Pin", (0x3D, 1, 0x02)),
])
def test_bridge_read_only_bits_are_identity(name: str, edit: tuple[int, int, int]) -> None:
    base = endpoint(bridge=True)
    d = diff_config(base, changed(base, edit))
    assert d.change is Change.IDENTITY, d.summary()
    assert [r.name for r in d.identity_registers] == [name]


def test_short_read_differs_in_size_is_identity() -> None:
    d = diff_config(BASE, BASE[:256], RES, RES)
    assert d.change is Change.IDENTITY
    assert "256 bytes" in d.reasons[0]


def test_register_map_is_cached_by_layout() -> None:
    lay = layout_of(BASE)
    assert register_map(lay) is register_map(lay)
    names = {r.name for rs in register_map(lay).values() for r in rs}
    assert {"Device Control", "MSI Upper Address", "SR-IOV NumVFs", "Serial Number High"} <= names


#: Registers the spec makes read-only (RO/HwInit: capability, ID, pointer and
#: offset registers): a change in any of them means a different function.
_READ_ONLY = re.compile(
    r"(Capabilities( [12])?|Capability|header|Pointer|Serial Number (Low|High)|InitialVFs|TotalVFs|"
    r"VF Device ID|Supported Page Sizes|Function Dependency Link|Offset/BIR|Migration State Array|"
    r"Outstanding Capacity|Bridge Extensions)$")


def _every_capability() -> bytes:
    """A root port carrying every capability the register map knows (contents zero)."""
    c = Cfg(header=regs.HEADER_TYPE_BRIDGE, class_code=0x060400).caps(
        [(regs.CAP_ID_PM, 0x40), (regs.CAP_ID_EXP, 0x50), (regs.CAP_ID_MSIX, 0x90), (regs.CAP_ID_AF, 0xA0),
         (regs.CAP_ID_PCIX, 0xB0)])
    c.w16(0x52, 0x0002 | regs.EXP_FLAGS_SLOT | regs.EXP_TYPE_ROOT_PORT << 4)
    c.ext([(regs.EXT_CAP_ID_ERR, 0x100, 2), (regs.EXT_CAP_ID_VC, 0x150, 1), (regs.EXT_CAP_ID_DSN, 0x1A0, 1),
           (regs.EXT_CAP_ID_ACS, 0x1B0, 1), (regs.EXT_CAP_ID_ARI, 0x1C0, 1), (regs.EXT_CAP_ID_ATS, 0x1D0, 1),
           (regs.EXT_CAP_ID_SRIOV, 0x200, 1), (regs.EXT_CAP_ID_PRI, 0x280, 1),
           (regs.EXT_CAP_ID_REBAR, 0x2A0, 1), (regs.EXT_CAP_ID_TPH, 0x2E0, 1),
           (regs.EXT_CAP_ID_LTR, 0x300, 1),
           (regs.EXT_CAP_ID_L1SS, 0x310, 1), (regs.EXT_CAP_ID_PASID, 0x320, 1),
           (regs.EXT_CAP_ID_DPC, 0x330, 1), (regs.EXT_CAP_ID_PTM, 0x380, 1)])
    c.w32(0x150 + 4, 1)       # VC: one extended VC
    c.w32(0x2A0 + 8, 1 << 5)  # Resizable BAR: one BAR
    return c.bytes()


@pytest.mark.parametrize("raw", [BASE, _every_capability()], ids=["endpoint", "every-capability"])
def test_every_read_only_register_is_identity(raw: bytes) -> None:
    names = {r.name: r.kind for rs in register_map(layout_of(raw)).values() for r in rs}
    read_only = {n for n in names if _READ_ONLY.search(n)}
    assert sorted(n for n in read_only if names[n] is not RegKind.IDENTITY) == []
    assert len(read_only) >= 15


#: Registers software writes (control, command, masks, addresses, windows, bus
#: numbers): what a reset loses and restore writes back. PM Data is read-only
#: and AF Control only holds the self-clearing Initiate FLR bit.
_WRITABLE = re.compile(
    r"(Control( [12])?|Command|Mask|Severity|Interrupt Line|Cache Line Size|Latency Timer|Latency|"
    r"Bus|Base|Limit|Upper( 16| 32)?|Expansion ROM|BAR \d|Address|Data|Page Size|Allocation|NumVFs|"
    r"Control/Status)$")
_NOT_WRITABLE = frozenset({"PM Data", "AF Control"})


@pytest.mark.parametrize("raw", [BASE, _every_capability()], ids=["endpoint", "every-capability"])
def test_writable_registers_are_exactly_the_state_ones(raw: bytes) -> None:
    names = {r.name: r.kind for rs in register_map(layout_of(raw)).values() for r in rs}
    writable = {n for n in names if _WRITABLE.search(n)} - _NOT_WRITABLE
    assert {n for n, k in names.items() if k is RegKind.STATE} == writable
    assert len(writable) >= 40


def test_every_capability_layout_is_mapped() -> None:
    names = {r.name for rs in register_map(layout_of(_every_capability())).values() for r in rs}
    assert {"PM Bridge Extensions", "Slot Capabilities 2", "Root Capabilities", "AF Capabilities",
            "VC1 Resource Capabilities", "ARI Capabilities", "ATS Capabilities",
            "SR-IOV Migration State Array",
            "PRI Outstanding Capacity", "Resizable BAR 0 Capability", "TPH Requester Capabilities",
            "L1 PM Substates Capabilities", "PASID Capabilities", "DPC Capabilities",
            "PTM Capabilities"} <= names


def test_every_register_sits_inside_one_dword() -> None:
    for off, rs in register_map(layout_of(BASE)).items():
        for r in rs:
            assert r.offset // 4 * 4 == off
            assert (r.offset + r.size - 1) // 4 * 4 == off


def test_post_bus_reset_defaults_are_all_state() -> None:
    """What a secondary bus reset leaves: every writable register at its default."""
    after = changed(
        BASE, (0x04, 2, 0), (0x06, 2, regs.STATUS_CAP_LIST | 0x8), (0x0C, 1, 0), (0x10, 4, 0),
        (0x14, 4, 0x0C), (0x1C, 4, 0x1), (0x3C, 1, 0), (MSI + 2, 2, 0x0180), (MSI + 4, 4, 0),
        (MSI + 12, 2, 0), (EXP + 8, 2, 0x2810), (EXP + 0x10, 2, 0), (EXP + 0x28, 2, 0),
        (MSIX + 2, 2, 0x0004), (AER + regs.ERR_UNCOR_MASK, 4, 0), (LTR + 4, 4, 0),
        (ACS + regs.ACS_CTRL, 2, 0), (SRIOV + regs.SRIOV_CTRL, 2, 0), (SRIOV + regs.SRIOV_NUM_VF, 2, 0),
    )
    d = diff_config(BASE, after, RES, RES)
    assert d.change is Change.STATE, d.summary()
    assert len(d.state_registers) == 19  # LTR snoop + no-snoop are two registers
    assert [r.name for r in d.registers if r.kind is RegKind.VOLATILE] == ["Status"]




def test_to_json_is_plain() -> None:
    import json

    d = diff_config(BASE, changed(BASE, (0x04, 2, 0), (0x02, 2, 1)), RES, RES)
    text = json.dumps(d.to_json())
    assert '"identity"' in text
    assert '"Command"' in text


# -- never raises, on anything ------------------------------------------------------------

def _mutate(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(base)
    for off, val in edits:
        b[off % len(b)] = val
    return bytes(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=40),
       st.sampled_from([4096, 256, 64, 3, 0]))
def test_diff_never_raises_and_writes_stay_in_their_dword(edits: list[tuple[int, int]], size: int) -> None:
    after = _mutate(BASE, edits)[:size]
    d = diff_config(BASE, after, RES, RES)
    assert d.change in Change
    for w in plan_writes(d):
        assert w.size in (1, 2, 4)
        assert w.offset % w.size == 0
        assert w.offset // 4 == (w.offset + w.size - 1) // 4
    if d.change is not Change.STATE:
        assert plan_writes(d) == []


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=4096), st.binary(min_size=0, max_size=4096))
def test_diff_of_garbage_never_raises(before: bytes, after: bytes) -> None:
    assert diff_config(before, after).change in Change
    assert diff_config(before, before).change is Change.NONE


# -- one walker: the diff's layout and parse_config see the same capabilities ----

def _walked(raw: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    _size, _htype, caps, ext = layout_of(raw)
    return [(c, p) for c, p, _ in caps], [(c, p) for c, p, _ in ext]


def _parsed(raw: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    cfg = parse_config(raw)
    return [(c.id, c.offset) for c in cfg.capabilities], [(c.id, c.offset) for c in cfg.ext_capabilities]


def test_cardbus_and_unknown_header_layouts_follow_the_kernels_list_start() -> None:
    # __pci_bus_find_cap_start: CardBus lists start at 0x14, other header types have none.
    cardbus = Cfg(regs.CFG_SPACE_SIZE, header=regs.HEADER_TYPE_CARDBUS, class_code=0x060700)
    cardbus.caps([(regs.CAP_ID_PM, 0x80)])
    cardbus.w8(regs.CAPABILITY_LIST, 0x90).w8(0x90, regs.CAP_ID_MSI)  # a decoy at the type 0 pointer
    assert _walked(cardbus.bytes()) == ([(regs.CAP_ID_PM, 0x80)], [])
    unknown = Cfg(regs.CFG_SPACE_SIZE, header=0x7F).caps([(regs.CAP_ID_PM, 0x40)])
    assert _walked(unknown.bytes()) == ([], [])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=40),
       st.sampled_from([4096, 256, 64, 0x35, 3]), st.sampled_from([0, 1, 2, 3, 0x80]))
def test_layout_walks_the_lists_parse_config_walks(edits: list[tuple[int, int]], size: int,
                                                   header: int) -> None:
    raw = bytearray(_mutate(BASE, edits)[:size])
    if len(raw) > regs.HEADER_TYPE:
        raw[regs.HEADER_TYPE] = header
    if parse_config(bytes(raw)).present:
        assert _walked(bytes(raw)) == _parsed(bytes(raw))
