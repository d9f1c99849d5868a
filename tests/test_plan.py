"""Planner tests: hand-made topologies (real config bytes, real parse_config)
and every simulated topology in configs/sim/, plus a hypothesis property test
over random ownership assignments."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.plan import (
    Method,
    Owner,
    OwnerKind,
    Plan,
    Policy,
    QemuAction,
    Takeover,
    make_plan,
    owners_of,
)
from qreset.topology import FunctionNode, ResetKind, Topology
from tests.conftest import SIM_DIR
from tests.helpers_plan import BRIDGE, A, host, plan_for, predictions, rp
from tests.pcibuild import config, node, sample


def check_invariants(plan: Plan, topo: Topology, owners: Mapping[PciAddress, Owner]) -> None:
    """What must hold for every plan (also the property test's oracle)."""
    owned = set(plan.owned)
    seen: dict[PciAddress, str] = {}
    for d in plan.domains:
        assert d.covers == tuple(sorted(set(d.covers))), d
        assert set(d.owned) == set(d.covers) & owned, d
        for f in d.covers:
            assert f not in seen, f"{f} covered by {seen[f]} and {d.key}"
            seen[f] = d.key
            if f in owned or f in plan.policy.allow:
                continue
            who = owners.get(f)
            if who is not None and who.kind is OwnerKind.OTHER_VM:
                pytest.fail(f"{d.key} hits {f} of {who}")
            if who is not None and who.kind is OwnerKind.HOST_DRIVER:
                assert topo.node(f).config.is_bridge, f"{d.key} hits {f} of {who}"
        if d.kind is ResetKind.FUNCTION:
            assert d.key == f"function:{d.target}"
            assert d.method.value in topo.node(d.target).info.reset_methods
            # A function reset covers its target and (a PF) every VF it clears.
            vfs = {v for v in topo.node(d.target).info.virtfns if v in topo.functions}
            assert set(d.covers) == {d.target} | vfs, d
        else:
            assert d.key == f"bus:{d.target}"
            assert d.method in plan.policy.bus_methods
            # A bus/slot reset covers everything below its bridge: never under-estimated.
            assert set(d.covers) == topo.below(d.target), d
    left = {a for a, _ in plan.left_to_qemu}
    refused_owned = {a for d in plan.refused_domains for a in d.owned}
    self_blocked = {b.function for b in plan.refusals if b.function in owned}
    for f in owned:
        # Reset by exactly one planned domain (and then not left to QEMU), or
        # not reset by us: left to QEMU and/or in a refusal.
        if f in seen:
            assert f not in left, (f, plan)
        else:
            assert f in left or f in refused_owned or f in self_blocked, (f, plan)
    assert plan.ok == (not plan.refusals)
    assert bool(plan.refused_domains) <= bool(plan.refusals)


# -- method choice ---------------------------------------------------------


def test_flr_nic_is_one_function_domain_and_qemu_resets_it() -> None:
    topo = host()
    plan = plan_for(topo, ["02:00.0"])
    assert plan.ok
    [d] = plan.domains
    assert (d.key, d.kind, d.method, d.covers) == ("function:0000:02:00.0", ResetKind.FUNCTION,
                                                   Method.FLR, (A("02:00.0"),))
    assert predictions(plan) == {"0000:02:00.0": QemuAction.FUNCTION_RESET}
    check_invariants(plan, topo, owners_of(topo, {"vm1": plan.owned}, "vm1"))


def test_gpu_and_audio_in_one_vm_share_one_bus_domain() -> None:
    topo = host()
    plan = plan_for(topo, ["01:00.0", "01:00.1"])
    assert plan.ok
    [d] = plan.domains  # reset once, for both functions
    assert d.key == "bus:0000:00:01.0"
    assert d.kind is ResetKind.BUS
    assert d.covers == d.owned == (A("01:00.0"), A("01:00.1"))
    assert d.method is Method.USER_SBR  # two functions, no reset_subordinate, groups not idle
    assert "subsumes pm of 0000:01:00.0" in d.reason
    # QEMU: GPU has PM but no FLR, audio nothing: both need the hot reset, both groups are ours.
    assert predictions(plan) == {"0000:01:00.0": QemuAction.HOT_RESET,
                                 "0000:01:00.1": QemuAction.HOT_RESET}


def test_flr_gpu_with_flrless_audio_gets_no_separate_flr() -> None:
    topo = host()
    plan = plan_for(topo, ["04:00.0", "04:00.1"])
    [d] = plan.domains
    assert d.key == "bus:0000:00:1d.0"
    assert d.covers == (A("04:00.0"), A("04:00.1"))
    assert d.method is Method.RESET_SUBORDINATE  # the bridge has it; 'bus' needs a lone function
    assert d.write_target == A("00:1d.0")
    assert not any(x.kind is ResetKind.FUNCTION for x in plan.domains)


def test_lone_function_uses_the_kernel_bus_method() -> None:
    plan = plan_for(host(), ["06:00.0"])
    [d] = plan.domains
    assert (d.key, d.method, d.covers) == ("bus:0000:00:1f.0", Method.KERNEL_BUS, (A("06:00.0"),))
    assert d.target == A("00:1f.0")
    assert d.write_target == A("06:00.0")  # the kernel's 'bus' method is written on the function
    # QEMU: reset_works (the kernel's bus method) and no PM reset to avoid: VFIO_DEVICE_RESET.
    assert predictions(plan) == {"0000:06:00.0": QemuAction.FUNCTION_RESET}


def test_bus_methods_policy_filters_and_orders() -> None:
    topo = host()
    only_sbr = Policy(bus_methods=(Method.USER_SBR,))
    [d] = plan_for(topo, ["06:00.0"], policy=only_sbr).domains
    assert d.method is Method.USER_SBR
    hot_first = Policy(bus_methods=(Method.VFIO_HOT_RESET, Method.USER_SBR), vfio_ioctl_ok=True)
    [d] = plan_for(topo, ["01:00.0", "01:00.1"], policy=hot_first).domains
    assert d.method is Method.VFIO_HOT_RESET
    # Without the daemon's word that the groups are idle, the ioctl is not planned.
    [d] = plan_for(topo, ["01:00.0", "01:00.1"], policy=dataclasses.replace(
        hot_first, vfio_ioctl_ok=False)).domains
    assert d.method is Method.USER_SBR
    nothing = plan_for(topo, ["01:00.0", "01:00.1"], policy=Policy(bus_methods=(Method.KERNEL_BUS,)))
    assert not nothing.ok
    assert "no permitted method for bus reset of 0000:00:01.0" in nothing.refusals[0].reason


def test_vfio_hot_reset_not_planned_over_another_vms_function() -> None:
    topo = host()
    policy = Policy(bus_methods=(Method.VFIO_HOT_RESET, Method.USER_SBR), vfio_ioctl_ok=True,
                    allow=frozenset({A("01:00.0")}))
    plan = plan_for(topo, ["01:00.1"], {"vm2": ["01:00.0"]}, policy)
    [d] = plan.domains
    assert d.method is Method.USER_SBR
    assert "held by VM vm2" in d.reason


def nested(bridge_driver: str | None) -> Topology:
    """00:1b.0 RP -> 07..08: 07:00.0 PCI bridge -> 08; 07:01.0 and 08:00.0 have no reset method."""
    nodes = [
        rp("00:1b.0", 7, 8),
        node("07:00.0", config(bridge=True, secondary=8, subordinate=8, class_code=BRIDGE,
                               pcie_type=regs.EXP_TYPE_PCI_BRIDGE), parent="00:1b.0",
             driver=bridge_driver, group=30),
        node("07:01.0", config(), parent="00:1b.0", driver="vfio-pci", group=30),
        node("08:00.0", config(pcie_type=None), parent="07:00.0", driver="vfio-pci", group=30),
    ]
    return Topology({n.address: n for n in nodes}, [], True, "nested")


@pytest.mark.parametrize("bridge_driver", [None, "pcieport"])
def test_bus_reset_above_subsumes_bus_reset_below(bridge_driver: str | None) -> None:
    topo = nested(bridge_driver)
    plan = plan_for(topo, ["08:00.0", "07:01.0"])
    assert plan.ok, plan.refusals
    [d] = plan.domains
    assert d.key == "bus:0000:00:1b.0"
    assert d.covers == (A("07:00.0"), A("07:01.0"), A("08:00.0"))
    assert "subsumes bus reset of 0000:07:00.0" in d.reason
    # Alone, 08:00.0 needs only its own bridge's bus.
    [alone] = plan_for(topo, ["08:00.0"]).domains
    assert alone.key == "bus:0000:07:00.0"
    assert alone.covers == (A("08:00.0"),)


def test_partially_overlapping_resets_are_never_merged_into_the_smaller() -> None:
    """A PF whose VF shows up behind another port (a partial overlap, no containment):
    the PF's FLR hits {PF, VF}; the other port's bus reset hits {VF, its device}. No
    bridge covers both, so both are refused; merging one into the other would leave a
    function the VM needs reset out of every domain."""
    pf = node("01:00.0", config(flr=True), parent="00:01.0", driver="vfio-pci", group=40, methods=("flr",))
    vf = node("02:00.1", config(flr=True), parent="00:02.0", driver="vfio-pci", group=41, methods=("flr",))
    pf = FunctionNode(dataclasses.replace(pf.info, virtfns=(vf.address,)), pf.config)
    vf = FunctionNode(dataclasses.replace(vf.info, physfn=pf.address), vf.config)
    dev = node("02:00.0", config(), parent="00:02.0", driver="vfio-pci", group=42)
    nodes = [rp("00:01.0", 1), rp("00:02.0", 2), pf, vf, dev]
    topo = Topology({n.address: n for n in nodes}, [], True, "partial")
    owners = owners_of(topo, {"vm1": [pf.address, dev.address]}, "vm1")
    plan = make_plan("vm1", [pf.address, dev.address], topo, owners, Policy())
    check_invariants(plan, topo, owners)
    assert plan.domains == ()
    assert {b.function for b in plan.refusals} == {pf.address, dev.address}
    assert all("no bridge covers both" in b.reason for b in plan.refusals)


def test_bridge_below_owned_by_another_vm_still_blocks() -> None:
    topo = nested("vfio-pci")
    plan = plan_for(topo, ["07:01.0"], {"vm2": ["07:00.0"]})
    assert [str(b.function) for b in plan.refusals] == ["0000:07:00.0"]


# -- ownership ------------------------------------------------------------


def test_refusal_names_host_driver_function_and_allow_lifts_it() -> None:
    topo = host()
    plan = plan_for(topo, ["03:00.0"])
    assert not plan.ok
    assert not plan.domains
    [b] = plan.refusals
    assert b.function == A("03:00.1")
    assert b.owner == Owner(OwnerKind.HOST_DRIVER, "snd_hda_intel")
    assert b.reason == ("bus reset of 0000:00:1c.0 would hit 0000:03:00.1 "
                        "bound to host driver snd_hda_intel")
    assert [d.key for d in plan.refused_domains] == ["bus:0000:00:1c.0"]
    allowed = plan_for(topo, ["03:00.0"], policy=Policy(allow=frozenset({A("03:00.1")})))
    assert allowed.ok
    [d] = allowed.domains
    assert d.covers == (A("03:00.0"), A("03:00.1"))
    assert d.owned == (A("03:00.0"),)
    assert "allowed by policy" in d.reason


def test_audio_of_another_vm_blocks_and_qemu_cannot_either() -> None:
    topo = host()
    # vm1 has the audio function only; vm2 has the GPU.
    plan = plan_for(topo, ["01:00.1"], {"vm2": ["01:00.0"]})
    assert predictions(plan) == {"0000:01:00.1": QemuAction.NONE}
    assert "depends on device 0000:01:00.0 which is not owned" in plan.qemu[0].detail
    assert not plan.ok
    [b] = plan.refusals
    assert (b.function, b.owner) == (A("01:00.0"), Owner(OwnerKind.OTHER_VM, "vm2"))
    assert "owned by VM vm2" in b.reason
    # From vm2's side: the GPU has PM, its hot reset is refused: QEMU falls back to PM.
    other = make_plan("vm2", [A("01:00.0")], topo,
                      owners_of(topo, {"vm1": [A("01:00.1")], "vm2": [A("01:00.0")]}, "vm2"), Policy())
    assert predictions(other) == {"0000:01:00.0": QemuAction.PM_RESET}
    [d] = other.domains  # takeover=all: the least disruptive reset, its own PM
    assert (d.kind, d.method) == (ResetKind.FUNCTION, Method.PM)


def test_idle_vfio_and_driverless_functions_may_be_hit() -> None:
    topo = host()
    plan = plan_for(topo, ["01:00.0"])  # 01:00.1 is vfio-pci but in no VM
    assert plan.ok
    assert owners_of(topo, {"vm1": [A("01:00.0")]}, "vm1")[A("01:00.1")].kind is OwnerKind.VFIO_IDLE
    # GPU alone with PM: takeover=all plans its PM reset, not the bus.
    [d] = plan.domains
    assert d.method is Method.PM


def test_pf_reset_covers_its_vfs_and_refuses_when_a_vf_is_elsewhere() -> None:
    topo = host()
    plan = plan_for(topo, ["05:00.0", "05:00.1"], {"vm2": ["05:00.2"]})
    assert not plan.ok
    assert [(str(b.function), b.owner.name) for b in plan.refusals] == [("0000:05:00.2", "vm2")]
    assert "flr of 0000:05:00.0 would hit 0000:05:00.2" in plan.refusals[0].reason
    ok = plan_for(topo, ["05:00.0", "05:00.1", "05:00.2"])
    [d] = ok.domains  # the VF FLRs are subsumed by the PF's
    assert d.key == "function:0000:05:00.0"
    assert len(d.covers) == 3


def test_vfs_alone_get_their_own_flr() -> None:
    topo = host()
    plan = plan_for(topo, ["05:00.1"], {"vm2": ["05:00.2"]})
    assert plan.ok
    assert [(d.key, d.method) for d in plan.domains] == [("function:0000:05:00.1", Method.FLR)]


def test_root_bus_function_without_method_is_refused_naming_itself() -> None:
    plan = plan_for(host(), ["00:03.0"])
    [b] = plan.refusals
    assert b.function == A("00:03.0")
    assert b.owner.kind is OwnerKind.THIS_VM
    assert "root bus" in b.reason
    assert predictions(plan) == {"0000:00:03.0": QemuAction.NONE}
    assert "no available reset mechanism" in plan.qemu[0].detail


def test_missing_function_is_refused() -> None:
    plan = plan_for(host(), ["02:00.0", "0a:00.0"])
    assert [str(b.function) for b in plan.refusals] == ["0000:0a:00.0"]
    assert "not on test-host" in plan.refusals[0].reason
    assert [d.key for d in plan.domains] == ["function:0000:02:00.0"]


def test_owners_of_classifies_every_function() -> None:
    topo = host()
    own = owners_of(topo, {"vm1": [A("02:00.0")], "vm2": [A("01:00.0")]}, "vm1")
    assert set(own) == set(topo.functions)
    assert own[A("02:00.0")] == Owner(OwnerKind.THIS_VM, "vm1")
    assert own[A("01:00.0")] == Owner(OwnerKind.OTHER_VM, "vm2")
    assert own[A("01:00.1")].kind is OwnerKind.VFIO_IDLE
    assert own[A("03:00.1")] == Owner(OwnerKind.HOST_DRIVER, "snd_hda_intel")


# -- takeover=gaps ----------------------------------------------------------


def test_gaps_leaves_what_qemu_handles() -> None:
    topo = host()
    gaps = Policy(takeover=Takeover.GAPS, allow=frozenset({A("03:00.1")}))
    plan = plan_for(topo, ["02:00.0", "03:00.0", "01:00.0", "01:00.1"], policy=gaps)
    assert plan.ok
    # 03:00.0: QEMU refused (03:00.1 is in group 15, not ours) -> ours. 02:00.0: FLR -> QEMU's.
    # 01:00.x: QEMU hot-resets both (groups 11 and 12 are ours) -> QEMU's.
    assert [d.key for d in plan.domains] == ["bus:0000:00:1c.0"]
    assert {str(a) for a, _ in plan.left_to_qemu} == {"0000:02:00.0", "0000:01:00.0", "0000:01:00.1"}
    assert all("QEMU does a" in why for _, why in plan.left_to_qemu)
    full = plan_for(topo, ["02:00.0", "03:00.0", "01:00.0", "01:00.1"],
                    policy=dataclasses.replace(gaps, takeover=Takeover.ALL))
    assert [d.key for d in full.domains] == ["bus:0000:00:01.0", "bus:0000:00:1c.0",
                                             "function:0000:02:00.0"]
    assert not full.left_to_qemu


def test_gaps_pm_fallback_gets_the_bus_reset_qemu_could_not_do() -> None:
    topo = host()
    gaps = Policy(takeover=Takeover.GAPS)
    # vm1 has the GPU (PM, no FLR), the audio is idle vfio-pci: QEMU's hot reset
    # is refused (group 12 not owned), it falls back to PM; we do the bus reset.
    plan = plan_for(topo, ["01:00.0"], policy=gaps)
    assert predictions(plan) == {"0000:01:00.0": QemuAction.PM_RESET}
    [d] = plan.domains
    assert d.key == "bus:0000:00:01.0"
    assert d.covers == (A("01:00.0"), A("01:00.1"))
    # When the audio belongs to another VM, the bus reset is refused: leave PM to QEMU.
    blocked = plan_for(topo, ["01:00.0"], {"vm2": ["01:00.1"]}, gaps)
    assert blocked.ok
    assert not blocked.domains
    [(addr, why)] = blocked.left_to_qemu
    assert addr == A("01:00.0")
    assert "PM reset" in why
    assert "0000:01:00.1 owned by VM vm2" in why


def test_pm_suffices_false_prefers_the_bus_reset_and_falls_back_to_pm() -> None:
    topo = host()
    strict = Policy(pm_suffices=False)
    [d] = plan_for(topo, ["01:00.0"], policy=strict).domains
    assert (d.key, d.method) == ("bus:0000:00:01.0", Method.USER_SBR)
    assert "PM reset is the last resort" in d.reason
    # The audio is another VM's: the bus reset is refused, the GPU gets its PM reset.
    plan = plan_for(topo, ["01:00.0"], {"vm2": ["01:00.1"]}, strict)
    assert plan.ok
    [d] = plan.domains
    assert (d.key, d.method) == ("function:0000:01:00.0", Method.PM)
    assert "the wider reset is refused: bus reset of 0000:00:01.0 would hit 0000:01:00.1" in d.reason


# -- the simulated topologies -----------------------------------------------


def _sim_files() -> list[Path]:
    return sorted(SIM_DIR.glob("*.toml"))


def _load_sim(path: Path) -> Topology:
    from qreset.pci.sim import SimHost

    async def load() -> Topology:
        host = SimHost.from_toml(path, time_scale=0.0)
        try:
            return await Topology.load(host)
        finally:
            await host.close()

    return asyncio.run(load())


def _endpoints(topo: Topology) -> list[PciAddress]:
    return [a for a, n in topo.functions.items() if not n.config.is_bridge]


@pytest.mark.parametrize("path", _sim_files(), ids=lambda p: p.stem)
def test_sim_topology_plans(path: Path) -> None:
    topo = _load_sim(path)
    vfio = [a for a in _endpoints(topo) if topo.node(a).info.driver == "vfio-pci"]
    assert vfio, f"{path.name} has no vfio-pci function to plan for"
    for takeover in Takeover:
        policy = Policy(takeover=takeover)
        # All vfio-pci functions in one VM, and each one alone.
        for mine in [vfio, *[[a] for a in vfio]]:
            vms = {"vm1": mine}
            owners = owners_of(topo, vms, "vm1")
            plan = make_plan("vm1", mine, topo, owners, policy)
            check_invariants(plan, topo, owners)
            assert {q.function for q in plan.qemu} == set(mine)


@pytest.mark.parametrize("path", _sim_files(), ids=lambda p: p.stem)
def test_sim_shared_domain_is_reset_once(path: Path) -> None:
    """Owned functions that need the same bus reset end up in one domain."""
    topo = _load_sim(path)
    vfio = [a for a in _endpoints(topo) if topo.node(a).info.driver == "vfio-pci"]
    plan = make_plan("vm1", vfio, topo, owners_of(topo, {"vm1": vfio}, "vm1"), Policy())
    every = plan.domains + plan.refused_domains
    keys = [d.key for d in every]
    assert len(keys) == len(set(keys))
    by_bridge: dict[PciAddress, list[PciAddress]] = {}
    for a in vfio:
        scope = topo.slot_scope(a) or topo.bus_scope(a)
        if not topo.function_methods(a) and scope is not None:
            by_bridge.setdefault(scope.target, []).append(a)
    for bridge, needy in by_bridge.items():
        homes = {d.key for d in every for a in needy if a in d.covers}
        assert len(homes) == 1, (bridge, needy, homes)
        [home] = [d for d in every if d.key in homes]
        assert home.kind is not ResetKind.FUNCTION


# -- property test ------------------------------------------------------------

_KINDS = ("this", "other", "host", "idle", "none")


def _reassign(
    topo: Topology, roles: Mapping[PciAddress, str],
) -> tuple[Topology, dict[str, list[PciAddress]]]:
    """A copy of ``topo`` whose drivers match ``roles``, and the VM map."""
    nodes = dict(topo.functions)
    vms: dict[str, list[PciAddress]] = {"vm1": [], "vm2": []}
    for addr, role in roles.items():
        driver = {"this": "vfio-pci", "other": "vfio-pci", "host": "nvidia", "idle": "vfio-pci",
                  "none": None}[role]
        n = nodes[addr]
        nodes[addr] = dataclasses.replace(n, info=dataclasses.replace(n.info, driver=driver))
        if role == "this":
            vms["vm1"].append(addr)
        elif role == "other":
            vms["vm2"].append(addr)
    return Topology(nodes, topo.slots, topo.iommu, topo.host_name), vms


_TOPOLOGIES: list[Topology] = []


def _topologies() -> list[Topology]:
    if not _TOPOLOGIES:
        _TOPOLOGIES.extend([host(), nested("pcieport"), nested(None), sample()])
        _TOPOLOGIES.extend(_load_sim(p) for p in _sim_files())
    return _TOPOLOGIES


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_never_hits_protected_functions(data: st.DataObject) -> None:
    topos = _topologies()
    topo = topos[data.draw(st.integers(0, len(topos) - 1), label="topology")]
    ends = [a for a, n in topo.functions.items() if not n.config.is_bridge]
    roles = {a: data.draw(st.sampled_from(_KINDS), label=str(a)) for a in ends}
    topo2, vms = _reassign(topo, roles)
    protected = [a for a, r in roles.items() if r in ("other", "host")]
    allow = data.draw(st.frozensets(st.sampled_from(protected)) if protected else st.just(frozenset()),
                      label="allow")
    bus_methods = data.draw(st.permutations(
        [Method.KERNEL_BUS, Method.RESET_SUBORDINATE, Method.VFIO_HOT_RESET, Method.USER_SBR]),
        label="bus_methods order")
    policy = Policy(
        takeover=data.draw(st.sampled_from(list(Takeover)), label="takeover"),
        allow=allow,
        bus_methods=tuple(bus_methods[:data.draw(st.integers(1, 4), label="bus_methods count")]),
        vfio_ioctl_ok=data.draw(st.booleans(), label="vfio_ioctl_ok"),
        pm_suffices=data.draw(st.booleans(), label="pm_suffices"),
    )
    owners = owners_of(topo2, vms, "vm1")
    plan = make_plan("vm1", vms["vm1"], topo2, owners, policy)
    check_invariants(plan, topo2, owners)
    # Pure and order-independent: the same inputs in another order give the same plan.
    assert make_plan("vm1", list(reversed(vms["vm1"])), topo2, dict(reversed(owners.items())), policy) == plan
    left = {a for a, _ in plan.left_to_qemu}
    if policy.takeover is Takeover.ALL:
        assert not left
    for q in plan.qemu:
        if q.action is QemuAction.NONE:
            assert q.function not in left  # nobody else resets it: never left to QEMU
        if q.function in left:
            assert q.action is not QemuAction.NONE
    for d in plan.domains:
        if d.method is Method.VFIO_HOT_RESET:
            assert policy.vfio_ioctl_ok
            assert all(topo2.node(a).info.driver == "vfio-pci" for a in d.covers)
    refused_targets = {d.target for d in plan.refused_domains}
    for b in plan.refusals:
        if b.function in refused_targets and b.reason.startswith("no permitted method"):
            continue  # the policy's bus_methods leave nothing for this bridge
        if b.function not in plan.owned:
            assert b.owner.kind in (OwnerKind.OTHER_VM, OwnerKind.HOST_DRIVER)
            assert b.function not in allow
            assert str(b.function) in b.reason


# -- qreset plan (in-process: argparse, host loading, printing, exit codes) --------

def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from qreset.cli import main

    rc = main(["plan", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["zz:00.0"], "bad PCI address 'zz:00.0'"),
        (["00:00.0", "--other", "vm2"], "expected VM=BDF"),
        (["00:00.0", "--other", "vm2=00:00.0"], "listed both"),
        (["00:00.0", "--other", "cli=00:01.0"], "is the VM being planned"),
        (["00:00.0", "--allow", "nope"], "bad PCI address 'nope'"),
        (["00:00.0", "--sim", "/nonexistent/x.toml"], "/nonexistent/x.toml"),
        (["00:00.0", "--sysfs-root", "/nonexistent"], "/nonexistent"),
    ],
)
def test_cli_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    rc, out, err = cli(capsys, *args)
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("qreset: ")
    assert needle in err


