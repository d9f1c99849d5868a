"""
A function listed for two VMs is reset by neither (the planner's side of
"never reset a function owned by another VM").

How it happens: the configuration lists a device for one VM while another
VM's QEMU reports it over QMP (a stale config, or a device moved between
guests); ``add-vm`` only checks the devices it is given. Before, the VM being
planned won (THIS_VM) and its reset hit the other guest's device.
"""

from __future__ import annotations

from qreset.plan import OwnerKind, Policy, Takeover, make_plan, owners_of
from tests.helpers_plan import A, host


def test_function_listed_for_two_vms_is_refused_by_both() -> None:
    topo = host()
    nic, gpu = A("02:00.0"), A("04:00.0")
    vms = {"vm1": [nic, gpu], "vm2": [nic]}
    for takeover in Takeover:
        for vm in ("vm1", "vm2"):
            owners = owners_of(topo, vms, vm)
            other = "vm2" if vm == "vm1" else "vm1"
            assert owners[nic].kind is OwnerKind.OTHER_VM
            assert owners[nic].name == other
            plan = make_plan(vm, vms[vm], topo, owners, Policy(takeover=takeover))
            assert not any(nic in d.covers for d in plan.domains), plan.domains
            [b] = [b for b in plan.refusals if b.function == nic]
            assert f"listed for VM {vm} and for VM {other}" in b.reason
            assert not plan.ok
    # vm1's other device is still planned: one shared listing does not block the rest.
    plan = make_plan("vm1", vms["vm1"], topo, owners_of(topo, vms, "vm1"), Policy())
    assert any(gpu in d.covers for d in plan.domains)


async def test_slot_reset_hits_every_function_on_the_ports_link() -> None:
    """
    pciehp_reset_slot is a secondary bus reset of the port: every function on
    the link is hit, also those at device numbers other than the slot's (an
    SR-IOV PF's VFs at offset 0x80 sit at device 0x10; ARI functions 8+ at
    devices 1-31). Before, the slot scope named only the slot's device number,
    so vm1's slot reset of its PF would reset vm2's VF unplanned.
    """
    from qreset.pci.sim import SimHost
    from qreset.topology import Topology

    pf = {"name": "pf", "type": "endpoint", "parent": "rp", "vendor": 0x8086, "device": 0x1521,
          "class": 0x020000, "flr": False, "pm": False, "driver": "vfio-pci", "bars": [{"size": "1M"}],
          "sriov": {"total_vfs": 2, "num_vfs": 2, "vf_device": 0x1520, "vf_driver": "vfio-pci",
                    "vf_bars": [{"size": "16K", "type": "mem64", "prefetch": True}]}}
    host = SimHost.from_dict({"function": [
        {"name": "rp", "type": "root_port", "dev": 1, "slot": {"name": "7", "hotplug": True}}, pf,
    ]}, "slot.toml")
    topo = await Topology.load(host)
    a, vf = host.address_of("pf"), host.address_of("pf.vf0")
    assert vf.device == 0x10
    scope = topo.slot_scope(a)
    assert scope is not None
    assert vf in scope.affected
    vms = {"vm1": [a], "vm2": [vf]}
    plan = make_plan("vm1", [a], topo, owners_of(topo, vms, "vm1"), Policy())
    assert not any(vf in d.covers for d in plan.domains), plan.domains
