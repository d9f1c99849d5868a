"""SysfsHost on a hand-built tree, on this machine's /sys, and on a tree the simulator writes.

The hand-built tree uses the kernel's formats (drivers/pci/pci-sysfs.c:
``0x%04x`` ids, ``0x%06x`` class, ``resource_show``'s three ``0x%016llx``
columns, ``(null)`` for an unset ``driver_override``) and the kernel's layout:
``bus/pci/devices/X`` are symlinks into ``devices/pci0000:00/.../X``, and
``driver``/``iommu_group``/``physfn``/``virtfnN`` are symlinks.

Blocking writes are observed through FIFOs standing in for ``reset``: a write
to a FIFO blocks until the test reads it, exactly like a ``reset`` write
blocks for the whole reset, which lets the tests see what ``reset_method``
holds *during* the reset and how many resets are in flight at once.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qreset.errors import HostError, NoSuchFunction, QResetError, ResetFailed
from qreset.pci.address import PciAddress
from qreset.pci.cfgspace import parse_config
from qreset.pci.host import Resource, SlotInfo
from qreset.pci.sim import SimHost
from qreset.pci.sysfs import DEFAULT_WORKERS, SysfsHost
from tests.conftest import SIM_DIR
from tests.lab.labhost import (
    LAB,
    SKIP_REASON,
    KernelLog,
    Roles,
    bind_vfio,
    enable_kernel_witnesses,
    iommu_group,
    restored,
)
from tests.lab.labhost import driver as lab_driver
from tests.lab.labhost import reset_methods as lab_reset_methods
from tests.lab.labhost import write as lab_write
from tests.pcibuild import Cfg

A = PciAddress.parse


@dataclass
class Fn:
    """One function of a hand-built tree."""

    addr: str
    path: str  # under devices/, e.g. "pci0000:00/0000:00:1c.0/0000:01:00.0"
    vendor: int = 0x8086
    device: int = 0x1533
    class_code: int = 0x020000
    revision: int = 0x03
    subsystem: tuple[int, int] = (0x15D9, 0x1533)
    driver: str | None = None
    override: str = "(null)"
    group: int | None = None
    reset_method: str | None = None  # None: attribute hidden
    bridge: bool = False
    config: bytes = b""
    resources: list[tuple[int, int, int]] = field(default_factory=list)


def build_tree(root: Path, fns: list[Fn], slots: dict[str, tuple[str, bool]] | None = None) -> None:
    devices = root / "devices"
    by_bus = root / "bus" / "pci" / "devices"
    by_bus.mkdir(parents=True)
    (root / "bus" / "pci" / "rescan").write_text("")
    (root / "bus" / "pci" / "drivers_probe").write_text("")
    for fn in fns:
        d = devices / fn.path
        d.mkdir(parents=True, exist_ok=True)
        (d / "vendor").write_text(f"0x{fn.vendor:04x}\n")
        (d / "device").write_text(f"0x{fn.device:04x}\n")
        (d / "class").write_text(f"0x{fn.class_code:06x}\n")
        (d / "revision").write_text(f"0x{fn.revision:02x}\n")
        (d / "subsystem_vendor").write_text(f"0x{fn.subsystem[0]:04x}\n")
        (d / "subsystem_device").write_text(f"0x{fn.subsystem[1]:04x}\n")
        (d / "driver_override").write_text(fn.override + "\n")
        res = fn.resources or [(0, 0, 0)] * (17 if fn.bridge else 13)
        (d / "resource").write_text("".join(f"0x{s:016x} 0x{e:016x} 0x{f:016x}\n" for s, e, f in res))
        (d / "config").write_bytes(fn.config or Cfg(256, vendor=fn.vendor, device=fn.device).bytes())
        for attr in ("remove", "rescan"):
            (d / attr).write_text("")
        if fn.reset_method is not None:
            (d / "reset_method").write_text(fn.reset_method + "\n")
            (d / "reset").write_text("")
        if fn.bridge:
            (d / "reset_subordinate").write_text("")
        if fn.driver:
            drv = root / "bus" / "pci" / "drivers" / fn.driver
            drv.mkdir(parents=True, exist_ok=True)
            (drv / "unbind").touch()
            (d / "driver").symlink_to(os.path.relpath(drv, d))
        if fn.group is not None:
            grp = root / "kernel" / "iommu_groups" / str(fn.group)
            (grp / "devices").mkdir(parents=True, exist_ok=True)
            (d / "iommu_group").symlink_to(os.path.relpath(grp, d))
            (grp / "devices" / fn.addr).symlink_to(os.path.relpath(d, grp / "devices"))
        (by_bus / fn.addr).symlink_to(os.path.relpath(d, by_bus))
    for name, (address, hotplug) in (slots or {}).items():
        s = root / "bus" / "pci" / "slots" / name
        s.mkdir(parents=True)
        (s / "address").write_text(address + "\n")
        if hotplug:
            (s / "power").write_text("1\n")


def link_vfs(root: Path, pf: str, vfs: list[str]) -> None:
    devs = root / "bus" / "pci" / "devices"
    pf_dir = (devs / pf).resolve()
    for n, vf in enumerate(vfs):
        vf_dir = (devs / vf).resolve()
        (pf_dir / f"virtfn{n}").symlink_to(os.path.relpath(vf_dir, pf_dir))
        (vf_dir / "physfn").symlink_to(os.path.relpath(pf_dir, vf_dir))


def standard_tree(root: Path) -> None:
    rp = "pci0000:00/0000:00:1c.0"
    build_tree(root, [
        Fn("0000:00:00.0", "pci0000:00/0000:00:00.0", class_code=0x060000, device=0x3E30),
        Fn("0000:00:1c.0", rp, class_code=0x060400, device=0xA110, bridge=True, driver="pcieport",
           group=7, reset_method="pm"),
        Fn("0000:01:00.0", f"{rp}/0000:01:00.0", device=0x1521, driver="igb", group=8,
           reset_method="flr pm bus",
           resources=[(0xDF000000, 0xDF0FFFFF, 0x40200), (0, 0, 0), (0xE000, 0xE01F, 0x40101)]
           + [(0, 0, 0)] * 10),
        Fn("0000:01:00.1", f"{rp}/0000:01:00.1", device=0x1521, driver="vfio-pci", override="vfio-pci",
           group=9, reset_method="flr"),
        Fn("0000:01:10.0", f"{rp}/0000:01:10.0", device=0x1520, driver="vfio-pci", group=10,
           reset_method="flr"),
        Fn("0000:01:10.4", f"{rp}/0000:01:10.4", device=0x1520, group=11),
        Fn("10000:e1:00.0", "pci10000:e1/10000:e1:00.0", device=0x0A54),
    ], slots={"3": ("0000:01:00", True), "7-1": ("0000:02:00", False), "empty": ("0000:03", False)})
    link_vfs(root, "0000:01:00.0", ["0000:01:10.0", "0000:01:10.4"])


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    standard_tree(root)
    return root


@pytest.fixture
async def host(tree: Path) -> AsyncIterator[SysfsHost]:
    h = SysfsHost(tree)
    yield h
    await h.close()


# -- (a) reads from a hand-built tree -------------------------------------------------


async def test_functions_sorted_numerically(host: SysfsHost) -> None:
    assert [str(a) for a in await host.functions()] == [
        "0000:00:00.0", "0000:00:1c.0", "0000:01:00.0", "0000:01:00.1",
        "0000:01:10.0", "0000:01:10.4", "10000:e1:00.0",
    ]


async def test_info_of_an_endpoint(host: SysfsHost) -> None:
    i = await host.info(A("0000:01:00.0"))
    assert (i.vendor, i.device, i.class_code, i.revision) == (0x8086, 0x1521, 0x020000, 0x03)
    assert (i.subsystem_vendor, i.subsystem_device) == (0x15D9, 0x1533)
    assert i.driver == "igb"
    assert i.driver_override is None  # "(null)"
    assert i.iommu_group == 8
    assert i.reset_methods == ("flr", "pm", "bus")
    assert i.has_reset
    assert not i.has_reset_subordinate
    assert i.parent == A("0000:00:1c.0")
    assert i.physfn is None
    assert i.virtfns == (A("0000:01:10.0"), A("0000:01:10.4"))
    assert len(i.resources) == 13
    assert i.resources[0] == Resource(0xDF000000, 0xDF0FFFFF, 0x40200)
    assert i.resources[0].size == 0x100000
    assert i.resources[2].size == 0x20
    assert i.resources[1].size == 0


async def test_info_of_a_bridge_vf_and_root_bus_device(host: SysfsHost) -> None:
    rp = await host.info(A("00:1c.0"))
    assert rp.parent is None  # parent directory is pci0000:00
    assert rp.has_reset_subordinate
    assert rp.reset_methods == ("pm",)
    vf = await host.info(A("01:10.0"))
    assert vf.physfn == A("01:00.0")
    assert vf.driver == "vfio-pci"
    assert vf.parent == A("00:1c.0")
    override = await host.info(A("01:00.1"))
    assert override.driver_override == "vfio-pci"
    hidden = await host.info(A("01:10.4"))
    assert hidden.reset_methods == ()  # no reset_method file: no method works
    assert not hidden.has_reset
    assert hidden.driver is None
    vmd = await host.info(A("10000:e1:00.0"))
    assert vmd.parent is None
    assert vmd.iommu_group is None


async def test_slots_and_iommu_groups(host: SysfsHost, tree: Path) -> None:
    assert await host.slots() == [  # in bus order
        SlotInfo("3", "0000:01:00", True),
        SlotInfo("7-1", "0000:02:00", False),
        SlotInfo("empty", "0000:03", False),
    ]
    assert await host.has_iommu_groups()
    for group in (tree / "kernel" / "iommu_groups").iterdir():
        for entry in (group / "devices").iterdir():
            entry.unlink()
        (group / "devices").rmdir()
        group.rmdir()
    assert not await host.has_iommu_groups()  # present but empty
    (tree / "kernel" / "iommu_groups").rmdir()
    assert not await host.has_iommu_groups()


async def test_slot_reset_needs_a_driver_with_reset_slot(host: SysfsHost, tree: Path) -> None:
    """acpiphp/shpchp slots have "power" but no reset_slot: not slot-resettable."""
    slots = tree / "bus/pci/slots"
    for name, module in (("3", "pciehp"), ("7-1", "acpiphp"), ("empty", "shpchp")):
        (slots / name / "power").write_text("1\n")
        (tree / "module" / module).mkdir(parents=True)
        (slots / name / "module").symlink_to(f"../../../../module/{module}")
    assert {s.name: s.hotplug for s in await host.slots()} == {"3": True, "7-1": False, "empty": False}


async def test_slot_without_module_link_asks_pciehp(host: SysfsHost, tree: Path) -> None:
    """Linux 6.12 links no "module" for q35's acpiphp slots (seen in the trixie lab):
    where pci_express exists, a slot is resettable only if pciehp binds the port above it."""
    slots = tree / "bus/pci/slots"
    for name in ("3", "7-1"):
        (slots / name / "power").write_text("1\n")
    pciehp = tree / "bus/pci_express/drivers/pciehp"
    pciehp.mkdir(parents=True)
    assert {s.name: s.hotplug for s in await host.slots()} == {"3": False, "7-1": False, "empty": False}
    # pciehp drives the port whose secondary bus is slot 3's (0000:01).
    port = tree / "bus/pci/devices/0000:00:1c.0"
    (port / "pci_bus" / "0000:01").mkdir(parents=True)
    (pciehp / "0000:00:1c.0:pcie004").mkdir()
    assert {s.name: s.hotplug for s in await host.slots()} == {"3": True, "7-1": False, "empty": False}


async def test_no_slots_directory(tmp_path: Path) -> None:
    build_tree(tmp_path, [Fn("0000:00:00.0", "pci0000:00/0000:00:00.0")])
    h = SysfsHost(tmp_path)
    assert await h.slots() == []
    assert not await h.has_iommu_groups()
    await h.close()


async def test_read_config_returns_what_is_there(host: SysfsHost, tree: Path) -> None:
    cfg = Cfg(4096, vendor=0x8086, device=0x1521).caps([(0x10, 0x40)]).pcie(0x40, 0, flr=True)
    (tree / "bus/pci/devices/0000:01:00.0/config").write_bytes(cfg.bytes())
    data = await host.read_config(A("01:00.0"))
    assert data == cfg.bytes()
    assert parse_config(data).has_flr
    assert await host.read_config(A("01:00.0"), 64) == cfg.bytes()[:64]
    assert await host.read_config(A("01:00.0"), 0) == b""
    # A 256-byte (conventional) or 64-byte (unprivileged) file: fewer bytes, no error.
    assert len(await host.read_config(A("00:00.0"))) == 256
    (tree / "bus/pci/devices/0000:00:00.0/config").write_bytes(b"\x86\x80" * 32)
    assert len(await host.read_config(A("00:00.0"))) == 64


async def test_missing_function(host: SysfsHost) -> None:
    with pytest.raises(NoSuchFunction, match=r"bus/pci/devices/0000:02:00\.0: no such PCI function"):
        await host.info(A("02:00.0"))
    with pytest.raises(NoSuchFunction):
        await host.read_config(A("02:00.0"))
    with pytest.raises(NoSuchFunction):
        await host.reset_function(A("02:00.0"))


async def test_dangling_link_is_a_missing_function(host: SysfsHost, tree: Path) -> None:
    target = (tree / "bus/pci/devices/0000:01:10.4").resolve()
    for entry in target.iterdir():
        entry.unlink()
    target.rmdir()
    with pytest.raises(NoSuchFunction, match="gone"):
        await host.info(A("01:10.4"))


async def test_not_a_sysfs_tree(tmp_path: Path) -> None:
    h = SysfsHost(tmp_path / "nothing")
    with pytest.raises(HostError, match=r"nothing/bus/pci/devices: missing"):
        await h.functions()
    await h.close()


# -- garbage in files: one clear HostError naming the file ----------------------------


@pytest.mark.parametrize(
    ("attr", "content", "message"),
    [
        ("vendor", "0xzzzz\n", r"0000:01:00\.0/vendor: expected a 0x-prefixed hex number, got '0xzzzz'"),
        ("vendor", "8086\n", r"/vendor: expected a 0x-prefixed hex number"),
        ("device", "\n", r"/device: expected a 0x-prefixed hex number, got ''"),
        ("class", "0x1000000\n", r"/class: value 0x1000000 is out of range"),
        ("revision", "0x1_0\n", r"/revision: expected"),
        ("subsystem_vendor", "-0x1\n", r"/subsystem_vendor: expected"),
        ("resource", "0x0 0x1\n", r"/resource: line 1: expected 'start end flags' in hex, got '0x0 0x1'"),
        ("resource", "0x0 0x0 0x0\nstart end flags\n", r"/resource: line 2: expected"),
        ("resource", "0x0 0x0 0x0 0x0\n", r"/resource: line 1: expected"),
    ],
)
async def test_garbage_attribute_is_one_host_error(
    host: SysfsHost, tree: Path, attr: str, content: str, message: str
) -> None:
    (tree / "bus/pci/devices/0000:01:00.0" / attr).write_text(content)
    with pytest.raises(HostError, match=message) as info:
        await host.info(A("01:00.0"))
    assert "\n" not in str(info.value)
    assert info.value.path.endswith(f"0000:01:00.0/{attr}")


async def test_binary_garbage_is_a_host_error(host: SysfsHost, tree: Path) -> None:
    (tree / "bus/pci/devices/0000:01:00.0/vendor").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(HostError, match="vendor: not ASCII text"):
        await host.info(A("01:00.0"))


async def test_missing_required_attribute(host: SysfsHost, tree: Path) -> None:
    (tree / "bus/pci/devices/0000:01:00.0/class").unlink()
    with pytest.raises(HostError, match=r"0000:01:00\.0/class: missing"):
        await host.info(A("01:00.0"))


async def test_bad_links(host: SysfsHost, tree: Path) -> None:
    d = tree / "bus/pci/devices/0000:01:00.0"
    (d / "iommu_group").unlink()
    (d / "iommu_group").symlink_to("../../kernel/iommu_groups/abc")
    with pytest.raises(HostError, match=r"iommu_group: link target 'abc' is not a group number"):
        await host.info(A("01:00.0"))
    (d / "iommu_group").unlink()
    (d / "physfn").symlink_to("../not-a-device")
    with pytest.raises(HostError, match=r"physfn: link target 'not-a-device' is not a PCI address"):
        await host.info(A("01:00.0"))
    (d / "physfn").unlink()
    (d / "physfn").write_text("regular file")
    with pytest.raises(HostError, match=r"physfn: expected a symbolic link"):
        await host.info(A("01:00.0"))


async def test_garbage_directory_entry(host: SysfsHost, tree: Path) -> None:
    (tree / "bus/pci/devices/garbage").mkdir()
    with pytest.raises(HostError, match=r"devices/garbage: entry name is not a PCI address"):
        await host.functions()


async def test_garbage_slot_address(host: SysfsHost, tree: Path) -> None:
    (tree / "bus/pci/slots/3/address").write_text("slot three\n")
    with pytest.raises(HostError, match=r"slots/3/address: not a slot address"):
        await host.slots()


# -- writes -------------------------------------------------------------------------------


async def test_write_config_at_offset(host: SysfsHost, tree: Path) -> None:
    path = tree / "bus/pci/devices/0000:00:1c.0/config"
    await host.write_config(A("00:1c.0"), 0x3E, b"\x40\x00")
    await host.write_config(A("00:1c.0"), 0x04, b"\x07\x04\x10\x00")
    await host.write_config(A("00:1c.0"), 0x0D, b"\x20")
    data = path.read_bytes()
    assert len(data) == 256  # written in place, not truncated or appended
    assert data[0x3E:0x40] == b"\x40\x00"
    assert data[0x04:0x08] == b"\x07\x04\x10\x00"
    assert data[0x0D] == 0x20


@pytest.mark.parametrize(("offset", "data"), [(0x3F, b"\x00\x00"), (0x02, b"\x00" * 4), (0, b"\x00" * 3),
                                              (0, b""), (4096, b"\x00"), (-2, b"\x00\x00")])
async def test_write_config_refuses_unaligned(host: SysfsHost, offset: int, data: bytes) -> None:
    with pytest.raises(HostError, match="need 1, 2 or 4 aligned bytes"):
        await host.write_config(A("00:1c.0"), offset, data)


async def test_plain_reset_writes_1(host: SysfsHost, tree: Path) -> None:
    await host.reset_function(A("01:00.0"))
    assert (tree / "bus/pci/devices/0000:01:00.0/reset").read_text() == "1"
    assert (tree / "bus/pci/devices/0000:01:00.0/reset_method").read_text() == "flr pm bus\n"


async def test_reset_without_reset_attribute(host: SysfsHost) -> None:
    with pytest.raises(ResetFailed, match=r"0000:01:10\.4/reset: missing"):
        await host.reset_function(A("01:10.4"))
    with pytest.raises(ResetFailed, match="missing"):
        await host.reset_subordinate(A("01:00.0"))


async def test_reset_with_method_not_enabled(host: SysfsHost, tree: Path) -> None:
    with pytest.raises(ResetFailed, match=r"reset_method: method 'bus' is not enabled \(have: flr\)"):
        await host.reset_function(A("01:00.1"), "bus")
    assert (tree / "bus/pci/devices/0000:01:00.1/reset").read_text() == ""
    with pytest.raises(ResetFailed, match="not a reset method name"):
        await host.reset_function(A("01:00.1"), "flr\nbus")


async def test_reset_error_names_path_and_strerror(host: SysfsHost, tree: Path) -> None:
    reset = tree / "bus/pci/devices/0000:01:00.0/reset"
    reset.unlink()
    reset.mkdir()  # open(O_WRONLY) fails with EISDIR: stands in for the kernel's EIO/ENOTTY
    with pytest.raises(ResetFailed) as info:
        await host.reset_function(A("01:00.0"), "flr")
    assert str(info.value) == f"{reset}: Is a directory"
    assert isinstance(info.value, QResetError)
    # The method list is put back even though the reset failed.
    assert (tree / "bus/pci/devices/0000:01:00.0/reset_method").read_text() == "flr pm bus\n"


def _fifo_reset(tree: Path, addr: str) -> Path:
    reset = tree / "bus/pci/devices" / addr / "reset"
    if reset.exists():
        reset.unlink()
    os.mkfifo(reset)
    return reset


def _wait_for(path: Path, content: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text() == content:
            return True
        time.sleep(0.002)
    return False


async def test_reset_method_is_narrowed_during_the_reset_and_restored(host: SysfsHost, tree: Path) -> None:
    d = tree / "bus/pci/devices/0000:01:00.0"
    fifo = _fifo_reset(tree, "0000:01:00.0")
    seen: dict[str, object] = {}
    release = threading.Event()

    def kernel() -> None:
        # The reset write blocks in open() until this end opens: look at
        # reset_method while it is blocked, then let it through.
        seen["narrowed"] = _wait_for(d / "reset_method", "pm")
        release.wait(10)
        with open(fifo, "rb") as f:
            seen["written"] = f.read()

    reader = threading.Thread(target=kernel)
    reader.start()
    try:
        task = asyncio.create_task(host.reset_function(A("01:00.0"), "pm"))
        # The loop keeps running while the write blocks in the pool.
        await asyncio.sleep(0.05)
        assert not task.done()
        assert await host.read_config(A("00:00.0"), 4) == b"\x86\x80\x30\x3e"
        release.set()
        await asyncio.wait_for(task, 10)
    finally:
        release.set()
        reader.join(10)
    assert seen == {"narrowed": True, "written": b"1"}
    assert (d / "reset_method").read_text() == "flr pm bus\n"


async def test_restore_failure_after_a_good_reset_is_reported(host: SysfsHost, tree: Path) -> None:
    d = tree / "bus/pci/devices/0000:01:00.0"
    fifo = _fifo_reset(tree, "0000:01:00.0")

    def kernel() -> None:
        if _wait_for(d / "reset_method", "flr"):
            (d / "reset_method").unlink()
            (d / "reset_method").mkdir()  # now neither the old list nor "default" can be written
        with open(fifo, "rb") as f:
            f.read()

    reader = threading.Thread(target=kernel)
    reader.start()
    try:
        with pytest.raises(HostError, match=r"reset_method: could not restore 'flr pm bus' nor 'default'"):
            await asyncio.wait_for(host.reset_function(A("01:00.0"), "flr"), 10)
    finally:
        reader.join(10)


async def test_resets_run_in_parallel_beyond_the_default_pool(tmp_path: Path) -> None:
    """More concurrent resets than the loop's default executor has threads (6 here).

    Each reset narrows ``reset_method`` and then blocks opening its FIFO
    ``reset`` until the test opens the other end; the test opens none until
    every function shows a narrowed ``reset_method``, which only happens if
    all resets hold a thread at the same time.
    """
    n = 12
    assert n <= DEFAULT_WORKERS
    assert n > min(32, (os.cpu_count() or 1) + 4) or n > 6
    fns = [Fn(f"0000:{b:02x}:00.0", f"pci0000:00/0000:00:{b:02x}.0/0000:{b:02x}:00.0",
              reset_method="flr pm") for b in range(1, n + 1)]
    build_tree(tmp_path, fns)
    fifos = [_fifo_reset(tmp_path, f"0000:{b:02x}:00.0") for b in range(1, n + 1)]
    methods = [tmp_path / f"bus/pci/devices/0000:{b:02x}:00.0/reset_method" for b in range(1, n + 1)]
    h = SysfsHost(tmp_path)

    def kernel() -> bool:
        all_narrowed = all(_wait_for(m, "flr", timeout=5) for m in methods)
        for fifo in fifos:  # release every blocked writer, whatever happened
            with open(fifo, "rb") as f:
                f.read()
        return all_narrowed

    try:
        tasks = [asyncio.create_task(h.reset_function(A(f"{b:02x}:00.0"), "flr")) for b in range(1, n + 1)]
        all_in_flight = await asyncio.to_thread(kernel)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        await h.close()
    assert all_in_flight, "resets did not all run at once"
    assert all(m.read_text() == "flr pm\n" for m in methods)


async def test_reset_subordinate_remove_rescan(host: SysfsHost, tree: Path) -> None:
    devs = tree / "bus/pci/devices"
    await host.reset_subordinate(A("00:1c.0"))
    assert (devs / "0000:00:1c.0/reset_subordinate").read_text() == "1"
    await host.remove(A("01:10.4"))
    assert (devs / "0000:01:10.4/remove").read_text() == "1"
    await host.rescan()
    assert (tree / "bus/pci/rescan").read_text() == "1"
    await host.rescan(A("00:1c.0"))
    assert (devs / "0000:00:1c.0/rescan").read_text() == "1"


async def test_bind_sets_override_unbinds_and_probes(host: SysfsHost, tree: Path) -> None:
    devs = tree / "bus/pci/devices"
    await host.bind(A("01:00.0"), "vfio-pci")
    assert (devs / "0000:01:00.0/driver_override").read_text() == "vfio-pci\n"
    assert (tree / "bus/pci/drivers/igb/unbind").read_text() == "0000:01:00.0"
    assert (tree / "bus/pci/drivers_probe").read_text() == "0000:01:00.0"
    # Clearing an override that forced the bound driver leaves that driver.
    await host.bind(A("01:00.1"), None)
    assert (devs / "0000:01:00.1/driver_override").read_text() == "\n"
    assert (tree / "bus/pci/drivers/vfio-pci/unbind").read_text() == "0000:01:00.1"
    with pytest.raises(HostError, match="not a driver name"):
        await host.bind(A("01:00.1"), "../evil")


async def test_close_leaves_a_caller_executor_alone(tree: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=2)
    h = SysfsHost(str(tree), executor=pool)
    assert h.name == f"sysfs:{tree}"
    await h.close()
    assert pool.submit(lambda: 42).result() == 42
    pool.shutdown()


# -- (b) this machine's /sys, read-only ------------------------------------------------------


async def test_real_sysfs_read_only() -> None:
    base = Path("/sys/bus/pci/devices")
    if not base.is_dir():
        pytest.skip("no /sys/bus/pci on this machine")
    listed = sorted(A(n) for n in os.listdir(base))
    h = SysfsHost()
    try:
        assert await h.functions() == listed
        for addr in listed:
            info = await h.info(addr)
            raw = (base / str(addr) / "config").read_bytes()
            data = await h.read_config(addr)
            assert data == raw
            cfg = parse_config(data)
            # Two independent sources agree: the cached attributes and config space.
            assert (info.vendor, info.device) == (cfg.vendor_id, cfg.device_id)
            assert info.class_code == cfg.class_code
            assert info.revision == cfg.revision
            assert info.reset_methods == (
                tuple((base / str(addr) / "reset_method").read_text().split())
                if (base / str(addr) / "reset_method").exists() else ()
            )
            assert info.parent is None or info.parent in listed
            assert len(info.resources) >= 7
            assert info.driver == (
                os.path.basename(os.readlink(base / str(addr) / "driver"))
                if (base / str(addr) / "driver").exists() else None
            )
        groups = Path("/sys/kernel/iommu_groups")
        assert await h.has_iommu_groups() == (groups.is_dir() and any(groups.iterdir()))
        assert len(await h.slots()) == len(list(Path("/sys/bus/pci/slots").glob("*")))
    finally:
        await h.close()


# -- (c) a tree written by the simulator ------------------------------------------------------


@pytest.mark.parametrize("topology", sorted(SIM_DIR.glob("*.toml")), ids=lambda p: p.stem)
async def test_sim_written_tree_reads_back_identically(topology: Path, tmp_path: Path) -> None:
    sim = SimHost.from_toml(topology, time_scale=0.0)
    # Vary what the tree must carry: an override, and a function with no driver.
    first, *rest = await sim.functions()
    await sim.bind(first, "vfio-pci")
    if rest:
        sim.set_driver(rest[-1], None)
    sim.write_tree(tmp_path)
    real = SysfsHost(tmp_path)
    try:
        addrs = await sim.functions()
        assert await real.functions() == addrs
        assert (await real.info(first)).driver_override == "vfio-pci"
        for addr in addrs:
            assert await real.info(addr) == await sim.info(addr), addr
            assert await real.read_config(addr) == await sim.read_config(addr), addr
        # The order of slots is not part of the interface; their content is.
        assert sorted(await real.slots(), key=str) == sorted(await sim.slots(), key=str)
        assert await real.has_iommu_groups() == await sim.has_iommu_groups()
    finally:
        await real.close()
        await sim.close()


# -- (d) the real kernel, inside the lab VM (scripts/lab/run -m lab tests/test_sysfs.py) --------

lab = pytest.mark.skipif(not LAB, reason=SKIP_REASON)


@pytest.mark.lab
@lab
async def test_lab_info_agrees_with_the_kernel() -> None:
    roles = Roles.discover()
    h = SysfsHost()
    try:
        addrs = await h.functions()
        assert set(roles.by_role.values()) <= set(addrs)
        assert await h.has_iommu_groups()
        for addr in addrs:
            info = await h.info(addr)
            assert info.driver == lab_driver(addr)
            assert info.iommu_group == iommu_group(addr)
            assert list(info.reset_methods) == lab_reset_methods(addr)
            # Methods imply a `reset` file. Not the converse: the kernel decides the
            # attributes' visibility once, at enumeration, when a function 0 alone on
            # its bus so far gets a stale `bus`; a later `reset_method=default`
            # (tests/lab/test_reset.py writes it) re-probes and may empty the list.
            if info.reset_methods:
                assert info.has_reset
        parents = {"virtio1": "rp_virtio1", "e1000e": "rp_e1000e", "switch_dn1": "switch_up",
                   "sw_e1000e": "switch_dn1", "mf1": "rp_multifn", "pci_serial": "pcibridge"}
        for child, parent in parents.items():
            assert (await h.info(roles[child])).parent == roles[parent], child
        assert (await h.info(roles["rp_virtio1"])).parent is None
        # Slots: resettable only when pciehp drives them (QEMU's are acpiphp here).
        slots = await h.slots()
        assert slots
        for slot in slots:
            link = Path("/sys/bus/pci/slots") / slot.name / "module"
            module = os.path.basename(os.readlink(link)) if link.is_symlink() else None
            assert slot.hotplug == (module == "pciehp"), (slot, module)
        # Config space: full size as root, and the reset methods the kernel
        # probed are the ones the config space advertises (pcie_has_flr, pci_pm_reset).
        assert len(await h.read_config(roles["virtio1"])) == 4096
        assert len(await h.read_config(roles["pci_e1000"])) == 256
        for addr in roles.endpoints():
            cfg = parse_config(await h.read_config(addr))
            methods = lab_reset_methods(addr)
            assert ("flr" in methods) == cfg.has_flr, (addr, methods)
            assert ("pm" in methods) == cfg.has_pm_reset, (addr, methods)
    finally:
        await h.close()


@pytest.mark.lab
@lab
async def test_lab_reset_runs_the_chosen_method() -> None:
    """Narrowing reset_method makes the kernel run exactly that method; the list comes back."""
    roles = Roles.discover()
    probes = enable_kernel_witnesses()
    witness = {"flr": "qreset_flr:", "pm": "qreset_pm:", "bus": "qreset_sbr:"}
    h = SysfsHost()
    try:
        for role in ("virtio1", "e1000e"):
            addr = roles[role]
            bind_vfio(addr)
            before = lab_reset_methods(addr)
            assert before, f"{role} has no reset methods"
            for method in before:
                log = KernelLog(f"sysfs-reset {role} {method}")
                await h.reset_function(addr, method)
                lines = log.lines()
                assert lab_reset_methods(addr) == before
                fired = {m for m, w in witness.items() if any(w in line for line in lines)}
                log_text = f"{role} {method}: witnesses {fired}\n" + "\n".join(lines)
                # The kernel put back what the reset cleared: a reset really happened.
                assert restored(lines, addr), log_text
                if {"qreset_flr", "qreset_pm", "qreset_sbr"} <= set(probes):
                    # pci_pm_reset is also its own probe, called when reset_method
                    # is written, so "pm" fires around every narrowing; FLR and
                    # secondary bus reset fire only when they run.
                    assert fired - {"pm"} == ({method} - {"pm"}), log_text
                    assert "pm" in fired or method != "pm", log_text
            with pytest.raises(ResetFailed, match="is not enabled"):
                await h.reset_function(addr, "af_flr")
    finally:
        await h.close()


@pytest.mark.lab
@lab
async def test_lab_stale_bus_is_put_back_as_the_kernel_accepts(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 9 item 3 on the real kernel: mf0's ``reset_method`` lists ``bus`` from when it
    was alone on its bus; after a narrowed reset the kernel refuses that list (EINVAL,
    "Unsupported reset method 'bus'"): what is put back is the list without ``bus``,
    with no warning and no fallback to ``default``."""
    roles = Roles.discover()
    mf0, mf1, rp = roles["mf0"], roles["mf1"], roles["rp_multifn"]
    rm = Path("/sys/bus/pci/devices") / str(mf0) / "reset_method"
    methods = [m for m in lab_reset_methods(mf0) if m != "bus"]
    assert methods, f"mf0 has no function-level method: {lab_reset_methods(mf0)}"
    if "bus" not in lab_reset_methods(mf0):
        # Make the stale list the way enumeration does: bus probed while mf0 is alone.
        lab_write(Path("/sys/bus/pci/devices") / str(mf1) / "remove", "1")
        lab_write(rm, " ".join([*reversed(methods), "bus"]))  # an operator's order, too
        lab_write(Path("/sys/bus/pci/devices") / str(rp) / "rescan", "1")
        for _ in range(100):
            if (Path("/sys/bus/pci/devices") / str(mf1)).exists():
                break
            await asyncio.sleep(0.05)
    before = lab_reset_methods(mf0)
    assert "bus" in before, before
    bind_vfio(mf0)
    h = SysfsHost()
    try:
        with caplog.at_level("INFO"):
            await h.reset_function(mf0, methods[0])
    finally:
        await h.close()
        after = lab_reset_methods(mf0)
        lab_write(rm, "default")
    assert after == [m for m in before if m != "bus"], (before, after)
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    assert any("no longer supports 'bus'" in r.getMessage() for r in caplog.records)


