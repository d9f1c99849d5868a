"""
Execute a plan: reset every domain (concurrently), rescan, diff, restore.

For each :class:`~qreset.plan.Domain`, in its own task named
``reset[{domain.key}]`` inside one :class:`asyncio.TaskGroup`:

``lock``
    take the domain's locks (:class:`~qreset.locks.DomainLocks`, shared by
    every VM of the daemon: overlapping domains serialize, disjoint ones overlap);
``save``
    read 4096 bytes of config space and the sysfs attributes (``resource``
    for BAR sizes, IOMMU group) of every covered function;
``assert``
    reset by the domain's method (below);
``settle``
    the spec's wait before the first config request (user SBR only: the
    kernel methods wait inside the kernel);
``poll``
    read each covered function's Vendor ID until it is neither 0x0001 (CRS)
    nor 0xFFFF, backing off like ``pci_dev_wait`` (1 ms doubling) up to
    :attr:`EngineSettings.poll_timeout` (``PCIE_RESET_READY_POLL_MS``, 60 s);
``rescan``
    read config space and attributes again and :func:`~qreset.diff.diff_config`;
``restore`` / ``verify``
    write back STATE changes in the kernel's order and re-read
    (:mod:`qreset.restore`); never a write to an IDENTITY or ABSENT function.

Methods: function-level ones (``flr``, ``af_flr``, ``pm``, ``device_specific``,
``acpi``) and ``bus`` are the kernel's ``reset`` attribute narrowed to that
method (``PciHost.reset_function``: the kernel saves and restores state
itself, so our rescan usually finds nothing to do); ``reset_subordinate`` is
the bridge attribute; ``vfio_hot_reset`` goes through :mod:`qreset.pci.vfio`;
``user_sbr`` is done here from userspace, the way ``pci_reset_secondary_bus``
and ``pci_bridge_wait_for_secondary_bus`` in ``drivers/pci/pci.c`` do it:
set Secondary Bus Reset in Bridge Control, hold it ``msleep(2)`` ("Trst of
1ms, double this", PCI 3.0 sec 7.6.4.2), clear it, then wait: 100 ms for a
PCIe port (PCIe r6.0 sec 6.6.1; after Data Link Layer Link Active on ports
faster than 5 GT/s that report it, 1000 + 100 ms on those that do not, as
``pcie_wait_for_link_delay`` does), or 1000 + 100 ms for a conventional
secondary bus (Tpvrh + Trhfa, PCI 3.0 sec 4.3.2: the kernel's ``msleep(1000 +
delay)``; we apply it below a PCIe-to-PCI bridge too, because the devices there are
conventional). Every wait goes through ``host.sleep`` so the simulated host
can scale time.

Failures are per domain: a reset that fails (EIO), a function that never
becomes ready, a write that fails are recorded in that domain's
:class:`DomainResult` and the other domains carry on; nothing here can hang
past the poll timeout (plus :attr:`EngineSettings.reset_timeout` for a kernel
reset call).

Upper half / bottom half, in qemu.qmp's terms: :meth:`Executor.run` is called
by the engine (caller's task); ``_domain`` and below run in the TaskGroup's
named tasks and report through :class:`ProgressEvent` callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qreset.diff import Change, Diff, diff_config, present
from qreset.errors import HostError, NoSuchFunction, QResetError, ResetFailed
from qreset.locks import DomainLocks
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.config import parse_config, u16, u32
from qreset.pci.host import FunctionInfo, PciHost, Resource
from qreset.plan import Domain, Method
from qreset.restore import verify, write_back

__all__ = [
    "NOT_READY",
    "PHASES",
    "DomainResult",
    "EngineSettings",
    "Executor",
    "FunctionOutcome",
    "Progress",
    "ProgressEvent",
]

logger = logging.getLogger(__name__)

#: Phases timed per domain, in order (``lock`` is the wait for the domain locks).
PHASES: tuple[str, ...] = ("lock", "save", "assert", "settle", "poll", "rescan", "restore", "verify")

# drivers/pci/pci.c
PCIE_RESET_READY_POLL = 60.0   # PCIE_RESET_READY_POLL_MS
SBR_HOLD = 0.002               # pci_reset_secondary_bus: msleep(2), Trst 1 ms doubled
PCIE_SETTLE = 0.100            # pci_bridge_wait_for_secondary_bus: delay (d3cold_delay, 100 ms)
CONVENTIONAL_SETTLE = 1.100    # msleep(1000 + delay): Tpvrh + Trhfa, PCI 3.0 sec 4.3.2
LINK_ACTIVE_DELAY = 0.020      # pcie_wait_for_link_delay: msleep(20) before polling DLLLA
LINK_ACTIVE_TIMEOUT = 1.0      # PCIE_LINK_RETRAIN_TIMEOUT_MS
# PCI_EXP_LNKCAP_SLS encoding: 2 = 5.0 GT/s (include/uapi/linux/pci_regs.h)
_LNKCAP_SLS_5_0GB = 2


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Timing and method knobs of the engine (host seconds: scaled on the simulated host)."""

    #: Give up on a function still answering CRS / all-ones after this long (PCIE_RESET_READY_POLL_MS).
    poll_timeout: float = PCIE_RESET_READY_POLL
    #: First readiness-poll delay; doubled after each poll like pci_dev_wait (``delay = 1`` ms).
    poll_interval: float = 0.001
    #: Cap on one poll delay (pci_dev_wait has none; capping keeps the tail responsive).
    poll_max_interval: float = 1.0
    #: Bound on one kernel reset call (sysfs reset / reset_subordinate / VFIO ioctl),
    #: which polls for readiness inside the kernel for up to 60 s itself.
    reset_timeout: float = 2 * PCIE_RESET_READY_POLL
    #: How long the save phase waits for a function that does not answer (CRS or
    #: all-ones) before falling back to its last good snapshot. Our bound, not the
    #: spec's: the guest is parked meanwhile, and the reset that follows is what
    #: usually brings such a function back. PCI_RESET_WAIT (1000 ms) is the
    #: kernel's wait for a device after a reset on a slow link.
    save_ready_timeout: float = 1.0
    #: Bus reset methods in preference order; None keeps the policy's.
    bus_methods: tuple[Method, ...] | None = None
    #: Where VFIO group files live (for vfio_hot_reset on a real /sys host).
    dev_root: Path = Path("/dev")


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One step of one domain, for live timelines (``qreset reset``, the daemon's events)."""

    domain_key: str
    phase: str
    elapsed: float
    message: str

    def line(self) -> str:
        return f"+{self.elapsed * 1000:9.1f}ms  {self.domain_key}  {self.phase}  {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain_key, "phase": self.phase,
                "elapsed": round(self.elapsed, 6), "message": self.message}


