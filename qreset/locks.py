"""
Reset-domain locks shared by every VM the daemon serves.

Two VMs whose devices sit on one bridge must never reset that bridge's bus
at the same time, and a bus reset must never run while a function below it
is being FLR'd for another VM; independent domains must run concurrently.

Implementation: a table of :class:`asyncio.Lock`, one per **PCI function**,
created on first use. Holding a domain means holding the lock of every
function it touches (``covers`` plus the ``target``: the bridge whose
Bridge Control a bus reset writes), acquired in sorted address order.

Why that is "one lock per domain", and more:

* the same domain (same ``key``, planned by two VMs) touches the same
  functions, so the two holders need the very same locks: mutual exclusion;
* two *different* domains that overlap (a bus reset above a function another
  VM wants to FLR; nested bridges) share at least one function, hence one
  lock: they serialize too, which a plain lock-per-key table would miss;
* disjoint domains share no lock and run in parallel.

Deadlock freedom: every holder takes its locks in one global order (sorted
:class:`~qreset.pci.address.PciAddress`) and takes no other lock while
holding them, so no wait-for cycle can form (the classic resource-ordering
argument). A holder cancelled while acquiring releases what it already
holds. Locks are never removed: a host has a few hundred functions at most.

The table belongs to the event loop of the :class:`~qreset.engine.Engine`
that owns it (asyncio locks bind to the loop that first waits on them).
"""

from __future__ import annotations

import contextlib
import logging
from asyncio import Lock
from collections.abc import AsyncIterator, Iterable

from qreset.pci.address import PciAddress
from qreset.plan import Domain

__all__ = ["DomainLocks"]

logger = logging.getLogger(__name__)


class DomainLocks:
    """Per-function lock table; :meth:`hold` takes a whole domain (see module docstring)."""

    def __init__(self) -> None:
        self._locks: dict[PciAddress, Lock] = {}
        self._holders: dict[PciAddress, str] = {}

    @staticmethod
    def functions_of(domain: Domain) -> tuple[PciAddress, ...]:
        """The functions whose locks ``domain`` needs, in acquisition (sorted) order."""
        return tuple(sorted({*domain.covers, domain.target}))

    def _lock(self, addr: PciAddress) -> Lock:
        lock = self._locks.get(addr)
        if lock is None:
            lock = self._locks[addr] = Lock()
        return lock

    @contextlib.asynccontextmanager
    async def hold(self, domain: Domain) -> AsyncIterator[None]:
        """Hold every lock ``domain`` needs for the ``async with`` body."""
        async with self.hold_functions(self.functions_of(domain), domain.key):
            yield

    @contextlib.asynccontextmanager
    async def hold_functions(self, functions: Iterable[PciAddress], owner: str) -> AsyncIterator[None]:
        """Hold the locks of ``functions`` (taken in sorted order) on behalf of ``owner``."""
        taken: list[PciAddress] = []
        try:
            for addr in sorted(set(functions)):
                lock = self._lock(addr)
                if lock.locked():
                    logger.debug("%s waits for %s (held by %s)", owner, addr, self._holders.get(addr))
                await lock.acquire()
                taken.append(addr)
                self._holders[addr] = owner
            yield
        finally:
            for addr in reversed(taken):
                self._holders.pop(addr, None)
                self._locks[addr].release()

    def held(self) -> dict[PciAddress, str]:
        """Which functions are locked right now, and by which domain key (for status output)."""
        return dict(self._holders)
