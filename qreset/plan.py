"""
Planning: which reset domains to reset, how, and whether we may.

Pure code, no I/O: :func:`make_plan` takes the functions a VM owns, the
:class:`~qreset.topology.Topology`, who owns every other function and the
:class:`Policy`, and returns a :class:`Plan`: a list of :class:`Domain` s, each
reset once with one method and covering every function it hits, or refusals
naming each blocking function, its owner and why.

How a plan is made (each step says why):

1. *Targets.* ``takeover = all``: every owned function. ``takeover = gaps``:
   only those QEMU's own reset leaves un-reset or under-reset
   (:mod:`qreset.qemu_model`): ``none`` (QEMU does nothing), and ``pm-reset``
   (QEMU wanted a hot reset, was refused, and fell back to the weakest
   method; its own comment: "if nothing else works"). A PM gap is planned as
   the slot/bus reset QEMU could not do; when that reset would hit a function
   we may not touch, the function is left to QEMU's PM reset (in
   ``left_to_qemu``, naming the blocker) instead of refusing the plan, since
   QEMU does do *something* for it. ``function-reset`` and ``hot-reset``
   functions are left to QEMU.
2. *Least disruptive reset per target.* A function-level method (the first
   of ``reset_method`` ∩ device_specific/acpi/flr/af_flr/pm, the kernel's
   order) when it has one; else the slot reset of its hotplug slot; else the
   secondary bus reset of its parent bridge. With ``Policy.pm_suffices``
   off, a function whose only function-level method is PM is treated like a
   PM gap above (slot/bus reset, PM if that is refused). Resetting an SR-IOV
   PF also resets its VFs (the PF's FLR clears VF Enable), so a PF's
   function domain covers them.
3. *Merge.* Domains whose covered sets overlap become one: the wider one
   subsumes the narrower (a bus reset of B subsumes every function domain
   below B and every bus domain of a bridge below B). A GPU without FLR whose
   HDMI audio also lacks it thus becomes ONE bus domain covering both, with no
   separate FLR of the GPU. Each function is covered by exactly one domain
   and each domain is reset once however many owned functions need it.
4. *Ownership.* A domain that would hit a function assigned to another VM or
   bound to a host driver (bridges excepted: a switch port below a reset
   bridge is infrastructure whose config the executor saves and restores) is
   refused unless ``Policy.allow`` names that function. Idle vfio-pci and
   driverless functions may be hit: that is exactly what QEMU cannot do.
5. *Method of a slot/bus domain*, first of ``Policy.bus_methods`` that
   applies: ``bus`` (sysfs reset with reset_method=bus) when the domain covers
   one function that lists ``bus``; ``reset_subordinate`` when the bridge has
   it; ``vfio_hot_reset`` when the daemon says the VFIO groups are idle
   (``Policy.vfio_ioctl_ok``: a QEMU holding a group makes the ioctl
   impossible for anyone else), every covered function is bound to vfio-pci
   and none belongs to another VM; else ``user_sbr``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qreset.pci.address import PciAddress
from qreset.qemu_model import VFIO_DRIVER, QemuAction, QemuPrediction, predict
from qreset.topology import ResetKind, ResetScope, Topology

__all__ = [
    "Blocker", "Domain", "Method", "Owner", "OwnerKind", "Plan", "Policy", "QemuAction",
    "QemuPrediction", "Takeover", "make_plan", "owners_of",
]

logger = logging.getLogger(__name__)


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
                {"function": str(q.function), "action": q.action.value, "detail": q.detail}
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


def owners_of(
    topo: Topology, vms: Mapping[str, Sequence[PciAddress]], this_vm: str,
) -> dict[PciAddress, Owner]:
    """Who owns every function of ``topo`` from ``this_vm``'s point of view.

    A function listed for ``this_vm`` only is THIS_VM; listed for another VM,
    OTHER_VM naming the first such VM (sorted by name, so the answer does not
    depend on dict order) -- also when it is listed for ``this_vm`` too: which
    of the two really has it is unknown here, and :func:`make_plan` refuses to
    reset such a function; otherwise its driver decides (vfio-pci: idle, none,
    or a host driver).
    """
    mine = set(vms.get(this_vm, ()))
    others: dict[PciAddress, str] = {}
    for name in sorted(vms):
        if name == this_vm:
            continue
        for addr in vms[name]:
            others.setdefault(addr, name)
    out: dict[PciAddress, Owner] = {}
    for addr, node in topo.functions.items():
        if addr in mine and addr in others:
            logger.warning("%s is listed for VM %s and VM %s: not resetting it", addr, this_vm,
                           others[addr])
            out[addr] = Owner(OwnerKind.OTHER_VM, others[addr])
        elif addr in mine:
            out[addr] = Owner(OwnerKind.THIS_VM, this_vm)
        elif addr in others:
            out[addr] = Owner(OwnerKind.OTHER_VM, others[addr])
        else:
            out[addr] = owner_from_driver(node.info.driver)
    return out


# -- planning internals ----------------------------------------------------

#: Owners whose functions a reset must not hit without Policy.allow.
_PROTECTED = frozenset({OwnerKind.OTHER_VM, OwnerKind.HOST_DRIVER})


@dataclass(slots=True)
class _Candidate:
    """A domain under construction (mutable while merging)."""

    kind: ResetKind
    target: PciAddress
    affected: set[PciAddress]
    needs: set[PciAddress]          # targets that asked for this reset
    method: Method | None = None    # set for FUNCTION candidates
    slot: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"function:{self.target}" if self.kind is ResetKind.FUNCTION else f"bus:{self.target}"

    def phrase(self) -> str:
        """This reset in words, for reasons and refusals ("slot reset of X (slot 3)")."""
        if self.kind is ResetKind.FUNCTION:
            return f"{self.method.value if self.method else 'reset'} of {self.target}"
        if self.kind is ResetKind.SLOT:
            return f"slot reset of {self.target}" + (f" (slot {self.slot})" if self.slot else "")
        return f"bus reset of {self.target}"


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


class _Planner:
    """One make_plan call's state; see the module docstring for the steps."""

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

    # -- step 2: one candidate per target -----------------------------------

    def candidates(
        self, targets: Iterable[PciAddress], wide: frozenset[PciAddress],
        fallback: Mapping[PciAddress, str],
    ) -> tuple[list[_Candidate], list[Blocker]]:
        cands: list[_Candidate] = []
        blockers: list[Blocker] = []
        for t in sorted(targets):
            node = self.topo.node(t)
            methods = self.topo.function_methods(t)
            if methods and t not in wide:
                # Resetting a PF clears VF Enable (PCIe SR-IOV 1.1, 3.3.3.1): its VFs go too.
                affected = {t} | {v for v in node.info.virtfns if v in self.topo.functions}
                notes = [f"{methods[0]}: first function-level reset method of {t}"]
                if t in fallback:
                    notes.append(f"the wider reset is refused: {fallback[t]}")
                cands.append(_Candidate(
                    ResetKind.FUNCTION, t, affected, {t}, Method(methods[0]), notes=notes,
                ))
                continue
            scope: ResetScope | None = self.topo.slot_scope(t) or self.topo.bus_scope(t)
            if scope is None:
                blockers.append(Blocker(t, self.me, (
                    f"{t} has no function-level reset method and sits on a root bus "
                    "(no bridge to reset): nothing can reset it"
                )))
                continue
            why = (
                "no function-level reset method" if not methods
                else "PM reset is the last resort (QEMU's order); doing the slot/bus reset"
            )
            cands.append(_Candidate(
                scope.kind, scope.target, set(scope.affected) | {t}, {t}, slot=scope.slot,
                notes=[f"{t}: {why}"],
            ))
        return cands, blockers

    # -- step 3: merge overlapping candidates ---------------------------------

    def merge(self, cands: list[_Candidate]) -> tuple[list[_Candidate], list[Blocker]]:
        out = list(cands)
        blockers: list[Blocker] = []
        changed = True
        while changed:
            changed = False
            for i in range(len(out)):
                for j in range(i + 1, len(out)):
                    if not out[i].affected & out[j].affected:
                        continue
                    combined = self._combine(out[i], out[j])
                    if combined is None:
                        # Two overlapping resets with no common bridge: refuse both.
                        for c in (out[i], out[j]):
                            blockers.extend(
                                Blocker(t, self.me, f"{out[i].phrase()} and {out[j].phrase()} "
                                        "overlap and no bridge covers both")
                                for t in sorted(c.needs)
                            )
                        del out[j]
                        del out[i]
                    else:
                        out[i] = combined
                        del out[j]
                    changed = True
                    break
                if changed:
                    break
        return out, blockers

    def _combine(self, a: _Candidate, b: _Candidate) -> _Candidate | None:
        for wide, narrow in ((a, b), (b, a)):
            if wide.affected >= narrow.affected and (
                wide.kind is not ResetKind.FUNCTION or narrow.kind is ResetKind.FUNCTION
            ):
                wide.needs |= narrow.needs
                wide.notes.extend(narrow.notes)
                if narrow.key != wide.key:
                    wide.notes.append(f"subsumes {narrow.phrase()}")
                return wide
        # Neither contains the other: escalate to the nearest bridge above
        # both whose secondary bus reset reaches everything either hits.
        union = a.affected | b.affected
        start = a.target if a.kind is not ResetKind.FUNCTION else self.topo.parent(a.target)
        chain: list[PciAddress] = []
        while start is not None and start not in chain:
            chain.append(start)
            start = self.topo.parent(start)
        for bridge in chain:
            below = self.topo.below(bridge)
            if below >= union:
                return _Candidate(
                    ResetKind.BUS, bridge, set(below), a.needs | b.needs,
                    notes=[*a.notes, *b.notes,
                           f"{a.phrase()} and {b.phrase()} overlap; bus reset of {bridge} covers both"],
                )
        return None

    # -- steps 4 and 5: ownership and method ----------------------------------

    def blockers_of(self, cand: _Candidate) -> tuple[list[Blocker], list[str]]:
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

    def bus_method(self, cand: _Candidate, covers: tuple[PciAddress, ...]) -> tuple[Method | None, str]:
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
            return "the VFIO groups are not known to be idle (a QEMU holding one makes the ioctl EBUSY)"
        for f in covers:
            if self.topo.node(f).info.driver != VFIO_DRIVER:
                return f"{f} is not bound to vfio-pci"
            if self.owner(f).kind is OwnerKind.OTHER_VM:
                return f"{f} is held by VM {self.owner(f).name}"
        return None

    def finish(self, cand: _Candidate) -> tuple[Domain, list[Blocker]]:
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

    def plan_targets(
        self, targets: Iterable[PciAddress], wide: frozenset[PciAddress],
        fallback: Mapping[PciAddress, str],
    ) -> tuple[list[Domain], list[Domain], list[Blocker], dict[str, list[PciAddress]]]:
        """Domains, refused domains, blockers, and each refused key's needing targets."""
        cands, blockers = self.candidates(targets, wide, fallback)
        merged, more = self.merge(cands)
        blockers.extend(more)
        domains: list[Domain] = []
        refused: list[Domain] = []
        needs: dict[str, list[PciAddress]] = {}
        for cand in sorted(merged, key=lambda c: c.key):
            domain, bl = self.finish(cand)
            if bl:
                refused.append(domain)
                blockers.extend(bl)
                needs[domain.key] = sorted(cand.needs)
            else:
                domains.append(domain)
        return domains, refused, blockers, needs


