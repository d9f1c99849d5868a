"""ResetRunner and domain locks against the simulated host (delays scaled down), every fault."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from qreset.diff import Change, RegKind
from qreset.execute import DomainResult, EngineSettings, ProgressEvent, ResetRunner
from qreset.locks import DomainLocks
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.sim import Fault, SimHost
from qreset.plan import Domain, Method
from qreset.topology import ResetKind

SCALE = 0.01  # 100 ms of host time = 1 ms of wall time


def sim(sim_dir: Path, name: str, scale: float = SCALE) -> SimHost:
    return SimHost.from_toml(sim_dir / f"{name}.toml", time_scale=scale)


def fn_domain(addr: PciAddress, method: Method = Method.FLR) -> Domain:
    return Domain(f"function:{addr}", ResetKind.FUNCTION, method, addr, (addr,), (addr,))


def bus_domain(bridge: PciAddress, covers: list[PciAddress], method: Method = Method.USER_SBR) -> Domain:
    return Domain(f"bus:{bridge}", ResetKind.BUS, method, bridge, tuple(covers), tuple(covers[:1]))


async def run(host: SimHost, *domains: Domain, settings: EngineSettings | None = None,
              locks: DomainLocks | None = None, events: list[ProgressEvent] | None = None,
              ) -> list[DomainResult]:
    ex = ResetRunner(host, locks or DomainLocks(), settings)
    return await ex.run(list(domains), events.append if events is not None else None)


def overlaps(a: DomainResult, b: DomainResult) -> bool:
    return a.start < b.end and b.start < a.end


# -- no change: the fast path ---------------------------------------------------------


async def test_flr_unchanged_function_gets_no_config_write(sim_dir: Path) -> None:
    host = sim(sim_dir, "nic-flr")
    nic = host.address_of("nic")
    before = host.config_now(nic)
    [res] = await run(host, fn_domain(nic))
    assert res.ok, res.error
    [out] = res.functions
    assert out.change == "none"
    assert (out.restored, out.writes) == (False, 0)
    assert host.write_count() == 0
    assert [(r.method, r.target) for r in host.reset_log] == [("flr", nic)]
    assert host.config_now(nic) == before


# -- userspace SBR: state lost, restored, verified ---------------------------------------


async def test_user_sbr_state_is_restored_and_verified(sim_dir: Path) -> None:
    host = sim(sim_dir, "gpu-audio")
    rp, gpu, audio = (host.address_of(n) for n in ("rp1", "gpu", "gpu-audio"))
    before = {a: host.config_now(a) for a in (gpu, audio)}
    events: list[ProgressEvent] = []
    [res] = await run(host, bus_domain(rp, [gpu, audio]), events=events)
    assert res.ok, res.error
    assert [r.method for r in host.reset_log] == ["sbr"]
    assert host.reset_log[0].affected == {gpu, audio}
    for out in res.functions:
        assert out.change == "state"
        assert out.restored
        assert out.verified
        assert out.writes == host.write_count(out.address) > 0
        assert out.diff is not None
        assert {r.name for r in out.diff.state_registers} >= {"Command", "BAR 0"}
        # Back to what it was, status registers aside.
        now = host.config_now(out.address)
        assert now[:regs.STATUS] == before[out.address][:regs.STATUS]
        assert now[0x08:0x40] == before[out.address][0x08:0x40]
    # The bridge got exactly two writes: set then clear Secondary Bus Reset.
    bridge_writes = [w for w in host.config_writes if w.addr == rp]
    assert [(w.offset, int.from_bytes(w.data, "little") & regs.BRIDGE_CTL_BUS_RESET)
            for w in bridge_writes] == [(regs.BRIDGE_CONTROL, 0x40), (regs.BRIDGE_CONTROL, 0)]
    assert not host.config_now(rp)[regs.BRIDGE_CONTROL] & regs.BRIDGE_CTL_BUS_RESET
    # Phases were timed and reported in order.
    assert all(res.phases[p] > 0 for p in ("save", "assert", "settle", "rescan", "restore", "verify"))
    phases = [e.phase for e in events]
    assert phases.index("assert") < phases.index("settle") < phases.index("poll") \
        < phases.index("rescan") < phases.index("restore") < phases.index("verify") < phases.index("done")


async def test_user_sbr_waits_for_the_spec_delay_before_reading(sim_dir: Path) -> None:
    """Secondary Bus Reset held 2 ms (pci_reset_secondary_bus), then no config read below
    the bridge between the release and 100 ms later (PCIe r6.0 6.6.1)."""
    scale = 0.5
    host = sim(sim_dir, "gpu-audio", scale=scale)
    rp, gpu = host.address_of("rp1"), host.address_of("gpu")
    reads: list[float] = []
    orig = host.read_config

    async def spy(addr: PciAddress, size: int = 4096) -> bytes:
        if addr == gpu:
            reads.append(asyncio.get_running_loop().time())
        return await orig(addr, size)

    host.read_config = spy  # type: ignore[method-assign]  # observe, not replace: the sim answers
    [res] = await run(host, bus_domain(rp, [gpu, host.address_of("gpu-audio")]))
    assert res.ok
    [sbr] = host.reset_log
    assert sbr.end - sbr.start >= 0.002 * scale * 0.95
    after = [t for t in reads if t > sbr.end]
    assert after, "never polled after the release"
    assert min(after) - sbr.end >= 0.100 * scale * 0.95


async def test_conventional_bus_waits_a_second_of_host_time(sim_dir: Path) -> None:
    host = sim(sim_dir, "conventional")
    bridge, nic, fw = (host.address_of(n) for n in ("bridge", "nic", "firewire"))
    [res] = await run(host, bus_domain(bridge, [nic, fw]))
    assert res.ok, res.error
    # 1000 + 100 ms of host time (Tpvrh + Trhfa) at SCALE.
    assert res.phases["settle"] >= 1.1 * SCALE * 0.95
    assert all(f.change == "state" and f.verified for f in res.functions)


async def test_nested_bus_reset_restores_bridges_before_children(sim_dir: Path) -> None:
    """A bus reset above a switch wipes its bus numbers: nothing below answers until restored."""
    host = sim(sim_dir, "switch")
    rp = host.address_of("rp1")
    below = sorted(a for n, a in host.names().items() if n not in ("hostbridge", "rp1"))
    before = {a: host.config_now(a) for a in below}
    events: list[ProgressEvent] = []
    t0 = time.monotonic()
    [res] = await run(host, bus_domain(rp, below), events=events)
    assert time.monotonic() - t0 < 5.0
    assert res.ok, (res.error, [(f.address, f.change, f.error) for f in res.functions])
    for f in res.functions:
        assert f.change == "state"
        assert f.verified
        assert host.config_now(f.address)[0x08:0x40] == before[f.address][0x08:0x40]
    # Three levels: upstream port, downstream ports, endpoints; each polled once, in order.
    polls = [e.message for e in events if e.phase == "poll"]
    assert [m.split(":")[0] for m in polls] == ["level 0", "level 1", "level 2"]
    assert all(f.polls == 1 for f in res.functions)


async def test_children_of_a_bridge_that_changed_identity_are_not_waited_for(sim_dir: Path) -> None:
    host = sim(sim_dir, "switch")
    rp, up = host.address_of("rp1"), host.address_of("up")
    below = sorted(a for n, a in host.names().items() if n not in ("hostbridge", "rp1"))
    host.inject(up, Fault.new_identity(device_id=0x8725))
    t0 = time.monotonic()
    [res] = await run(host, bus_domain(rp, below), settings=EngineSettings(poll_timeout=6000.0))
    # No 6000 s (60 s wall) poll of unreachable functions; the clean path takes
    # milliseconds, so the bound has a wide margin either way on a loaded host.
    assert time.monotonic() - t0 < 10.0
    by = {f.address: f for f in res.functions}
    assert by[up].change == "identity"
    others = [f for a, f in by.items() if a != up]
    assert all(f.change == "absent" and "did not come back clean" in (f.error or "") for f in others)
    assert sum(host.write_count(a) for a in below) == 0


async def test_bus_reset_of_an_sriov_pf_restores_vf_enable_before_polling_vfs(sim_dir: Path) -> None:
    """After a bus reset the VFs exist only once the PF's VF Enable/NumVFs are written back."""
    scale = 0.05
    host = sim(sim_dir, "sriov", scale=scale)
    names = host.names()
    covers = sorted(a for n, a in names.items() if n.startswith("pf"))
    [res] = await run(host, bus_domain(names["rp"], covers))
    assert res.ok, (res.error, [(f.address, f.change, f.error) for f in res.functions])
    by = {f.address: f for f in res.functions}
    assert all(f.polls == 1 for f in res.functions)
    pf = by[names["pf"]]
    assert pf.diff is not None
    assert {"SR-IOV Control", "SR-IOV NumVFs"} <= {r.name for r in pf.diff.state_registers}
    # VF Enable was written before any VF was polled.
    pf_ctrl = [w.t for w in host.config_writes if w.addr == names["pf"] and len(w.data) == 2
               and w.offset > 0x100 and int.from_bytes(w.data, "little") & regs.SRIOV_CTRL_VFE]
    vf_writes = [w.t for w in host.config_writes if w.addr in covers and w.addr != names["pf"]]
    assert pf_ctrl
    assert vf_writes
    assert max(pf_ctrl) <= min(vf_writes)
    # ... and 100 ms (sriov_restore_state's msleep(100) after VF Enable) went by first.
    assert min(vf_writes) - max(pf_ctrl) >= 0.100 * scale * 0.95


