"""
What the daemon keeps so that a cycle costs the same with 256 VMs as with one
(issue 13, bench.scale): the ownership map built once per change, a bounded
in-memory history, the fd limit raised at start, the status queries side by side.
Each test fails on the code before its fix (a stale map, 10 000 full summaries,
the soft limit left at 1024).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from qreset.daemon_stats import HISTORY_MAX, LATENCIES_MAX, CycleStats
from qreset.inventory import merge
from qreset.pci.sim import SimHost
from tests.conftest import ROOT
from tests.daemon_helpers import DEMO, GPU, LPT, NIC1, A, make_config, running
from tests.qemu_helpers import guests, short_tmpdir


async def test_ownership_map_follows_added_removed_vms_and_device_changes() -> None:
    with short_tmpdir() as wd, guests(wd, "vm1", "vm2", "vm3", paused=True) as (g1, g2, g3):
        cfg = make_config(wd, {"vm1": (g1, [NIC1]), "vm2": (g2, [GPU])})
        async with running(cfg, SimHost.from_toml(DEMO)) as daemon:
            first = daemon.ownership()
            assert dict(first) == {"vm1": (A(NIC1),), "vm2": (A(GPU),)}
            assert daemon.ownership() is first          # kept while nothing changes
            # Both QEMUs answer, in the monitors' order, side by side.
            rows = await daemon.query_vms()
            assert [(r["name"], r["status"]) for r in rows] == [("vm1", "prelaunch"), ("vm2", "prelaunch")]
            # A monitor added at run time.
            await daemon.add_vm("vm3", str(g3.qmp_path), [LPT], None)
            assert dict(daemon.ownership())["vm3"] == (A(LPT),)
            # A monitor's devices set (what an inventory refresh does).
            vm2 = daemon.monitors["vm2"]
            vm2.devices = merge([], [A(GPU), A("0000:03:00.1")])
            assert vm2.owned == (A(GPU), A("0000:03:00.1"))
            assert daemon.ownership()["vm2"] == (A(GPU), A("0000:03:00.1"))
            # check-devices reads the map: a removed VM's function is free again.
            assert not (await daemon.check_devices("new", [NIC1]))["safe"]
            await daemon.remove_vm("vm1", release=False)
            assert "vm1" not in daemon.ownership()
            assert "is assigned to running VM" not in str(await daemon.check_devices("new", [NIC1]))


def test_history_is_a_bounded_tail_latencies_and_each_vms_last_cycle_are_kept() -> None:
    stats = CycleStats()
    # vm-old's only cycle comes first, then more cycles than the tail keeps.
    stats.record({"vm": "vm-old", "cycle": "old-1", "outcome": "stopped",
                  "stopped_reason": "identity changed", "durations": {"total_ms": 1.0}})
    n = LATENCIES_MAX + 10
    for i in range(n):
        stats.record({"vm": f"vm{i % 3}", "cycle": f"c{i}", "outcome": "resumed",
                      "durations": {"total_ms": float(i)}})
    assert len(stats.history) == HISTORY_MAX <= 1024
    assert stats.history[-1]["cycle"] == f"c{n - 1}"
    status = stats.status()
    assert status["cycles"] == n + 1
    assert status["cycle_ms"]["count"] == LATENCIES_MAX       # percentiles over the latest 10 000
    last = stats.last_of("vm-old")
    assert last is not None
    assert last["stopped_reason"] == "identity changed"       # a stop to keep, long out of the tail
    last1 = stats.last_of("vm1")
    assert last1 is not None
    assert last1["cycle"] == f"c{max(i for i in range(n) if i % 3 == 1)}"
    assert stats.last_of("nobody") is None


def test_run_raises_the_fd_soft_limit_to_the_hard_limit(tmp_path: Path) -> None:
    """``qreset run`` started with systemd's soft limit serves more VMs than 1024 fds allow."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    cfg = tmp_path / "qreset.toml"
    cfg.write_text(f'[daemon]\njournal = "{tmp_path / "journal.jsonl"}"\ncontrol_socket = ""\n'
                   f'[sim]\ntopology = "{DEMO}"\n')

    log = tmp_path / "run.log"
    with log.open("wb") as err:
        # The shell lowers the soft limit, then becomes the daemon (exec: same pid).
        proc = subprocess.Popen(
            ["sh", "-c", f'ulimit -Sn {low} && exec "$0" -m qreset run --config "$1" -v',
             sys.executable, str(cfg)],
            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while b"running:" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
    finally:
        proc.terminate()
        proc.wait(20)
    row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    want = str(hard) if hard != resource.RLIM_INFINITY else str(low)
    assert row.split()[3] == want, row
    if hard > low:
        assert f"soft limit raised from {low} to {hard}" in log.read_text()
    assert proc.returncode == 0


async def test_query_vms_asks_every_qemu_without_one_blocking_the_rest() -> None:
    """A QEMU that does not answer (SIGSTOPped) costs its bound once; the others answer."""
    with short_tmpdir() as wd, guests(wd, "vm1", "vm2", paused=True) as (g1, g2):
        cfg = make_config(wd, {"vm1": (g1, [NIC1]), "vm2": (g2, [GPU])})
        async with running(cfg, SimHost.from_toml(DEMO)) as daemon:
            assert g1.proc is not None
            g1.proc.send_signal(19)  # SIGSTOP
            try:
                rows = await asyncio.wait_for(daemon.query_vms(), 30)
            finally:
                g1.proc.send_signal(18)  # SIGCONT
            assert [(r["name"], r["status"]) for r in rows] == [("vm1", None), ("vm2", "prelaunch")]
