"""
VFIO hot reset of idle vfio-pci devices (legacy group/container interface).

Why this exists: the kernel's ``reset_method=bus`` only works when a function
is alone below its bridge, and ``reset_subordinate`` only exists from about
Linux 6.13. ``VFIO_DEVICE_PCI_HOT_RESET`` resets a whole slot or secondary bus
(with the kernel saving and restoring every affected function's state) as long
as every affected device is bound to vfio-pci and the caller proves ownership
by passing the affected groups' file descriptors. A companion can only do this
for groups no QEMU holds: a VFIO group file is open in one process at a time
(a second ``open`` gets EBUSY). A QEMU on iommufd holds devices through their
cdevs (/dev/vfio/devices/vfioN) instead, and that shuts qreset out as well:
the group's ``open`` gets EBUSY while any of its devices is bound through a
cdev (drivers/vfio/group.c ``vfio_group_fops_open``,
``cdev_device_open_cnt``), and a second bind of the cdev gets EINVAL (only
the group path may open a device twice: drivers/vfio/vfio_main.c
``vfio_df_open``). So on either backend the hot reset is only for devices no
QEMU holds, which the group path below serves on kernels with VFIO device
cdevs too (``CONFIG_VFIO_GROUP``); the daemon never plans it for a running
VM's devices (``Policy.vfio_ioctl_ok``).

Every number below is from ``include/uapi/linux/vfio.h``: the ioctls are plain
``_IO(VFIO_TYPE, VFIO_BASE + n)`` with ``VFIO_TYPE`` = ``';'`` (0x3B) and
``VFIO_BASE`` = 100 (the header deliberately puts no size in the request; the
``argsz`` field of each structure carries it).

Side effect worth knowing (``vfio_pci_core_enable``/``vfio_pci_core_disable``
in ``drivers/vfio/pci/vfio_pci_core.c``): opening a device file descriptor
resets the function (``pci_try_reset_function``) and closing it resets it
again; this module keeps device descriptors open only for the ioctl.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from qreset.errors import ResetFailed
from qreset.pci.address import PciAddress

log = logging.getLogger(__name__)

# include/uapi/linux/vfio.h: #define VFIO_TYPE (';'), #define VFIO_BASE 100
_VFIO_TYPE = ord(";")  # 0x3B
_VFIO_BASE = 100


def _io(nr: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + nr)`` (include/uapi/asm-generic/ioctl.h: dir 0, size 0)."""
    return (_VFIO_TYPE << 8) | (_VFIO_BASE + nr)


#: Container (/dev/vfio/vfio) ioctls, include/uapi/linux/vfio.h.
VFIO_GET_API_VERSION = _io(0)        # 0x3B64; returns VFIO_API_VERSION
VFIO_CHECK_EXTENSION = _io(1)        # 0x3B65
VFIO_SET_IOMMU = _io(2)              # 0x3B66; needs a group attached first
#: Group (/dev/vfio/N) ioctls.
VFIO_GROUP_GET_STATUS = _io(3)       # 0x3B67; struct vfio_group_status
VFIO_GROUP_SET_CONTAINER = _io(4)    # 0x3B68; arg: pointer to the container fd (__s32)
VFIO_GROUP_GET_DEVICE_FD = _io(6)    # 0x3B6A; arg: device name string; returns a new fd
#: Device ioctls (vfio-pci).
VFIO_DEVICE_RESET = _io(11)                      # 0x3B6F
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _io(12)     # 0x3B70; struct vfio_pci_hot_reset_info
VFIO_DEVICE_PCI_HOT_RESET = _io(13)              # 0x3B71; struct vfio_pci_hot_reset

