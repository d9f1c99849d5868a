"""
The building blocks of a simulated function's config image: its BARs, the
image itself (power-on bytes and write masks, QEMU's
``PCIDevice.config/wmask/w1cmask`` in hw/pci/pci.c) and the little-endian
register access :mod:`qreset.pci.sim_config` (the header and standard
capabilities), :mod:`qreset.pci.sim_extcaps` (the extended capabilities) and
the simulated host's config accessors share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qreset.pci import regs
from qreset.pci.sim_model import BarSpec


@dataclass(slots=True)
class BarSlot:
    """One implemented BAR (index 0-5, or a VF BAR in the SR-IOV capability)."""

    index: int
    size: int
    type: str
    prefetch: bool

    @property
    def low_bits(self) -> int:
        if self.type == "io":
            return regs.BASE_ADDRESS_SPACE_IO
        bits = regs.BASE_ADDRESS_MEM_TYPE_64 if self.type == "mem64" else 0
        return bits | (regs.BASE_ADDRESS_MEM_PREFETCH if self.prefetch else 0)


@dataclass(slots=True)
class ConfigImage:
    """Power-on bytes of one function with its write masks and the layout the sim needs."""

    size: int
    por: bytearray
    wmask: bytearray
    w1cmask: bytearray
    caps: dict[int, int] = field(default_factory=dict)
    ext_caps: dict[int, int] = field(default_factory=dict)
    bars: list[BarSlot] = field(default_factory=list)
    rom_size: int = 0
    vf_bars: list[BarSlot] = field(default_factory=list)


class ImageWriter:
    """Little-endian register writer over the three byte arrays."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1c = bytearray(size)

    def put(self, off: int, width: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        self.data[off:off + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        self.wmask[off:off + width] = (wmask & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        self.w1c[off:off + width] = (w1c & ((1 << 8 * width) - 1)).to_bytes(width, "little")


def bar_slots(bars: tuple[BarSpec, ...]) -> list[BarSlot]:
    out: list[BarSlot] = []
    nxt = 0
    for bar in bars:
        idx = nxt if bar.index is None else bar.index
        out.append(BarSlot(idx, bar.size, bar.type, bar.prefetch))
        nxt = idx + (2 if bar.type == "mem64" else 1)
    return out


def put_bar(img: ImageWriter, off: int, slot: BarSlot) -> None:
    if slot.type == "io":
        img.put(off, 4, slot.low_bits, ~(slot.size - 1) & 0xFFFFFFFC)
        return
    mask = ~(slot.size - 1)
    img.put(off, 4, slot.low_bits, mask & 0xFFFFFFF0)
    if slot.type == "mem64":
        img.put(off + 4, 4, 0, (mask >> 32) & 0xFFFFFFFF)


def log2(n: int) -> int:
    return n.bit_length() - 1


def put(buf: bytearray, off: int, width: int, value: int) -> None:
    buf[off:off + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")


def get(buf: bytes | bytearray, off: int, width: int) -> int:
    return int.from_bytes(buf[off:off + width], "little")
