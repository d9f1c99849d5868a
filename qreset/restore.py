"""
Restore: write back exactly the registers a reset changed, in the kernel's order.

Only for a :class:`~qreset.diff.Diff` whose change is ``STATE``. A function
whose identity changed, or that is absent, gets **no write at all**: its
saved state belongs to a different (or missing) function, and writing it
could program BARs over another device's window or enable DMA on firmware
we know nothing about. The caller escalates instead.

Order: ``pci_restore_state`` in ``drivers/pci/pci.c`` (Linux 6.18)::

    pci_restore_pcie_state   LTR, L1SS, then DEVCTL LNKCTL SLTCTL RTCTL DEVCTL2 LNKCTL2 SLTCTL2
    PASID, PRI, ATS, VC, REBAR, DPC, PTM, TPH
    pci_restore_aer_state    UNCOR_MASK UNCOR_SEVER COR_MASK CAP ROOT_COMMAND
    pci_restore_config_space type 0: dwords 15..10, BARs 9..4 (retry 10), 3..0
                             type 1: 15..12, 11..9, 8..0
    PCI-X, MSI/MSI-X (message, mask, then control), ACS, IOV (VF Enable last)

preceded by the PM control register (``pci_power_up`` runs before
``pci_restore_state`` in the reset paths) and followed by writable registers
the kernel does not restore. The kernel writes whole header dwords; we write
each differing register at its own width, so RW1C status bits sharing a dword
(Status next to Command) are never written. Bits a register marks as volatile
(RW1C, self-clearing triggers such as Initiate FLR) are written as 0.

Every write goes through :meth:`PciHost.write_config` and is counted, then the
whole config space is re-read and diffed against the saved copy: ``verified``
means the function is back to what it was (ignoring status registers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from qreset.diff import Change, Diff, RegisterDiff, diff_config
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.host import PciHost, Resource

__all__ = ["RestoreResult", "Write", "plan_writes", "restore", "verify", "write_back"]

logger = logging.getLogger(__name__)

# pci_restore_config_dword: mdelay(1) between retries of a BAR write.
BAR_RETRY_DELAY = 0.001
# sriov_restore_state (drivers/pci/iov.c): msleep(100) after re-enabling VFs.
VF_ENABLE_DELAY = 0.100


@dataclass(frozen=True, slots=True)
class Write:
    """One config write: ``value`` (``size`` bytes, little-endian) at ``offset``."""

    offset: int
    size: int
    value: int
    name: str
    retry: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "offset": f"{self.offset:#05x}", "size": self.size,
                "value": f"{self.value:#0{self.size * 2 + 2}x}"}


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What restoring one function did: writes issued, and whether it verified."""

    writes: int = 0
    verified: bool = False
    written: tuple[Write, ...] = ()
    remaining: tuple[RegisterDiff, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "writes": self.writes,
            "verified": self.verified,
            "written": [w.to_json() for w in self.written],
            "remaining": [r.to_json() for r in self.remaining],
        }


def plan_writes(diff: Diff) -> list[Write]:
    """The writes that restore ``diff``'s state registers, in kernel order. Pure.

    Empty unless ``diff.change`` is STATE: nothing is ever planned for an
    identity change or an absent function.
    """
    if diff.change is not Change.STATE:
        return []
    state = [(d.register, d) for d in diff.state_registers if d.register is not None]
    state.sort(key=lambda rd: (rd[0].group, rd[0].seq, rd[1].offset))
    out: list[Write] = []
    for reg, d in state:
        if d.size not in (1, 2, 4):
            continue
        out.append(Write(d.offset, d.size, d.before & ~reg.ignore, d.name, reg.retry))
    return out


async def _read(host: PciHost, addr: PciAddress, offset: int, size: int) -> int:
    data = await host.read_config(addr, offset + size)
    return int.from_bytes(data[offset:offset + size], "little") if len(data) >= offset + size else -1


async def write_back(host: PciHost, addr: PciAddress, diff: Diff) -> tuple[int, tuple[Write, ...]]:
    """Issue :func:`plan_writes` on ``addr``; returns (config writes issued, the planned writes).

    Writes nothing unless ``diff.change`` is STATE. Raises HostError if a write fails.
    """
    writes = plan_writes(diff)
    count = 0
    for w in writes:
        data = w.value.to_bytes(w.size, "little")
        logger.debug("%s: restore %s at %#x: %#x", addr, w.name, w.offset, w.value)
        await host.write_config(addr, w.offset, data)
        count += 1
        # pci_restore_config_dword: re-read, rewrite up to ``retry`` times, 1 ms apart.
        for _ in range(w.retry):
            if await _read(host, addr, w.offset, w.size) == w.value:
                break
            await host.sleep(BAR_RETRY_DELAY)
            await host.write_config(addr, w.offset, data)
            count += 1
        if w.name == "SR-IOV Control" and w.value & regs.SRIOV_CTRL_VFE:
            await host.sleep(VF_ENABLE_DELAY)
    return count, tuple(writes)


async def verify(
    host: PciHost,
    addr: PciAddress,
    before: bytes,
    before_resources: tuple[Resource, ...] = (),
    after_resources: tuple[Resource, ...] = (),
) -> tuple[bool, tuple[RegisterDiff, ...]]:
    """Re-read ``addr`` and diff against ``before``: (back to what it was?, registers still off)."""
    now = await host.read_config(addr, len(before))
    check = diff_config(before, now, before_resources, after_resources)
    remaining = tuple(r for r in check.registers if r.kind.value in ("state", "identity"))
    verified = check.change is Change.NONE
    if not verified:
        logger.warning("%s: restore did not verify: %s", addr, check.summary())
    return verified, remaining


async def restore(
    host: PciHost,
    addr: PciAddress,
    before: bytes,
    diff: Diff,
    before_resources: tuple[Resource, ...] = (),
    after_resources: tuple[Resource, ...] = (),
) -> RestoreResult:
    """Write back ``diff``'s state registers on ``addr``, then re-read and verify.

    Returns without touching the device unless ``diff.change`` is STATE.
    Raises HostError if a write fails (the caller reports it per function).
    """
    if diff.change is not Change.STATE:
        return RestoreResult(0, diff.change is Change.NONE)
    count, writes = await write_back(host, addr, diff)
    verified, remaining = await verify(host, addr, before, before_resources, after_resources)
    return RestoreResult(count, verified, writes, remaining)