VFIO_API_VERSION = 0          # #define VFIO_API_VERSION 0
VFIO_TYPE1_IOMMU = 1          # #define VFIO_TYPE1_IOMMU 1
VFIO_TYPE1v2_IOMMU = 3        # #define VFIO_TYPE1v2_IOMMU 3
VFIO_GROUP_FLAGS_VIABLE = 1 << 0   # struct vfio_group_status.flags
#: struct vfio_pci_hot_reset_info.flags (Linux 6.5+, iommufd cdev mode). With
#: the group interface neither is set and ``group_id_or_devid`` is a group id.
VFIO_PCI_HOT_RESET_FLAG_DEV_ID = 1 << 0
VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED = 1 << 1

#: First guess of affected devices; the kernel answers ENOSPC with the real
#: count when the array is too small and we retry once with that count.
_INITIAL_COUNT = 8


class VfioGroupStatus(ctypes.Structure):
    """``struct vfio_group_status { __u32 argsz; __u32 flags; }``."""

    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class VfioPciDependentDevice(ctypes.Structure):
    """``struct vfio_pci_dependent_device``: u32 group_id (or devid), u16 segment, u8 bus, u8 devfn."""

    _fields_ = (
        ("group_id", ctypes.c_uint32),
        ("segment", ctypes.c_uint16),
        ("bus", ctypes.c_uint8),
        ("devfn", ctypes.c_uint8),
    )


class VfioPciHotResetInfoHeader(ctypes.Structure):
    """``struct vfio_pci_hot_reset_info { __u32 argsz, flags, count; devices[]; }`` without the array."""

    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("count", ctypes.c_uint32))


class VfioPciHotResetHeader(ctypes.Structure):
    """``struct vfio_pci_hot_reset { __u32 argsz, flags, count; __s32 group_fds[]; }`` without the array."""

    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("count", ctypes.c_uint32))


assert ctypes.sizeof(VfioPciDependentDevice) == 8
assert ctypes.sizeof(VfioPciHotResetInfoHeader) == 12


def _hot_reset_info_buffer(
    count: int,
) -> tuple[ctypes.Structure, VfioPciHotResetInfoHeader, ctypes.Array[VfioPciDependentDevice]]:
    """One buffer of ``argsz`` bytes: the header followed by room for ``count`` devices.

    Returns the buffer (what the ioctl gets) and views of its two parts.
    """

    class Info(ctypes.Structure):
        _fields_ = (("hdr", VfioPciHotResetInfoHeader), ("devices", VfioPciDependentDevice * count))

    info = Info()
    info.hdr.argsz = ctypes.sizeof(Info)
    return info, info.hdr, info.devices


def _errno_text(err: OSError) -> str:
    code = errno.errorcode.get(err.errno or 0, str(err.errno))
    return f"{code}: {os.strerror(err.errno or 0)}"


def _group_path(dev_root: str | os.PathLike[str], group: int) -> Path:
    return Path(dev_root) / "vfio" / str(group)


def _open_group(dev_root: str | os.PathLike[str], group: int) -> int:
    path = _group_path(dev_root, group)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise ResetFailed(str(path), (
                f"group {group} is held by another process (a QEMU holding the group, or one "
                "of its devices through the device's VFIO cdev with iommufd): VFIO hot reset "
                "is only for devices no QEMU holds")) from err
        if err.errno == errno.ENOENT:
            raise ResetFailed(
                str(path), f"no VFIO group {group} (is every device of the group bound to vfio-pci?)",
            ) from err
        raise ResetFailed(str(path), f"cannot open VFIO group {group}: {_errno_text(err)}") from err
    status = VfioGroupStatus(argsz=ctypes.sizeof(VfioGroupStatus))
    try:
        fcntl.ioctl(fd, VFIO_GROUP_GET_STATUS, status, True)
    except OSError as err:
        os.close(fd)
        raise ResetFailed(str(path), f"VFIO_GROUP_GET_STATUS: {_errno_text(err)}") from err
    if not status.flags & VFIO_GROUP_FLAGS_VIABLE:
        os.close(fd)
        raise ResetFailed(
            str(path), f"group {group} is not viable: a device in it is bound to a host driver",
        )
    return fd


