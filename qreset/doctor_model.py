"""
What ``qreset doctor`` reports: problem codes (stable, for scripts), severities,
findings, reset options and the per-function and host reports, as data with
``to_json``. The logic is :mod:`qreset.doctor` (per function) and
:mod:`qreset.doctor_host` (the host and its kernel).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from qreset.pci.address import PciAddress
from qreset.topology import ResetKind

#: The driver a function must be bound to for VFIO to reset or assign it.
VFIO_DRIVER = "vfio-pci"
#: Drivers that bind bridges/ports; they do not block a reset of what is below.
PORT_DRIVERS = frozenset({"pcieport", "shpchp"})
#: PCI base class 0x06: bridges (host, ISA, PCI-to-PCI...), never assigned.
_CLASS_BRIDGE = 0x06


#: Every problem code doctor reports, with what it means (``qreset doctor --help``).
PROBLEM_CODES: dict[str, str] = {
    "no-iommu": "host: /sys/kernel/iommu_groups is missing or empty",
    "no-reset-method-attr": "host: no function has reset_method (kernel < 5.15, or no method works)",
    "no-reset-subordinate": "host: no bridge has reset_subordinate (kernel < 6.13 without the backport)",
    "not-present": "config space reads as absent or not ready",
    "config-short": "config space only partly readable (not root)",
    "config-broken": "a capability list is malformed",
    "no-flr-shared-bus": "no FLR, and its bus reset would hit functions on host drivers",
    "no-flr-bus-reset": "no function-level reset: only a bus reset that also hits other functions",
    "root-bus": "on a root bus: no bridge to do a bus reset",
    "no-reset": "no reset method at all",
    "pm-only": "its only function-level reset is PM (D3hot->D0)",
    "stale-bus-method": "reset_method lists bus, but the kernel will refuse it",
    "pf-resets-vfs": "SR-IOV PF: any reset of it resets its VFs",
    "conventional-bus": "behind a PCIe-to-PCI bridge: shared conventional bus, 1 s after reset",
    "iommu-group-shared": "its IOMMU group has other (non-bridge) members",
    "host-driver": "bound to a host driver, not vfio-pci",
}


class Severity(enum.StrEnum):
    BLOCKER = "blocker"  # the function cannot be reset safely as things stand
    WARNING = "warning"  # it can, with a cost or a risk worth knowing
    INFO = "info"        # context


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding. ``code`` is stable for scripts; ``message``/``remedy`` are one sentence each."""

    code: str
    severity: Severity
    message: str
    remedy: str

    def __post_init__(self) -> None:
        if self.code not in PROBLEM_CODES:  # keeps --help's list complete
            raise ValueError(f"undocumented doctor problem code {self.code!r}")

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity.value,
                "message": self.message, "remedy": self.remedy}


@dataclass(frozen=True, slots=True)
class Hit:
    """A function a reset would hit besides the one being reset."""

    address: PciAddress
    driver: str | None
    iommu_group: int | None

    def to_json(self) -> dict[str, Any]:
        return {"bdf": str(self.address), "driver": self.driver, "iommu_group": self.iommu_group}


@dataclass(frozen=True, slots=True)
class ResetOption:
    """One way to reset a function.

    ``method`` is a kernel reset_method name for function-level methods and
    for ``bus`` (the kernel's own), else ``vfio_hot_reset``,
    ``reset_subordinate`` or ``user_sbr`` (names of :class:`qreset.plan.Method`).
    ``blocked_by`` lists the hit functions bound to a host driver: resetting
    them under that driver corrupts its state.
    """

    kind: ResetKind
    method: str
    target: PciAddress
    hits: tuple[Hit, ...]
    blocked_by: tuple[Hit, ...]
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value, "method": self.method, "target": str(self.target),
            "hits": [h.to_json() for h in self.hits],
            "blocked_by": [h.to_json() for h in self.blocked_by], "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class FunctionReport:
    address: PciAddress
    vendor: int
    device: int
    class_code: int
    driver: str | None
    iommu_group: int | None
    parent: PciAddress | None
    reset_methods: tuple[str, ...]
    function_methods: tuple[str, ...]
    config_methods: tuple[str, ...]
    is_bridge: bool
    options: tuple[ResetOption, ...]
    problems: tuple[Problem, ...]

    @property
    def summary(self) -> str:
        """The cheapest way to reset it, in a few words."""
        for opt in self.options:
            if opt.blocked_by:
                continue
            others = len(opt.hits)
            also = f", also hits {others} other function{'s' * (others != 1)}" if others else ""
            if opt.kind is ResetKind.FUNCTION:
                return f"function reset ({opt.method}){also}"
            return f"{opt.kind.value} reset of {opt.target} via {opt.method}{also}"
        if self.options:
            return "only resets that hit host-driver functions"
        return "no reset method"

    def to_json(self) -> dict[str, Any]:
        return {
            "bdf": str(self.address), "vendor": self.vendor, "device": self.device,
            "class": self.class_code, "driver": self.driver, "iommu_group": self.iommu_group,
            "parent": str(self.parent) if self.parent else None,
            "reset_methods": list(self.reset_methods),
            "function_methods": list(self.function_methods),
            "config_methods": list(self.config_methods),
            "is_bridge": self.is_bridge, "summary": self.summary,
            "options": [o.to_json() for o in self.options],
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass(frozen=True, slots=True)
class Report:
    host: str
    iommu: bool
    reset_method_exposed: bool
    notes: tuple[Problem, ...]
    functions: tuple[FunctionReport, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host, "iommu": self.iommu,
            "reset_method_exposed": self.reset_method_exposed,
            "notes": [n.to_json() for n in self.notes],
            "functions": [f.to_json() for f in self.functions],
        }
