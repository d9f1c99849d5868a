"""
Planning steps 4 and 5: ownership refusals and the method of each slot/bus domain.

Pure code: :class:`PolicyCheck` takes a merged
:class:`~qreset.plan_domains.Candidate` and returns the
:class:`~qreset.plan_types.Domain` it becomes plus the blockers that refuse
it (a function of another VM or a host driver it would hit without
``Policy.allow``, or no permitted method). The rules and why are steps 4 and
5 in :mod:`qreset.plan`'s docstring.
"""

from __future__ import annotations

from collections.abc import Mapping

from qreset.pci.address import PciAddress
from qreset.plan_domains import Candidate
from qreset.plan_types import Blocker, Domain, Method, Owner, OwnerKind, Policy, owner_from_driver
from qreset.qemu_model import VFIO_DRIVER
from qreset.topology import ResetKind, Topology

__all__ = ["PolicyCheck"]

#: Owners whose functions a reset must not hit without Policy.allow.
_PROTECTED = frozenset({OwnerKind.OTHER_VM, OwnerKind.HOST_DRIVER})


def _owner_phrase(owner: Owner) -> str:
    if owner.kind is OwnerKind.OTHER_VM:
        return f"owned by VM {owner.name}"
    if owner.kind is OwnerKind.HOST_DRIVER:
        return f"bound to host driver {owner.name}"
    if owner.kind is OwnerKind.VFIO_IDLE:
        return "bound to vfio-pci, idle"
    if owner.kind is OwnerKind.NONE:
        return "with no driver"
    return f"owned by VM {owner.name}" if owner.name else "owned by this VM"


class PolicyCheck:
    """Steps 4 and 5 for one make_plan call: who owns what, what may be hit, which method."""

    def __init__(
        self, vm: str, owned: tuple[PciAddress, ...], topo: Topology,
        owners: Mapping[PciAddress, Owner], policy: Policy,
    ) -> None:
        self.vm = vm
        self.owned = owned
        self.owned_set = frozenset(owned)
        self.topo = topo
        self.owners = owners
        self.policy = policy
        self.me = Owner(OwnerKind.THIS_VM, vm)

    def owner(self, addr: PciAddress) -> Owner:
        if addr in self.owned_set:
            return self.me
        found = self.owners.get(addr)
        if found is not None:
            return found
        node = self.topo.functions.get(addr)
        return owner_from_driver(node.info.driver if node else None)

    def blockers_of(self, cand: Candidate) -> tuple[list[Blocker], list[str]]:
        blockers: list[Blocker] = []
        notes: list[str] = []
        for f in sorted(cand.affected):
            if f in self.owned_set:
                continue
            owner = self.owner(f)
            if owner.kind not in _PROTECTED:
                continue
            if f in self.policy.allow:
                notes.append(f"hits {f} {_owner_phrase(owner)} (allowed by policy)")
                continue
            node = self.topo.functions.get(f)
            if owner.kind is OwnerKind.HOST_DRIVER and node is not None and node.config.is_bridge:
                # A bridge below the reset bridge (switch port): its port driver
                # holds no device state; the executor saves and restores it.
                notes.append(f"hits bridge {f} ({owner.name}); its config is saved and restored")
                continue
            blockers.append(Blocker(
                f, owner, f"{cand.phrase()} would hit {f} {_owner_phrase(owner)}",
            ))
        return blockers, notes

    def bus_method(self, cand: Candidate, covers: tuple[PciAddress, ...]) -> tuple[Method | None, str]:
        rejected: list[str] = []
        for m in self.policy.bus_methods:
            if m is Method.KERNEL_BUS:
                if self._kernel_bus_ok(covers):
                    return m, f"{covers[0]} is alone below {cand.target} and lists the kernel's bus method"
                rejected.append("bus: needs one function alone below the bridge listing 'bus'")
            elif m is Method.RESET_SUBORDINATE:
                if self.topo.node(cand.target).info.has_reset_subordinate:
                    return m, f"{cand.target} has reset_subordinate"
                rejected.append(f"reset_subordinate: {cand.target} does not have it")
            elif m is Method.VFIO_HOT_RESET:
                why = self._vfio_hot_reset_refusal(covers)
                if why is None:
                    return m, "every covered function is vfio-pci and idle or this VM's"
                rejected.append(f"vfio_hot_reset: {why}")
            elif m is Method.USER_SBR:
                why = "secondary bus reset from userspace; the executor restores state"
                if cand.kind is ResetKind.SLOT:
                    # pciehp_reset_slot masks Presence/Link change events around the
                    # SBR; a userspace SBR cannot, so pciehp may see a surprise removal.
                    why += (f"; hotplug slot {cand.slot}: pciehp may take the link-down as a "
                            "removal (the kernel's slot reset masks it, userspace cannot)")
                return m, why + (f" (not {'; not '.join(rejected)})" if rejected else "")
        return None, "; ".join(rejected) or "policy bus_methods names no slot/bus method"

    def _kernel_bus_ok(self, covers: tuple[PciAddress, ...]) -> bool:
        """reset_method=bus would hit exactly ``covers``: one function, probed and usable now.

        ``reset_method`` lists ``bus`` on function 0 of a multifunction device
        probed before its siblings appeared; ``pci_parent_bus_reset`` refuses
        it at reset time, so the scope is checked again here.
        """
        if len(covers) != 1 or "bus" not in self.topo.node(covers[0]).info.reset_methods:
            return False
        scope = self.topo.kernel_bus_scope(covers[0])
        return scope is not None and scope.affected == frozenset(covers)

    def _vfio_hot_reset_refusal(self, covers: tuple[PciAddress, ...]) -> str | None:
        if not self.policy.vfio_ioctl_ok:
            return ("the VFIO groups are not known to be idle (a QEMU holding a group, or a device "
                    "through its cdev with iommufd, shuts qreset out: EBUSY/EINVAL)")
        for f in covers:
            if self.topo.node(f).info.driver != VFIO_DRIVER:
                return f"{f} is not bound to vfio-pci"
            if self.owner(f).kind is OwnerKind.OTHER_VM:
                return f"{f} is held by VM {self.owner(f).name}"
        return None

    def finish(self, cand: Candidate) -> tuple[Domain, list[Blocker]]:
        covers = tuple(sorted(cand.affected))
        owned = tuple(a for a in covers if a in self.owned_set)
        blockers, notes = self.blockers_of(cand)
        if cand.kind is ResetKind.FUNCTION:
            assert cand.method is not None  # FUNCTION candidates are built with their method
            method = cand.method
        else:
            chosen, why = self.bus_method(cand, covers)
            if chosen is None:
                blockers.append(Blocker(cand.target, self.owner(cand.target), (
                    f"no permitted method for {cand.phrase()}: {why}"
                )))
                method = self.policy.bus_methods[-1] if self.policy.bus_methods else Method.USER_SBR
            else:
                method = chosen
                notes.append(f"{chosen.value}: {why}")
        domain = Domain(
            key=cand.key, kind=cand.kind, method=method, target=cand.target,
            covers=covers, owned=owned, reason="; ".join([*cand.notes, *notes]),
        )
        return domain, blockers
