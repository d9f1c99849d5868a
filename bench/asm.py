"""
A two-pass hand assembler for the project's tiny 16-bit firmware images (``-bios``).

Why not nasm: the images are a few dozen instructions, the project installs no
assembler, and a listing with one line per instruction, its bytes and a comment
is what a reviewer checks against the Intel SDM anyway. A program is a list of
label names (str) and ``(comment, bytes_from_labels)`` lines; pass 1 gives every
label the value 0 to measure instruction lengths (they never depend on label
values: every jump is rel8), pass 2 fills them in.

Used by bench/firmware.py (the scale bench's on-demand guest) and
tests/window_guest.py (the stop-on-reset window guest of the libvirt lab).
"""

from __future__ import annotations

from collections.abc import Callable

#: A label, or one instruction: (source text and comment, its bytes given the label offsets).
Item = str | tuple[str, Callable[[dict[str, int]], bytes]]

#: Size of an image: QEMU wants a multiple of 64 KiB (hw/i386/x86.c x86_bios_rom_init).
IMAGE_SIZE = 0x10000
#: Where a 64 KiB image appears below 1 MiB (0xF0000-0xFFFFF), as a real-mode segment: QEMU maps
#: the last 128 KiB of ``-bios`` there as well as below 4 GiB (x86_bios_rom_init's isa-bios alias).
SEGMENT = 0xF000
#: The reset vector's offset in the image (CS base 0xFFFF0000, IP 0xFFF0 at reset: Intel SDM
#: vol. 3, 9.1.4 "First Instruction Executed").
RESET_VECTOR = 0xFFF0


def w16(v: int) -> bytes:
    return (v & 0xFFFF).to_bytes(2, "little")


def d32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "little")


def rel8(labels: dict[str, int], here_end: int, target: str) -> bytes:
    """The rel8 displacement from the end of the jump (``here_end``) to ``target``."""
    rel = labels[target] - here_end
    if not -128 <= rel <= 127:
        raise ValueError(f"jump to {target} out of rel8 range ({rel})")
    return bytes([rel & 0xFF])


class _Zero(dict[str, int]):
    """Pass 1: every label is 0 (instruction lengths do not depend on label values)."""

    def __missing__(self, key: str) -> int:
        return 0


def assemble(items: list[Item]) -> tuple[bytes, dict[str, int]]:
    """The code and every label's offset in it."""
    labels: dict[str, int] = {}
    for final in (False, True):
        code = bytearray()
        found: dict[str, int] = {}
        for item in items:
            if isinstance(item, str):
                found[item] = len(code)
            else:
                code += item[1](labels if final else _Zero())
        labels = found
    return bytes(code), labels


def rom_image(items: list[Item]) -> bytes:
    """A 64 KiB image: the code at offset 0 (F000:0000), ``jmp far F000:0000`` at the reset vector."""
    code, _labels = assemble(items)
    if len(code) >= RESET_VECTOR:
        raise ValueError(f"code of {len(code)} bytes runs into the reset vector")
    out = bytearray(IMAGE_SIZE)
    out[: len(code)] = code
    # jmp far ptr16:16 (EA), then zero padding up to the end of the image.
    out[RESET_VECTOR:RESET_VECTOR + 5] = b"\xEA" + w16(0) + w16(SEGMENT)
    return bytes(out)


def listing(items: list[Item]) -> str:
    """The program as offset, bytes and instruction (for review)."""
    lines: list[str] = []
    _code, labels = assemble(items)
    off = 0
    for item in items:
        if isinstance(item, str):
            lines.append(f"{item}:")
            continue
        b = item[1](labels)
        lines.append(f"  {off:04x}  {b.hex(' '):<36} {item[0]}")
        off += len(b)
    lines.append(f"  {RESET_VECTOR:04x}  {'ea 00 00 00 f0':<36} jmp far F000:0000  ; reset vector")
    return "\n".join(lines)
