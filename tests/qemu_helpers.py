"""
Real QEMU guests for the daemon's tests, the demo and the bench.

Each :class:`QemuGuest` is a ``qemu-system-x86_64 -machine q35 -accel tcg``
process booting the self-rebooting boot sector (:mod:`tests.guest`), with two
QMP monitors: ``qmp`` for the daemon (the one a configuration names) and
``ctl`` for the test itself, so a test can watch and poke QEMU without
sharing the daemon's connection (a QMP socket serves one client at a time).
Sockets live in a short directory under /tmp: ``sun_path`` holds 108 bytes
and pytest's tmp paths can be longer.

Which QEMU: ``$QRESET_QEMU`` (a path to a ``qemu-system-x86_64``) or the one on
``PATH``; ``$QRESET_QEMU_DATADIRS`` (``:``-separated) adds ``-L`` firmware
directories for a QEMU unpacked into a private prefix (scripts/qemu10: QEMU
10.0 needs SeaBIOS 1.16.3, Debian 12's 1.16.2 never runs the guest).

Every QEMU a test starts dies with it: the child asks the kernel for SIGKILL
when its parent dies (PR_SET_PDEATHSIG: a pytest killed by SIGKILL or by
pytest-timeout's thread method), and tests/conftest.py kills at each test's
teardown whatever guest the test left running (a failed assert, or
pytest-timeout's signal method, which runs finalizers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

from tests.guest import count_boots, write_boot_image

QEMU = os.environ.get("QRESET_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
#: ``-L`` firmware directories for a QEMU outside the host's packages (searched in this order).
QEMU_DATADIRS = [d for d in os.environ.get("QRESET_QEMU_DATADIRS", "").split(":") if d]


def have_qemu() -> bool:
    return shutil.which(QEMU) is not None


def qemu_command() -> list[str]:
    """``qemu-system-x86_64`` and its ``-L`` options: the start of every test's QEMU command line."""
    return [QEMU, *(arg for d in QEMU_DATADIRS for arg in ("-L", d))]


# -- processes die with the test -----------------------------------------------------------------

#: linux/prctl.h
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the thread that spawned it exits.

    prctl(2): the "parent" is the spawning *thread*, so spawn from the main
    thread (:func:`check_main_thread`); a child whose parent died before the
    prctl took effect exits at once (its parent pid is no longer ours).
    """
    parent = os.getpid()

    def preexec() -> None:
        if _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:
            os._exit(0)

    return preexec


def check_main_thread(what: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"{what}: spawn test processes from the main thread "
                           "(PR_SET_PDEATHSIG fires when the spawning thread exits)")


#: Processes tests started that must not outlive the test, by pid.
_LIVE: dict[int, QemuGuest | subprocess.Popen[bytes] | int] = {}


def track(proc: subprocess.Popen[bytes] | int) -> None:
    """Have the test's teardown stop ``proc`` (a Popen, or the pid of an asyncio child) if it still runs."""
    _LIVE[proc if isinstance(proc, int) else proc.pid] = proc


