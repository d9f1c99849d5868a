"""`qreset doctor --json` against the real kernel's sysfs: reset methods and IOMMU groups."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qreset.pci.address import PciAddress
from tests.lab.labhost import PCI, Roles, qreset, reset_methods

pytestmark = pytest.mark.lab

GROUPS = Path("/sys/kernel/iommu_groups")


@pytest.fixture(scope="module")
def doctor() -> dict[str, dict[str, Any]]:
    proc = qreset("doctor", "--json", check=True)
    report = json.loads(proc.stdout)
    return {f["bdf"]: f for f in report["functions"]}


def test_every_lab_function_is_reported(doctor: dict[str, dict[str, Any]], roles: Roles) -> None:
    kernel = {p.name for p in PCI.iterdir()}
    assert set(doctor) == kernel
    for role, addr in roles.by_role.items():
        assert str(addr) in doctor, role


def test_reset_methods_equal_the_kernel(doctor: dict[str, dict[str, Any]]) -> None:
    for bdf, f in doctor.items():
        assert f["reset_methods"] == reset_methods(PciAddress.parse(bdf)), bdf


def test_config_methods_match_the_kernels_function_methods(
    doctor: dict[str, dict[str, Any]], roles: Roles,
) -> None:
    """qreset's own decoding of config space predicts the kernel's flr/pm probes (endpoints)."""
    for addr in roles.endpoints():
        f = doctor[str(addr)]
        kernel = [m for m in reset_methods(addr) if m in ("flr", "af_flr", "pm")]
        assert f["config_methods"] == kernel, (str(addr), f["config_methods"], kernel)


def test_iommu_groups_equal_the_kernel(doctor: dict[str, dict[str, Any]]) -> None:
    members = {
        int(g.name): {d.name for d in (g / "devices").iterdir()} for g in GROUPS.iterdir()
    }
    from_doctor: dict[int, set[str]] = {}
    for bdf, f in doctor.items():
        assert f["iommu_group"] is not None, bdf
        from_doctor.setdefault(f["iommu_group"], set()).add(bdf)
    assert from_doctor == members
