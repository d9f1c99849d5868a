"""Lab tests run only inside the lab VM (scripts/lab/run sets QRESET_LAB=1); elsewhere they skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.labhost import LAB, SKIP_REASON, Roles, enable_kernel_witnesses

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.lab)
            if not LAB:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def roles() -> Roles:
    return Roles.discover()


@pytest.fixture(scope="session")
def witnesses() -> list[str]:
    """Kernel evidence of resets (see labhost): dynamic debug + kprobes printed by tp_printk."""
    return enable_kernel_witnesses()
