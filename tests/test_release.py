"""The release flow on the simulated host: re-probe only what changed identity."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from qreset.config import parse_config
from qreset.daemon import Daemon
from qreset.engine import Engine
from qreset.pci.address import PciAddress
from qreset.pci.sim import Fault, SimHost
from qreset.plan import Policy
from qreset.release import release
from tests.conftest import ROOT, SIM_DIR

GPU = PciAddress.parse("0000:01:00.0")
AUDIO = PciAddress.parse("0000:01:00.1")
ROOT_PORT = PciAddress.parse("0000:00:01.0")


class RecordingSim(SimHost):
    """The real simulated host, recording the re-probe calls it receives."""

    removed: list[PciAddress]
    rescanned: list[PciAddress | None]

    async def remove(self, addr: PciAddress) -> None:
        self.removed.append(addr)
        await super().remove(addr)

    async def rescan(self, bridge: PciAddress | None = None) -> None:
        self.rescanned.append(bridge)
        await super().rescan(bridge)


def _host() -> RecordingSim:
    host = RecordingSim.from_toml(SIM_DIR / "gpu-audio.toml", time_scale=0.01)
    assert isinstance(host, RecordingSim)
    host.removed, host.rescanned = [], []
    return host


async def test_unchanged_devices_are_reset_but_not_reprobed() -> None:
    host = _host()
    engine = Engine(host)
    report = await release(engine, "vm1", [GPU, AUDIO], {}, Policy())
    assert report.ok
    assert report.cycle.domains, "release must reset the domain"
    assert {a for d in report.cycle.domains for a in d.domain.covers} == {GPU, AUDIO}
    assert any(r.target == ROOT_PORT for r in host.reset_log)
    assert host.removed == []
    assert host.rescanned == []
    assert report.removed == []


async def test_identity_change_removes_the_device_and_rescans_its_bridge() -> None:
    host = _host()
    old = await host.info(GPU)
    host.inject(GPU, Fault.new_identity(device_id=0x1E87, revision=0xA2))
    engine = Engine(host)
    report = await release(engine, "vm1", [GPU, AUDIO], {}, Policy())
    assert report.cycle.identity_changed == [GPU]
    # Both functions of the card go (function 1 first), then the root port is rescanned.
    assert host.removed == [AUDIO, GPU]
    assert host.rescanned == [ROOT_PORT]
    assert report.ok
    new = await host.info(GPU)
    assert (old.device, new.device) == (0x1EB8, 0x1E87)
    assert new.revision == 0xA2
    # The engine's cached topology was refreshed: it sees the device as it now is.
    topo = await engine.topology()
    assert topo.node(GPU).config.device_id == 0x1E87


async def test_release_never_hits_a_function_of_a_vm_still_running() -> None:
    """Releasing the GPU alone would need the bus reset that also hits the audio
    function; while another VM holds the audio, the release is refused, nothing reset."""
    host = _host()
    report = await release(Engine(host), "vm1", [GPU], {"vm2": [AUDIO]}, Policy())
    assert not report.ok
    assert not report.cycle.plan.ok
    assert AUDIO in {b.function for b in report.cycle.plan.refusals}
    assert not any(AUDIO in r.affected for r in host.reset_log)
    assert host.write_count() == 0


def test_release_cli_on_the_simulated_host() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qreset", "release", "--sim", str(SIM_DIR / "gpu-audio.toml"),
         "--time-scale", "0.01", "01:00.0", "01:00.1", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert '"reprobed": false' in out.stdout


def test_release_cli_rejects_mixed_targets() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qreset", "release", "vm1", "01:00.0"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )
    assert out.returncode == 2
    assert "not both" in out.stderr


DEMO_GPU = PciAddress.parse("0000:03:00.0")        # configs/sim/demo.toml: GPU + audio below 00:03.0
DEMO_AUDIO = PciAddress.parse("0000:03:00.1")
DEMO_PORT = PciAddress.parse("0000:00:03.0")


async def _daemon_release(tmp_path: Path, change_identity: bool) -> tuple[dict[str, Any], RecordingSim]:
    """A VM registered with the daemon, removed with release=True (what the hook's 'stopped' asks)."""
    host = RecordingSim.from_toml(SIM_DIR / "demo.toml", time_scale=0.01)
    assert isinstance(host, RecordingSim)
    host.removed, host.rescanned = [], []
    cfg = parse_config({"daemon": {"journal": str(tmp_path / "journal.jsonl"), "control_socket": ""},
                        "policy": {"connect_backoff_max": 0.3}}, "test")
    daemon = Daemon(cfg, host=host, control=False)
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        await asyncio.wait_for(daemon.started.wait(), 10)
        await daemon.add_vm("vm1", str(tmp_path / "vm1.qmp"), [str(DEMO_GPU), str(DEMO_AUDIO)], None)
        if change_identity:
            host.inject(DEMO_GPU, Fault.new_identity(device_id=0x1E87))
        result = await daemon.remove_vm("vm1", release=True)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 30)
    return result, host


async def test_daemon_release_reprobes_a_changed_device(tmp_path: Path) -> None:
    result, host = await _daemon_release(tmp_path, change_identity=True)
    released = result["released"]
    assert released["reprobed"] is True
    assert released["removed"] == [str(DEMO_AUDIO), str(DEMO_GPU)]
    assert host.removed == [DEMO_AUDIO, DEMO_GPU]
    assert host.rescanned == [DEMO_PORT]
    assert released["cycle"]["identity_changed"] == [str(DEMO_GPU)]
    assert (await host.info(DEMO_GPU)).device == 0x1E87


async def test_daemon_release_of_unchanged_devices_does_not_reprobe(tmp_path: Path) -> None:
    result, host = await _daemon_release(tmp_path, change_identity=False)
    released = result["released"]
    assert released["ok"] is True
    assert released["reprobed"] is False
    assert host.removed == []
    assert host.rescanned == []
    # ...but the card was reset for the host: its bus, below the root port.
    assert any({DEMO_GPU, DEMO_AUDIO} <= r.affected for r in host.reset_log)