@contextmanager
def _container(groups: Sequence[int], dev_root: str | os.PathLike[str]) -> Iterator[dict[int, int]]:
    """Open ``/dev/vfio/vfio`` and every group, attach the groups, set a type1 IOMMU.

    Yields ``{group: fd}``. A device fd (VFIO_GROUP_GET_DEVICE_FD) is only
    handed out once the group sits in a container with an IOMMU model set
    (``vfio_group_ioctl_get_device_fd`` checks ``vfio_group_has_iommu``).
    Everything is closed on exit, which detaches the groups again.
    """
    vfio_path = Path(dev_root) / "vfio" / "vfio"
    with ExitStack() as stack:
        try:
            container = os.open(vfio_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise ResetFailed(str(vfio_path), f"cannot open the VFIO container: {_errno_text(err)}") from err
        stack.callback(os.close, container)
        try:
            version = fcntl.ioctl(container, VFIO_GET_API_VERSION)
        except OSError as err:
            raise ResetFailed(str(vfio_path), f"VFIO_GET_API_VERSION: {_errno_text(err)}") from err
        if version != VFIO_API_VERSION:
            raise ResetFailed(str(vfio_path), f"unknown VFIO API version {version}")
        fds: dict[int, int] = {}
        for group in dict.fromkeys(groups):  # keep order, drop repeats
            fd = _open_group(dev_root, group)
            stack.callback(os.close, fd)
            fds[group] = fd
            try:
                fcntl.ioctl(fd, VFIO_GROUP_SET_CONTAINER, struct.pack("i", container))
            except OSError as err:
                raise ResetFailed(
                    str(_group_path(dev_root, group)), f"VFIO_GROUP_SET_CONTAINER: {_errno_text(err)}",
                ) from err
        if fds:
            try:
                v2 = fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)
                fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU if v2 else VFIO_TYPE1_IOMMU)
            except OSError as err:
                raise ResetFailed(str(vfio_path), f"VFIO_SET_IOMMU: {_errno_text(err)}") from err
        yield fds


def _device_fd(group_fd: int, group: int, device: PciAddress, dev_root: str | os.PathLike[str]) -> int:
    name = bytearray(str(device).encode() + b"\0")
    try:
        fd: int = fcntl.ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, name, True)
    except OSError as err:
        raise ResetFailed(
            str(_group_path(dev_root, group)),
            f"VFIO_GROUP_GET_DEVICE_FD {device}: {_errno_text(err)}"
            + (" (device opened elsewhere)" if err.errno == errno.EBUSY else ""),
        ) from err
    return fd


def _query_info(device_fd: int, device: PciAddress) -> list[tuple[PciAddress, int]]:
    count = _INITIAL_COUNT
    for _attempt in range(3):
        buf, hdr, devices = _hot_reset_info_buffer(count)
        try:
            fcntl.ioctl(device_fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf, True)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                # vfio_pci_ioctl_get_pci_hot_reset_info copies the header back
                # with the count it needs before returning -ENOSPC.
                count = max(hdr.count, count * 2)
                continue
            if err.errno == errno.ENODEV:
                raise ResetFailed(
                    str(device), "no hot reset possible: neither a slot nor a bus reset is available",
                ) from err
            raise ResetFailed(str(device), f"VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: {_errno_text(err)}") from err
        out: list[tuple[PciAddress, int]] = []
        for i in range(hdr.count):
            dep = devices[i]
            out.append((PciAddress(dep.segment, dep.bus, dep.devfn >> 3, dep.devfn & 7), dep.group_id))
        return out
    raise ResetFailed(str(device), "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: ENOSPC again after resizing")


