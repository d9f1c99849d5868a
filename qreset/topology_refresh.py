"""
Keeping the engine's cached topology current at plan time, cheaply.

Issue 9 wants a plan to see the host as it is now (driver binding,
``reset_method``, VFs, hot plug). Issue 13's scale bench showed what that cost
when every plan re-read the whole neighbourhood of its functions under one
global lock: a VF's neighbourhood is its PF's whole bus (65 functions with 64
VFs per PF), read by every guest's every cycle, one after the other. Two
things here make it cheap without making it stale:

* :func:`plan_scope`: what a plan of some functions can actually look at. A
  function the planner resets with a function-level method (FLR, not PM), and
  that QEMU also resets on its own (``VFIO_DEVICE_RESET`` first), is planned
  from itself, its VFs and its PF only: the domain is the function (and its
  VFs), its owners are their drivers, and neither QEMU's prediction nor the
  planner looks at a bus neighbour. Anything else (a slot/bus reset, a PM
  reset the planner widens, a QEMU hot reset) needs the whole neighbourhood.
  Which case applies is decided from the function's own *refreshed*
  attributes, so :meth:`SharedRefresh.current` reads those first.
* :class:`SharedRefresh`: concurrent planners share refreshes. Requests that
  arrive while a refresh runs are merged into the next one, which starts when
  the running one ends, so each caller still gets attributes read after it
  asked, and no lock is held while sysfs is read.

The host's listing (hot plug, ``sriov_numvfs``) is read by every refresh
(:func:`~qreset.topology_read.refresh_nodes`), so functions appearing or
vanishing anywhere are always seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from qreset.pci.address import PciAddress
from qreset.pci.host import PciHost
from qreset.qemu_model import VfioResetFlags
from qreset.topology import Topology

__all__ = ["SharedRefresh", "plan_scope"]


def _self_and_pf(topo: Topology, addrs: Iterable[PciAddress]) -> frozenset[PciAddress]:
    out: set[PciAddress] = set()
    for a in addrs:
        out.add(a)
        node = topo.functions.get(a)
        if node is not None and node.info.physfn is not None:
            out.add(node.info.physfn)
    return frozenset(out)


def _function_level(topo: Topology, a: PciAddress) -> bool:
    """Whether a plan of ``a`` stays within ``a`` and its VFs (see the module docstring)."""
    node = topo.functions[a]
    # The planner's choice (plan_domains.candidates): a function-level method,
    # and not PM alone, which Policy.pm_suffices or a QEMU PM fallback widens.
    if not any(m != "pm" for m in topo.function_methods(a)):
        return False
    # QEMU's (qemu_model.predict): VFIO_DEVICE_RESET first, so no hot reset,
    # no look at who else is on the bus. Without an IOMMU group QEMU cannot
    # have it and the prediction looks no further either.
    return node.info.iommu_group is None or VfioResetFlags.of(topo, node).function_reset_first


def plan_scope(topo: Topology, addrs: Iterable[PciAddress]) -> frozenset[PciAddress]:
    """Every function whose run-time attributes a plan of ``addrs`` reads.

    ``addrs``, their PFs (VF Enable, ownership of the VF's parent), and for
    each function either its function scope (itself and its VFs) when it is
    reset at function level by both the planner and QEMU, else its whole
    :meth:`~Topology.neighbourhood`. Decided from ``topo`` as given: refresh
    ``addrs`` and their PFs before asking.
    """
    out = set(_self_and_pf(topo, addrs))
    for a in set(addrs):
        if a not in topo.functions:
            continue
        if _function_level(topo, a):
            out |= topo.function_scope(a).affected
        else:
            out |= topo.neighbourhood([a])
    return frozenset(out)


class SharedRefresh:
    """Refreshes of one cached topology, shared by concurrent callers.

    ``get``/``put`` read and replace the cache (None: not loaded, or dropped).
    A refresh whose topology was replaced meanwhile (a reload, a cycle that
    dropped the cache) is not put back: its callers get None and start over.
    """

    def __init__(self, host: PciHost, get: Callable[[], Topology | None],
                 put: Callable[[Topology], None]) -> None:
        self.host = host
        self._get = get
        self._put = put
        self._pending: set[PciAddress] = set()
        self._next: asyncio.Future[Topology | None] | None = None
        self._worker: asyncio.Task[None] | None = None
        #: Refreshes run (each reads the listing once); for tests and benches.
        self.runs = 0

    async def refresh(self, addrs: Iterable[PciAddress]) -> Topology | None:
        """The cache with ``addrs`` read after this call began; None if it was dropped meanwhile."""
        self._pending.update(addrs)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        batch = self._next
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name=f"topology-refresh[{self.host.name}]")
        # shield: one caller cancelled must not cancel the others' refresh.
        return await asyncio.shield(batch)

    async def current(self, addrs: Iterable[PciAddress]) -> Topology | None:
        """The cache with :func:`plan_scope` of ``addrs`` current: their own attributes
        first (they decide the scope), then the rest of the scope. None if dropped meanwhile."""
        wanted = frozenset(addrs)
        topo = self._get()
        if topo is None:
            return None
        topo = await self.refresh(_self_and_pf(topo, wanted))
        if topo is None:
            return None
        rest = plan_scope(topo, wanted) - _self_and_pf(topo, wanted)
        return await self.refresh(rest) if rest else topo

    async def _drain(self) -> None:
        while self._next is not None:
            batch, addrs = self._next, self._pending
            self._next, self._pending = None, set()
            try:
                topo = self._get()
                result: Topology | None = None
                if topo is not None:
                    self.runs += 1
                    new = await topo.refresh(self.host, addrs)
                    if self._get() is topo:
                        self._put(new)
                        result = new
            except asyncio.CancelledError:
                batch.cancel()
                raise
            except BaseException as exc:  # handed to every waiter
                batch.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                batch.set_result(result)
