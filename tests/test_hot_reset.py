"""The VFIO hot reset behind PciHost, simulated with the kernel's rules (issue 12).

``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`` / ``VFIO_DEVICE_PCI_HOT_RESET``
(drivers/vfio/pci/vfio_pci_core.c): the slot or bus domain, every affected
group given and none held by another process, every affected function bound
to vfio-pci, device locks try-locked. The real ioctls run in the lab
(tests/lab/test_vfio.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qreset.errors import ResetFailed
from qreset.pci.sim import SimHost


def _gpu(sim_dir: Path) -> SimHost:
    return SimHost.from_toml(sim_dir / "gpu-audio.toml", time_scale=0.01)


async def test_info_lists_the_bus_domain_with_groups(sim_dir: Path) -> None:
    host = _gpu(sim_dir)
    gpu, audio = host.address_of("gpu"), host.address_of("gpu-audio")
    info = await host.hot_reset_info(gpu)
    groups = {a: (await host.info(a)).iommu_group for a in (gpu, audio)}
    assert sorted(info) == sorted(groups.items())


async def test_root_bus_device_has_no_hot_reset(sim_dir: Path) -> None:
    host = _gpu(sim_dir)
    hostbridge = host.address_of("hostbridge")
    assert (await host.info(hostbridge)).parent is None
    host.set_driver(hostbridge, "vfio-pci")
    with pytest.raises(ResetFailed, match="ENODEV"):
        await host.hot_reset_info(hostbridge)


async def test_hot_reset_saves_and_restores_the_domain(sim_dir: Path) -> None:
    host = _gpu(sim_dir)
    rp, gpu, audio = (host.address_of(n) for n in ("rp1", "gpu", "gpu-audio"))
    before = {a: host.config_now(a) for a in (gpu, audio)}
    groups = sorted({g for _a, g in await host.hot_reset_info(gpu)})
    await host.hot_reset([gpu, audio], groups)
    [rec] = host.reset_log
    assert (rec.method, rec.target, rec.affected) == ("vfio_hot_reset", rp, frozenset({gpu, audio}))
    assert {a: host.config_now(a) for a in (gpu, audio)} == before


async def test_a_group_held_by_qemu_is_ebusy(sim_dir: Path) -> None:
    host = _gpu(sim_dir)
    gpu, audio = host.address_of("gpu"), host.address_of("gpu-audio")
    groups = sorted({g for _a, g in await host.hot_reset_info(gpu)})
    host.vfio_held.add(groups[-1])
    with pytest.raises(ResetFailed, match="held by another process"):
        await host.hot_reset([gpu, audio], groups)
    assert host.reset_log == []


async def test_every_affected_group_must_be_given(sim_dir: Path) -> None:
    host = SimHost.from_toml(sim_dir / "sriov.toml", time_scale=0.01)
    pf = host.address_of("pf")
    below = [a for a in await host.functions() if (await host.info(a)).parent == host.address_of("rp")]
    for a in below:
        await host.bind(a, "vfio-pci")
    groups = sorted({g for _a, g in await host.hot_reset_info(pf)})
    assert len(groups) > 1  # ACS on the root port: the PF and its VFs are apart
    with pytest.raises(ResetFailed, match=r"also hits group\(s\) .* not given"):
        await host.hot_reset([pf], groups[:1])
    assert host.reset_log == []
    await host.hot_reset([pf], groups)
    assert host.reset_log[-1].affected == frozenset(below)


async def test_a_host_bound_function_in_the_domain_is_einval(sim_dir: Path) -> None:
    host = _gpu(sim_dir)
    gpu, audio = host.address_of("gpu"), host.address_of("gpu-audio")
    groups = sorted({g for _a, g in await host.hot_reset_info(gpu)})
    host.set_driver(audio, None)  # unbound: its group stays viable, but it is not vfio's
    with pytest.raises(ResetFailed, match=r"EINVAL.*must be bound to vfio-pci"):
        await host.hot_reset([gpu, audio], groups)
    host.set_driver(audio, "snd_hda_intel")
    with pytest.raises(ResetFailed, match="not viable"):
        await host.hot_reset([gpu, audio], groups)
    assert host.reset_log == []


async def test_lock_contention_is_ebusy_not_a_wait(sim_dir: Path) -> None:
    host = SimHost.from_toml(sim_dir / "gpu-audio.toml", time_scale=0.5)
    gpu, audio = host.address_of("gpu"), host.address_of("gpu-audio")
    groups = sorted({g for _a, g in await host.hot_reset_info(gpu)})
    busy = asyncio.create_task(host.hot_reset([gpu, audio], groups))
    await asyncio.sleep(0.01)  # the first reset holds every device lock now
    with pytest.raises(ResetFailed, match="EBUSY"):
        await host.hot_reset([gpu, audio], groups)
    await busy
