"""The lab runs on a real kernel with an emulated IOMMU: check what the rest of tests/lab relies on."""

from __future__ import annotations

import asyncio
import json
import os
import platform
from pathlib import Path

import pytest

from qreset.pci.sysfs import SysfsHost
from tests.lab.labhost import OUT, PCI, Roles, driver, reset_methods

pytestmark = pytest.mark.lab


def test_kernel_sees_iommu_groups() -> None:
    groups = list(Path("/sys/kernel/iommu_groups").iterdir())
    assert len(groups) > 5, groups


def test_lab_topology_roles(roles: Roles) -> None:
    """scripts/lab/boot's topology is what the kernel enumerated (one function per role)."""
    assert len(set(roles.by_role.values())) == len(roles.by_role)
    assert len(roles.endpoints()) == 12
    for port in ("rp_virtio1", "switch_up", "switch_dn1"):
        assert driver(roles[port]) == "pcieport", port
    # shpchp only under native hotplug (QRESET_LAB_QEMU_ARGS, see scripts/lab/README.md).
    assert driver(roles["pcibridge"]) in (None, "shpchp")



def test_stack_facts(roles: Roles) -> None:
    """What this stack's kernel offers, written to the results share (``stack.json``)
    so two stacks' runs can be compared, and qreset's sysfs view of it checked."""

    async def view() -> dict[str, bool]:
        host = SysfsHost()
        try:
            return {role: (await host.info(addr)).has_reset_subordinate
                    for role, addr in roles.by_role.items()}
        finally:
            await host.close()

    qreset_view = asyncio.run(view())
    slots = Path("/sys/bus/pci/slots")
    links = [s for s in slots.iterdir() if (s / "module").is_symlink()] if slots.is_dir() else []
    facts = {
        "kernel": platform.release(),
        "reset_method": {role: reset_methods(addr) for role, addr in sorted(roles.by_role.items())},
        "reset_subordinate": sorted(r for r, a in roles.by_role.items()
                                    if (PCI / str(a) / "reset_subordinate").exists()),
        "slot_module_links": sorted(f"{s.name}:{os.path.basename(os.readlink(s / 'module'))}" for s in links),
        "dev_iommu": os.path.exists("/dev/iommu"),
        "vfio_device_cdevs": os.path.isdir("/dev/vfio/devices"),
    }
    (OUT / "stack.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps(facts))
    # qreset detects reset_subordinate at run time, per bridge, as the kernel offers it.
    assert sorted(r for r, has in qreset_view.items() if has) == facts["reset_subordinate"]
