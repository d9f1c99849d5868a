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

How each method resets (the ``assert``/``settle`` steps, with the kernel's and
the specs' waits) is :mod:`qreset.execute_methods`; the result types are
:mod:`qreset.execute_types`.

Failures are per domain: a reset that fails (EIO), a function that never
becomes ready, a write that fails are recorded in that domain's
:class:`DomainResult` and the other domains carry on; nothing here can hang
past the poll timeout (plus :attr:`EngineSettings.reset_timeout` for a kernel
reset call).

Upper half / bottom half, in qemu.qmp's terms: :meth:`ResetRunner.run` is called
by the engine (caller's task); ``_domain`` and below run in the TaskGroup's
named tasks and report through :class:`ProgressEvent` callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence

from qreset.diff import Change, Diff, diff_config, present
from qreset.errors import HostError, NoSuchFunction, QResetError
from qreset.execute_methods import MethodSteps
from qreset.execute_types import (
    NOT_READY,
    PHASES,
    DomainResult,
    EngineSettings,
    FunctionOutcome,
    Progress,
    ProgressEvent,
    _Saved,
)
from qreset.locks import DomainLocks
from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.cfgspace import u16
from qreset.pci.host import FunctionInfo, PciHost, Resource
from qreset.plan import Domain
from qreset.restore import verify, write_back

__all__ = [
    "NOT_READY",
    "PHASES",
    "DomainResult",
    "EngineSettings",
    "FunctionOutcome",
    "Progress",
    "ProgressEvent",
    "ResetRunner",
]

logger = logging.getLogger(__name__)


class ResetRunner:
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


class _DomainRun(MethodSteps):
    """One domain's bottom half: every phase, never raising (except cancellation)."""

    def __init__(self, ex: ResetRunner, domain: Domain, result: DomainResult, t0: float,
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
