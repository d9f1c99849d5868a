"""The daemon's configuration file: the example parses; every bad file gives one clear line."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qreset.config import Mode, OnIdentityChange, load_config
from qreset.errors import ConfigError
from qreset.pci.address import PciAddress
from tests.conftest import ROOT

GOOD = """
[daemon]
journal = "state/journal.jsonl"
control_socket = ""
[sim]
topology = "demo.toml"
time_scale = 0.5
[policy]
mode = "stop-on-reset"
allow = ["06:02.0"]
[[vm]]
name = "vm1"
qmp = "vm1.qmp"
mode = "park"
[[vm.device]]
host = "0000:01:00.0"
[[vm]]
name = "vm2"
qmp = "/abs/vm2.qmp"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qreset.toml"
    path.write_text(text)
    return path


def test_example_config_parses() -> None:
    cfg = load_config(ROOT / "configs" / "qreset.toml")
    assert [vm.name for vm in cfg.vm] == ["vm1", "vm2"]
    assert cfg.mode_of(cfg.vm[0]) is Mode.PARK
    assert cfg.mode_of(cfg.vm[1]) is Mode.STOP_ON_RESET
    assert cfg.policy.on_identity_change is OnIdentityChange.STOP


def test_values_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.daemon.control_socket is None
    assert cfg.daemon.journal == tmp_path.resolve() / "state" / "journal.jsonl"
    assert cfg.sim is not None
    assert cfg.sim.topology == tmp_path.resolve() / "demo.toml"
    assert cfg.vm[0].qmp == tmp_path.resolve() / "vm1.qmp"
    assert cfg.vm[1].qmp == Path("/abs/vm2.qmp")
    assert cfg.vm[0].devices == (PciAddress.parse("0000:01:00.0"),)
    assert cfg.policy.allow == (PciAddress.parse("0000:06:02.0"),)
    assert cfg.mode_of(cfg.vm[0]) is Mode.PARK
    assert cfg.mode_of(cfg.vm[1]) is Mode.STOP_ON_RESET


BAD = [
    ("[policy]\nmode = 'pause'\n", "policy.mode", "expected 'park' or 'stop-on-reset', got 'pause'"),
    ("[policy]\ntakover = 'all'\n", "policy.takover", "unknown key"),
    ("[policy]\non_identity_change = 'ignore'\n", "policy.on_identity_change", "'stop' or 'resume'"),
    ("[policy]\ncycle_timeout = 0\n", "policy.cycle_timeout", "greater than 0"),
    ("[policy]\npoll_timeout = 'fast'\n", "policy.poll_timeout", "valid number"),
    ("[policy]\nallow = ['01:00']\n", "policy.allow[0]", "bad PCI address '01:00'"),
    ("[[vm]]\nqmp = 'a.qmp'\n", "vm[0].name", "required key is missing"),
    ("[[vm]]\nname = 'a'\n", "vm[0].qmp", "required key is missing"),
    ("[[vm]]\nname = 'a b'\nqmp = 'x'\n", "vm[0].name", "pattern"),
    ("[[vm]]\nname = 'a'\nqmp = 'a.qmp'\n[[vm.device]]\nhost = '0000:01:20.0'\n",
     "vm[0].device[0].host", "out of range"),
    ("[[vm]]\nname = 'a'\nqmp = 'a.qmp'\n[[vm]]\nname = 'a'\nqmp = 'b.qmp'\n",
     "vm[1].name", "duplicate VM name 'a'"),
    ("[[vm]]\nname = 'a'\nqmp = 's.qmp'\n[[vm]]\nname = 'b'\nqmp = 's.qmp'\n",
     "vm[1].qmp", "already used by vm[0]"),
    ("[[vm]]\nname = 'a'\nqmp = 'a.qmp'\n[[vm.device]]\nhost = '01:00.0'\n"
     "[[vm]]\nname = 'b'\nqmp = 'b.qmp'\n[[vm.device]]\nhost = '0000:01:00.0'\n",
     "vm[1].device[0].host", "already assigned to VM 'a'"),
    ("[sim]\ntime_scale = 0.1\n", "sim.topology", "required key is missing"),
    ("[[vm]]\nname = 'a'\nqmp = 'a.qmp'\nmode = 3\n", "vm[0].mode", "got 3"),
    ("vm = 'x'\n", "vm", "valid tuple"),
]


@pytest.mark.parametrize(("text", "key", "why"), BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_config_one_line_naming_file_and_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {key}: "), msg
    assert why in msg, msg


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy\nmode = 1\n")
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 1"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config(tmp_path / "nope.toml")
    path.write_bytes(b"\xff\xfe[policy]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_qreset_run_reports_bad_config_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy]\nmode = 'pause'\n")
    proc = subprocess.run([sys.executable, "-m", "qreset", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"qreset: {path}: policy.mode: expected 'park' or 'stop-on-reset', got 'pause'"]


def test_qreset_run_sim_override_and_sigterm(tmp_path: Path) -> None:
    """--sim replaces the host; SIGTERM stops the daemon cleanly (exit 0), journal created."""
    path = write(tmp_path, '[daemon]\njournal = "j/journal.jsonl"\ncontrol_socket = ""\n')
    demo = ROOT / "configs" / "sim" / "demo.toml"
    argv = [sys.executable, "-m", "qreset", "run", "--config", str(path), "--sim", str(demo)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "running:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0, "".join(lines) + rest
    assert f"host sim:{demo}" in lines[-1]
    assert "stopped" in rest
    assert (tmp_path / "j" / "journal.jsonl").exists()