@pytest.mark.lab
@lab
async def test_lab_resets_overlap() -> None:
    """Four FLRs in parallel run at once: each sleeps 100 ms in pcie_flr, and all
    four enter pcie_flr before the first one's sleep is over (kernel timestamps)."""
    roles = Roles.discover()
    if "qreset_flr" not in enable_kernel_witnesses():
        pytest.skip("no kprobe on pcie_flr in this kernel")
    targets = [roles[r] for r in ("virtio1", "virtio2", "nvme1", "nvme2")]
    for addr in targets:
        bind_vfio(addr)

    def flr_times(log: KernelLog) -> list[float]:
        stamps = [re.match(r"\[\s*(\d+\.\d+)\]", line) for line in log.matching(r"qreset_flr:")]
        return [float(m[1]) for m in stamps if m]

    h = SysfsHost()
    try:
        loop = asyncio.get_running_loop()
        log = KernelLog("serial FLRs")
        t0 = loop.time()
        for addr in targets:
            await h.reset_function(addr, "flr")
        serial = loop.time() - t0
        serial_flrs = flr_times(log)
        log = KernelLog("parallel FLRs")
        t0 = loop.time()
        await asyncio.gather(*(h.reset_function(addr, "flr") for addr in targets))
        parallel = loop.time() - t0
        parallel_flrs = flr_times(log)
    finally:
        await h.close()
    print(f"4 FLRs: serial {serial * 1000:.0f} ms, parallel {parallel * 1000:.0f} ms; pcie_flr entries "
          f"spread over {(max(serial_flrs) - min(serial_flrs)) * 1000:.0f} ms serially, "
          f"{(max(parallel_flrs) - min(parallel_flrs)) * 1000:.0f} ms in parallel")
    assert len(serial_flrs) == len(parallel_flrs) == 4
    # msleep(100) after initiating FLR (pcie_flr in drivers/pci/pci.c).
    assert all(b - a >= 0.1 for a, b in itertools.pairwise(serial_flrs))
    assert max(parallel_flrs) - min(parallel_flrs) < 0.1


