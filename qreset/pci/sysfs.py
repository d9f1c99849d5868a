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
from qreset.pci.host import FunctionInfo, PciHost, RuntimeState, SlotInfo
from qreset.pci.sysfs_files import (
    _link_name,
    _open,
    _read_optional,
    _read_text,
    _why,
    _write,
    read_info,
    read_runtime,
    slot_resettable,
)

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
            return read_info(addr, d)
        except HostError as exc:
            # Removed while we read it (hot unplug, a concurrent "remove"):
            # report the function as gone rather than as a broken attribute.
            if not isinstance(exc, NoSuchFunction) and not os.path.isdir(d):
                raise NoSuchFunction(str(d), "removed while reading its attributes") from exc
            raise

    async def runtime(self, addr: PciAddress) -> RuntimeState:
        d = self._devdir(addr)
        try:
            return read_runtime(d)
        except HostError as exc:
            if not isinstance(exc, NoSuchFunction) and not os.path.isdir(d):
                raise NoSuchFunction(str(d), "removed while reading its attributes") from exc
            raise

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
            out.append(SlotInfo(name, address.lower(), slot_resettable(base / name)))
        # Directory order means nothing; bus order is what a reader expects.
        return sorted(out, key=lambda s: (s.address, s.name))

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

    def kernel_release(self) -> str | None:
        # Only the real /sys belongs to the running kernel; a tree elsewhere is a copy.
        if self.dev_root is None:
            return None
        try:
            return Path("/proc/sys/kernel/osrelease").read_text(encoding="ascii").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

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
