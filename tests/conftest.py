"""Shared fixtures. Paths are absolute so tests run from any directory."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIM_DIR = ROOT / "configs" / "sim"


@pytest.fixture
def sim_dir() -> Path:
    return SIM_DIR
