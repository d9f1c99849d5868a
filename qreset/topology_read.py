"""
Reading a :class:`~qreset.topology.Topology` from a host, and keeping it current.

:func:`load_nodes` reads every function (attributes and config space)
concurrently; :func:`refresh_nodes` re-reads only what changes at run time
(driver binding, ``reset_method``, VFs: :meth:`PciHost.runtime`) for the
functions a plan looks at, and reads in full only functions that appeared
(hot plug, an ``sriov_numvfs`` write). Errors come out as the first
:class:`~qreset.errors.QResetError`, never an exception group.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qreset.errors import HostError, NoSuchFunction, QResetError
from qreset.pci.address import PciAddress
from qreset.pci.cfgspace import ConfigSpace, parse_config
from qreset.pci.host import FunctionInfo, PciHost, SlotInfo

logger = logging.getLogger("qreset.topology")


@dataclass(frozen=True, slots=True)
class FunctionNode:
    """One function with its sysfs attributes and decoded config space."""

    info: FunctionInfo
    config: ConfigSpace

    @property
    def address(self) -> PciAddress:
        return self.info.address


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


async def _read_node(host: PciHost, addr: PciAddress) -> FunctionNode | None:
    """One function's attributes and config space; None (logged) when it vanished meanwhile.

    An unreadable config space decodes as absent (``parse_config(b"")``) so
    the rest of the tree still loads.
    """
    try:
        info = await host.info(addr)
    except NoSuchFunction as exc:
        logger.warning("%s vanished while reading the topology: %s", addr, exc)
        return None
    try:
        raw = await host.read_config(addr)
    except NoSuchFunction as exc:
        logger.warning("%s vanished while reading the topology: %s", addr, exc)
        return None
    except HostError as exc:
        logger.warning("cannot read config space of %s: %s", addr, exc)
        raw = b""
    return FunctionNode(info, parse_config(raw))


async def _gather_named(host: PciHost, what: str, jobs: Iterable[tuple[str, Awaitable[Any]]]) -> None:
    """Run ``jobs`` concurrently (one named task each); raise the first QResetError, not a group.

    Callers catch QResetError and print one line: they get the first
    structured error rather than a group (the rest are logged).
    """
    async def run(coro: Awaitable[Any]) -> None:
        await coro

    try:
        async with asyncio.TaskGroup() as tg:
            for name, coro in jobs:
                tg.create_task(run(coro), name=f"{what}[{host.name}].{name}")
    except BaseExceptionGroup as group:
        errors = _leaves(group)
        first = next((e for e in errors if isinstance(e, QResetError)), None)
        if first is None:
            raise
        for other in errors:
            if other is not first:
                logger.warning("also failed while reading the topology: %s", other)
        raise first from None


def _what_changed(old: FunctionInfo, new: FunctionInfo) -> str:
    parts = []
    if old.driver != new.driver:
        parts.append(f"driver {old.driver or 'none'} -> {new.driver or 'none'}")
    if old.driver_override != new.driver_override:
        parts.append(f"driver_override {old.driver_override} -> {new.driver_override}")
    if old.reset_methods != new.reset_methods:
        parts.append(f"reset_method {' '.join(old.reset_methods) or '(none)'} -> "
                     f"{' '.join(new.reset_methods) or '(none)'}")
    if old.virtfns != new.virtfns:
        parts.append(f"{len(old.virtfns)} -> {len(new.virtfns)} VF(s)")
    return ", ".join(parts) or "attributes changed"


async def load_nodes(host: PciHost) -> tuple[dict[PciAddress, FunctionNode], list[SlotInfo], bool]:
    """Every function of ``host`` (one named task each), its slots, whether it has IOMMU groups.

    A function that disappears between the listing and the read (hot removal)
    is left out with a warning; an unreadable config space decodes as absent
    (``parse_config(b"")``) so the rest of the tree still loads.
    """
    addrs = await host.functions()
    nodes: dict[PciAddress, FunctionNode] = {}
    extra: dict[str, Any] = {}

    async def read_one(addr: PciAddress) -> None:
        node = await _read_node(host, addr)
        if node is not None:
            nodes[addr] = node

    async def other(key: str, coro: Awaitable[Any]) -> None:
        extra[key] = await coro

    await _gather_named(host, "topology", [
        *((f"read[{a}]", read_one(a)) for a in addrs),
        ("slots", other("slots", host.slots())),
        ("iommu", other("iommu", host.has_iommu_groups())),
    ])
    return nodes, extra["slots"], extra["iommu"]


async def refresh_nodes(
    host: PciHost, functions: Mapping[PciAddress, FunctionNode], addrs: Iterable[PciAddress],
) -> dict[PciAddress, FunctionNode] | None:
    """``functions`` made current for ``addrs`` (see the module docstring); None when nothing changed."""
    listed = set(await host.functions())
    known = set(functions)
    added, removed = listed - known, known - listed
    want = {a for a in addrs if a in listed and a not in added}
    for a in added | removed:
        node = functions.get(a)
        pf = node.info.physfn if node is not None else None
        if pf is not None and pf in listed and pf not in added:
            want.add(pf)
    nodes = {a: n for a, n in functions.items() if a not in removed}
    changed = bool(removed)

    async def runtime(addr: PciAddress) -> None:
        nonlocal changed
        try:
            state = await host.runtime(addr)
        except NoSuchFunction as exc:
            logger.info("%s is gone: %s", addr, exc)
            nodes.pop(addr, None)
            changed = True
            return
        node = nodes[addr]
        info = state.apply(node.info)
        if info is not node.info:
            logger.info("%s: %s", addr, _what_changed(node.info, info))
            nodes[addr] = FunctionNode(info, node.config)
            changed = True

    async def full(addr: PciAddress) -> None:
        nonlocal changed
        node = await _read_node(host, addr)
        if node is not None:
            logger.info("%s appeared on %s", addr, host.name)
            nodes[addr] = node
            # A new VF's PF lists it (virtfnN) even when the listing did
            # not show the PF as changed.
            pf = node.info.physfn
            if pf is not None and pf in nodes and pf not in want and pf not in added:
                await runtime(pf)
            changed = True

    # Run-time attributes are a few small sysfs reads each, done in line (no
    # task per function: a VF's plan reads a handful); hot-added functions,
    # rare, are read in full concurrently.
    for a in sorted(want):
        await runtime(a)
    if added:
        await _gather_named(host, "refresh", ((f"read[{a}]", full(a)) for a in sorted(added)))
    if not changed:
        return None
    for a in sorted(removed):
        logger.info("%s was removed from %s", a, host.name)
    return nodes