def _real_functions() -> list[str]:
    root = Path("/sys/bus/pci/devices")
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.mark.skipif(not _real_functions(), reason="this machine has no /sys/bus/pci")
def test_cli_on_real_sys_touches_nothing_and_agrees_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    bdfs = _real_functions()
    rc, out, _ = cli(capsys, "fe:1f.7")
    assert rc == 2
    before = {b: (Path("/sys/bus/pci/devices") / b / "config").read_bytes()[:64] for b in bdfs}
    for bdf in bdfs[:2]:
        rc, out, err = cli(capsys, bdf, "--json")
        doc = json.loads(out)
        assert doc["owned"] == [bdf]
        assert rc == (0 if doc["ok"] else 1), err
        assert [q["function"] for q in doc["qemu"]] == [bdf]
        rc_text, text, _ = cli(capsys, bdf)
        assert rc_text == rc
        assert ("OK" if doc["ok"] else "REFUSED") in text.splitlines()[0]
    after = {b: (Path("/sys/bus/pci/devices") / b / "config").read_bytes()[:64] for b in bdfs}
    assert after == before


@pytest.mark.skipif(not (SIM_DIR / "gpu-audio.toml").is_file(),
                    reason="configs/sim/gpu-audio.toml not yet there")
def test_cli_sim_gpu_audio(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    sim = str(SIM_DIR / "gpu-audio.toml")
    topo = _load_sim(SIM_DIR / "gpu-audio.toml")
    card = [str(a) for a, n in topo.functions.items() if n.info.driver == "vfio-pci"
            and not n.config.is_bridge]
    rc, out, _ = cli(capsys, *card, "--sim", sim, "--json")
    doc = json.loads(out)
    assert rc == 0
    assert doc["ok"]
    bus = [d for d in doc["domains"] if d["kind"] != "function"]
    assert len(bus) == 1
    assert set(card) <= set(bus[0]["covers"])
    rc, text, _ = cli(capsys, *card, "--sim", sim)
    assert rc == 0
    assert bus[0]["key"] in text


def _sim(name: str) -> Topology:
    return _load_sim(_sim_path(name))


def test_sim_gpu_function0_lists_bus_but_qemu_cannot_use_it() -> None:
    """fn 0 is probed before fn 1 exists (pci_scan_slot): 'bus' is listed but refused."""
    topo = _sim("gpu-audio.toml")
    gpu, audio = A("01:00.0"), A("01:00.1")
    assert "bus" in topo.node(gpu).info.reset_methods
    plan = plan_for(topo, ["01:00.0"])
    assert predictions(plan) == {"0000:01:00.0": QemuAction.HOT_RESET}
    [d] = plan.domains
    assert d.covers == (gpu, audio)
    assert d.method is Method.USER_SBR  # not 'bus': it would hit the audio too
    gaps = plan_for(topo, ["01:00.0", "01:00.1"], policy=Policy(takeover=Takeover.GAPS))
    assert not gaps.domains
    assert {a for a, _ in gaps.left_to_qemu} == {gpu, audio}


def test_sim_demo_conventional_bus_shared_by_two_vms() -> None:
    topo = _sim("demo.toml")
    mine, theirs = A("06:01.0"), A("06:02.0")
    plan = plan_for(topo, ["06:01.0"], {"vm2": ["06:02.0"]})
    assert not plan.ok
    assert [(b.function, b.owner) for b in plan.refusals] == [(theirs, Owner(OwnerKind.OTHER_VM, "vm2"))]
    assert predictions(plan) == {"0000:06:01.0": QemuAction.NONE}
    assert f"depends on device {theirs} which is not owned" in plan.qemu[0].detail
    allowed = plan_for(topo, ["06:01.0"], {"vm2": ["06:02.0"]}, Policy(allow=frozenset({theirs})))
    [d] = allowed.domains
    assert d.key == "bus:0000:05:00.0"
    assert d.covers == (mine, theirs)
    assert d.owned == (mine,)
    assert d.method is Method.RESET_SUBORDINATE
    # vm2's audio card has PM: its own plan stays a function reset that hits nothing of vm1.
    other = make_plan("vm2", [theirs], topo, owners_of(topo, {"vm1": [mine], "vm2": [theirs]}, "vm2"),
                      Policy())
    assert [(x.key, x.method, x.covers) for x in other.domains] == [
        ("function:0000:06:02.0", Method.PM, (theirs,))]


def test_sim_demo_two_vms_never_hit_each_other() -> None:
    topo = _sim("demo.toml")
    vms = {"vm1": [A("01:00.0"), A("03:00.0"), A("03:00.1"), A("06:01.0")],
           "vm2": [A("02:00.0"), A("04:00.0"), A("06:02.0")]}
    plans = {}
    for vm, mine in vms.items():
        owners = owners_of(topo, vms, vm)
        plans[vm] = make_plan(vm, mine, topo, owners, Policy())
        check_invariants(plans[vm], topo, owners)
    one = {d.key: d for d in plans["vm1"].domains}
    assert [d.key for d in plans["vm1"].refused_domains] == ["bus:0000:05:00.0"]
    assert one["bus:0000:00:03.0"].covers == (A("03:00.0"), A("03:00.1"))
    assert one["function:0000:01:00.0"].method is Method.FLR
    assert plans["vm2"].ok
    assert {d.method for d in plans["vm2"].domains} == {Method.FLR, Method.PM}
    # No function is covered by both VMs' plans.
    assert not ({a for d in plans["vm1"].domains for a in d.covers}
                & {a for d in plans["vm2"].domains for a in d.covers})


def test_sim_sriov_vf_flr_and_pf_on_host_driver() -> None:
    topo = _sim("sriov.toml")
    pf = A("01:00.0")
    vfs = topo.node(pf).info.virtfns
    assert vfs
    plan = plan_for(topo, [str(vfs[0])])
    [d] = plan.domains
    assert (d.kind, d.method, d.covers) == (ResetKind.FUNCTION, Method.FLR, (vfs[0],))
    # The PF's FLR would take every VF with it, some on igbvf in the host.
    pf_plan = plan_for(topo, ["01:00.0"])
    assert not pf_plan.ok
    assert {b.function for b in pf_plan.refusals} == {
        v for v in vfs if topo.node(v).info.driver not in ("vfio-pci", None)}


def test_cli_sim_demo_other_allow_and_pm_last(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    sim = str(_sim_path("demo.toml"))
    rc, out, _ = cli(capsys, "06:01.0", "--other", "vm2=06:02.0", "--sim", sim)
    assert rc == 1
    assert "refused: 0000:06:02.0 (other-vm:vm2): bus reset of 0000:05:00.0 would hit 0000:06:02.0" in out
    assert "held by vm2" in out
    rc, out, _ = cli(capsys, "06:01.0", "--other", "vm2=06:02.0", "--allow", "06:02.0", "--sim", sim,
                     "--json")
    assert rc == 0
    assert [d["key"] for d in json.loads(out)["domains"]] == ["bus:0000:05:00.0"]
    # 06:02.0 has PM only: --pm-last asks for its bus reset, which would hit 06:01.0 of vm1.
    rc, out, _ = cli(capsys, "06:02.0", "--vm", "vm2", "--other", "vm1=06:01.0", "--pm-last",
                     "--sim", sim, "--json")
    doc = json.loads(out)
    assert rc == 0
    assert doc["policy"]["pm_suffices"] is False
    [d] = doc["domains"]
    assert (d["key"], d["method"]) == ("function:0000:06:02.0", "pm")
    assert "wider reset is refused" in d["reason"]


def _sim_path(name: str) -> Path:
    path = SIM_DIR / name
    assert path.is_file(), path
    return path


def test_no_iommu_group_means_qemu_cannot_have_it() -> None:
    topo = host()
    nodes = {a: dataclasses.replace(n, info=dataclasses.replace(n.info, iommu_group=None))
             for a, n in topo.functions.items()}
    bare = Topology(nodes, [], False, "no-iommu")
    plan = plan_for(bare, ["02:00.0", "01:00.1"])
    assert predictions(plan) == {"0000:01:00.1": QemuAction.NONE, "0000:02:00.0": QemuAction.NONE}
    assert all("no IOMMU group" in q.detail for q in plan.qemu)
    # The planner itself does not need VFIO: FLR of the NIC, bus reset for the audio.
    assert plan.ok
    assert [d.key for d in plan.domains] == ["bus:0000:00:01.0", "function:0000:02:00.0"]


def test_sim_nic_flr_is_a_function_reset_for_us_and_for_qemu() -> None:
    topo = _sim("nic-flr.toml")
    nic = next(a for a, n in topo.functions.items() if n.info.driver == "vfio-pci")
    plan = plan_for(topo, [str(nic)])
    [d] = plan.domains
    assert (d.key, d.method, d.covers) == (f"function:{nic}", Method.FLR, (nic,))
    assert predictions(plan) == {str(nic): QemuAction.FUNCTION_RESET}
    gaps = plan_for(topo, [str(nic)], policy=Policy(takeover=Takeover.GAPS))
    assert not gaps.domains
    assert [a for a, _ in gaps.left_to_qemu] == [nic]


def test_sim_switch_pm_gpu_and_host_driver_neighbours() -> None:
    topo = _sim("switch.toml")
    gpu, nvme = A("05:00.0"), A("03:00.0")
    plan = plan_for(topo, ["05:00.0", "03:00.0"])
    assert plan.ok
    assert {(d.key, d.method) for d in plan.domains} == {
        (f"function:{gpu}", Method.PM), (f"function:{nvme}", Method.FLR)}
    # QEMU: the GPU has PM but no FLR, so it prefers the hot reset of its port (alone there).
    assert predictions(plan) == {str(gpu): QemuAction.HOT_RESET, str(nvme): QemuAction.FUNCTION_RESET}
    pm_last = plan_for(topo, ["05:00.0"], policy=Policy(pm_suffices=False))
    [d] = pm_last.domains
    assert (d.key, d.method, d.covers) == ("bus:0000:02:10.0", Method.KERNEL_BUS, (gpu,))
    # The USB controller behind the non-ACS port, planned as if it were the VM's:
    usb = A("06:00.0")
    usb_plan = plan_for(topo, ["06:00.0"], policy=Policy(pm_suffices=False))
    assert usb_plan.ok  # alone below its port, the bus reset hits only itself
    assert usb_plan.domains[0].covers == (usb,)


def test_hotplug_slot_domain_warns_about_pciehp_for_user_sbr() -> None:
    from qreset.pci.host import SlotInfo

    nodes = [
        rp("00:1a.0", 9, hotplug_slot=True),  # a pciehp port: the kernel can reset its slot
        node("09:00.0", config(multifunction=True), parent="00:1a.0", driver="vfio-pci", group=40),
        node("09:00.1", config(multifunction=True), parent="00:1a.0", driver="vfio-pci", group=40),
    ]
    topo = Topology({n.address: n for n in nodes}, [SlotInfo("7", "0000:09:00", True)], True, "hp")
    plan = plan_for(topo, ["09:00.0", "09:00.1"])
    [d] = plan.domains
    assert (d.key, d.kind, d.method) == ("bus:0000:00:1a.0", ResetKind.SLOT, Method.USER_SBR)
    assert "hotplug slot 7: pciehp may take the link-down as a removal" in d.reason
