"""Kernel features detected at run time and used (issue 11): ``reset_subordinate``.

The attribute came with Linux 6.13 (commit 2fa046449a82) and was backported to
some stable kernels, so what sysfs shows decides, not the release. The
simulated host models both kernels with ``[host] kernel``; a function's
``reset_subordinate`` overrides (a backport).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qreset.doctor import diagnose
from qreset.engine import Engine
from qreset.pci.sim import SimHost
from qreset.pci.sysfs import SysfsHost
from qreset.plan import Method, Policy
from qreset.topology import Topology


def _host(kernel: str | None, **rp: Any) -> SimHost:
    fn: dict[str, Any] = {"parent": "rp", "type": "endpoint", "vendor": 0x1002, "device": 0x67DF,
                          "class": 0x030000, "flr": False, "pm": False}
    host: dict[str, Any] = {} if kernel is None else {"kernel": kernel}
    return SimHost.from_dict({"host": host, "function": [
        {"name": "rp", "type": "root_port", "dev": 1, "vendor": 0x8086, "device": 0x1901, **rp},
        {"name": "gpu", "fn": 0, **fn},
        {"name": "audio", "fn": 1, **fn, "class": 0x040300},
    ]}, f"kernel-{kernel}", time_scale=0.01)


async def test_new_kernel_resets_a_shared_bus_with_reset_subordinate() -> None:
    host = _host("6.13.0")
    gpu, audio, rp = (host.address_of(n) for n in ("gpu", "audio", "rp"))
    assert (await host.info(rp)).has_reset_subordinate
    engine = Engine(host)
    report = await engine.reset("vm1", [gpu, audio], {}, Policy())
    assert report.ok, report.to_json()
    [dom] = report.domains
    assert dom.domain.method is Method.RESET_SUBORDINATE
    assert [r.method for r in host.reset_log] == ["subordinate"]
    assert host.write_count() == 0  # the kernel saved and restored every function below


async def test_old_kernel_falls_back_to_the_userspace_sbr() -> None:
    host = _host("6.1.0-28")
    gpu, audio, rp = (host.address_of(n) for n in ("gpu", "audio", "rp"))
    assert not (await host.info(rp)).has_reset_subordinate
    report = await Engine(host).reset("vm1", [gpu, audio], {}, Policy())
    assert report.ok, report.to_json()
    [dom] = report.domains
    assert dom.domain.method is Method.USER_SBR
    assert [r.method for r in host.reset_log] == ["sbr"]


async def test_a_backport_is_seen_whatever_the_release() -> None:
    host = _host("6.1.0-57", reset_subordinate=True)
    assert (await host.info(host.address_of("rp"))).has_reset_subordinate


async def test_doctor_names_the_missing_feature_and_its_cost() -> None:
    old = diagnose(await Topology.load(_host("6.1.0-28")))
    [note] = [n for n in old.notes if n.code == "no-reset-subordinate"]
    assert "kernel 6.1.0-28" in note.message
    assert "6.13" in note.message
    assert "userspace secondary bus reset" in note.message
    assert "saves, restores and verifies config space" in note.message
    new = diagnose(await Topology.load(_host("6.13")))
    assert all(n.code != "no-reset-subordinate" for n in new.notes)


async def test_sysfs_tree_of_a_new_kernel_has_the_attribute(tmp_path: Path) -> None:
    sim = _host("6.13")
    sim.write_tree(tmp_path)
    rp = sim.address_of("rp")
    assert (tmp_path / "bus/pci/devices" / str(rp) / "reset_subordinate").exists()
    host = SysfsHost(tmp_path)
    try:
        assert (await host.info(rp)).has_reset_subordinate
        assert host.kernel_release() is None  # a tree elsewhere is not the running kernel
    finally:
        await host.close()
