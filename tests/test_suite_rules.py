"""The suite's own rules (tests/conftest.py), each proven by a pytest run in a subprocess.

* Under ``CI=true`` a ``qemu`` or lspci-oracle test that skips is a failure: run
  with QEMU and lspci hidden from ``PATH``, the same tests that merely skip
  without ``CI`` make pytest exit 1.
* A test's QEMU dies with the test: a test that fails, or times out under either
  of pytest-timeout's methods, or whose pytest is SIGKILLed, leaves no QEMU
  behind (the guests are found by a unique name in ``/proc/*/cmdline``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.qemu_helpers import have_qemu

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not have_qemu(), reason="qemu-system-x86_64 not installed (scripts/install-deps)"),
]

HIDDEN = ("qemu-system-", "lspci")


def path_without_qemu(tmp_path: Path) -> str:
    """A PATH of symlinks to every program on ours but QEMU and lspci."""
    shim = tmp_path / "bin"
    shim.mkdir()
    for d in os.environ.get("PATH", "").split(":"):
        if not d or not Path(d).is_dir():
            continue
        for prog in Path(d).iterdir():
            target = shim / prog.name
            if prog.name.startswith(HIDDEN) or target.exists() or target.is_symlink():
                continue
            target.symlink_to(prog)
    return str(shim)


def pytest_run(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in env.items() if k not in ("QRESET_QEMU", "QRESET_QEMU_DATADIRS")} | {
        "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_turns_a_skip_of_a_real_test_into_a_failure(tmp_path: Path, ci: str) -> None:
    env = dict(os.environ, CI=ci, PATH=path_without_qemu(tmp_path))
    run = pytest_run(
        "tests/test_registry.py::test_hook_reconnect_registers_the_guest_once",
        "tests/test_lspci_oracle.py::test_name_tables_match_installed_lspci",
        "tests/test_address.py", env=env)
    out = run.stdout + run.stderr
    if ci:
        assert run.returncode == 1, out
        assert "CI=true: a `qemu` test skipped" in out, out
        assert "CI=true: a test of test_lspci_oracle skipped" in out, out
        assert " passed" in out  # the tests that need nothing still ran
    else:
        assert run.returncode == 0, out
        assert "2 skipped" in out, out


# -- QEMU dies with its test -------------------------------------------------------------------

INNER = '''
import os, time
from pathlib import Path
import pytest
from tests.qemu_helpers import QemuGuest

WORK = Path(os.environ["LEAK_WORK"])
NAME = os.environ["LEAK_NAME"]


def start(suffix: str) -> QemuGuest:
    g = QemuGuest(f"{NAME}-{suffix}", WORK).start()
    g.wait_sockets()
    (WORK / f"{suffix}.pid").write_text(str(g.proc.pid))
    return g


def test_fails_with_qemu_running() -> None:
    start("failed")
    raise AssertionError("this test fails and never stops its QEMU")


def test_the_failed_tests_qemu_is_gone() -> None:
    pid = int((WORK / "failed.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.timeout(3)
def test_times_out_with_qemu_running() -> None:
    start("timeout")
    time.sleep(60)


def test_killed_with_qemu_running() -> None:
    start("killed")
    (WORK / "ready").write_text("")
    time.sleep(60)
'''


def qemus_named(name: str) -> list[int]:
    """Pids of live (non-zombie) QEMU processes whose command line carries ``name``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        argv0 = Path(cmdline.split(b"\0", 1)[0].decode(errors="replace")).name
        if argv0.startswith("qemu-system-") and name.encode() in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def gone(name: str, within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while (left := qemus_named(name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def inner(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "test_inner.py").write_text(INNER)
    name = f"leak{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, LEAK_WORK=str(tmp_path), LEAK_NAME=name, CI="")
    return tmp_path, env


def test_a_failed_tests_qemu_is_stopped_at_its_teardown(inner: tuple[Path, dict[str, str]]) -> None:
    work, env = inner
    module = work / "test_inner.py"
    # Node ids, not -k: -k also matches the tmp directory's name (test_a_failed_...).
    run = pytest_run("-p", "tests.conftest", f"{module}::test_fails_with_qemu_running",
                     f"{module}::test_the_failed_tests_qemu_is_gone", "-rA", env=env)
    out = run.stdout + run.stderr
    assert "1 failed, 1 passed" in out, out  # the second test saw the first one's QEMU gone
    assert "stopped at teardown: QEMU" in out, out
    assert not gone(env["LEAK_NAME"]), "a QEMU outlived its pytest run"


@pytest.mark.parametrize("method", ["signal", "thread"])
def test_a_timed_out_tests_qemu_dies(inner: tuple[Path, dict[str, str]], method: str) -> None:
    """pytest-timeout's signal method runs the teardown; its thread method exits the process."""
    work, env = inner
    run = pytest_run("-p", "tests.conftest", f"{work / 'test_inner.py'}::test_times_out_with_qemu_running",
                     "--timeout-method", method, env=env)
    out = run.stdout + run.stderr
    assert "Timeout" in out, out
    assert (work / "timeout.pid").exists(), out
    assert not gone(env["LEAK_NAME"]), f"a QEMU outlived its timed-out test ({method})\n{out}"


def test_a_killed_pytests_qemu_dies(inner: tuple[Path, dict[str, str]]) -> None:
    """No teardown at all (SIGKILL): PR_SET_PDEATHSIG is what kills the guest."""
    work, env = inner
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "tests.conftest",
         f"{work / 'test_inner.py'}::test_killed_with_qemu_running"],
        cwd=ROOT, env=env | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (work / "ready").exists():
            assert proc.poll() is None, "the inner pytest exited before its QEMU started"
            assert time.monotonic() < deadline, "the inner test never started QEMU"
            time.sleep(0.05)
        assert qemus_named(env["LEAK_NAME"]), "the inner test's QEMU is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not gone(env["LEAK_NAME"]), "a QEMU outlived its SIGKILLed pytest"
