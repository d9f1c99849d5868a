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

The steps live in their own modules: the types in :mod:`qreset.plan_types`
(re-exported here), steps 2-3 in :mod:`qreset.plan_domains`, steps 4-5 in
:mod:`qreset.plan_policy`; this module does step 1, runs the others, and
retries PM targets whose wider reset was refused.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from qreset.pci.address import PciAddress
from qreset.plan_domains import candidates, merge
from qreset.plan_policy import PolicyCheck
from qreset.plan_types import (
    Blocker,
    Domain,
    Method,
    Owner,
    OwnerKind,
    Plan,
    Policy,
    Takeover,
    owner_from_driver,
)
from qreset.qemu_model import QemuAction, QemuPrediction, VfioBackend, predict
from qreset.topology import Topology

__all__ = [
    "Blocker", "Domain", "Method", "Owner", "OwnerKind", "Plan", "Policy", "QemuAction",
    "QemuPrediction", "Takeover", "make_plan", "owners_of",
]

logger = logging.getLogger(__name__)


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
    key = tuple((name, tuple(addrs)) for name, addrs in vms.items())
    holders = _holders(key)
    out = dict(_base_owners(topo, key))
    for addr in dict.fromkeys(vms.get(this_vm, ())):
        names = holders.get(addr, ())
        if addr not in out or this_vm not in names:
            continue
        others = [n for n in names if n != this_vm]
        if others:
            logger.warning("%s is listed for VM %s and VM %s: not resetting it", addr, this_vm,
                           others[0])
            out[addr] = Owner(OwnerKind.OTHER_VM, others[0])
        else:
            out[addr] = Owner(OwnerKind.THIS_VM, this_vm)
    return out


_VmsKey = tuple[tuple[str, tuple[PciAddress, ...]], ...]


@functools.lru_cache(maxsize=8)
def _holders(vms: _VmsKey) -> Mapping[PciAddress, tuple[str, ...]]:
    """Every listed function and the VMs listing it, sorted by name: the reverse of
    one ownership mapping, derived once per mapping's content (issue 13: rebuilt per
    plan, it cost 256 VMs' worth of work for each guest's every cycle). Read-only."""
    out: dict[PciAddress, list[str]] = {}
    for name, addrs in sorted(vms):
        for addr in addrs:
            names = out.setdefault(addr, [])
            if name not in names:
                names.append(name)
    return MappingProxyType({a: tuple(n) for a, n in out.items()})


#: Per (immutable) topology, the owners of its functions seen from a VM listing
#: none of them, for the last ownership mapping planned with.
_BASE: weakref.WeakKeyDictionary[Topology, tuple[_VmsKey, dict[PciAddress, Owner]]] = (
    weakref.WeakKeyDictionary())


def _base_owners(topo: Topology, key: _VmsKey) -> Mapping[PciAddress, Owner]:
    """Each function's owner for a VM that lists none: OTHER_VM naming the first VM
    (sorted) that lists it, else its driver. :func:`owners_of` then fixes the few
    functions its VM lists."""
    found = _BASE.get(topo)
    if found is not None and found[0] == key:
        return found[1]
    holders = _holders(key)
    out: dict[PciAddress, Owner] = {}
    for addr, node in topo.functions.items():
        names = holders.get(addr)
        out[addr] = (Owner(OwnerKind.OTHER_VM, names[0]) if names
                     else owner_from_driver(node.info.driver))
    _BASE[topo] = (key, out)
    return out


def _plan_targets(
    check: PolicyCheck, targets: Iterable[PciAddress], wide: frozenset[PciAddress],
    fallback: Mapping[PciAddress, str],
) -> tuple[list[Domain], list[Domain], list[Blocker], dict[str, list[PciAddress]]]:
    """Domains, refused domains, blockers, and each refused key's needing targets."""
    cands, blockers = candidates(check.topo, check.me, targets, wide, fallback)
    merged, more = merge(check.topo, check.me, cands)
    blockers.extend(more)
    domains: list[Domain] = []
    refused: list[Domain] = []
    needs: dict[str, list[PciAddress]] = {}
    for cand in sorted(merged, key=lambda c: c.key):
        domain, bl = check.finish(cand)
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
    backends: Mapping[PciAddress, VfioBackend] | None = None,
) -> Plan:
    """Plan the resets of ``owned`` (see module docstring). Pure.

    ``backends``: how QEMU opened each owned function (group or iommufd, from
    the inventory); QEMU's predicted resets are made for that backend, GROUP
    where it is not named.
    """
    owned_t = tuple(sorted(set(owned)))
    # Listed for this VM and another one (owners_of says OTHER_VM): never ours to
    # reset, not even as a collateral of our own domains.
    contested = {a: o for a in owned_t
                 if (o := owners.get(a)) is not None and o.kind is OwnerKind.OTHER_VM}
    check = PolicyCheck(vm, tuple(a for a in owned_t if a not in contested), topo, owners, policy)
    elsewhere = frozenset(
        a for a, o in owners.items() if o.kind is OwnerKind.OTHER_VM and a not in owned_t
    )
    qemu = predict(topo, owned_t, elsewhere, backends=backends)
    missing = [a for a in check.owned if a not in topo.functions]
    present = [a for a in check.owned if a in topo.functions]
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
        domains, refused, blockers, needs = _plan_targets(check, targets, frozenset(wide), fallback)
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
        *(Blocker(a, check.me, f"{a} is not on {topo.host_name}") for a in missing),
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
