"""Reset domains from the tree, against the kernel's rules (drivers/pci/pci.c,
drivers/vfio/pci/vfio_pci_core.c), on a hand-made host and on every simulated one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qreset.errors import HostError, NoSuchFunction, ResetFailed
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.cfgspace import parse_config, u16
from qreset.pci.host import FunctionInfo, PciHost, SlotInfo
from qreset.pci.sim import SimHost
from qreset.pci.sysfs import SysfsHost
from qreset.topology import ResetKind, ResetScope, Topology
from tests.conftest import SIM_DIR
from tests.pcibuild import A, config, node, sample


def S(*bdfs: str) -> frozenset[PciAddress]:
    return frozenset(A(b) for b in bdfs)


def test_parent_and_root_bus() -> None:
    t = sample()
    assert t.parent(A("03:00.0")) == A("02:00.0")
    assert t.parent(A("01:00.0")) == A("00:01.0")
    assert t.parent(A("00:02.0")) is None
    assert set(t.roots()) == S("00:00.0", "00:01.0", "00:02.0", "00:1e.0")
    assert t.ancestors(A("04:00.1")) == (A("02:01.0"), A("01:00.0"), A("00:01.0"))


def test_parent_falls_back_to_bridge_secondary_bus() -> None:
    # sysfs normally gives the parent; a tree without it still finds the bridge
    # whose secondary bus this is.
    t = sample()
    nodes = dict(t.functions)
    n = nodes[A("06:01.0")]
    nodes[n.address] = node("06:01.0", n.config.raw, driver="vfio-pci", group=6)
    t2 = Topology(nodes, t.slots, True)
    assert t2.parent(A("06:01.0")) == A("00:1e.0")
    assert A("06:01.0") in t2.below(A("00:1e.0"))


def test_bus_of_and_below() -> None:
    t = sample()
    assert t.bus_of(A("04:00.1")) == S("04:00.0", "04:00.1")
    assert t.bus_of(A("00:02.0")) == S("00:00.0", "00:01.0", "00:02.0", "00:1e.0")
    assert t.below(A("00:01.0")) == S(
        "01:00.0", "02:00.0", "02:01.0", "02:02.0", "03:00.0", "04:00.0", "04:00.1", "05:00.0")
    assert t.below(A("01:00.0")) == S(
        "02:00.0", "02:01.0", "02:02.0", "03:00.0", "04:00.0", "04:00.1", "05:00.0")
    assert t.below(A("02:01.0")) == S("04:00.0", "04:00.1")
    assert t.below(A("03:00.0")) == frozenset()  # an endpoint has nothing below it
    assert A("00:1e.0") not in t.below(A("00:1e.0"))


def test_below_uses_bus_window_even_without_parent_links() -> None:
    # A secondary bus reset reaches every bus in [secondary, subordinate]
    # electrically, whatever sysfs's links say: a function on bus 5 with a
    # wrong parent is still below the root port whose window covers it.
    t = sample()
    nodes = dict(t.functions)
    n = nodes[A("05:00.0")]
    nodes[n.address] = node("05:00.0", n.config.raw, parent="00:1e.0")
    t2 = Topology(nodes, t.slots, True)
    assert A("05:00.0") in t2.below(A("00:01.0"))
    assert A("05:00.0") in t2.below(A("00:1e.0"))  # union: conservative


def test_below_follows_parent_links_past_a_too_narrow_bus_window() -> None:
    # The other half of the union: a switch whose Subordinate Bus was left at
    # its secondary bus (stale firmware numbering) still has, per sysfs, the
    # buses behind its downstream ports below it. Dropping them would let a
    # bus reset hit functions nobody planned for.
    t = sample()
    nodes = dict(t.functions)
    n = nodes[A("01:00.0")]
    raw = bytearray(n.config.raw)
    raw[regs.SUBORDINATE_BUS] = raw[regs.SECONDARY_BUS]
    nodes[n.address] = node("01:00.0", bytes(raw), parent="00:01.0", driver="pcieport", group=2)
    t2 = Topology(nodes, t.slots, True)
    assert t2.functions[A("01:00.0")].config.subordinate_bus == 2
    assert t2.below(A("01:00.0")) == t.below(A("01:00.0")) == S(
        "02:00.0", "02:01.0", "02:02.0", "03:00.0", "04:00.0", "04:00.1", "05:00.0")


def test_bus_scope_is_parent_secondary_bus() -> None:
    t = sample()
    assert t.bus_scope(A("04:00.1")) == ResetScope(ResetKind.BUS, A("02:01.0"), S("04:00.0", "04:00.1"))
    assert t.bus_scope(A("06:01.0")) == ResetScope(ResetKind.BUS, A("00:1e.0"), S("06:01.0", "06:02.0"))
    # A bridge's own bus reset is its parent's and hits its siblings and everything below.
    scope = t.bus_scope(A("02:00.0"))
    assert scope is not None
    assert scope.target == A("01:00.0")
    assert scope.affected == t.below(A("01:00.0"))
    # pci_bus_reset needs bus->self: never on a root bus.
    assert t.bus_scope(A("00:02.0")) is None
    assert t.bus_scope(A("00:01.0")) is None


def test_slot_scope_needs_hotplug_slot() -> None:
    t = sample()
    assert t.slot_scope(A("03:00.0")) == ResetScope(ResetKind.SLOT, A("02:00.0"), S("03:00.0"), "4")
    assert t.slot_scope(A("05:00.0")) is None  # slot "9" has no hotplug controller
    assert t.slot_scope(A("04:00.0")) is None  # no slot at all


def test_hot_reset_prefers_slot_then_bus() -> None:
    t = sample()
    hr = t.hot_reset_scope(A("03:00.0"))
    assert hr is not None
    assert hr.kind is ResetKind.SLOT
    assert hr.affected == S("03:00.0")
    hr = t.hot_reset_scope(A("04:00.1"))
    assert hr is not None
    assert hr.kind is ResetKind.BUS
    assert hr.affected == S("04:00.0", "04:00.1")
    assert t.hot_reset_scope(A("00:02.0")) is None


def test_kernel_bus_method_only_when_alone_or_slot() -> None:
    t = sample()
    # pci_parent_bus_reset: alone on its bus
    assert t.kernel_bus_scope(A("05:00.0")) == ResetScope(ResetKind.BUS, A("02:02.0"), S("05:00.0"))
    # pci_dev_reset_slot_function: single-function device in a hotplug slot
    k = t.kernel_bus_scope(A("03:00.0"))
    assert k is not None
    assert k.kind is ResetKind.SLOT
    # shares its bus / multifunction / root bus / bridge: no kernel bus method
    assert t.kernel_bus_scope(A("04:00.0")) is None
    assert t.kernel_bus_scope(A("06:01.0")) is None
    assert t.kernel_bus_scope(A("00:02.0")) is None
    assert t.kernel_bus_scope(A("02:01.0")) is None


def test_function_methods_filters_kernel_list() -> None:
    t = sample()
    assert t.function_methods(A("03:00.0")) == ("flr",)
    assert t.function_methods(A("05:00.0")) == ()
    assert t.function_methods(A("04:00.1")) == ("pm",)
    assert t.config_methods(A("03:00.0")) == ("flr",)
    assert t.config_methods(A("04:00.1")) == ("pm",)
    assert t.config_methods(A("04:00.0")) == ()


def test_groups_acs_and_conventional() -> None:
    t = sample()
    assert t.group_members(4) == S("02:01.0", "04:00.0", "04:00.1")
    assert t.group_members(99) == frozenset()
    assert t.acs_isolated(A("02:00.0")) is True
    assert t.acs_isolated(A("02:01.0")) is False
    assert t.acs_isolated(A("01:00.0")) is None  # upstream port: not an ACS decision point
    assert t.acs_isolated(A("03:00.0")) is None
    assert t.non_acs_ports([A("04:00.0")]) == (A("02:01.0"),)
    assert t.non_acs_ports([A("03:00.0")]) == ()
    assert t.conventional_bus(A("00:1e.0")) is True
    assert t.conventional_bus(A("00:01.0")) is False
    assert t.conventional_bus(A("03:00.0")) is False


def test_acs_partial_capability_counts_as_hardwired() -> None:
    # pci_acs_flags_enabled: flags missing from the ACS Capability register
    # are hard-wired enabled, so a port that only advertises SV and enables it is isolated.
    raw = config(bridge=True, secondary=1, subordinate=1, pcie_type=regs.EXP_TYPE_ROOT_PORT,
                 acs=(regs.ACS_SV, regs.ACS_SV))
    t = Topology({A("00:01.0"): node("00:01.0", raw)}, [], True)
    assert t.acs_isolated(A("00:01.0")) is True
    raw = config(bridge=True, secondary=1, subordinate=1, pcie_type=regs.EXP_TYPE_ROOT_PORT,
                 acs=(regs.ACS_SV | regs.ACS_RR, regs.ACS_SV))
    t = Topology({A("00:01.0"): node("00:01.0", raw)}, [], True)
    assert t.acs_isolated(A("00:01.0")) is False


def test_unknown_function_names_it() -> None:
    t = sample()
    with pytest.raises(NoSuchFunction, match=r"0000:09:00\.0"):
        t.node(A("09:00.0"))
    with pytest.raises(NoSuchFunction):
        t.bus_scope(A("09:00.0"))


class _TreeHost(PciHost):
    """Serves a Topology's own nodes through the PciHost interface, with a
    delay per read, to check that load() reads concurrently."""

    def __init__(self, topo: Topology, delay: float, broken: PciAddress | None = None,
                 vanished: PciAddress | None = None) -> None:
        self.topo = topo
        self.delay = delay
        self.broken = broken
        self.vanished = vanished
        self.name = "tree"
        self.inflight = 0
        self.peak = 0

    async def _tick(self) -> None:
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        await asyncio.sleep(self.delay)
        self.inflight -= 1

    async def functions(self) -> list[PciAddress]:
        return sorted(self.topo.functions)

    async def info(self, addr: PciAddress) -> FunctionInfo:
        await self._tick()
        if addr == self.broken:
            raise HostError(f"/sys/bus/pci/devices/{addr}/vendor", "expected a 0x-prefixed hex number")
        if addr == self.vanished:
            raise NoSuchFunction(f"/sys/bus/pci/devices/{addr}", "missing")
        return self.topo.node(addr).info

    async def read_config(self, addr: PciAddress, size: int = 4096) -> bytes:
        await self._tick()
        return self.topo.node(addr).config.raw[:size]

    async def slots(self) -> list[SlotInfo]:
        return list(self.topo.slots)

    async def has_iommu_groups(self) -> bool:
        return self.topo.iommu

    async def write_config(self, addr: PciAddress, offset: int, data: bytes) -> None:
        raise NotImplementedError

    async def reset_function(self, addr: PciAddress, method: str | None = None) -> None:
        raise NotImplementedError

    async def reset_subordinate(self, bridge: PciAddress) -> None:
        raise NotImplementedError

    async def remove(self, addr: PciAddress) -> None:
        raise NotImplementedError

    async def rescan(self, bridge: PciAddress | None = None) -> None:
        raise NotImplementedError

    async def bind(self, addr: PciAddress, driver: str | None) -> None:
        raise NotImplementedError


async def test_load_reads_concurrently_and_matches() -> None:
    src = sample()
    host = _TreeHost(src, delay=0.02)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    t = await Topology.load(host)
    elapsed = loop.time() - t0
    assert set(t.functions) == set(src.functions)
    # Every function in flight at once: an event count, not a wall-clock bound
    # (a sequential load would peak at 1; a timing ratio flakes on a loaded host).
    assert host.peak >= len(src.functions)
    assert elapsed >= 0.02  # each read really waited for its delay
    for a in src.functions:
        assert t.node(a).config == parse_config(src.node(a).config.raw)
        assert t.bus_scope(a) == src.bus_scope(a)
        assert t.hot_reset_scope(a) == src.hot_reset_scope(a)
    assert t.host_name == "tree"
    assert t.iommu


async def test_load_raises_the_host_error_itself() -> None:
    # Not an ExceptionGroup: callers catch QResetError and print its one line.
    host = _TreeHost(sample(), delay=0.001, broken=A("04:00.1"))
    with pytest.raises(HostError, match=r"0000:04:00\.1/vendor: expected"):
        await Topology.load(host)


async def test_load_skips_a_function_that_vanished() -> None:
    host = _TreeHost(sample(), delay=0.001, vanished=A("06:02.0"))
    t = await Topology.load(host)
    assert A("06:02.0") not in t.functions
    assert t.below(A("00:1e.0")) == S("06:01.0")


# -- the simulated hosts (configs/sim/*.toml) -----------------------------------------

SIMS = sorted(SIM_DIR.glob("*.toml"))


async def load_sim(name: str, time_scale: float = 0.001) -> tuple[SimHost, Topology]:
    host = SimHost.from_toml(SIM_DIR / name, time_scale=time_scale)
    return host, await Topology.load(host)


def scope(kind: ResetKind, target: str, *affected: str, slot: str | None = None) -> ResetScope:
    return ResetScope(kind, A(target), S(*affected), slot)


BUS, SLOT = ResetKind.BUS, ResetKind.SLOT

#: sim file -> {endpoint: (function methods, VFIO hot reset scope, kernel ``bus`` scope)}.
#: Derived by hand from each file's comments and the kernel rules: slot when the
#: port's slot is a hotplug slot (pci_probe_reset_slot), else the parent's bus
#: (pci_probe_reset_bus); the kernel's ``bus`` method only alone or in a hotplug slot.
EXPECTED: dict[str, dict[str, tuple[tuple[str, ...], ResetScope | None, ResetScope | None]]] = {
    "gpu-audio.toml": {
        "01:00.0": ((), scope(BUS, "00:01.0", "01:00.0", "01:00.1"), None),
        "01:00.1": ((), scope(BUS, "00:01.0", "01:00.0", "01:00.1"), None),
    },
    "nic-flr.toml": {
        "01:00.0": (("flr", "pm"), scope(SLOT, "00:1c.0", "01:00.0", slot="4"),
                    scope(SLOT, "00:1c.0", "01:00.0", slot="4")),
    },
    "switch.toml": {
        "03:00.0": (("flr", "pm"), scope(SLOT, "02:08.0", "03:00.0", slot="8"),
                    scope(SLOT, "02:08.0", "03:00.0", slot="8")),
        "04:00.0": (("flr", "pm"), scope(SLOT, "02:09.0", "04:00.0", slot="9"),
                    scope(SLOT, "02:09.0", "04:00.0", slot="9")),
        "05:00.0": (("pm",), scope(BUS, "02:10.0", "05:00.0"), scope(BUS, "02:10.0", "05:00.0")),
        "06:00.0": (("pm",), scope(BUS, "02:11.0", "06:00.0"), scope(BUS, "02:11.0", "06:00.0")),
    },
    "conventional.toml": {
        "02:01.0": (("pm",), scope(BUS, "01:00.0", "02:01.0", "02:02.0"), None),
        "02:02.0": ((), scope(BUS, "01:00.0", "02:01.0", "02:02.0"), None),
    },
    "sriov.toml": {
        a: (m, scope(BUS, "00:01.0", "01:00.0", "01:10.0", "01:10.4", "01:11.0", "01:11.4"), None)
        for a, m in [("01:00.0", ("flr", "pm")), ("01:10.0", ("flr",)), ("01:10.4", ("flr",)),
                     ("01:11.0", ("flr",)), ("01:11.4", ("flr",))]
    },
    "demo.toml": {
        "01:00.0": (("flr", "pm"), scope(SLOT, "00:01.0", "01:00.0", slot="1"),
                    scope(SLOT, "00:01.0", "01:00.0", slot="1")),
        "02:00.0": (("flr", "pm"), scope(SLOT, "00:02.0", "02:00.0", slot="2"),
                    scope(SLOT, "00:02.0", "02:00.0", slot="2")),
        "03:00.0": ((), scope(BUS, "00:03.0", "03:00.0", "03:00.1"), None),
        "03:00.1": ((), scope(BUS, "00:03.0", "03:00.0", "03:00.1"), None),
        "04:00.0": (("flr", "pm"), scope(BUS, "00:04.0", "04:00.0"), scope(BUS, "00:04.0", "04:00.0")),
        "06:01.0": ((), scope(BUS, "05:00.0", "06:01.0", "06:02.0"), None),
        "06:02.0": (("pm",), scope(BUS, "05:00.0", "06:01.0", "06:02.0"), None),
    },
}


def test_every_sim_file_has_expectations() -> None:
    assert {p.name for p in SIMS} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_sim_endpoint_scopes(name: str) -> None:
    host, t = await load_sim(name)
    endpoints = {a for a in t.functions if not t.is_bridge(a) and t.node(a).info.class_code >> 8 != 0x0600}
    assert endpoints == S(*EXPECTED[name])
    for bdf, (methods, hot, kbus) in EXPECTED[name].items():
        a = A(bdf)
        assert t.function_methods(a) == methods, bdf
        assert t.hot_reset_scope(a) == hot, bdf
        assert t.kernel_bus_scope(a) == kbus, bdf
    await host.close()


async def test_sim_switch_tree() -> None:
    host, t = await load_sim("switch.toml")
    ports = S("02:08.0", "02:09.0", "02:10.0", "02:11.0")
    assert t.below(A("01:00.0")) == ports | S("03:00.0", "04:00.0", "05:00.0", "06:00.0")
    assert t.below(A("00:01.0")) == t.below(A("01:00.0")) | S("01:00.0")
    for p in ports:
        assert t.parent(p) == A("01:00.0")
        assert t.bus_scope(p) == scope(BUS, "01:00.0", *map(str, t.below(A("01:00.0"))))
    assert {p: t.acs_isolated(p) for p in ports} == {
        A("02:08.0"): True, A("02:09.0"): True, A("02:10.0"): True, A("02:11.0"): False}
    assert t.non_acs_ports([A("06:00.0")]) == (A("02:11.0"),)
    assert not any(t.conventional_bus(b) for b in t.functions if t.is_bridge(b))
    await host.close()


async def test_sim_conventional_and_sriov() -> None:
    host, t = await load_sim("conventional.toml")
    assert t.conventional_bus(A("01:00.0")) is True
    assert t.conventional_bus(A("00:1c.0")) is False
    assert t.bus_scope(A("01:00.0")) == scope(BUS, "00:1c.0", "01:00.0", "02:01.0", "02:02.0")
    await host.close()
    host, t = await load_sim("sriov.toml")
    vfs = S("01:10.0", "01:10.4", "01:11.0", "01:11.4")
    assert t.vfs_of(A("01:00.0")) == vfs
    assert t.function_scope(A("01:00.0")).affected == vfs | S("01:00.0")
    assert t.function_scope(A("01:10.0")).affected == S("01:10.0")
    await host.close()


@pytest.mark.parametrize("path", SIMS, ids=[p.stem for p in SIMS])
async def test_sim_resets_hit_exactly_the_predicted_functions(path: Path) -> None:
    """Cross-check against the simulator's own reset model: the kernel ``bus``
    method works exactly where kernel_bus_scope says and hits what it says;
    a userspace SBR and reset_subordinate of every bridge hit ``below``; a
    function reset hits ``function_scope``."""
    host, t = await load_sim(path.name, time_scale=0.0001)
    for a in t.functions:
        node = t.node(a)
        if "bus" in node.info.reset_methods:
            kbus = t.kernel_bus_scope(a)
            if kbus is None:
                with pytest.raises(ResetFailed):
                    await host.reset_function(a, "bus")
            else:
                await host.reset_function(a, "bus")
                assert host.reset_log[-1].affected == kbus.affected, a
        fm = t.function_methods(a)
        if fm:
            await host.reset_function(a, fm[0])
            assert host.reset_log[-1].affected == t.function_scope(a).affected, a
    await host.close()
    for b in t.functions:
        if not t.is_bridge(b) or not t.below(b):
            continue
        # A fresh host per bridge: a userspace SBR leaves bridges below at power-on
        # defaults (bus numbers 0) until software restores them.
        host = SimHost.from_toml(path, time_scale=0.0001)
        bc = u16(await host.read_config(b, 64), regs.BRIDGE_CONTROL)
        assert_sbr = (bc | regs.BRIDGE_CTL_BUS_RESET).to_bytes(2, "little")
        await host.write_config(b, regs.BRIDGE_CONTROL, assert_sbr)
        await host.write_config(b, regs.BRIDGE_CONTROL, bc.to_bytes(2, "little"))
        assert host.reset_log[-1].method == "sbr"
        assert host.reset_log[-1].affected == t.below(b), b
        await host.close()
        if t.node(b).info.has_reset_subordinate:
            host = SimHost.from_toml(path, time_scale=0.0001)
            await host.reset_subordinate(b)
            assert host.reset_log[-1].affected == t.below(b), b
            await host.close()


@pytest.mark.parametrize("path", SIMS, ids=[p.stem for p in SIMS])
async def test_sim_via_sysfs_tree_matches(path: Path, tmp_path: Path) -> None:
    """The same host read through SysfsHost from the sysfs tree the simulator
    writes (parents from directory nesting, not bus numbers) gives the same
    topology: a check of Topology.load over real-file parsing."""
    host, t = await load_sim(path.name)
    host.write_tree(tmp_path)
    sysfs = SysfsHost(tmp_path)
    t2 = await Topology.load(sysfs)
    await sysfs.close()
    await host.close()
    assert set(t2.functions) == set(t.functions)
    assert t2.iommu == t.iommu
    for a in t.functions:
        assert t2.describe(a) == t.describe(a), a
        assert t2.parent(a) == t.parent(a)
        assert t2.below(a) == t.below(a)


def test_multifunction_hotplug_slot() -> None:
    # A slot reset takes every function of the slot (vfio's slot walk), but the
    # kernel's own bus method refuses multifunction devices in a slot
    # (pci_dev_reset_slot_function) and then needs the function alone on its bus.
    t = sample()
    t2 = Topology(t.functions, [*t.slots, SlotInfo("5", "0000:04:00", True)], True)
    assert t2.slot_scope(A("04:00.1")) == ResetScope(
        ResetKind.SLOT, A("02:01.0"), S("04:00.0", "04:00.1"), "5")
    assert t2.hot_reset_scope(A("04:00.0")) == t2.slot_scope(A("04:00.0"))
    assert t2.kernel_bus_scope(A("04:00.0")) is None


def test_shpc_hotplug_slot_is_not_a_slot_reset() -> None:
    # Seen in the lab (Linux 6.1): a slot behind QEMU's pcie-pci-bridge is
    # driven by shpchp, which has no reset_slot, so VFIO falls back to the bus.
    t = sample()
    t2 = Topology(t.functions, [SlotInfo("1", "0000:06:01", True)], True)
    assert t2.pciehp_port(A("00:1e.0")) is False
    assert t2.slot_scope(A("06:01.0")) is None
    assert t2.hot_reset_scope(A("06:01.0")) == ResetScope(
        ResetKind.BUS, A("00:1e.0"), S("06:01.0", "06:02.0"))
    assert t2.pciehp_port(A("02:00.0")) is True
    assert t2.pciehp_port(A("02:02.0")) is False  # a port without Hot-Plug Capable


def test_root_bus_hotplug_slot_is_not_a_slot_reset() -> None:
    # ACPI hotplug slots on a root bus have no reset_slot op: no slot scope.
    t = sample()
    t2 = Topology(t.functions, [SlotInfo("acpi2", "0000:00:02", True)], True)
    assert t2.slot_scope(A("00:02.0")) is None
    assert t2.hot_reset_scope(A("00:02.0")) is None
