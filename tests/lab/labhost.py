"""
Helpers for tests that run inside the lab VM (scripts/lab/run) on a real kernel.

The lab topology is fixed by scripts/lab/boot: root ports sit at fixed device
numbers on bus 0, so every function's *role* can be found by walking sysfs
from its root port, whatever bus numbers the enumeration handed out.

Kernel evidence of resets: Linux 6.1 prints nothing when it performs an FLR or
a secondary bus reset. Two independent witnesses are switched on instead:
  * dynamic debug of drivers/pci/pci.c: ``pci_restore_config_dword`` logs a
    line for every dword a reset changed and the kernel wrote back (names the
    device): "restoring config space at offset 0xNN (was 0x..., writing 0x...)"
    on 6.1, "restore config 0xNN: 0x... -> 0x..." on 6.12 (``restored``);
    ``pci_bridge_wait_for_secondary_bus``
    logs "waiting N ms for downstream link" after a secondary bus reset.
  * kprobe trace events on pcie_flr / pci_reset_secondary_bus / pci_pm_reset,
    printed into the kernel log because the lab boots with ``tp_printk``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qreset.pci.address import PciAddress

LAB = os.environ.get("QRESET_LAB") == "1"
SKIP_REASON = "runs only inside the lab VM (scripts/lab/run sets QRESET_LAB=1)"
SYS = Path("/sys")
PCI = SYS / "bus" / "pci" / "devices"
OUT = Path(os.environ.get("QRESET_LAB_OUT", "/tmp"))
REPO = Path(__file__).resolve().parents[2]
#: The python running the lab (the repo's .venv on bookworm, the stack root's venv
#: on trixie: scripts/lab/build-root), so qreset runs under the stack's Python.
QRESET = [sys.executable, "-m", "qreset"]

#: Root ports (scripts/lab/boot) by role.
ROOT_PORTS = {
    "rp_virtio1": "0000:00:10.0",
    "rp_nvme1": "0000:00:11.0",
    "rp_virtio2": "0000:00:12.0",
    "rp_nvme2": "0000:00:13.0",
    "rp_e1000e": "0000:00:14.0",
    "rp_switch": "0000:00:15.0",
    "rp_multifn": "0000:00:16.0",
    "rp_pcibridge": "0000:00:17.0",
}


def children(bridge: PciAddress) -> list[PciAddress]:
    """Functions directly below ``bridge`` (its secondary bus), from /sys/devices."""
    real = (PCI / str(bridge)).resolve()
    out = []
    for entry in real.iterdir():
        with contextlib.suppress(Exception):
            if (entry / "config").exists():
                out.append(PciAddress.parse(entry.name))
    return sorted(out)


@dataclass(frozen=True)
class Roles:
    """Every function of the lab topology by role."""

    by_role: dict[str, PciAddress] = field(default_factory=dict)

    def __getitem__(self, role: str) -> PciAddress:
        return self.by_role[role]

    @classmethod
    def discover(cls) -> Roles:
        r: dict[str, PciAddress] = {}
        for role, text in ROOT_PORTS.items():
            r[role] = PciAddress.parse(text)
        one = {"virtio1": "rp_virtio1", "nvme1": "rp_nvme1", "virtio2": "rp_virtio2",
               "nvme2": "rp_nvme2", "e1000e": "rp_e1000e", "switch_up": "rp_switch",
               "pcibridge": "rp_pcibridge"}
        for role, port in one.items():
            kids = children(r[port])
            assert len(kids) == 1, f"{port} {r[port]}: expected one function below, found {kids}"
            r[role] = kids[0]
        below_up = children(r["switch_up"])
        dn = [a for a in below_up if is_bridge(a)]
        assert len(dn) == 2, f"switch upstream port {r['switch_up']}: expected 2 downstream ports, got {dn}"
        r["switch_dn1"], r["switch_dn2"] = dn
        up_bus = [a for a in below_up if not is_bridge(a)]
        assert len(up_bus) == 1, f"switch upstream port {r['switch_up']}: expected one e1000, got {up_bus}"
        (r["up_e1000"],) = up_bus
        (r["sw_e1000e"],) = children(r["switch_dn1"])
        (r["sw_virtio"],) = children(r["switch_dn2"])
        mf = children(r["rp_multifn"])
        assert len(mf) == 2, f"multifunction root port: expected 2 functions, got {mf}"
        r["mf0"], r["mf1"] = mf
        conv = children(r["pcibridge"])
        assert len(conv) == 2, f"pcie-pci-bridge: expected 2 conventional functions, got {conv}"
        r["pci_e1000"], r["pci_serial"] = conv
        return cls(r)

    def endpoints(self) -> list[PciAddress]:
        return [self[k] for k in ("virtio1", "nvme1", "virtio2", "nvme2", "e1000e", "sw_e1000e",
                                  "sw_virtio", "up_e1000", "mf0", "mf1", "pci_e1000", "pci_serial")]


def read(path: Path) -> str:
    return path.read_text().strip()


def is_bridge(addr: PciAddress) -> bool:
    """Class 06 04 (PCI-to-PCI bridge: root, switch and PCIe-to-PCI ports)."""
    return int(read(PCI / str(addr) / "class"), 16) >> 8 == 0x0604


def write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def driver(addr: PciAddress) -> str | None:
    link = PCI / str(addr) / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def iommu_group(addr: PciAddress) -> int:
    return int(os.path.basename(os.readlink(PCI / str(addr) / "iommu_group")))


def reset_methods(addr: PciAddress) -> list[str]:
    path = PCI / str(addr) / "reset_method"
    return read(path).split() if path.exists() else []


def bind_vfio(addr: PciAddress) -> None:
    """Bind ``addr`` to vfio-pci the way libvirt does: driver_override + unbind + drivers_probe."""
    if driver(addr) == "vfio-pci":
        return
    write(PCI / str(addr) / "driver_override", "vfio-pci")
    if driver(addr) is not None:
        write(PCI / str(addr) / "driver" / "unbind", str(addr))
    write(SYS / "bus" / "pci" / "drivers_probe", str(addr))
    assert driver(addr) == "vfio-pci", f"{addr} did not bind to vfio-pci (driver: {driver(addr)})"
    group = iommu_group(addr)
    for _ in range(100):  # the group's char device appears asynchronously (udev-less devtmpfs)
        if Path(f"/dev/vfio/{group}").exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"/dev/vfio/{group} did not appear after binding {addr}")


def unbind(addr: PciAddress) -> None:
    """Detach ``addr`` from its driver and clear driver_override (it stays unbound)."""
    write(PCI / str(addr) / "driver_override", "\n")
    if driver(addr) is not None:
        write(PCI / str(addr) / "driver" / "unbind", str(addr))


def bind_group_vfio(addr: PciAddress) -> int:
    """Bind every endpoint of ``addr``'s IOMMU group to vfio-pci (bridges stay: vfio allows them)."""
    group = iommu_group(addr)
    for member in sorted((SYS / "kernel" / "iommu_groups" / str(group) / "devices").iterdir()):
        a = PciAddress.parse(member.name)
        header = int(read(PCI / str(a) / "class"), 16) >> 8
        if header != 0x0604:
            bind_vfio(a)
        elif driver(a) not in (None, "pcieport"):
            # A PCI-to-PCI bridge (class 06 04) may stay in a viable group
            # driverless or on pcieport; one bound to shpchp (the SHPC hotplug
            # driver of a pcie-pci-bridge under native hotplug) made Linux 6.1
            # call the group not viable, so it is detached, as an operator would.
            write(PCI / str(a) / "driver" / "unbind", str(a))
    return group


