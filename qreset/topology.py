"""
Topology: how the host's functions hang off bridges and slots, and what a
reset of any one of them would also hit.

Built once from a :class:`~qreset.pci.host.PciHost` (:meth:`Topology.load`),
then pure: every question below answers from memory, following the kernel's
rules in ``drivers/pci/pci.c`` (``pci_reset_function``,
``pci_probe_reset_slot``/``pci_slot_resettable``, ``pci_probe_reset_bus``/
``pci_bus_resettable``, ``pci_parent_bus_reset``, ``pci_dev_reset_slot_function``)
and, for what a VFIO hot reset hits, ``vfio_pci_for_each_slot_or_bus`` in
``drivers/vfio/pci/vfio_pci_core.c``.

SKELETON: the API below is fixed (other stages are written against it);
the bodies are being filled in.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from qreset.pci.address import PciAddress
from qreset.pci.config import ConfigSpace
from qreset.pci.host import FunctionInfo, PciHost, SlotInfo


class ResetKind(enum.StrEnum):
    """How wide a reset is."""

    FUNCTION = "function"  # FLR, AF FLR, PM, device-specific, ACPI: one function
    SLOT = "slot"          # hotplug slot reset: every function in the slot and below
    BUS = "bus"            # secondary bus reset of a bridge: everything below it


#: Kernel reset_method names that reset only the function itself.
FUNCTION_METHODS: tuple[str, ...] = ("device_specific", "acpi", "flr", "af_flr", "pm")


@dataclass(frozen=True, slots=True)
class ResetScope:
    """One way to reset, and every function it hits.

    ``target`` is the function itself for a FUNCTION reset and the bridge
    whose secondary bus is reset for SLOT/BUS. ``affected`` includes every
    function hit (for BUS: all functions on the bridge's secondary bus and on
    every subordinate bus; never the bridge itself).
    """

    kind: ResetKind
    target: PciAddress
    affected: frozenset[PciAddress]
    slot: str | None = None


@dataclass(frozen=True, slots=True)
class FunctionNode:
    """One function with its sysfs attributes and decoded config space."""

    info: FunctionInfo
    config: ConfigSpace

    @property
    def address(self) -> PciAddress:
        return self.info.address


class Topology:
    """The host's PCI tree. Construct with :meth:`load` (I/O) or directly (tests)."""

    def __init__(
        self,
        functions: Mapping[PciAddress, FunctionNode],
        slots: list[SlotInfo],
        iommu: bool,
        host_name: str = "host",
    ) -> None:
        self.functions = dict(functions)
        self.slots = list(slots)
        self.iommu = iommu
        self.host_name = host_name

    @classmethod
    async def load(cls, host: PciHost) -> Topology:
        """Read every function's attributes and config space from ``host``."""
        raise NotImplementedError

    def node(self, addr: PciAddress) -> FunctionNode:
        """The node for ``addr``; raises NoSuchFunction naming it."""
        raise NotImplementedError

    def parent(self, addr: PciAddress) -> PciAddress | None:
        """The bridge above ``addr`` (None on a root bus)."""
        raise NotImplementedError

    def bus_of(self, addr: PciAddress) -> frozenset[PciAddress]:
        """Every function on the same bus as ``addr`` (including it)."""
        raise NotImplementedError

    def below(self, bridge: PciAddress) -> frozenset[PciAddress]:
        """Every function below ``bridge``: its secondary bus and all subordinate buses."""
        raise NotImplementedError

    def function_methods(self, addr: PciAddress) -> tuple[str, ...]:
        """The function-level reset methods of ``addr`` (reset_method ∩ FUNCTION_METHODS), in order."""
        raise NotImplementedError

    def slot_scope(self, addr: PciAddress) -> ResetScope | None:
        """The slot reset that would hit ``addr``, if its slot can be reset."""
        raise NotImplementedError

    def bus_scope(self, addr: PciAddress) -> ResetScope | None:
        """The secondary bus reset of ``addr``'s parent bridge (None on a root bus)."""
        raise NotImplementedError

    def hot_reset_scope(self, addr: PciAddress) -> ResetScope | None:
        """What VFIO_DEVICE_PCI_HOT_RESET on ``addr`` would hit: slot if possible, else bus."""
        raise NotImplementedError

    def group_members(self, group: int) -> frozenset[PciAddress]:
        """Every function in IOMMU group ``group``."""
        raise NotImplementedError
