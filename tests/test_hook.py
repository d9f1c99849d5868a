"""
``qreset hook`` driven the way libvirt drives it, against a running daemon and a real QEMU.

libvirt runs ``/etc/libvirt/hooks/qemu.d/qreset GUEST OP SUBOP EXTRA`` with the
domain XML on stdin, in this order for a guest's life: ``prepare begin -``,
``start begin -``, (QEMU launched with ``-S`` and the XML's
``<qemu:commandline>`` arguments appended), ``started begin -``, (CPUs
started), ..., ``stopped end -``, ``release end -``. Here the hook runs as a
subprocess (as libvirt runs it), the daemon in-process on the simulated demo
host (so the test can read the host's reset log), and QEMU is a real TCG guest
that reboots itself, started with the arguments of the XML's
``<qemu:commandline>``, exactly as libvirt appends them.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from qreset.config import DEFAULT_CONTROL_SOCKET
from qreset.libvirt import COMMANDLINE_SNIPPET, default_qmp_path, parse_domain_xml
from qreset.pci.sim import SimHost
from qreset.qmpsync import DEFAULT_SOCKET
from tests.conftest import ROOT
from tests.daemon_helpers import DEMO, GPU, GPU_AUDIO, LPT, NIC1, SOUND, A
from tests.hook_helpers import commandline_args, daemon_on, domain_xml, hook
from tests.qemu_helpers import QemuGuest, have_qemu, short_tmpdir, status

qemu = pytest.mark.skipif(not have_qemu(), reason="qemu-system-x86_64 not installed (scripts/install-deps)")


def resets_since(host: SimHost, index: int, dev: str) -> list[str]:
    return [r.method for r in host.reset_log[index:] if A(dev) in r.affected]


@qemu
@pytest.mark.qemu
async def test_guest_lifecycle_through_the_hook() -> None:
    with short_tmpdir() as wd:
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        sock = wd / "c.sock"
        qmp = wd / "vm1.qreset.qmp"
        xml = domain_xml("vm1", [NIC1, GPU, GPU_AUDIO], qmp)
        outputs: list[str] = []
        async with daemon_on(wd, host) as daemon:
            for op in ("prepare", "start"):
                rc, out, err = await hook(sock, "vm1", op, xml=xml)
                outputs.append(out)
                assert (rc, err) == (0, ""), (op, err)
            assert daemon.monitors == {}
            # libvirt starts QEMU paused, with the <qemu:commandline> arguments appended.
            guest = QemuGuest("vm1", wd, paused=True, extra=commandline_args(xml))
            guest.start()
            try:
                await guest.await_sockets()
                rc, out, err = await hook(sock, "vm1", "started", xml=xml)
                outputs.append(out)
                assert (rc, err) == (0, "")
                monitor = daemon.monitors["vm1"]
                assert monitor.mode.value == "stop-on-reset"   # libvirt reads SHUTDOWN as poweroff
                assert monitor.qmp == qmp
                assert {GPU, GPU_AUDIO, NIC1} <= {str(a) for a in monitor.owned}
                await daemon.wait_event("QRESET_VM_CONNECTED", lambda e: e["vm"] == "vm1",
                                        timeout=10, past=True)
                ctl = await guest.ctl()
                try:
                    await ctl.execute("cont")               # libvirt starts the CPUs
                    async with asyncio.timeout(60):
                        while monitor.cycles < 4:
                            await asyncio.sleep(0.05)
                    # Operations the hook does not act on, and reconnect (an add-vm identical
                    # to the one of started: a no-op): exit 0, silent, VM untouched.
                    for op, sub, extra in (("migrate", "begin", "-"), ("restore", "begin", "-"),
                                           ("reconnect", "begin", "-"), ("attach", "begin", "-"),
                                           ("frobnicate", "sideways", "x")):
                        rc, out, err = await hook(sock, "vm1", op, sub, extra, xml=xml)
                        outputs.append(out)
                        assert (rc, err) == (0, ""), op
                    assert "vm1" in daemon.monitors
                    cycles = monitor.cycles
                    async with asyncio.timeout(60):
                        while monitor.cycles < cycles + 2:
                            await asyncio.sleep(0.05)
                    # Stopped only during cycles: it runs again within moments.
                    async with asyncio.timeout(5):
                        while await status(ctl) != "running":
                            await asyncio.sleep(0.01)
                    history = [c for c in daemon.history if c["vm"] == "vm1"]
                finally:
                    await ctl.disconnect()
            finally:
                guest.stop()                                # libvirt kills QEMU...
            mark = len(host.reset_log)
            rc, out, err = await hook(sock, "vm1", "stopped", "end", xml=xml)   # ...then runs 'stopped'
            outputs.append(out)
            assert (rc, err) == (0, "")
            assert "vm1" not in daemon.monitors
            released = host.reset_log[mark:]
            rc, out, err = await hook(sock, "vm1", "release", "end", xml=xml)  # idempotent
            outputs.append(out)
            assert (rc, err) == (0, "")

    assert outputs == [""] * len(outputs)                   # never anything on stdout
    assert len(history) >= 6
    for c in history:
        assert c["outcome"] == "resumed", c
        assert c["trigger"]["event"] == "RESET"
        # The NIC's own FLR, and the GPU card's bus below its root port.
        assert {d["key"] for d in c["report"]["domains"]} == {f"function:{NIC1}", "bus:0000:00:03.0"}
    # Released: every function the guest had went through a reset after it stopped.
    assert released
    for dev in (NIC1, GPU, GPU_AUDIO):
        assert any(A(dev) in r.affected for r in released), dev


async def test_prepare_refuses_a_device_in_another_vms_reset_domain() -> None:
    with short_tmpdir() as wd:
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        sock = wd / "c.sock"
        async with daemon_on(wd, host) as daemon:
            # vm2 (with the sound card) is running: registered by its own 'started'.
            rc, out, err = await hook(sock, "vm2", "started",
                                      xml=domain_xml("vm2", [SOUND], wd / "vm2.qmp"))
            assert (rc, out, err) == (0, "", "")
            assert "vm2" in daemon.monitors
            lpt = domain_xml("vm1", [NIC1, LPT], wd / "vm1.qmp")
            for op in ("prepare", "start"):
                rc, out, err = await hook(sock, "vm1", op, xml=lpt)
                assert rc == 1, (op, err)
                assert out == ""
                assert err.splitlines() == [
                    f"qreset hook: unsafe to start vm1: bus reset of 0000:05:00.0 would hit {SOUND} "
                    "owned by VM vm2"]
            rc, out, err = await hook(sock, "vm1", "prepare", xml=domain_xml("vm1", [SOUND], None))
            assert (rc, out) == (1, "")
            assert f"{SOUND} is assigned to running VM 'vm2'" in err
            # A guest whose devices are clear of vm2's domains may start.
            clear = domain_xml("vm1", [NIC1, GPU, GPU_AUDIO], None)
            rc, out, err = await hook(sock, "vm1", "prepare", xml=clear)
            assert (rc, out, err) == (0, "", "")
            # Later operations never fail the guest, whatever the daemon says.
            rc, out, err = await hook(sock, "vm1", "started", xml=lpt)
            assert (rc, out) == (0, "")
            # Nothing was reset by any of this.
            assert host.reset_log == []
            rc, out, err = await hook(sock, "vm2", "stopped", "end", xml=domain_xml("vm2", [SOUND], None))
            assert (rc, out, err) == (0, "", "")
            assert "vm2" not in daemon.monitors


async def test_without_a_daemon_the_guest_still_starts() -> None:
    with short_tmpdir() as wd:
        sock = wd / "absent.sock"
        xml = domain_xml("vm1", [NIC1], wd / "vm1.qmp")
        for op in ("prepare", "start", "started", "stopped"):
            rc, out, err = await hook(sock, "vm1", op, xml=xml)
            assert (rc, out) == (0, ""), op
            assert err.startswith(f"qreset hook: {op}: daemon not reachable at {sock}"), err
            assert len(err.splitlines()) == 1
        # A guest without PCI hostdevs needs nothing from qreset: not even a warning.
        rc, out, err = await hook(sock, "vm1", "prepare", xml=domain_xml("vm1", [], None))
        assert (rc, out, err) == (0, "", "")


@pytest.mark.parametrize(("xml", "why"), [
    ("<domain><name>vm1", "not XML"),
    ("<network><name>n</name></network>", "root element is <network>"),
    ("<domain><devices><hostdev mode='subsystem' type='pci'><source>"
     "<address bus='0x01' slot='0x00' function='0x0'/></source></hostdev></devices></domain>", "no <name>"),
    ("<domain><name>vm1</name><devices><hostdev mode='subsystem' type='pci'><source>"
     "<address bus='0x01' function='0x0'/></source></hostdev></devices></domain>", "lacks the slot"),
    ("<domain><name>vm1</name><devices><hostdev mode='subsystem' type='pci'><source>"
     "<address bus='0x01' slot='0x40' function='0x0'/></source></hostdev></devices></domain>", "hostdev #1"),
])
async def test_bad_domain_xml_fails_prepare_only(xml: str, why: str) -> None:
    with short_tmpdir() as wd:
        sock = wd / "absent.sock"
        rc, out, err = await hook(sock, "vm1", "prepare", xml=xml)
        assert (rc, out) == (1, "")
        assert why in err
        assert len(err.splitlines()) == 1
        rc, out, err = await hook(sock, "vm1", "stopped", "end", xml=xml)
        assert (rc, out) == (0, "")
        assert why in err


def test_hook_and_daemon_agree_on_the_default_socket() -> None:
    assert Path(DEFAULT_SOCKET) == DEFAULT_CONTROL_SOCKET
    from qreset.cli import build_parser
    from qreset.cli.hook import add_arguments

    _parser, subs = build_parser()
    add_arguments(subs["hook"], "hook")
    assert DEFAULT_SOCKET in " ".join(subs["hook"].format_help().split())


def test_operators_doc_shows_the_snippet_the_hook_understands() -> None:
    doc = (ROOT / "docs" / "operators.md").read_text()
    assert COMMANDLINE_SNIPPET in doc
    xml = COMMANDLINE_SNIPPET.replace("  ...\n", "  <name>DOMAIN</name>\n")
    assert parse_domain_xml(xml).qmp == default_qmp_path("DOMAIN")


async def test_a_guest_without_pci_hostdevs_is_left_alone_silently() -> None:
    with short_tmpdir() as wd:
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        async with daemon_on(wd, host) as daemon:
            xml = domain_xml("plain", [], wd / "plain.qmp")
            for op, sub in (("prepare", "begin"), ("start", "begin"), ("started", "begin"),
                            ("stopped", "end"), ("release", "end")):
                assert await hook(wd / "c.sock", "plain", op, sub, xml=xml) == (0, "", ""), op
            assert daemon.monitors == {}


async def bare_hook(guest: str, op: str, *extra_args: str, xml: str = "") -> tuple[int, str, str]:
    """The hook with libvirt's environment: only LC_ALL, PATH and HOME (no QRESET_SOCKET)."""
    import os

    env = {"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qreset", "hook", guest, op, "begin", "-", *extra_args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(xml.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_hook_finds_the_daemon_from_its_config_file_without_environment() -> None:
    """libvirt passes no QRESET_SOCKET: the hook reads control_socket from the daemon's file."""
    with short_tmpdir() as wd:
        host = SimHost.from_toml(DEMO, time_scale=0.01)
        async with daemon_on(wd, host):
            cfg = wd / "qreset.toml"
            # relative to the file, as the daemon reads it
            cfg.write_text('[daemon]\ncontrol_socket = "c.sock"\n')
            # The same device as a VM the daemon serves would make prepare fail: prove the call reached it.
            xml = domain_xml("vm1", [NIC1], wd / "vm1.qmp")
            rc, out, err = await bare_hook("vm1", "started", "--config", str(cfg), xml=xml)
            assert (rc, out, err) == (0, "", "")
            rc, out, err = await bare_hook("vm2", "prepare", "--config", str(cfg),
                                           xml=domain_xml("vm2", [NIC1], wd / "vm2.qmp"))
        assert rc == 1, err
        assert f"{NIC1} is assigned to running VM 'vm1'" in err
        # Without the file the hook falls back to the default socket (absent here): a warning only.
        rc, out, err = await bare_hook("vm3", "prepare", "--config", str(wd / "none.toml"),
                                       xml=domain_xml("vm3", [NIC1], wd / "vm3.qmp"))
        assert (rc, out) == (0, "")
        assert f"daemon not reachable at {DEFAULT_SOCKET}" in err


async def test_prepare_refuses_park_mode_for_a_libvirt_guest() -> None:
    """A guest configured with mode = "park" would be killed by libvirt at its first reset: refuse it."""
    with short_tmpdir() as wd:
        cfg = wd / "qreset.toml"
        cfg.write_text(f'[daemon]\ncontrol_socket = "{wd / "absent.sock"}"\n\n'
                       '[[vm]]\nname = "vm1"\nqmp = "/run/qreset/vm1.qmp"\nmode = "park"\n\n'
                       '[[vm]]\nname = "vm2"\nqmp = "/run/qreset/vm2.qmp"\nmode = "stop-on-reset"\n')
        rc, out, err = await bare_hook("vm1", "prepare", "--config", str(cfg),
                                       xml=domain_xml("vm1", [NIC1], wd / "vm1.qmp"))
        assert (rc, out) == (1, "")
        assert 'unsafe to start vm1: vm1 is configured with mode = "park"' in err
        assert "libvirt handles every SHUTDOWN event as a poweroff" in err
        assert len(err.splitlines()) == 1
        rc, out, err = await bare_hook("vm2", "prepare", "--config", str(cfg),
                                       xml=domain_xml("vm2", [NIC1], wd / "vm2.qmp"))
        assert (rc, out) == (0, "")  # stop-on-reset: allowed (the daemon is absent: a warning)
        assert "daemon not reachable" in err


async def test_a_fifo_at_the_config_path_does_not_hang_the_hook() -> None:
    """libvirt waits for its hooks: a FIFO where the configuration should be must not block."""
    import os

    with short_tmpdir() as wd:
        fifo = wd / "qreset.toml"
        os.mkfifo(fifo)
        rc, out, err = await asyncio.wait_for(
            bare_hook("vm1", "prepare", "--config", str(fifo), xml=domain_xml("vm1", [NIC1], wd / "vm1.qmp")),
            30)
        assert (rc, out) == (0, "")
        assert "daemon not reachable" in err
