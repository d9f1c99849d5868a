"""Engine facade and ``qreset reset`` against the simulated host."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest

from qreset.cli import main
from qreset.engine import CycleReport, Engine, EngineSettings
from qreset.execute import ProgressEvent
from qreset.pci.address import PciAddress
from qreset.pci.sim import Fault, SimHost
from qreset.plan import Method, Policy, Takeover

SCALE = 0.01


def sim(sim_dir: Path, name: str, scale: float = SCALE) -> SimHost:
    return SimHost.from_toml(sim_dir / f"{name}.toml", time_scale=scale)


async def test_reset_flr_function_is_clean_and_json_safe(sim_dir: Path) -> None:
    host = sim(sim_dir, "nic-flr")
    nic = host.address_of("nic")
    engine = Engine(host)
    report = await engine.reset("vm1", [nic], {"vm1": [nic]}, Policy())
    assert report.ok
    assert [d.domain.method for d in report.domains] == [Method.FLR]
    assert report.identity_changed == []
    text = json.dumps(report.to_json())  # no default=: must be JSON-safe as is
    back = json.loads(text)
    assert back["ok"] is True
    assert back["domains"][0]["functions"][0]["change"] == "none"
    assert set(back["domains"][0]["phases"]) >= {"save", "assert", "settle", "poll", "rescan",
                                                 "restore", "verify"}


async def test_refused_plan_touches_nothing(sim_dir: Path) -> None:
    host = sim(sim_dir, "gpu-audio")
    gpu, audio = host.address_of("gpu"), host.address_of("gpu-audio")
    host.set_driver(audio, "snd_hda_intel")  # the host uses the audio function
    engine = Engine(host)
    report = await engine.reset("vm1", [gpu], {"vm1": [gpu]}, Policy())
    assert not report.plan.ok
    assert not report.ok
    assert report.domains == []
    assert host.reset_log == []
    assert host.write_count() == 0


async def test_allowed_neighbour_is_reset_and_restored(sim_dir: Path) -> None:
    host = sim(sim_dir, "gpu-audio")
    gpu, audio = host.address_of("gpu"), host.address_of("gpu-audio")
    host.set_driver(audio, "snd_hda_intel")
    report = await Engine(host).reset("vm1", [gpu], {"vm1": [gpu]}, Policy(allow=frozenset({audio})))
    assert report.ok, [d.error for d in report.domains]
    [dom] = report.domains
    assert set(dom.domain.covers) == {gpu, audio}
    assert all(f.change == "state" and f.verified for f in dom.functions)


async def test_identity_change_is_reported_and_topology_dropped(sim_dir: Path) -> None:
    host = sim(sim_dir, "nic-flr")
    nic = host.address_of("nic")
    engine = Engine(host)
    topo1 = await engine.topology()
    assert await engine.topology() is topo1  # cached
    host.inject(nic, Fault.new_identity(device_id=0x1539))
    report = await engine.reset("vm1", [nic], {"vm1": [nic]}, Policy())
    assert not report.ok
    assert report.identity_changed == [nic]
    assert host.write_count(nic) == 0
    topo2 = await engine.topology()
    assert topo2 is not topo1
    assert topo2.node(nic).config.device_id == 0x1539


async def test_two_vms_sharing_a_bus_never_reset_it_at_once(sim_dir: Path) -> None:
    """demo.toml: lpt (vm1) and sound (vm2) sit on one conventional bus.

    lpt needs the bus reset (it has no function-level method), which hits
    sound; sound has its own PM reset. The two domains overlap (both cover
    sound), so they must serialize even though their keys differ.
    """
    host = sim(sim_dir, "demo")
    lpt, sound = host.address_of("lpt"), host.address_of("sound")
    vms = {"vm1": [lpt], "vm2": [sound]}
    engine = Engine(host)
    events: list[ProgressEvent] = []
    r1, r2 = await asyncio.gather(
        engine.reset("vm1", [lpt], vms, Policy(allow=frozenset({sound})), events.append),
        engine.reset("vm2", [sound], vms, Policy(allow=frozenset({lpt})), events.append),
    )
    assert r1.ok, [d.error for d in r1.domains]
    assert r2.ok, [d.error for d in r2.domains]
    [d1], [d2] = r1.domains, r2.domains
    assert sound in set(d1.domain.covers) & set(d2.domain.covers)
    # Whole cycles (save to verify), not just the resets, are serialized: the
    # sim alone already keeps the two resets apart (config access to a bus in
    # reset waits), so only the order of the domains' progress events proves
    # the lock: one domain's events all come before the other's.
    keys = [e.domain_key for e in events]
    assert {d1.domain.key, d2.domain.key} == set(keys)
    assert [k for k, _ in itertools.groupby(keys)] in (
        [d1.domain.key, d2.domain.key], [d2.domain.key, d1.domain.key])
    resets = sorted(host.reset_log, key=lambda r: r.start)
    assert len(resets) == 2
    assert resets[0].end <= resets[1].start


async def test_independent_domains_of_one_vm_run_concurrently(sim_dir: Path) -> None:
    host = sim(sim_dir, "demo", scale=0.05)
    nic1, nvme2 = host.address_of("nic1"), host.address_of("nvme2")
    report = await Engine(host).reset("vm1", [nic1, nvme2], {"vm1": [nic1, nvme2]}, Policy())
    assert report.ok
    assert len(report.domains) == 2
    a, b = report.domains
    assert a.start < b.end
    assert b.start < a.end


async def test_settings_bus_methods_override_policy(sim_dir: Path) -> None:
    host = sim(sim_dir, "gpu-audio")
    gpu, audio = host.address_of("gpu"), host.address_of("gpu-audio")
    engine = Engine(host, EngineSettings(bus_methods=(Method.USER_SBR,)))
    plan = await engine.plan("vm1", [gpu, audio], {"vm1": [gpu, audio]}, Policy(takeover=Takeover.ALL))
    assert [d.method for d in plan.domains] == [Method.USER_SBR]


def test_cycle_report_of_a_refused_plan_is_not_ok() -> None:
    from qreset.plan import Blocker, Owner, OwnerKind, Plan

    a = PciAddress.parse("01:00.0")
    plan = Plan("vm", (a,), Policy(), refusals=(Blocker(a, Owner(OwnerKind.HOST_DRIVER, "x"), "no"),))
    report = CycleReport(plan)
    assert not report.ok
    assert json.loads(json.dumps(report.to_json()))["ok"] is False


# -- qreset reset ------------------------------------------------------------------------


def test_cli_reset_prints_timeline_and_summary(sim_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["reset", "--sim", str(sim_dir / "gpu-audio.toml"), "--time-scale", "0.01", "01:00.0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    timeline = [ln for ln in lines if ln.startswith("+")]
    assert any("bus:0000:00:01.0  settle  " in ln for ln in timeline)
    assert any("  poll  0000:01:00.0 ready after" in ln for ln in timeline)
    assert any(ln.startswith("summary: OK") for ln in lines)
    assert any("0000:01:00.1: state restored" in ln and "verified" in ln for ln in lines)


def test_cli_reset_json(sim_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["reset", "--sim", str(sim_dir / "nic-flr.toml"), "--time-scale", "0.01", "01:00.0", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert data["ok"] is True
    assert data["domains"][0]["method"] == "flr"


def test_cli_dry_run_touches_nothing(sim_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["reset", "--sim", str(sim_dir / "gpu-audio.toml"), "01:00.0", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "user_sbr" in out or "bus" in out
    assert not any(ln.startswith("+") for ln in out.splitlines())


@pytest.mark.parametrize(("argv", "needle"), [
    (["reset", "zz:00.0", "--sim", "X"], "bad PCI address"),
    (["reset", "01:00.0", "--time-scale", "0.1"], "--time-scale applies to a simulated host only"),
    (["reset", "01:00.0", "--sim", "/nonexistent.toml"], "no such file"),
    (["reset", "09:00.0", "--sim", "SIM/nic-flr.toml"], "no such PCI function"),
])
def test_cli_bad_arguments_exit_2(sim_dir: Path, capsys: pytest.CaptureFixture[str],
                                  argv: list[str], needle: str) -> None:
    argv = [a.replace("SIM", str(sim_dir)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1


def test_cli_refused_exits_1(sim_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["reset", "--sim", str(sim_dir / "demo.toml"), "06:01.0", "--other", "vm2=06:02.0"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "refused" in out


async def test_engine_on_a_sysfs_tree(sim_dir: Path, tmp_path: Path) -> None:
    """The same cycle through SysfsHost (files written by the sim): static files, so no change."""
    from qreset.pci.sysfs import SysfsHost

    simhost = sim(sim_dir, "gpu-audio")
    simhost.write_tree(tmp_path)
    gpu, audio, rp = (simhost.address_of(n) for n in ("gpu", "gpu-audio", "rp1"))
    configs = {a: (tmp_path / "bus/pci/devices" / str(a) / "config").read_bytes() for a in (gpu, audio)}
    host = SysfsHost(tmp_path)
    try:
        report = await Engine(host, EngineSettings(poll_timeout=0.5)).reset(
            "vm1", [gpu], {"vm1": [gpu]}, Policy())
    finally:
        await host.close()
    assert report.ok, [d.error for d in report.domains]
    [dom] = report.domains
    assert dom.domain.method is Method.USER_SBR
    assert [f.change for f in dom.functions] == ["none", "none"]
    for a, raw in configs.items():
        assert (tmp_path / "bus/pci/devices" / str(a) / "config").read_bytes() == raw
    bridge = (tmp_path / "bus/pci/devices" / str(rp) / "config").read_bytes()
    assert not bridge[0x3E] & 0x40  # Secondary Bus Reset released