# -- faults ------------------------------------------------------------------------------


async def test_crs_forever_is_reported_in_bounded_time(sim_dir: Path) -> None:
    host = sim(sim_dir, "gpu-audio")
    rp, gpu, audio = (host.address_of(n) for n in ("rp1", "gpu", "gpu-audio"))
    host.inject(gpu, Fault.crs(None))
    t0 = time.monotonic()
    [res] = await run(host, bus_domain(rp, [gpu, audio]), settings=EngineSettings(poll_timeout=5.0))
    assert time.monotonic() - t0 < 5.0  # 5 s of host time is 50 ms here
    assert not res.ok
    by = {f.address: f for f in res.functions}
    assert by[gpu].change == "absent"
    assert "not ready" in (by[gpu].error or "")
    assert by[gpu].polls > 3
    assert host.write_count(gpu) == 0
    # The sibling still came back and was restored.
    assert by[audio].change == "state"
    assert by[audio].verified


async def test_crs_for_a_while_is_polled_with_backoff_then_restored(sim_dir: Path) -> None:
    # time_scale 0.25, not the module's 0.01: the 0.5 s of CRS must outlast the event
    # loop's lag on a loaded host (at 0.01 it was 5 ms of wall time, and a late first
    # poll found the device already ready: one poll, a flake).
    host = sim(sim_dir, "gpu-audio", scale=0.25)
    rp, gpu, audio = (host.address_of(n) for n in ("rp1", "gpu", "gpu-audio"))
    host.inject(gpu, Fault.crs(0.5))
    [res] = await run(host, bus_domain(rp, [gpu, audio]))
    assert res.ok, res.error
    by = {f.address: f for f in res.functions}
    # 0.5 s with 1 ms doubling: about 9 polls (pci_dev_wait's backoff), not hundreds.
    # At least 2: the first poll saw CRS. (A loaded machine oversleeps, so fewer polls
    # fit in the window; the lower bound must not depend on the scheduler.)
    assert 2 <= by[gpu].polls <= 12
    assert by[gpu].verified


