"""
How each reset method is carried out (a domain's ``assert`` and ``settle`` steps), and
the readiness poll after it (``pci_dev_wait``).

Function-level methods (``flr``, ``af_flr``, ``pm``, ``device_specific``,
``acpi``) and ``bus`` are the kernel's ``reset`` attribute narrowed to that
method (``PciHost.reset_function``: the kernel saves and restores state itself);
``reset_subordinate`` is the bridge attribute; ``vfio_hot_reset`` is
``PciHost.hot_reset`` (the VFIO ioctl on a real host, simulated on the
simulated one); ``user_sbr`` is done here from userspace, the way
``pci_reset_secondary_bus`` and ``pci_bridge_wait_for_secondary_bus`` in
drivers/pci/pci.c do it (see :meth:`MethodSteps._settle` for the waits).
Every wait goes through ``host.sleep`` so the simulated host can scale time.

:class:`MethodSteps` is mixed into the domain run of :mod:`qreset.execute`,
which provides the host, the domain, what was saved, and the timing and
progress helpers declared here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from qreset.errors import HostError, NoSuchFunction, ResetFailed
from qreset.execute_types import DomainResult, EngineSettings, FunctionOutcome, _reset_wall_limit, _Saved
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.cfgspace import parse_config, u16, u32
from qreset.pci.host import PciHost
from qreset.plan import Domain, Method

logger = logging.getLogger("qreset.execute")

# drivers/pci/pci.c
PCIE_RESET_READY_POLL = 60.0   # PCIE_RESET_READY_POLL_MS
SBR_HOLD = 0.002               # pci_reset_secondary_bus: msleep(2), Trst 1 ms doubled
PCIE_SETTLE = 0.100            # pci_bridge_wait_for_secondary_bus: delay (d3cold_delay, 100 ms)
CONVENTIONAL_SETTLE = 1.100    # msleep(1000 + delay): Tpvrh + Trhfa, PCI 3.0 sec 4.3.2
LINK_ACTIVE_DELAY = 0.020      # pcie_wait_for_link_delay: msleep(20) before polling DLLLA
LINK_ACTIVE_TIMEOUT = 1.0      # PCIE_LINK_RETRAIN_TIMEOUT_MS
# PCI_EXP_LNKCAP_SLS encoding: 2 = 5.0 GT/s (include/uapi/linux/pci_regs.h)
_LNKCAP_SLS_5_0GB = 2


class MethodSteps:
    """The ``assert``/``settle`` steps of one domain by method, and the readiness poll."""

    host: PciHost
    settings: EngineSettings
    domain: Domain
    result: DomainResult
    saved: dict[PciAddress, _Saved]
    outcomes: dict[PciAddress, FunctionOutcome]

    if TYPE_CHECKING:
        def emit(self, phase: str, message: str) -> None: ...

        def timed(self, phase: str) -> contextlib.AbstractContextManager[None]: ...

    async def _reset(self) -> None:
        d = self.domain
        m = d.method
        wall_limit = _reset_wall_limit(self.host, self.settings.reset_timeout)
        if m is Method.USER_SBR:
            await self._user_sbr()
            return
        with self.timed("assert"):
            self.emit("assert", f"{m.value} via {d.write_target}")
            async with asyncio.timeout(wall_limit):
                if m is Method.RESET_SUBORDINATE:
                    await self.host.reset_subordinate(d.target)
                elif m is Method.VFIO_HOT_RESET:
                    await self._vfio_hot_reset()
                else:
                    # Function methods and 'bus': the function's own reset attribute.
                    await self.host.reset_function(d.write_target, m.value)
        self.emit("assert", f"{m.value} done in {self.result.phases['assert'] * 1000:.1f} ms")

    async def _vfio_hot_reset(self) -> None:
        d = self.domain
        groups = sorted({s.info.iommu_group for s in self.saved.values() if s.info.iommu_group is not None})
        devices = [d.write_target, *(a for a in d.covers if a != d.write_target)]
        await self.host.hot_reset(devices, groups)

    async def _user_sbr(self) -> None:
        d = self.domain
        bridge = d.target
        braw = await self.host.read_config(bridge, regs.CFG_SPACE_EXP_SIZE)
        bcfg = parse_config(braw)
        if not bcfg.present or not bcfg.is_bridge:
            raise ResetFailed(str(bridge), "is not a present PCI bridge; no secondary bus reset")
        ctrl = u16(braw, regs.BRIDGE_CONTROL) & ~regs.BRIDGE_CTL_BUS_RESET
        with self.timed("assert"):
            await self.host.write_config(bridge, regs.BRIDGE_CONTROL,
                                         (ctrl | regs.BRIDGE_CTL_BUS_RESET).to_bytes(2, "little"))
            try:
                # pci_reset_secondary_bus: "PCI spec v3.0 7.6.4.2 requires minimum
                # Trst of 1ms.  Double this to 2ms".
                await self.host.sleep(SBR_HOLD)
            finally:
                # Never leave Secondary Bus Reset asserted, even when cancelled.
                await self.host.write_config(bridge, regs.BRIDGE_CONTROL, ctrl.to_bytes(2, "little"))
        self.emit("assert", f"secondary bus reset on {bridge} held {SBR_HOLD * 1000:.0f} ms")
        with self.timed("settle"):
            why = await self._settle(bridge, braw)
        self.emit("settle", why)

    async def _settle(self, bridge: PciAddress, braw: bytes) -> str:
        """The wait before the first config request below ``bridge`` (pci_bridge_wait_for_secondary_bus)."""
        cfg = parse_config(braw)
        ptype = cfg.pcie_type
        if ptype is None or ptype == regs.EXP_TYPE_PCI_BRIDGE:
            await self.host.sleep(CONVENTIONAL_SETTLE)
            return f"conventional secondary bus: waited {CONVENTIONAL_SETTLE * 1000:.0f} ms (Tpvrh + Trhfa)"
        exp = cfg.find_cap(regs.CAP_ID_EXP)
        assert exp is not None  # pcie_type is not None
        lnkcap = u32(braw, exp.offset + regs.EXP_LNKCAP)
        fast = (lnkcap & regs.EXP_LNKCAP_SLS) > _LNKCAP_SLS_5_0GB
        if fast and lnkcap & regs.EXP_LNKCAP_DLLLARC:
            # pcie_wait_for_link_delay: 20 ms, then poll Data Link Layer Link
            # Active every 1 ms up to PCIE_LINK_RETRAIN_TIMEOUT_MS, then the delay.
            await self.host.sleep(LINK_ACTIVE_DELAY)
            waited = LINK_ACTIVE_DELAY
            up = False
            while waited < LINK_ACTIVE_TIMEOUT + LINK_ACTIVE_DELAY:
                sta = await self.host.read_config(bridge, exp.offset + regs.EXP_LNKSTA + 2)
                if u16(sta, exp.offset + regs.EXP_LNKSTA) & regs.EXP_LNKSTA_DLLLA:
                    up = True
                    break
                await self.host.sleep(0.001)  # pcie_wait_for_link_status: msleep(1) between reads
                waited += 0.001
            await self.host.sleep(PCIE_SETTLE)
            link = f"link up after {waited * 1000:.0f} ms" if up else "link not up after 1 s (polling anyway)"
            return f"{link}, then waited {PCIE_SETTLE * 1000:.0f} ms (PCIe r6.0 sec 6.6.1)"
        if fast:
            # pcie_wait_for_link_delay: "Some controllers might not implement link
            # active reporting. In this case, we wait for 1000 ms + any delay".
            await self.host.sleep(LINK_ACTIVE_TIMEOUT + PCIE_SETTLE)
            return (f"port faster than 5 GT/s without link active reporting: waited "
                    f"{(LINK_ACTIVE_TIMEOUT + PCIE_SETTLE) * 1000:.0f} ms (pcie_wait_for_link_delay)")
        await self.host.sleep(PCIE_SETTLE)
        return f"waited {PCIE_SETTLE * 1000:.0f} ms (PCIe r6.0 sec 6.6.1)"

    async def _wait_ready(self, addr: PciAddress) -> bool:
        """pci_dev_wait: poll until Vendor ID is neither CRS (0x0001) nor all-ones and Command is not ~0."""
        out = self.outcomes[addr]
        delay = self.settings.poll_interval
        waited = 0.0
        timeout = self.settings.poll_timeout
        while True:
            out.polls += 1
            try:
                data = await self.host.read_config(addr, 8)
            except NoSuchFunction:
                out.error = "disappeared from the host during the reset"
                return False
            except HostError as err:
                data = b""
                logger.debug("%s: poll read failed: %s", addr, err)
            vendor = u16(data, regs.VENDOR_ID)
            # pci_dev_wait reads Vendor ID until it is not the CRS value when the
            # Root Port has CRS Software Visibility, else the Command register
            # until it is not ~0 (PCI_POSSIBLE_ERROR). We do not know which, so
            # both: not CRS, and Command/Status not all-ones. Not "Vendor ID is
            # not 0xFFFF": a VF's Vendor ID reads FFFFh in hardware (SR-IOV r1.1
            # sec 3.4.1.1; sysfs shows the PF's cached one), and such a VF would
            # never look ready.
            if vendor != regs.CRS_VENDOR_ID and u32(data, regs.COMMAND) != 0xFFFFFFFF:
                return True
            if waited >= timeout:
                what = "CRS" if vendor == regs.CRS_VENDOR_ID else "all-ones"
                out.error = f"not ready {waited * 1000:.0f} ms after the reset (still {what}); gave up"
                return False
            step = min(delay, self.settings.poll_max_interval, timeout - waited)
            await self.host.sleep(step)
            waited += step
            delay *= 2