@dataclass(slots=True)
class FunctionOutcome:
    """What the cycle did to one covered function."""

    address: PciAddress
    change: str = "none"
    restored: bool = False
    verified: bool = False
    writes: int = 0
    diff: Diff | None = None
    polls: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        if self.change == Change.NONE.value:
            return True
        return self.change == Change.STATE.value and self.restored and self.verified

    def to_json(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "change": self.change,
            "restored": self.restored,
            "verified": self.verified,
            "writes": self.writes,
            "polls": self.polls,
            "error": self.error,
            "diff": self.diff.to_json() if self.diff is not None else None,
        }


@dataclass(slots=True)
class DomainResult:
    """The outcome of one domain: ok only if every function came back clean."""

    domain: Domain
    ok: bool = False
    error: str | None = None
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    functions: list[FunctionOutcome] = field(default_factory=list)
    #: When the domain got its locks and when it finished, seconds since the run began.
    start: float = 0.0
    end: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = self.domain
        return {
            "key": d.key,
            "kind": d.kind.value,
            "method": d.method.value,
            "target": str(d.target),
            "covers": [str(a) for a in d.covers],
            "ok": self.ok,
            "error": self.error,
            "phases": {k: round(v, 6) for k, v in self.phases.items()},
            "start": round(self.start, 6),
            "end": round(self.end, 6),
            "functions": [f.to_json() for f in self.functions],
        }


#: ``FunctionOutcome.change`` of a function that did not answer before the reset and
#: had no earlier good snapshot: nothing to compare with, so neither "none" nor "identity".
NOT_READY = "not_ready"