def _stop_pid(pid: int) -> bool:
    """SIGTERM, then SIGKILL after 5 s, a child that ``waitpid`` says still runs; whether it ran.

    A pid ``waitpid`` does not know (asyncio's child watcher reaped it) is left alone:
    it may belong to another process by now.
    """
    def running() -> bool:
        try:
            return os.waitpid(pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    if not running():
        return False
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not running():
            return True
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return True


def reap_leftovers() -> list[str]:
    """Stop every guest or tracked process still running; what was stopped (conftest's teardown)."""
    stopped = []
    for pid, what in list(_LIVE.items()):
        del _LIVE[pid]
        if isinstance(what, QemuGuest):
            if what.running:
                what.stop()
                stopped.append(f"QEMU {what.name} (pid {pid})")
        elif isinstance(what, subprocess.Popen):
            if what.poll() is None:
                what.terminate()
                try:
                    what.wait(5)
                except subprocess.TimeoutExpired:
                    what.kill()
                    what.wait(5)
                stopped.append(f"pid {pid}")
        elif _stop_pid(pid):
            stopped.append(f"pid {pid}")
    return stopped


@contextlib.contextmanager
def short_tmpdir(prefix: str = "qr") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class QemuGuest:
    """One QEMU process; :meth:`start` it, :meth:`stop` (or :meth:`kill`) it."""

    name: str
    workdir: Path
    #: Start with -S (prelaunch, vCPUs stopped until someone sends ``cont``).
    paused: bool = False
    #: More QEMU arguments (e.g. ``-device`` for the inventory test).
    extra: list[str] = field(default_factory=list)
    #: What the disk holds (tests.guest.write_boot_image): "reboot", "poweroff", or
    #: "blank" (the firmware enumerates PCI, finds nothing to boot and waits).
    program: str = "reboot"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def qmp_path(self) -> Path:
        return self.workdir / f"{self.name}.qmp"

    @property
    def ctl_path(self) -> Path:
        return self.workdir / f"{self.name}.ctl"

    @property
    def debug_log(self) -> Path:
        return self.workdir / f"{self.name}.debug"

    @property
    def image(self) -> Path:
        return self.workdir / f"{self.name}.img"

    def argv(self) -> list[str]:
        return [
            *qemu_command(), "-name", self.name,
            "-machine", "q35", "-accel", "tcg", "-m", "64", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-user-config",
            "-drive", f"file={self.image},format=raw,if=ide",
            "-debugcon", f"file:{self.debug_log}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off",
            "-mon", "chardev=ctl,mode=control",
            *(["-S"] if self.paused else []),
            *self.extra,
        ]

    def start(self) -> QemuGuest:
        if not self.image.exists():
            write_boot_image(self.image, self.program)
        for p in (self.qmp_path, self.ctl_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        check_main_thread(f"QEMU {self.name}")
        with open(self.workdir / f"{self.name}.stderr", "ab") as stderr:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                preexec_fn=die_with_parent(signal.SIGKILL),  # noqa: PLW1509 - only prctl runs in it
            )
        _LIVE[self.proc.pid] = self
        return self

    def wait_sockets(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.qmp_path.exists() and self.ctl_path.exists()):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"QEMU {self.name} exited with {self.proc.returncode}: "
                                   f"{(self.workdir / f'{self.name}.stderr').read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU {self.name}: no QMP socket after {timeout}s")
            time.sleep(0.02)

    async def await_sockets(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.wait_sockets, timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: QEMU dies without a word, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def boots(self) -> int:
        return count_boots(self.debug_log)

    async def ctl(self) -> QMPClient:
        """A connected client on the test's own monitor (disconnect it when done).

        Retries a failed negotiation: QEMU may send an event of the rebooting
        guest before its reply to ``qmp_capabilities``, which qemu.qmp's
        negotiation does not expect (seen with QEMU 7.2 and qemu.qmp 0.0.6).
        """
        for attempt in range(10):
            client = QMPClient(f"ctl-{self.name}")
            try:
                await client.connect(str(self.ctl_path))
                return client
            except ConnectError:
                if attempt == 9:
                    raise
                await asyncio.sleep(0.05)
        raise AssertionError("unreachable")


async def status(client: QMPClient) -> str:
    reply = await client.execute("query-status")
    assert isinstance(reply, dict)
    return str(reply["status"])


@contextlib.contextmanager
def guests(workdir: Path, *names: str, paused: bool = False) -> Iterator[list[QemuGuest]]:
    """Start QEMU guests; always stop them (even when the test fails)."""
    started = [QemuGuest(n, workdir, paused=paused) for n in names]
    try:
        for g in started:
            g.start()
        for g in started:
            g.wait_sockets()
        yield started
    finally:
        for g in started:
            g.stop()


def cpu_count() -> int:
    return os.cpu_count() or 1


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The daemon's journal records; a last line torn by SIGKILL is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def wait_journal_record(path: Path, pred: Callable[[dict[str, Any]], object],
                        timeout: float) -> dict[str, Any]:
    """Poll ``path`` until a record satisfies ``pred`` (blocking: run it in a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for rec in read_journal(path):
                if pred(rec):
                    return rec
        time.sleep(0.01)
    raise TimeoutError(f"no matching journal record in {path}")
