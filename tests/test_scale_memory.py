"""
A long-running daemon stays flat: what it keeps per cycle is bounded.

``bench.scale`` saw the daemon's RSS grow by ~5.9 KB per cycle once its
in-memory history was full; ``bench.memgrowth`` (tracemalloc, the daemon
in-process) named the sites. Each test here counts the objects or the size
of one such structure after some cycles and after more: a bounded one does
not grow between the two, an unbounded one grows with every cycle. Counts,
not RSS or wall-clock figures (those flake on a loaded host).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.message import Message

from qreset import qmp_events
from qreset.cli import client as cli_client
from qreset.control import ControlServer
from qreset.journal_read import RecoveryState
from qreset.pci import sim_fault
from qreset.pci.sim import SimHost
from tests.control_helpers import FakeBackend, sockdir
from tests.daemon_helpers import DEMO, NIC1, A, make_config, running, wait_cycles
from tests.qemu_helpers import guests, have_qemu, short_tmpdir

__all__ = ["sockdir"]  # a fixture (tests/control_helpers.py)


def live(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", ["park", "stop-on-reset"])
@pytest.mark.qemu
@pytest.mark.skipif(not have_qemu(), reason="qemu-system-x86_64 not installed")
async def test_qmp_events_are_not_kept_after_they_are_handled(mode: str) -> None:
    """
    qemu.qmp keeps every event of a connection (its default listener's unread
    queue, every listener's history): 8 Message objects per park cycle, for as
    long as the QEMU runs. The daemon's connections must keep none.
    """
    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,):
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        async with running(make_config(wd, {"vm1": (g, [NIC1])}, mode), host) as daemon:
            ctl = await g.ctl()
            try:
                await ctl.execute("cont")  # the guest now reboots itself, again and again
            finally:
                await ctl.disconnect()  # the test's own client keeps events too: gone
            await wait_cycles(daemon, "vm1", 10, timeout=60)
            messages, fds = live(Message), open_fds()
            await wait_cycles(daemon, "vm1", 40, timeout=120)
            grown = live(Message) - messages
            fds_after = open_fds()
    # 30 more cycles kept 240 Messages before the fix; a few may be in flight now.
    assert grown < 10, f"{grown} more qemu.qmp Messages alive after 30 more cycles"
    assert fds_after == fds


def test_the_simulated_hosts_logs_keep_the_newest_entries_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon on a simulated host resets for hours: its logs must not grow with each reset."""
    monkeypatch.setattr(sim_fault, "RESET_LOG_MAX", 8, raising=False)
    monkeypatch.setattr(sim_fault, "CONFIG_WRITES_MAX", 8, raising=False)
    host = SimHost.from_toml(DEMO, time_scale=0.0)

    async def go() -> None:
        for i in range(20):
            await host.reset_function(A(NIC1), "flr")
            await host.write_config(A(NIC1), 0x04, bytes([i, 0]))

    asyncio.run(go())
    assert len(host.reset_log) == 8
    assert len(host.config_writes) == 8
    assert host.config_writes[-1].data == bytes([19, 0])  # the newest are the ones kept
    assert host.reset_log == sorted(host.reset_log, key=lambda r: r.start)
    host.reset_log.clear()
    assert host.reset_log == []  # still compares and clears like the list tests read


def _fold(cycles: int, vms: int = 3) -> RecoveryState:
    state = RecoveryState()
    for n in range(cycles):
        vm = f"vm{n % vms}"
        rec: dict[str, Any] = {"vm": vm, "cycle": f"{vm}-{n}"}
        state.feed(rec | {"phase": "cycle-start"})
        state.feed(rec | {"phase": "resumed"})
    return state


def test_the_journal_fold_remembers_a_bounded_number_of_closed_cycles() -> None:
    """
    The live journal folds every record it writes (for its rotation
    checkpoints): the closed cycle ids it remembers must not grow with the
    number of cycles, only with the number of VMs.
    """
    small, big = _fold(1_000), _fold(20_000)
    grown = len(pickle.dumps(big)) - len(pickle.dumps(small))
    assert grown < 512, f"the fold grew by {grown} bytes over 19 000 more cycles"
    from qreset.journal_read import CLOSED_PER_VM

    assert big.closed_remembered() == 3 * CLOSED_PER_VM
    # What the memory was for still holds: a late record of a recently closed cycle
    # does not reopen it.
    big.feed({"vm": "vm0", "cycle": "vm0-19998", "phase": "parked"})
    assert big.unfinished() == {}


async def test_qreset_events_keeps_no_event_it_printed(sockdir: Path) -> None:
    """``qreset events`` may run for days next to a busy daemon (tens of events a second)."""
    async with ControlServer(sockdir / "c.sock", FakeBackend()) as srv:
        listener = qmp_events.Listener()
        qmp = await cli_client.connect(str(srv.path), listener)
        try:
            for n in range(200):
                srv.emit("QRESET_RESET_DONE", {"vm": "vm1", "cycle": f"c{n}"})
            got = [await asyncio.wait_for(listener.get(), 10) for _ in range(200)]
            assert got[-1]["data"] == {"vm": "vm1", "cycle": "c199"}
            assert (len(qmp.events.history), len(listener.history)) == (0, 0)
            assert qmp.events.empty()
        finally:
            await cli_client.disconnect(qmp)


async def test_control_connections_leave_no_logger_behind(sockdir: Path) -> None:
    """Each connection (a ``qreset status``, a hook call) must cost nothing once it is gone."""
    async with ControlServer(sockdir / "c.sock", FakeBackend()) as srv:

        async def once() -> None:
            qmp = await cli_client.connect(str(srv.path))
            try:
                await qmp.execute("query-status")
            finally:
                await cli_client.disconnect(qmp)

        await once()
        loggers = live(logging.Logger)
        for _ in range(30):
            await once()
        assert live(logging.Logger) == loggers


@pytest.mark.qemu
@pytest.mark.skipif(not have_qemu(), reason="qemu-system-x86_64 not installed")
async def test_vms_coming_and_going_and_qemu_restarts_leave_no_fd_behind() -> None:
    """What a libvirt host does all day: VMs added and removed, QEMUs restarted."""
    from tests.hook_helpers import daemon_on

    async def until(pred: Callable[[], bool]) -> None:
        async with asyncio.timeout(20):
            while not pred():
                await asyncio.sleep(0.02)

    with short_tmpdir() as wd, guests(wd, "vm1", paused=True) as (g,):
        async with daemon_on(wd, SimHost.from_toml(DEMO, time_scale=0.01)) as daemon:

            async def add_remove() -> None:
                await daemon.add_vm("vm1", str(g.qmp_path), [NIC1], None)
                await until(lambda: daemon.monitors["vm1"].connected)
                await daemon.remove_vm("vm1", release=False)

            await add_remove()  # warm: first-use allocations (loggers, the journal's fd)
            fds = open_fds()
            for _ in range(5):
                await add_remove()
            after_add_remove = open_fds()
            await daemon.add_vm("vm1", str(g.qmp_path), [NIC1], None)
            await until(lambda: daemon.monitors["vm1"].connected)
            monitor = daemon.monitors["vm1"]
            for _ in range(3):  # QEMU dies and comes back: the monitor reconnects
                connects = monitor.connects
                g.kill()
                g.start()
                await g.await_sockets()
                await until(lambda: monitor.connects > connects and monitor.connected)  # noqa: B023
            await daemon.remove_vm("vm1", release=False)
            after_restarts = open_fds()
    assert (after_add_remove, after_restarts) == (fds, fds)
