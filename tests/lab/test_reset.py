"""Real resets by qreset on the lab's kernel: FLR, the kernel's secondary bus reset, VFIO hot reset, user SBR.

Each test proves the reset happened from the kernel's side (kprobe lines and
dynamic-debug "restoring config space" lines, see labhost) and checks what
qreset's rescan concluded: nothing to restore after the kernel's own
save/restore, cleared registers found and written back after a userspace
bridge-control reset.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from qreset.engine import Engine
from qreset.pci.address import PciAddress
from qreset.pci.sysfs import SysfsHost
from qreset.plan import Method, Policy
from tests.lab.labhost import (
    PCI,
    KernelLog,
    Roles,
    bind_group_vfio,
    qreset,
    read,
    reset_methods,
    restored,
    write,
)

pytestmark = pytest.mark.lab


def reset_json(bdfs: Sequence[PciAddress], *extra: str) -> tuple[int, dict[str, Any]]:
    proc = qreset("reset", *map(str, bdfs), "--json", *extra)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise AssertionError(
            f"qreset reset printed no JSON ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
        ) from err


@contextlib.contextmanager
def restricted_methods(addrs: Sequence[PciAddress], methods: str) -> Iterator[None]:
    """Narrow the kernel's reset_method of ``addrs`` ('' disables all), put 'default' back after.

    Functions without any method have no writable reset_method (the kernel
    hides it): they are left alone.
    """
    addrs = [a for a in addrs if reset_methods(a)]
    try:
        for a in addrs:
            write(PCI / str(a) / "reset_method", methods or "\n")
            assert reset_methods(a) == methods.split(), (a, reset_methods(a))
        yield
    finally:
        for a in addrs:
            write(PCI / str(a) / "reset_method", "default")


def config(addr: PciAddress) -> bytes:
    return (PCI / str(addr) / "config").read_bytes()[:64]


def restores(lines: list[str], addr: PciAddress) -> list[str]:
    return restored(lines, addr)


def only_domain(report: dict[str, Any]) -> dict[str, Any]:
    assert report["ok"], json.dumps(report, indent=1)
    assert len(report["domains"]) == 1, [d["key"] for d in report["domains"]]
    dom: dict[str, Any] = report["domains"][0]
    return dom


def test_flr_by_qreset_reset(roles: Roles, witnesses: list[str]) -> None:
    addr = roles["virtio1"]
    bind_group_vfio(addr)
    before = config(addr)
    log = KernelLog("qreset reset flr")
    rc, report = reset_json([addr])
    lines = log.lines()
    assert rc == 0, report
    dom = only_domain(report)
    assert dom["method"] == "flr"
    assert dom["covers"] == [str(addr)]
    # The kernel did one FLR and restored what it cleared (BARs, command register).
    assert len([x for x in lines if "qreset_flr:" in x]) == 1, lines
    assert not [x for x in lines if "qreset_sbr:" in x], lines
    assert restores(lines, addr), lines
    # ...so qreset's rescan finds nothing to write back.
    (fn,) = dom["functions"]
    assert fn["change"] == "none", fn
    assert fn["writes"] == 0
    assert config(addr) == before


def test_kernel_secondary_bus_reset_by_qreset_reset(roles: Roles, witnesses: list[str]) -> None:
    """e1000e alone on a root port, reset_method narrowed to 'bus': qreset plans the kernel's bus reset."""
    addr, port = roles["e1000e"], roles["rp_e1000e"]
    bind_group_vfio(addr)
    before = config(addr)
    with restricted_methods([addr], "bus"):
        log = KernelLog("qreset reset bus")
        rc, report = reset_json([addr])
        lines = log.lines()
    assert rc == 0, report
    dom = only_domain(report)
    assert dom["method"] == "bus"
    assert dom["target"] == str(port)
    assert [x for x in lines if "qreset_sbr:" in x], lines
    assert [x for x in lines if f"pcieport {port}: waiting 100 ms for downstream link" in x], lines
    assert not [x for x in lines if "qreset_flr:" in x or "qreset_pm:" in x], lines
    assert restores(lines, addr), lines
    (fn,) = dom["functions"]
    assert fn["change"] == "none", fn
    assert config(addr) == before


async def test_user_sbr_finds_and_restores_cleared_registers(roles: Roles, witnesses: list[str]) -> None:
    """A userspace Bridge Control reset: the kernel saves nothing, qreset's rescan must restore."""
    addr, port = roles["e1000e"], roles["rp_e1000e"]
    bind_group_vfio(addr)
    before = config(addr)
    host = SysfsHost()
    try:
        with restricted_methods([addr], ""):
            log = KernelLog("user sbr")
            report = await Engine(host).reset(
                "lab", [addr], {"lab": [addr]}, Policy(bus_methods=(Method.USER_SBR,)),
            )
            lines = log.lines()
    finally:
        await host.close()
    assert report.ok, report.to_json()
    (res,) = report.domains
    assert res.domain.method is Method.USER_SBR
    assert res.domain.target == port
    # The kernel took no part: no reset function ran, nothing was restored by it.
    assert not [x for x in lines if "qreset_sbr:" in x or "qreset_flr:" in x], lines
    assert not restores(lines, addr), lines
    (fn,) = res.functions
    assert fn.change == "state", fn
    assert fn.restored
    assert fn.verified
    assert fn.writes > 0
    assert fn.diff is not None
    cleared = {r.offset for r in fn.diff.state_registers if r.after == 0 and r.before != 0}
    assert {0x04, 0x10} <= cleared, [r.to_json() for r in fn.diff.registers]
    assert config(addr) == before
    assert read(PCI / str(addr) / "enable") in ("0", "1")


CASES = {
    "e1000e": ("e1000e",),
    "sw_e1000e": ("sw_e1000e",),
    "mf0": ("mf0", "mf1"),
    "pci_e1000": ("pci_e1000", "pci_serial"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_vfio_hot_reset_domain_by_engine(roles: Roles, witnesses: list[str], case: str) -> None:
    """The planner's VFIO_HOT_RESET domain covers exactly what the kernel's hot-reset info lists."""
    from qreset.pci import vfio

    addrs = [roles[r] for r in CASES[case]]
    groups = {a: bind_group_vfio(a) for a in addrs}
    kernel = {a for a, _g in vfio.hot_reset_info(addrs[0], groups[addrs[0]])}
    host = SysfsHost()
    try:
        with restricted_methods(addrs, ""):
            engine = Engine(host)
            policy = Policy(bus_methods=(Method.VFIO_HOT_RESET,), vfio_ioctl_ok=True)
            plan = await engine.plan("lab", addrs, {"lab": addrs}, policy)
            assert plan.ok, plan.to_json()
            (dom,) = plan.domains
            assert dom.method is Method.VFIO_HOT_RESET
            assert set(dom.covers) == kernel, (sorted(map(str, dom.covers)), sorted(map(str, kernel)))
            log = KernelLog(f"engine hot reset {case}")
            report = await engine.run(plan)
            lines = log.lines()
    finally:
        await host.close()
    assert report.ok, report.to_json()
    assert [x for x in lines if "qreset_sbr:" in x], lines
    for a in kernel:
        assert restores(lines, a), (a, lines)
    for fn in report.domains[0].functions:
        assert fn.change == "none", (fn.address, fn.diff.to_json() if fn.diff else None)
