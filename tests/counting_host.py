"""
A simulated host that counts its reads, for tests of what a plan costs in sysfs I/O.

Shared by tests/test_refresh.py and tests/test_refresh_scale.py (tests import
helpers, never each other).
"""

from __future__ import annotations

from qreset.pci.address import PciAddress
from qreset.pci.host import FunctionInfo, RuntimeState
from qreset.pci.sim import SimHost


class CountingSimHost(SimHost):
    """Counts host reads: listings, full reads, run-time reads."""

    listings = 0
    infos = 0
    runtimes = 0

    async def functions(self) -> list[PciAddress]:
        self.listings += 1
        return await super().functions()

    async def info(self, addr: PciAddress) -> FunctionInfo:
        self.infos += 1
        return await super().info(addr)

    async def runtime(self, addr: PciAddress) -> RuntimeState:
        self.runtimes += 1
        return await super().runtime(addr)
