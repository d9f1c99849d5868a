"""qreset.pci.vfio against the real kernel: hot-reset info equals the planner's view, hot resets happen."""

from __future__ import annotations

import asyncio

import pytest

from qreset.errors import ResetFailed
from qreset.pci import vfio
from qreset.pci.address import PciAddress
from qreset.pci.sysfs import SysfsHost
from qreset.topology import Topology
from tests.lab.labhost import (
    KernelLog,
    Roles,
    bind_group_vfio,
    bind_vfio,
    driver,
    held_group,
    iommu_group,
    restored,
    unbind,
)

pytestmark = pytest.mark.lab

#: role -> the roles that must also be bound (the rest of what the hot reset hits)
CASES = {
    "virtio1": (),              # FLR-capable endpoint alone on a root port
    "e1000e": (),               # PM + bus only, alone on a root port
    "sw_e1000e": (),            # behind a switch downstream port
    "mf0": ("mf1",),            # multifunction: the bus reset hits both functions
    "pci_e1000": ("pci_serial",),  # conventional PCI behind a PCIe-to-PCI bridge
}


async def _topology() -> Topology:
    host = SysfsHost()
    try:
        return await Topology.load(host)
    finally:
        await host.close()


def _restored(lines: list[str], addr: PciAddress) -> list[str]:
    return restored(lines, addr)


@pytest.mark.parametrize("role", list(CASES))
def test_hot_reset_info_and_reset(roles: Roles, witnesses: list[str], role: str) -> None:
    addr = roles[role]
    group = bind_group_vfio(addr)
    for other in CASES[role]:
        bind_group_vfio(roles[other])

    info = vfio.hot_reset_info(addr, group)
    affected = {a for a, _g in info}
    assert addr in affected
    # The kernel's groups are the sysfs ones.
    for a, g in info:
        assert g == iommu_group(a), (a, g)
    # What the planner's topology predicts a hot reset hits is what the kernel lists.
    topo = asyncio.run(_topology())
    scope = topo.hot_reset_scope(addr)
    assert scope is not None
    assert set(scope.affected) == affected, (
        f"topology predicts {sorted(map(str, scope.affected))} ({scope.kind}), "
        f"kernel lists {sorted(map(str, affected))}"
    )

    log = KernelLog(f"vfio-hot-reset {role}")
    vfio.hot_reset([addr], sorted({g for _a, g in info}))
    lines = log.lines()
    # Witness: the secondary bus reset ran (kprobe) on the parent bridge and the
    # kernel restored the state of every affected function that the reset cleared.
    assert any("qreset_sbr:" in line for line in lines), "\n".join(lines)
    for a in affected:
        assert _restored(lines, a), f"no restore of {a} after the hot reset:\n" + "\n".join(lines)


def test_hot_reset_refused_when_group_held(roles: Roles) -> None:
    addr = roles["virtio2"]
    group = bind_group_vfio(addr)
    with held_group(group), pytest.raises(ResetFailed, match=f"group {group} is held by another process"):
        vfio.hot_reset([addr], [group])


def test_hot_reset_needs_every_affected_group(roles: Roles) -> None:
    a, b = roles["virtio2"], roles["nvme2"]
    ga, gb = bind_group_vfio(a), bind_group_vfio(b)
    assert ga != gb
    with pytest.raises(ResetFailed, match="not in any of the given groups"):
        vfio.hot_reset([a], [gb])
    with pytest.raises(ResetFailed, match="would not hit"):
        vfio.hot_reset([a, b], [ga, gb])


def test_hot_reset_async(roles: Roles, witnesses: list[str]) -> None:
    addr = roles["nvme2"]
    group = bind_group_vfio(addr)

    async def both() -> list[tuple[PciAddress, int]]:
        info = await vfio.hot_reset_info_async(addr, group)
        await vfio.hot_reset_async([addr], [group])
        return info

    log = KernelLog("vfio-async")
    info = asyncio.run(both())
    assert info == [(addr, group)]
    assert _restored(log.lines(), addr)


def test_no_such_group(roles: Roles) -> None:
    with pytest.raises(ResetFailed, match="no VFIO group 9999"):
        vfio.hot_reset_info(roles["virtio1"], 9999)


def test_hot_reset_refused_when_a_hit_function_is_not_on_vfio(roles: Roles) -> None:
    """mf0 on vfio-pci, its sibling mf1 unbound: the kernel refuses (EINVAL) and we say why."""
    mf0, mf1 = roles["mf0"], roles["mf1"]
    group = bind_group_vfio(mf0)
    unbind(mf1)
    try:
        assert driver(mf1) is None
        affected = {a for a, _g in vfio.hot_reset_info(mf0, group)}
        assert affected == {mf0, mf1}
        with pytest.raises(ResetFailed, match="must be bound to vfio-pci"):
            vfio.hot_reset([mf0], [group])
    finally:
        bind_vfio(mf1)
