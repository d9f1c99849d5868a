"""parse_config on hand-built config spaces: headers, capability walks, broken chains.

The bytes are laid out with the register offsets of ``qreset.pci.regs``
(pci_regs.h); the expected walk results follow ``__pci_find_next_cap_ttl`` and
``pci_find_next_ext_capability`` in drivers/pci/pci.c. The builder, :class:`Cfg`,
is tests/pcibuild.py's (the lspci oracle feeds the same bytes to lspci).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qreset.pci import regs
from qreset.pci.cfgspace import Capability, ExtCapability, parse_config, u8, u16, u32
from tests.pcibuild import Cfg

# -- header decoding ----------------------------------------------------------


def test_type0_header() -> None:
    c = Cfg(regs.CFG_SPACE_SIZE, vendor=0x10DE, device=0x2204, class_code=0x030000, revision=0xA1,
            multifunction=True)
    c.w16(regs.COMMAND, 0x0407).w16(regs.STATUS, 0x0010)
    c.w8(regs.CACHE_LINE_SIZE, 0x10).w8(regs.LATENCY_TIMER, 0x20)
    for i in range(6):
        c.w32(regs.BASE_ADDRESS_0 + 4 * i, 0xF000_0000 + i)
    c.w16(regs.SUBSYSTEM_VENDOR_ID, 0x1458).w16(regs.SUBSYSTEM_ID, 0x403B)
    c.w8(regs.INTERRUPT_LINE, 11).w8(regs.INTERRUPT_PIN, 1)
    cfg = parse_config(c.bytes())
    assert cfg.present
    assert (cfg.vendor_id, cfg.device_id, cfg.revision) == (0x10DE, 0x2204, 0xA1)
    assert cfg.class_code == 0x030000
    assert (cfg.command, cfg.status) == (0x0407, 0x0010)
    assert (cfg.cache_line_size, cfg.latency_timer) == (0x10, 0x20)
    assert cfg.header_type == regs.HEADER_TYPE_NORMAL
    assert cfg.multifunction
    assert not cfg.is_bridge
    assert cfg.bars == tuple(0xF000_0000 + i for i in range(6))
    assert (cfg.subsystem_vendor, cfg.subsystem_id) == (0x1458, 0x403B)
    assert (cfg.interrupt_line, cfg.interrupt_pin) == (11, 1)
    assert cfg.primary_bus is None
    assert cfg.secondary_bus is None
    assert cfg.bridge_control is None
    assert cfg.capabilities == ()  # Cap List bit set but the pointer at 0x34 is 0


def test_type1_header() -> None:
    c = Cfg(regs.CFG_SPACE_SIZE, header=regs.HEADER_TYPE_BRIDGE, class_code=0x060400)
    c.w32(regs.BASE_ADDRESS_0, 0xDEAD_0004).w32(regs.BASE_ADDRESS_0 + 4, 0x1)
    c.w8(regs.PRIMARY_BUS, 0).w8(regs.SECONDARY_BUS, 3).w8(regs.SUBORDINATE_BUS, 5)
    c.w16(regs.BRIDGE_CONTROL, regs.BRIDGE_CTL_BUS_RESET | 0x3)
    # What would be subsystem IDs in a type 0 header are prefetch limits here.
    c.w16(regs.SUBSYSTEM_VENDOR_ID, 0xFFF1)
    cfg = parse_config(c.bytes())
    assert cfg.is_bridge
    assert not cfg.multifunction
    assert cfg.bars == (0xDEAD_0004, 0x1)
    assert (cfg.primary_bus, cfg.secondary_bus, cfg.subordinate_bus) == (0, 3, 5)
    assert cfg.bridge_control == regs.BRIDGE_CTL_BUS_RESET | 0x3
    assert cfg.subsystem_vendor is None
    assert cfg.subsystem_id is None


def test_cardbus_header_caps_start_at_0x14() -> None:
    c = Cfg(regs.CFG_SPACE_SIZE, header=regs.HEADER_TYPE_CARDBUS, class_code=0x060700)
    c.caps([(regs.CAP_ID_PM, 0x80)])
    c.w8(regs.CAPABILITY_LIST, 0x90).w8(0x90, regs.CAP_ID_MSI)  # a decoy at the type 0 pointer
    c.w16(0x40, 0x104C).w16(0x42, 0xAC55)
    cfg = parse_config(c.bytes())
    assert cfg.capabilities == (Capability(regs.CAP_ID_PM, 0x80),)
    assert len(cfg.bars) == 1
    assert (cfg.subsystem_vendor, cfg.subsystem_id) == (0x104C, 0xAC55)


def test_unknown_header_type_has_no_capability_list() -> None:
    c = Cfg(regs.CFG_SPACE_SIZE, header=0x7F).caps([(regs.CAP_ID_PM, 0x40)])
    cfg = parse_config(c.bytes())
    assert cfg.header_type == 0x7F
    assert cfg.capabilities == ()


# -- standard capabilities ----------------------------------------------------


def test_capability_walk_in_chain_order() -> None:
    order = [(regs.CAP_ID_PM, 0xC8), (regs.CAP_ID_MSI, 0x40), (regs.CAP_ID_EXP, 0x60),
             (regs.CAP_ID_MSIX, 0xA0), (regs.CAP_ID_VNDR, 0x50)]
    cfg = parse_config(Cfg().caps(order).bytes())
    assert cfg.capabilities == tuple(Capability(i, o) for i, o in order)
    assert cfg.find_cap(regs.CAP_ID_MSIX) == Capability(regs.CAP_ID_MSIX, 0xA0)
    assert cfg.find_cap(regs.CAP_ID_AF) is None
    assert cfg.problems == ()


def test_no_cap_list_bit_means_no_capabilities() -> None:
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40)])
    c.w16(regs.STATUS, 0)
    assert parse_config(c.bytes()).capabilities == ()


def test_low_two_bits_of_pointers_are_ignored() -> None:
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40), (regs.CAP_ID_EXP, 0x50)])
    c.w8(regs.CAPABILITY_LIST, 0x43).w8(0x41, 0x52)
    cfg = parse_config(c.bytes())
    assert [cap.offset for cap in cfg.capabilities] == [0x40, 0x50]


def test_capability_loop_ends_with_a_problem() -> None:
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40), (regs.CAP_ID_MSI, 0x50), (regs.CAP_ID_EXP, 0x60)])
    c.w8(0x61, 0x50)  # EXP -> MSI again
    cfg = parse_config(c.bytes())
    assert [cap.offset for cap in cfg.capabilities] == [0x40, 0x50, 0x60]
    # Exactly one problem: the walk stops at the loop rather than spinning to the TTL.
    assert cfg.problems == ("capability list loops back to 0x50",)


def test_self_loop() -> None:
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40)])
    c.w8(0x41, 0x40)
    cfg = parse_config(c.bytes())
    assert cfg.capabilities == (Capability(regs.CAP_ID_PM, 0x40),)
    assert cfg.problems == ("capability list loops back to 0x40",)


@pytest.mark.parametrize("pointer", [0x04, 0x10, 0x3C, 0x3F])
def test_pointer_into_header_ends_the_list(pointer: int) -> None:
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40), (regs.CAP_ID_MSI, 0x50)])
    c.w8(0x51, pointer)
    cfg = parse_config(c.bytes())
    assert [cap.offset for cap in cfg.capabilities] == [0x40, 0x50]
    assert any(f"{pointer:#x} points into the header" in p for p in cfg.problems)


def test_first_pointer_into_header() -> None:
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40)])
    c.w8(regs.CAPABILITY_LIST, 0x20)
    cfg = parse_config(c.bytes())
    assert cfg.capabilities == ()
    assert cfg.problems


def test_id_ff_ends_the_list() -> None:
    # __pci_find_next_cap_ttl: "if (id == 0xff) break" (a function gone away).
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40), (0xFF, 0x50), (regs.CAP_ID_EXP, 0x60)])
    assert [cap.id for cap in parse_config(c.bytes()).capabilities] == [regs.CAP_ID_PM]


def test_48_capabilities_fill_the_space_without_a_problem() -> None:
    offs = list(range(0x40, 0x100, 4))
    assert len(offs) == 48
    cfg = parse_config(Cfg(regs.CFG_SPACE_SIZE).caps([(regs.CAP_ID_VNDR, o) for o in offs]).bytes())
    assert [cap.offset for cap in cfg.capabilities] == offs
    assert cfg.problems == ()


def test_truncated_64_byte_read() -> None:
    """An unprivileged read: header decodes, capabilities are unknown, and it says so."""
    c = Cfg(vendor=0x15B3, device=0x1017).caps([(regs.CAP_ID_PM, 0x60), (regs.CAP_ID_EXP, 0x70)])
    c.pcie(0x70, regs.EXP_TYPE_ENDPOINT, flr=True)
    c.ext([(regs.EXT_CAP_ID_ERR, 0x100, 2)])
    cfg = parse_config(c.bytes(regs.CFG_SPACE_UNPRIV_SIZE))
    assert cfg.present
    assert (cfg.vendor_id, cfg.device_id) == (0x15B3, 0x1017)
    assert cfg.capabilities == ()
    assert cfg.ext_capabilities == ()
    assert not cfg.has_flr
    assert any("not read (only 64 bytes" in p for p in cfg.problems)
    assert len(cfg.raw) == 64


@pytest.mark.parametrize("length", [0, 1, 2, 7, 8, 0x34, 0x35, 63])
def test_shorter_than_64_bytes(length: int) -> None:
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40)])
    cfg = parse_config(c.bytes(length))
    assert any(f"only {length} bytes" in p for p in cfg.problems)
    assert cfg.capabilities == ()
    if length < 2:
        assert not cfg.present  # vendor reads as 0xffff
    if length <= regs.HEADER_TYPE:
        assert cfg.header_type == 0x7F
        assert not cfg.multifunction


@pytest.mark.parametrize("length", [0x42, 0x51, 0x80, 0xF1])
def test_capability_past_the_end_of_a_short_read(length: int) -> None:
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40), (regs.CAP_ID_EXP, 0xF0)])
    cfg = parse_config(c.bytes(length))
    assert cfg.capabilities == (Capability(regs.CAP_ID_PM, 0x40),)
    assert any("0xf0 not read" in p for p in cfg.problems)


# -- all-ones, CRS, zero ------------------------------------------------------


@pytest.mark.parametrize("length", [64, 256, 4096])
def test_all_ones_read_is_absent(length: int) -> None:
    cfg = parse_config(b"\xff" * length)
    assert not cfg.present
    assert cfg.vendor_id == 0xFFFF
    assert cfg.device_id == 0xFFFF
    assert cfg.capabilities == ()
    assert cfg.ext_capabilities == ()
    assert not cfg.multifunction
    assert not (cfg.has_flr)
    assert not (cfg.has_af_flr)
    assert not (cfg.has_pm_reset)


def test_crs_vendor_id_is_not_present() -> None:
    c = Cfg(vendor=regs.CRS_VENDOR_ID).caps([(regs.CAP_ID_EXP, 0x40)]).pcie(0x40, 0, flr=True)
    cfg = parse_config(c.bytes())
    assert not cfg.present
    assert cfg.capabilities == ()


def test_status_all_ones_with_valid_vendor_has_no_caps() -> None:
    # Half-gone function: the vendor dword latched, the rest reads as ones.
    # Command/Status all-ones is pci_dev_wait's "not there" test: absent.
    b = bytearray(b"\xff" * 256)
    b[0:2] = (0x8086).to_bytes(2, "little")
    cfg = parse_config(bytes(b))
    assert not cfg.present
    assert cfg.capabilities == ()
    # Command answers but Status reads all-ones: present, yet its list is not walked
    # (a real Status has reserved bits that read 0; a walk would invent capabilities).
    b[regs.COMMAND:regs.COMMAND + 2] = (0x0406).to_bytes(2, "little")
    cfg = parse_config(bytes(b))
    assert cfg.present
    assert cfg.capabilities == ()
    assert "status reads 0xffff: capability list not walked" in cfg.problems


def test_ffff_fields_read_inside_capabilities() -> None:
    """A PCIe/PM/AF capability whose registers read all-ones must not claim a reset."""
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40), (regs.CAP_ID_EXP, 0x50), (regs.CAP_ID_AF, 0x90)])
    c.w16(0x40 + regs.PM_CTRL, 0xFFFF)
    c.w32(0x50 + regs.EXP_DEVCAP, 0xFFFF_FFFF)
    c.w8(0x90 + regs.AF_CAP, 0xFF)
    cfg = parse_config(c.bytes())
    assert not cfg.has_flr
    assert not cfg.has_pm_reset
    assert not cfg.has_af_flr


# -- reset capabilities -------------------------------------------------------


def test_reset_capability_probes() -> None:
    c = Cfg().caps([(regs.CAP_ID_PM, 0x40), (regs.CAP_ID_EXP, 0x50), (regs.CAP_ID_AF, 0x90)])
    c.pcie(0x50, regs.EXP_TYPE_ENDPOINT, flr=True)
    c.w8(0x90 + regs.AF_CAP, regs.AF_CAP_TP | regs.AF_CAP_FLR)
    cfg = parse_config(c.bytes())
    assert cfg.pcie_type == regs.EXP_TYPE_ENDPOINT
    assert cfg.has_flr
    assert cfg.has_af_flr
    assert cfg.has_pm_reset
    c.pcie(0x50, regs.EXP_TYPE_LEG_END, flr=False)
    c.w8(0x90 + regs.AF_CAP, regs.AF_CAP_FLR)  # FLR without TP: pci_af_flr refuses
    c.w16(0x40 + regs.PM_CTRL, regs.PM_CTRL_NO_SOFT_RESET)
    cfg = parse_config(c.bytes())
    assert cfg.pcie_type == regs.EXP_TYPE_LEG_END
    assert not cfg.has_flr
    assert not cfg.has_af_flr
    assert not cfg.has_pm_reset


def test_root_port_type_and_no_pcie() -> None:
    c = Cfg(header=regs.HEADER_TYPE_BRIDGE).caps([(regs.CAP_ID_EXP, 0x40)])
    c.pcie(0x40, regs.EXP_TYPE_ROOT_PORT)
    assert parse_config(c.bytes()).pcie_type == regs.EXP_TYPE_ROOT_PORT
    assert parse_config(Cfg(256).caps([(regs.CAP_ID_PM, 0x40)]).bytes()).pcie_type is None


# -- extended capabilities ----------------------------------------------------


def test_extended_capability_walk() -> None:
    chain = [(regs.EXT_CAP_ID_ERR, 0x100, 2), (regs.EXT_CAP_ID_ACS, 0x148, 1),
             (regs.EXT_CAP_ID_SRIOV, 0x400, 1), (regs.EXT_CAP_ID_DVSEC, 0x200, 1),
             (0x0, 0x300, 0), (regs.EXT_CAP_ID_LTR, 0xFFC, 1)]
    c = Cfg().caps([(regs.CAP_ID_EXP, 0x40)]).pcie(0x40, 0).ext(chain)
    cfg = parse_config(c.bytes())
    assert cfg.ext_capabilities == tuple(ExtCapability(i, o, v) for i, o, v in chain)
    assert cfg.find_ext_cap(regs.EXT_CAP_ID_ACS) == ExtCapability(regs.EXT_CAP_ID_ACS, 0x148, 1)
    assert cfg.find_ext_cap(regs.EXT_CAP_ID_ARI) is None
    assert cfg.problems == ()


def test_extended_version_and_id_bits() -> None:
    c = Cfg().w32(0x100, 0x000F_ABCD)  # id 0xabcd, version 15, next 0
    assert parse_config(c.bytes()).ext_capabilities == (ExtCapability(0xABCD, 0x100, 0xF),)


@pytest.mark.parametrize("header", [0x0000_0000, 0xFFFF_FFFF])
def test_no_extended_capabilities(header: int) -> None:
    cfg = parse_config(Cfg().w32(0x100, header).bytes())
    assert cfg.ext_capabilities == ()
    assert cfg.problems == ()


def test_extended_walk_ignores_low_two_bits_of_next() -> None:
    c = Cfg().ext([(regs.EXT_CAP_ID_ERR, 0x100, 1), (regs.EXT_CAP_ID_ARI, 0x150, 1)])
    c.w32(0x100, u32(c.bytes(), 0x100) | (0x3 << 20))  # next = 0x153
    assert [e.offset for e in parse_config(c.bytes()).ext_capabilities] == [0x100, 0x150]


def test_extended_loop() -> None:
    c = Cfg().ext([(regs.EXT_CAP_ID_ERR, 0x100, 1), (regs.EXT_CAP_ID_ACS, 0x200, 1)])
    c.w32(0x200, regs.EXT_CAP_ID_ACS | (1 << 16) | (0x100 << 20))
    cfg = parse_config(c.bytes())
    assert [e.offset for e in cfg.ext_capabilities] == [0x100, 0x200]
    assert cfg.problems == ("extended capability list loops back to 0x100",)


def test_extended_next_into_the_header() -> None:
    c = Cfg().ext([(regs.EXT_CAP_ID_ERR, 0x100, 1)])
    c.w32(0x100, regs.EXT_CAP_ID_ERR | (1 << 16) | (0x40 << 20))
    cfg = parse_config(c.bytes())
    assert [e.offset for e in cfg.ext_capabilities] == [0x100]
    assert any("points into the header (0x40)" in p for p in cfg.problems)


@pytest.mark.parametrize("length", [0x104, 0x180, 0x1FF])
def test_extended_next_past_the_end(length: int) -> None:
    c = Cfg().ext([(regs.EXT_CAP_ID_ERR, 0x100, 1), (regs.EXT_CAP_ID_ACS, 0x1FC, 1)])
    cfg = parse_config(c.bytes(length))
    assert [e.offset for e in cfg.ext_capabilities] == [0x100]
    assert any("0x1fc is past the end" in p for p in cfg.problems)


def test_256_byte_read_has_no_extended_capabilities() -> None:
    c = Cfg(regs.CFG_SPACE_SIZE).caps([(regs.CAP_ID_PM, 0x40)])
    cfg = parse_config(c.bytes())
    assert cfg.ext_capabilities == ()
    assert cfg.problems == ()


def test_helpers_read_ones_past_the_end() -> None:
    data = b"\x01\x02\x03"
    assert u8(data, 2) == 3
    assert u8(data, 3) == 0xFF
    assert u8(data, -1) == 0xFF
    assert u16(data, 1) == 0x0302
    assert u16(data, 2) == 0xFFFF
    assert u32(data, 0) == 0xFFFF_FFFF
    assert u32(b"\x01\x02\x03\x04", 0) == 0x0403_0201


# -- robustness: never raises, invariants hold ---------------------------------


def _check_invariants(data: bytes) -> None:
    cfg = parse_config(data)
    assert cfg.raw == data
    offs = [c.offset for c in cfg.capabilities]
    assert len(offs) == len(set(offs)) <= 48
    assert all(0x40 <= o <= len(data) - 2 and o % 4 == 0 for o in offs)
    ext = [e.offset for e in cfg.ext_capabilities]
    assert len(ext) == len(set(ext))
    assert all(0x100 <= o <= len(data) - 4 and o % 4 == 0 for o in ext)
    assert all(0 <= e.version <= 0xF and 0 <= e.id <= 0xFFFF for e in cfg.ext_capabilities)
    assert all("\n" not in p for p in cfg.problems)
    # Properties must not raise either.
    _ = (cfg.present, cfg.is_bridge, cfg.pcie_type, cfg.has_flr, cfg.has_af_flr, cfg.has_pm_reset)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
@given(st.binary(min_size=4096, max_size=4096))
def test_never_raises_on_random_4096_bytes(data: bytes) -> None:
    _check_invariants(data)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=4096))
def test_never_raises_on_any_length(data: bytes) -> None:
    _check_invariants(data)


@st.composite
def chained(draw: st.DrawFn) -> bytes:
    """Random bytes with the capability bit set and pointers drawn from plausible
    (and implausible) values, so walks actually run, loop and break."""
    length = draw(st.sampled_from([64, 65, 128, 255, 256, 300, 4096]) | st.integers(0, 4096))
    b = bytearray(draw(st.binary(min_size=length, max_size=length)))
    pointers = st.sampled_from([0, 0x3C, 0x40, 0x41, 0x44, 0x80, 0xC3, 0xFC, 0xFF]) | st.integers(0, 255)
    if length > regs.STATUS:
        b[regs.STATUS] |= regs.STATUS_CAP_LIST
    for off in [*draw(st.lists(st.integers(64, 255), max_size=20)), regs.CAPABILITY_LIST]:
        if off + 1 < length:
            b[off + 1] = draw(pointers)
    for off in [*draw(st.lists(st.integers(64, 1023).map(lambda x: x * 4), max_size=20)), 256]:
        if off + 4 <= length:
            nxt = draw(st.sampled_from([0, 0x40, 0x100, 0x104, 0xFFC, 0xFFF]) | st.integers(0, 0xFFF))
            ver = draw(st.integers(0, 15))
            b[off:off + 4] = (draw(st.integers(0, 0xFFFF)) | (ver << 16) | (nxt << 20)).to_bytes(4, "little")
    return bytes(b)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chained())
def test_never_raises_on_chained_garbage(data: bytes) -> None:
    _check_invariants(data)
