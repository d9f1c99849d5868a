"""
The one interface between qreset and the host's PCI functions.

Everything above this module (topology, planner, executor, daemon) talks to a
:class:`PciHost` and never to files: that is what lets one engine run against
the real kernel (:class:`qreset.pci.sysfs.SysfsHost`, rooted at an injectable
directory, default ``/sys``) and against the simulated host
(:class:`qreset.pci.sim.SimHost`, used by the demo and the tests).

The interface is deliberately small and shaped like sysfs, because sysfs is
what the kernel offers: per-function attributes, a binary ``config`` file, the
``reset``/``reset_method`` pair, ``reset_subordinate`` on bridges, ``remove``
and ``rescan``. Methods that block in the kernel (a ``reset`` write sleeps for
the whole reset) run off the event loop in the implementation, never in the
caller.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from qreset.errors import ResetFailed
from qreset.pci.address import PciAddress

# IORESOURCE_* flags as printed in sysfs ``resource`` (include/linux/ioport.h)
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_MEM_64 = 0x00100000


@dataclass(frozen=True, slots=True)
class Resource:
    """One line of sysfs ``resource``: ``start end flags`` (all zero when unused)."""

    start: int
    end: int
    flags: int

    @property
    def size(self) -> int:
        return 0 if self.end == 0 and self.start == 0 else self.end - self.start + 1


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """A ``/sys/bus/pci/slots/NAME`` entry.

    ``address`` is ``DDDD:BB:DD`` (no function); ``hotplug`` is true when the
    slot is driven by a hotplug controller (it has a ``power`` attribute,
    created by ``pci_hp_register``), which is what can do a slot reset
    (``pci_reset_hotplug_slot`` in drivers/pci/pci.c needs ``ops->reset_slot``).
    """

    name: str
    address: str
    hotplug: bool


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    """What sysfs says about one function (everything except ``config``).

    ``reset_methods`` is the content of ``reset_method`` split on spaces, or an
    empty tuple when the file is absent: the kernel hides it (and ``reset``)
    when no method works (``pci_dev_reset_method_attr_is_visible``).
    ``parent`` is the upstream bridge, read from the device's canonical path
    under ``/sys/devices`` (None on a root bus).
    """

    address: PciAddress
    vendor: int
    device: int
    class_code: int
    revision: int
    subsystem_vendor: int
    subsystem_device: int
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    reset_methods: tuple[str, ...]
    has_reset: bool
    has_reset_subordinate: bool
    resources: tuple[Resource, ...]
    physfn: PciAddress | None
    virtfns: tuple[PciAddress, ...]
    parent: PciAddress | None


@dataclass(frozen=True, slots=True)
class RuntimeState:
    """The attributes of a function that change while the host runs.

    libvirt binds a managed device to vfio-pci at domain start and back at
    stop, an operator writes ``reset_method`` or ``sriov_numvfs``: everything
    else in :class:`FunctionInfo` is fixed for the life of the ``struct
    pci_dev``. A few sysfs reads, so a planner can afford them on every cycle.
    """

    driver: str | None
    driver_override: str | None
    reset_methods: tuple[str, ...]
    has_reset: bool
    virtfns: tuple[PciAddress, ...]

    @classmethod
    def of(cls, info: FunctionInfo) -> RuntimeState:
        return cls(info.driver, info.driver_override, info.reset_methods, info.has_reset, info.virtfns)

    def apply(self, info: FunctionInfo) -> FunctionInfo:
        """``info`` with these runtime attributes (the same object when nothing differs)."""
        if RuntimeState.of(info) == self:
            return info
        return dataclasses.replace(
            info, driver=self.driver, driver_override=self.driver_override,
            reset_methods=self.reset_methods, has_reset=self.has_reset, virtfns=self.virtfns)


class PciHost(abc.ABC):
    """Async access to a host's PCI functions (real sysfs or simulated)."""

    #: Human-readable origin, e.g. ``sysfs:/sys`` or ``sim:configs/sim/gpu.toml``.
    name: str = "host"

    @abc.abstractmethod
    async def functions(self) -> list[PciAddress]:
        """Every function the host has, sorted (``ls /sys/bus/pci/devices``)."""

    @abc.abstractmethod
    async def info(self, addr: PciAddress) -> FunctionInfo:
        """Attributes of one function. Raises NoSuchFunction/HostError."""

    async def runtime(self, addr: PciAddress) -> RuntimeState:
        """The attributes of ``addr`` that change at run time (driver, reset_method, VFs).

        Implementations override it with fewer reads than :meth:`info`.
        """
        return RuntimeState.of(await self.info(addr))

    @abc.abstractmethod
    async def read_config(self, addr: PciAddress, size: int = 4096) -> bytes:
        """Read up to ``size`` bytes of config space (fewer if that is all that is readable)."""

    @abc.abstractmethod
    async def write_config(self, addr: PciAddress, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of config space (1, 2 or 4 aligned bytes per access)."""

    @abc.abstractmethod
    async def slots(self) -> list[SlotInfo]:
        """The entries of ``/sys/bus/pci/slots``."""

    @abc.abstractmethod
    async def has_iommu_groups(self) -> bool:
        """Whether ``/sys/kernel/iommu_groups`` exists and is non-empty."""

    @abc.abstractmethod
    async def reset_function(self, addr: PciAddress, method: str | None = None) -> None:
        """``echo 1 > reset`` (``pci_reset_function``: the kernel saves and restores state).

        With ``method``, first narrow ``reset_method`` to that one method and put
        the previous list back afterwards. Raises ResetFailed on EIO/ENOTTY.
        """

    @abc.abstractmethod
    async def reset_subordinate(self, bridge: PciAddress) -> None:
        """``echo 1 > reset_subordinate`` on a bridge (Linux 6.13+): reset its secondary bus."""

    async def hot_reset_info(self, device: PciAddress) -> list[tuple[PciAddress, int]]:
        """``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`` on ``device`` (bound to vfio-pci, group idle).

        Every function a hot reset of ``device`` would hit (the slot when
        ``pci_probe_reset_slot`` succeeds, else the bus: ``vfio_pci_for_each_slot_or_bus``
        in drivers/vfio/pci/vfio_pci_core.c), each with its IOMMU group,
        ``device`` included. Raises ResetFailed where there are no VFIO devices.
        """
        raise ResetFailed(str(device), f"VFIO hot reset is not available on {self.name}")

    async def hot_reset(self, devices: Sequence[PciAddress], groups: Sequence[int]) -> None:
        """``VFIO_DEVICE_PCI_HOT_RESET``: reset the slot or bus of ``devices[0]``.

        ``groups`` must name every IOMMU group the reset hits, none held by
        another process (a VFIO group opens once: EBUSY); every function hit
        must be bound to vfio-pci. The kernel saves and restores every
        affected function. ``devices`` are checked against what the kernel
        would hit, so a stale plan fails before anything is reset.
        """
        raise ResetFailed(str(devices[0]) if devices else "vfio",
                          f"VFIO hot reset is not available on {self.name}")

    @abc.abstractmethod
    async def remove(self, addr: PciAddress) -> None:
        """``echo 1 > remove``: detach drivers and delete the function."""

    @abc.abstractmethod
    async def rescan(self, bridge: PciAddress | None = None) -> None:
        """``echo 1 > rescan`` on a bridge, or ``/sys/bus/pci/rescan`` when None."""

    @abc.abstractmethod
    async def bind(self, addr: PciAddress, driver: str | None) -> None:
        """Set ``driver_override`` (None clears it) and ask ``drivers_probe`` to bind."""

    def kernel_release(self) -> str | None:
        """The host kernel's release (``uname -r``), when known: for what it says about features."""
        return None

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of host time: real on sysfs, scaled on the simulated host.

        Every spec-mandated delay in the executor goes through here, so the
        simulated host can run the same code path at a tunable speed.
        """
        await asyncio.sleep(seconds)

    async def close(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Release threads or files the implementation holds."""
