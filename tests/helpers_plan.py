"""
Planning fixtures shared by the planner's tests: a hand-made host and a one-call plan.

Kept out of the test modules so tests import helpers, never each other
(test_plan, test_ownership and test_qemu_model use them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.plan import Plan, Policy, QemuAction, make_plan, owners_of
from qreset.topology import FunctionNode, Topology
from tests.pcibuild import config, node

A = PciAddress.parse
RP = regs.EXP_TYPE_ROOT_PORT
BRIDGE = 0x060400


def rp(bdf: str, sec: int, sub: int | None = None, *, reset_subordinate: bool = False,
       hotplug_slot: bool = False) -> FunctionNode:
    return node(bdf, config(bridge=True, secondary=sec, subordinate=sub or sec, pcie_type=RP,
                            class_code=BRIDGE, hotplug_slot=hotplug_slot), driver="pcieport", group=0,
                reset_subordinate=reset_subordinate)


def host() -> Topology:
    """::

      00:01.0 RP -> 01: 01:00.0 GPU (no FLR, PM) + 01:00.1 audio (nothing), vfio-pci, groups 11/12
      00:02.0 RP -> 02: 02:00.0 NIC with FLR, vfio-pci, group 13
      00:1c.0 RP -> 03: 03:00.0 GPU (nothing), vfio-pci + 03:00.1 audio snd_hda_intel, group 14/15
      00:1d.0 RP (reset_subordinate) -> 04: 04:00.0 GPU FLR + 04:00.1 audio (nothing), group 16/17
      00:1e.0 RP -> 05: 05:00.0 SR-IOV PF (FLR) with VFs 05:00.1, 05:00.2 (FLR), groups 18/19/20
      00:1f.0 RP -> 06: 06:00.0 device with no FLR, no PM, alone (kernel 'bus'), group 21
      00:03.0 endpoint on the root bus, no method, vfio-pci, group 22
    """
    vf = config(flr=True)
    nodes = [
        rp("00:01.0", 1), rp("00:02.0", 2), rp("00:1c.0", 3),
        rp("00:1d.0", 4, reset_subordinate=True), rp("00:1e.0", 5), rp("00:1f.0", 6),
        node("01:00.0", config(vendor=0x1002, class_code=0x030000, multifunction=True, pm=True),
             parent="00:01.0", driver="vfio-pci", group=11, methods=("pm",)),
        node("01:00.1", config(vendor=0x1002, class_code=0x040300, multifunction=True),
             parent="00:01.0", driver="vfio-pci", group=12),
        node("02:00.0", config(flr=True), parent="00:02.0", driver="vfio-pci", group=13,
             methods=("flr", "bus")),
        node("03:00.0", config(vendor=0x10DE, class_code=0x030000, multifunction=True),
             parent="00:1c.0", driver="vfio-pci", group=14),
        node("03:00.1", config(vendor=0x10DE, class_code=0x040300, multifunction=True),
             parent="00:1c.0", driver="snd_hda_intel", group=15),
        node("04:00.0", config(vendor=0x10DE, class_code=0x030000, multifunction=True, flr=True),
             parent="00:1d.0", driver="vfio-pci", group=16, methods=("flr",)),
        node("04:00.1", config(vendor=0x10DE, class_code=0x040300, multifunction=True),
             parent="00:1d.0", driver="vfio-pci", group=17),
        node("05:00.0", config(flr=True, multifunction=True), parent="00:1e.0", driver="ixgbe",
             group=18, methods=("flr",)),
        node("05:00.1", vf, parent="00:1e.0", driver="vfio-pci", group=19, methods=("flr",)),
        node("05:00.2", vf, parent="00:1e.0", driver="vfio-pci", group=20, methods=("flr",)),
        node("06:00.0", config(), parent="00:1f.0", driver="vfio-pci", group=21, methods=("bus",)),
        node("00:03.0", config(), driver="vfio-pci", group=22),
    ]
    by = {n.address: n for n in nodes}
    pf = by[A("05:00.0")]
    by[pf.address] = dataclasses.replace(
        pf, info=dataclasses.replace(pf.info, virtfns=(A("05:00.1"), A("05:00.2"))))
    for v in ("05:00.1", "05:00.2"):
        n = by[A(v)]
        by[n.address] = dataclasses.replace(n, info=dataclasses.replace(n.info, physfn=A("05:00.0")))
    return Topology(by, [], True, "test-host")


def plan_for(
    topo: Topology, mine: Iterable[str], others: Mapping[str, Iterable[str]] | None = None,
    policy: Policy | None = None,
) -> Plan:
    vms = {"vm1": [A(a) for a in mine]} | {k: [A(a) for a in v] for k, v in (others or {}).items()}
    return make_plan("vm1", vms["vm1"], topo, owners_of(topo, vms, "vm1"), policy or Policy())


def predictions(plan: Plan) -> dict[str, QemuAction]:
    return {str(q.function): q.action for q in plan.qemu}