def make_plan(
    vm: str,
    owned: Sequence[PciAddress],
    topo: Topology,
    owners: Mapping[PciAddress, Owner],
    policy: Policy,
) -> Plan:
    """Plan the resets of ``owned`` (see module docstring). Pure."""
    owned_t = tuple(sorted(set(owned)))
    # Listed for this VM and another one (owners_of says OTHER_VM): never ours to
    # reset, not even as a collateral of our own domains.
    contested = {a: o for a in owned_t
                 if (o := owners.get(a)) is not None and o.kind is OwnerKind.OTHER_VM}
    planner = _Planner(vm, tuple(a for a in owned_t if a not in contested), topo, owners, policy)
    elsewhere = frozenset(
        a for a, o in owners.items() if o.kind is OwnerKind.OTHER_VM and a not in owned_t
    )
    qemu = predict(topo, owned_t, elsewhere)
    missing = [a for a in planner.owned if a not in topo.functions]
    present = [a for a in planner.owned if a in topo.functions]
    left: dict[PciAddress, str] = {}
    # Targets planned as a slot/bus reset although they have PM (see Policy.pm_suffices).
    wide: set[PciAddress] = set()
    if policy.takeover is Takeover.ALL:
        targets = list(present)
        if not policy.pm_suffices:
            wide = {a for a in present if topo.function_methods(a) == ("pm",)}
    else:
        targets = []
        for q in qemu:
            if q.function not in topo.functions or q.function in contested:
                continue
            if q.action is QemuAction.NONE:
                targets.append(q.function)
            elif q.action is QemuAction.PM_RESET:
                targets.append(q.function)
                wide.add(q.function)
            else:
                left[q.function] = f"QEMU does a {q.action.value}: {q.detail}"
    fallback: dict[PciAddress, str] = {}
    while True:
        domains, refused, blockers, needs = planner.plan_targets(targets, frozenset(wide), fallback)
        # A PM function whose wider reset is refused falls back to PM: QEMU's
        # (gaps, so it is left to QEMU) or ours (all).
        moved = False
        for d in refused:
            widened = [a for a in needs[d.key] if a in wide]
            if not widened:
                continue
            why = "; ".join(b.reason for b in blockers if b.function in d.covers or b.function == d.target)
            for a in widened:
                wide.discard(a)
                if policy.takeover is Takeover.GAPS:
                    targets.remove(a)
                    left[a] = f"QEMU falls back to a PM reset; the wider reset is refused: {why}"
                else:
                    fallback[a] = why
            moved = True
        if not moved:
            break
    blockers = [
        *(Blocker(a, o, f"{a} is listed for VM {vm} and for VM {o.name}: "
                  "not resetting a function another VM may own") for a, o in contested.items()),
        *(Blocker(a, planner.me, f"{a} is not on {topo.host_name}") for a in missing),
        *blockers,
    ]
    covered = {a for d in domains for a in d.covers}
    return Plan(
        vm=vm,
        owned=owned_t,
        policy=policy,
        domains=tuple(domains),
        refusals=tuple(blockers),
        qemu=qemu,
        left_to_qemu=tuple((a, why) for a, why in sorted(left.items()) if a not in covered),
        refused_domains=tuple(refused),
    )
