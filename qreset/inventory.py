"""
Inventory: which host PCI functions a VM owns.

Two sources, merged:

* QEMU itself, over QMP. ``query-pci`` lists every guest-visible function,
  walking bridges recursively (a device behind a ``pci-bridge`` or a PCIe root
  port appears only under its bridge's ``pci_bridge.devices``); the vfio-pci
  devices among the user-created ones are found with ``qom-list`` of
  ``/machine/peripheral`` (devices with an ``id=``) and
  ``/machine/peripheral-anon`` (without), whose entries are typed
  ``child<vfio-pci>``. For each, ``qom-get`` of ``sysfsdev`` (a sysfs path
  whose last component is the host BDF) or else ``host`` (the BDF, printed by
  QEMU's ``PCIHostDeviceAddress`` property as ``%04x:%02x:%02x.%d``) says which
  host function it is. Both properties come from ``vfio_pci_dev_properties``
  in QEMU's hw/vfio/pci.c. ``qom-get`` of ``iommufd`` says how QEMU opened it
  (:func:`backend_of`).
* The configuration's ``[[vm.device]]`` entries, for functions QMP cannot
  show (a device assigned another way, or our test guests, which have none).

Bad replies (a missing key, a non-list, an unparsable address) are logged and
skipped with one line naming the VM and the device: an inventory that misses
a device is reported, never a crash of the VM's connection.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol

from qemu.qmp import ExecuteError

from qreset.errors import AddressError, ProtocolError
from qreset.pci.address import PciAddress
from qreset.qemu_model import VfioBackend

logger = logging.getLogger(__name__)

#: QOM containers holding user-created devices (QEMU's qdev_set_id / qdev_get_peripheral{,_anon}).
PERIPHERAL_CONTAINERS = ("/machine/peripheral", "/machine/peripheral-anon")
VFIO_TYPE = "vfio-pci"


class Executor(Protocol):
    """What inventory needs of a QMP client (``QMPClient.execute`` fits)."""

    async def execute(self, cmd: str, arguments: dict[str, object] | None = None) -> object: ...


class Source(enum.StrEnum):
    QMP = "qmp"
    CONFIG = "config"


@dataclass(frozen=True, slots=True)
class GuestFunction:
    """One function as ``query-pci`` shows it (guest-side view)."""

    bus: int
    slot: int
    function: int
    vendor: int
    device: int
    class_code: int
    qdev_id: str

    @property
    def guest_address(self) -> str:
        return f"{self.bus:02x}:{self.slot:02x}.{self.function}"


@dataclass(frozen=True, slots=True)
class AssignedDevice:
    """A host function assigned to the VM."""

    host: PciAddress
    source: Source
    qom_path: str | None = None
    qdev_id: str | None = None
    guest_address: str | None = None
    #: How QEMU opened it (None: a configured device QMP did not show).
    backend: VfioBackend | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "host": str(self.host), "source": self.source.value, "qom_path": self.qom_path,
            "qdev_id": self.qdev_id, "guest_address": self.guest_address,
            "backend": self.backend.value if self.backend else None,
        }


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{where}: query-pci entry has no integer {key!r} ({value!r})")
    return value


def _opt_int(obj: object, key: str) -> int:
    """A descriptive field (vendor, device, class): 0 when absent or not an integer.

    These only label the guest view; a QEMU that sends a string or null there
    must not cost the VM its inventory (``int("x")`` would raise ValueError,
    which no caller expects from a reply).
    """
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def walk_query_pci(reply: object, where: str = "query-pci") -> list[GuestFunction]:
    """Flatten a ``query-pci`` reply, descending into every bridge's devices."""
    if not isinstance(reply, list):
        raise ProtocolError(f"{where}: expected a list of buses, got {type(reply).__name__}")
    out: list[GuestFunction] = []

    def visit(devices: object, depth: int) -> None:
        if depth > 32:  # 256 buses at most; a deeper nesting is a malformed reply
            raise ProtocolError(f"{where}: bridges nested more than 32 deep")
        if not isinstance(devices, list):
            raise ProtocolError(f"{where}: 'devices' is not a list")
        for dev in devices:
            if not isinstance(dev, dict):
                raise ProtocolError(f"{where}: a device entry is not an object")
            ident = dev.get("id")
            cls = dev.get("class_info")
            qdev_id = dev.get("qdev_id")
            out.append(GuestFunction(
                bus=_int(dev, "bus", where), slot=_int(dev, "slot", where),
                function=_int(dev, "function", where),
                vendor=_opt_int(ident, "vendor"), device=_opt_int(ident, "device"),
                class_code=_opt_int(cls, "class"),
                qdev_id=qdev_id if isinstance(qdev_id, str) else "",
            ))
            bridge = dev.get("pci_bridge")
            if isinstance(bridge, dict) and "devices" in bridge:
                visit(bridge["devices"], depth + 1)

    for bus in reply:
        if not isinstance(bus, dict):
            raise ProtocolError(f"{where}: a bus entry is not an object")
        visit(bus.get("devices", []), 0)
    return out


