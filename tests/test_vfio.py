"""qreset.pci.vfio on any host: ABI numbers and layouts, and clear errors without VFIO.

The real ioctls run in the lab (tests/lab/test_vfio.py, tests/lab/test_reset.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from qreset.errors import ResetFailed
from qreset.pci import vfio
from qreset.pci.address import PciAddress

ADDR = PciAddress.parse("0000:01:00.0")


def test_ioctl_numbers_match_the_uapi_header() -> None:
    # include/uapi/linux/vfio.h: _IO(';', 100 + n); values as strace prints them.
    assert vfio.VFIO_GET_API_VERSION == 0x3B64
    assert vfio.VFIO_SET_IOMMU == 0x3B66
    assert vfio.VFIO_GROUP_GET_STATUS == 0x3B67
    assert vfio.VFIO_GROUP_SET_CONTAINER == 0x3B68
    assert vfio.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert vfio.VFIO_DEVICE_RESET == 0x3B6F
    assert vfio.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO == 0x3B70
    assert vfio.VFIO_DEVICE_PCI_HOT_RESET == 0x3B71


def test_structure_layouts() -> None:
    assert ctypes.sizeof(vfio.VfioPciDependentDevice) == 8
    assert vfio.VfioPciDependentDevice.segment.offset == 4
    assert vfio.VfioPciDependentDevice.devfn.offset == 7
    assert ctypes.sizeof(vfio.VfioPciHotResetInfoHeader) == 12
    buf, hdr, devices = vfio._hot_reset_info_buffer(3)
    assert hdr.argsz == ctypes.sizeof(buf) == 12 + 3 * 8
    assert len(devices) == 3


def test_no_vfio_container(tmp_path: Path) -> None:
    with pytest.raises(ResetFailed, match=r"vfio/vfio: cannot open the VFIO container: ENOENT"):
        vfio.hot_reset_info(ADDR, 7, dev_root=tmp_path)


def test_hot_reset_needs_devices_and_groups(tmp_path: Path) -> None:
    with pytest.raises(ResetFailed, match="hot reset of no device"):
        vfio.hot_reset([], [1], dev_root=tmp_path)
    with pytest.raises(ResetFailed, match="needs the affected IOMMU groups"):
        vfio.hot_reset([ADDR], [], dev_root=tmp_path)


async def test_async_wrapper_reports_the_same_error(tmp_path: Path) -> None:
    with pytest.raises(ResetFailed, match="cannot open the VFIO container"):
        await vfio.hot_reset_async([ADDR], [3], dev_root=tmp_path)


def test_not_a_vfio_container(tmp_path: Path) -> None:
    """A file that is not the VFIO character device: the first ioctl fails and says which."""
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "vfio").write_bytes(b"")
    with pytest.raises(ResetFailed, match=r"VFIO_GET_API_VERSION: ENOTTY"):
        vfio.hot_reset_info(ADDR, 7, dev_root=tmp_path)