async def test_crs_after_kernel_flr_times_out_without_hanging(sim_dir: Path) -> None:
    host = sim(sim_dir, "nic-flr", scale=0.001)
    nic = host.address_of("nic")
    host.inject(nic, Fault.crs(None))
    t0 = time.monotonic()
    [res] = await run(host, fn_domain(nic))
    assert time.monotonic() - t0 < 10.0
    assert not res.ok
    assert res.error is not None
    assert "flr reset failed" in res.error
    assert res.functions[0].change == "absent"
    assert host.write_count(nic) == 0


async def test_eio_is_reported_and_nothing_written(sim_dir: Path) -> None:
    host = sim(sim_dir, "nic-flr")
    nic = host.address_of("nic")
    host.inject(nic, Fault.eio())
    [res] = await run(host, fn_domain(nic))
    assert not res.ok
    assert res.error is not None
    assert "Input/output error" in res.error
    assert host.reset_log == []
    assert res.functions[0].change == "none"
    assert host.write_count() == 0


class _DeafCommandHost(SimHost):
    """A simulated host whose ``deaf`` function drops writes to its Command register.

    Stands in for a wedged part: the restore is issued but does not take, so
    only the verify re-read can tell.
    """

    deaf: PciAddress | None = None

    async def write_config(self, addr: PciAddress, offset: int, data: bytes) -> None:
        if addr == self.deaf and offset <= regs.COMMAND < offset + len(data):
            return
        await super().write_config(addr, offset, data)


