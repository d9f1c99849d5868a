"""
The release flow: hand devices back to the host in a known state.

When a guest stops (or an admin runs ``qreset release``), every function it
had is reset — the whole reset domain where a function-level reset is not
enough — and rescanned. A function whose identity changed (new firmware, new
BAR layout) cannot simply be handed to a host driver: the kernel's ``struct
pci_dev`` still describes the old device. For those the bus leg is
re-probed: every function of the affected device is removed (``remove``) and
the parent bridge rescanned (``rescan``), so the kernel enumerates the device
as it now is and host drivers bind to that. Unchanged functions are left
alone: re-probing them would only churn drivers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qreset.engine import CycleReport, Engine, ProgressEvent
from qreset.pci.address import PciAddress
from qreset.plan import Policy

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ReleaseReport:
    vm: str
    functions: tuple[PciAddress, ...]
    cycle: CycleReport
    removed: list[PciAddress] = field(default_factory=list)
    rescanned: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.cycle.plan.ok and all(d.ok or self._reprobed(d.domain.covers)
                                          for d in self.cycle.domains)

    def _reprobed(self, covers: Sequence[PciAddress]) -> bool:
        return any(a in self.removed for a in covers)

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "functions": [str(a) for a in self.functions],
            "ok": self.ok,
            "reprobed": bool(self.removed),
            "removed": [str(a) for a in self.removed],
            "rescanned": self.rescanned,
            "cycle": self.cycle.to_json(),
        }


async def release(
    engine: Engine,
    vm: str,
    functions: Sequence[PciAddress],
    vms: Mapping[str, Sequence[PciAddress]],
    policy: Policy,
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> ReleaseReport:
    """Reset, rescan and (for identity changes only) re-probe ``functions``.

    ``vms`` are the *other* VMs still running: their functions are never hit.
    """
    others = {name: devs for name, devs in vms.items() if name != vm}
    owned = tuple(sorted(set(functions)))
    cycle = await engine.reset(vm, owned, {**others, vm: owned}, policy, progress=progress)
    report = ReleaseReport(vm, owned, cycle)
    if not cycle.identity_changed:
        return report
    topo = await engine.topology()
    host = engine.host
    # Re-probe per device (slot): every function of a multifunction device goes
    # together, because the kernel enumerates function 0 first.
    bridges: dict[str, PciAddress | None] = {}
    victims: set[PciAddress] = set()
    for addr in cycle.identity_changed:
        victims.update(a for a in topo.functions if a.slot == addr.slot)
        bridges[str(topo.parent(addr))] = topo.parent(addr)
    for addr in sorted(victims, reverse=True):  # functions > 0 first, like pci_stop_and_remove_bus_device
        logger.info("re-probe: removing %s (identity changed)", addr)
        await host.remove(addr)
        report.removed.append(addr)
    for key, bridge in bridges.items():
        logger.info("re-probe: rescanning below %s", key)
        await host.rescan(bridge)
        report.rescanned.append(key if bridge is not None else "bus")
    await engine.topology(refresh=True)
    return report
