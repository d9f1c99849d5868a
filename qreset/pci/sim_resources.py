"""
Resources of a simulated host: addresses for BARs, ROMs, VF BARs and bridge windows
(:func:`assign_resources`, at boot), and what sysfs ``resource`` shows for each
function (:func:`resources_of`, the kernel's ``resource_show`` lines).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING

from qreset.pci.host import (
    IORESOURCE_IO,
    IORESOURCE_MEM,
    IORESOURCE_MEM_64,
    IORESOURCE_PREFETCH,
    Resource,
)
from qreset.pci.sim_config import BarSlot
from qreset.pci.sim_setup import Assigned

if TYPE_CHECKING:
    from qreset.pci.sim_enum import SimFunction

# Flags the kernel reports in sysfs ``resource`` (include/linux/ioport.h) besides host.py's.
IORESOURCE_SIZEALIGN = 0x00040000
IORESOURCE_READONLY = 0x00004000
# resource lines: PCI_STD_RESOURCES 0-5, PCI_ROM_RESOURCE 6, PCI_IOV_RESOURCES 7-12,
# PCI_BRIDGE_RESOURCES 13-16 (include/linux/pci.h); resource_show() prints up to
# PCI_BRIDGE_RESOURCES lines for endpoints and PCI_NUM_RESOURCES for bridges.
ROM_RESOURCE = 6
IOV_RESOURCES = 7
BRIDGE_RESOURCES = 13
NUM_RESOURCES = 17

# Base addresses for resource assignment (typical x86 layout).
_IO_BASE = 0x2000
_MEM_BASE = 0xC0000000
_PREF_BASE = 0x40_0000_0000
_MB = 1 << 20


class _Placer:
    """Packs BARs/windows of one bus into an address range (largest alignment first)."""

    def __init__(self) -> None:
        self.items: dict[str, list[tuple[int, int, Callable[[int], None]]]] = {
            "io": [], "mem": [], "pref": []}

    def add(self, kind: str, size: int, align: int, place: Callable[[int], None]) -> None:
        self.items[kind].append((size, align, place))

    def span(self, kind: str, gran: int) -> tuple[int, int]:
        cursor = 0
        items = sorted(self.items[kind], key=lambda it: -it[1])
        for size, align, _ in items:
            cursor = -(-cursor // align) * align + size
        align = max((it[1] for it in items), default=gran)
        return -(-cursor // gran) * gran, max(align, gran)

    def place(self, kind: str, base: int) -> None:
        cursor = base
        for size, align, place in sorted(self.items[kind], key=lambda it: -it[1]):
            cursor = -(-cursor // align) * align
            place(cursor)
            cursor += size


def _set_bar(table: dict[int, int], index: int, addr: int) -> None:
    table[index] = addr


def _set_rom(asg: Assigned, addr: int) -> None:
    asg.rom_addr = addr


def _bar_kind(slot: BarSlot) -> str:
    if slot.type == "io":
        return "io"
    return "pref" if slot.prefetch and slot.type == "mem64" else "mem"


def _bar_flags(slot: BarSlot) -> int:
    if slot.type == "io":
        return IORESOURCE_IO | IORESOURCE_SIZEALIGN | slot.low_bits
    flags = IORESOURCE_MEM | IORESOURCE_SIZEALIGN | slot.low_bits
    if slot.prefetch:
        flags |= IORESOURCE_PREFETCH
    if slot.type == "mem64":
        flags |= IORESOURCE_MEM_64
    return flags


def assign_resources(order: list[SimFunction]) -> None:
    """BARs and bridge windows packed per bus, largest alignment first (in the spirit of
    ``pbus_size_mem``/``__pci_bus_assign_resources`` in drivers/pci/setup-bus.c),
    64-bit prefetchable BARs above 4 GiB; VF BARs from the PF's SR-IOV BARs."""
    gran = {"io": 0x1000, "mem": _MB, "pref": _MB}

    def collect(funcs: Iterable[SimFunction]) -> _Placer:
        placer = _Placer()
        for f in funcs:
            for slot in f.img.bars if f.physfn is None else []:
                placer.add(_bar_kind(slot), slot.size, slot.size,
                           partial(_set_bar, f.asg.bar_addr, slot.index))
            if f.img.rom_size and f.physfn is None:
                placer.add("mem", f.img.rom_size, f.img.rom_size,
                           partial(_set_rom, f.asg))
            if f.spec.sriov is not None:
                total = f.spec.sriov.total_vfs
                for slot in f.img.vf_bars:
                    placer.add(_bar_kind(slot), slot.size * total, slot.size,
                               partial(_set_bar, f.asg.vf_bar_addr, slot.index))
            if f.is_bridge:
                sub = collect(c for c in f.children if c.physfn is None)
                for kind in ("io", "mem", "pref"):
                    if not sub.items[kind]:
                        continue
                    size, align = sub.span(kind, gran[kind])

                    def place(a: int, f: SimFunction = f, kind: str = kind, sub: _Placer = sub,
                              size: int = size) -> None:
                        setattr(f.asg, f"{kind}_window", (a, a + size - 1))
                        sub.place(kind, a)

                    placer.add(kind, size, align, place)
        return placer

    root = collect(f for f in order if f.parent is None and f.physfn is None)
    root.place("io", _IO_BASE)
    root.place("mem", _MEM_BASE)
    root.place("pref", _PREF_BASE)
    for f in order:
        if f.physfn is not None:
            pf = f.physfn
            for slot in f.img.bars:
                base = pf.asg.vf_bar_addr.get(slot.index, 0)
                f.asg.bar_addr[slot.index] = base + slot.size * f.vf_index if base else 0
        pin = f.spec.interrupt_pin
        f.asg.interrupt_line = 0 if pin == 0 else 10 + (f.addr.device + pin) % 6


def resources_of(f: SimFunction) -> list[Resource]:
    n = NUM_RESOURCES if f.is_bridge else BRIDGE_RESOURCES
    res = [Resource(0, 0, 0)] * n
    for slot in f.img.bars:
        start = f.asg.bar_addr.get(slot.index, 0)
        if start:
            res[slot.index] = Resource(start, start + slot.size - 1, _bar_flags(slot))
    if f.img.rom_size and f.asg.rom_addr:
        flags = IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_READONLY | IORESOURCE_SIZEALIGN
        res[ROM_RESOURCE] = Resource(f.asg.rom_addr, f.asg.rom_addr + f.img.rom_size - 1, flags)
    if f.spec.sriov is not None:
        for slot in f.img.vf_bars:
            start = f.asg.vf_bar_addr.get(slot.index, 0)
            if start:
                size = slot.size * f.spec.sriov.total_vfs
                res[IOV_RESOURCES + slot.index] = Resource(start, start + size - 1, _bar_flags(slot))
    if f.is_bridge:
        wins = ((f.asg.io_window, IORESOURCE_IO | 0x1),
                (f.asg.mem_window, IORESOURCE_MEM),
                (f.asg.pref_window, IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_MEM_64 | 0x1))
        for i, (win, flags) in enumerate(wins):
            if win is not None:
                res[BRIDGE_RESOURCES + i] = Resource(win[0], win[1], flags)
    return res
