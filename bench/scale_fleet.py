"""
The parts of the scale bench (:mod:`bench.scale`) that run processes: the
simulated host and daemon configuration it generates, the QEMU guests, the
``qreset run`` subprocess, and a reader that follows the daemon's journal.

Guests boot :mod:`bench.firmware` (``-bios``): idle in ``hlt`` until the
bench sends ``inject-nmi`` on their *second* monitor (``ctl``), which makes
the guest write 0x06 to port 0xCF9: a real guest-initiated reset, caught by
the daemon on the first monitor (``qmp``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from bench.firmware import write_image
from qreset import qmp_events
from tests.qemu_helpers import die_with_parent, qemu_command

#: VFs per PF in the generated host (an 82599/X710-class NIC exposes 63-64).
VFS_PER_PF = 64
#: Functions per shared conventional bus: that many VMs contend for one domain lock.
SHARED_PER_BUS = 4
#: Ports QEMU need not emulate for these guests. Measured on QEMU 7.2 with the
#: firmware idle in hlt: 3 clock ticks of QEMU CPU per 10 s with the default
#: q35 (the PIT's timer keeps firing at 18.2 Hz into the masked PIC), 0 in 20 s
#: with these off: idle guests then cost nothing, whatever their number.
MACHINE = "q35,pit=off,hpet=off,usb=off,smbus=off,sata=off"
#: Guest RAM in MiB: the firmware uses the IVT and a stack below 0x7C00.
GUEST_MEM = 16


def shared_vms(n: int) -> int:
    """How many of ``n`` VMs get a function on a shared conventional bus (lock contention)."""
    return SHARED_PER_BUS * (n // 64) if n >= 64 else (SHARED_PER_BUS if n >= 16 else 0)


def topology_toml(n_vf: int, n_shared: int) -> str:
    """A simulated host: ceil(n_vf/64) SR-IOV PFs, and conventional buses of 4 functions."""
    out = ['[host]', f'description = "scale bench: {n_vf} VFs, {n_shared} functions on shared buses"',
           '', '[[function]]', 'name = "hostbridge"', 'type = "pci_device"', 'dev = 0',
           'vendor = 0x8086', 'device = 0x3e30', 'class = 0x060000', 'pm = false',
           'interrupt_pin = 0']
    dev = 1
    pfs = -(-n_vf // VFS_PER_PF)
    for p in range(pfs):
        vfs = min(VFS_PER_PF, n_vf - p * VFS_PER_PF)
        drivers = ", ".join(['"vfio-pci"'] * vfs)
        out += ['', '[[function]]', f'name = "rp{dev}"', 'type = "root_port"', f'dev = {dev}',
                'vendor = 0x8086', 'device = 0x1901', 'acs = true', 'msi = true',
                '', '[[function]]', f'name = "pf{p}"', f'parent = "rp{dev}"', 'type = "endpoint"',
                'vendor = 0x8086', 'device = 0x1572', 'class = 0x020000', 'flr = true',
                'bars = [{ size = "1M" }]', 'msix = { vectors = 8, bar = 0, table_offset = 0x8000 }',
                'driver = "i40e"',
                # X710-like: VF Routing ID = PF + 0x80 + i (offset/stride as the VF's own
                # bus can hold 64 VFs without a second bus number).
                f'sriov = {{ total_vfs = {VFS_PER_PF}, num_vfs = {vfs}, vf_device = 0x154c, '
                f'offset = 0x80, stride = 1, vf_driver = "iavf", vf_drivers = [{drivers}], '
                'vf_flr = true, vf_bars = [{ size = "64K", type = "mem64", prefetch = true }] }']
        dev += 1
    for b in range(-(-n_shared // SHARED_PER_BUS)):
        out += ['', '[[function]]', f'name = "rpc{b}"', 'type = "root_port"', f'dev = {dev}',
                'vendor = 0x8086', 'device = 0x1901', 'acs = true', 'msi = true',
                '', '[[function]]', f'name = "bridge{b}"', f'parent = "rpc{b}"',
                'type = "pcie_pci_bridge"', 'vendor = 0x1b21', 'device = 0x1080']
        for i in range(min(SHARED_PER_BUS, n_shared - b * SHARED_PER_BUS)):
            # No FLR, no PM: each function's only reset is the bus's (a shared domain).
            out += ['', '[[function]]', f'name = "conv{b}.{i}"', f'parent = "bridge{b}"',
                    'type = "pci_device"', f'dev = {i + 1}', 'vendor = 0x10ec', 'device = 0x8169',
                    'class = 0x020000', 'bars = [{ size = 256, type = "io" }]', 'pm = false',
                    'driver = "vfio-pci"', 'ready_ms = 5']
        dev += 1
    return "\n".join(out) + "\n"


@dataclass
class Plan:
    """What the bench generated for one run: files and each VM's function."""

    workdir: Path
    topology: Path
    config: Path
    journal: Path
    control: Path
    firmware: Path
    devices: dict[str, str]          # VM name -> BDF
    shared: frozenset[str]           # VMs whose function sits on a shared bus


