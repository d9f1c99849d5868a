"""qreset serving a nested QEMU that opens its devices through iommufd and VFIO device cdevs.

Needs a kernel with ``CONFIG_IOMMUFD`` and ``CONFIG_VFIO_DEVICE_CDEV``: only the
trixie-iommufd lab stack has one (Ubuntu 24.04's 6.8; Debian's kernels are built
without, scripts/lab/README.md), so these tests carry the ``iommufd`` marker and
the other stacks deselect them (scripts/lab/run's default arguments).

What they prove, each with the kernel's own evidence:

* the kernel offers ``/dev/iommu`` and a ``/dev/vfio/devices/vfioN`` cdev per
  vfio-pci function;
* a nested QEMU 10 given ``-object iommufd`` and ``vfio-pci,...,iommufd=`` is
  served by ``qreset run`` in park mode exactly as the group path is
  (tests/lab/park.py): qreset's inventory finds the host functions and reads
  the iommufd backend from QOM, the planner predicts QEMU's resets for that
  backend, every cycle resumes the guest, and the kernel's FLR kprobe fires;
* the VFIO hot reset: qreset may issue it on idle devices (the group path
  works on this kernel), but not on a device a QEMU holds through its cdev: the
  kernel refuses both ways in (its group: EBUSY; a second bind of its cdev:
  EINVAL), and qreset says so in one line.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from pathlib import Path

import pytest

from qreset.errors import ResetFailed
from qreset.pci import vfio
from qreset.pci.address import PciAddress
from qreset.qemu_model import QemuAction, VfioBackend
from tests.lab.labhost import PCI, KernelLog, Roles, bind_group_vfio, restored
from tests.lab.nested import nested_qemu
from tests.lab.park import check_flr_cycles, park_cycles

pytestmark = [pytest.mark.lab, pytest.mark.iommufd]

WORK = Path("/run/qreset-lab-iommufd")

#: include/uapi/linux/vfio.h (Linux 6.6+): VFIO_DEVICE_BIND_IOMMUFD is
#: _IO(VFIO_TYPE, VFIO_BASE + 18), struct vfio_device_bind_iommufd
#: { __u32 argsz; __u32 flags; __s32 iommufd; __u32 out_devid; }.
VFIO_DEVICE_BIND_IOMMUFD = (ord(";") << 8) | (100 + 18)


class VfioDeviceBindIommufd(ctypes.Structure):
    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("iommufd", ctypes.c_int32), ("out_devid", ctypes.c_uint32))


def cdev(addr: PciAddress) -> Path:
    """The function's VFIO device cdev: /sys/bus/pci/devices/BDF/vfio-dev/vfioN names it
    (drivers/vfio/vfio_main.c, vfio_init_device_cdev: "vfio%d" under vfio-dev)."""
    (name,) = [p.name for p in (PCI / str(addr) / "vfio-dev").iterdir()]
    return Path("/dev/vfio/devices") / name


def bind_own_iommufd(addr: PciAddress) -> int:
    """Open ``addr``'s cdev and bind it to a fresh iommufd context, as QEMU does; the errno.

    0 means it bound (everything is closed again, which unbinds it).
    """
    iommu = os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
    try:
        dev = os.open(cdev(addr), os.O_RDWR | os.O_CLOEXEC)
        try:
            bind = VfioDeviceBindIommufd(argsz=ctypes.sizeof(VfioDeviceBindIommufd), iommufd=iommu)
            try:
                fcntl.ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, bind, True)
            except OSError as err:
                return err.errno or -1
            return 0
        finally:
            os.close(dev)
    finally:
        os.close(iommu)


def open_errno(path: Path) -> int:
    """0 when ``path`` opens read-write (and is closed again), else the errno."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        return err.errno or -1
    return 0


def test_kernel_offers_iommufd_and_cdevs(roles: Roles) -> None:
    assert Path("/dev/iommu").exists(), "no /dev/iommu: the kernel has no iommufd"
    addr = roles["virtio2"]
    bind_group_vfio(addr)
    path = cdev(addr)
    assert path.exists(), f"{path} missing"
    # Idle: anyone may bind it to their own iommufd (and closing unbinds it).
    assert bind_own_iommufd(addr) == 0


async def test_park_mode_cycles_over_iommufd(roles: Roles, witnesses: list[str]) -> None:
    """The group path's park-mode test (tests/lab/test_daemon.py) with QEMU on iommufd."""
    devices = [roles["virtio1"], roles["nvme1"]]
    for d in devices:
        bind_group_vfio(d)
    run = await park_cycles(devices, WORK, iommufd=True)
    # qreset's inventory: the host functions, each opened through iommufd.
    assert sorted(d.host for d in run.inventory) == sorted(devices)
    assert {d.backend for d in run.inventory} == {VfioBackend.IOMMUFD}, run.inventory
    assert "(iommufd)" in run.daemon_log, run.daemon_log[-3000:]
    flrs = check_flr_cycles(run, devices)
    print("kernel FLR evidence:", *flrs[:4], sep="\n  ")
    # The planner predicted QEMU's own reset for the backend the inventory found.
    for c in run.cycles:
        qemu = c["report"]["plan"]["qemu"]
        assert sorted(q["function"] for q in qemu) == sorted(map(str, devices))
        assert {q["backend"] for q in qemu} == {"iommufd"}, qemu
        assert {q["action"] for q in qemu} == {QemuAction.FUNCTION_RESET.value}, qemu


async def test_hot_reset_where_qreset_may_and_may_not(roles: Roles, witnesses: list[str]) -> None:
    """Idle: qreset's VFIO hot reset runs (kernel SBR + restores). Held by QEMU through its
    cdev: the kernel refuses every way in and qreset names the reason in one line."""
    addr = roles["virtio2"]
    group = bind_group_vfio(addr)
    log = KernelLog("iommufd idle hot reset")
    vfio.hot_reset([addr], [group])
    lines = log.lines()
    assert any("qreset_sbr:" in line for line in lines), "\n".join(lines[-50:])
    assert restored(lines, addr), "no restore after the hot reset:\n" + "\n".join(lines[-50:])

    async with nested_qemu("l2-held", [addr], iommufd=True) as client:
        status = await client.execute("query-status")
        assert isinstance(status, dict)
        assert status["status"] == "prelaunch", status
        # The group: vfio_group_fops_open refuses while a device of it is bound through
        # its cdev (drivers/vfio/group.c, group->cdev_device_open_cnt).
        assert open_errno(Path(f"/dev/vfio/{group}")) == errno.EBUSY
        # The cdev: vfio_df_open lets only the group path open a device twice
        # (drivers/vfio/vfio_main.c: open_count != 0 && !df->group -> -EINVAL).
        assert bind_own_iommufd(addr) == errno.EINVAL
        with pytest.raises(ResetFailed) as failed:
            vfio.hot_reset([addr], [group])
        line = str(failed.value)
        print("qreset:", line)
        assert "\n" not in line
        assert f"group {group} is held by another process" in line
        assert "cdev" in line
