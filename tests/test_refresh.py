"""What changes at run time is current at plan time (issue 9 item 2).

libvirt binds a managed device to vfio-pci at domain start and back at stop,
an operator writes ``sriov_numvfs`` or hot-removes a function: the engine's
cached topology must not plan with what it read at start-up. Each plan
re-reads the run-time attributes of the functions it looks at
(:meth:`Topology.refresh`), on the simulated host and on a sysfs tree.
"""

from __future__ import annotations

from pathlib import Path

from qreset.engine import Engine
from qreset.pci.address import PciAddress
from qreset.pci.sim import SimHost
from qreset.pci.sysfs import SysfsHost
from qreset.plan import Plan, Policy
from tests.counting_host import CountingSimHost


def _not_bound(plan: Plan, addr: PciAddress) -> bool:
    [pred] = [q for q in plan.qemu if q.function == addr]
    return "not bound to vfio-pci" in pred.detail


async def test_plan_sees_a_driver_bound_after_start(sim_dir: Path) -> None:
    """The complaint from the libvirt run: bound to vfio-pci, reported as not bound."""
    host = SimHost.from_toml(sim_dir / "sriov.toml", time_scale=0.01)
    engine = Engine(host)
    vf2 = host.address_of("pf.vf2")  # igbvf at start-up
    topo = await engine.topology()
    assert topo.node(vf2).info.driver == "igbvf"
    assert _not_bound(await engine.plan("vm1", [vf2], {}, Policy()), vf2)

    await host.bind(vf2, "vfio-pci")  # libvirt's managed hostdev at domain start
    plan = await engine.plan("vm1", [vf2], {}, Policy())
    assert not _not_bound(plan, vf2)
    assert (await engine.topology()).node(vf2).info.driver == "vfio-pci"

    await host.bind(vf2, None)  # and back at domain stop
    assert _not_bound(await engine.plan("vm1", [vf2], {}, Policy()), vf2)


async def test_plan_follows_vfs_added_and_removed_at_run_time(sim_dir: Path) -> None:
    host = SimHost.from_toml(sim_dir / "sriov.toml", time_scale=0.01)
    engine = Engine(host)
    pf = host.address_of("pf")
    topo = await engine.topology()
    assert len(topo.vfs_of(pf)) == 4

    host.set_num_vfs(pf, 0)
    plan = await engine.plan("vm1", [pf], {}, Policy())
    assert plan.ok, plan.to_json()
    assert [d.covers for d in plan.domains] == [(pf,)]  # a PF without VFs resets alone

    added = host.set_num_vfs(pf, 6)
    assert len(added) == 6
    topo = await engine.topology(current=[pf])
    assert topo.vfs_of(pf) == frozenset(added)
    assert topo.node(pf).info.virtfns == tuple(added)
    new = added[5]
    assert topo.node(new).info.physfn == pf
    assert topo.node(new).info.driver == "igbvf"
    plan = await engine.plan("vm1", [pf], {}, Policy())
    # The PF's FLR takes its VFs with it: the host-driver ones refuse the plan.
    assert new in {b.function for b in plan.refusals}, plan.to_json()


async def test_plan_drops_a_hot_removed_function(sim_dir: Path) -> None:
    host = SimHost.from_toml(sim_dir / "sriov.toml", time_scale=0.01)
    engine = Engine(host)
    pf, vf3 = host.address_of("pf"), host.address_of("pf.vf3")
    await engine.topology()
    await host.remove(vf3)
    plan = await engine.plan("vm1", [pf], {}, Policy())
    topo = await engine.topology()
    assert vf3 not in topo
    assert vf3 not in topo.node(pf).info.virtfns
    assert vf3 not in {b.function for b in plan.refusals}


async def test_refresh_reads_only_the_neighbourhood(sim_dir: Path) -> None:
    host = CountingSimHost.from_toml(sim_dir / "switch.toml", time_scale=0.01)
    assert isinstance(host, CountingSimHost)
    engine = Engine(host)
    topo = await engine.topology()
    target = sorted(topo.functions)[-1]
    host.infos = host.runtimes = 0
    await engine.plan("vm1", [target], {}, Policy())
    assert host.infos == 0  # nothing appeared: no full read
    assert 0 < host.runtimes == len(topo.neighbourhood([target])) < len(topo.functions)


async def test_refresh_on_a_sysfs_tree(sim_dir: Path, tmp_path: Path) -> None:
    """The same through SysfsHost: the driver link, VF links and removed directories."""
    sim = SimHost.from_toml(sim_dir / "sriov.toml", time_scale=0.01)
    pf, vf2 = sim.address_of("pf"), sim.address_of("pf.vf2")
    sim.write_tree(tmp_path)
    host = SysfsHost(tmp_path)
    try:
        engine = Engine(host)
        assert (await engine.topology()).node(vf2).info.driver == "igbvf"

        await sim.bind(vf2, "vfio-pci")
        sim.write_tree(tmp_path)
        plan = await engine.plan("vm1", [vf2], {}, Policy())
        assert not _not_bound(plan, vf2)

        sim.set_num_vfs(pf, 0)
        sim.write_tree(tmp_path)
        topo = await engine.topology(current=[pf])
        assert topo.vfs_of(pf) == frozenset()
        assert vf2 not in topo

        added = sim.set_num_vfs(pf, 2)
        sim.write_tree(tmp_path)
        topo = await engine.topology(current=[pf])
        assert topo.vfs_of(pf) == frozenset(added)
        assert topo.node(added[0]).info.driver == "vfio-pci"  # vf_drivers[0]
    finally:
        await host.close()