def make_plan(workdir: Path, n: int, time_scale: float, journal_dir: Path | None = None) -> Plan:
    from qreset.pci.sim import SimHost

    n_shared = shared_vms(n)
    n_vf = n - n_shared
    topo = workdir / "host.toml"
    topo.write_text(topology_toml(n_vf, n_shared))
    names = SimHost.from_toml(topo).names()
    vfs = [str(names[f"pf{i // VFS_PER_PF}.vf{i % VFS_PER_PF}"]) for i in range(n_vf)]
    conv = [str(names[f"conv{i // SHARED_PER_BUS}.{i % SHARED_PER_BUS}"]) for i in range(n_shared)]
    devices = {f"g{i:03d}": bdf for i, bdf in enumerate(vfs + conv)}
    shared = frozenset(f"g{i:03d}" for i in range(n_vf, n))
    journal = (journal_dir or workdir) / f"journal-{workdir.name}.jsonl"
    control = workdir / "control.sock"
    lines = ["[daemon]", f'control_socket = "{control}"', f'journal = "{journal}"', "",
             "[sim]", f'topology = "{topo}"', f"time_scale = {time_scale}", "",
             "[policy]", 'mode = "park"',
             # Consent: a bus reset of a shared bus hits the other VMs' functions on it.
             "allow = [" + ", ".join(f'"{b}"' for b in conv) + "]",
             "connect_backoff_max = 1.0"]
    for vm, bdf in devices.items():
        lines += ["", "[[vm]]", f'name = "{vm}"', f'qmp = "{workdir / (vm + ".qmp")}"',
                  f'device = [{{ host = "{bdf}" }}]']
    config = workdir / "qreset.toml"
    config.write_text("\n".join(lines) + "\n")
    firmware = write_image(workdir / "firmware.bin")
    return Plan(workdir, topo, config, journal, control, firmware, devices, shared)


