"""Lab tests run only inside the lab VM (scripts/lab/run sets QRESET_LAB=1); elsewhere they skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.labhost import LAB, OUT, SKIP_REASON, Roles, enable_kernel_witnesses

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.lab)
            if not LAB:
                item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Write each failure to the results share as it happens (``failures.log``).

    pytest prints its report at the end; a lab run stopped by its timeout
    (``QRESET_LAB_TIMEOUT``) would otherwise leave no word of what failed.
    """
    if LAB and report.failed:
        with (OUT / "failures.log").open("a") as f:
            f.write(f"=== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n")


@pytest.fixture(scope="session")
def roles() -> Roles:
    return Roles.discover()


@pytest.fixture(scope="session")
def witnesses() -> list[str]:
    """Kernel evidence of resets (see labhost): dynamic debug + kprobes printed by tp_printk."""
    return enable_kernel_witnesses()