@dataclass(slots=True)
class _Saved:
    raw: bytes
    info: FunctionInfo

    @property
    def resources(self) -> tuple[Resource, ...]:
        return self.info.resources


#: A listener for live progress (called in the domain tasks; must not block).
Progress = Callable[[ProgressEvent], None]


def _wall(host: PciHost, seconds: float) -> float:
    """Host seconds → wall seconds (the simulated host runs ``time_scale`` times faster)."""
    scale = getattr(host, "time_scale", 1.0)
    return seconds * float(scale) if isinstance(scale, int | float) else seconds


class Executor:
    """Runs domains against one host under a shared lock table."""

    def __init__(self, host: PciHost, locks: DomainLocks, settings: EngineSettings | None = None) -> None:
        self.host = host
        self.locks = locks
        self.settings = settings or EngineSettings()
        #: The last snapshot of each function taken while it answered: the baseline
        #: when a later save finds it not ready (CRS / all-ones).
        self.baselines: dict[PciAddress, _Saved] = {}

    def remember(self, addr: PciAddress, raw: bytes, info: FunctionInfo) -> None:
        """Offer a snapshot (e.g. the topology's, read at start) as a fallback baseline;
        ignored when the function did not answer in it or a snapshot is already kept."""
        if addr not in self.baselines and present(raw):
            self.baselines[addr] = _Saved(bytes(raw), info)

    async def run(self, domains: Sequence[Domain], progress: Progress | None = None) -> list[DomainResult]:
        """Run every domain concurrently; returns one result per domain, in order."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = [DomainResult(d) for d in domains]
        async with asyncio.TaskGroup() as tg:
            for dom, res in zip(domains, results, strict=True):
                tg.create_task(_DomainRun(self, dom, res, t0, progress).run(), name=f"reset[{dom.key}]")
        return results


class _DomainRun:
    """One domain's bottom half: every phase, never raising (except cancellation)."""

    def __init__(self, ex: Executor, domain: Domain, result: DomainResult, t0: float,
                 progress: Progress | None) -> None:
        self.ex = ex
        self.host = ex.host
        self.settings = ex.settings
        self.domain = domain
        self.result = result
        self.t0 = t0
        self.progress = progress
        self.loop = asyncio.get_running_loop()
        self.saved: dict[PciAddress, _Saved] = {}
        #: Functions saved while not answering, with no good snapshot to use instead.
        self.unready_before: set[PciAddress] = set()
        self.outcomes = {a: FunctionOutcome(a) for a in domain.covers}
        result.functions = list(self.outcomes.values())

    # -- helpers -----------------------------------------------------------

    def emit(self, phase: str, message: str) -> None:
        if self.progress is None:
            return
        event = ProgressEvent(self.domain.key, phase, self.loop.time() - self.t0, message)
        try:
            self.progress(event)
        except Exception:  # a broken listener must not break a reset
            logger.exception("progress callback failed on %s", event)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = self.loop.time()
        try:
            yield
        finally:
            self.result.phases[phase] = self.result.phases.get(phase, 0.0) + self.loop.time() - start

    def fail(self, message: str) -> None:
        if self.result.error is None:
            self.result.error = message
        else:
            self.result.error += "; " + message
        logger.error("%s: %s", self.domain.key, message)

    # -- the phases --------------------------------------------------------

    async def run(self) -> None:
        d = self.domain
        try:
            start = self.loop.time()
            async with self.ex.locks.hold(d):
                # ``start``/``end`` bound the time the domain held its locks.
                self.result.start = self.loop.time() - self.t0
                self.result.phases["lock"] = waited = self.loop.time() - start
                if waited > 0.001:
                    self.emit("lock", f"acquired after {waited * 1000:.1f} ms")
                await self._cycle()
        except QResetError as err:
            self.fail(str(err))
        except Exception as err:  # a bug in one domain must not cancel its siblings
            logger.debug("%s: unexpected error", d.key, exc_info=True)
            self.fail(f"internal error: {type(err).__name__}: {err}")
        finally:
            self.result.end = self.loop.time() - self.t0
            self.result.ok = self.result.error is None and all(f.ok for f in self.result.functions)
            self.emit("done" if self.result.ok else "failed", self._summary())

    def _summary(self) -> str:
        counts: dict[str, int] = {}
        for f in self.result.functions:
            counts[f.change] = counts.get(f.change, 0) + 1
        text = ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
        took = (self.result.end - self.result.start) * 1000
        return f"{text} in {took:.1f} ms" + (f" ({self.result.error})" if self.result.error else "")

    async def _cycle(self) -> None:
        d = self.domain
        with self.timed("save"):
            try:
                for addr in d.covers:
                    await self._save(addr)
            except QResetError as err:
                # Nothing has been touched yet: give up on this domain before resetting.
                self.fail(f"save failed, nothing reset: {err}")
                self.emit("save", f"failed: {err}")
                return
        self.emit("save", f"saved {len(self.saved)} function(s)")

        try:
            await self._reset()
        except (QResetError, TimeoutError) as err:
            # Reported, and the cycle goes on: the rescan below tells what
            # state the failed reset left behind (and restores state only).
            msg = str(err) if isinstance(err, QResetError) else "timed out"
            self.fail(f"{d.method.value} reset failed: {msg}")
            self.emit("assert", f"failed: {msg}")

        # Parents before children (pci_bus_restore_locked): after a bus reset a
        # bridge below the reset one has lost its bus numbers, so nothing under
        # it answers until its own state is back. One level at a time.
        levels = self._levels()
        failed: set[PciAddress] = set()
        for depth, level in enumerate(levels):
            todo: list[PciAddress] = []
            for addr in level:
                blocked = self._covered_ancestors(addr) & failed
                if blocked:
                    out = self.outcomes[addr]
                    out.change = Change.ABSENT.value
                    out.error = f"unreachable: bridge {min(blocked)} above it did not come back clean"
                    out.diff = Diff(Change.ABSENT, (), (out.error,))
                    failed.add(addr)
                else:
                    todo.append(addr)
            with self.timed("poll"):
                ready = await self._poll_all(todo, depth if len(levels) > 1 else None)
            await self._rescan_and_restore(todo, ready)
            failed.update(a for a in todo if not self.outcomes[a].ok)

    async def _save(self, addr: PciAddress) -> None:
        """Snapshot ``addr`` as the baseline the rescan compares with.

        Never from a function that does not answer: a snapshot of CRS (Vendor
        ID 0x0001, Device ID 0xFFFF) or all-ones as the baseline would make the
        rescan of the answering function look like a new identity. Wait a
        little (``save_ready_timeout``, backing off like ``pci_dev_wait``); if
        it still does not answer, keep its last good snapshot (from an earlier
        cycle, or the topology read at start), and without one report it
        ``not_ready`` rather than compare with nothing.
        """
        raw = await self.host.read_config(addr, regs.CFG_SPACE_EXP_SIZE)
        info = await self.host.info(addr)
        waited, delay = 0.0, self.settings.poll_interval
        while not present(raw) and waited < self.settings.save_ready_timeout:
            step = min(delay, self.settings.poll_max_interval, self.settings.save_ready_timeout - waited)
            await self.host.sleep(step)
            waited += step
            delay *= 2
            raw = await self.host.read_config(addr, regs.CFG_SPACE_EXP_SIZE)
        if present(raw):
            self.saved[addr] = self.ex.baselines[addr] = _Saved(bytes(raw), info)
            return
        what = "CRS" if u16(raw, regs.VENDOR_ID) == regs.CRS_VENDOR_ID else "all-ones"
        earlier = self.ex.baselines.get(addr)
        if earlier is not None:
            self.saved[addr] = earlier
            self.emit("save", f"{addr} not ready before the reset (still {what} after "
                      f"{waited * 1000:.0f} ms): comparing with its last good snapshot")
            return
        # Keep what was read so the reset still covers it, but never compare with it.
        self.saved[addr] = _Saved(bytes(raw), info)
        self.unready_before.add(addr)
        self.emit("save", f"{addr} not ready before the reset (still {what} after "
                  f"{waited * 1000:.0f} ms) and no earlier snapshot: it will not be compared")

    # -- reset methods -----------------------------------------------------

    async def _reset(self) -> None:
        d = self.domain
        m = d.method
        wall_limit = _wall(self.host, self.settings.reset_timeout)
        if m is Method.USER_SBR:
            await self._user_sbr()
            return
        with self.timed("assert"):
            self.emit("assert", f"{m.value} via {d.write_target}")
            async with asyncio.timeout(wall_limit):
                if m is Method.RESET_SUBORDINATE:
                    await self.host.reset_subordinate(d.target)
                elif m is Method.VFIO_HOT_RESET:
                    await self._vfio_hot_reset()
                else:
                    # Function methods and 'bus': the function's own reset attribute.
                    await self.host.reset_function(d.write_target, m.value)
        self.emit("assert", f"{m.value} done in {self.result.phases['assert'] * 1000:.1f} ms")

    async def _vfio_hot_reset(self) -> None:
        d = self.domain
        root = getattr(self.host, "root", None)
        if not isinstance(root, Path) or root.resolve() != Path("/sys"):
            # The ioctl acts on the real kernel's devices: a simulated host or a
            # sysfs copy elsewhere has no VFIO groups behind it.
            raise ResetFailed(str(d.write_target),
                              f"VFIO hot reset needs the real /sys, not {self.host.name}")
        try:
            from qreset.pci import vfio
        except ImportError as err:  # pragma: no cover - the module ships with qreset
            raise ResetFailed(str(d.write_target), f"VFIO hot reset unavailable: {err}") from err
        groups = sorted({s.info.iommu_group for s in self.saved.values() if s.info.iommu_group is not None})
        devices = [d.write_target, *(a for a in d.covers if a != d.write_target)]
        await vfio.hot_reset_async(devices, groups, self.settings.dev_root)

    async def _user_sbr(self) -> None:
        d = self.domain
        bridge = d.target
        braw = await self.host.read_config(bridge, regs.CFG_SPACE_EXP_SIZE)
        bcfg = parse_config(braw)
        if not bcfg.present or not bcfg.is_bridge:
            raise ResetFailed(str(bridge), "is not a present PCI bridge; no secondary bus reset")
        ctrl = u16(braw, regs.BRIDGE_CONTROL) & ~regs.BRIDGE_CTL_BUS_RESET
        with self.timed("assert"):
            await self.host.write_config(bridge, regs.BRIDGE_CONTROL,
                                         (ctrl | regs.BRIDGE_CTL_BUS_RESET).to_bytes(2, "little"))
            try:
                # pci_reset_secondary_bus: "PCI spec v3.0 7.6.4.2 requires minimum
                # Trst of 1ms.  Double this to 2ms".
                await self.host.sleep(SBR_HOLD)
            finally:
                # Never leave Secondary Bus Reset asserted, even when cancelled.
                await self.host.write_config(bridge, regs.BRIDGE_CONTROL, ctrl.to_bytes(2, "little"))
        self.emit("assert", f"secondary bus reset on {bridge} held {SBR_HOLD * 1000:.0f} ms")
        with self.timed("settle"):
            why = await self._settle(bridge, braw)
        self.emit("settle", why)

    async def _settle(self, bridge: PciAddress, braw: bytes) -> str:
        """The wait before the first config request below ``bridge`` (pci_bridge_wait_for_secondary_bus)."""
        cfg = parse_config(braw)
        ptype = cfg.pcie_type
        if ptype is None or ptype == regs.EXP_TYPE_PCI_BRIDGE:
            await self.host.sleep(CONVENTIONAL_SETTLE)
            return f"conventional secondary bus: waited {CONVENTIONAL_SETTLE * 1000:.0f} ms (Tpvrh + Trhfa)"
        exp = cfg.find_cap(regs.CAP_ID_EXP)
        assert exp is not None  # pcie_type is not None
        lnkcap = u32(braw, exp.offset + regs.EXP_LNKCAP)
        fast = (lnkcap & regs.EXP_LNKCAP_SLS) > _LNKCAP_SLS_5_0GB
        if fast and lnkcap & regs.EXP_LNKCAP_DLLLARC:
            # pcie_wait_for_link_delay: 20 ms, then poll Data Link Layer Link
            # Active every 1 ms up to PCIE_LINK_RETRAIN_TIMEOUT_MS, then the delay.
            await self.host.sleep(LINK_ACTIVE_DELAY)
            waited = LINK_ACTIVE_DELAY
            up = False
            while waited < LINK_ACTIVE_TIMEOUT + LINK_ACTIVE_DELAY:
                sta = await self.host.read_config(bridge, exp.offset + regs.EXP_LNKSTA + 2)
                if u16(sta, exp.offset + regs.EXP_LNKSTA) & regs.EXP_LNKSTA_DLLLA:
                    up = True
                    break
                await self.host.sleep(0.001)  # pcie_wait_for_link_status: msleep(1) between reads
                waited += 0.001
            await self.host.sleep(PCIE_SETTLE)
            link = f"link up after {waited * 1000:.0f} ms" if up else "link not up after 1 s (polling anyway)"
            return f"{link}, then waited {PCIE_SETTLE * 1000:.0f} ms (PCIe r6.0 sec 6.6.1)"
        if fast:
            # pcie_wait_for_link_delay: "Some controllers might not implement link
            # active reporting. In this case, we wait for 1000 ms + any delay".
            await self.host.sleep(LINK_ACTIVE_TIMEOUT + PCIE_SETTLE)
            return (f"port faster than 5 GT/s without link active reporting: waited "
                    f"{(LINK_ACTIVE_TIMEOUT + PCIE_SETTLE) * 1000:.0f} ms (pcie_wait_for_link_delay)")
        await self.host.sleep(PCIE_SETTLE)
        return f"waited {PCIE_SETTLE * 1000:.0f} ms (PCIe r6.0 sec 6.6.1)"

    # -- readiness poll ------------------------------------------------------

    def _up(self, addr: PciAddress) -> PciAddress | None:
        """What ``addr`` depends on to answer: its PF for a VF (VF Enable, NumVFs), else its bridge."""
        info = self.saved[addr].info
        return info.physfn if info.physfn is not None else info.parent

    def _covered_ancestors(self, addr: PciAddress) -> set[PciAddress]:
        """The covered functions ``addr`` needs restored before it can answer (bridges above it, its PF)."""
        out: set[PciAddress] = set()
        cur = self._up(addr) if addr in self.saved else None
        while cur is not None and cur in self.saved and cur not in out:
            out.add(cur)
            cur = self._up(cur)
        return out

    def _levels(self) -> list[list[PciAddress]]:
        """Covered functions grouped by how many covered bridges sit above them."""
        by_depth: dict[int, list[PciAddress]] = {}
        for addr in self.domain.covers:
            by_depth.setdefault(len(self._covered_ancestors(addr)), []).append(addr)
        return [by_depth[k] for k in sorted(by_depth)]

    async def _poll_all(self, addrs: Sequence[PciAddress], depth: int | None) -> dict[PciAddress, bool]:
        ready: dict[PciAddress, bool] = {}

        async def one(addr: PciAddress) -> None:
            ready[addr] = await self._wait_ready(addr)

        async with asyncio.TaskGroup() as tg:
            for addr in addrs:
                tg.create_task(one(addr), name=f"reset[{self.domain.key}].poll[{addr}]")
        polls = ", ".join(
            f"{a} {'ready' if ready[a] else 'NOT ready'} after {self.outcomes[a].polls} poll(s)"
            for a in addrs
        )
        if polls:
            self.emit("poll", polls if depth is None else f"level {depth}: {polls}")
        return ready

    async def _wait_ready(self, addr: PciAddress) -> bool:
        """pci_dev_wait: poll until Vendor ID is neither CRS (0x0001) nor all-ones and Command is not ~0."""
        out = self.outcomes[addr]
        delay = self.settings.poll_interval
        waited = 0.0
        timeout = self.settings.poll_timeout
        while True:
            out.polls += 1
            try:
                data = await self.host.read_config(addr, 8)
            except NoSuchFunction:
                out.error = "disappeared from the host during the reset"
                return False
            except HostError as err:
                data = b""
                logger.debug("%s: poll read failed: %s", addr, err)
            vendor = u16(data, regs.VENDOR_ID)
            # pci_dev_wait reads Vendor ID until it is not the CRS value when the
            # Root Port has CRS Software Visibility, else the Command register
            # until it is not ~0 (PCI_POSSIBLE_ERROR). We do not know which, so
            # both: not CRS, and Command/Status not all-ones. Not "Vendor ID is
            # not 0xFFFF": a VF's Vendor ID reads FFFFh in hardware (SR-IOV r1.1
            # sec 3.4.1.1; sysfs shows the PF's cached one), and such a VF would
            # never look ready.
            if vendor != regs.CRS_VENDOR_ID and u32(data, regs.COMMAND) != 0xFFFFFFFF:
                return True
            if waited >= timeout:
                what = "CRS" if vendor == regs.CRS_VENDOR_ID else "all-ones"
                out.error = f"not ready {waited * 1000:.0f} ms after the reset (still {what}); gave up"
                return False
            step = min(delay, self.settings.poll_max_interval, timeout - waited)
            await self.host.sleep(step)
            waited += step
            delay *= 2

    # -- rescan, diff, restore -------------------------------------------------

    async def _rescan_and_restore(self, addrs: Sequence[PciAddress], ready: dict[PciAddress, bool]) -> None:
        if not addrs:
            return
        diffs: dict[PciAddress, tuple[Diff, tuple[Resource, ...]]] = {}
        with self.timed("rescan"):
            for addr in addrs:
                out = self.outcomes[addr]
                saved = self.saved[addr]
                if not ready.get(addr, False):
                    out.change = Change.ABSENT.value
                    out.diff = Diff(Change.ABSENT, (), (out.error or "not ready",))
                    continue
                if addr in self.unready_before:
                    out.change = NOT_READY
                    out.error = ("was not ready before the reset (CRS/all-ones) and has no earlier "
                                 "good snapshot: not compared, not restored")
                    continue
                try:
                    t = time.perf_counter()
                    raw = await self.host.read_config(addr, len(saved.raw) or regs.CFG_SPACE_EXP_SIZE)
                    info = await self.host.info(addr)
                    d = diff_config(saved.raw, raw, saved.resources, info.resources)
                    logger.debug("%s: diff in %.1f µs: %s", addr,
                                 (time.perf_counter() - t) * 1e6, d.summary())
                except NoSuchFunction:
                    d = Diff(Change.ABSENT, (), ("gone from the host after the reset",))
                    info = saved.info
                except HostError as err:
                    out.error = f"rescan failed: {err}"
                    continue
                out.diff = d
                out.change = d.change.value
                diffs[addr] = (d, info.resources)
        counts: dict[str, int] = {}
        for a in addrs:
            counts[self.outcomes[a].change] = counts.get(self.outcomes[a].change, 0) + 1
        self.emit("rescan", ", ".join(f"{n} {c}" for c, n in sorted(counts.items())))
        for addr, (d, _res) in diffs.items():
            if d.change is Change.IDENTITY:
                self.emit("rescan", f"{addr} IDENTITY CHANGED, not restored: {d.summary()}")
            elif d.change is Change.ABSENT:
                self.emit("rescan", f"{addr} absent: {d.summary()}")

        todo = [(a, d, res) for a, (d, res) in diffs.items() if d.change is Change.STATE]
        if not todo:
            return
        with self.timed("restore"):
            for addr, d, _res in todo:
                out = self.outcomes[addr]
                try:
                    out.writes, _ = await write_back(self.host, addr, d)
                    out.restored = True
                except HostError as err:
                    out.error = f"restore failed: {err}"
        self.emit("restore", "; ".join(
            f"{a} {self.outcomes[a].writes} write(s)" for a, _d, _r in todo))
        with self.timed("verify"):
            for addr, _d, res in todo:
                out = self.outcomes[addr]
                if not out.restored:
                    continue
                saved = self.saved[addr]
                try:
                    out.verified, remaining = await verify(self.host, addr, saved.raw, saved.resources, res)
                except HostError as err:
                    out.error = f"verify failed: {err}"
                    continue
                if not out.verified:
                    out.error = "restore did not verify: " + ", ".join(r.name for r in remaining)
        self.emit("verify", "; ".join(
            f"{a} {'verified' if self.outcomes[a].verified else 'NOT verified'}" for a, _d, _r in todo))
