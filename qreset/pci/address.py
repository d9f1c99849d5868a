"""
PCI function addresses (``DDDD:BB:DD.F``).

The kernel names functions ``%04x:%02x:%02x.%d`` (``pci_name()``, from
``dev_set_name`` in ``drivers/pci/probe.c``); domains can exceed 0xffff on VMD
hosts, so up to 8 hex digits are accepted for the domain. The short
``BB:DD.F`` form (what ``lspci`` prints) means domain 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qreset.errors import AddressError

_RE = re.compile(
    r"^(?:(?P<dom>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)


@dataclass(frozen=True, eq=False, slots=True)
class PciAddress:
    """One PCI function: domain (segment), bus, device (0-31), function (0-7).

    Equality, hashing and order go through one integer computed once
    (``domain, bus, devfn`` packed as the kernel's ``pci_domain_nr << 16 |
    PCI_DEVID``): addresses are dict keys and set members everywhere in a
    cycle (ownership of every VM, domain locks, topology scopes), and the
    generated dataclass methods built and hashed a 4-tuple on every lookup
    (``bench.scale``: about 3,300 hashes per cycle with 256 VMs). The order
    is the field order, as ``order=True`` gave.
    """

    domain: int
    bus: int
    device: int
    function: int
    _key: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (0 <= self.domain <= 0xFFFFFFFF and 0 <= self.bus <= 0xFF
                and 0 <= self.device <= 0x1F and 0 <= self.function <= 7):
            raise AddressError(
                f"{self.domain:x}:{self.bus:x}:{self.device:x}.{self.function}",
                "field out of range (bus 0-ff, device 0-1f, function 0-7)",
            )
        object.__setattr__(self, "_key", (self.domain << 16) | (self.bus << 8)
                           | (self.device << 3) | self.function)

    def __hash__(self) -> int:
        return self._key

    def __eq__(self, other: object) -> bool:
        if other.__class__ is PciAddress:
            return self._key == other._key
        return NotImplemented

    def __lt__(self, other: PciAddress) -> bool:
        if other.__class__ is PciAddress:
            return self._key < other._key
        return NotImplemented

    def __le__(self, other: PciAddress) -> bool:
        if other.__class__ is PciAddress:
            return self._key <= other._key
        return NotImplemented

    def __gt__(self, other: PciAddress) -> bool:
        if other.__class__ is PciAddress:
            return self._key > other._key
        return NotImplemented

    def __ge__(self, other: PciAddress) -> bool:
        if other.__class__ is PciAddress:
            return self._key >= other._key
        return NotImplemented

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse ``DDDD:BB:DD.F`` or ``BB:DD.F``; raise :class:`AddressError` quoting ``text``."""
        m = _RE.match(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise AddressError(str(text), "expected DDDD:BB:DD.F or BB:DD.F (hex, function 0-7)")
        dev = int(m["dev"], 16)
        if dev > 0x1F:
            raise AddressError(text, f"device {dev:#x} is out of range (0-1f)")
        return cls(int(m["dom"] or "0", 16), int(m["bus"], 16), dev, int(m["fn"]))

    @property
    def devfn(self) -> int:
        """The 8-bit devfn (``PCI_DEVFN`` in ``include/uapi/linux/pci.h``)."""
        return (self.device << 3) | self.function

    @property
    def slot(self) -> str:
        """``DDDD:BB:DD``: the form ``/sys/bus/pci/slots/*/address`` uses."""
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}"

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function}"

    def __repr__(self) -> str:
        return f"PciAddress({str(self)!r})"
