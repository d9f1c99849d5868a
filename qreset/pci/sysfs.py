"""
The real host: PCI functions through Linux sysfs, under an injectable root.

Everything is a path below ``root`` (default ``/sys``), the way libvirt builds
every host path from a configurable prefix: the tests point it at a tree in a
temporary directory (hand-built, or written by ``SimHost.write_tree``) and the
daemon at ``/sys``. Formats are the kernel's (``drivers/pci/pci-sysfs.c``):
``vendor``/``device``/``subsystem_*`` are ``0x%04x``, ``class`` is ``0x%06x``,
``revision`` is ``0x%02x``, ``resource`` is one ``0x%016llx 0x%016llx
0x%016llx`` line per resource (``resource_show``), ``driver_override`` prints
``(null)`` when unset, ``reset_method`` is a space-separated list and is
hidden together with ``reset`` when no method works
(``pci_dev_reset_method_attr_is_visible``).

Which calls run where (qemu.qmp's "upper half / bottom half" split):

* Attribute reads in :meth:`SysfsHost.info` run on the event loop. They are
  tiny and served from ``struct pci_dev`` without touching the device.
* Config reads, every write, and above all ``reset`` run in a dedicated
  thread pool: a ``reset`` write sleeps in the kernel for the whole reset
  (100 ms after an FLR, a second or more for a bus reset, up to 60 s of
  readiness polling), and a config read of a function being reset waits on
  ``pci_cfg_access_lock`` for just as long.

Every failure becomes a :class:`~qreset.errors.HostError` (or its
``NoSuchFunction`` / ``ResetFailed`` subclasses) whose one-line message is the
path and the reason, and garbage in a file (a non-hex id, a malformed
``resource`` line) is reported the same way rather than crashing the caller.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from qreset.errors import AddressError, HostError, NoSuchFunction, ResetFailed
from qreset.pci import regs, reset_method
from qreset.pci.address import PciAddress
from qreset.pci.host import FunctionInfo, PciHost, Resource, RuntimeState, SlotInfo

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Threads for blocking sysfs work. A ``reset`` write holds its thread for the
# whole reset, and the executor runs reset domains in parallel: with the loop's
# default pool (min(32, cpu + 4) = 6 threads on a 2-core host) a seventh
# concurrent domain would queue behind the others, silently serializing resets
# that are independent, and would also starve everything else that uses the
# default pool. Idle threads cost next to nothing, so size for the number of
# domains a big host resets at once rather than for the CPU count.
DEFAULT_WORKERS = 32

# The most a config read returns: PCI_CFG_SPACE_EXP_SIZE (pci_regs.h).
_MAX_CONFIG = regs.CFG_SPACE_EXP_SIZE

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


class SysfsHost(PciHost):
    """:class:`PciHost` over ``ROOT/bus/pci`` (the real kernel, or a tree in a directory).

    :param root: the sysfs mount point (default ``/sys``).
    :param executor: pool for blocking work; by default the host owns one of
        :data:`DEFAULT_WORKERS` threads and shuts it down in :meth:`close`.
    """

    def __init__(self, root: Path | str = "/sys", executor: ThreadPoolExecutor | None = None,
                 dev_root: Path | str | None = None) -> None:
        self.root = Path(root)
        #: Where the VFIO group files are (``/dev/vfio/N``). Only the real /sys has
        #: VFIO devices behind it: a sysfs tree elsewhere gets none unless given.
        self.dev_root: Path | None = Path(dev_root) if dev_root is not None else (
            Path("/dev") if self.root.resolve() == Path("/sys") else None)
        self.name = f"sysfs:{self.root}"
        self._devices = self.root / "bus" / "pci" / "devices"
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=DEFAULT_WORKERS, thread_name_prefix="qreset-sysfs"
        )

    def __repr__(self) -> str:
        return f"SysfsHost(root={str(self.root)!r})"

    # -- helpers -----------------------------------------------------------

    async def _run(self, fn: Callable[[], _T]) -> _T:
        """Run blocking ``fn`` in this host's pool (the "bottom half")."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _devdir(self, addr: PciAddress) -> Path:
        """``ROOT/bus/pci/devices/ADDR``; NoSuchFunction when it is not there."""
        path = self._devices / str(addr)
        if not os.path.lexists(path):
            raise NoSuchFunction(str(path), "no such PCI function")
        if not path.is_dir():
            raise NoSuchFunction(str(path), "dangling link: the function is gone")
        return path

    # -- reads -------------------------------------------------------------

    async def functions(self) -> list[PciAddress]:
        try:
            names = os.listdir(self._devices)
        except FileNotFoundError:
            raise HostError(str(self._devices), "missing: not a sysfs tree with PCI") from None
        except OSError as exc:
            raise HostError(str(self._devices), _why(exc)) from exc
        out: list[PciAddress] = []
        for name in names:
            try:
                out.append(PciAddress.parse(name))
            except AddressError:
                raise HostError(str(self._devices / name), "entry name is not a PCI address") from None
        return sorted(out)

    async def info(self, addr: PciAddress) -> FunctionInfo:
        d = self._devdir(addr)
        try:
            return self._info(addr, d)
        except HostError as exc:
            # Removed while we read it (hot unplug, a concurrent "remove"):
            # report the function as gone rather than as a broken attribute.
            if not isinstance(exc, NoSuchFunction) and not os.path.isdir(d):
                raise NoSuchFunction(str(d), "removed while reading its attributes") from exc
            raise

    async def runtime(self, addr: PciAddress) -> RuntimeState:
        d = self._devdir(addr)
        try:
            return self._runtime(d)
        except HostError as exc:
            if not isinstance(exc, NoSuchFunction) and not os.path.isdir(d):
                raise NoSuchFunction(str(d), "removed while reading its attributes") from exc
            raise

    @staticmethod
    def _runtime(d: Path) -> RuntimeState:
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

    def _info(self, addr: PciAddress, d: Path) -> FunctionInfo:
        state = self._runtime(d)
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
            parent=self._parent(addr, d),
        )

    def _parent(self, addr: PciAddress, devdir: Path) -> PciAddress | None:
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

    async def read_config(self, addr: PciAddress, size: int = _MAX_CONFIG) -> bytes:
        path = self._devdir(addr) / "config"
        size = max(0, min(size, _MAX_CONFIG))

        def read() -> bytes:
            # The kernel returns fewer bytes than asked past what the caller
            # may read: 64 unprivileged (128 for CardBus), else dev->cfg_size
            # (pci_read_config in drivers/pci/pci-sysfs.c). Read until EOF.
            fd = _open(path, os.O_RDONLY, missing=NoSuchFunction)
            try:
                chunks: list[bytes] = []
                got = 0
                while got < size:
                    chunk = os.pread(fd, size - got, got)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
                return b"".join(chunks)
            except OSError as exc:
                raise HostError(str(path), f"reading config space: {_why(exc)}") from exc
            finally:
                os.close(fd)

        return await self._run(read)

    async def slots(self) -> list[SlotInfo]:
        base = self.root / "bus" / "pci" / "slots"
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise HostError(str(base), _why(exc)) from exc
        out: list[SlotInfo] = []
        for name in names:
            address = _read_text(base / name / "address").strip()
            # address_read_file: "%04x:%02x:%02x", or "%04x:%02x" for a slot
            # without a device number (drivers/pci/slot.c).
            if not re.fullmatch(r"[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}(:[0-9a-fA-F]{2})?", address):
                raise HostError(str(base / name / "address"), f"not a slot address: {address[:40]!r}")
            out.append(SlotInfo(name, address.lower(), self._slot_resettable(base / name)))
        # Directory order means nothing; bus order is what a reader expects.
        return sorted(out, key=lambda s: (s.address, s.name))

    @staticmethod
    def _slot_resettable(slot: Path) -> bool:
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
        return module is None or module in _SLOT_RESET_DRIVERS

    async def has_iommu_groups(self) -> bool:
        groups = self.root / "kernel" / "iommu_groups"
        try:
            with os.scandir(groups) as it:
                return any(True for _ in it)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise HostError(str(groups), _why(exc)) from exc

    # -- writes (all in the pool) -------------------------------------------

    async def write_config(self, addr: PciAddress, offset: int, data: bytes) -> None:
        path = self._devdir(addr) / "config"
        data = bytes(data)
        if len(data) not in (1, 2, 4) or offset % len(data) or not 0 <= offset <= _MAX_CONFIG - len(data):
            raise HostError(
                str(path), f"refusing a {len(data)}-byte write at {offset:#x}: need 1, 2 or 4 aligned bytes"
            )

        def write() -> None:
            # pci_write_config splits by alignment, so an aligned 2- or 4-byte
            # pwrite becomes one word/dword config write (what Bridge Control
            # or a PCIe control register needs).
            fd = _open(path, os.O_WRONLY, missing=NoSuchFunction)
            try:
                n = os.pwrite(fd, data, offset)
            except OSError as exc:
                raise HostError(str(path), f"writing {len(data)} bytes at {offset:#x}: {_why(exc)}") from exc
            finally:
                os.close(fd)
            if n != len(data):
                raise HostError(str(path), f"short write at {offset:#x}: {n} of {len(data)} bytes")

        logger.debug("%s: config write %s at %#x", addr, data.hex(), offset)
        await self._run(write)

    async def reset_function(self, addr: PciAddress, method: str | None = None) -> None:
        d = self._devdir(addr)
        if method is not None and not re.fullmatch(r"[a-z_]+", method):
            raise ResetFailed(str(d / "reset_method"), f"not a reset method name: {method!r}")

        def reset() -> None:
            if not os.path.exists(d / "reset"):
                raise ResetFailed(str(d / "reset"), "missing: the kernel has no reset method for it")
            if method is None:
                _write(d / "reset", "1", ResetFailed)
                return
            self._reset_with_method(d, method)

        logger.info("%s: reset (method %s)", addr, method or "kernel default")
        await self._run(reset)

    @staticmethod
    def _reset_with_method(d: Path, method: str) -> None:
        """Narrow ``reset_method`` to ``method``, reset, put back what the kernel accepts.

        :mod:`qreset.pci.reset_method` has the rules (the kernel refuses a
        stale ``bus`` in the old list). The caller serializes resets of one
        function (the executor's per-domain locks): two overlapping
        narrowings of the same function would each restore the other's list.
        A process killed between the narrowing and the restore leaves the
        list narrowed; writing ``default`` to ``reset_method`` undoes that.
        """
        rm = d / "reset_method"

        def read() -> str | None:
            try:
                return rm.read_text(encoding="ascii")
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError) as exc:
                why = _why(exc) if isinstance(exc, OSError) else "not ASCII text"
                raise ResetFailed(str(rm), why) from exc

        def write(text: str) -> None:
            _write(rm, text)

        previous = reset_method.narrow(read, write, method, str(rm))
        failure: BaseException | None = None
        try:
            _write(d / "reset", "1", ResetFailed)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            try:
                reset_method.put_back(read, write, previous, str(rm))
            except HostError as exc:
                logger.error("%s: reset_method left as %r", exc, method)
                if failure is None:
                    raise

    async def reset_subordinate(self, bridge: PciAddress) -> None:
        path = self._devdir(bridge) / "reset_subordinate"

        def reset() -> None:
            if not os.path.exists(path):
                raise ResetFailed(str(path), "missing: not a bridge, or Linux < 6.13")
            _write(path, "1", ResetFailed)

        logger.info("%s: secondary bus reset (reset_subordinate)", bridge)
        await self._run(reset)

    def _vfio_dev_root(self, device: PciAddress) -> Path:
        if self.dev_root is None:
            # The ioctl acts on the real kernel's devices: a sysfs copy elsewhere
            # has no VFIO groups behind it.
            raise ResetFailed(str(device), f"VFIO hot reset needs the real /sys, not {self.name}")
        return self.dev_root

    async def hot_reset_info(self, device: PciAddress) -> list[tuple[PciAddress, int]]:
        from qreset.pci import vfio

        dev_root = self._vfio_dev_root(device)
        group = (await self.info(device)).iommu_group
        if group is None:
            raise ResetFailed(str(device), "no IOMMU group: not a VFIO device")
        return await self._run(lambda: vfio.hot_reset_info(device, group, dev_root))

    async def hot_reset(self, devices: Sequence[PciAddress], groups: Sequence[int]) -> None:
        from qreset.pci import vfio

        dev_root = self._vfio_dev_root(devices[0] if devices else PciAddress(0, 0, 0, 0))
        devs, grps = list(devices), list(groups)
        logger.info("%s: VFIO hot reset (groups %s)", devs[0] if devs else "?", grps)
        # In the pool: the ioctl sleeps through the whole slot/bus reset.
        await self._run(lambda: vfio.hot_reset(devs, grps, dev_root))

    async def remove(self, addr: PciAddress) -> None:
        path = self._devdir(addr) / "remove"
        logger.info("%s: remove", addr)
        await self._run(lambda: _write(path, "1"))

    async def rescan(self, bridge: PciAddress | None = None) -> None:
        # A device's "rescan" (dev_rescan_store) rescans the bus the device sits
        # on, which includes everything below it when it is a bridge.
        path = self.root / "bus" / "pci" / "rescan" if bridge is None else self._devdir(bridge) / "rescan"
        logger.info("rescan via %s", path)
        await self._run(lambda: _write(path, "1"))

    async def bind(self, addr: PciAddress, driver: str | None) -> None:
        d = self._devdir(addr)
        if driver is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", driver):
            raise HostError(str(d / "driver_override"), f"not a driver name: {driver!r}")

        def bind() -> None:
            current = _link_name(d / "driver")
            old = _read_optional(d / "driver_override")
            old_override = None if old is None or old.strip() in ("", "(null)") else old.strip()
            # driver_set_override: "\n" (an empty name) clears the override.
            _write(d / "driver_override", (driver or "") + "\n")
            # drivers_probe does nothing for a bound device: unbind first when
            # it is bound to something else (or, when clearing, to the driver
            # the old override forced).
            leave = current is not None and (
                current != driver if driver is not None else current == old_override
            )
            if leave:
                _write(d / "driver" / "unbind", str(addr))
            _write(self.root / "bus" / "pci" / "drivers_probe", str(addr))

        logger.info("%s: bind to %s", addr, driver or "(default driver)")
        await self._run(bind)

    async def close(self) -> None:
        if self._owns_executor:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
