"""
``qreset launch [OPTIONS] -- qemu-system-x86_64 ARGS...``: run QEMU with qreset beside it.

For hosts without libvirt: one command starts QEMU and makes sure its guest
resets are coordinated from the first instruction on.

1. QEMU gets two extra QMP monitors (``-chardev socket,...,server=on,wait=off
   -mon chardev=...,mode=control``): ``NAME.qmp`` for the daemon and
   ``NAME.launch.qmp`` for this command, and ``-S`` (unless given) so the
   guest does not run before qreset watches it.
2. The VM is registered with the running daemon (``add-vm`` on its control
   socket) with its assigned devices: every ``-device vfio-pci,host=BDF``
   (or ``sysfsdev=/sys/bus/pci/devices/BDF``) in the QEMU arguments plus
   each ``--device BDF``. When no daemon answers, an embedded one is run in
   this process for this VM alone, from ``--config`` (or
   ``/etc/qreset/qreset.toml`` if it exists, else the built-in defaults),
   with its control socket at ``NAME.control.sock`` beside the QMP sockets
   (``qreset status --socket ...`` works) so it never takes the place of
   the host's daemon.
3. Once the daemon reports the VM's monitor connected, ``cont`` starts the
   guest (only when ``-S`` was added here).
4. SIGINT/SIGTERM/SIGHUP are forwarded to QEMU (which exits cleanly on them);
   when QEMU exits the VM is deregistered (``remove-vm``; with ``release``
   unless ``--no-release``: its devices are reset for the host) and this
   command exits with QEMU's exit code (128+N when QEMU died of signal N).

qreset's messages go to stderr; stdout and stdin stay QEMU's. QEMU's command
line is read in :mod:`qreset.cli.launch_qemu`, the daemon found or embedded in
:mod:`qreset.cli.launch_daemon`; this module runs QEMU between them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qreset.cli.launch_daemon import DEFAULT_CONFIG, LaunchError, find_coordinator, load_config, socket_ok
from qreset.cli.launch_qemu import exit_code, has_flag, monitor_args, qemu_name, vfio_devices

if TYPE_CHECKING:
    from qreset.config import Config

logger = logging.getLogger(__name__)

RUN_DIR = Path("/run/qreset")
#: Seconds to wait for QEMU's sockets, and then for the daemon to connect to the VM.
START_TIMEOUT = 30.0
#: What VmSection accepts as a name (qreset.config).
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n")[1] if __doc__ else None
    parser.usage = "qreset launch [OPTIONS] -- QEMU [QEMU ARGS...]"
    parser.epilog = (
        "example:\n"
        "  qreset launch --name vm1 -- qemu-system-x86_64 -machine q35,accel=kvm -m 4G \\\n"
        "      -device vfio-pci,host=0000:01:00.0 -device vfio-pci,host=0000:01:00.1 ..."
    )
    parser.add_argument("--config", type=Path, default=None,
                        help=f"configuration for an embedded daemon (default: {DEFAULT_CONFIG} if present)")
    parser.add_argument("--socket", default=None,
                        help="the daemon's control socket (default: $QRESET_SOCKET, else the config's, "
                             "else /run/qreset/qreset.sock)")
    parser.add_argument("--name", default=None,
                        help="VM name (default: QEMU's -name, else qemu-PID)")
    parser.add_argument("--mode", choices=("park", "stop-on-reset"), default=None,
                        help="how guest resets are caught (default: the daemon's policy, park)")
    parser.add_argument("--device", action="append", default=[], metavar="BDF",
                        help="a host PCI function the VM uses that QEMU's arguments do not name")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help=f"where the QMP sockets go (default: {RUN_DIR} if writable, else a temp dir)")
    parser.add_argument("--start-timeout", type=float, default=START_TIMEOUT, metavar="SECONDS",
                        help="for QEMU's sockets to appear, then for the daemon to connect "
                             "(default: %(default)s)")
    parser.add_argument("--no-release", dest="release", action="store_false",
                        help="do not reset the VM's devices for the host when QEMU exits")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (stderr)")
    parser.add_argument("qemu", nargs=argparse.REMAINDER, help="-- then the QEMU command line")


# --------------------------------------------------------------------------
# Paths


def run_dir(given: Path | None) -> tuple[Path, bool]:
    """
    --run-dir, else /run/qreset when we can write there, else a private temp
    dir; and whether it was made here for this run (then it is removed at exit).
    """
    if given is not None:
        given = given.absolute()  # add-vm takes absolute socket paths only (a daemon has its own cwd)
        try:
            given.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LaunchError(f"--run-dir {given}: {exc.strerror or exc}") from None
        return given, False
    try:
        RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.access(RUN_DIR, os.W_OK | os.X_OK):
            return RUN_DIR, False
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="qreset-")), True


def _in_use(path: Path) -> bool:
    """Whether something listens on the unix socket ``path`` (a stale file does not count)."""
    import socket

    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)  # a live server accepts at once; bounds a hung one
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------
# The run


def _say(message: str) -> None:
    print(f"qreset launch: {message}", file=sys.stderr, flush=True)


async def _wait_path(path: Path, proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """True once ``path`` exists; False if QEMU exited first. Raises TimeoutError."""
    async with asyncio.timeout(timeout):
        while not path.exists():
            if proc.returncode is not None:
                return False
            await asyncio.sleep(0.02)  # QEMU creates its sockets within ms of starting
    return True


async def _cont(path: Path) -> None:
    from qemu.qmp import QMPClient

    client = QMPClient("qreset-launch")
    try:
        await client.connect(str(path))
        await client.execute("cont")
    finally:
        await client.disconnect()


async def _launch(args: argparse.Namespace, qemu_argv: list[str]) -> int:
    from qreset.errors import QResetError

    cfg = load_config(args.config)
    name = args.name or qemu_name(qemu_argv) or f"qemu-{os.getpid()}"
    if not _NAME_RE.match(name):
        raise LaunchError(f"VM name {name!r}: use 1-64 of A-Z a-z 0-9 _ . : + - (--name)")
    from qreset.pci.address import PciAddress

    devices: list[str] = []
    for bdf in [*vfio_devices(qemu_argv), *args.device]:
        try:
            devices.append(str(PciAddress.parse(bdf)))
        except QResetError as exc:
            raise LaunchError(f"device {bdf!r}: {exc}") from None
    rundir, temporary = run_dir(args.run_dir)
    try:
        return await _run(args, qemu_argv, cfg, name, devices, rundir)
    finally:
        if temporary:
            shutil.rmtree(rundir, ignore_errors=True)


async def _run(args: argparse.Namespace, qemu_argv: list[str], cfg: Config, name: str,
               devices: list[str], rundir: Path) -> int:
    from qreset.errors import QResetError

    qmp, own = rundir / f"{name}.qmp", rundir / f"{name}.launch.qmp"
    for path in (qmp, own):
        socket_ok(path)
        if _in_use(path):
            raise LaunchError(f"{path} is in use: is a VM named {name!r} already running?")

    coordinator = await find_coordinator(args, cfg, rundir, name)
    added_s = not has_flag(qemu_argv, "S")
    argv = [*qemu_argv, *monitor_args("qreset0", qmp), *monitor_args("qreset1", own),
            *(["-S"] if added_s else [])]
    registered = False
    loop = asyncio.get_running_loop()
    proc: asyncio.subprocess.Process | None = None
    try:
        try:
            proc = await asyncio.create_subprocess_exec(*argv)
        except OSError as exc:
            raise LaunchError(f"cannot run {qemu_argv[0]}: {exc.strerror or exc}") from None

        def forward(sig: signal.Signals) -> None:
            if proc is not None and proc.returncode is None:
                logger.info("forwarding %s to QEMU (pid %d)", sig.name, proc.pid)
                proc.send_signal(sig)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, forward, sig)
        try:
            sockets = all([await _wait_path(p, proc, args.start_timeout) for p in (qmp, own)])
        except TimeoutError:
            # With -S added the guest would wait for a cont that cannot come: stop QEMU (finally).
            raise LaunchError(
                f"QEMU created no QMP socket at {qmp} within {args.start_timeout:g} s") from None
        if sockets:
            try:
                await coordinator.add(name, qmp, devices, args.mode)
                registered = True
                async with asyncio.timeout(args.start_timeout):
                    while not await coordinator.connected(name) and proc.returncode is None:
                        await asyncio.sleep(0.05)  # a query-vms round trip per 50 ms
                _say(f"{name}: registered with the {coordinator.where}"
                     + (f", devices {', '.join(devices)}" if devices else ", no assigned devices"))
            except (QResetError, TimeoutError) as exc:
                why = str(exc) or f"the daemon did not connect within {args.start_timeout:g} s"
                _say(f"{name}: guest resets are NOT coordinated: {why}")
            if added_s and proc.returncode is None:
                try:
                    await _cont(own)
                except Exception as exc:
                    # Never leave the guest waiting in prelaunch with nobody to start it.
                    _say(f"{name}: cannot start the guest's CPUs (cont on {own}): {exc}; stopping QEMU")
                    proc.terminate()
        returncode = await proc.wait()
    finally:
        if proc is not None and proc.returncode is None:
            # We are failing (or being cancelled) with QEMU still up: do not orphan it.
            proc.terminate()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)  # QEMU exits on SIGTERM in ms; bound a hung one
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if registered:
            try:
                result = await coordinator.remove(name, args.release)
                released = result.get("released")
                if isinstance(released, dict):
                    ok = released.get("ok")
                    _say(f"{name}: devices released to the host ({'clean' if ok else 'NOT clean'})")
            except QResetError as exc:
                _say(f"{name}: deregistering failed: {exc}")
        await coordinator.close()
    code = exit_code(returncode)
    logger.info("QEMU exited with %d", code)
    return code


def run(args: argparse.Namespace) -> int:
    from qreset.errors import QResetError

    qemu_argv: list[str] = list(args.qemu)
    if qemu_argv[:1] == ["--"]:
        qemu_argv = qemu_argv[1:]
    if not qemu_argv:
        print("qreset: launch: give the QEMU command line after --", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="qreset launch: %(name)s: %(message)s", stream=sys.stderr,
    )
    # qemu.qmp logs QEMU's hang-up at exit as an error; the daemon reports it in its own words.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if args.verbose > 2 else logging.CRITICAL)
    try:
        return asyncio.run(_launch(args, qemu_argv))
    except QResetError as exc:  # LaunchError included
        print(f"qreset: launch: {exc}", file=sys.stderr)
        return 2
