"""
The scale bench's reduced run (what CI runs): 32 real QEMU guests on one
``qreset run``, 16 resetting at the same instant, then 60 s of such waves.
Nothing may be lost: every injected NMI answered by exactly one cycle, every
cycle started has its terminal record, none failed, every guest runs at the
end, the daemon's fds do not grow. Asserts on the bench's JSON, not only its
exit status, so a bench that stopped checking would still fail here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qemu_helpers import have_qemu

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.qemu,
              pytest.mark.skipif(not have_qemu(), reason="needs qemu-system-x86_64")]


@pytest.mark.timeout(900)
def test_reduced_scale_run_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--ci", "--baseline-cycles", "30",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=840,
                          check=False)
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    res = json.loads(out.read_text())
    full, base = res["full"], res["baseline"]
    report = f"\n{proc.stdout}\n{proc.stderr[-3000:]}"
    for run, vms in ((base, 1), (full, 32)):
        assert "error" not in run, run.get("error")
        assert run["vms"] == vms
        assert run["not_running"] == {}, report
        assert run["lost"] == [], report
        assert run["failures"] == 0, report
        assert run["unanswered"] == 0, report
        assert run["extra_cycles"] == 0, report
        assert run["cycles"] == run["injected"] > 0, report
        assert run["wave_timeouts"] == [], report
        assert run["daemon_exit"] == 0, report
    # Every guest cycled, the burst reset 16 at once, and the shared bus was in it.
    assert full["cycles"] >= 32 + 16
    assert full["by_phase"]["burst/all"]["cycles"] == 16
    assert full["by_phase"]["burst/shared-bus"]["cycles"] == 4
    samples = full["daemon_samples"]
    assert samples[0]["phase"] == "start"
    assert samples[-1]["phase"] == "end"
    # Flat: a leak over 60 s of waves would be dozens of fds; 1 is a status client in flight.
    assert samples[-1]["fds"] <= samples[0]["fds"] + 1, "daemon leaks file descriptors"
    assert proc.returncode == 0, report
