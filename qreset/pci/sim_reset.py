"""
Resets the simulated kernel does: ``reset`` (with ``reset_method``), ``reset_subordinate``.

The kernel path saves, resets, waits with the kernel's delays (drivers/pci/pci.c)
and restores config space through the write masks: read-only fields that
changed (a new identity, new BAR sizes) stay changed, everything else reads
back identical. ``reset_method`` is probed like ``pci_init_reset_methods`` and
its store refuses what ``reset_method_store`` refuses (EINVAL on a name that
does not probe OK now, e.g. a stale ``bus``). A reset that does not work
fails with ENOTTY where the real kernel would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from qreset.errors import HostError, ResetFailed
from qreset.pci import regs, reset_method
from qreset.pci.address import PciAddress
from qreset.pci.sim_access import SimConfigSpace, log
from qreset.pci.sim_config import get
from qreset.pci.sim_enum import SimFunction, probe_methods
from qreset.pci.sim_fault import ResetRecord

# Kernel delays (drivers/pci/pci.c), in spec seconds before time scaling.
FLR_WAIT = 0.100            # pcie_flr(): msleep(100) after Initiate FLR
AF_FLR_WAIT = 0.100         # pci_af_flr(): msleep(100)
PM_D3HOT_DELAY = 0.010      # pci_pm_reset(): pci_dev_d3_sleep(), d3hot_delay default 10 ms
SBR_ASSERT = 0.002          # pci_reset_secondary_bus(): "Trst of 1 ms, double this" -> msleep(2)
# pci_bridge_wait_for_secondary_bus(): 100 ms after the link is up (PCIe r6.0 sec 6.6.1; the
# delay is pci_bus_max_d3cold_delay(), PCI_PM_D3COLD_WAIT = 100 ms by default), then poll the
# children up to PCI_RESET_WAIT (1000 ms) in total on links <= 5 GT/s, or up to
# PCIE_RESET_READY_POLL_MS on faster ones. A bridge that is not PCIe waits Tpvrh + Trhfa =
# 1000 ms + delay. (The kernel returns without waiting for a PCIe-to-PCI bridge, which is not a
# "downstream port"; the sim, like the API it implements, gives every conventional secondary
# bus the 1100 ms, because the devices on it need Trhfa whatever the kernel does.)
SBR_WAIT_PCIE = 0.100
SBR_WAIT_CONVENTIONAL = 1.100
SBR_POLL_SLOW_LINK = 1.000  # PCI_RESET_WAIT
DEVICE_SPECIFIC_WAIT = 0.100  # quirk resets mostly do an FLR-like 100 ms wait
READY_POLL_LIMIT = 60.0     # PCIE_RESET_READY_POLL_MS = 60000
# pci_reset_fn_methods[] names (drivers/pci/pci.c), what reset_method_store knows.
_KERNEL_METHODS = frozenset({"device_specific", "acpi", "flr", "af_flr", "pm", "bus", "cxl_bus"})


class SimResets(SimConfigSpace):
    """The kernel's resets on the simulated config space (see the module docstring)."""

    async def _wait_ready(self, funcs: Sequence[SimFunction], what: str,
                          limit: float = READY_POLL_LIMIT) -> None:
        """pci_dev_wait(): poll until the function answers, up to ``limit`` (spec seconds)."""
        deadline = self._now() + limit * self.time_scale
        for f in funcs:
            # A function behind a bridge without bus numbers reads all-ones: not ready either.
            while not (self._ready(f) and self._reachable(f)):
                now = self._now()
                if now >= deadline:
                    raise ResetFailed(self._path(f.addr, "reset"),
                                      f"not ready {round(limit * 1000)}ms after {what}; giving up")
                waiting = f.never_ready or f.ready_at <= now
                target = deadline if waiting else min(f.ready_at, deadline)
                await asyncio.sleep(max(target - now, 0.0) + 1e-4)

    def _restore(self, f: SimFunction, saved: bytes) -> None:
        """pci_restore_state(): write the saved state back; read-only bits keep their new value.
        Writes to a function that does not answer go nowhere."""
        if not (self._ready(f) and self._reachable(f)):
            return
        rebar = f.img.ext_caps.get(regs.EXT_CAP_ID_REBAR)
        if rebar is not None:  # pci_restore_rebar_state() resizes before the BARs are written
            f.cfg[rebar + regs.REBAR_CTRL + 1] = saved[rebar + regs.REBAR_CTRL + 1] & 0x3F
            self._apply_rebar(f, clear=False)
        # Per byte: (cfg & ~wmask) | (saved & wmask), done on whole-space integers: a
        # Python loop over 4 KiB was 9.5% of the daemon's CPU in bench.scale's profile.
        n = min(len(saved), f.img.size)
        wm = int.from_bytes(f.img.wmask[:n], "little")
        now = int.from_bytes(f.cfg[:n], "little")
        f.cfg[:n] = ((now & ~wm) | (int.from_bytes(saved[:n], "little") & wm)).to_bytes(n, "little")

    def _probe_now(self, f: SimFunction) -> tuple[str, ...]:
        """The methods that probe OK now (what ``default`` gives)."""
        alone = f.parent is None or all(g is f or not g.present for g in f.parent.children)
        return probe_methods(f, alone, enumerating=False)

    def read_reset_method(self, addr: PciAddress) -> str | None:
        """``cat reset_method``; None when the attribute is hidden (no method at enumeration)."""
        f = self._get(addr)
        return " ".join(f.reset_methods) + "\n" if f.has_reset_attr else None

    def write_reset_method(self, addr: PciAddress, text: str) -> None:
        """``echo TEXT > reset_method`` with the kernel's rules: ``""`` disables every method,
        ``default`` re-probes, else every name must be known and supported *now* or the
        write fails with EINVAL and the list stays as it was."""
        f = self._get(addr)
        path = self._path(addr, "reset_method")
        if not f.has_reset_attr:
            raise HostError(path, "No such file or directory")
        words = text.split()
        if words == ["default"]:
            f.reset_methods = self._probe_now(f)
            return
        supported = self._probe_now(f)
        for name in words:
            if name not in _KERNEL_METHODS:
                raise HostError(path, f"Invalid argument (Invalid reset method '{name}')")
            if name not in supported:
                raise HostError(path, f"Invalid argument (Unsupported reset method '{name}')")
        f.reset_methods = tuple(words)

    async def reset_function(self, addr: PciAddress, method: str | None = None) -> None:
        f = self._get(addr)
        if not f.has_reset_attr:
            raise ResetFailed(self._path(addr, "reset"), "No such file or directory (no reset method)")
        if method is None:
            await self._reset(f)
            return
        where = self._path(addr, "reset_method")

        def read() -> str | None:
            return self.read_reset_method(addr)

        def write(text: str) -> None:
            self.write_reset_method(addr, text)

        previous = reset_method.narrow(read, write, method, where)
        failure: BaseException | None = None
        try:
            await self._reset(f)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            try:
                reset_method.put_back(read, write, previous, where)
            except HostError:
                if failure is None:
                    raise

    async def _reset(self, f: SimFunction) -> None:
        """``echo 1 > reset``: pci_reset_function() with the methods enabled now."""
        addr = f.addr
        methods = f.reset_methods
        if not methods:
            raise ResetFailed(self._path(addr, "reset"), "Inappropriate ioctl for device")
        self._check_eio(f, "reset")
        async with f.lock:  # device_lock(): resets of one function queue up
            f.block_cfg()
            saved = bytes(f.cfg)
            start = self._now()
            hit: list[SimFunction] = []
            done = ""
            try:
                for m in methods:
                    done = m
                    if await self._do_method(f, m, hit):
                        return
                raise ResetFailed(self._path(addr, "reset"), "Inappropriate ioctl for device")
            finally:
                self._restore(f, saved)
                f.unblock_cfg()
                if hit:  # the device went through reset, even if it then failed to come back
                    self.reset_log.append(ResetRecord(
                        done, f.addr, frozenset(g.addr for g in hit), start, self._now()))
                    log.debug("%s: %s reset hit %d function(s) in %.1f ms", f.addr, done, len(hit),
                              (self._now() - start) * 1000)

    async def _do_method(self, f: SimFunction, m: str, hit: list[SimFunction]) -> bool:
        """Run one reset method on f, filling ``hit`` as functions go through reset.
        False = ENOTTY (the kernel tries the next method)."""
        slow = self._slow_extra([f])
        # The kernel probes through config reads: an unreachable function reads all-ones
        # (which claims FLR and No_Soft_Reset), and the reset's own writes go nowhere.
        view = self._view(f)
        reachable = self._reachable(f)
        if m in ("flr", "af_flr", "device_specific"):
            if m == "flr" and not get(view, (f.cap(regs.CAP_ID_EXP) or 0) + regs.EXP_DEVCAP, 4) \
                    & regs.EXP_DEVCAP_FLR:
                return False
            if reachable:
                hit.extend(self._function_reset(f))
            await self.sleep({"flr": FLR_WAIT, "af_flr": AF_FLR_WAIT}.get(m, DEVICE_SPECIFIC_WAIT) + slow)
            await self._wait_ready([f], m.upper() if m != "device_specific" else "device-specific reset")
            return True
        if m == "pm":
            pm = f.cap(regs.CAP_ID_PM)
            if pm is None or get(view, pm + regs.PM_CTRL, 2) & regs.PM_CTRL_NO_SOFT_RESET:
                return False
            await self.sleep(PM_D3HOT_DELAY)
            if reachable:
                hit.extend(self._function_reset(f))  # D3hot -> D0 with No_Soft_Reset clear
            await self.sleep(PM_D3HOT_DELAY + slow)
            await self._wait_ready([f], "PM D3hot->D0")
            return True
        if m == "bus":
            parent = f.parent
            if parent is None or f.is_bridge:
                return False  # root bus, or dev->subordinate
            slot = parent.spec.slot
            # pci_dev_reset_slot_function(): dev->slot is the port's slot (device 0 below it).
            slot_ok = slot is not None and slot.hotplug and not f.multifunction and f.addr.device == 0
            alone = all(g is f or not g.present for g in parent.children)
            if not (slot_ok or alone):
                return False
            hit.extend(self._below(parent, physical=True))
            if not await self._secondary_bus_reset(parent, hit, slow):
                hit.clear()
            await self._wait_ready([f], "bus reset", self._poll_limit(parent))
            return True
        return False

    @staticmethod
    def _conventional(bridge: SimFunction) -> bool:
        return bridge.spec.type in ("pcie_pci_bridge", "pci_bridge")

    def _poll_limit(self, bridge: SimFunction) -> float:
        """How long pci_bridge_wait_for_secondary_bus() polls after its fixed delay."""
        if not self._conventional(bridge) and bridge.spec.link_speed <= 2:  # <= 5 GT/s
            return SBR_POLL_SLOW_LINK - SBR_WAIT_PCIE
        return READY_POLL_LIMIT

    async def _secondary_bus_reset(self, bridge: SimFunction, hit: list[SimFunction], slow: float) -> bool:
        """pci_reset_secondary_bus() and the fixed delay of pci_bridge_wait_for_secondary_bus().
        False when the bridge does not answer, so its Bridge Control writes go nowhere."""
        reachable = self._reachable(bridge) and self._ready(bridge)
        if reachable:
            bc = get(bridge.cfg, regs.BRIDGE_CONTROL, 2)
            bridge.cfg[regs.BRIDGE_CONTROL] = (bc | regs.BRIDGE_CTL_BUS_RESET) & 0xFF
        await self.sleep(SBR_ASSERT)
        if reachable:
            bridge.cfg[regs.BRIDGE_CONTROL] = bc & ~regs.BRIDGE_CTL_BUS_RESET & 0xFF
            now = self._now()
            for g in hit:
                self._power_on(g, now)
        await self.sleep((SBR_WAIT_CONVENTIONAL if self._conventional(bridge) else SBR_WAIT_PCIE) + slow)
        return reachable

    async def _restore_below(self, bridge: SimFunction, saved: dict[SimFunction, bytes],
                             errors: list[ResetFailed]) -> None:
        """pci_bus_restore_locked(): restore each function on the bus; behind a bridge that
        is restored (bus numbers back), wait for the functions to answer, then go down."""
        for g in sorted((c for c in bridge.children if c in saved), key=lambda c: c.order):
            self._restore(g, saved[g])
            below = [c for c in g.children if c in saved and c.physfn is None]
            if g.is_bridge and below:
                try:
                    await self._wait_ready(below, "bus reset", self._poll_limit(g))
                except ResetFailed as exc:
                    errors.append(exc)
                await self._restore_below(g, saved, errors)

    async def reset_subordinate(self, bridge: PciAddress) -> None:
        b = self._get(bridge)
        if not self.has_reset_subordinate(b):
            raise HostError(self._path(bridge, "reset_subordinate"), "No such file or directory")
        self._check_eio(b, "reset_subordinate")
        # __pci_reset_bus(): pci_bus_trylock(); contention is EAGAIN, not a wait.
        await self._bus_reset_restored(b, "subordinate", self._path(bridge, "reset_subordinate"),
                                       "Resource temporarily unavailable")

    async def _bus_reset_restored(self, b: SimFunction, record: str, path: str, busy: str) -> None:
        """A secondary bus reset of ``b`` the kernel saves and restores around
        (pci_bus_save_and_disable_locked / pci_bus_restore_locked): every device lock
        is try-locked first (``busy`` on contention)."""
        hit = self._below(b)
        physical = self._below(b, physical=True)  # removed functions are still wired to the bus
        locks = [g.lock for g in [b, *hit]]
        if any(lk.locked() for lk in locks):
            raise ResetFailed(path, busy)
        for lk in locks:
            await lk.acquire()
        start = self._now()
        saved = {g: bytes(g.cfg) for g in hit}
        for g in hit:
            g.block_cfg()
        errors: list[ResetFailed] = []
        done = False
        try:
            done = await self._secondary_bus_reset(b, physical, self._slow_extra(hit))
            first = [g for g in hit if g.parent is b and g.physfn is None]
            try:
                await self._wait_ready(first, "bus reset", self._poll_limit(b))
            except ResetFailed as exc:
                errors.append(exc)
            await self._restore_below(b, saved, errors)
        finally:
            for g in hit:
                g.unblock_cfg()
            for lk in locks:
                lk.release()
            if done:
                self.reset_log.append(ResetRecord(
                    record, b.addr, frozenset(g.addr for g in physical), start, self._now()))
                log.debug("%s: %s hit %d function(s)", b.addr, record, len(physical))
        if errors:
            raise errors[0]
