"""
The VFIO hot reset on the simulated host (``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`` /
``VFIO_DEVICE_PCI_HOT_RESET``), with the kernel's rules (drivers/vfio/pci/vfio_pci_core.c,
include/uapi/linux/vfio.h):

* what it hits: the slot when ``pci_probe_reset_slot`` succeeds, else the bus
  (``vfio_pci_for_each_slot_or_bus``); a pciehp slot reset asserts Secondary Bus
  Reset on the port, so both are every function below the function's bridge;
  nothing on a root bus (ENODEV);
* ownership: a group file opens once (EBUSY while QEMU holds it,
  :attr:`SimHotReset.vfio_held`), a group with a host-driver function is not
  viable, every group the reset hits must be given, every function it hits must
  be bound to vfio-pci (EINVAL), and device locks are try-locks (EBUSY);
* effect: a secondary bus reset the kernel saves and restores around, like
  ``reset_subordinate``, logged as ``vfio_hot_reset``.
"""

from __future__ import annotations

from collections.abc import Sequence

from qreset.errors import ResetFailed
from qreset.pci.address import PciAddress
from qreset.pci.sim_enum import SimFunction
from qreset.pci.sim_reset import SimResets

VFIO_DRIVER = "vfio-pci"


class SimHotReset(SimResets):
    """VFIO hot reset on the simulated host (see the module docstring)."""

    def _vfio_group_open(self, group: int) -> None:
        """Opening /dev/vfio/N: EBUSY when another process (QEMU) holds it, and a group
        with a function bound to a host driver is not viable."""
        path = f"{self.name}/dev/vfio/{group}"
        if group in self.vfio_held:
            raise ResetFailed(path, f"group {group} is held by another process (QEMU?)")
        members = [f for f in self._order if f.present and f.group == group]
        if not members or not self.iommu:
            raise ResetFailed(path, f"no VFIO group {group} "
                              "(is every device of the group bound to vfio-pci?)")
        if any(f.driver not in (VFIO_DRIVER, None) for f in members):
            raise ResetFailed(path, f"group {group} is not viable: a device in it is bound to a host driver")

    def _hot_reset_set(self, f: SimFunction) -> tuple[SimFunction, list[SimFunction]]:
        """vfio_pci_for_each_slot_or_bus: the port's slot (pciehp asserts SBR on the port,
        so the same functions) or the bus below f's bridge; ENODEV on a root bus."""
        b = f.parent
        if b is None:
            raise ResetFailed(str(f.addr), "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: ENODEV: "
                              "no hot reset possible: neither a slot nor a bus reset is available")
        return b, self._below(b)

    async def hot_reset_info(self, device: PciAddress) -> list[tuple[PciAddress, int]]:
        f = self._get(device)
        if f.group is None or not self.iommu:
            raise ResetFailed(str(device), "no IOMMU group: not a VFIO device")
        self._vfio_group_open(f.group)
        if f.driver != VFIO_DRIVER:
            raise ResetFailed(str(device), f"VFIO_GROUP_GET_DEVICE_FD {device}: ENODEV: "
                              "not bound to vfio-pci")
        _b, hit = self._hot_reset_set(f)
        return [(g.addr, g.group if g.group is not None else -1) for g in hit]

    async def hot_reset(self, devices: Sequence[PciAddress], groups: Sequence[int]) -> None:
        if not devices:
            raise ResetFailed("vfio", "hot reset of no device")
        if not groups:
            raise ResetFailed(str(devices[0]), "hot reset needs the affected IOMMU groups")
        target = self._get(devices[0])
        for group in dict.fromkeys(groups):
            self._vfio_group_open(group)
        if target.group not in groups or target.driver != VFIO_DRIVER:
            raise ResetFailed(str(target.addr), "not in any of the given groups")
        b, hit = self._hot_reset_set(target)
        addrs = {g.addr for g in hit}
        stray = [str(d) for d in devices if d not in addrs]
        if stray:
            raise ResetFailed(str(target.addr),
                              f"a hot reset of {target.addr} would not hit {', '.join(stray)}")
        missing = sorted({g.group for g in hit if g.group is not None} - set(groups))
        if missing:
            raise ResetFailed(str(target.addr), "the hot reset also hits group(s) "
                              + ", ".join(map(str, missing)) + " not given")
        unbound = [str(g.addr) for g in hit if g.driver != VFIO_DRIVER]
        if unbound:
            # vfio_pci_dev_set_hot_reset: every device on the slot/bus must be in the dev_set.
            raise ResetFailed(str(target.addr), "VFIO_DEVICE_PCI_HOT_RESET: EINVAL: Invalid argument "
                              "(every function the reset hits must be bound to vfio-pci: "
                              f"{', '.join(unbound)})")
        self._check_eio(target, "vfio")
        # vfio_pci_dev_set_try_reset/pci_reset_bus: device locks are try-locks.
        await self._bus_reset_restored(b, "vfio_hot_reset", str(target.addr),
                                       "VFIO_DEVICE_PCI_HOT_RESET: EBUSY: Device or resource busy "
                                       "(an affected device is in use or its lock is held)")
