"""The daemon's configuration file: the example and the demo's pass; values and paths as read."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

from qreset.config import Mode, OnIdentityChange, load_config
from qreset.pci.address import PciAddress
from qreset.pci.sim import SimHost
from qreset.preflight import validate
from tests.conftest import ROOT, SIM_DIR
from tests.qemu_helpers import short_tmpdir

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


def demo_config(wd: Path, host: str) -> str:
    """The configuration scripts/demo writes, on ``host`` (a [sim] table or a sysfs_root)."""
    return (
        f'[daemon]\ncontrol_socket = "{wd}/control.sock"\njournal = "{wd}/journal.jsonl"\n{host}'
        '[policy]\nmode = "park"\nallow = ["0000:06:01.0", "0000:06:02.0"]\nconnect_backoff_max = 0.5\n'
        f'[[vm]]\nname = "vm1"\nqmp = "{wd}/vm1.qmp"\ndevice = [{{ host = "0000:01:00.0" }}, '
        '{ host = "0000:03:00.0" }, { host = "0000:03:00.1" }, { host = "0000:06:01.0" }]\n'
        f'[[vm]]\nname = "vm2"\nqmp = "{wd}/vm2.qmp"\nmode = "stop-on-reset"\n'
        'device = [{ host = "0000:02:00.0" }, { host = "0000:04:00.0" }, { host = "0000:06:02.0" }]\n'
    )


def test_good_configs_pass_every_check() -> None:
    """The example, and the demo's configuration on the simulated host and on the same
    host as a sysfs tree, pass what ``qreset run`` checks (bad files: test_config_bad.py)."""
    assert validate(ROOT / "configs" / "qreset.toml").daemon.sysfs_root == Path("/sys")
    with short_tmpdir() as wd:
        path = wd / "qreset.toml"
        path.write_text(demo_config(wd, f'[sim]\ntopology = "{SIM_DIR / "demo.toml"}"\n'))
        # QEMU has created vm1's socket already (the demo starts the guests first).
        with socket.socket(socket.AF_UNIX) as qmp:
            qmp.bind(str(wd / "vm1.qmp"))
            cfg = validate(path)
        assert [len(vm.devices) for vm in cfg.vm] == [4, 3]
        assert sorted(p.name for p in wd.iterdir()) == ["qreset.toml", "vm1.qmp"]
        host = SimHost.from_toml(SIM_DIR / "demo.toml")
        host.write_tree(wd / "sys")
        asyncio.run(host.close())
        path.write_text(demo_config(wd, 'sysfs_root = "sys"\n'))
        assert validate(path).daemon.sysfs_root == wd / "sys"


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
