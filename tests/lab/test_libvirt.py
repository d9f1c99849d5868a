"""
qreset under a real libvirtd (Debian's, inside the lab VM) with managed PCI hostdevs.

Every test drives libvirt as an operator would (``virsh define/start/reboot/
destroy``), with qreset's hook installed in ``/etc/libvirt/hooks/qemu.d`` and
``qreset run`` (stop-on-reset mode: libvirt owns SHUTDOWN) as the daemon, and
proves what happened with three independent witnesses:

* the kernel: kprobes on ``pcie_flr`` (qreset's and QEMU's FLRs) and on
  ``pci_device_remove`` (a driver unbind: libvirt handing a managed device back
  to its host driver), printed into the kernel log with a timestamp
  (tests/lab/labhost.py);
* libvirt: ``virsh domstate --reason`` and libvirtd's own log;
* qreset: its journal (cycles, releases) and ``qreset status --json``.

The guests are 512-byte boot sectors (tests/guest.py): one resets the machine
through port 0xCF9, one powers off through ACPI PM1a_CNT, one waits for the
ACPI power button and then powers off (what ``virsh reboot --mode acpi``
needs). Each writes one mark per boot to QEMU's debug console. The window
test's guest is a ``-bios`` firmware instead (tests/window_guest.py): it
writes its device's config space with its first instructions after a reset.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qreset.pci.address import PciAddress
from tests import window_guest
from tests.guest import write_boot_image
from tests.lab.labhost import PCI, KernelLog, Roles, bind_vfio, driver, flr_caller, saved_dword, unbind
from tests.lab.libvirtlab import (
    WORK,
    Libvirtd,
    QresetDaemon,
    cycles,
    domain_xml,
    domstate,
    favour_vcpus,
    libvirtd,
    marks,
    served,
    virsh,
    wait_for,
)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def lv(witnesses: list[str]) -> Iterator[Libvirtd]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    Path("/run/qreset").mkdir(parents=True, exist_ok=True)
    with libvirtd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def qd(lv: Libvirtd) -> Iterator[QresetDaemon]:
    d = QresetDaemon()
    d.start()
    try:
        yield d
    finally:
        d.stop()
        print("--- qreset daemon log (tail)\n" + d.tail())


@contextlib.contextmanager
def domain(name: str, hostdevs: list[PciAddress], program: str | None, *, paused: bool = False,
           **kw: Any) -> Iterator[Path]:
    """Define and start a domain; destroy and undefine it afterwards. Yields its debug-console log.

    ``program``: the boot sector to boot (tests/guest.py), or None for a domain
    given its own firmware (``bios=``). ``paused``: start it with its vCPUs
    stopped (``virsh start --paused``; the test resumes it).
    """
    image = None if program is None else write_boot_image(WORK / f"{name}.img", program)
    debug = WORK / f"{name}.debug"
    debug.unlink(missing_ok=True)
    xml = WORK / f"{name}.xml"
    xml.write_text(domain_xml(name, hostdevs, image, debug, qmp=Path(f"/run/qreset/{name}.qmp"), **kw))
    virsh("define", str(xml))
    try:
        virsh("start", name, *(["--paused"] if paused else []))
        yield debug
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)


def flr_lines(log: KernelLog, addr: PciAddress) -> list[str]:
    """Kernel lines proving an FLR of ``addr`` (pci.c's restore debug names the device)."""
    return [line for line in log.lines() if "qreset_flr:" in line
            or (str(addr) in line and "restore config" in line)]


def test_guest_reboots_are_coordinated_under_libvirt(roles: Roles, lv: Libvirtd, qd: QresetDaemon) -> None:
    """start → the hook registers the guest; its reboots become cycles with real FLRs; it stays running."""
    dev = roles["virtio1"]
    log = KernelLog("libvirt reboots")
    with domain("lvreboot", [dev], "reboot") as debug:
        wait_for("the hook's add-vm", lambda: served("lvreboot") is not None, 60, lv.log)
        vm = served("lvreboot")
        assert vm is not None
        assert vm["devices"] == [str(dev)], vm
        assert driver(dev) == "vfio-pci"  # libvirt bound it (managed)
        wait_for("3 coordinated cycles", lambda: len(cycles("lvreboot")) >= 3, 240,
                 lambda: qd.tail() + lv.qemu_log("lvreboot")[-2000:])
        state = domstate("lvreboot")
        done = cycles("lvreboot")
        boots = marks(debug, b"B")
        # Fresh report: drivers are read at plan time, not at daemon start (libvirt
        # bound the device to vfio-pci after qreset started).
        stale = [c for c in done if "not bound to vfio-pci" in json.dumps(c)]
    print(f"lvreboot: {len(done)} cycles, {boots} boots, state {state}")
    # The stop-on-reset window: the guest runs from QEMU's RESET until qreset's stop.
    window = sorted(c["durations"]["event_to_stop_ms"] for c in done if "event_to_stop_ms" in c["durations"])
    if window:
        p50, p99 = window[len(window) // 2], window[min(len(window) - 1, (99 * len(window)) // 100)]
        print(f"stop-on-reset window (RESET -> stop), {len(window)} cycles: p50 {p50:.1f} ms, "
              f"p99 {p99:.1f} ms, max {window[-1]:.1f} ms")
    for c in done:
        print("  ", c["outcome"], {k: v for k, v in c["durations"].items() if k.endswith("_ms")})
    assert state.startswith("running"), state
    assert all(c["outcome"] == "resumed" for c in done[:3]), done[:3]
    for c in done[:3]:
        assert {d["method"] for d in c["report"]["domains"]} == {"flr"}, c["report"]
    assert not stale, stale[0]
    assert len([ln for ln in log.lines() if "qreset_flr:" in ln]) >= 3
    wait_for("remove-vm at stop", lambda: served("lvreboot") is None, 60, qd.tail)


#: Where the window test's guest finds its function (00:05.0, on pcie.0), and how often it boots.
WINDOW_SLOT = 5
WINDOW_BOOTS = 6


def resets_seen(lines: list[str], addr: PciAddress) -> list[tuple[str, int]]:
    """Each FLR in ``lines`` as (who started it, ``addr``'s Cache Line Size the kernel saved first).

    pci_reset_function saves the header (pci_dev_save_and_disable) right before
    the FLR and writes it back after (pci_dev_restore), so the saved value is
    what the device held when the reset came.
    """
    out, value = [], None
    for line in lines:
        v = saved_dword(line, addr, window_guest.REGISTER)
        if v is not None:
            value = v & 0xFF
        who = flr_caller(line)
        if who is not None and value is not None:
            out.append((who, value))
            value = None
    return out


def test_guest_config_writes_in_the_window_survive_the_cycle(roles: Roles, lv: Libvirtd,
                                                            qd: QresetDaemon) -> None:
    """Issue 9: what the guest writes to its device between QEMU's reset and qreset's stop stays.

    The guest's firmware (tests/window_guest.py) writes a new Cache Line Size to
    its nvme with its first instructions after every reset, then resets again
    1-2 s later; after WINDOW_BOOTS boots it halts. Every FLR clears the
    register on the device (QEMU's pci_do_device_reset) and the kernel's reset
    path writes back what it saved just before, so a value survives a cycle only
    if qreset compares with a snapshot taken after the stop too: one from before
    the guest's write makes the rescan see "Cache Line Size changed" and restore
    the old value. Witnesses: the kernel (what the device held at each FLR, and
    whose FLR it was), the host's config space after the last cycle (sysfs), and
    qreset's cycle reports.
    """
    dev = roles["nvme1"]
    fw = window_guest.write_image(WORK / "lvwindow.bin", WINDOW_SLOT, WINDOW_BOOTS, delay=2)
    want = [window_guest.expected(n) for n in range(1, WINDOW_BOOTS + 1)]
    # Paused until qreset is connected: the first reset must not come before qreset can stop it.
    with domain("lvwindow", [dev], None, paused=True, bios=fw, guest_slot=WINDOW_SLOT) as debug:
        wait_for("qreset connected to lvwindow", lambda: bool((served("lvwindow") or {}).get("connected")),
                 120, lambda: qd.tail() + lv.log()[-2000:])
        vcpus = favour_vcpus("lvwindow")
        log = KernelLog("libvirt window")
        virsh("resume", "lvwindow")
        wait_for(f"{WINDOW_BOOTS} boots and the halt", lambda: debug.exists() and debug.read_bytes()
                 .endswith(window_guest.HALT_MARK), 300,
                 lambda: f"console {debug.read_bytes() if debug.exists() else b''!r}\n"
                 + lv.qemu_log("lvwindow")[-2000:] + qd.tail())
        wait_for(f"{WINDOW_BOOTS - 1} cycles ended", lambda: len(cycles("lvwindow")) >= WINDOW_BOOTS - 1,
                 120, qd.tail)
        host = (PCI / str(dev) / "config").read_bytes()[window_guest.REGISTER]
        done = cycles("lvwindow")
        state = domstate("lvwindow")
        console = debug.read_bytes()
        lines = log.lines()
    resets = resets_seen(lines, dev)
    by_qemu = [v for who, v in resets if who.startswith("qemu")]
    by_qreset = [v for who, v in resets if not who.startswith("qemu")]
    # Reset j ends boot j; in its window boot j+1 writes want[j]. qreset's FLR of cycle j
    # found want[j] if that write came before the stop (in the window), want[j-1] if after.
    landed = [j for j, v in enumerate(by_qreset, start=1) if j < len(want) and v == want[j]]
    print(f"lvwindow (vCPUs favoured: {vcpus}): guest wrote/read back "
          f"{[(hex(w), hex(r)) for w, r in window_guest.writes(console)]}")
    print(f"  kernel: {[(who, hex(v)) for who, v in resets]}")
    print(f"  writes inside the window (before qreset's stop) in cycles {landed} of {len(by_qreset)}; "
          f"host {dev} Cache Line Size after the last cycle: {host:#x}")
    for c in done:
        names = [r["name"] for d in c["report"]["domains"] for f in d["functions"] if f["diff"]
                 for r in f["diff"]["registers"]]
        print("  ", c["outcome"], f"window {c['durations'].get('event_to_stop_ms')} ms, diff {names}")
        assert "Cache Line Size" not in names, c
    assert window_guest.writes(console) == [(v, v) for v in want], console  # each reached the device
    assert len(done) == WINDOW_BOOTS - 1, done
    assert all(c["outcome"] == "resumed" and c["vm_resumed"] for c in done), done
    assert state.startswith("running"), state
    assert len(by_qemu) == len(by_qreset) == WINDOW_BOOTS - 1, resets
    # What each boot wrote was still on the device at the next reset: no cycle undid it.
    assert by_qemu == want[:-1], f"device at QEMU's resets {[hex(v) for v in by_qemu]}, guest wrote {want}"
    assert landed, ("no guest write came inside the window (every one after qreset's stop): this run "
                    f"proves nothing about it; qreset's FLRs found {[hex(v) for v in by_qreset]}")
    assert host == want[-1], (f"the device holds {host:#x} after the last cycle, not the {want[-1]:#x} "
                              "the guest wrote last")


def test_on_poweroff_restart_still_restarts(roles: Roles, lv: Libvirtd, qd: QresetDaemon) -> None:
    """libvirt's fake reboot (-no-shutdown; system_reset + cont) keeps working with qreset connected."""
    dev = roles["nvme1"]
    with domain("lvpoff", [dev], "poweroff", on_poweroff="restart") as debug:
        wait_for("the hook's add-vm", lambda: served("lvpoff") is not None, 60, lv.log)
        wait_for("3 power-offs each restarted by libvirt", lambda: marks(debug, b"P") >= 4, 180,
                 lambda: f"state {domstate('lvpoff')}\n" + lv.qemu_log("lvpoff")[-2000:] + qd.tail())
        state = domstate("lvpoff")
    assert state.startswith("running"), state
    assert "Unable to read from monitor" not in lv.log()


def test_virsh_reboot_acpi_with_qreset(roles: Roles, lv: Libvirtd, qd: QresetDaemon) -> None:
    """``virsh reboot --mode acpi``: power button → guest poweroff → libvirt's fake reboot."""
    dev = roles["virtio2"]
    with domain("lvacpi", [dev], "acpi-button") as debug:
        wait_for("the hook's add-vm", lambda: served("lvacpi") is not None, 60, lv.log)
        wait_for("first boot", lambda: marks(debug, b"A") >= 1, 60, lambda: lv.qemu_log("lvacpi"))
        for n in (2, 3):
            virsh("reboot", "lvacpi", "--mode", "acpi")

            def booted(n: int = n) -> bool:
                return marks(debug, b"A") >= n

            wait_for(f"boot {n} after virsh reboot --mode acpi", booted, 120,
                     lambda: f"state {domstate('lvacpi')}\n" + lv.qemu_log("lvacpi")[-2000:] + qd.tail())
        state = domstate("lvacpi")
        assert cycles("lvacpi"), "libvirt's system_reset of the fake reboot caused no cycle"
    assert state.startswith("running"), state


def test_destroy_releases_before_libvirt_unbinds(roles: Roles, lv: Libvirtd, qd: QresetDaemon) -> None:
    """``virsh destroy`` → the hook's ``stopped`` → release (FLR) before libvirt rebinds the host driver."""
    dev = roles["nvme2"]
    if driver(dev) == "vfio-pci":
        # An earlier lab test left it on vfio-pci: libvirt would give it back to vfio-pci
        # (the driver it found) and nothing would show the unbind. Start from the host's.
        unbind(dev)
        (Path("/sys/bus/pci/drivers_probe")).write_text(str(dev))
    host_driver = driver(dev)  # None in the lab: its initramfs loads no nvme driver
    assert host_driver != "vfio-pci", host_driver
    with domain("lvdestroy", [dev], "reboot") as _debug:
        wait_for("the hook's add-vm", lambda: served("lvdestroy") is not None, 60, lv.log)
        wait_for("a cycle", lambda: len(cycles("lvdestroy")) >= 1, 120, qd.tail)
        log = KernelLog("libvirt destroy")
        virsh("destroy", "lvdestroy")
        wait_for("remove-vm", lambda: served("lvdestroy") is None, 60, qd.tail)
        wait_for("libvirt's rebind", lambda: driver(dev) != "vfio-pci", 60, lv.log)
    lines = log.lines()
    flr = [i for i, ln in enumerate(lines) if "qreset_flr:" in ln]
    unbind_ = [i for i, ln in enumerate(lines) if "qreset_unbind:" in ln and str(dev) in ln]
    print("kernel trace around the release:\n" + "\n".join(
        ln for ln in lines if "qreset_" in ln))
    assert flr, "no FLR after virsh destroy"
    assert unbind_, f"no unbind of {dev} from vfio-pci seen"
    assert flr[-1] < unbind_[0], "libvirt unbound the device before qreset's release reset it"
    assert driver(dev) == host_driver, (driver(dev), host_driver)
    assert f"VM lvdestroy: released {dev} (reset and rescanned)" in qd.log.read_text(), qd.tail()


def test_prepare_refuses_a_device_of_a_running_domain(roles: Roles, lv: Libvirtd, qd: QresetDaemon) -> None:
    """A second domain with the first one's hostdev is refused at ``prepare``; the first keeps running."""
    dev = roles["virtio1"]
    with domain("lvowner", [dev], "reboot"):
        wait_for("the hook's add-vm", lambda: served("lvowner") is not None, 60, lv.log)
        image = write_boot_image(WORK / "lvthief.img", "reboot")
        xml = WORK / "lvthief.xml"
        xml.write_text(domain_xml("lvthief", [dev], image, WORK / "lvthief.debug",
                                  qmp=Path("/run/qreset/lvthief.qmp")))
        virsh("define", str(xml))
        try:
            proc = subprocess.run(["virsh", "-c", "qemu:///system", "start", "lvthief"],
                                  capture_output=True, text=True, timeout=120, check=False)
            n0 = len(cycles("lvowner"))
            wait_for("lvowner still cycling", lambda: len(cycles("lvowner")) > n0, 120, qd.tail)
            state = domstate("lvowner")
            still = served("lvowner")
        finally:
            virsh("undefine", "lvthief", check=False)
    print("virsh start lvthief:", proc.returncode, proc.stderr.strip())
    assert proc.returncode != 0
    assert "hook" in proc.stderr, proc.stderr
    assert "qreset" in proc.stderr, proc.stderr
    assert state.startswith("running"), state
    assert still is not None
    assert still["devices"] == [str(dev)], still


def test_restarts_of_libvirtd_and_qreset(roles: Roles, lv: Libvirtd, qd: QresetDaemon) -> None:
    """libvirtd restarted → ``reconnect`` → still served; qreset restarted → still served, nothing paused."""
    dev = roles["virtio2"]
    with domain("lvrestart", [dev], "reboot"):
        wait_for("the hook's add-vm", lambda: served("lvrestart") is not None, 60, lv.log)
        lv.restart()
        n0 = len(cycles("lvrestart"))
        wait_for("cycles after libvirtd's restart", lambda: len(cycles("lvrestart")) >= n0 + 2, 120, qd.tail)
        assert domstate("lvrestart").startswith("running")
        qd.stop()
        qd.start()
        wait_for("served after qreset's restart", lambda: served("lvrestart") is not None, 60, qd.tail)
        n1 = len(cycles("lvrestart"))
        wait_for("cycles after qreset's restart", lambda: len(cycles("lvrestart")) >= n1 + 2, 120, qd.tail)
        state = domstate("lvrestart")
        vm = served("lvrestart")
        # Read while the domain still runs: leaving the block destroys it, and a cycle in
        # flight at that moment rightly ends failed (its QEMU is gone).
        done = cycles("lvrestart")
    assert state.startswith("running"), state
    assert vm is not None
    assert vm.get("status") in ("running", "paused"), vm
    # A cycle cut by qreset's own restart may end unresumed in its daemon's record; the
    # next daemon finishes it (journal recovery). Nothing may stay that way: every such
    # cycle is followed by a resumed one, and the domain ends running (above).
    unresumed = [(c["cycle"], c.get("outcome"), c.get("error"), c.get("recovered")) for c in done
                 if not c.get("vm_resumed")]
    print(f"lvrestart: {len(done)} cycles; not resumed by their own cycle: {unresumed}")
    assert len(unresumed) <= 1, unresumed
    if unresumed:
        last_bad = max(i for i, c in enumerate(done) if not c.get("vm_resumed"))
        assert any(c.get("vm_resumed") for c in done[last_bad + 1:]), done[last_bad:]


def test_gap_domain_gets_its_bus_reset_from_qreset(roles: Roles, lv: Libvirtd, qd: QresetDaemon) -> None:
    """A function whose only reset is a bus reset shared with idle vfio-pci functions: qreset does it.

    The lab's ``up_e1000`` sits on the switch upstream port's own bus (scripts/lab/boot):
    no FLR, no PM, and not alone on its bus, so the kernel offers it no reset
    method, and QEMU's hot reset of that bus is refused because it would hit
    both downstream ports' IOMMU groups ("depends on group N which is not
    owned"). qreset owns the picture: the other functions are idle and bound
    to vfio-pci, so it resets the whole bus on every reboot.
    """
    guest = roles["up_e1000"]
    idle = [roles["sw_e1000e"], roles["sw_virtio"]]
    drivers = {a: driver(a) for a in idle}
    for a in idle:
        bind_vfio(a)
    try:
        with domain("lvgap", [guest], "reboot"):
            wait_for("the hook's add-vm", lambda: served("lvgap") is not None, 60, lv.log)
            wait_for("2 cycles", lambda: len(cycles("lvgap")) >= 2, 300, qd.tail)
            done = cycles("lvgap")
            state = domstate("lvgap")
            qemu_log = lv.qemu_log("lvgap")
    finally:
        for a in idle:
            unbind(a)
            if drivers[a]:
                (Path("/sys/bus/pci/drivers") / str(drivers[a]) / "bind").write_text(str(a))
    print("QEMU said:", "\n".join(ln for ln in qemu_log.splitlines() if "reset" in ln.lower())[-1500:])
    assert state.startswith("running"), state
    assert re.search(r"depends on group \d+ which is not owned", qemu_log), qemu_log[-3000:]
    for c in done[:2]:
        assert c["outcome"] == "resumed", c
        (dom,) = [d for d in c["report"]["domains"] if str(guest) in d["covers"]]
        assert dom["method"] not in ("flr", "af_flr", "pm"), dom
        assert set(map(str, [guest, *idle])) <= set(dom["covers"]), dom