async def test_restore_that_does_not_take_is_reported_not_verified(sim_dir: Path) -> None:
    host = _DeafCommandHost.from_toml(sim_dir / "gpu-audio.toml", time_scale=SCALE)
    assert isinstance(host, _DeafCommandHost)
    rp, gpu, audio = (host.address_of(n) for n in ("rp1", "gpu", "gpu-audio"))
    host.deaf = gpu
    [res] = await run(host, bus_domain(rp, [gpu, audio]))
    assert not res.ok
    out = {o.address: o for o in res.functions}
    assert (out[gpu].change, out[gpu].restored, out[gpu].verified) == ("state", True, False)
    error = out[gpu].error
    assert error is not None
    assert "did not verify" in error
    assert "Command" in error
    # The sibling whose writes took is verified; one bad function does not taint it.
    assert (out[audio].restored, out[audio].verified, out[audio].error) == (True, True, None)


async def test_identity_change_after_sbr_gets_zero_writes(sim_dir: Path) -> None:
    host = sim(sim_dir, "gpu-audio")
    rp, gpu, audio = (host.address_of(n) for n in ("rp1", "gpu", "gpu-audio"))
    old_device = int.from_bytes(host.config_now(gpu)[2:4], "little")
    host.inject(gpu, Fault.new_identity(device_id=0x1B81))
    [res] = await run(host, bus_domain(rp, [gpu, audio]))
    assert not res.ok
    by = {f.address: f for f in res.functions}
    assert by[gpu].change == "identity"
    diff = by[gpu].diff
    assert diff is not None
    [dev] = [r for r in diff.registers if r.name == "Device ID"]
    assert (dev.before, dev.after, dev.kind) == (old_device, 0x1B81, RegKind.IDENTITY)
    assert not by[gpu].restored
    assert host.write_count(gpu) == 0
    assert by[audio].change == "state"
    assert by[audio].verified


async def test_identity_change_in_bar_size_after_kernel_flr(sim_dir: Path) -> None:
    host = sim(sim_dir, "nic-flr")
    nic = host.address_of("nic")
    host.inject(nic, Fault.new_identity(bar_sizes={0: 256 * 1024}))
    [res] = await run(host, fn_domain(nic))
    [out] = res.functions
    assert out.change == "identity"
    assert out.diff is not None
    assert out.diff.change is Change.IDENTITY
    assert any("resource 0 size" in r for r in out.diff.reasons)
    assert host.write_count(nic) == 0


async def test_slow_device_is_waited_for(sim_dir: Path) -> None:
    # time_scale 0.1: 3 s of "not ready" is 300 ms of wall time, longer than a loaded
    # event loop's lag (at 0.01 it was 30 ms, and one late poll could see it ready).
    host = sim(sim_dir, "gpu-audio", scale=0.1)
    rp, gpu, audio = (host.address_of(n) for n in ("rp1", "gpu", "gpu-audio"))
    host.inject(gpu, Fault.slow(3.0))
    [res] = await run(host, bus_domain(rp, [gpu, audio]))
    assert res.ok, res.error
    assert {f.address: f for f in res.functions}[gpu].polls > 1


