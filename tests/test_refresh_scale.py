"""Plan-time refresh at scale (issue 13): a VF's plan reads itself and its PF, not its PF's bus.

The scale bench's host: SR-IOV PFs with 64 VFs each, a guest per VF. Before,
every plan re-read the VF's whole neighbourhood (its PF's bus: 65 functions)
one plan after the other; now a function reset at function level by the
planner and by QEMU is refreshed with its PF only, and concurrent planners
share one refresh. Wider plans still read everything they can hit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.scale_fleet import topology_toml
from qreset.engine import Engine
from qreset.pci.address import PciAddress
from qreset.pci.host import RuntimeState
from qreset.plan import Policy
from tests.counting_host import CountingSimHost


def _fleet(tmp_path: Path, n_vf: int = 128) -> tuple[CountingSimHost, list[PciAddress]]:
    (tmp_path / "fleet.toml").write_text(topology_toml(n_vf, 0))
    host = CountingSimHost.from_toml(tmp_path / "fleet.toml", time_scale=0.01)
    assert isinstance(host, CountingSimHost)
    vfs = [host.address_of(f"pf{p}.vf{i}") for p in range(n_vf // 64) for i in range(64)]
    return host, vfs


async def test_a_vf_plan_reads_itself_and_its_pf(tmp_path: Path) -> None:
    host, vfs = _fleet(tmp_path)
    engine = Engine(host)
    topo = await engine.topology()
    vf = vfs[5]
    assert len(topo.neighbourhood([vf])) == 65  # the PF's bus: what was read before
    host.listings = host.infos = host.runtimes = 0
    plan = await engine.plan("vm5", [vf], {}, Policy())
    assert plan.ok, plan.to_json()
    assert [d.covers for d in plan.domains] == [(vf,)]
    assert host.infos == 0
    assert host.runtimes == 2  # the VF and its PF
    assert host.listings == 1  # hot plug and VF count changes are still seen


async def test_concurrent_planners_share_one_refresh(tmp_path: Path) -> None:
    host, vfs = _fleet(tmp_path)
    engine = Engine(host)
    await engine.topology()
    host.listings = host.runtimes = 0
    vms = {f"vm{i}": [vf] for i, vf in enumerate(vfs[:32])}
    plans = await asyncio.gather(*(engine.plan(name, owned, vms, Policy()) for name, owned in vms.items()))
    assert all(p.ok for p in plans)
    assert host.listings == 1  # one shared refresh, not one per planner
    assert host.runtimes == 32 + 1  # each VF once, their PF once


async def test_a_request_during_a_refresh_waits_for_the_next_one(tmp_path: Path) -> None:
    """Coalescing never hands a planner attributes read before it asked."""
    host, vfs = _fleet(tmp_path, 64)
    engine = Engine(host)
    await engine.topology()
    vf = vfs[0]
    gate = asyncio.Event()
    reading = asyncio.Event()
    original = host.runtime

    async def slow_runtime(addr: PciAddress) -> RuntimeState:
        reading.set()
        await gate.wait()
        return await original(addr)

    host.runtime = slow_runtime  # type: ignore[method-assign]
    first = asyncio.create_task(engine.plan("vm0", [vf], {}, Policy()))
    await reading.wait()  # the first refresh is reading the VF's attributes now
    await host.bind(vf, None)  # unbound after the first read began
    second = asyncio.create_task(engine.plan("vm0", [vf], {}, Policy()))
    await asyncio.sleep(0)
    gate.set()
    await first
    plan = await second
    [pred] = [q for q in plan.qemu if q.function == vf]
    assert "not bound to vfio-pci" in pred.detail


async def test_a_vf_without_flr_reads_its_whole_bus(tmp_path: Path) -> None:
    """reset_method changed at run time: the plan widens and sees every neighbour as it is now."""
    host, vfs = _fleet(tmp_path, 64)
    engine = Engine(host)
    await engine.topology()
    vf, other = vfs[3], vfs[9]
    host.write_reset_method(vf, "")  # an operator disables the VF's FLR
    await host.bind(other, "iavf")  # a neighbour now has a host driver
    host.runtimes = 0
    plan = await engine.plan("vm3", [vf], {}, Policy())
    assert not plan.ok
    assert other in {b.function for b in plan.refusals}, plan.to_json()
    assert host.runtimes >= 65
