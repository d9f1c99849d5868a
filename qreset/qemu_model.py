"""
What QEMU's own system reset does to each assigned (vfio-pci) function.

Pure code, no I/O. The planner needs this to know which functions QEMU
leaves un-reset (``takeover = gaps``) and the CLI prints it so an operator
can see *why* qreset is needed for a device. The model follows QEMU
``hw/vfio/pci.c``:

* ``vfio_populate_device``: ``reset_works`` is ``VFIO_DEVICE_FLAGS_RESET``,
  which the kernel sets when ``pci_try_reset_function`` succeeded at open
  (``vfio_pci_core_enable``): i.e. some kernel reset method works *now*. A
  function-level method counts; ``bus`` only when ``pci_reset_bus_function``
  would succeed (:meth:`Topology.kernel_bus_scope`). Sysfs ``reset_method``
  alone is not enough: function 0 of a multifunction device is probed at
  enumeration before its siblings exist (``pci_scan_slot``), so it lists
  ``bus`` although ``pci_parent_bus_reset`` refuses once they are there.
* ``vfio_check_pcie_flr`` / ``vfio_check_af_flr`` set ``has_flr`` from the
  PCIe DevCap FLR bit or the AF capability (TP and FLR);
  ``vfio_check_pm_reset`` sets ``has_pm_reset`` when the PM capability does
  not report No_Soft_Reset.
* The system-reset handler marks ``needs_reset = !reset_works ||
  (!has_flr && has_pm_reset)`` and, for those, runs the multi-device hot
  reset (``vfio_pci_hot_reset_multi``): refused ("Cannot reset device X,
  depends on group N which is not owned") unless every group the
  slot/bus reset would hit is open in *this* QEMU; the kernel then also
  requires every affected device to be bound to vfio-pci.
* ``vfio_pci_reset``: ``VFIO_DEVICE_RESET`` when ``reset_works && (has_flr
  || !has_pm_reset)``; else the single-device hot reset; else, "if nothing
  else works and the device supports PM reset", ``VFIO_DEVICE_RESET`` again
  (which the kernel serves with its first method, PM for such a device);
  else "no available reset mechanism".

The hot reset's ownership check depends on how QEMU opened the device
(:class:`VfioBackend`):

* ``group`` (the legacy container, ``/dev/vfio/N``): QEMU walks
  ``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO``'s devices and needs each one's IOMMU
  group among those it opened ("Cannot reset device X, depends on group N
  which is not owned"), then passes those group fds to the reset.
* ``iommufd`` (a cdev, ``-object iommufd``; ``iommufd_cdev_pci_hot_reset``
  in hw/vfio/iommufd.c): the kernel answers by device id
  (``VFIO_PCI_HOT_RESET_FLAG_DEV_ID``); unless it also sets
  ``VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED`` QEMU refuses, naming the device
  ("depends on device D which is not owned"), and otherwise resets with an
  empty group-fd array. The kernel calls a device owned when it is bound to
  the same iommufd context or shares an IOMMU group with one that is
  (``vfio_iommufd_get_dev_id``), so with one iommufd per QEMU (what libvirt
  does) both backends refuse and allow the same resets; only the message
  differs. A QEMU with several ``-object iommufd`` is not modelled.

Which backend a device uses is read per device from QEMU
(:func:`qreset.inventory.backend_of`: the vfio-pci device's ``iommufd`` link);
:func:`predict` takes it per function, GROUP where it is not known (a
configured device, QEMU before 8.2).

The QMP ``RESET`` event arrives after all of that (see
/work/shared/reference/qmp-reset-flow.md), so these are predictions, not
observations.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from qreset.pci.address import PciAddress
from qreset.topology import FunctionNode, Topology

#: The driver a function must be bound to for QEMU (and VFIO hot reset) to use it.
VFIO_DRIVER = "vfio-pci"


class VfioBackend(enum.StrEnum):
    """How QEMU opened its VFIO devices (see the module docstring)."""

    GROUP = "group"      # legacy container: /dev/vfio/GROUP, group fds passed to the hot reset
    IOMMUFD = "iommufd"  # cdev /dev/vfio/devices/vfioX bound to -object iommufd: ownership by devid


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
    #: How QEMU opened the function: what the prediction assumed.
    backend: VfioBackend = VfioBackend.GROUP


@dataclass(frozen=True, slots=True)
class VfioResetFlags:
    """The three booleans QEMU derives at realize (see the module docstring)."""

    reset_works: bool
    has_flr: bool
    has_pm_reset: bool
    #: The kernel reset methods that work now, in its order (what VFIO_DEVICE_RESET runs).
    working: tuple[str, ...] = ()

    @classmethod
    def of(cls, topo: Topology, node: FunctionNode) -> VfioResetFlags:
        cfg = node.config
        working = working_methods(topo, node)
        return cls(
            reset_works=bool(working),
            has_flr=cfg.has_flr or cfg.has_af_flr,
            has_pm_reset=cfg.has_pm_reset,
            working=working,
        )

    @property
    def function_reset_first(self) -> bool:
        """``vfio_pci_reset`` tries ``VFIO_DEVICE_RESET`` before any hot reset."""
        return self.reset_works and (self.has_flr or not self.has_pm_reset)


def working_methods(topo: Topology, node: FunctionNode) -> tuple[str, ...]:
    """``reset_method`` minus a ``bus`` the kernel would refuse now (see the module docstring)."""
    addr = node.address
    out: list[str] = []
    for m in node.info.reset_methods:
        if m == "bus" and topo.kernel_bus_scope(addr) is None:
            continue
        out.append(m)
    return tuple(out)


def hot_reset_refusal(
    topo: Topology, addr: PciAddress, owned: Iterable[PciAddress],
    held_elsewhere: Collection[PciAddress] = (), backend: VfioBackend = VfioBackend.GROUP,
) -> str | None:
    """Why QEMU's hot reset of ``addr`` would fail, or None when it would work.

    ``owned`` are the functions assigned to the QEMU in question; the groups
    it has open (``group``), or owns through its iommufd context
    (``iommufd``), are theirs. ``held_elsewhere`` are functions other VMs
    hold: their groups cannot be open here too (a group has one user), and
    with iommufd cdevs the kernel reports them as not owned either.
    """
    scope = topo.hot_reset_scope(addr)
    if scope is None:
        return f"no slot or bus reset can reach {addr} (root bus)"
    groups = {
        topo.functions[a].info.iommu_group for a in owned if a in topo.functions
    } - {None}
    for other in sorted(scope.affected):
        node = topo.functions.get(other)
        if node is None:
            continue
        if other in held_elsewhere:
            return f"Cannot reset device {addr}, depends on device {other} which is not owned (another VM's)"
        group = node.info.iommu_group
        if group is None:
            return f"Cannot reset device {addr}, depends on device {other} which has no IOMMU group"
        if group not in groups:
            if backend is VfioBackend.IOMMUFD:
                # iommufd_cdev_pci_hot_reset: no VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED, and
                # this device's devid is VFIO_PCI_DEVID_NOT_OWNED.
                return f"Cannot reset device {addr}, depends on device {other} which is not owned"
            # vfio_pci_hot_reset (legacy container): QEMU checks group ownership itself first.
            return f"Cannot reset device {addr}, depends on group {group} which is not owned"
    for other in sorted(scope.affected):
        node = topo.functions.get(other)
        if node is not None and node.info.driver != VFIO_DRIVER:
            # vfio_pci_dev_set_resettable: every device reset must be vfio-pci's.
            return (
                f"hot reset of {addr} would hit {other} bound to "
                f"{node.info.driver or 'no driver'}; the kernel refuses (not vfio-pci)"
            )
    return None


def predict(
    topo: Topology, owned: Iterable[PciAddress], held_elsewhere: Collection[PciAddress] = (),
    backend: VfioBackend = VfioBackend.GROUP,
    backends: Mapping[PciAddress, VfioBackend] | None = None,
) -> tuple[QemuPrediction, ...]:
    """One prediction per function of ``owned``, sorted (see :func:`hot_reset_refusal`).

    ``backends`` names each function's backend as QEMU reported it (one QEMU
    may open some devices through groups and others through iommufd);
    ``backend`` is the rest's.
    """
    owned_list = sorted(set(owned))
    elsewhere = frozenset(held_elsewhere) - set(owned_list)
    out: list[QemuPrediction] = []
    for addr in owned_list:
        how = backends.get(addr, backend) if backends else backend
        node = topo.functions.get(addr)
        if node is None:
            out.append(QemuPrediction(addr, QemuAction.NONE, f"{addr} is not on the host", how))
            continue
        out.append(predict_one(topo, node, owned_list, elsewhere, how))
    return tuple(out)


def predict_one(
    topo: Topology, node: FunctionNode, owned: Iterable[PciAddress],
    held_elsewhere: Collection[PciAddress] = (), backend: VfioBackend = VfioBackend.GROUP,
) -> QemuPrediction:
    """QEMU's reset of ``node`` if it is assigned to the QEMU holding ``owned``."""
    if node.info.iommu_group is None:
        return QemuPrediction(
            node.address, QemuAction.NONE,
            "no IOMMU group: vfio-pci cannot assign it to QEMU (IOMMU off or absent)", backend,
        )
    pred = replace(_predict_one(topo, node, owned, held_elsewhere, backend), backend=backend)
    if node.info.driver != VFIO_DRIVER:
        detail = f"not bound to vfio-pci, so QEMU cannot assign it; if it were: {pred.detail}"
        return replace(pred, detail=detail)
    return pred


