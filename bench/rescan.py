"""
Rescan-diff cost per function: median µs of :func:`qreset.diff.diff_config`
on a 4 KiB PCIe endpoint config space, unchanged and changed.

The changed case is what a userspace secondary bus reset leaves behind:
the function at power-on defaults (Command 0, BARs cleared, MSI/MSI-X
disabled, PCIe control registers at their defaults, AER masks cleared, LTR
cleared), plus status bits that moved. Goal (issue 3): ≤ 100 µs each.

Run: ``.venv/bin/python bench/rescan.py [--rounds N]``. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

from qreset.diff import diff_config, register_map
from qreset.pci import regs
from qreset.pci.host import IORESOURCE_MEM, IORESOURCE_MEM_64, IORESOURCE_PREFETCH, Resource


def endpoint_config() -> bytes:
    """A busy PCIe endpoint: PM, MSI, PCIe v2, MSI-X; AER, DSN, LTR, L1SS, ARI, ATS, REBAR."""
    b = bytearray(regs.CFG_SPACE_EXP_SIZE)

    def w16(off: int, v: int) -> None:
        b[off:off + 2] = v.to_bytes(2, "little")

    def w32(off: int, v: int) -> None:
        b[off:off + 4] = v.to_bytes(4, "little")

    w16(0x00, 0x10DE)
    w16(0x02, 0x2204)
    w16(0x04, 0x0406)
    w16(0x06, regs.STATUS_CAP_LIST)
    w32(0x08, 0x030000A1)
    b[0x0C] = 0x10
    w32(0x10, 0xF6000000)                     # BAR0 32-bit mem
    w32(0x14, 0xE000000C)                     # BAR1 64-bit prefetchable
    w32(0x18, 0x00000000)
    w32(0x1C, 0xF000000C)                     # BAR3 64-bit prefetchable
    w32(0x20, 0x00000000)
    w32(0x24, 0x0000E001)                     # BAR5 I/O
    w16(0x2C, 0x1458)
    w16(0x2E, 0x4037)
    w32(0x30, 0xF7000000)
    b[0x34] = 0x40
    b[0x3C] = 0x0B
    b[0x3D] = 0x01
    # PM at 0x40 -> MSI at 0x50 -> PCIe at 0x70 -> MSI-X at 0xB0
    b[0x40:0x42] = bytes((regs.CAP_ID_PM, 0x50))
    w16(0x42, 0x0003)
    w16(0x44, 0x0008)
    b[0x50:0x52] = bytes((regs.CAP_ID_MSI, 0x70))
    w16(0x52, 0x0181 | 0x0080)                # 64-bit, maskable, enabled
    w32(0x54, 0xFEE00000)
    w32(0x58, 0x00000000)
    w16(0x5C, 0x4021)
    w32(0x60, 0x00000000)
    b[0x70:0x72] = bytes((regs.CAP_ID_EXP, 0xB0))
    w16(0x72, 0x0002)                         # v2 endpoint
    w32(0x74, 0x10008FE1 | regs.EXP_DEVCAP_FLR)
    w16(0x78, 0x5937)
    w16(0x7A, 0x0010)
    w32(0x7C, 0x0047AC83)
    w16(0x80, 0x0043)
    w16(0x82, 0x1083)
    w32(0x94, 0x00070993)
    w16(0x98, 0x0460)
    w32(0x9C, 0x0000000E)
    w16(0xA0, 0x0003)
    b[0xB0:0xB2] = bytes((regs.CAP_ID_MSIX, 0x00))
    w16(0xB2, 0x8008)
    w32(0xB4, 0x00002000)
    w32(0xB8, 0x00003000)
    ext = [
        (0x100, regs.EXT_CAP_ID_ERR, 2, {0x108: 0x00400000, 0x10C: 0x00462030, 0x114: 0x0000E000,
                                         0x118: 0x000000A0}),
        (0x150, regs.EXT_CAP_ID_DSN, 1, {0x154: 0x12345678, 0x158: 0x9ABCDEF0}),
        (0x160, regs.EXT_CAP_ID_LTR, 1, {0x164: 0x10011001}),
        (0x170, regs.EXT_CAP_ID_L1SS, 1, {0x174: 0x0028281F, 0x178: 0x40A0000F, 0x17C: 0x00000028}),
        (0x180, regs.EXT_CAP_ID_ARI, 1, {0x184: 0x00000100}),
        (0x190, regs.EXT_CAP_ID_ATS, 1, {0x194: 0x80000020}),
        (0x1A0, regs.EXT_CAP_ID_REBAR, 1, {0x1A4: 0x0003F000, 0x1A8: 0x00000820}),
    ]
    for i, (pos, cid, ver, fields) in enumerate(ext):
        nxt = ext[i + 1][0] if i + 1 < len(ext) else 0
        w32(pos, cid | (ver << 16) | (nxt << 20))
        for off, val in fields.items():
            w32(off, val)
    return bytes(b)


def after_sbr(before: bytes) -> bytes:
    """``before`` at power-on defaults, with some status bits moved."""
    b = bytearray(before)

    def w16(off: int, v: int) -> None:
        b[off:off + 2] = v.to_bytes(2, "little")

    def w32(off: int, v: int) -> None:
        b[off:off + 4] = v.to_bytes(4, "little")

    w16(0x04, 0)
    w16(0x06, regs.STATUS_CAP_LIST | 0x0008)  # Interrupt Status moved
    b[0x0C] = 0
    w32(0x10, 0)
    w32(0x14, 0x0000000C)
    w32(0x1C, 0x0000000C)
    w32(0x24, 0x00000001)
    w32(0x30, 0)
    b[0x3C] = 0
    w16(0x52, 0x0180)
    w32(0x54, 0)
    w16(0x5C, 0)
    w16(0x78, 0x2810)
    w16(0x7A, 0x0000)
    w16(0x80, 0x0000)
    w16(0x98, 0x0000)
    w16(0xB2, 0x0008)
    w32(0x108, 0)
    w32(0x10C, 0x00462030)
    w32(0x114, 0x00002000)
    w32(0x118, 0x000000A0)
    w32(0x164, 0)
    w32(0x178, 0)
    w32(0x17C, 0)
    w32(0x194, 0x00000020)
    return bytes(b)


RESOURCES = (
    Resource(0xF6000000, 0xF6FFFFFF, IORESOURCE_MEM),
    Resource(0xE0000000, 0xEFFFFFFF, IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_MEM_64),
)


def _median_us(before: bytes, after: bytes, rounds: int) -> tuple[float, str]:
    samples: list[float] = []
    result = ""
    for _ in range(rounds):
        t0 = time.perf_counter()
        d = diff_config(before, after, RESOURCES, RESOURCES)
        samples.append((time.perf_counter() - t0) * 1e6)
        result = d.change.value
    return statistics.median(samples), f"{result}, {len(d.registers)} registers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    before = endpoint_config()
    same = bytes(before)          # equal, distinct object: a real compare
    changed = after_sbr(before)
    register_map.cache_clear()
    t0 = time.perf_counter()
    diff_config(before, changed, RESOURCES, RESOURCES)
    first = (time.perf_counter() - t0) * 1e6
    print(f"config space: {len(before)} bytes; first changed diff (builds the register map): {first:.1f} µs")
    for label, after in (("unchanged", same), ("changed", changed)):
        med, what = _median_us(before, after, args.rounds)
        print(f"{label:>10}: median {med:8.2f} µs per function ({what}; {args.rounds} rounds; goal ≤ 100 µs)")


if __name__ == "__main__":
    main()
