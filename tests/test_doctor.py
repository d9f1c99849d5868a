"""Doctor findings on the hand-made host (tests/pcibuild.py) and every simulated one."""

from __future__ import annotations

import json
import tomllib

import pytest

from qreset.doctor import Problem, Report, Severity, diagnose, diagnose_function
from qreset.pci.address import PciAddress
from qreset.pci.sim import SimHost
from qreset.topology import ResetKind, Topology
from tests.conftest import SIM_DIR
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


def test_vfio_hot_reset_says_a_held_device_is_out_of_reach() -> None:
    """The kernel refuses qreset's way in to a device a QEMU holds, on both backends
    (its group: EBUSY; with iommufd, a second bind of its cdev: EINVAL): one line says so."""
    rep = diagnose_function(sample(), A("03:00.0"))
    hot = next(o for o in rep.options if o.method == "vfio_hot_reset")
    assert "held by no QEMU" in hot.note
    assert "cdev" in hot.note
    assert "\n" not in hot.note


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
    note = next(n for n in rep.notes if n.code == "no-reset-method-attr")
    assert "no function here has a working reset method" in note.message
    f = next(f for f in rep.functions if f.address == A("03:00.0"))
    assert f.function_methods == ()
    assert f.options[0].method == "flr"  # from config space (DevCap FLR)


# -- the simulated hosts ----------------------------------------------------------------

#: sim file -> {endpoint: problem codes doctor must report}. Each is a kernel rule:
#: no FLR + shared bus (pci_parent_bus_reset refuses); a stale "bus" entry
#: (pci_init_reset_methods runs before the function joins its bus); conventional
#: bus behind a PCIe-to-PCI bridge; group shared by a multifunction device or an
#: aliasing bridge (pci_device_group); a PF's reset takes its VFs along.
SIM_PROBLEMS: dict[str, dict[str, set[str]]] = {
    "gpu-audio.toml": {
        "01:00.0": {"no-flr-bus-reset", "iommu-group-shared", "stale-bus-method"},
        "01:00.1": {"no-flr-bus-reset", "iommu-group-shared"},
    },
    "nic-flr.toml": {"01:00.0": set()},
    "switch.toml": {
        "03:00.0": set(), "04:00.0": {"host-driver"}, "05:00.0": {"pm-only"},
        "06:00.0": {"pm-only", "host-driver"},
    },
    "conventional.toml": {
        "02:01.0": {"pm-only", "no-flr-shared-bus", "conventional-bus", "iommu-group-shared",
                    "stale-bus-method"},
        "02:02.0": {"no-flr-bus-reset", "conventional-bus", "iommu-group-shared", "host-driver"},
    },
    "sriov.toml": {
        "01:00.0": {"host-driver", "pf-resets-vfs", "stale-bus-method"},
        "01:10.0": set(), "01:10.4": set(), "01:11.0": {"host-driver"}, "01:11.4": {"host-driver"},
    },
    "demo.toml": {
        "01:00.0": set(), "02:00.0": set(), "04:00.0": set(),
        "03:00.0": {"no-flr-bus-reset", "iommu-group-shared", "stale-bus-method"},
        "03:00.1": {"no-flr-bus-reset", "iommu-group-shared"},
        "06:01.0": {"no-flr-bus-reset", "conventional-bus", "iommu-group-shared", "stale-bus-method"},
        "06:02.0": {"pm-only", "conventional-bus", "iommu-group-shared"},
    },
}


async def sim_report(name: str) -> tuple[Topology, Report]:
    host = SimHost.from_toml(SIM_DIR / name, time_scale=0.001)
    topo = await Topology.load(host)
    await host.close()
    return topo, diagnose(topo)


def test_every_sim_file_has_expectations() -> None:
    assert {p.name for p in SIM_DIR.glob("*.toml")} == set(SIM_PROBLEMS)


@pytest.mark.parametrize("name", sorted(SIM_PROBLEMS))
async def test_sim_problems(name: str) -> None:
    _topo, rep = await sim_report(name)
    # Sims have IOMMU groups and reset_method; reset_subordinate depends on the bridges.
    assert {n.code for n in rep.notes} <= {"no-reset-subordinate"}
    got = {str(f.address)[5:]: {p.code for p in f.problems} for f in rep.functions if not f.is_bridge
           and f.class_code >> 8 != 0x0600}
    assert got == SIM_PROBLEMS[name]


async def test_sim_gpu_audio_details() -> None:
    _topo, rep = await sim_report("gpu-audio.toml")
    gpu = next(f for f in rep.functions if f.address == A("01:00.0"))
    probs = {p.code: p.message for p in gpu.problems}
    assert "0000:01:00.1" in probs["no-flr-bus-reset"]
    assert "0000:00:01.0" in probs["no-flr-bus-reset"]
    assert "multifunction" in probs["iommu-group-shared"]
    assert "shares bus 01 with 0000:01:00.1" in probs["stale-bus-method"]
    methods = {o.method: o for o in gpu.options}
    assert set(methods) == {"vfio_hot_reset", "user_sbr"}  # no reset_subordinate on rp1, no kernel bus
    assert {h.address for h in methods["vfio_hot_reset"].hits} == S("01:00.1")
    assert methods["vfio_hot_reset"].blocked_by == ()  # both functions on vfio-pci


