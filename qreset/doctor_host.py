"""
Host-level findings of ``qreset doctor``: what the host and its kernel lack, and what
that costs qreset. Features are detected from what sysfs shows (a stable kernel
can carry a backport, so the release number alone decides nothing); the release
is named when known.
"""

from __future__ import annotations

from qreset.doctor_model import Problem, Severity
from qreset.topology import Topology


def _reset_method_exposed(topo: Topology) -> bool:
    return any(n.info.reset_methods for n in topo.functions.values())


def host_notes(topo: Topology) -> tuple[Problem, ...]:
    notes: list[Problem] = []
    if not topo.iommu:
        notes.append(Problem(
            "no-iommu", Severity.BLOCKER,
            "no IOMMU groups: this host cannot assign devices (/sys/kernel/iommu_groups is missing or empty)",
            "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on)",
        ))
    if not _reset_method_exposed(topo):
        # Before 5.15 sysfs had ``reset`` but no ``reset_method``; since 5.15 both
        # are hidden together when no method works (pci_dev_reset_method_attr_is_visible).
        old_kernel = any(n.info.has_reset for n in topo.functions.values())
        detail = ("some functions have a 'reset' file without it, so the kernel is older than 5.15; "
                  "function-level methods shown are read from config space"
                  if old_kernel else
                  "no function has a 'reset' file either, so no function here has a working reset method")
        notes.append(Problem(
            "no-reset-method-attr", Severity.WARNING,
            f"kernel does not expose reset_method (older than 5.15 or no methods): {detail}",
            "upgrade to Linux 5.15+ to choose reset methods" if old_kernel else
            "assign only devices with FLR, or behind a bridge qreset can bus-reset",
        ))
    sub = _reset_subordinate_note(topo)
    if sub is not None:
        notes.append(sub)
    return tuple(notes)


def _reset_subordinate_note(topo: Topology) -> Problem | None:
    """No bridge with ``reset_subordinate`` although some bridge has functions below it.

    The attribute came with Linux 6.13 (commit 2fa046449a82, "PCI: Add
    'reset_subordinate' to reset hierarchy below bridge"; pci_bridge_attrs in
    drivers/pci/pci-sysfs.c puts it on every bridge) and was backported to
    stable kernels (Debian 12's 6.1.0-57 has it), so its presence
    decides, not the release. Without it a bus shared by several functions is
    reset from userspace (Bridge Control), and qreset itself must save,
    restore and verify every function below, without the kernel's device locks.
    """
    bridges = [a for a in topo.functions if topo.is_bridge(a) and topo.children(a)]
    if not bridges or any(topo.node(b).info.has_reset_subordinate for b in bridges):
        return None
    kernel = f"kernel {topo.kernel}" if topo.kernel else "this kernel"
    return Problem(
        "no-reset-subordinate", Severity.WARNING,
        f"no reset_subordinate on any bridge ({kernel}; it came in Linux 6.13, some stable kernels "
        "have it backported): bus resets of shared buses use the userspace secondary bus reset, "
        "so qreset saves, restores and verifies config space of every function below itself, "
        "without the kernel's device locks",
        "run a kernel with reset_subordinate (6.13+, or a stable kernel with the backport) "
        "to let the kernel save and restore a whole bus under its locks",
    )
