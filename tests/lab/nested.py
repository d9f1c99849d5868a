"""A nested QEMU inside the lab VM with lab functions assigned through vfio-pci, driven over QMP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from qemu.qmp import EventListener, QMPClient

from qreset.pci.address import PciAddress

RUN = Path("/run")


@contextlib.asynccontextmanager
async def nested_qemu(
    name: str,
    devices: Sequence[PciAddress],
    extra: Sequence[str] = (),
    paused: bool = True,
    monitors: Sequence[Path] = (),
    iommufd: bool = False,
) -> AsyncIterator[QMPClient]:
    """Start ``qemu-system-x86_64`` with ``devices`` as ``vfio-pci`` (ids hostdev0..N) and connect QMP.

    ``monitors`` adds more QMP server sockets (e.g. one for ``qreset run``).
    ``iommufd``: QEMU opens each device through its VFIO cdev
    (/dev/vfio/devices/vfioN) bound to one ``-object iommufd`` (QEMU's
    docs/devel/vfio-iommufd.rst: ``-object iommufd,id=iommufd0 -device
    vfio-pci,host=BDF,iommufd=iommufd0``) instead of the group and container.
    The process is killed on exit whatever happened.
    """
    qmp_path = RUN / f"qreset-lab-{name}.qmp"
    qmp_path.unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "128",
        "-nodefaults", "-display", "none", "-no-user-config",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]
    for extra_mon in monitors:
        extra_mon.unlink(missing_ok=True)
        argv += ["-qmp", f"unix:{extra_mon},server=on,wait=off"]
    if paused:
        argv.append("-S")
    if iommufd:
        argv += ["-object", "iommufd,id=iommufd0"]
    for i, dev in enumerate(devices):
        argv += ["-device", f"vfio-pci,host={dev},id=hostdev{i}" + (",iommufd=iommufd0" if iommufd else "")]
    argv += list(extra)
    log = RUN / f"qreset-lab-{name}.log"
    with open(log, "wb") as logf:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=logf, stderr=logf, stdin=asyncio.subprocess.DEVNULL,
        )
    client = QMPClient(name)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"nested QEMU did not start ({proc.returncode}): {log.read_text()}")
            if qmp_path.exists():
                try:
                    await client.connect(str(qmp_path))
                    break
                except Exception:  # retry until the socket accepts
                    pass
            await asyncio.sleep(0.05)
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for p in (qmp_path, *monitors):
            with contextlib.suppress(OSError):
                os.unlink(p)


async def timed_system_reset(client: QMPClient, timeout: float = 120) -> float:
    """Seconds from sending ``system_reset`` to QEMU's ``RESET`` event (QEMU's own device resets inside)."""
    listener = EventListener(("RESET",))
    with client.listen(listener):
        t0 = time.perf_counter()
        await client.execute("system_reset")
        await asyncio.wait_for(listener.get(), timeout)
        return time.perf_counter() - t0
