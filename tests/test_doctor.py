"""Doctor findings on the hand-made host (tests/pcibuild.py) and every simulated one."""

from __future__ import annotations

import json

from qreset.doctor import Severity, diagnose, diagnose_function
from qreset.pci.address import PciAddress
from qreset.topology import ResetKind
from tests.pcibuild import A, sample


def codes(topo_bdf: str, iommu: bool = True) -> dict[str, str]:
    rep = diagnose_function(sample(iommu), A(topo_bdf))
    return {p.code: p.message for p in rep.problems}


def S(*bdfs: str) -> set[PciAddress]:
    return {A(b) for b in bdfs}


def test_flr_function_is_clean() -> None:
    rep = diagnose_function(sample(), A("03:00.0"))
    assert rep.problems == ()
    assert rep.function_methods == ("flr",)
    assert rep.summary == "function reset (flr)"
    kinds = [(o.kind, o.method) for o in rep.options]
    assert kinds[0] == (ResetKind.FUNCTION, "flr")
    assert (ResetKind.SLOT, "bus") in kinds       # kernel bus method through the hotplug slot
    assert (ResetKind.SLOT, "vfio_hot_reset") in kinds
    assert (ResetKind.BUS, "user_sbr") in kinds


def test_no_flr_sharing_bus_with_host_driver_is_blocked() -> None:
    found = codes("04:00.0")
    assert "no-flr-shared-bus" in found
    assert "0000:04:00.1 (snd_hda_intel)" in found["no-flr-shared-bus"]
    rep = diagnose_function(sample(), A("04:00.0"))
    sbr = [o for o in rep.options if o.method == "user_sbr"]
    assert len(sbr) == 1
    assert sbr[0].target == A("02:01.0")
    assert {h.address for h in sbr[0].hits} == S("04:00.1")
    assert [(h.address, h.driver, h.iommu_group) for h in sbr[0].blocked_by] == [
        (A("04:00.1"), "snd_hda_intel", 4)]
    # 02:01.0 has reset_subordinate: offered too, with the same hits
    rs = [o for o in rep.options if o.method == "reset_subordinate"]
    assert len(rs) == 1
    assert rs[0].hits == sbr[0].hits
    # no kernel bus method: not alone on its bus
    assert not [o for o in rep.options if o.method == "bus"]
    assert rep.summary == "only resets that hit host-driver functions"


def test_shared_group_blames_the_port_without_acs() -> None:
    found = codes("04:00.0")
    assert "IOMMU group 4 shared with 0000:04:00.1" in found["iommu-group-shared"]
    assert "no ACS on bridge 0000:02:01.0" in found["iommu-group-shared"]
    # 03:00.0 is alone in its group behind an ACS port: no complaint
    assert "iommu-group-shared" not in codes("03:00.0")


def test_conventional_bus() -> None:
    found = codes("06:01.0")
    msg = found["conventional-bus"]
    assert "0000:00:1e.0" in msg
    assert "0000:06:01.0, 0000:06:02.0" in msg
    assert "1 s" in msg
    assert "0000:06:02.0 (ahci)" in found["no-flr-shared-bus"]
    assert "requester IDs alias" in found["iommu-group-shared"]


def test_no_reset_method_on_root_bus() -> None:
    # 00:02.0 has FLR: fine. Strip its methods and it has nothing.
    assert "no-reset" not in codes("00:02.0")
    t = sample()
    from tests.pcibuild import config, node

    t.functions[A("00:02.0")] = node("00:02.0", config(), group=1)
    rep = diagnose_function(t, A("00:02.0"))
    found = {p.code: p for p in rep.problems}
    assert found["no-reset"].severity is Severity.BLOCKER
    assert found["root-bus"].message.startswith("on the root bus: no bus reset possible")
    assert rep.options == ()
    assert rep.summary == "no reset method"


def test_alone_below_bridge_uses_kernel_bus() -> None:
    rep = diagnose_function(sample(), A("05:00.0"))
    bus = [o for o in rep.options if o.method == "bus"]
    assert len(bus) == 1
    assert bus[0].kind is ResetKind.BUS
    assert bus[0].target == A("02:02.0")
    assert bus[0].hits == ()
    assert rep.summary == "bus reset of 0000:02:02.0 via bus"
    assert {p.code for p in rep.problems} == set()


def test_pm_only_and_host_driver_notes() -> None:
    found = codes("04:00.1")
    assert "pm-only" in found
    assert "host-driver" in found
    assert "no-flr-shared-bus" not in found  # it has a function-level method


def test_host_notes_and_json() -> None:
    rep = diagnose(sample(iommu=False))
    assert [n.code for n in rep.notes] == ["no-iommu"]
    data = json.loads(json.dumps(rep.to_json()))
    assert [f["bdf"] for f in data["functions"]] == sorted(str(a) for a in sample().functions)
    f = next(f for f in data["functions"] if f["bdf"] == "0000:04:00.0")
    assert f["vendor"] == 0x10DE
    assert f["parent"] == "0000:02:01.0"
    assert {p["code"] for p in f["problems"]} >= {"no-flr-shared-bus", "iommu-group-shared"}
    # bridges are listed but not diagnosed as assignable devices
    b = next(f for f in data["functions"] if f["bdf"] == "0000:02:01.0")
    assert b["is_bridge"] is True
    assert b["problems"] == []


def test_no_reset_method_attr_note_falls_back_to_config() -> None:
    t = sample()
    from tests.pcibuild import node

    for a, n in list(t.functions.items()):
        t.functions[a] = node(str(a), n.config.raw, parent=str(n.info.parent) if n.info.parent else None,
                              driver=n.info.driver, group=n.info.iommu_group)
    rep = diagnose(t)
    assert "no-reset-method-attr" in {n.code for n in rep.notes}
    f = next(f for f in rep.functions if f.address == A("03:00.0"))
    assert f.function_methods == ()
    assert f.options[0].method == "flr"  # from config space (DevCap FLR)
