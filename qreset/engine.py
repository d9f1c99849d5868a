"""
The engine facade: topology → plan → execute → rescan/diff → restore, on one host.

This is what the daemon, the ``qreset reset`` command, the hook and the lab
code call. One :class:`Engine` per host, shared by every VM the daemon
serves: it owns the :class:`~qreset.locks.DomainLocks`, so two VMs resetting
overlapping domains at the same time serialize, while independent domains
run concurrently.

::

    engine = Engine(host)
    report = await engine.reset("vm1", owned, {"vm1": owned, "vm2": other}, Policy())
    if not report.ok: ...   # report.identity_changed → escalate

A refused plan gives a report with ``ok`` False and no domain run: nothing
is touched. The topology is read once and cached; each plan first makes the
run-time attributes of the functions it looks at current (driver binding,
``reset_method``, VFs, hot plug: :meth:`Topology.refresh`). The cache is
dropped after a cycle in which a function changed identity or vanished (its
cached config space is stale), or on ``topology(refresh=True)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qreset.execute import (
    NOT_READY,
    PHASES,
    DomainResult,
    EngineSettings,
    FunctionOutcome,
    Progress,
    ProgressEvent,
    ResetRunner,
)
from qreset.locks import DomainLocks
from qreset.pci.address import PciAddress
from qreset.pci.host import PciHost
from qreset.plan import Plan, Policy, make_plan, owners_of
from qreset.qemu_model import VfioBackend
from qreset.topology import Topology
from qreset.topology_refresh import SharedRefresh

__all__ = [
    "PHASES",
    "CycleReport",
    "DomainResult",
    "Engine",
    "EngineSettings",
    "FunctionOutcome",
    "ProgressEvent",
]


@dataclass(slots=True)
class CycleReport:
    """Everything one reset cycle did: the plan, each domain's result, the verdict."""

    plan: Plan
    domains: list[DomainResult] = field(default_factory=list)
    started: float = 0.0
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the plan was accepted and every domain came back clean."""
        return self.plan.ok and all(d.ok for d in self.domains)

    @property
    def identity_changed(self) -> list[PciAddress]:
        """Functions that came back as something else (never written to: escalate)."""
        return [f.address for d in self.domains for f in d.functions if f.change == "identity"]

    @property
    def not_ready(self) -> list[PciAddress]:
        """Functions that did not answer before the reset and had no earlier snapshot."""
        return [f.address for d in self.domains for f in d.functions if f.change == NOT_READY]

    @property
    def absent(self) -> list[PciAddress]:
        return [f.address for d in self.domains for f in d.functions if f.change == "absent"]

    def to_json(self) -> dict[str, Any]:
        """JSON-safe (only str, int, float, bool, None, lists and dicts)."""
        return {
            "ok": self.ok,
            "vm": self.plan.vm,
            "plan": self.plan.to_json(),
            "started": round(self.started, 6),
            "duration": round(self.duration, 6),
            "identity_changed": [str(a) for a in self.identity_changed],
            "absent": [str(a) for a in self.absent],
            "not_ready": [str(a) for a in self.not_ready],
            "domains": [d.to_json() for d in self.domains],
        }


class Engine:
    """One host's reset engine (see the module docstring)."""

    def __init__(self, host: PciHost, settings: EngineSettings | None = None) -> None:
        self.host = host
        self.settings = settings or EngineSettings()
        self.locks = DomainLocks()
        self._runner = ResetRunner(host, self.locks, self.settings)
        self._topology: Topology | None = None
        self._topology_lock: asyncio.Lock | None = None
        self._refresher = SharedRefresh(host, lambda: self._topology, self._set_topology)

    def _set_topology(self, topo: Topology) -> None:
        self._topology = topo

    async def topology(self, refresh: bool = False,
                       current: Iterable[PciAddress] = ()) -> Topology:
        """The host's topology, read once and cached (``refresh`` re-reads all of it).

        ``current``: functions whose run-time attributes (driver binding,
        ``reset_method``, VFs) must be what the host says now, and whose
        neighbours (every function a reset of them could hit) too; hot-added
        and removed functions are picked up at the same time
        (:meth:`Topology.refresh`: a few sysfs reads per function, not a reload).
        """
        wanted = frozenset(current)
        return await self._current(refresh, lambda topo: topo.neighbourhood(wanted) if wanted else ())

    async def _current(self, reload: bool,
                       scope: Callable[[Topology], Iterable[PciAddress]] | None) -> Topology:
        """The cached topology (loaded first if needed) with ``scope`` refreshed.

        ``scope`` None: only load. The load holds the lock (one reader, the
        others wait for its result); refreshes do not (:class:`SharedRefresh`).
        """
        while True:
            if reload or self._topology is None:
                if self._topology_lock is None:
                    self._topology_lock = asyncio.Lock()
                async with self._topology_lock:
                    if reload or self._topology is None:
                        self._topology = await Topology.load(self.host)
                reload = False
            topo = self._topology
            wanted = frozenset(scope(topo)) if scope is not None else frozenset()
            if not wanted:
                return topo
            new = await self._refresher.refresh(wanted)
            if new is not None:
                return new
            # Dropped or reloaded while being refreshed: start over from the new one.

    async def _plan_topology(self, owned: Sequence[PciAddress]) -> Topology:
        """The topology with what a plan of ``owned`` reads made current
        (:func:`qreset.topology_refresh.plan_scope`)."""
        while True:
            if self._topology is None:
                await self._current(False, None)
            new = await self._refresher.current(owned)
            if new is not None:
                return new

    async def plan(
        self,
        vm: str,
        owned: Sequence[PciAddress],
        vms: Mapping[str, Sequence[PciAddress]],
        policy: Policy,
        backends: Mapping[PciAddress, VfioBackend] | None = None,
    ) -> Plan:
        """Plan ``vm``'s resets of ``owned``, knowing every VM's functions (``vms``). No writes.

        ``backends``: how its QEMU opened each function (:func:`qreset.plan.make_plan`)."""
        # Every function the plan looks at, as the host has it now (libvirt
        # rebinds managed devices between cycles; VFs and hot plug come and go).
        topo = await self._plan_topology(owned)
        if self.settings.bus_methods is not None:
            policy = dataclasses.replace(policy, bus_methods=self.settings.bus_methods)
        all_vms = dict(vms)
        all_vms.setdefault(vm, list(owned))
        return make_plan(vm, owned, topo, owners_of(topo, all_vms, vm), policy, backends)

    async def run(self, plan: Plan, progress: Progress | None = None) -> CycleReport:
        """Execute ``plan`` (nothing at all if it was refused) and report."""
        loop = asyncio.get_running_loop()
        report = CycleReport(plan, started=loop.time())
        if not plan.ok:
            return report
        topo = self._topology
        if topo is not None:
            # What was read at start is the baseline of last resort for a function
            # that does not answer when a cycle begins (never a CRS snapshot).
            for d in plan.domains:
                for a in d.covers:
                    if a in topo.functions:
                        node = topo.functions[a]
                        self._runner.remember(a, node.config.raw, node.info)
        report.domains = await self._runner.run(plan.domains, progress)
        report.duration = loop.time() - report.started
        if report.identity_changed or report.absent:
            self._topology = None  # cached config spaces are stale now
        return report

    async def reset(
        self,
        vm: str,
        owned: Sequence[PciAddress],
        vms: Mapping[str, Sequence[PciAddress]],
        policy: Policy,
        progress: Progress | None = None,
        backends: Mapping[PciAddress, VfioBackend] | None = None,
    ) -> CycleReport:
        """:meth:`plan` then :meth:`run`."""
        return await self.run(await self.plan(vm, owned, vms, policy, backends), progress)
