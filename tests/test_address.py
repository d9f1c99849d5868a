"""PciAddress: the kernel's ``%04x:%02x:%02x.%d`` names, lspci's short form, bad input."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qreset.errors import AddressError, QResetError
from qreset.pci.address import PciAddress

addresses = st.builds(
    PciAddress,
    domain=st.integers(0, 0xFFFFFFFF),
    bus=st.integers(0, 0xFF),
    device=st.integers(0, 0x1F),
    function=st.integers(0, 7),
)


def test_parse_full_form() -> None:
    a = PciAddress.parse("0000:01:00.1")
    assert (a.domain, a.bus, a.device, a.function) == (0, 1, 0, 1)
    assert str(a) == "0000:01:00.1"
    assert a.slot == "0000:01:00"
    assert a.devfn == 0x01


def test_parse_short_form_is_domain_zero() -> None:
    assert PciAddress.parse("3b:1f.7") == PciAddress(0, 0x3B, 0x1F, 7)
    assert str(PciAddress.parse("3b:1f.7")) == "0000:3b:1f.7"


def test_parse_accepts_upper_case_and_surrounding_space() -> None:
    assert PciAddress.parse(" 0000:AF:1E.3\n") == PciAddress(0, 0xAF, 0x1E, 3)


def test_vmd_domain_above_ffff() -> None:
    # VMD hosts number domains from 0x10000 (drivers/pci/controller/vmd.c).
    a = PciAddress.parse("10000:e1:00.0")
    assert a.domain == 0x10000
    assert str(a) == "10000:e1:00.0"
    assert PciAddress.parse(str(a)) == a


def test_devfn_matches_pci_devfn_macro() -> None:
    # PCI_DEVFN(slot, func) = ((slot & 0x1f) << 3) | (func & 0x07)
    assert PciAddress.parse("00:1f.3").devfn == 0xFB
    assert PciAddress.parse("00:02.0").devfn == 0x10


def test_ordering_is_numeric_not_lexical() -> None:
    a = [PciAddress.parse(t) for t in ("0000:0a:00.0", "0000:02:00.0", "0001:00:00.0", "0000:02:00.1")]
    assert [str(x) for x in sorted(a)] == ["0000:02:00.0", "0000:02:00.1", "0000:0a:00.0", "0001:00:00.0"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0000:01:00",        # no function
        "0000:01:00.8",      # function 8
        "0000:01:20.0",      # device 0x20 > 0x1f
        "0000:100:00.0",     # bus with 3 digits
        "000000000:01:00.0",  # domain with 9 digits
        "01:00.-1",
        "g1:00.0",
        "0000:01:00.0.0",
        "0000-01-00.0",
        "0x01:00.0",
        "01:00.0 extra",
    ],
)
def test_bad_addresses_quote_the_input(text: str) -> None:
    with pytest.raises(AddressError) as info:
        PciAddress.parse(text)
    assert repr(text) in str(info.value)
    assert info.value.text == text
    # One line, under the root error so callers can catch one type.
    assert "\n" not in str(info.value)
    assert isinstance(info.value, QResetError)
    assert isinstance(info.value, ValueError)


def test_non_string_input_is_an_address_error() -> None:
    with pytest.raises(AddressError):
        PciAddress.parse(None)  # type: ignore[arg-type]  # deliberately wrong type


@pytest.mark.parametrize(
    "fields", [(0, 0x100, 0, 0), (0, 0, 0x20, 0), (0, 0, 0, 8), (-1, 0, 0, 0), (0x1_0000_0000, 0, 0, 0)]
)
def test_constructor_range_checks(fields: tuple[int, int, int, int]) -> None:
    with pytest.raises(AddressError):
        PciAddress(*fields)


@given(addresses)
def test_str_parse_round_trip(a: PciAddress) -> None:
    text = str(a)
    assert PciAddress.parse(text) == a
    assert str(PciAddress.parse(text)) == text
    assert PciAddress.parse(text.upper()) == a


@given(st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7))
def test_short_form_round_trip(bus: int, dev: int, fn: int) -> None:
    a = PciAddress.parse(f"{bus:02x}:{dev:02x}.{fn}")
    assert a == PciAddress(0, bus, dev, fn)
    assert str(a) == f"0000:{bus:02x}:{dev:02x}.{fn}"


@given(addresses, addresses)
def test_order_matches_tuple_order(a: PciAddress, b: PciAddress) -> None:
    ta = (a.domain, a.bus, a.device, a.function)
    tb = (b.domain, b.bus, b.device, b.function)
    assert (a < b) == (ta < tb)
    assert (a == b) == (ta == tb)


@given(addresses, addresses)
def test_hash_and_every_comparison_agree_with_the_fields(a: PciAddress, b: PciAddress) -> None:
    """Eq/hash/order go through one packed integer (speed): it must be exactly the fields."""
    ta = (a.domain, a.bus, a.device, a.function)
    tb = (b.domain, b.bus, b.device, b.function)
    assert (a <= b) == (ta <= tb)
    assert (a > b) == (ta > tb)
    assert (a >= b) == (ta >= tb)
    assert (a != b) == (ta != tb)
    assert len({a, b}) == len({ta, tb})
    assert {a: 1}.get(PciAddress(*ta)) == 1
    assert a != ta  # an address is not a tuple
    moved = dataclasses.replace(a, bus=b.bus)  # a copy gets its own key
    assert moved == PciAddress(a.domain, b.bus, a.device, a.function)
    assert hash(moved) == hash(PciAddress(a.domain, b.bus, a.device, a.function))


@given(st.text(max_size=20))
def test_parse_never_raises_anything_but_address_error(text: str) -> None:
    error: AddressError | None = None
    try:
        a = PciAddress.parse(text)
    except AddressError as exc:
        error = exc
    if error is not None:
        assert repr(text) in str(error)
    else:
        assert PciAddress.parse(str(a)) == a
