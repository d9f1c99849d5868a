"""
Writing a simulated host out as a sysfs-shaped directory tree.

``SimHost.write_tree(root)`` produces what ``SysfsHost(root)`` reads, with the
shapes and formats of drivers/pci/pci-sysfs.c and drivers/pci/slot.c:

* ``devices/pci0000:00/0000:00:01.0/0000:01:00.0/`` nested by bridge, and
  ``bus/pci/devices/<bdf>`` relative symlinks to those directories;
* ``vendor``/``device``/``subsystem_vendor``/``subsystem_device`` as
  ``0x%04x\\n``, ``class`` as ``0x%06x\\n``, ``revision`` as ``0x%02x\\n``;
  ``config`` binary (what a read returns right now); ``resource`` one
  ``0x%016llx 0x%016llx 0x%016llx\\n`` line per resource (resource_show);
  ``driver_override`` (``(null)\\n`` when unset);
  ``reset_method``/``reset`` only when a method exists
  (pci_dev_reset_method_attr_is_visible); ``reset_subordinate`` on bridges
  that have it; ``remove``, ``rescan``; bridges get
  ``secondary_bus_number``/``subordinate_bus_number`` and ``pci_bus/DDDD:BB``;
* ``driver`` -> ``bus/pci/drivers/NAME`` (with ``NAME/<bdf>`` back-links),
  ``iommu_group`` -> ``kernel/iommu_groups/N`` (with ``devices/<bdf>``),
  ``physfn``/``virtfnN`` links;
* ``bus/pci/slots/NAME/address`` (``DDDD:BB:DD\\n``) and, for hotplug slots,
  ``power``; ``bus/pci/rescan``, ``bus/pci/drivers_probe`` and the drivers'
  ``bind``/``unbind``/``new_id``/``remove_id`` (write-only in the kernel,
  empty files here).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qreset.pci.sim import SimHost
    from qreset.pci.sim_enum import SimFunction


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def _text(path: Path, text: str) -> None:
    path.write_text(text)


def _dir_of(host: SimHost, f: SimFunction, root: Path) -> Path:
    chain = []
    p: SimFunction | None = f
    while p is not None:
        chain.append(str(p.addr))
        p = p.parent
    base = root / "devices" / f"pci{f.addr.domain:04x}:00"
    return base.joinpath(*reversed(chain))


#: Marks a directory as written by :func:`write_tree`, so writing it again may replace it.
MARKER = ".qreset-sim-tree"


def write_tree(host: SimHost, root: Path) -> None:
    """Write ``host`` as it is now under ``root``.

    Writing again over a tree this function wrote replaces it (a driver
    unbound, VFs disabled or a function removed since leave no stale links);
    any other non-empty directory is written into, never cleared.
    """
    if (root / MARKER).exists():
        for sub in ("devices", "bus", "kernel"):
            if (root / sub).is_dir() and not (root / sub).is_symlink():
                shutil.rmtree(root / sub)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by qreset.pci.sim_tree; safe to replace\n")
    devices = root / "bus" / "pci" / "devices"
    drivers = root / "bus" / "pci" / "drivers"
    groups = root / "kernel" / "iommu_groups"
    slots = root / "bus" / "pci" / "slots"
    for d in (devices, drivers, slots):
        d.mkdir(parents=True, exist_ok=True)
    _text(root / "bus" / "pci" / "rescan", "")
    _text(root / "bus" / "pci" / "drivers_probe", "")
    if host.iommu:
        groups.mkdir(parents=True, exist_ok=True)
    present = [f for f in host._order if f.present]
    for f in present:
        d = _dir_of(host, f, root)
        d.mkdir(parents=True, exist_ok=True)
        vendor, device, klass, rev, svid, sdid = f.ids
        _text(d / "vendor", f"0x{vendor:04x}\n")
        _text(d / "device", f"0x{device:04x}\n")
        _text(d / "class", f"0x{klass:06x}\n")
        _text(d / "revision", f"0x{rev:02x}\n")
        _text(d / "subsystem_vendor", f"0x{svid:04x}\n")
        _text(d / "subsystem_device", f"0x{sdid:04x}\n")
        (d / "config").write_bytes(host.config_now(f.addr))
        _text(d / "resource", "".join(f"0x{r.start:016x} 0x{r.end:016x} 0x{r.flags:016x}\n"
                                      for r in f.resources))
        _text(d / "driver_override", f"{f.driver_override}\n" if f.driver_override else "(null)\n")
        _text(d / "remove", "")
        _text(d / "rescan", "")
        if f.has_reset_attr:
            _text(d / "reset_method", " ".join(f.reset_methods) + "\n")
            _text(d / "reset", "")
        if f.is_bridge:
            _text(d / "secondary_bus_number", f"{f.asg.secondary}\n")
            _text(d / "subordinate_bus_number", f"{f.asg.subordinate}\n")
            (d / "pci_bus" / f"{f.addr.domain:04x}:{f.asg.secondary:02x}").mkdir(parents=True, exist_ok=True)
            if host.has_reset_subordinate(f):
                _text(d / "reset_subordinate", "")
        _link(d, devices / str(f.addr))
        if f.driver:
            drv = drivers / f.driver
            drv.mkdir(parents=True, exist_ok=True)
            for attr in ("bind", "unbind", "new_id", "remove_id"):
                _text(drv / attr, "")
            _link(drv, d / "driver")
            _link(d, drv / str(f.addr))
        if host.iommu and f.group is not None:
            g = groups / str(f.group)
            (g / "devices").mkdir(parents=True, exist_ok=True)
            _link(g, d / "iommu_group")
            _link(d, g / "devices" / str(f.addr))
        if f.physfn is not None:
            _link(_dir_of(host, f.physfn, root), d / "physfn")
        for i, vf in enumerate(f.virtfns):
            if vf.present:
                _link(_dir_of(host, vf, root), d / f"virtfn{i}")
        if f.spec.slot is not None:
            s = slots / f.spec.slot.name
            s.mkdir(parents=True, exist_ok=True)
            _text(s / "address", f"{f.addr.domain:04x}:{f.asg.secondary:02x}:00\n")
            if f.spec.slot.hotplug:
                _text(s / "power", "1\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m qreset.pci.sim_tree TOPOLOGY.toml DIR``: write DIR as a sysfs root,
    e.g. to try ``qreset topology --sysfs-root DIR`` on a simulated host."""
    import argparse

    from qreset.errors import QResetError
    from qreset.pci.sim import SimHost

    parser = argparse.ArgumentParser(prog="python -m qreset.pci.sim_tree", description=main.__doc__)
    parser.add_argument("topology", type=Path)
    parser.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    try:
        SimHost.from_toml(args.topology).write_tree(args.root)
    except (QResetError, OSError) as exc:
        print(f"qreset: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