# pci_restore_config_dword's debug line: 6.1 "restoring config space at offset
# 0x3c (was 0x100, writing 0x10a)"; 6.12 "restore config 0x3c: 0x00000100 ->
# 0x0000010a" (drivers/pci/pci.c; the wording changed between the two, with a
# "save config 0xNN: ..." line added for each dword saved).
_RESTORE_RE = re.compile(r": (restoring config space at offset|restore config) 0x[0-9a-f]+")


def restored(lines: list[str], addr: PciAddress) -> list[str]:
    """The kernel's lines saying it wrote back a register of ``addr`` after a reset."""
    return [line for line in lines if f" {addr}: " in line and _RESTORE_RE.search(line)]


# pci_save_state's debug line for each of the header's 16 dwords (drivers/pci/pci.c): 6.1
# "saving config space at offset 0xc (reading 0x41)"; 6.12 "save config 0x0c: 0x00000041".
_SAVE_RE = re.compile(r": (?:saving config space at offset (0x[0-9a-f]+) \(reading (0x[0-9a-f]+)\)"
                      r"|save config (0x[0-9a-f]+): (0x[0-9a-f]+))")


def saved_dword(line: str, addr: PciAddress, offset: int) -> int | None:
    """The value the kernel saved of ``addr``'s header dword at ``offset`` before a reset, if
    ``line`` says so (every pci_reset_function saves the header first: pci_dev_save_and_disable)."""
    if f" {addr}: " not in line:
        return None
    m = _SAVE_RE.search(line)
    if m is None:
        return None
    off, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return int(value, 16) if int(off, 16) == offset else None


