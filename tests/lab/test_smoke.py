"""The lab runs on a real kernel with an emulated IOMMU: check what the rest of tests/lab relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.labhost import Roles, driver

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
