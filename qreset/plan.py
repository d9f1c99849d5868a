"""
Planning: which reset domains to reset, how, and whether we may.

Pure code, no I/O: :func:`make_plan` takes the functions a VM owns, the
:class:`~qreset.topology.Topology`, who owns every other function and the
:class:`Policy`, and returns a :class:`Plan`: a list of :class:`Domain` s, each
reset once with one method and covering every function it hits, or refusals
naming each blocking function, its owner and why.

SKELETON: the types are fixed (executor and daemon are written against them);
make_plan is being filled in.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qreset.pci.address import PciAddress
from qreset.topology import ResetKind, Topology


class OwnerKind(enum.StrEnum):
    THIS_VM = "this-vm"          # assigned to the VM being planned for
    OTHER_VM = "other-vm"        # assigned to another VM the daemon knows (name = that VM)
    HOST_DRIVER = "host-driver"  # bound to a host driver other than vfio-pci (name = driver)
    VFIO_IDLE = "vfio-idle"      # bound to vfio-pci, not in any VM
    NONE = "none"                # no driver bound


@dataclass(frozen=True, slots=True)
class Owner:
    kind: OwnerKind
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.name}" if self.name else self.kind.value


class Method(enum.StrEnum):
    """How a domain is reset (see qreset.execute for each one's sequence)."""

    DEVICE_SPECIFIC = "device_specific"   # sysfs reset, reset_method=device_specific
    ACPI = "acpi"                         # sysfs reset, reset_method=acpi
    FLR = "flr"                           # sysfs reset, reset_method=flr
    AF_FLR = "af_flr"                     # sysfs reset, reset_method=af_flr
    PM = "pm"                             # sysfs reset, reset_method=pm
    KERNEL_BUS = "bus"                    # sysfs reset, reset_method=bus (function alone below its bridge)
    RESET_SUBORDINATE = "reset_subordinate"  # bridge's reset_subordinate (Linux 6.13+)
    VFIO_HOT_RESET = "vfio_hot_reset"     # VFIO_DEVICE_PCI_HOT_RESET on idle groups
    USER_SBR = "user_sbr"                 # Bridge Control bit 6 from userspace; qreset restores


class Takeover(enum.StrEnum):
    ALL = "all"    # reset every affected function ourselves
    GAPS = "gaps"  # reset only what QEMU's own reset cannot


@dataclass(frozen=True, slots=True)
class Policy:
    takeover: Takeover = Takeover.ALL
    #: Functions owned by another VM or bound to a host driver that a reset may
    #: hit anyway: explicit operator consent, per function. Empty by default.
    allow: frozenset[PciAddress] = frozenset()
    #: Methods the executor may use for SLOT/BUS domains, in preference order.
    bus_methods: tuple[Method, ...] = (
        Method.KERNEL_BUS, Method.RESET_SUBORDINATE, Method.VFIO_HOT_RESET, Method.USER_SBR,
    )


class QemuAction(enum.StrEnum):
    """What QEMU's own system reset does to one vfio-pci device (hw/vfio/pci.c)."""

    FUNCTION_RESET = "function-reset"  # VFIO_DEVICE_RESET: reset_works && (has_flr || !has_pm_reset)
    HOT_RESET = "hot-reset"            # vfio_pci_hot_reset: every affected group is this VM's
    PM_RESET = "pm-reset"              # hot reset refused, falls back to PM reset
    NONE = "none"                      # refused ("depends on group N which is not owned") or no method


@dataclass(frozen=True, slots=True)
class QemuPrediction:
    function: PciAddress
    action: QemuAction
    detail: str


@dataclass(frozen=True, slots=True)
class Domain:
    """One reset: done once, under one lock, covering ``covers``.

    ``key`` is stable across VMs (``function:BDF`` or ``bus:BRIDGE``) and is
    what the executor's lock table is keyed on; ``owned`` are the planned
    VM's functions that need this reset; ``covers`` every function hit.
    """

    key: str
    kind: ResetKind
    method: Method
    target: PciAddress
    covers: tuple[PciAddress, ...]
    owned: tuple[PciAddress, ...]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Blocker:
    function: PciAddress
    owner: Owner
    reason: str

    def __str__(self) -> str:
        return f"{self.function} ({self.owner}): {self.reason}"


@dataclass(frozen=True, slots=True)
class Plan:
    vm: str
    owned: tuple[PciAddress, ...]
    policy: Policy
    domains: tuple[Domain, ...] = ()
    refusals: tuple[Blocker, ...] = ()
    qemu: tuple[QemuPrediction, ...] = ()
    #: Owned functions deliberately left to QEMU (takeover=gaps), with why.
    left_to_qemu: tuple[tuple[PciAddress, str], ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.refusals


def owners_of(
    topo: Topology, vms: Mapping[str, Sequence[PciAddress]], this_vm: str,
) -> dict[PciAddress, Owner]:
    """Who owns every function of ``topo`` from ``this_vm``'s point of view."""
    raise NotImplementedError


def make_plan(
    vm: str,
    owned: Sequence[PciAddress],
    topo: Topology,
    owners: Mapping[PciAddress, Owner],
    policy: Policy,
) -> Plan:
    """Plan the resets of ``owned`` (see module docstring). Pure."""
    raise NotImplementedError
