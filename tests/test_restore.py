"""Restore order and content on hand-made diffs (pure), and no writes unless STATE."""

from __future__ import annotations

from pathlib import Path

from qreset.diff import Change, diff_config
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.sim import Fault, SimHost
from qreset.restore import plan_writes, restore, verify
from tests.pcibuild import AER, BASE, EXP, LTR, MSI, PM, RES, SRIOV, changed, endpoint


def _names(before: bytes, after: bytes) -> list[str]:
    return [w.name for w in plan_writes(diff_config(before, after, RES, RES))]


def test_kernel_order_across_capabilities() -> None:
    """pci_restore_state: PM (power_up), LTR, PCIe, AER, header, MSI, ACS, IOV."""
    after = changed(
        BASE, (0x04, 2, 0), (0x10, 4, 0), (0x3C, 1, 0), (MSI + 2, 2, 0x0180), (MSI + 4, 4, 0),
        (EXP + 8, 2, 0x2810), (EXP + 0x28, 2, 0), (AER + 8, 4, 0), (LTR + 4, 2, 0), (PM + 4, 2, 0x000B),
        (SRIOV + 8, 2, 0), (SRIOV + 0x10, 2, 0), (0x160 + 6, 2, 0),
    )
    assert _names(BASE, after) == [
        "PM Control/Status",
        "LTR Max Snoop Latency",
        "Device Control", "Device Control 2",
        "AER Uncorrectable Mask",
        "Interrupt Line",            # dword 15 first (range 10..15, high to low)
        "BAR 0",                     # then BARs 4..9
        "Command",                   # then 0..3
        "MSI Address", "MSI Control",  # message before enable
        "ACS Control",
        "SR-IOV NumVFs", "SR-IOV Control",  # VF Enable last
    ]


def test_header_ranges_walk_high_to_low_type0() -> None:
    base = changed(BASE, (0x30, 4, 0xF7100001))
    after = changed(base, (0x04, 2, 0), (0x0C, 1, 0), (0x10, 4, 0), (0x14, 4, 0xC), (0x1C, 4, 1),
                    (0x30, 4, 0), (0x3C, 1, 0))
    assert _names(base, after) == ["Interrupt Line", "Expansion ROM", "BAR 3", "BAR 1", "BAR 0",
                                   "Cache Line Size", "Command"]


def test_bars_carry_kernel_retry_count() -> None:
    writes = plan_writes(diff_config(BASE, changed(BASE, (0x10, 4, 0), (0x04, 2, 0)), RES, RES))
    assert {w.name: w.retry for w in writes} == {"BAR 0": 10, "Command": 0}


def test_bridge_order_12_15_then_9_11_then_0_8() -> None:
    base = endpoint(bridge=True)
    after = changed(base, (0x04, 2, 0), (0x18, 4, 0), (0x20, 4, 0), (0x28, 4, 5), (0x3E, 2, 0))
    assert _names(base, after) == ["Bridge Control", "Prefetchable Base Upper 32", "Memory Base",
                                   "Memory Limit", "Secondary Bus", "Subordinate Bus", "Command"]


def test_values_are_the_saved_ones_with_volatile_bits_cleared() -> None:
    # PME_Status (RW1C) set in the saved copy must not be written back as 1.
    base = changed(BASE, (PM + 4, 2, 0x8008 | 0x0100))
    after = changed(base, (PM + 4, 2, 0x0008))
    [w] = plan_writes(diff_config(base, after, RES, RES))
    assert (w.name, w.offset, w.size, w.value) == ("PM Control/Status", PM + 4, 2, 0x0108)


def test_nothing_for_identity_absent_or_none() -> None:
    ident = diff_config(BASE, changed(BASE, (0x04, 2, 0), (0x02, 2, 0x1)), RES, RES)
    assert ident.change is Change.IDENTITY
    assert plan_writes(ident) == []
    absent = diff_config(BASE, b"\xff" * 4096, RES, RES)
    assert plan_writes(absent) == []
    volatile = diff_config(BASE, changed(BASE, (0x06, 2, 0x0018)), RES, RES)
    assert volatile.change is Change.NONE
    assert plan_writes(volatile) == []


# -- against the simulated host ---------------------------------------------------------