_COMM_RE = re.compile(r'comm="?([^"]*)"?$')


def flr_caller(line: str) -> str | None:
    """The task that started the FLR a ``qreset_flr`` kprobe line reports (None: not such a line)."""
    if "qreset_flr:" not in line:
        return None
    m = _COMM_RE.search(line.rstrip())
    return m.group(1) if m else ""


def dmesg_lines() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


class KernelLog:
    """The kernel log lines written after a marker this object puts into /dev/kmsg."""

    def __init__(self, label: str) -> None:
        self.marker = f"qreset-lab-mark {label} {uuid.uuid4().hex[:8]}"
        write(Path("/dev/kmsg"), self.marker + "\n")

    def lines(self) -> list[str]:
        all_lines = dmesg_lines()
        for i in range(len(all_lines) - 1, -1, -1):
            if self.marker in all_lines[i]:
                return all_lines[i + 1:]
        raise AssertionError(f"marker {self.marker!r} not found in dmesg")

    def matching(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.lines() if rx.search(line)]


_PROBES = {
    # comm: who reset (QEMU's "qemu-system-x86", qreset's "python*", libvirtd's workers);
    # a kprobe fetch argument (Documentation/trace/kprobetrace.rst: "$comm").
    "qreset_flr": "pcie_flr comm=$comm",
    "qreset_sbr": "pci_reset_secondary_bus",
    "qreset_pm": "pci_pm_reset",
    # A driver unbind (drivers/pci/pci-driver.c pci_device_remove(struct device *dev)):
    # dev_name() is dev->kobj.name, the first member of the first member, so the
    # argument dereferenced twice is the BDF string.
    "qreset_unbind": "pci_device_remove name=+0(+0(%di)):string",
}


def enable_kernel_witnesses() -> list[str]:
    """Turn on PCI dynamic debug and the reset kprobes; returns the probes that could be set."""
    debugfs = SYS / "kernel" / "debug"
    if not (debugfs / "dynamic_debug").exists():
        subprocess.run(["mount", "-t", "debugfs", "debugfs", str(debugfs)], check=True)
    write(debugfs / "dynamic_debug" / "control", "file drivers/pci/pci.c +p")
    tracefs = SYS / "kernel" / "tracing"
    if not (tracefs / "kprobe_events").exists():
        subprocess.run(["mount", "-t", "tracefs", "tracefs", str(tracefs)], check=True)
    existing = read(tracefs / "kprobe_events")
    set_up = []
    for name, symbol in _PROBES.items():
        if name not in existing:
            try:
                fd = os.open(tracefs / "kprobe_events", os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, f"p:{name} {symbol}\n".encode())
                finally:
                    os.close(fd)
            except OSError as err:
                print(f"kprobe {name} on {symbol}: {err}")
                continue  # inlined or absent in this build
        write(tracefs / "events" / "kprobes" / name / "enable", "1")
        set_up.append(name)
    return set_up


def qreset(*args: str, check: bool = False, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the qreset CLI of this repo (as the lab's root)."""
    proc = subprocess.run([*QRESET, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"qreset {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
        )
    return proc


@contextlib.contextmanager
def held_group(group: int) -> Iterator[int]:
    """Hold /dev/vfio/GROUP open (as QEMU would) for the duration."""
    fd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)
