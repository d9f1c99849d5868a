"""
A real libvirtd inside the lab VM (Debian's ``libvirt-daemon-system``), run without systemd.

The lab's root is the host's ``/`` read-only over 9p, so everything libvirt
writes gets a tmpfs copy: ``/etc/libvirt``, ``/var/lib/libvirt``,
``/var/cache/libvirt``, ``/var/log/libvirt`` (``/run`` is a tmpfs already).
``qemu.conf`` takes libvirt out of what the lab does not have (facts from the
runs in issue "Under libvirt, for real"): no systemd, dbus, udev or cgroupfs,
so QEMU runs as root with no security driver, no cgroups, no namespaces, and
its stdio goes to a file instead of virtlogd.

Probing QEMU's capabilities takes about 35 s under nested TCG; libvirt keeps
the result in ``/var/cache/libvirt/qemu/capabilities``. The lab carries that
directory across runs through its results share (``libvirt-caps`` there;
``scripts/lab/run`` stages it from and saves it to ``.cache/lab/``), and
libvirt re-probes on its own when the cached data no longer matches the
binary.

qreset's hook is installed as libvirt finds it: ``scripts/libvirt-hook``
copied to ``/etc/libvirt/hooks/qemu.d/qreset``. libvirt runs hooks with only
``LC_ALL=C``, ``PATH`` and ``HOME`` in the environment (so the hook finds the
daemon by its fixed socket path); libvirtd's own ``PATH`` is passed on, and
the lab starts libvirtd with the repo's venv first on it, the way an operator
who installed qreset into ``/usr/local/bin`` has it on PATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qreset.pci.address import PciAddress
from tests.lab.labhost import OUT, QRESET, REPO, qreset

#: Directories libvirt writes to: each gets a writable tmpfs copy of itself.
WRITABLE = ("/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
CAPS = Path("/var/cache/libvirt/qemu/capabilities")
CAPS_SAVED = OUT / "libvirt-caps"
LOG = Path("/var/log/libvirt/libvirtd.log")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
HOOK = Path("/etc/libvirt/hooks/qemu.d/qreset")
URI = "qemu:///system"
# The venv running the lab: the repo's .venv on bookworm, the stack root's own
# on trixie (scripts/lab/build-root), whose python the repo's .venv is not.
VENV_BIN = Path(sys.executable).parent

QEMU_CONF = """\
# qreset lab: libvirt without systemd, dbus, udev or cgroupfs (see tests/lab/libvirtlab.py)
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

LIBVIRTD_CONF = """\
# qreset lab: root only, over the local socket, no polkit (no dbus in the lab)
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
log_filters = "1:qemu.qemu_process 1:qemu.qemu_hotplug 3:util.virpci 1:util.hook"
"""


def _tmpfs_copy(path: str) -> None:
    """Put a writable tmpfs over ``path`` that starts with what ``path`` held."""
    src = Path(path)
    keep = Path("/tmp/libvirt-lab-orig") / path.strip("/").replace("/", "_")
    if keep.exists():
        shutil.rmtree(keep)
    if src.exists():
        shutil.copytree(src, keep, symlinks=True)
    else:
        keep.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "libvirt-lab", str(src)], check=True)
    shutil.copytree(keep, src, symlinks=True, dirs_exist_ok=True)


def virsh(*args: str, check: bool = True, timeout: float = 180) -> str:
    proc = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def domstate(name: str, settle: float = 15.0) -> str:
    """``virsh domstate --reason``, e.g. ``running (booted)`` or ``shut off (crashed)``.

    In stop-on-reset mode qreset stops the guest for each cycle, and libvirt
    shows every such stop as ``paused (unknown)`` until qreset's ``cont``
    (seen in the lab: about a second per cycle under nested TCG). A state
    read in that window is waited out for up to ``settle`` seconds; anything
    else is returned at once.
    """
    deadline = time.monotonic() + settle
    while True:
        state = virsh("domstate", name, "--reason", check=False)
        if state != "paused (unknown)" or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


