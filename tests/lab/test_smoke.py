"""The lab runs on a real kernel: check what the rest of tests/lab relies on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.environ.get("QRESET_LAB") != "1", reason="runs only inside the lab VM (scripts/lab/run)"),
]


def test_kernel_sees_iommu_groups() -> None:
    groups = list(Path("/sys/kernel/iommu_groups").iterdir())
    assert len(groups) > 5, groups
