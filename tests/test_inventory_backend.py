"""How qreset tells a vfio-pci device opened through iommufd from one opened through its group.

QEMU says it in QOM: the vfio-pci device's ``iommufd`` link property
(hw/vfio/pci.c) reads as the linked object's path, "" when unset, and does not
exist before QEMU 8.2. A real QEMU with an iommufd-assigned device needs a host
kernel with iommufd (this one has none): the lab proves it on a real kernel and
QEMU 10 (tests/lab/test_iommufd.py); here the mapping and the QMP sequence.
"""

from __future__ import annotations

from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse

from qreset.inventory import backend_of, vfio_devices
from qreset.pci.address import PciAddress
from qreset.qemu_model import VfioBackend


@pytest.mark.parametrize(("reply", "backend"), [
    ("/objects/iommufd0", VfioBackend.IOMMUFD),  # -device vfio-pci,...,iommufd=iommufd0
    ("", VfioBackend.GROUP),                    # link unset: the legacy container
    (None, VfioBackend.GROUP),                  # no such property (QEMU < 8.2)
    (0, VfioBackend.GROUP),                     # anything but a path
])
def test_backend_of(reply: object, backend: VfioBackend) -> None:
    assert backend_of(reply) is backend


def _error(text: str) -> ExecuteError:
    reply = Message({"error": {"class": "GenericError", "desc": text}})
    return ExecuteError(ErrorResponse(reply), Message({"execute": "qom-get"}), reply)


class FakeQemu:
    """Replies like QEMU 10 with two vfio-pci devices, one of them on iommufd; ``old``:
    like QEMU 7.2, which has no ``iommufd`` property."""

    def __init__(self, old: bool = False) -> None:
        self.old = old

    async def execute(self, cmd: str, arguments: dict[str, object] | None = None) -> object:
        args: dict[str, Any] = dict(arguments or {})
        if cmd == "query-pci":
            return []
        if cmd == "qom-list":
            if args["path"] != "/machine/peripheral":
                raise _error("Device '/machine/peripheral-anon' not found")
            return [{"name": "hostdev0", "type": "child<vfio-pci>"},
                    {"name": "hostdev1", "type": "child<vfio-pci>"}]
        assert cmd == "qom-get", cmd
        dev, prop = args["path"].rsplit("/", 1)[1], args["property"]
        if prop == "sysfsdev":
            return ""
        if prop == "host":
            return {"hostdev0": "0000:01:00.0", "hostdev1": "0000:02:00.0"}[dev]
        if prop == "iommufd":
            if self.old:
                raise _error("Property 'vfio-pci.iommufd' not found")
            return "/objects/iommufd0" if dev == "hostdev0" else ""
        raise AssertionError(prop)


async def test_inventory_reads_each_devices_backend() -> None:
    found = {d.host: d.backend for d in await vfio_devices(FakeQemu(), "vm")}
    assert found == {PciAddress.parse("0000:01:00.0"): VfioBackend.IOMMUFD,
                     PciAddress.parse("0000:02:00.0"): VfioBackend.GROUP}


async def test_inventory_of_a_qemu_without_iommufd_is_group() -> None:
    found = await vfio_devices(FakeQemu(old=True), "vm")
    assert [d.backend for d in found] == [VfioBackend.GROUP, VfioBackend.GROUP]
    assert [d.to_json()["backend"] for d in found] == ["group", "group"]
