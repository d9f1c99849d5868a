"""owners_of derives its reverse map once per ownership mapping (issue 13), never stale."""

from __future__ import annotations

from pathlib import Path

from qreset.pci.sim import SimHost
from qreset.plan import OwnerKind, owners_of
from qreset.topology import Topology


async def test_reverse_map_is_derived_once_per_mapping_and_follows_changes(sim_dir: Path) -> None:
    from qreset import plan

    host = SimHost.from_toml(sim_dir / "sriov.toml", time_scale=0.01)
    topo = await Topology.load(host)
    vf1, vf2 = host.address_of("pf.vf1"), host.address_of("pf.vf2")
    vms = {"a": [vf1], "b": [vf2]}
    plan._holders.cache_clear()
    for name in ("a", "b", "a", "b"):  # each guest's cycle, same mapping rebuilt by the daemon
        owners = owners_of(topo, dict(vms), name)
        assert owners[vf1].kind is (OwnerKind.THIS_VM if name == "a" else OwnerKind.OTHER_VM)
    assert plan._holders.cache_info().misses == 1  # before: the reverse map per call

    vms["b"].append(vf1)  # changed in place: no stale answer from a memo by identity
    owners = owners_of(topo, vms, "a")
    assert (owners[vf1].kind, owners[vf1].name) == (OwnerKind.OTHER_VM, "b")
    assert owners_of(topo, vms, "b")[vf1].name == "a"  # listed for both: the other one, sorted
    assert owners_of(topo, {"a": [vf1]}, "b")[vf2].kind is not OwnerKind.OTHER_VM