async def test_vfio_hot_reset_goes_through_the_host(sim_dir: Path) -> None:
    """Not a /sys check in the executor: PciHost.hot_reset, simulated here (issue 12)."""
    host = sim(sim_dir, "gpu-audio")
    rp, gpu, audio = (host.address_of(n) for n in ("rp1", "gpu", "gpu-audio"))
    before = {a: host.config_now(a) for a in (gpu, audio)}
    [res] = await run(host, bus_domain(rp, [gpu, audio], Method.VFIO_HOT_RESET))
    assert res.ok, res.error
    [rec] = host.reset_log
    assert (rec.method, rec.target, rec.affected) == ("vfio_hot_reset", rp, frozenset({gpu, audio}))
    assert host.write_count() == 0  # the kernel saved and restored them
    assert [f.change for f in res.functions] == ["none", "none"]
    assert {a: host.config_now(a) for a in (gpu, audio)} == before


async def test_vfio_hot_reset_refused_cleanly_on_a_sysfs_tree(sim_dir: Path, tmp_path: Path) -> None:
    from qreset.pci.sysfs import SysfsHost

    simhost = sim(sim_dir, "gpu-audio")
    simhost.write_tree(tmp_path)
    rp, gpu, audio = (simhost.address_of(n) for n in ("rp1", "gpu", "gpu-audio"))
    host = SysfsHost(tmp_path)
    try:
        ex = ResetRunner(host, DomainLocks())
        [res] = await ex.run([bus_domain(rp, [gpu, audio], Method.VFIO_HOT_RESET)])
    finally:
        await host.close()
    assert not res.ok
    assert "VFIO hot reset needs the real /sys" in (res.error or "")
    assert [f.change for f in res.functions] == ["none", "none"]


async def test_unreadable_function_fails_the_domain_before_any_reset(sim_dir: Path) -> None:
    host = sim(sim_dir, "gpu-audio")
    rp, gpu = host.address_of("rp1"), host.address_of("gpu")
    ghost = PciAddress.parse("01:00.7")  # stale plan: no such function any more
    [res] = await run(host, bus_domain(rp, [gpu, ghost]))
    assert not res.ok
    assert "save failed, nothing reset" in (res.error or "")
    assert host.reset_log == []
    assert host.write_count() == 0


# -- concurrency and locks -----------------------------------------------------------------


async def test_independent_domains_overlap_in_time(sim_dir: Path) -> None:
    host = sim(sim_dir, "switch", scale=0.05)
    nvme, nic = host.address_of("nvme1"), host.address_of("nic2")
    a, b = await run(host, fn_domain(nvme), fn_domain(nic))
    assert a.ok
    assert b.ok
    assert overlaps(a, b)
    ra, rb = host.reset_log
    assert ra.start < rb.end
    assert rb.start < ra.end


async def test_overlapping_domains_are_serialized(sim_dir: Path) -> None:
    host = sim(sim_dir, "switch", scale=0.05)
    dp1, nvme = host.address_of("dp1"), host.address_of("nvme1")
    a, b = await run(host, fn_domain(nvme), bus_domain(dp1, [nvme]))
    assert a.ok, a.error
    assert b.ok, b.error
    assert not overlaps(a, b)
    assert max(a.phases["lock"], b.phases["lock"]) > 0
    ra, rb = sorted(host.reset_log, key=lambda r: r.start)
    assert ra.end <= rb.start


async def test_same_domain_from_two_vms_is_serialized(sim_dir: Path) -> None:
    """Two VMs sharing one reset domain: one lock table, one reset at a time."""
    host = sim(sim_dir, "demo", scale=0.01)
    bridge, lpt, sound = (host.address_of(n) for n in ("pcibridge", "lpt", "sound"))
    locks = DomainLocks()
    ex1 = ResetRunner(host, locks)
    ex2 = ResetRunner(host, locks)
    d = bus_domain(bridge, [lpt, sound])
    [a], [b] = await asyncio.gather(ex1.run([d]), ex2.run([d]))
    assert a.ok, a.error
    assert b.ok, b.error
    s1, s2 = sorted((r for r in host.reset_log if r.method == "sbr"), key=lambda r: r.start)
    assert s1.end < s2.start
    # The second waited for the whole of the first (through restore), not just its
    # reset: every restore write of the first cycle lands before the second SBR starts.
    restore_writes = min(sum(f.writes for f in r.functions) for r in (a, b))
    assert restore_writes > 0
    between = [w for w in host.config_writes if s1.end <= w.t < s2.start]
    assert len(between) >= restore_writes


