"""A function stuck in CRS never becomes the baseline (issue 10 item 6).

Cycle N leaves a function answering Configuration Request Retry Status
(Vendor ID 0x0001, Device ID 0xFFFF); cycle N+1 saved that as its baseline,
and when the reset brought the function back its real IDs looked like a new
identity: the VM was stopped for nothing. The save phase now waits a little,
then keeps the last good snapshot, and without one reports ``not_ready``.
"""

from __future__ import annotations

from pathlib import Path

from qreset.engine import Engine, EngineSettings
from qreset.errors import ResetFailed
from qreset.execute import NOT_READY
from qreset.pci import regs
from qreset.pci.sim import Fault, SimHost
from qreset.plan import Policy

SCALE = 0.001  # the kernel's 60 s readiness poll = 60 ms of wall time
SETTINGS = EngineSettings(poll_timeout=0.5, save_ready_timeout=0.2)


def _nic(sim_dir: Path) -> tuple[SimHost, Engine]:
    host = SimHost.from_toml(sim_dir / "nic-flr.toml", time_scale=SCALE)
    return host, Engine(host, SETTINGS)


def _crs(raw: bytes) -> bool:
    return int.from_bytes(raw[:2], "little") == regs.CRS_VENDOR_ID


async def test_crs_left_by_one_cycle_is_not_the_next_baseline(sim_dir: Path) -> None:
    host, engine = _nic(sim_dir)
    nic = host.address_of("nic")
    host.inject(nic, Fault.crs(None))  # the next reset never comes back...
    first = await engine.reset("vm1", [nic], {}, Policy())
    assert not first.ok
    assert _crs(host.config_now(nic))  # ...and it is still in CRS when the next cycle starts

    second = await engine.reset("vm1", [nic], {}, Policy())  # this reset brings it back
    assert second.identity_changed == [], second.to_json()
    assert second.ok, second.to_json()
    [out] = [f for d in second.domains for f in d.functions]
    assert out.change in ("none", "state")
    assert not _crs(host.config_now(nic))


async def test_start_up_topology_is_the_baseline_of_last_resort(sim_dir: Path) -> None:
    """No earlier cycle: the snapshot the engine read at start (while it answered) is used."""
    host, engine = _nic(sim_dir)
    nic = host.address_of("nic")
    await engine.topology()  # read while the function answers
    host.inject(nic, Fault.crs(None))
    try:
        await host.reset_function(nic)  # someone else's reset leaves it in CRS
    except ResetFailed:
        pass
    assert _crs(host.config_now(nic))
    report = await engine.reset("vm1", [nic], {}, Policy())
    assert report.identity_changed == [], report.to_json()
    assert report.ok, report.to_json()


async def test_no_good_snapshot_at_all_is_reported_not_ready(sim_dir: Path) -> None:
    host = SimHost.from_toml(sim_dir / "nic-flr.toml", time_scale=SCALE)
    nic = host.address_of("nic")
    host.inject(nic, Fault.crs(None))
    try:
        await host.reset_function(nic)
    except ResetFailed:
        pass
    engine = Engine(host, SETTINGS)  # its topology is read while the function is in CRS
    report = await engine.reset("vm1", [nic], {}, Policy())
    assert report.identity_changed == []
    assert report.not_ready == [nic]
    assert not report.ok
    [out] = [f for d in report.domains for f in d.functions]
    assert out.change == NOT_READY
    assert out.error is not None
    assert "not ready before the reset" in out.error
    assert host.write_count(nic) == 0  # never restored from a CRS snapshot


async def test_a_function_that_answers_soon_is_waited_for(sim_dir: Path) -> None:
    """CRS for less than save_ready_timeout: the save waits and takes a fresh snapshot."""
    host = SimHost.from_toml(sim_dir / "nic-flr.toml", time_scale=1.0)
    engine = Engine(host, SETTINGS)
    nic = host.address_of("nic")
    host._fns[nic].ready_at = host._now() + 0.05  # CRS for 50 ms, as if just reset
    plan = await engine.plan("vm1", [nic], {}, Policy())  # topology read in CRS: no fallback
    host._fns[nic].ready_at = host._now() + 0.05
    report = await engine.run(plan)
    assert report.ok, report.to_json()
    assert report.identity_changed == []
    assert report.not_ready == []
