"""The hook tests' shared helpers: a domain XML as libvirt passes it to hooks, the
``<qemu:commandline>`` arguments libvirt appends, ``qreset hook`` run as libvirt
runs it, and an in-process daemon serving its control socket.

Used by tests/test_hook.py, tests/test_registry.py and tests/test_launch.py
(test modules import helpers from here, never from each other).
"""

from __future__ import annotations

import asyncio
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from qreset.config import parse_config
from qreset.daemon import Daemon
from qreset.libvirt import QEMU_NS
from qreset.pci.sim import SimHost
from tests.conftest import ROOT
from tests.daemon_helpers import DEMO, A


def domain_xml(name: str, hostdevs: Sequence[str], qmp: Path | None) -> str:
    """A domain XML as libvirt passes it to hooks (``virsh dumpxml`` shape)."""
    devs: list[str] = []
    for bdf in hostdevs:
        a = A(bdf)
        devs.append(
            "    <hostdev mode='subsystem' type='pci' managed='yes'>\n"
            "      <driver name='vfio'/>\n"
            f"      <source><address domain='0x{a.domain:04x}' bus='0x{a.bus:02x}' "
            f"slot='0x{a.device:02x}' function='0x{a.function:x}'/></source>\n"
            f"      <alias name='hostdev{len(devs)}'/>\n"
            "    </hostdev>\n")
    commandline = "" if qmp is None else (
        "  <qemu:commandline>\n"
        "    <qemu:arg value='-chardev'/>\n"
        f"    <qemu:arg value='socket,id=qreset0,path={qmp},server=on,wait=off'/>\n"
        "    <qemu:arg value='-mon'/>\n"
        "    <qemu:arg value='chardev=qreset0,mode=control'/>\n"
        "  </qemu:commandline>\n")
    return (
        f"<domain type='kvm' id='7' xmlns:qemu='{QEMU_NS}'>\n"
        f"  <name>{name}</name>\n"
        "  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>\n"
        "  <memory unit='KiB'>65536</memory>\n"
        "  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>\n"
        "  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        "    <hostdev mode='subsystem' type='usb' managed='yes'>\n"
        "      <source><vendor id='0x046d'/><product id='0xc52b'/></source>\n"
        "    </hostdev>\n"
        + "".join(devs)
        + "    <hostdev mode='capabilities' type='storage'>\n"
        "      <source><block>/dev/sdf1</block></source>\n"
        "    </hostdev>\n"
        "  </devices>\n"
        + commandline
        + "</domain>\n")


def commandline_args(xml: str) -> list[str]:
    """What libvirt appends to QEMU's argv for ``<qemu:commandline>``."""
    return [a.get("value", "") for a in ET.fromstring(xml).iter(f"{{{QEMU_NS}}}arg")]


async def hook(sock: Path, guest: str, op: str, subop: str = "begin", extra: str = "-",
               xml: str = "") -> tuple[int, str, str]:
    """Run the hook as libvirt does: a fresh process, argv, the XML on stdin."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qreset", "hook", guest, op, subop, extra, "--socket", str(sock),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(xml.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@asynccontextmanager
async def daemon_on(workdir: Path, host: SimHost) -> AsyncIterator[Daemon]:
    """An in-process daemon with no configured VMs, serving its control socket."""
    cfg = parse_config({
        "daemon": {"journal": str(workdir / "journal.jsonl"), "control_socket": str(workdir / "c.sock")},
        "sim": {"topology": str(DEMO), "time_scale": 0.01},
        "policy": {"connect_backoff_max": 0.3},
    }, "test")
    daemon = Daemon(cfg, host=host)
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        async with asyncio.timeout(10):
            await daemon.started.wait()
        yield daemon
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 30)