def host_address_of(sysfsdev: object, host: object) -> PciAddress | None:
    """The host BDF from vfio-pci's ``sysfsdev`` (preferred) or ``host`` property."""
    if isinstance(sysfsdev, str) and sysfsdev:
        try:
            return PciAddress.parse(PurePosixPath(sysfsdev).name)
        except AddressError:
            return None  # e.g. an mdev (UUID): not a PCI function we can reset
    if isinstance(host, str) and host:
        return PciAddress.parse(host)
    return None


def backend_of(iommufd_link: object) -> VfioBackend:
    """How QEMU opened a vfio-pci device, from ``qom-get`` of its ``iommufd`` property.

    The property is a QOM link to an ``iommufd`` backend object (hw/vfio/pci.c:
    ``DEFINE_PROP_LINK("iommufd", VFIOPCIDevice, vbasedev.iommufd,
    TYPE_IOMMUFD_BACKEND, ...)``, QEMU 8.2+, when built with CONFIG_IOMMUFD).
    Reading a link gives the target's canonical path ("/objects/iommufd0"), or
    "" when unset (qom/object.c ``object_get_link_property``): set, QEMU opened
    the device's cdev (/dev/vfio/devices/vfioN) and bound it to that iommufd
    (hw/vfio/iommufd.c); unset, it used the legacy group and container.
    Anything else (no such property: an older QEMU) is the group path too.
    """
    return VfioBackend.IOMMUFD if isinstance(iommufd_link, str) and iommufd_link else VfioBackend.GROUP


async def vfio_devices(qmp: Executor, vm: str) -> list[AssignedDevice]:
    """Every vfio-pci device of the VM, with its host function and guest address."""
    guest_by_id: dict[str, GuestFunction] = {}
    try:
        for fn in walk_query_pci(await qmp.execute("query-pci"), f"VM {vm}: query-pci"):
            if fn.qdev_id:
                guest_by_id[fn.qdev_id] = fn
    except ProtocolError as exc:
        logger.warning("%s", exc)
    except ExecuteError as exc:  # guest addresses only label the devices: go on without them
        logger.warning("VM %s: query-pci failed: %s", vm, exc)
    found: list[AssignedDevice] = []
    for container in PERIPHERAL_CONTAINERS:
        try:
            children = await qmp.execute("qom-list", {"path": container})
        except ExecuteError:
            continue  # the container is created on first use: no such devices
        if not isinstance(children, list):
            logger.warning("VM %s: qom-list %s: expected a list", vm, container)
            continue
        for child in children:
            if not isinstance(child, dict) or child.get("type") != f"child<{VFIO_TYPE}>":
                continue
            name = str(child.get("name", ""))
            path = f"{container}/{name}"
            sysfsdev: object = None
            host: object = None
            try:
                # Each property on its own: one that QEMU refuses must not hide the other.
                with contextlib.suppress(ExecuteError):
                    sysfsdev = await qmp.execute("qom-get", {"path": path, "property": "sysfsdev"})
                with contextlib.suppress(ExecuteError):
                    host = await qmp.execute("qom-get", {"path": path, "property": "host"})
                addr = host_address_of(sysfsdev, host)
            except AddressError as exc:
                logger.warning("VM %s: %s: vfio-pci host: %s", vm, path, exc)
                continue
            if addr is None:
                logger.warning("VM %s: %s has no host PCI address (sysfsdev=%r host=%r)",
                               vm, path, sysfsdev, host)
                continue
            link: object = None
            with contextlib.suppress(ExecuteError):  # no such property before QEMU 8.2
                link = await qmp.execute("qom-get", {"path": path, "property": "iommufd"})
            qdev_id = name if container == "/machine/peripheral" else None
            guest = guest_by_id.get(qdev_id) if qdev_id else None
            found.append(AssignedDevice(
                host=addr, source=Source.QMP, qom_path=path, qdev_id=qdev_id,
                guest_address=guest.guest_address if guest else None, backend=backend_of(link),
            ))
    return found


def merge(from_qmp: Iterable[AssignedDevice], configured: Sequence[PciAddress]) -> list[AssignedDevice]:
    """QMP's devices plus the configured ones QMP did not show, sorted by host address."""
    out = {d.host: d for d in from_qmp}
    for addr in configured:
        out.setdefault(addr, AssignedDevice(host=addr, source=Source.CONFIG))
    return [out[a] for a in sorted(out)]


async def read_inventory(qmp: Executor, vm: str, configured: Sequence[PciAddress]) -> list[AssignedDevice]:
    return merge(await vfio_devices(qmp, vm), configured)
