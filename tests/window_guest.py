"""
A guest firmware that writes its assigned function's config space inside the stop-on-reset window.

Issue 9: under libvirt qreset runs in stop-on-reset mode, so the guest runs from
QEMU's reset until qreset's ``stop`` (milliseconds). Real firmware programs its
devices in that window (BARs, Command); the snapshot restore compares against
must be taken after the stop, or qreset "restores" the device to what it was
before the guest's writes. This image (``-bios``) is the guest that proves it on
the real kernel (tests/lab/test_libvirt.py): its very first instructions after
every reset write a per-boot value to its device's config space.

The register is Cache Line Size (offset 0x0C): the one header register a guest's
write reaches the host device through every layer. QEMU's vfio-pci passes every
config write to VFIO (hw/vfio/pci.c ``vfio_pci_write_config``: "Write everything
to VFIO, let it filter out what we can't write"); Linux vfio-pci lets Cache Line
Size through unvirtualized (drivers/vfio/pci/vfio_pci_config.c
``init_pci_cap_basic_perm``: ``p_setb(perm, PCI_CACHE_LINE_SIZE, NO_VIRT,
(u8)ALL_WRITE)``), while it virtualizes the BARs, so a guest's BAR writes never
reach the device. QEMU's emulated devices (the lab's hardware) keep any value
(``pci_init_wmask``: wmask 0xff) and clear it on FLR (hw/pci/pci.c
``pci_do_device_reset``: ``dev->config[PCI_CACHE_LINE_SIZE] = 0x0``).

What the code does (16-bit real mode, hand-assembled with bench.asm), from the
reset vector on every start:

1. Counts its boots in guest RAM at :data:`COUNTER` (QEMU's system reset resets
   devices and CPUs, not RAM: softmmu/runstate.c ``qemu_system_reset``; RAM
   starts zeroed, so the first boot counts 1).
2. value = :data:`BASE` + boots; writes it to Cache Line Size of function
   ``00:SLOT.0`` through configuration mechanism #1 (PCI Local Bus spec 3.0,
   3.2.2.3.2: the dword address ``0x80000000 | bus << 16 | device << 11 |
   function << 8 | register`` to port 0xCF8, the byte at 0xCFC + (register & 3)),
   and reads it back (through vfio-pci that read comes from the device).
3. Writes ``W``, the value and the read-back byte to QEMU's debug console
   (port 0xE9, ``-debugcon``, hw/char/debugcon.c).
4. Before boot :data:`boots`: waits ``delay`` changes of the RTC's seconds
   register (CMOS index 0 through ports 0x70/0x71), so the next reset comes
   long after qreset's stop of this one, then resets the machine through the
   ICH9 Reset Control register (0x06 to port 0xCF9: SYS_RST | RST_CPU, ICH9
   datasheet 13.7.5). Boot :data:`boots` writes ``H`` and halts for good
   (``cli; hlt``), a stable end state to read.

The console thus holds ``W v r`` per boot and a final ``H``; with BASE 0x40 the
values are the letters ``A``, ``B``, ``C``, ...
"""

from __future__ import annotations

from pathlib import Path

from bench.asm import Item, d32, rel8, rom_image, w16
from bench.asm import listing as asm_listing

#: Where the boot counter lives (a byte of RAM below the first 64 KiB; no BIOS uses it here).
COUNTER = 0x7000
#: value = BASE + boot number: printable (A, B, C, ...) and never the FLR's 0.
BASE = 0x40
#: Cache Line Size (PCI Local Bus spec 3.0, 6.2.4).
REGISTER = 0x0C
WRITE_MARK = b"W"
HALT_MARK = b"H"


def config_address(slot: int, register: int = REGISTER, bus: int = 0, function: int = 0) -> int:
    """Configuration mechanism #1's CONFIG_ADDRESS (bit 31 enable; the dword of ``register``)."""
    return 0x80000000 | bus << 16 | slot << 11 | function << 8 | (register & 0xFC)


