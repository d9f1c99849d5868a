"""
A 64 KiB firmware image (``qemu-system-x86_64 -bios FILE``) for guests that
reset *on demand*: no POST, no boot disk, an idle vCPU until the host injects
an NMI, and then a real guest-initiated hard reset through port 0xCF9.

Why not the boot sector of :mod:`tests.guest`: that guest reboots itself in a
loop, so the rate is the guest's, every reboot pays SeaBIOS's POST (CPU that
is not qreset's), and the firmware adds a reset of its own on the way up. The
scale bench needs hundreds of guests that cost nothing while idle and reset
exactly when told to, once per NMI.

What the code does (16-bit real mode, hand-assembled below with bench.asm, one line per
instruction):

1. The reset vector (physical 0xFFFFFFF0 = offset 0xFFF0 of the image; QEMU
   maps the last 128 KiB of ``-bios`` also below 1 MiB, so a 64 KiB image is
   at 0xF0000: hw/i386/x86.c ``x86_bios_rom_init``) jumps far to F000:0000.
2. Masks both 8259 PICs (OCW1 = 0xFF) and points all 256 real-mode vectors
   at an ``iret``, so no stray interrupt or exception can run wild.
3. Vector 2 (NMI, IVT entry at 0000:0008) → the NMI handler.
4. Programs the local APIC as SeaBIOS does (src/fw/smp.c: SVR enable, LINT1 =
   NMI): QEMU's ``inject-nmi`` on x86 goes through the APIC's LVT LINT1
   (hw/i386/x86.c ``x86_nmi`` → hw/intc/apic.c ``apic_deliver_nmi`` →
   ``apic_local_deliver``), which is *masked* after reset (apic_common.c
   ``apic_init_reset``): without this step an injected NMI is dropped. The
   APIC lives at 0xFEE00000 (Intel SDM vol. 3 10.4.1), beyond real mode's
   64 KiB segments, so the code loads DS with a flat 4 GiB descriptor in
   protected mode and returns to real mode keeping that limit ("unreal mode").
   LINT0 (ExtINT from the PIC) is masked too.
5. ``sti; hlt`` in a loop: with every interrupt source masked, the vCPU sleeps
   (QEMU's TCG vCPU thread waits on its halt condition), so an idle guest costs
   no host CPU.
6. The NMI handler writes 0x06 (SYS_RST | RST_CPU) to the Reset Control
   register at port 0xCF9 (Intel ICH9 datasheet 13.7.5, hw/isa/lpc_ich9.c
   ``ich9_rst_cnt_write``: bit 2 → ``qemu_system_reset_request(
   SHUTDOWN_CAUSE_GUEST_RESET)``), then halts with interrupts off until the
   reset lands. A reset starts again at step 1.

A byte ``F`` goes to QEMU's debug console (port 0xE9, ``-debugcon``,
hw/char/debugcon.c) at each start and a byte ``R`` once the NMI path is armed:
the file holds ``FR`` per start, so its size says how often the guest started
and whether an NMI sent now would be delivered.

    python -m bench.firmware OUT.bin     # write the image
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.asm import SEGMENT, Item, d32, rel8, rom_image, w16
from bench.asm import listing as asm_listing

#: The mark written to the debug console at each start.
BOOT_MARK = b"F"
#: The mark written once the NMI path is armed (an NMI injected before it is dropped).
READY_MARK = b"R"
#: Local APIC register block (Intel SDM vol. 3, 10.4.1: default base 0xFEE00000).
APIC_BASE = 0xFEE00000
APIC_SVR = 0x0F0        # Spurious-Interrupt Vector Register (bit 8: APIC software enable)
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360

def _program() -> list[Item]:
    """The code at F000:0000, as (comment, bytes-from-labels) lines and label names."""
    # Each lambda gets the label offsets (pass 1: all zero, to measure lengths).
    return [
        "start",
        ("cli", lambda _l: b"\xFA"),
        ("xor ax, ax", lambda _l: b"\x31\xC0"),
        ("mov ds, ax                 ; DS = 0: the IVT", lambda _l: b"\x8E\xD8"),
        ("mov ss, ax", lambda _l: b"\x8E\xD0"),
        ("mov sp, 0x7C00             ; a stack for the NMI frame", lambda _l: b"\xBC" + w16(0x7C00)),
        ("mov al, 'F'", lambda _l: b"\xB0" + BOOT_MARK),
        ("out 0xE9, al               ; debug console: one mark per start", lambda _l: b"\xE6\xE9"),
        ("mov al, 0xFF", lambda _l: b"\xB0\xFF"),
        ("out 0x21, al               ; master 8259 OCW1: mask IRQ0-7", lambda _l: b"\xE6\x21"),
        ("out 0xA1, al               ; slave 8259 OCW1: mask IRQ8-15", lambda _l: b"\xE6\xA1"),
        ("xor bx, bx                 ; IVT entry 0", lambda _l: b"\x31\xDB"),
        ("mov cx, 256                ; every vector", lambda _l: b"\xB9" + w16(256)),
        "fill",
        ("mov word [bx], iret_stub   ; offset", lambda lab: b"\xC7\x07" + w16(lab["iret_stub"])),
        ("mov word [bx+2], 0xF000    ; segment", lambda _l: b"\xC7\x47\x02" + w16(SEGMENT)),
        ("add bx, 4", lambda _l: b"\x83\xC3\x04"),
        ("loop fill", lambda lab: b"\xE2" + rel8(lab, lab["fill_end"], "fill")),
        "fill_end",
        ("mov word [0x0008], nmi     ; vector 2 (NMI) -> F000:nmi", lambda lab: b"\xC7\x06\x08\x00"
         + w16(lab["nmi"])),
        ("lgdt cs:[gdtr]             ; 16-bit operand: 24-bit base", lambda lab: b"\x2E\x0F\x01\x16"
         + w16(lab["gdtr"])),
        ("mov eax, cr0", lambda _l: b"\x0F\x20\xC0"),
        ("or al, 1                   ; PE", lambda _l: b"\x0C\x01"),
        ("mov cr0, eax               ; protected mode (CS keeps its real-mode cache)",
         lambda _l: b"\x0F\x22\xC0"),
        ("mov bx, 0x08               ; GDT entry 1: flat 4 GiB data", lambda _l: b"\xBB" + w16(0x08)),
        ("mov ds, bx", lambda _l: b"\x8E\xDB"),
        ("and al, 0xFE", lambda _l: b"\x24\xFE"),
        ("mov cr0, eax               ; real mode again; DS keeps base 0, limit 4 GiB",
         lambda _l: b"\x0F\x22\xC0"),
        ("mov dword [0xFEE000F0], 0x1FF    ; SVR: APIC enable, spurious vector 0xFF",
         lambda _l: b"\x66\x67\xC7\x05" + d32(APIC_BASE + APIC_SVR) + d32(0x1FF)),
        ("mov dword [0xFEE00350], 0x10700  ; LVT LINT0: ExtINT, masked",
         lambda _l: b"\x66\x67\xC7\x05" + d32(APIC_BASE + APIC_LVT_LINT0) + d32(0x10700)),
        ("mov dword [0xFEE00360], 0x8400   ; LVT LINT1: NMI, unmasked (as SeaBIOS)",
         lambda _l: b"\x66\x67\xC7\x05" + d32(APIC_BASE + APIC_LVT_LINT1) + d32(0x8400)),
        ("xor ax, ax", lambda _l: b"\x31\xC0"),
        ("mov ds, ax", lambda _l: b"\x8E\xD8"),
        ("mov al, 'R'", lambda _l: b"\xB0" + READY_MARK),
        ("out 0xE9, al               ; debug console: NMIs are delivered from here on",
         lambda _l: b"\xE6\xE9"),
        "idle",
        ("sti", lambda _l: b"\xFB"),
        ("hlt                        ; sleep until the NMI", lambda _l: b"\xF4"),
        ("jmp idle", lambda lab: b"\xEB" + rel8(lab, lab["idle_end"], "idle")),
        "idle_end",
        "iret_stub",
        ("iret                       ; any other vector: return", lambda _l: b"\xCF"),
        "nmi",
        ("mov al, 0x06               ; SYS_RST | RST_CPU", lambda _l: b"\xB0\x06"),
        ("mov dx, 0x0CF9             ; ICH9 Reset Control", lambda _l: b"\xBA" + w16(0x0CF9)),
        ("out dx, al                 ; hard reset (guest-reset)", lambda _l: b"\xEE"),
        "halt",
        ("cli", lambda _l: b"\xFA"),
        ("hlt", lambda _l: b"\xF4"),
        ("jmp halt", lambda lab: b"\xEB" + rel8(lab, lab["halt_end"], "halt")),
        "halt_end",
        "gdt",
        ("dq 0                       ; null descriptor", lambda _l: bytes(8)),
        ("dq flat data: base 0, limit 0xFFFFF pages, present, writable, accessed (no write to ROM), G=1, D=1",
         lambda _l: b"\xFF\xFF\x00\x00\x00\x93\xCF\x00"),
        "gdtr",
        ("dw 15                      ; GDT limit", lambda _l: w16(15)),
        ("dd 0xF0000 + gdt           ; GDT linear base", lambda lab: d32(SEGMENT * 16 + lab["gdt"])),
    ]


def image() -> bytes:
    """The 64 KiB image: code at offset 0, ``jmp far F000:0000`` at the reset vector."""
    return rom_image(_program())


def listing() -> str:
    """The program as offset, bytes and instruction (for review)."""
    return asm_listing(_program())


def write_image(path: Path) -> Path:
    path.write_bytes(image())
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(listing())
        print("usage: python -m bench.firmware OUT.bin", file=sys.stderr)
        return 2
    write_image(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