@dataclass
class Libvirtd:
    """A running libvirtd (``proc``) and where to look at what it did."""

    proc: subprocess.Popen[bytes]
    started_s: float

    def log(self) -> str:
        return LOG.read_text(errors="replace") if LOG.exists() else ""

    def qemu_log(self, domain: str) -> str:
        path = QEMU_LOG_DIR / f"{domain}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def restart(self) -> None:
        """SIGTERM libvirtd and start it again: it reconnects to running guests (hook ``reconnect``)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        fresh = _start_libvirtd()
        self.proc, self.started_s = fresh.proc, fresh.started_s


def _start_libvirtd() -> Libvirtd:
    t0 = time.monotonic()
    env = {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LC_ALL": "C"}
    out = open(Path("/var/log/libvirt/libvirtd.stdio"), "ab")  # noqa: SIM115 (the daemon keeps it)
    proc = subprocess.Popen(["libvirtd", "-f", "/etc/libvirt/libvirtd.conf"], env=env,
                            stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    sock = Path("/run/libvirt/libvirt-sock")
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"libvirtd did not start ({proc.returncode}): "
                                 + Path("/var/log/libvirt/libvirtd.stdio").read_text()[-3000:])
        time.sleep(0.1)
    # The first connection makes libvirt probe (or load the cached) QEMU capabilities.
    virsh("version", timeout=300)
    return Libvirtd(proc, time.monotonic() - t0)


@contextlib.contextmanager
def libvirtd() -> Iterator[Libvirtd]:
    """Set libvirt up in the lab and run libvirtd until the block ends (caps cache saved back)."""
    fd = Path("/dev/fd")
    if not fd.exists():  # busybox devtmpfs has none: bash process substitution needs it
        fd.symlink_to("/proc/self/fd")
    for path in WRITABLE:
        _tmpfs_copy(path)
    Path("/etc/libvirt/qemu.conf").write_text(QEMU_CONF)
    Path("/etc/libvirt/libvirtd.conf").write_text(LIBVIRTD_CONF)
    Path("/run/libvirt").mkdir(parents=True, exist_ok=True)
    if CAPS_SAVED.is_dir():
        CAPS.mkdir(parents=True, exist_ok=True)
        for f in CAPS_SAVED.iterdir():
            shutil.copy2(f, CAPS / f.name)
    HOOK.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "scripts" / "libvirt-hook", HOOK)
    HOOK.chmod(0o755)
    daemon = _start_libvirtd()
    print(f"libvirtd {virsh('version', '--daemon').splitlines()[-1]} up in {daemon.started_s:.1f} s")
    try:
        yield daemon
    finally:
        with contextlib.suppress(Exception):
            for name in virsh("list", "--all", "--name", check=False).split():
                virsh("destroy", name, check=False)
                virsh("undefine", name, check=False)
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(60)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
        with contextlib.suppress(OSError):  # libvirt's own logs, for the record
            shutil.copytree("/var/log/libvirt", OUT / "libvirt-logs", dirs_exist_ok=True)
        with contextlib.suppress(OSError):
            CAPS_SAVED.mkdir(parents=True, exist_ok=True)
            for f in CAPS.iterdir():
                shutil.copy2(f, CAPS_SAVED / f.name)


def favour_vcpus(domain: str, nice: int = -15) -> list[str]:
    """Give a running domain's vCPU threads priority in the lab VM's scheduler; their names.

    On a real host a guest's vCPU runs on a core of its own and resumes within
    microseconds of QEMU's reset; in the lab, QEMU's TCG vCPU thread shares the
    lab VM's two emulated CPUs with QEMU's main thread, libvirtd and qreset, all
    busy on that very reset, and was seen to start only after qreset's ``stop``
    in two cycles of three. Weighting it (nice -15: CFS weight 29154 against
    1024) lets it run at once again, as it would on real hardware. The vCPU
    threads are the ones named "CPU N/..." (libvirt starts QEMU with
    ``-name ...,debug-threads=on``).
    """
    pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
    named = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        comm = (task / "comm").read_text().strip()
        if comm.startswith("CPU "):
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
            named.append(comm)
    if not named:
        raise AssertionError(f"no vCPU thread (CPU N/...) in QEMU {pid} of {domain}")
    return named


# -- qreset's side: its daemon, journal and status -----------------------------------------

WORK = Path("/run/qreset-lab-libvirt")
SOCKET = Path("/run/qreset/qreset.sock")  # the hook's fixed default (libvirt passes no environment)
JOURNAL = WORK / "journal.jsonl"
TERMINAL = ("resumed", "stopped", "failed", "poweroff")


def wait_for(what: str, pred: Callable[[], bool], timeout: float, why: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{why()}")
        time.sleep(0.25)


def journal(kind: str | None = None) -> list[dict[str, Any]]:
    out = []
    if JOURNAL.exists():
        for line in JOURNAL.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict) and (kind is None or rec.get("phase") == kind):
                    out.append(rec)
    return out


def cycles(vm: str) -> list[dict[str, Any]]:
    return [r for r in journal() if r.get("vm") == vm and r.get("phase") in TERMINAL
            and not str(r.get("cycle", "")).startswith("reg-")]


def status() -> dict[str, Any]:
    proc = qreset("status", "--json", "--socket", str(SOCKET))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def served(vm: str) -> dict[str, Any] | None:
    for v in status().get("vms", []):
        if v.get("name") == vm:
            return dict(v)
    return None


def marks(debug: Path, mark: bytes) -> int:
    try:
        return debug.read_bytes().count(mark)
    except FileNotFoundError:
        return 0


class QresetDaemon:
    """``qreset run`` as libvirt's companion (stop-on-reset, the default control socket)."""

    def __init__(self) -> None:
        self.config = WORK / "qreset.toml"
        self.config.write_text(
            f'[daemon]\ncontrol_socket = "{SOCKET}"\njournal = "{JOURNAL}"\n\n'
            '[policy]\nmode = "stop-on-reset"\ntakeover = "all"\n'
        )
        self.log = WORK / "qreset.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        SOCKET.unlink(missing_ok=True)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([*QRESET, "run", "--config", str(self.config), "-v"], cwd=REPO,
                                         stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        t0 = time.monotonic()
        # Python's start over the lab's 9p root under nested TCG: seconds when the host is
        # idle, up to a minute or more on a loaded one.
        wait_for("qreset's control socket", SOCKET.exists, 240, self.tail)
        print(f"qreset run: control socket up after {time.monotonic() - t0:.1f} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""



def domain_xml(
    name: str,
    hostdevs: Sequence[PciAddress],
    image: Path | None,
    debugcon: Path,
    *,
    on_poweroff: str = "destroy",
    on_reboot: str = "restart",
    qmp: Path | None = None,
    bios: Path | None = None,
    guest_slot: int | None = None,
) -> str:
    """A TCG domain (``type='qemu'``) booting ``image`` with ``hostdevs`` as managed PCI hostdevs.

    ``qmp``: qreset's own monitor (the ``<qemu:commandline>`` snippet of
    docs/operators.md); None leaves it out (a guest qreset does not serve).
    ``bios``: a firmware image given to QEMU as ``-bios`` (no disk then: ``image``
    None); passed through ``<qemu:commandline>``, which reaches QEMU as written on
    every libvirt version, where ``<loader type='rom'>`` goes through libvirt's
    firmware handling. ``guest_slot``: put the hostdevs (one) at ``00:slot.0`` of
    the guest's root bus (pcie.0; libvirt accepts an endpoint there only at an
    address the configuration gives), so firmware reaches it without enumerating
    bridges.
    """
    if guest_slot is not None and len(hostdevs) != 1:
        raise ValueError("guest_slot places exactly one hostdev")
    where = ("" if guest_slot is None else
             f"\n          <address type='pci' domain='0x0000' bus='0x00' slot='0x{guest_slot:02x}' "
             "function='0x0'/>")
    hd = "".join(textwrap.dedent(f"""
        <hostdev mode='subsystem' type='pci' managed='yes'>
          <source><address domain='0x{a.domain:04x}' bus='0x{a.bus:02x}'
                           slot='0x{a.device:02x}' function='0x{a.function:x}'/></source>
          <rom bar='off'/>{where}
        </hostdev>""") for a in hostdevs)
    args = ["-debugcon", f"file:{debugcon}"]
    if bios is not None:
        args += ["-bios", str(bios)]
    if qmp is not None:
        args += ["-chardev", f"socket,id=qreset0,path={qmp},server=on,wait=off",
                 "-mon", "chardev=qreset0,mode=control"]
    cmdline = "".join(f"\n    <qemu:arg value='{a}'/>" for a in args)
    disk = "" if image is None else f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{image}'/>
      <target dev='sda' bus='sata'/>
    </disk>"""
    boot = "" if image is None else "<boot dev='hd'/>"
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>{boot}</os>
  <features><acpi/></features>
  <on_poweroff>{on_poweroff}</on_poweroff>
  <on_reboot>{on_reboot}</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disk}{hd}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>{cmdline}
  </qemu:commandline>
</domain>
"""