async def _sbr(host: SimHost, bridge: PciAddress) -> None:
    """A bare userspace secondary bus reset (no restore) and the PCIe wait."""
    ctrl = int.from_bytes(host.config_now(bridge)[0x3E:0x40], "little")
    await host.write_config(bridge, 0x3E, (ctrl | 0x40).to_bytes(2, "little"))
    await host.sleep(0.002)
    await host.write_config(bridge, 0x3E, ctrl.to_bytes(2, "little"))
    await host.sleep(1.0)


async def test_restore_on_sim_writes_in_order_and_verifies(sim_dir: Path) -> None:
    host = SimHost.from_toml(sim_dir / "gpu-audio.toml", time_scale=0.001)
    rp, gpu = host.address_of("rp1"), host.address_of("gpu")
    before = await host.read_config(gpu)
    res_before = (await host.info(gpu)).resources
    await _sbr(host, rp)
    after = await host.read_config(gpu)
    d = diff_config(before, after, res_before, (await host.info(gpu)).resources)
    assert d.change is Change.STATE
    host.config_writes.clear()
    result = await restore(host, gpu, before, d, res_before, (await host.info(gpu)).resources)
    assert result.verified
    assert result.remaining == ()
    # Exactly the planned writes, in that order, each at its register's width.
    assert [(w.offset, len(w.data)) for w in host.config_writes] == \
        [(w.offset, w.size) for w in plan_writes(d)]
    assert result.writes == len(host.config_writes)
    assert host.config_now(gpu)[0x08:0x40] == before[0x08:0x40]


async def test_restore_on_sim_writes_nothing_for_identity(sim_dir: Path) -> None:
    host = SimHost.from_toml(sim_dir / "gpu-audio.toml", time_scale=0.001)
    rp, gpu = host.address_of("rp1"), host.address_of("gpu")
    before = await host.read_config(gpu)
    host.inject(gpu, Fault.new_identity(device_id=0x2222))
    await _sbr(host, rp)
    d = diff_config(before, await host.read_config(gpu))
    assert d.change is Change.IDENTITY
    host.config_writes.clear()
    result = await restore(host, gpu, before, d)
    assert (result.writes, result.verified) == (0, False)
    assert host.write_count(gpu) == 0


async def test_verify_reports_a_register_still_off(sim_dir: Path) -> None:
    host = SimHost.from_toml(sim_dir / "gpu-audio.toml", time_scale=0.001)
    gpu = host.address_of("gpu")
    before = await host.read_config(gpu)
    assert await verify(host, gpu, before) == (True, ())
    # The saved copy had Memory Space on; the device now has it off.
    saved = changed(before, (0x04, 2, int.from_bytes(before[4:6], "little") ^ 0x2))
    ok, remaining = await verify(host, gpu, saved)
    assert not ok
    assert [r.name for r in remaining] == ["Command"]


class _FirstBarWriteLostHost(SimHost):
    """A simulated host whose ``flaky`` function drops the first write to BAR 0
    (what ``pci_restore_config_dword``'s re-read-and-retry loop is for)."""

    flaky: PciAddress | None = None
    lost = 0

    async def write_config(self, addr: PciAddress, offset: int, data: bytes) -> None:
        if addr == self.flaky and offset == regs.BASE_ADDRESS_0 and not self.lost:
            self.lost += 1
            return
        await super().write_config(addr, offset, data)


async def test_bar_write_that_does_not_take_is_retried(sim_dir: Path) -> None:
    host = _FirstBarWriteLostHost.from_toml(sim_dir / "gpu-audio.toml", time_scale=0.001)
    assert isinstance(host, _FirstBarWriteLostHost)
    rp, gpu = host.address_of("rp1"), host.address_of("gpu")
    before = await host.read_config(gpu)
    await _sbr(host, rp)
    d = diff_config(before, await host.read_config(gpu))
    assert "BAR 0" in {r.name for r in d.state_registers}
    host.flaky = gpu
    result = await restore(host, gpu, before, d)
    assert host.lost == 1
    assert result.verified, result.remaining
    bar0 = [w for w in host.config_writes if w.addr == gpu and w.offset == regs.BASE_ADDRESS_0]
    assert len(bar0) == 1  # the lost write never reached the sim's log; the retry did
    assert result.writes == len(plan_writes(d)) + 1
