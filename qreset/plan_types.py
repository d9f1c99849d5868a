"""
The planner's vocabulary: who owns a function, how a domain is reset, the policy, the plan.

Pure data, no planning (that is :mod:`qreset.plan`): these types are what
every later stage reads (the executor resets :class:`Domain` s, the daemon
journals :meth:`Plan.to_json`), so they live apart from the algorithm that
makes them. :mod:`qreset.plan` re-exports the public ones.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from qreset.pci.address import PciAddress
from qreset.qemu_model import VFIO_DRIVER, QemuPrediction
from qreset.topology import ResetKind

__all__ = [
    "Blocker", "Domain", "Method", "Owner", "OwnerKind", "Plan", "Policy", "Takeover", "owner_from_driver",
]


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
    #: The daemon knows no process holds the VFIO groups of the covered
    #: functions (VFIO group files open once: EBUSY while a QEMU has them), so
    #: VFIO_DEVICE_PCI_HOT_RESET is possible for qreset. Off by default.
    vfio_ioctl_ok: bool = False
    #: Whether a PM reset (D3hot -> D0) counts as a function-level reset for a
    #: function that has no other (takeover=all). True follows the kernel's
    #: method order. False does what QEMU does (``vfio_pci_reset``: PM reset
    #: "if nothing else works"): the slot/bus reset, falling back to PM only
    #: when that reset is refused. takeover=gaps always treats PM that way.
    pm_suffices: bool = True


@dataclass(frozen=True, slots=True)
class Domain:
    """One reset: done once, under one lock, covering ``covers``.

    ``key`` is stable across VMs (``function:BDF`` or ``bus:BRIDGE``) and is
    what the executor's lock table is keyed on; ``owned`` are the planned
    VM's functions that need this reset; ``covers`` every function hit.
    (The planner puts every owned function the reset hits in ``owned``: with
    ``takeover = gaps`` that includes ones QEMU would have handled.)
    """

    key: str
    kind: ResetKind
    method: Method
    target: PciAddress
    covers: tuple[PciAddress, ...]
    owned: tuple[PciAddress, ...]
    reason: str = ""

    @property
    def write_target(self) -> PciAddress:
        """The function whose sysfs ``reset`` (or VFIO device) performs this reset.

        Function-level methods and ``bus`` (reset_method=bus: the kernel
        resets the function's parent bus itself, ``pci_reset_bus_function``)
        write the covered function's ``reset``; ``reset_subordinate`` and
        ``user_sbr`` act on the bridge (``target``); ``vfio_hot_reset`` is
        issued on a covered vfio-pci function's device fd.
        """
        if self.kind is ResetKind.FUNCTION:
            return self.target
        if self.method in (Method.KERNEL_BUS, Method.VFIO_HOT_RESET):
            return self.owned[0] if self.owned else self.covers[0]
        return self.target


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

    #: Domains that were refused (each blocker in ``refusals`` names one of
    #: them); nothing in them is reset. Kept so a caller can show what was wanted.
    refused_domains: tuple[Domain, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.refusals

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (CLI ``--json``, daemon replies, journal)."""
        def dom(d: Domain) -> dict[str, Any]:
            return {
                "key": d.key, "kind": d.kind.value, "method": d.method.value,
                "target": str(d.target), "covers": [str(a) for a in d.covers],
                "owned": [str(a) for a in d.owned], "reason": d.reason,
            }
        return {
            "vm": self.vm,
            "ok": self.ok,
            "owned": [str(a) for a in self.owned],
            "policy": {
                "takeover": self.policy.takeover.value,
                "allow": sorted(str(a) for a in self.policy.allow),
                "bus_methods": [m.value for m in self.policy.bus_methods],
                "vfio_ioctl_ok": self.policy.vfio_ioctl_ok,
                "pm_suffices": self.policy.pm_suffices,
            },
            "domains": [dom(d) for d in self.domains],
            "refusals": [
                {"function": str(b.function), "owner": str(b.owner), "reason": b.reason}
                for b in self.refusals
            ],
            "refused_domains": [dom(d) for d in self.refused_domains],
            "qemu": [
                {"function": str(q.function), "action": q.action.value, "detail": q.detail,
                 "backend": q.backend.value}
                for q in self.qemu
            ],
            "left_to_qemu": [{"function": str(a), "why": why} for a, why in self.left_to_qemu],
        }


def owner_from_driver(driver: str | None) -> Owner:
    """Who owns a function no VM claims, judged by its driver alone."""
    if driver is None:
        return Owner(OwnerKind.NONE)
    if driver == VFIO_DRIVER:
        return Owner(OwnerKind.VFIO_IDLE, driver)
    return Owner(OwnerKind.HOST_DRIVER, driver)