@pytest.mark.lab
@lab
async def test_lab_config_writes_and_errors() -> None:
    roles = Roles.discover()
    addr = roles["pci_e1000"]
    h = SysfsHost()
    try:
        original = (await h.read_config(addr))[0x3C]
        # Interrupt Line is a scratch register for software (PCI 3.0 sec 6.2.4).
        await h.write_config(addr, 0x3C, bytes([original ^ 0x5A]))
        assert (await h.read_config(addr))[0x3C] == original ^ 0x5A
        await h.write_config(addr, 0x3C, bytes([original]))
        assert (await h.read_config(addr))[0x3C] == original
        # Past a conventional function's 256 bytes: the attribute is 256 bytes
        # long and kernfs refuses the write (seen on 6.1).
        with pytest.raises(HostError, match=r"config: writing 4 bytes at 0x100: File too large$"):
            await h.write_config(addr, 0x100, b"\0\0\0\0")
        # reset_subordinate is new (upstream 6.13; some distribution kernels
        # carry it): either it resets the bus or it is reported missing.
        bridge = roles["rp_e1000e"]
        if (Path("/sys/bus/pci/devices") / str(bridge) / "reset_subordinate").exists():
            witnesses = enable_kernel_witnesses()
            log = KernelLog("reset_subordinate")
            await h.reset_subordinate(bridge)
            if "qreset_sbr" in witnesses:
                assert log.matching(r"qreset_sbr:"), "\n".join(log.lines())
        else:
            with pytest.raises(ResetFailed, match="reset_subordinate: missing"):
                await h.reset_subordinate(bridge)
    finally:
        await h.close()