async def test_sim_conventional_blocked_by_host_driver() -> None:
    _topo, rep = await sim_report("conventional.toml")
    fw = next(f for f in rep.functions if f.address == A("02:02.0"))
    hot = next(o for o in fw.options if o.method == "vfio_hot_reset")
    assert [h.address for h in hot.blocked_by] == [A("02:02.0")]  # itself: firewire_ohci, not vfio-pci
    nic = next(f for f in rep.functions if f.address == A("02:01.0"))
    sbr = next(o for o in nic.options if o.method == "user_sbr")
    assert sbr.target == A("01:00.0")
    assert [(h.address, h.driver) for h in sbr.blocked_by] == [(A("02:02.0"), "firewire_ohci")]
    shared = next(p for p in nic.problems if p.code == "no-flr-shared-bus")
    assert shared.severity is Severity.WARNING  # it still has a PM reset
    assert "0000:02:02.0 (firewire_ohci)" in shared.message
    conv = next(p for p in nic.problems if p.code == "conventional-bus")
    assert "0000:02:01.0, 0000:02:02.0" in conv.message


async def test_sim_sriov_pf_blocker_names_host_vfs() -> None:
    _topo, rep = await sim_report("sriov.toml")
    pf = next(f for f in rep.functions if f.address == A("01:00.0"))
    p = next(p for p in pf.problems if p.code == "pf-resets-vfs")
    assert p.severity is Severity.BLOCKER
    assert "0000:01:11.0 (igbvf)" in p.message
    assert "0000:01:11.4 (igbvf)" in p.message
    flr = next(o for o in pf.options if o.method == "flr")
    assert {h.address for h in flr.hits} == S("01:10.0", "01:10.4", "01:11.0", "01:11.4")
    assert {h.address for h in flr.blocked_by} == S("01:11.0", "01:11.4")


async def test_sim_no_iommu_note() -> None:
    data = tomllib.loads((SIM_DIR / "nic-flr.toml").read_text())
    data.setdefault("host", {})["iommu"] = False
    host = SimHost.from_dict(data, "nic-flr-noiommu", time_scale=0.001)
    topo = await Topology.load(host)
    await host.close()
    assert [n.code for n in diagnose(topo).notes if n.code != "no-reset-subordinate"] == ["no-iommu"]


def test_old_kernel_has_reset_without_reset_method() -> None:
    from dataclasses import replace

    t = sample()
    for a, n in list(t.functions.items()):
        info = replace(n.info, reset_methods=(), has_reset=a == A("03:00.0"))
        t.functions[a] = replace(n, info=info)
    note = next(n for n in diagnose(t).notes if n.code == "no-reset-method-attr")
    assert "older than 5.15" in note.message
    assert "some functions have a 'reset' file" in note.message


async def test_user_sbr_warns_about_pciehp_only_on_pciehp_slots() -> None:
    _topo, rep = await sim_report("demo.toml")
    by = {f.address: f for f in rep.functions}
    hp = next(o for o in by[A("01:00.0")].options if o.method == "user_sbr")
    assert "pciehp may take the link-down" in hp.note
    plain = next(o for o in by[A("04:00.0")].options if o.method == "user_sbr")
    assert "pciehp" not in plain.note


def test_config_space_problems() -> None:
    from tests.pcibuild import config, node

    t = sample()
    raw = config(flr=True)
    # 64 bytes: what an unprivileged reader of sysfs config gets
    t.functions[A("03:00.0")] = node("03:00.0", raw[:64], parent="02:00.0", driver="vfio-pci", group=3)
    # CRS: Vendor ID 0x0001 while the function is not ready
    crs = bytes([0x01, 0x00]) + raw[2:]
    t.functions[A("05:00.0")] = node("05:00.0", crs, parent="02:02.0", driver="vfio-pci", group=5)
    # a capability list that loops back on itself
    loop = bytearray(raw)
    loop[0x51] = 0x50
    t.functions[A("00:02.0")] = node("00:02.0", bytes(loop), group=1, methods=("flr",))
    rep = {f.address: f for f in diagnose(t).functions}
    short = {p.code: p for p in rep[A("03:00.0")].problems}
    assert "only 64 bytes" in short["config-short"].message
    assert {p.code for p in rep[A("05:00.0")].problems} >= {"not-present"}
    broken = {p.code: p for p in rep[A("00:02.0")].problems}
    assert "loops back to 0x50" in broken["config-broken"].message


def test_every_problem_code_is_documented() -> None:
    with pytest.raises(ValueError, match="undocumented"):
        Problem("made-up", Severity.INFO, "m", "r")
