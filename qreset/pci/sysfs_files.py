"""
Reading and writing sysfs attribute files, each failure one line naming the path.

The kernel's formats (drivers/pci/pci-sysfs.c): ids as ``0x%04x``, ``resource``
as ``0x%016llx 0x%016llx 0x%016llx`` lines, links for ``driver``,
``iommu_group``, ``physfn``/``virtfnN``. Garbage in a file (a non-hex id, a
malformed ``resource`` line) becomes a :class:`~qreset.errors.HostError` rather
than a crash. Used by :mod:`qreset.pci.sysfs`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

from qreset.errors import AddressError, HostError, NoSuchFunction
from qreset.pci.address import PciAddress
from qreset.pci.host import FunctionInfo, Resource, RuntimeState

logger = logging.getLogger("qreset.pci.sysfs")


_HEX_RE = re.compile(r"0x[0-9a-fA-F]+")
# "pciDDDD:BB": the directory of a root bus's host bridge (pci_create_root_bus:
# dev_set_name(&bridge->dev, "pci%04x:%02x", ...) in drivers/pci/probe.c).
_ROOT_BUS_RE = re.compile(r"pci[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}")
_VIRTFN_RE = re.compile(r"virtfn(\d+)")
# Hotplug drivers whose hotplug_slot_ops have .reset_slot: pciehp
# (pciehp_reset_slot in drivers/pci/hotplug/pciehp_hpc.c).
_SLOT_RESET_DRIVERS = frozenset({"pciehp"})


def _why(exc: OSError) -> str:
    """The strerror of ``exc`` (what ``echo`` would print), never empty."""
    return exc.strerror or str(exc) or type(exc).__name__


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise HostError(str(path), "missing") from None
    except UnicodeDecodeError:
        raise HostError(str(path), "not ASCII text") from None
    except OSError as exc:
        raise HostError(str(path), _why(exc)) from exc


def _read_optional(path: Path) -> str | None:
    """Contents of ``path``, or None when it does not exist."""
    try:
        return _read_text(path)
    except HostError as exc:
        if exc.why == "missing":
            return None
        raise


def _parse_hex(path: Path, text: str, limit: int) -> int:
    word = text.strip()
    if not _HEX_RE.fullmatch(word):
        raise HostError(str(path), f"expected a 0x-prefixed hex number, got {word[:40]!r}")
    value = int(word, 16)
    if value > limit:
        raise HostError(str(path), f"value {word} is out of range (max {limit:#x})")
    return value


def _read_hex(path: Path, limit: int) -> int:
    return _parse_hex(path, _read_text(path), limit)


def _parse_resources(path: Path, text: str) -> tuple[Resource, ...]:
    """``resource_show`` output: ``0x%016llx 0x%016llx 0x%016llx`` per line."""
    out: list[Resource] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not all(_HEX_RE.fullmatch(f) for f in fields):
            raise HostError(
                str(path), f"line {lineno}: expected 'start end flags' in hex, got {line[:80]!r}"
            )
        # end < start is left alone: the kernel prints empty windows that way.
        start, end, flags = (int(f, 16) for f in fields)
        out.append(Resource(start, end, flags))
    return tuple(out)


def _link_name(path: Path) -> str | None:
    """Basename of the symlink ``path`` points to, or None when there is no link."""
    try:
        return os.path.basename(os.readlink(path))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # exists but is not a symlink
            raise HostError(str(path), "expected a symbolic link") from exc
        raise HostError(str(path), _why(exc)) from exc


def _link_address(path: Path) -> PciAddress | None:
    name = _link_name(path)
    if name is None:
        return None
    try:
        return PciAddress.parse(name)
    except AddressError as exc:
        raise HostError(str(path), f"link target {name!r} is not a PCI address") from exc


def _open(path: Path, flags: int, error: type[HostError] = HostError,
          missing: type[HostError] | None = None) -> int:
    """``os.open`` a sysfs file, mapping errors to one line naming ``path``.

    A missing file raises ``missing`` (default: ``error``): for ``config`` that
    is NoSuchFunction, the function is gone.
    """
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise (missing or error)(str(path), "missing") from None
    except OSError as exc:
        raise error(str(path), _why(exc)) from exc


def _write(path: Path, text: str, error: type[HostError] = HostError) -> None:
    """One ``write(2)`` of ``text`` to a sysfs attribute (blocking: run in the pool).

    Sysfs stores parse one write call, so the text goes out in a single
    ``os.write``; a short write is reported rather than retried. ``O_TRUNC``
    is what ``echo >`` does: ignored by sysfs, but it makes a tree of plain
    files (tests, ``SimHost.write_tree``) hold exactly the last value.
    """
    data = text.encode("ascii")
    fd = _open(path, os.O_WRONLY | os.O_TRUNC, error)
    try:
        n = os.write(fd, data)
    except OSError as exc:
        raise error(str(path), f"writing {text.strip()!r}: {_why(exc)}") from exc
    finally:
        os.close(fd)
    if n != len(data):
        raise error(str(path), f"short write of {text.strip()!r} ({n} of {len(data)} bytes)")


def read_runtime(d: Path) -> RuntimeState:
    """driver link, driver_override, reset_method, reset, virtfnN links: one listdir + 3 reads."""
    try:
        entries = os.listdir(d)
    except FileNotFoundError:
        raise NoSuchFunction(str(d), "removed while reading its attributes") from None
    except OSError as exc:
        raise HostError(str(d), _why(exc)) from exc
    override = _read_optional(d / "driver_override") if "driver_override" in entries else None
    override = None if override is None else override.strip()
    methods_text = _read_optional(d / "reset_method") if "reset_method" in entries else None
    virtfns: list[tuple[int, PciAddress]] = []
    for entry in entries:
        m = _VIRTFN_RE.fullmatch(entry)
        if m:
            vf = _link_address(d / entry)
            if vf is not None:
                virtfns.append((int(m[1]), vf))
    return RuntimeState(
        driver=_link_name(d / "driver") if "driver" in entries else None,
        # driver_override_show prints "%s\n" of a NULL pointer as "(null)".
        driver_override=None if override in (None, "", "(null)") else override,
        reset_methods=tuple(methods_text.split()) if methods_text is not None else (),
        has_reset="reset" in entries,
        virtfns=tuple(vf for _, vf in sorted(virtfns)),
    )


def read_info(addr: PciAddress, d: Path) -> FunctionInfo:
    state = read_runtime(d)
    resources_text = _read_optional(d / "resource")
    group = _link_name(d / "iommu_group")
    if group is not None and not re.fullmatch(r"[0-9]+", group):
        raise HostError(str(d / "iommu_group"), f"link target {group!r} is not a group number")
    return FunctionInfo(
        address=addr,
        vendor=_read_hex(d / "vendor", 0xFFFF),
        device=_read_hex(d / "device", 0xFFFF),
        class_code=_read_hex(d / "class", 0xFFFFFF),
        revision=_read_hex(d / "revision", 0xFF),
        subsystem_vendor=_read_hex(d / "subsystem_vendor", 0xFFFF),
        subsystem_device=_read_hex(d / "subsystem_device", 0xFFFF),
        driver=state.driver,
        driver_override=state.driver_override,
        iommu_group=None if group is None else int(group),
        reset_methods=state.reset_methods,
        has_reset=state.has_reset,
        has_reset_subordinate=os.path.exists(d / "reset_subordinate"),
        resources=() if resources_text is None else _parse_resources(d / "resource", resources_text),
        physfn=_link_address(d / "physfn"),
        virtfns=state.virtfns,
        parent=canonical_parent(addr, d),
    )


def canonical_parent(addr: PciAddress, devdir: Path) -> PciAddress | None:
    """The upstream bridge: the directory above the canonical device path.

    ``bus/pci/devices/X`` links to ``devices/pci0000:00/0000:00:1c.0/X``;
    the parent directory is the bridge, or ``pciDDDD:BB`` on a root bus.
    """
    real = Path(os.path.realpath(devdir))
    name = real.parent.name
    if _ROOT_BUS_RE.fullmatch(name):
        return None
    try:
        parent = PciAddress.parse(name)
    except AddressError:
        # Not below a PCI device (e.g. a platform device hosting the root
        # bus, as on some ARM and VMD hosts): treat as a root bus.
        logger.debug("%s: parent directory %s is not a PCI function", addr, real.parent)
        return None
    if parent == addr:
        raise HostError(str(devdir), f"canonical path {real} is not a device directory")
    return parent


def slot_resettable(slot: Path) -> bool:
    """Whether the kernel can reset this slot (``SlotInfo.hotplug``).

    A "power" attribute exists only for slots registered by a hotplug
    driver (pci_hp_register -> pci_hp_add -> fs_add_slot), and a "module"
    link names that driver (pci_hp_create_module_link in
    drivers/pci/slot.c). Only drivers with ``hotplug_slot_ops.reset_slot``
    can do a slot reset (pci_reset_hotplug_slot); acpiphp and shpchp
    register slots without it and the kernel falls back to a bus reset
    (seen in the lab: QEMU's q35 root ports are acpiphp slots on 6.1). No
    link (a tree written by the simulator) leaves "power" as the answer.
    """
    if not os.path.exists(slot / "power"):
        return False
    module = _link_name(slot / "module")
    if module is not None:
        return module in _SLOT_RESET_DRIVERS
    return _pciehp_drives(slot)


def _pciehp_drives(slot: Path) -> bool:
    """Whether pciehp drives the port above ``slot`` (a slot without a "module" link).

    Linux 6.12 links no "module" for q35's acpiphp slots (6.1 did: seen in the
    lab), so the driver is asked instead: pciehp binds to a port's hotplug
    service device "<port BDF>:pcieNNN" (pcie_port_device_register in
    drivers/pci/pcie/portdrv.c), and the slot's bus is that port's secondary
    bus (/sys/bus/pci/devices/<port>/pci_bus/<domain:bus>). A tree without
    pci_express (the simulator's) leaves "power" as the answer.
    """
    root = slot.parents[3]  # <root>/bus/pci/slots/<name>
    if not os.path.isdir(root / "bus" / "pci_express"):
        return True
    bus = ":".join(_read_text(slot / "address").strip().lower().split(":")[:2])  # "dddd:bb"
    try:
        bound = os.listdir(root / "bus" / "pci_express" / "drivers" / "pciehp")
    except OSError:
        return False
    for name in bound:
        port, sep, _ = name.rpartition(":pcie")
        if sep and os.path.exists(root / "bus" / "pci" / "devices" / port / "pci_bus" / bus):
            return True
    return False
