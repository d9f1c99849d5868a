"""
``qreset launch -- qemu-system-x86_64 ...`` with the self-rebooting guest (real QEMU, TCG).

``qreset launch`` runs as a subprocess, as a user would run it; it either
registers the VM with a daemon that is already running (here in-process, so
the test can read the simulated host's reset log) or embeds one (configured
by a file with ``[sim]``). Signals go to the launch process only, so what
reaches QEMU is what launch forwarded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from qreset.cli.launch_qemu import exit_code, qemu_name, vfio_devices
from qreset.pci.address import PciAddress
from qreset.pci.sim import SimHost
from qreset.qmpsync import call
from tests.conftest import ROOT
from tests.daemon_helpers import DEMO, GPU, GPU_AUDIO, NIC1
from tests.guest import count_boots, write_boot_image
from tests.hook_helpers import daemon_on
from tests.qemu_helpers import die_with_parent, have_qemu, qemu_command, short_tmpdir, track

needs_qemu = pytest.mark.skipif(not have_qemu(),
                                reason="qemu-system-x86_64 not installed (scripts/install-deps)")


def test_vfio_devices_from_qemu_arguments() -> None:
    argv = [
        "qemu-system-x86_64", "-device", "vfio-pci,host=0000:01:00.0,id=hostdev0,bus=pci.1",
        "-device", "driver=vfio-pci,host=03:00.1,multifunction=on",
        "--device=vfio-pci,sysfsdev=/sys/bus/pci/devices/0000:06:01.0",
        "-device", "virtio-net-pci,netdev=n0,host=0000:09:00.0",   # not vfio-pci: ignored
        "-netdev", "user,id=n0", "-device",                        # a trailing flag without value
    ]
    assert vfio_devices(argv) == ["0000:01:00.0", "03:00.1", "0000:06:01.0"]


@pytest.mark.parametrize(("argv", "name"), [
    (["-name", "vm1"], "vm1"),
    (["-name", "guest=vm2,debug-threads=on"], "vm2"),
    (["-name=vm3,process=qemu-vm3"], "vm3"),
    (["-m", "64"], None),
])
def test_qemu_name(argv: list[str], name: str | None) -> None:
    assert qemu_name(argv) == name


def test_exit_code_like_a_shell() -> None:
    assert exit_code(0) == 0
    assert exit_code(1) == 1
    assert exit_code(-signal.SIGKILL) == 137
    assert exit_code(-signal.SIGTERM) == 143


def qemu_argv(workdir: Path, name: str, *extra: str) -> list[str]:
    image = workdir / f"{name}.img"
    if not image.exists():
        write_boot_image(image)
    return [*qemu_command(), "-name", name, "-machine", "q35", "-accel", "tcg", "-m", "64", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-user-config",
            "-drive", f"file={image},format=raw,if=ide", "-debugcon", f"file:{workdir / name}.debug",
            *extra]


async def launch(workdir: Path, *options: str, qemu_args: list[str]) -> asyncio.subprocess.Process:
    # SIGTERM when the test dies: launch then stops its QEMU (tests/qemu_helpers.die_with_parent).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qreset", "launch", "--run-dir", str(workdir), *options, "--", *qemu_args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT, preexec_fn=die_with_parent(signal.SIGTERM),
    )
    track(proc.pid)
    return proc


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def finish(proc: asyncio.subprocess.Process, timeout: float = 60) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def poll(what: Any, timeout: float = 60) -> Any:
    """Call ``what()`` (sync or async) until it returns something truthy."""
    async with asyncio.timeout(timeout):
        while True:
            value = what()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.05)


@needs_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_launch_registers_with_the_running_daemon(sig: signal.Signals) -> None:
    with short_tmpdir() as wd:
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        async with daemon_on(wd, host) as daemon:
            # QEMU cannot open a vfio-pci device here: the devices are given by --device
            # (the -device vfio-pci parsing is tested on arguments alone, above).
            proc = await launch(wd, "--socket", str(wd / "c.sock"), "--device", NIC1, "--device", GPU,
                                "--device", GPU_AUDIO, qemu_args=qemu_argv(wd, "vm1"))
            try:
                monitor = await poll(lambda: daemon.monitors.get("vm1"), 30)
                assert monitor.mode.value == "park"
                assert {str(a) for a in monitor.owned} >= {NIC1, GPU, GPU_AUDIO}
                await poll(lambda: monitor.cycles >= 4, 60)
                shown = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "qreset", "status", "--socket", str(wd / "c.sock"),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
                status_rc, status_out, _err = await finish(shown)
                [qemu_pid] = children(proc.pid)
                mark = len(host.reset_log)
                proc.send_signal(sig)           # to launch only: it must forward it
                rc, out, err = await finish(proc)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            history = [c for c in daemon.history if c["vm"] == "vm1"]
            released = host.reset_log[mark:]
            assert "vm1" not in daemon.monitors
    assert rc == 0, err
    assert out == ""
    assert not alive(qemu_pid)
    # qreset status shows the daemon's counters, percentile blocks as k=v.
    assert status_rc == 0
    lines = {line.split()[0]: line.split()[1:] for line in status_out.splitlines()[1:] if line.strip()}
    assert int(lines["cycles"][0]) >= 4
    methods = dict(pair.split("=") for pair in lines["resets_by_method"])
    # One FLR (NIC) and one bus reset below 00:03.0 (the rp's reset_subordinate) per cycle.
    assert set(methods) == {"flr", "reset_subordinate"}
    assert int(methods["flr"]) == int(methods["reset_subordinate"]) == int(lines["cycles"][0])
    assert re.fullmatch(r"count=\d+ p50=[\d.]+ p90=[\d.]+ p99=[\d.]+ max=[\d.]+", " ".join(lines["cycle_ms"]))
    assert f"vm1: registered with the daemon at {wd / 'c.sock'}, devices {NIC1}, {GPU}, {GPU_AUDIO}" in err
    assert "vm1: devices released to the host (clean)" in err
    done = [c for c in history if c["outcome"] != "poweroff"]
    assert len(done) >= 4
    assert all(c["outcome"] == "resumed" for c in done[:4]), done[:4]
    for dev in (NIC1, GPU, GPU_AUDIO):
        assert any(PciAddress.parse(dev) in r.affected for r in released), dev


@needs_qemu
@pytest.mark.qemu
async def test_launch_embeds_a_daemon_when_none_runs() -> None:
    with short_tmpdir() as wd:
        cfg = wd / "qreset.toml"
        cfg.write_text(
            f'[daemon]\njournal = "journal.jsonl"\ncontrol_socket = "{wd / "absent.sock"}"\n'
            f'[sim]\ntopology = "{DEMO}"\ntime_scale = 0.01\n[policy]\nconnect_backoff_max = 0.3\n')
        proc = await launch(wd, "--config", str(cfg), "--device", NIC1, "--mode", "stop-on-reset",
                            qemu_args=qemu_argv(wd, "vm1"))
        try:
            control = str(wd / "vm1.control.sock")

            async def cycles() -> int:
                try:
                    vms = await asyncio.to_thread(call, control, "query-vms", 5.0)
                except Exception:
                    return 0
                return int(vms[0]["cycles"]) if vms else 0

            await poll(lambda: _at_least(cycles, 4), 60)
            status = await asyncio.to_thread(call, control, "query-status", 5.0)
            [qemu_pid] = children(proc.pid)
            proc.send_signal(signal.SIGTERM)
            rc, out, err = await finish(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        records = [json.loads(line) for line in (wd / "journal.jsonl").read_text().splitlines()]
        boots = count_boots(wd / "vm1.debug")
    assert rc == 0, err
    assert out == ""
    assert not alive(qemu_pid)
    assert "registered with the embedded daemon" in err
    assert status["vms"] == 1
    assert status["cycles"] >= 4
    assert status["resets_by_method"].get("flr", 0) >= 4
    resumed = [r for r in records if r.get("phase") == "resumed"]
    assert len(resumed) >= 4
    assert all(r["vm"] == "vm1" for r in resumed)
    assert boots >= 1
    assert not Path(control).exists()       # the embedded daemon closed its socket


async def _at_least(counter: Any, n: int) -> bool:
    return bool(await counter() >= n)


@needs_qemu
@pytest.mark.qemu
async def test_exit_codes_are_qemu_s() -> None:
    with short_tmpdir() as wd:
        cfg = wd / "qreset.toml"
        cfg.write_text(f'[daemon]\njournal = "journal.jsonl"\ncontrol_socket = ""\n'
                       f'[sim]\ntopology = "{DEMO}"\ntime_scale = 0.01\n')
        # QEMU refuses its arguments: exit 1, at once, nothing left behind.
        proc = await launch(wd, "--config", str(cfg), qemu_args=[*qemu_argv(wd, "bad"), "-no-such-option"])
        rc, out, err = await finish(proc)
        assert (rc, out) == (1, "")
        assert "no-such-option" in err
        # QEMU killed from outside: 128 + SIGKILL, as a shell reports it.
        proc = await launch(wd, "--config", str(cfg), qemu_args=qemu_argv(wd, "vm1"))
        try:
            qemu_pid = (await poll(lambda: children(proc.pid), 30))[0]
            await poll(lambda: (wd / "vm1.qmp").exists() and (wd / "vm1.launch.qmp").exists(), 30)
            os.kill(qemu_pid, signal.SIGKILL)
            rc, _out, err = await finish(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert rc == 128 + signal.SIGKILL, err


async def test_bad_invocations_exit_2() -> None:
    with short_tmpdir() as wd:
        rc, _out, err = await finish(await launch(wd, qemu_args=[]))
        assert rc == 2
        assert "give the QEMU command line after --" in err
        rc, _out, err = await finish(await launch(wd, "--name", "no/slash", qemu_args=["true"]))
        assert rc == 2
        assert "VM name 'no/slash'" in err
        rc, _out, err = await finish(await launch(wd, "--device", "01:00", qemu_args=["true"]))
        assert rc == 2
        assert "device '01:00'" in err


async def test_an_embedded_daemon_gets_run_s_preflight_checks() -> None:
    """A configuration `qreset run` refuses is refused by launch's embedded daemon too, before QEMU."""
    with short_tmpdir() as wd:
        (wd / "journal-dir").mkdir()
        cfg = wd / "qreset.toml"
        cfg.write_text(f'[daemon]\njournal = "journal-dir"\ncontrol_socket = ""\n'
                       f'[sim]\ntopology = "{DEMO}"\ntime_scale = 0.01\n')
        marker = wd / "qemu-started"
        rc, _out, err = await finish(await launch(wd, "--config", str(cfg),
                                                  qemu_args=["touch", str(marker)]))
        assert rc == 2, err
        assert "daemon.journal" in err, err
        assert "directory" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not marker.exists()          # QEMU was never started
        cfg.write_text(f'[daemon]\njournal = "journal.jsonl"\ncontrol_socket = ""\n'
                       f'[sim]\ntopology = "{DEMO}"\ntime_scale = 0.01\n'
                       '[[vm]]\nname = "other"\nqmp = "other.qmp"\n[[vm.device]]\nhost = "0000:7f:1f.7"\n')
        rc, _out, err = await finish(await launch(wd, "--config", str(cfg),
                                                  qemu_args=["touch", str(marker)]))
        assert rc == 2, err
        assert "0000:7f:1f.7" in err, err
        assert not marker.exists()


async def test_a_qemu_that_never_opens_its_sockets_is_stopped() -> None:
    with short_tmpdir() as wd:
        cfg = wd / "qreset.toml"
        cfg.write_text(f'[daemon]\njournal = "journal.jsonl"\ncontrol_socket = ""\n'
                       f'[sim]\ntopology = "{DEMO}"\ntime_scale = 0.01\n')
        # Not QEMU at all: it ignores the monitor options it is given.
        proc = await launch(wd, "--config", str(cfg), "--name", "vm1", "--start-timeout", "1",
                            qemu_args=["sh", "-c", "exec sleep 60", "not-qemu"])
        child = (await poll(lambda: children(proc.pid), 10))[0]
        rc, out, err = await finish(proc, 30)
        assert (rc, out) == (2, "")
        assert f"QEMU created no QMP socket at {wd / 'vm1.qmp'} within 1 s" in err
        assert not alive(child)
