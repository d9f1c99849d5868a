"""
The simulated host's data types: faults to inject and the logs tests read.

:class:`Fault` makes the next reset of a function misbehave (see
:meth:`qreset.pci.sim.SimHost.inject`); :class:`ConfigWrite` and
:class:`ResetRecord` are what :attr:`SimHost.config_writes` and
:attr:`SimHost.reset_log` hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from qreset.pci.address import PciAddress

__all__ = ["CONFIG_WRITES_MAX", "RESET_LOG_MAX", "ConfigWrite", "Fault", "RecentLog", "ResetRecord"]

T = TypeVar("T")

#: Resets :attr:`SimHost.reset_log` keeps. A daemon on a simulated host (``[sim]``:
#: the demo, bench.scale) runs for hours at tens of resets a second: unbounded, the
#: log was one ResetRecord (~0.3 KB with its frozenset) per cycle forever
#: (bench.memgrowth). 4096 is far more than any test reads back (the longest runs
#: hundreds of resets) and ~1.3 MB at most.
RESET_LOG_MAX = 4096
#: Config writes :attr:`SimHost.config_writes` keeps: a restore of a 4 KiB
#: extended config space is up to 1024 dword writes (PCIe r6.0 sec 7.2.2), and a
#: test compares one restore's writes with the log, so 16 restores' worth (~2 MB).
CONFIG_WRITES_MAX = 16384



@dataclass(frozen=True, slots=True)
class Fault:
    """What the next reset of a function does wrong (one-shot unless ``persistent``).

    * ``crs``: stays in Configuration Request Retry Status ``seconds`` longer
      (None: never comes back);
    * ``eio``: the reset write fails with EIO (nothing happens to the device);
    * ``new_identity``: comes back as different firmware (device ID, revision,
      BAR sizes);
    * ``slow``: the reset itself and the return to ready take ``seconds`` longer.
    """

    kind: Literal["crs", "eio", "new_identity", "slow"]
    seconds: float | None = None
    device_id: int | None = None
    revision: int | None = None
    bar_sizes: tuple[tuple[int, int], ...] | None = None
    persistent: bool = False

    @classmethod
    def crs(cls, seconds: float | None, *, persistent: bool = False) -> Fault:
        return cls("crs", seconds=seconds, persistent=persistent)

    @classmethod
    def eio(cls, *, persistent: bool = False) -> Fault:
        return cls("eio", persistent=persistent)

    @classmethod
    def new_identity(cls, device_id: int | None = None, revision: int | None = None,
                     bar_sizes: Mapping[int, int] | Sequence[int] | None = None,
                     *, persistent: bool = False) -> Fault:
        """``bar_sizes``: {BAR index: size}, or sizes in the order of the implemented BARs."""
        pairs: tuple[tuple[int, int], ...] | None = None
        if isinstance(bar_sizes, Mapping):
            pairs = tuple(sorted((int(k), int(v)) for k, v in bar_sizes.items()))
        elif bar_sizes is not None:
            pairs = tuple((-1 - i, int(v)) for i, v in enumerate(bar_sizes))  # resolved later
        return cls("new_identity", device_id=device_id, revision=revision, bar_sizes=pairs,
                   persistent=persistent)

    @classmethod
    def slow(cls, seconds: float, *, persistent: bool = False) -> Fault:
        return cls("slow", seconds=seconds, persistent=persistent)


class RecentLog(list[T]):
    """
    A list that keeps only its newest ``limit`` items (``append`` drops the
    oldest beyond it): the simulated host's logs, which tests index, compare
    with ``[]`` and ``clear()`` like the lists they were, without growing
    with every reset of a long-running daemon.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def append(self, item: T) -> None:
        super().append(item)
        if len(self) > self.limit:
            del self[0]  # a memmove of `limit` pointers: microseconds, once per reset


@dataclass(frozen=True, slots=True)
class ConfigWrite:
    """One :meth:`SimHost.write_config` call (``t`` is ``loop.time()``)."""

    addr: PciAddress
    offset: int
    data: bytes
    t: float


@dataclass(frozen=True, slots=True)
class ResetRecord:
    """One reset: ``method`` is a kernel method name (``flr``, ``bus``...),
    ``subordinate`` for reset_subordinate, or ``sbr``/``flr-user``/``af_flr-user``/
    ``pm-user`` for resets software did through config writes. ``target`` is
    the function asked (reset_function) or the bridge (bus resets);
    ``affected`` every function that went through reset. Times are loop.time()."""

    method: str
    target: PciAddress
    affected: frozenset[PciAddress]
    start: float
    end: float