async def test_one_failing_domain_does_not_stop_the_others(sim_dir: Path) -> None:
    host = sim(sim_dir, "switch")
    nvme, nic = host.address_of("nvme1"), host.address_of("nic2")
    host.inject(nvme, Fault.eio())
    a, b = await run(host, fn_domain(nvme), fn_domain(nic))
    assert not a.ok
    assert b.ok
    assert [r.target for r in host.reset_log] == [nic]


async def test_tasks_are_named_after_domain_keys(sim_dir: Path) -> None:
    host = sim(sim_dir, "nic-flr")
    nic = host.address_of("nic")
    names: list[str] = []

    def seen(_e: ProgressEvent) -> None:
        task = asyncio.current_task()
        if task is not None:
            names.append(task.get_name())

    await ResetRunner(host, DomainLocks()).run([fn_domain(nic)], seen)
    assert set(names) == {f"reset[function:{nic}]"}


async def test_locks_order_and_release_on_cancel() -> None:
    a, b, c = (PciAddress(0, 1, i, 0) for i in range(3))
    locks = DomainLocks()
    d1 = Domain("bus:x", ResetKind.BUS, Method.USER_SBR, c, (b, a), (a,))
    assert DomainLocks.functions_of(d1) == (a, b, c)
    d2 = fn_domain(b)
    order: list[str] = []

    async def hold(d: Domain, tag: str, delay: float) -> None:
        async with locks.hold(d):
            order.append(f"{tag}+")
            await asyncio.sleep(delay)
            order.append(f"{tag}-")

    t1 = asyncio.create_task(hold(d1, "1", 0.02))
    await asyncio.sleep(0)
    t2 = asyncio.create_task(hold(d2, "2", 0))
    await asyncio.gather(t1, t2)
    assert order == ["1+", "1-", "2+", "2-"]
    # A holder cancelled while waiting releases what it had taken.
    async with locks.hold(fn_domain(c)):
        waiter = asyncio.create_task(hold(d1, "3", 0))
        await asyncio.sleep(0.01)
        assert locks.held().get(a) == "bus:x"
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert locks.held() == {}


# -- the simulated host's reset bound has a wall-clock floor ---------------------------


class _LaggingSim(SimHost):
    """A reset call that returns late in wall time: a loop busy with other guests' cycles."""

    lag = 0.3

    async def reset_function(self, addr: PciAddress, method: str | None = None) -> None:
        await asyncio.sleep(self.lag)  # wall seconds, not scaled: the event loop's lag
        await super().reset_function(addr, method)


async def test_scaled_reset_bound_has_a_floor(sim_dir: Path) -> None:
    """time_scale 0.01 turned a 20 s bound into 0.2 s: loop lag failed the reset; now >= 10 s."""
    host = _LaggingSim.from_toml(sim_dir / "nic-flr.toml", time_scale=SCALE)
    nic = host.address_of("nic")
    [res] = await run(host, fn_domain(nic), settings=EngineSettings(reset_timeout=20.0))
    assert res.ok, res.error
    assert [(r.method, r.target) for r in host.reset_log] == [("flr", nic)]


def test_reset_bound_unscaled_on_a_real_host() -> None:
    from qreset.execute_types import RESET_WALL_FLOOR, _reset_wall_limit

    class Real:
        time_scale = 1.0

    class Fast:
        time_scale = 0.01

    assert _reset_wall_limit(Real(), 120.0) == 120.0  # type: ignore[arg-type]
    assert _reset_wall_limit(Real(), 2.0) == 2.0  # type: ignore[arg-type]
    assert _reset_wall_limit(Fast(), 120.0) == RESET_WALL_FLOOR  # type: ignore[arg-type]
    assert _reset_wall_limit(Fast(), 5000.0) == 50.0  # type: ignore[arg-type]