def hot_reset_info(
    device: PciAddress, group: int, dev_root: str | os.PathLike[str] = "/dev",
) -> list[tuple[PciAddress, int]]:
    """Every device a hot reset of ``device`` (in IOMMU group ``group``) would hit, with its group.

    The kernel walks the slot (when ``pci_probe_reset_slot`` succeeds) or the
    bus (``vfio_pci_for_each_slot_or_bus``) and lists each function with its
    IOMMU group, including ``device`` itself.
    """
    with _container([group], dev_root) as fds:
        fd = _device_fd(fds[group], group, device, dev_root)
        try:
            return _query_info(fd, device)
        finally:
            os.close(fd)


def hot_reset(
    devices: Sequence[PciAddress], groups: Sequence[int], dev_root: str | os.PathLike[str] = "/dev",
) -> None:
    """Hot reset (slot or secondary bus) the domain of ``devices[0]``, proving ownership of ``groups``.

    ``groups`` must name every IOMMU group with a device the reset hits
    (:func:`hot_reset_info`); the kernel refuses otherwise (EINVAL), and
    refuses with EBUSY when another process has one of the devices open.
    ``devices[0]`` must belong to one of ``groups``; the others are checked
    against the kernel's list so a stale plan is caught before the reset.
    """
    if not devices:
        raise ResetFailed("vfio", "hot reset of no device")
    if not groups:
        raise ResetFailed(str(devices[0]), "hot reset needs the affected IOMMU groups")
    target = devices[0]
    with _container(groups, dev_root) as fds:
        fd = -1
        errors: list[str] = []
        for group, gfd in fds.items():
            try:
                fd = _device_fd(gfd, group, target, dev_root)
                break
            except ResetFailed as err:
                errors.append(err.why)
        if fd < 0:
            raise ResetFailed(str(target), "not in any of the given groups: " + "; ".join(errors))
        try:
            affected = _query_info(fd, target)
            hit = {addr for addr, _g in affected}
            stray = [str(d) for d in devices if d not in hit]
            if stray:
                raise ResetFailed(str(target), f"a hot reset of {target} would not hit {', '.join(stray)}")
            missing = sorted({g for _a, g in affected} - set(fds))
            if missing:
                raise ResetFailed(
                    str(target),
                    "the hot reset also hits group(s) " + ", ".join(map(str, missing)) + " not given",
                )

            class Reset(ctypes.Structure):
                _fields_ = (("hdr", VfioPciHotResetHeader), ("group_fds", ctypes.c_int32 * len(fds)))

            req = Reset()
            req.hdr.argsz = ctypes.sizeof(Reset)
            req.hdr.count = len(fds)
            for i, gfd in enumerate(fds.values()):
                req.group_fds[i] = gfd
            log.debug("VFIO hot reset of %s (groups %s)", target, list(fds))
            try:
                fcntl.ioctl(fd, VFIO_DEVICE_PCI_HOT_RESET, req, True)
            except OSError as err:
                why = _errno_text(err)
                if err.errno == errno.EBUSY:
                    why += " (an affected device is in use or its lock is held)"
                elif err.errno == errno.EINVAL:
                    # vfio_pci_dev_set_hot_reset: every function on the slot/bus must be
                    # bound to vfio-pci (in the device set) and every group be given.
                    why += (" (every function the reset hits must be bound to vfio-pci: "
                            + ", ".join(str(a) for a, _g in affected) + ")")
                raise ResetFailed(str(target), f"VFIO_DEVICE_PCI_HOT_RESET: {why}") from err
        finally:
            os.close(fd)


async def hot_reset_info_async(
    device: PciAddress, group: int, dev_root: str | os.PathLike[str] = "/dev",
) -> list[tuple[PciAddress, int]]:
    """:func:`hot_reset_info` in a worker thread (opening a device resets it: it blocks)."""
    return await asyncio.to_thread(hot_reset_info, device, group, dev_root)


async def hot_reset_async(
    devices: Sequence[PciAddress], groups: Sequence[int], dev_root: str | os.PathLike[str] = "/dev",
) -> None:
    """:func:`hot_reset` in a worker thread (the ioctl sleeps through the whole bus reset)."""
    await asyncio.to_thread(hot_reset, list(devices), list(groups), dev_root)
