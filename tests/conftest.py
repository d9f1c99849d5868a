"""Shared fixtures and the suite's rules. Paths are absolute so tests run from any directory.

Two rules live here:

* **Under CI (``CI=true``) a test that needs the real thing cannot pass by
  skipping.** A skip of a ``qemu`` or ``lab`` test, of the lspci oracle, or of
  any test whose skip reason names QEMU or lspci is turned into a failure: a
  fresh machine where ``scripts/install-deps`` did not work must go red, not
  green with a hundred skips. Outside the lab VM the ``lab`` tests are
  deselected instead (they cannot run on the host by construction;
  ``tests/test_lab.py`` runs them inside the lab and is itself a must-run test).
* **A test's QEMU dies with the test**: :func:`_reap_test_processes` stops, at
  each test's teardown, every guest or tracked process the test left running
  (see :mod:`tests.qemu_helpers` for the PR_SET_PDEATHSIG half).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.qemu_helpers import QEMU, QEMU_DATADIRS, have_qemu, reap_leftovers

ROOT = Path(__file__).resolve().parent.parent
SIM_DIR = ROOT / "configs" / "sim"

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
IN_LAB = os.environ.get("QRESET_LAB") == "1"
#: Markers whose tests must run (not skip) under CI.
MUST_RUN_MARKERS = ("qemu", "lab")
#: Modules that must run whole under CI: the lspci oracle, and the host side of the lab.
MUST_RUN_MODULES = ("test_lspci_oracle", "test_lab")
#: A skip whose reason names one of these is a missing install step, not a property of the test.
MUST_RUN_REASONS = ("qemu", "lspci", "pciutils", "install-deps")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which QEMU the ``qemu`` tests run (CI runs them on Debian 12's 7.2 and on 10.0)."""
    if not have_qemu():
        return [f"qemu: {QEMU} not found" + (" (CI=true: qemu tests will fail)" if CI else "")]
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    lines = [f"qemu: {QEMU}: {version.stdout.splitlines()[0] if version.stdout else version.stderr.strip()}"]
    if QEMU_DATADIRS:
        lines.append(f"qemu firmware (-L): {' '.join(QEMU_DATADIRS)}")
    lines.append(f"CI={os.environ.get('CI', '')}: a skipped qemu/lab/lspci test "
                 + ("fails" if CI else "is only a skip"))
    return lines


# Property tests judge results, not speed: no per-example deadline and no "too slow" health
# check, which fail on a loaded 2-core machine (hypothesis' default is a 200 ms deadline).
settings.register_profile("qreset", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True)
settings.load_profile("qreset")


@pytest.fixture
def sim_dir() -> Path:
    return SIM_DIR


def must_run(item: pytest.Item, reason: str) -> str | None:
    """Why ``item`` may not skip under CI, or None when its skip is allowed."""
    for name in MUST_RUN_MARKERS:
        if item.get_closest_marker(name) is not None:
            return f"a `{name}` test"
    module = Path(str(item.fspath)).stem
    if module in MUST_RUN_MODULES:
        return f"a test of {module}"
    low = reason.lower()
    for word in MUST_RUN_REASONS:
        if word in low:
            return f"a test skipped for want of {word}"
    return None


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[
        None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        why = must_run(item, reason)
        if why is not None:
            report.outcome = "failed"
            report.longrepr = (f"CI=true: {why} skipped ({reason}); under CI it must run "
                               "(scripts/test installs QEMU and pciutils itself)")
    return report


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside the lab VM, deselect the ``lab`` tests: tests/test_lab.py runs them inside it."""
    if IN_LAB:
        return
    lab = [i for i in items if i.get_closest_marker("lab") is not None]
    if lab:
        config.hook.pytest_deselected(items=lab)
        items[:] = [i for i in items if i.get_closest_marker("lab") is None]


@pytest.fixture(autouse=True)
def _reap_test_processes() -> Iterator[None]:
    """Stop whatever QEMU (or tracked process) a test left running, pass or fail."""
    yield
    left = reap_leftovers()
    if left:
        # Not a failure of its own: most tests stop their guests in a finally, and a
        # test that failed or timed out is reported already. The log says what was stopped.
        print(f"\nstopped at teardown: {', '.join(left)}")
