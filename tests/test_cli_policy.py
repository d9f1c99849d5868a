"""`--bus-method` chooses (and limits) how `qreset plan`/`qreset reset` reset slot/bus domains."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, SIM_DIR

GPU_AUDIO = str(SIM_DIR / "gpu-audio.toml")


def qreset(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qreset", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=False)


def test_reset_with_user_sbr_restores_what_the_userspace_reset_cleared() -> None:
    out = qreset("reset", "--sim", GPU_AUDIO, "--time-scale", "0.01", "--bus-method", "user_sbr",
                 "01:00.0", "01:00.1", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    [dom] = report["domains"]
    assert dom["method"] == "user_sbr"
    # A userspace SBR leaves the functions at power-on defaults: qreset finds state
    # changes and puts them back (the kernel paths would show no change at all).
    changes = {f["address"]: f["change"] for f in dom["functions"]}
    assert changes == {"0000:01:00.0": "state", "0000:01:00.1": "state"}
    assert all(f["verified"] for f in dom["functions"])


def test_plan_follows_the_preference_order_and_refuses_when_none_applies() -> None:
    first = json.loads(qreset("plan", "--sim", GPU_AUDIO, "01:00.0", "01:00.1", "--json",
                              "--bus-method", "user_sbr", "--bus-method", "bus").stdout)
    assert [d["method"] for d in first["domains"]] == ["user_sbr"]
    # The kernel's `bus` method needs the function alone below its bridge: not here.
    only_bus = qreset("plan", "--sim", GPU_AUDIO, "01:00.0", "01:00.1", "--json", "--bus-method", "bus")
    assert only_bus.returncode == 1
    plan = json.loads(only_bus.stdout)
    assert plan["domains"] == []
    assert plan["refusals"], plan


def test_unknown_bus_method_is_a_usage_error() -> None:
    out = qreset("plan", "--sim", GPU_AUDIO, "01:00.0", "--bus-method", "sbr")
    assert out.returncode == 2
    assert "invalid choice: 'sbr'" in out.stderr