def _predict_one(
    topo: Topology, node: FunctionNode, owned: Iterable[PciAddress],
    held_elsewhere: Collection[PciAddress], backend: VfioBackend,
) -> QemuPrediction:
    addr = node.address
    flags = VfioResetFlags.of(topo, node)
    if flags.function_reset_first:
        first = flags.working[0] if flags.working else "?"
        why = "has FLR" if flags.has_flr else "no PM reset to avoid"
        return QemuPrediction(
            addr, QemuAction.FUNCTION_RESET,
            f"VFIO_DEVICE_RESET ({why}; kernel's first method: {first})",
        )
    refusal = hot_reset_refusal(topo, addr, owned, held_elsewhere, backend)
    if refusal is None:
        scope = topo.hot_reset_scope(addr)
        assert scope is not None  # hot_reset_refusal returned None only with a scope
        why = "no kernel reset method" if not flags.reset_works else "no FLR, PM reset preferred last"
        fds = "" if backend is VfioBackend.GROUP else ", empty group-fd array (iommufd)"
        return QemuPrediction(
            addr, QemuAction.HOT_RESET,
            f"{scope.kind.value} reset of {scope.target} via VFIO_DEVICE_PCI_HOT_RESET ({why}{fds})",
        )
    if flags.reset_works and flags.has_pm_reset:
        return QemuPrediction(addr, QemuAction.PM_RESET, f"{refusal}; falls back to PM reset")
    if not flags.reset_works and topo.hot_reset_scope(addr) is None:
        return QemuPrediction(
            addr, QemuAction.NONE, f"Cannot reset device {addr}, no available reset mechanism",
        )
    return QemuPrediction(addr, QemuAction.NONE, refusal)
