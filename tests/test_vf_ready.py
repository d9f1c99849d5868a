"""
VFs whose Vendor/Device ID read FFFFh, as the SR-IOV spec says (r1.1 sec
3.4.1.1/3.4.1.2; the kernel shows the PF's IDs in sysfs instead).

Before, the readiness poll, the rescan and the config parser all took
Vendor ID FFFFh for "no function": every reset of such a VF polled for the
whole poll timeout (60 s) and ended "absent", and a bus reset above a PF
escalated its VFs as gone. The kernel's ``pci_dev_wait`` judges all-ones on
the Command register (drivers/pci/pci.c), and so do we now.
"""

from __future__ import annotations

from pathlib import Path

from qreset.diff import Change, diff_config
from qreset.execute import ResetRunner
from qreset.locks import DomainLocks
from qreset.pci import regs
from qreset.pci.cfgspace import parse_config, present, u16
from qreset.pci.sim import SimHost
from qreset.pci.sysfs import SysfsHost
from qreset.plan import Domain, Method
from qreset.topology import ResetKind

PF = {"name": "pf", "type": "endpoint", "parent": "rp", "vendor": 0x8086, "device": 0x1521,
      "class": 0x020000, "flr": True, "bars": [{"size": "1M"}],
      "sriov": {"total_vfs": 2, "num_vfs": 2, "vf_device": 0x1520, "vf_config_ids": "ffff",
                "vf_bars": [{"size": "16K", "type": "mem64", "prefetch": True}]}}


def host() -> SimHost:
    return SimHost.from_dict({"function": [{"name": "rp", "type": "root_port", "dev": 1}, PF]},
                             "vf.toml", time_scale=0.001)


async def test_vf_reading_ffff_is_a_present_function() -> None:
    h = host()
    raw = await h.read_config(h.address_of("pf.vf0"))
    assert u16(raw, regs.VENDOR_ID) == 0xFFFF   # the spec's value, not the PF's
    cfg = parse_config(raw)
    assert cfg.present
    assert cfg.has_flr                          # its capabilities are walked
    assert present(raw)
    assert not present(b"\xff" * 256)           # a real all-ones read is still absent
    assert not present(b"\x01\x00" + b"\xff" * 254)  # CRS
    assert diff_config(raw, b"\xff" * 256).change is Change.ABSENT


async def test_flr_of_a_vf_is_ready_at_the_first_poll() -> None:
    h = host()
    vf = h.address_of("pf.vf1")
    d = Domain(f"function:{vf}", ResetKind.FUNCTION, Method.FLR, vf, (vf,), (vf,))
    [res] = await ResetRunner(h, DomainLocks()).run([d])
    [f] = res.functions
    assert res.ok, (f.change, f.error)
    assert f.polls == 1
    assert f.change == Change.NONE.value


async def test_bus_reset_above_a_pf_restores_its_vfs_not_escalates_them() -> None:
    h = host()
    rp, pf = h.address_of("rp"), h.address_of("pf")
    vfs = [h.address_of("pf.vf0"), h.address_of("pf.vf1")]
    covers = (pf, *vfs)
    d = Domain(f"bus:{rp}", ResetKind.BUS, Method.USER_SBR, rp, covers, covers)
    [res] = await ResetRunner(h, DomainLocks()).run([d])
    by = {f.address: f for f in res.functions}
    assert res.ok, [(f.address, f.change, f.error) for f in res.functions]
    assert all(by[v].change == Change.STATE.value for v in vfs)
    assert all(by[v].polls == 1 for v in vfs)


async def test_fast_port_without_link_active_reporting_waits_1100_ms(tmp_path: Path) -> None:
    """
    pci_bridge_wait_for_secondary_bus on a port faster than 5 GT/s goes through
    pcie_wait_for_link_delay, which waits 1000 + 100 ms when the port does not
    report Data Link Layer Link Active (drivers/pci/pci.c). Before, a user SBR
    on such a port waited only 100 ms. Real sysfs code on a tree in a directory
    (the sim always sets DLLLARC on ports; here it is cleared in the file).
    """
    sim = SimHost.from_dict({"function": [
        {"name": "rp", "type": "root_port", "dev": 1, "link_speed": 3},
        {"name": "ep", "type": "endpoint", "parent": "rp", "vendor": 0x10EC, "device": 0x8168,
         "class": 0x020000},
    ]}, "fast.toml")
    rp, ep = sim.address_of("rp"), sim.address_of("ep")
    sim.write_tree(tmp_path)
    cfg_file = tmp_path / "bus" / "pci" / "devices" / str(rp) / "config"
    raw = bytearray(cfg_file.read_bytes())
    exp = parse_config(bytes(raw)).find_cap(regs.CAP_ID_EXP)
    assert exp is not None
    off = exp.offset + regs.EXP_LNKCAP
    lnkcap = int.from_bytes(raw[off:off + 4], "little")
    assert lnkcap & regs.EXP_LNKCAP_SLS == 3  # 8 GT/s
    raw[off:off + 4] = (lnkcap & ~regs.EXP_LNKCAP_DLLLARC).to_bytes(4, "little")
    cfg_file.write_bytes(bytes(raw))
    host = SysfsHost(tmp_path)
    try:
        d = Domain(f"bus:{rp}", ResetKind.BUS, Method.USER_SBR, rp, (ep,), (ep,))
        [res] = await ResetRunner(host, DomainLocks()).run([d])
    finally:
        await host.close()
    assert res.phases["settle"] >= 1.1 * 0.95, res.phases
    assert res.phases["settle"] < 3.0