def program(slot: int, boots: int, delay: int) -> list[Item]:
    """The code at F000:0000 (see the module docstring)."""
    last = BASE + boots
    if not (0 <= slot < 32 and boots >= 1 and last <= 0xFF and 1 <= delay <= 0xFFFF):
        raise ValueError(f"slot {slot}, boots {boots}, delay {delay}: out of range")
    data_port = 0x0CFC + (REGISTER & 3)
    return [
        "start",
        ("cli", lambda _l: b"\xFA"),
        ("xor ax, ax", lambda _l: b"\x31\xC0"),
        ("mov ds, ax                 ; DS = 0", lambda _l: b"\x8E\xD8"),
        ("inc byte [COUNTER]         ; one more boot (RAM survives the reset)",
         lambda _l: b"\xFE\x06" + w16(COUNTER)),
        ("mov bl, [COUNTER]", lambda _l: b"\x8A\x1E" + w16(COUNTER)),
        ("add bl, BASE               ; bl = this boot's value", lambda _l: b"\x80\xC3" + bytes([BASE])),
        ("mov dx, 0x0CF8             ; CONFIG_ADDRESS", lambda _l: b"\xBA" + w16(0x0CF8)),
        ("mov eax, 00:SLOT.0 reg 0x0C", lambda _l: b"\x66\xB8" + d32(config_address(slot))),
        ("out dx, eax", lambda _l: b"\x66\xEF"),
        ("mov dx, 0x0CFC             ; CONFIG_DATA, Cache Line Size's byte lane",
         lambda _l: b"\xBA" + w16(data_port)),
        ("mov al, bl", lambda _l: b"\x88\xD8"),
        ("out dx, al                 ; write Cache Line Size", lambda _l: b"\xEE"),
        ("in al, dx                  ; read it back", lambda _l: b"\xEC"),
        ("mov ah, al", lambda _l: b"\x88\xC4"),
        ("mov al, 'W'", lambda _l: b"\xB0" + WRITE_MARK),
        ("out 0xE9, al               ; debug console: W, value, read-back", lambda _l: b"\xE6\xE9"),
        ("mov al, bl", lambda _l: b"\x88\xD8"),
        ("out 0xE9, al", lambda _l: b"\xE6\xE9"),
        ("mov al, ah", lambda _l: b"\x88\xE0"),
        ("out 0xE9, al", lambda _l: b"\xE6\xE9"),
        ("cmp bl, BASE + boots", lambda _l: b"\x80\xFB" + bytes([last])),
        ("jae last                   ; the last boot halts", lambda lab: b"\x73"
         + rel8(lab, lab["jae_end"], "last")),
        "jae_end",
        ("mov cx, delay              ; RTC seconds changes to wait", lambda _l: b"\xB9" + w16(delay)),
        ("mov al, 0                  ; CMOS index 0: seconds", lambda _l: b"\xB0\x00"),
        ("out 0x70, al", lambda _l: b"\xE6\x70"),
        ("in al, 0x71", lambda _l: b"\xE4\x71"),
        ("mov bh, al                 ; the second seen last", lambda _l: b"\x88\xC7"),
        "tick",
        ("mov al, 0", lambda _l: b"\xB0\x00"),
        ("out 0x70, al", lambda _l: b"\xE6\x70"),
        ("in al, 0x71", lambda _l: b"\xE4\x71"),
        ("cmp al, bh", lambda _l: b"\x38\xF8"),
        ("je tick                    ; same second", lambda lab: b"\x74" + rel8(lab, lab["je_end"], "tick")),
        "je_end",
        ("mov bh, al", lambda _l: b"\x88\xC7"),
        ("loop tick                  ; until delay changes seen", lambda lab: b"\xE2"
         + rel8(lab, lab["loop_end"], "tick")),
        "loop_end",
        ("mov al, 0x06               ; SYS_RST | RST_CPU", lambda _l: b"\xB0\x06"),
        ("mov dx, 0x0CF9             ; ICH9 Reset Control", lambda _l: b"\xBA" + w16(0x0CF9)),
        ("out dx, al                 ; hard reset (guest-reset)", lambda _l: b"\xEE"),
        ("jmp halt                   ; until the reset lands", lambda lab: b"\xEB"
         + rel8(lab, lab["jmp_end"], "halt")),
        "jmp_end",
        "last",
        ("mov al, 'H'", lambda _l: b"\xB0" + HALT_MARK),
        ("out 0xE9, al               ; debug console: halted for good", lambda _l: b"\xE6\xE9"),
        "halt",
        ("cli", lambda _l: b"\xFA"),
        ("hlt", lambda _l: b"\xF4"),
        ("jmp halt", lambda lab: b"\xEB" + rel8(lab, lab["halt_end"], "halt")),
        "halt_end",
    ]


def image(slot: int, boots: int, delay: int = 3) -> bytes:
    """The 64 KiB ``-bios`` image for a guest whose function sits at ``00:slot.0``."""
    return rom_image(program(slot, boots, delay))


def listing(slot: int, boots: int, delay: int = 3) -> str:
    return asm_listing(program(slot, boots, delay))


def write_image(path: Path, slot: int, boots: int, delay: int = 3) -> Path:
    path.write_bytes(image(slot, boots, delay))
    return path


def writes(console: bytes) -> list[tuple[int, int]]:
    """(value written, value read back) per boot, from the debug console's bytes (``W v r`` each)."""
    out = []
    i = 0
    while console[i:i + 1] == WRITE_MARK and i + 3 <= len(console):
        out.append((console[i + 1], console[i + 2]))
        i += 3
    return out


def expected(boot: int) -> int:
    """The value boot number ``boot`` (1-based) writes."""
    return BASE + boot
