"""Host side of the real-kernel lab: boot it (scripts/lab/run) and check what ran inside.

The lab VM runs ``pytest -m lab tests/lab`` against a Debian kernel (one run per
stack in ``STACKS``, ``scripts/lab/run --stack``) with an emulated IOMMU and
writes a junit report to its results share; this test asserts the run exited 0
and that the lab tests that matter are listed as
passed (a lab that silently skipped everything would not pass).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Lab tests that must have passed inside the VM (module::name, parametrized ids included).
EXPECTED = (
    "test_smoke::test_kernel_sees_iommu_groups",
    "test_smoke::test_lab_topology_roles",
    "test_smoke::test_stack_facts",
    "test_doctor::test_reset_methods_equal_the_kernel",
    "test_doctor::test_iommu_groups_equal_the_kernel",
    "test_vfio::test_hot_reset_info_and_reset[virtio1]",
    "test_vfio::test_hot_reset_info_and_reset[sw_e1000e]",
    "test_vfio::test_hot_reset_info_and_reset[mf0]",
    "test_vfio::test_hot_reset_refused_when_group_held",
    "test_reset::test_flr_by_qreset_reset",
    "test_reset::test_kernel_secondary_bus_reset_by_qreset_reset",
    "test_reset::test_user_sbr_finds_and_restores_cleared_registers",
    "test_bench::test_bench_qemu_vs_qreset",
    "test_daemon::test_park_mode_cycles_on_real_devices",
    "test_lspci::test_lab_sysfs_decodes_like_lspci",
    "test_sysfs::test_lab_info_agrees_with_the_kernel",
    "test_sysfs::test_lab_reset_runs_the_chosen_method",
    "test_sysfs::test_lab_resets_overlap",
    "test_sysfs::test_lab_config_writes_and_errors",
    "test_libvirt::test_guest_reboots_are_coordinated_under_libvirt",
    "test_libvirt::test_guest_config_writes_in_the_window_survive_the_cycle",
    "test_libvirt::test_on_poweroff_restart_still_restarts",
    "test_libvirt::test_virsh_reboot_acpi_with_qreset",
    "test_libvirt::test_destroy_releases_before_libvirt_unbinds",
    "test_libvirt::test_prepare_refuses_a_device_of_a_running_domain",
    "test_libvirt::test_restarts_of_libvirtd_and_qreset",
    "test_libvirt::test_gap_domain_gets_its_bus_reset_from_qreset",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2700),
    pytest.mark.skipif(os.environ.get("QRESET_LAB") == "1", reason="already inside the lab"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab installs Debian packages and needs root"),
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="the lab needs a Debian host (apt-get)"),
]


def junit_outcomes(path: Path) -> dict[str, str]:
    """``module::test`` -> passed/failed/error/skipped from a pytest junit XML file."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        name = f"{module}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        out[name] = outcome
    return out


#: What trixie-iommufd runs instead (scripts/lab/run's default for it): the iommufd
#: tests and the smoke tests, on a kernel with CONFIG_IOMMUFD (Ubuntu 24.04's 6.8).
EXPECTED_IOMMUFD = (
    "test_smoke::test_kernel_sees_iommu_groups",
    "test_smoke::test_lab_topology_roles",
    "test_smoke::test_stack_facts",
    "test_iommufd::test_kernel_offers_iommufd_and_cdevs",
    "test_iommufd::test_park_mode_cycles_over_iommufd",
    "test_iommufd::test_hot_reset_where_qreset_may_and_may_not",
)

#: Every stack, every CI run (scripts/lab/README.md): Debian 12 (Linux 6.1, QEMU 7.2,
#: libvirt 9.0), Debian 13 (Linux 6.12, QEMU 10.0, libvirt 11.3), and Debian 13's
#: userspace on Ubuntu 24.04's 6.8 for iommufd (about 2 minutes of VM time).
STACKS = ["bookworm", "trixie", "trixie-iommufd"]


#: The lab tests whose printed figures and evidence go into the CI summary.
SUMMARIZED = ("test_stack_facts", "test_lab_resets_overlap", "test_park_mode_cycles_over_iommufd",
              "test_hot_reset_where_qreset_may_and_may_not",
              *(name.split("::")[1] for name in EXPECTED if name.startswith("test_libvirt::")))


def lab_summary(out: Path, stack: str) -> str:
    """What a CI log should show of a lab run, from its pytest log (run with -rA).

    The printed evidence of the libvirt scenario (stop-on-reset window figures,
    the kernel trace of release before unbind, the refused domain, the
    restarts), the stack's facts, the outcome of every test and the benchmark.
    """
    log = out / "pytest.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    keep: list[str] = [f"===== lab stack {stack}: {out}"]
    block: list[str] | None = None
    stdout = False  # inside a test's "Captured stdout call" (not its log or stderr)
    for line in lines:
        m = re.fullmatch(r"_{3,} (test_\w+)(\[.*\])? _{3,}", line)
        if m:
            block = [] if m[1] in SUMMARIZED else None
            stdout = False
            if block is not None:
                keep.append(f"--- {m[1]}")
            continue
        if line.startswith("-----") and "Captured" in line:
            stdout = "Captured stdout" in line
        elif line.startswith(("PASSED ", "FAILED ", "ERROR ", "SKIPPED ", "=====")):
            block = None
            keep.append(line)
        elif block is not None and stdout and len(block) < 20:
            block.append(line)
            keep.append("  " + line[:240])
    bench = out / "bench.txt"
    if bench.exists():
        keep += ["--- bench.txt", *bench.read_text().splitlines()[:20]]
    return "\n".join(keep) + "\n"


@pytest.mark.parametrize("stack", STACKS)
def test_lab_runs_and_passes(tmp_path: Path, stack: str) -> None:
    """Each stack (scripts/lab/README.md): Debian 12 (6.1, QEMU 7.2), Debian 13 (6.12, QEMU 10.0),
    and Debian 13 on Ubuntu 24.04's 6.8 (iommufd)."""
    out = tmp_path / "lab"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "lab" / "run"), "--stack", stack, "--out", str(out)],
        capture_output=True, text=True, check=False, timeout=2600,
    )
    failures = out / "failures.log"  # written by the lab as each failure happens
    tail = (proc.stdout[-6000:] + proc.stderr[-2000:]
            + (f"\n--- failures.log\n{failures.read_text()[-6000:]}" if failures.exists() else ""))
    summary_dir = os.environ.get("QRESET_LAB_SUMMARY_DIR")
    if summary_dir:  # .ci/run prints these at its end, passed or not
        Path(summary_dir).mkdir(parents=True, exist_ok=True)
        (Path(summary_dir) / f"lab-{stack}.txt").write_text(lab_summary(out, stack))
    assert (out / "rc").exists(), f"the lab VM reported no exit code:\n{tail}"
    outcomes = junit_outcomes(out / "junit.xml")
    bad = {k: v for k, v in outcomes.items() if v in ("failure", "error")}
    assert not bad, f"lab tests failed: {bad}\n{tail}"
    assert proc.returncode == 0, tail
    iommufd = stack == "trixie-iommufd"
    expected = EXPECTED_IOMMUFD if iommufd else EXPECTED
    missing = [name for name in expected if outcomes.get(name) != "passed"]
    assert not missing, f"expected lab tests not passed: {[(m, outcomes.get(m)) for m in missing]}"
    assert iommufd or (out / "bench.txt").exists()