@dataclass
class Guest:
    name: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    ctl: QMPClient | None = None
    injected: int = 0

    @property
    def qmp(self) -> Path:
        return self.workdir / f"{self.name}.qmp"

    @property
    def ctl_path(self) -> Path:
        return self.workdir / f"{self.name}.ctl"

    @property
    def debug(self) -> Path:
        return self.workdir / f"{self.name}.debug"

    def argv(self, firmware: Path) -> list[str]:
        return [*qemu_command(), "-name", self.name, "-machine", MACHINE, "-accel", "tcg",
                "-m", str(GUEST_MEM), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                "-bios", str(firmware), "-debugcon", f"file:{self.debug}",
                "-qmp", f"unix:{self.qmp},server=on,wait=off",
                "-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off",
                "-mon", "chardev=ctl,mode=control"]

    def spawn(self, firmware: Path) -> None:
        # Popen, not asyncio's: 256 children would mean 256 child-watcher threads (3.11).
        with (self.workdir / f"{self.name}.stderr").open("wb") as err:
            # Each guest dies with the bench, however it ends (tests.qemu_helpers.die_with_parent).
            self.proc = subprocess.Popen(self.argv(firmware), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=die_with_parent())  # noqa: PLW1509 - only prctl runs in it

    def starts(self) -> int:
        """Times the firmware armed its NMI path (one ``FR`` per start on the debug console)."""
        try:
            return self.debug.stat().st_size // 2
        except FileNotFoundError:
            return 0

    def cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        return proc_cpu_seconds(self.proc.pid)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (proc(5) fields 14-15), in seconds; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Fleet:
    """N QEMU guests and the bench's own monitor connection to each (``ctl``)."""

    plan: Plan
    guests: list[Guest] = field(default_factory=list)

    async def start(self, batch: int = 8) -> float:
        """Start every guest (``batch`` at a time, so start-up does not starve the host)."""
        t0 = time.monotonic()
        names = list(self.plan.devices)
        for i in range(0, len(names), batch):
            chunk = [Guest(n, self.plan.workdir) for n in names[i:i + batch]]
            for g in chunk:
                g.spawn(self.plan.firmware)
            self.guests += chunk
            await asyncio.gather(*(self._connect(g) for g in chunk))
        return time.monotonic() - t0

    async def _connect(self, g: Guest, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if g.proc is not None and g.proc.poll() is not None:
                err = (self.plan.workdir / f"{g.name}.stderr").read_text().strip()
                raise RuntimeError(f"QEMU {g.name} exited ({g.proc.returncode}): {err}")
            if g.ctl_path.exists() and g.qmp.exists():
                # The bench reads no events on this monitor: keep none (qreset.qmp_events).
                client = qmp_events.client(f"bench-{g.name}")
                try:
                    await client.connect(str(g.ctl_path))
                    g.ctl = client
                    return
                except Exception:
                    with contextlib.suppress(Exception):
                        await client.disconnect()
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU {g.name}: no monitor socket after {timeout:.0f}s")
            await asyncio.sleep(0.05)

    async def statuses(self) -> dict[str, str]:
        async def one(g: Guest) -> tuple[str, str]:
            try:
                assert g.ctl is not None
                async with asyncio.timeout(10):
                    st = await g.ctl.execute("query-status")
                return g.name, str(st["status"]) if isinstance(st, dict) else "?"
            except Exception as exc:
                return g.name, f"unreachable ({type(exc).__name__})"
        return dict(await asyncio.gather(*(one(g) for g in self.guests)))

    async def stop(self) -> None:
        for g in self.guests:
            if g.ctl is not None:
                with contextlib.suppress(Exception):
                    await g.ctl.disconnect()
        for g in self.guests:
            if g.proc is not None and g.proc.poll() is None:
                g.proc.terminate()
        for g in self.guests:
            if g.proc is not None:
                try:
                    g.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    g.proc.kill()
                    g.proc.wait()


def raise_nofile() -> tuple[int, int]:
    """Raise our soft RLIMIT_NOFILE to the hard limit; returns the previous (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


#: The fd soft limit the daemon starts with: what systemd gives a service by default
#: (LimitNOFILE= soft 1024 since systemd 240, systemd.exec(5); the hard limit is kept).
DAEMON_NOFILE = 1024


@dataclass
class Daemon:
    """``qreset run`` as an operator starts it (a subprocess, a service's fd limit)."""

    plan: Plan
    nofile_soft: int
    #: Run the daemon with bench.scale_daemon's prototype group-commit journal.
    group_commit: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The daemon inherits the soft limit a service would get, not the bench's raised one
        # (set around the fork: preexec_fn is unsafe with threads).
        ours = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(self.nofile_soft, ours[1]), ours[1]))
        try:
            cmd = ([sys.executable, "-m", "bench.scale_daemon", "--group-commit"] if self.group_commit
                   else [sys.executable, "-m", "qreset"])
            env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            with (self.plan.workdir / "daemon.log").open("wb") as log:
                self.proc = subprocess.Popen([*cmd, "run", "--config", str(self.plan.config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, ours)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def sample(self) -> dict[str, Any]:
        """RSS (kB), open fds, the fd soft limit, CPU seconds: from /proc, as an operator would."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        limit = next(line.split()[3] for line in Path(f"/proc/{self.pid}/limits").read_text()
                     .splitlines() if line.startswith("Max open files"))
        return {"rss_kb": rss, "fds": fds, "nofile_soft": limit, "cpu_s": proc_cpu_seconds(self.pid),
                "t": time.monotonic()}

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        text = (self.plan.workdir / "daemon.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class JournalTail:
    """
    Follows the daemon's journal: new complete lines since the last read.

    Survives rotation (the file renamed and a new one started): the old file
    stays open until read to its end, then the new path is opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: Any = None
        self._ino: int | None = None
        self._buf = b""
        self.bytes = 0
        self.records = 0
        self.rotations = 0

    def read(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            if self._f is None:
                try:
                    self._f = self.path.open("rb")
                except FileNotFoundError:
                    return out
                self._ino = os.fstat(self._f.fileno()).st_ino
            chunk = self._f.read()
            if chunk:
                self.bytes += len(chunk)
                data = self._buf + chunk
                lines = data.split(b"\n")
                self._buf = lines.pop()
                for line in lines:
                    if line.strip():
                        with contextlib.suppress(json.JSONDecodeError):
                            out.append(json.loads(line))
                            self.records += 1
            try:
                ino = self.path.stat().st_ino
            except FileNotFoundError:
                return out
            if ino == self._ino:
                return out
            self._f.close()  # rotated: the old file is read to its end, follow the new one
            self._f, self._buf = None, b""
            self.rotations += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
