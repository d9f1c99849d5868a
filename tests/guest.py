"""
The self-rebooting guest used by the daemon's tests, the demo and the bench.

A 512-byte MBR boot sector that SeaBIOS loads at 0x7C00 and jumps to. It
writes one byte ('B') to QEMU's debug console (``-debugcon``, I/O port 0xE9,
``hw/char/debugcon.c``) so the test can count boots, then asks for a hard
reset through the Reset Control register at I/O port 0xCF9 (value 0x06: SYS_RST
| RST_CPU, Intel ICH9 datasheet 13.7.5; emulated by ``hw/isa/lpc_ich9.c`` on
q35), which QEMU turns into a guest-initiated system reset (ShutdownCause
``guest-reset``). The firmware issues a second reset of its own on the way
back up, so a run of the boot sector is about two reset cycles
(see /work/shared/reference/qmp-reset-flow.md): count boots and cycles apart.
"""

from __future__ import annotations

from pathlib import Path

BOOT_MARK = b"B"

CODE = bytes([
    0xB0, BOOT_MARK[0],   # mov al, 'B'
    0xE6, 0xE9,           # out 0xE9, al      ; debug console
    0xB0, 0x06,           # mov al, 0x06
    0xBA, 0xF9, 0x0C,     # mov dx, 0x0CF9
    0xEE,                 # out dx, al        ; ICH9/PIIX reset control: hard reset
    0xFA, 0xF4,           # cli; hlt
    0xEB, 0xFE,           # jmp $
])


POWEROFF_MARK = b"P"

#: A guest that powers itself off: ACPI S5 through PM1a_CNT. SeaBIOS puts the
#: ICH9 PM I/O base at 0x600 on q35 (seen: 0x604 works, 0xB004 — PIIX's — does
#: not), PM1a_CNT is at base + 4, and QEMU's DSDT declares _S5 as SLP_TYP 0, so
#: SLP_EN (bit 13) alone asks for "soft power off" (hw/acpi/core.c
#: acpi_pm1_cnt_write: sus_typ 0 → SHUTDOWN_CAUSE_GUEST_SHUTDOWN).
POWEROFF_CODE = bytes([
    0xB0, POWEROFF_MARK[0],  # mov al, 'P'
    0xE6, 0xE9,              # out 0xE9, al
    0xBA, 0x04, 0x06,        # mov dx, 0x0604    ; PM1a_CNT
    0xB8, 0x00, 0x20,        # mov ax, 0x2000    ; SLP_EN, SLP_TYP 0 (S5)
    0xEF,                    # out dx, ax
    0xFA, 0xF4,              # cli; hlt
    0xEB, 0xFE,              # jmp $
])


ACPI_BUTTON_MARK = b"A"

#: A guest that waits for the ACPI power button, then powers off (what
#: ``virsh reboot --mode acpi`` and ``virsh shutdown`` need from a guest). It
#: sets PWRBTN_EN (bit 8) in PM1_EN (PM base + 2) and polls PWRBTN_STS (bit 8)
#: in PM1_STS (PM base + 0): QEMU sets the status only while the enable bit is
#: set (hw/acpi/core.c acpi_pm1_evt_power_down). No SCI handler is needed.
ACPI_BUTTON_CODE = bytes([
    0xB0, ACPI_BUTTON_MARK[0],  # mov al, 'A'
    0xE6, 0xE9,                 # out 0xE9, al
    0xBA, 0x02, 0x06,           # mov dx, 0x0602    ; PM1_EN
    0xB8, 0x00, 0x01,           # mov ax, 0x0100    ; PWRBTN_EN
    0xEF,                       # out dx, ax
    0xBA, 0x00, 0x06,           # wait: mov dx, 0x0600  ; PM1_STS
    0xED,                       # in ax, dx
    0xA9, 0x00, 0x01,           # test ax, 0x0100   ; PWRBTN_STS
    0x74, 0xF7,                 # jz wait (-9)
    0xBA, 0x04, 0x06,           # mov dx, 0x0604    ; PM1a_CNT
    0xB8, 0x00, 0x20,           # mov ax, 0x2000    ; SLP_EN, SLP_TYP 0 (S5)
    0xEF,                       # out dx, ax
    0xFA, 0xF4,                 # cli; hlt
    0xEB, 0xFE,                 # jmp $
])


def boot_sector(code: bytes = CODE) -> bytes:
    """The 512-byte image: code, zero padding, and the 0x55 0xAA boot signature."""
    image = code + bytes(510 - len(code)) + b"\x55\xaa"
    assert len(image) == 512
    return image


#: Disk size. SeaBIOS refuses a one-sector disk ("Boot failed: could not read
#: the boot disk", seen with QEMU 7.2's SeaBIOS 1.16): pad to 1 MiB (sparse).
DISK_SIZE = 1 << 20


def write_boot_image(path: Path, program: str = "reboot") -> Path:
    """``program``: "reboot" (resets itself), "poweroff" (ACPI S5), "acpi-button" (ACPI S5 on
    the power button) or "blank" (not bootable)."""
    codes = {"reboot": boot_sector(CODE), "poweroff": boot_sector(POWEROFF_CODE),
             "acpi-button": boot_sector(ACPI_BUTTON_CODE), "blank": b""}
    with path.open("wb") as f:
        f.write(codes[program])
        f.truncate(DISK_SIZE)
    return path


def count_boots(debug_log: Path) -> int:
    """How many times the boot sector ran (one mark per run on the debug console)."""
    try:
        return debug_log.read_bytes().count(BOOT_MARK)
    except FileNotFoundError:
        return 0
