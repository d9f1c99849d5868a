"""
The daemon as the control socket's backend (:class:`qreset.control.ControlBackend`).

``query_*``, ``reset_vm`` and ``doctor`` return JSON-safe dicts and raise
:class:`~qreset.errors.QResetError` subclasses on bad input (``add_vm``,
``remove_vm`` and ``check_devices`` are the registry's:
:mod:`qreset.daemon_registry`). Reads only: nothing here changes what the
daemon serves, except ``reset_vm``, which asks a VM's monitor for a cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from qreset.daemon_base import DaemonCore
from qreset.errors import QResetError
from qreset.history import page as history_page
from qreset.journal import iter_history
from qreset.pci.address import PciAddress
from qreset.vm import VmMonitor

#: Status queries ``query_vms`` has in flight at once (our choice: enough to hide
#: the round trips, few enough to leave the loop to the cycles).
STATUS_QUERIES = 32


class ControlBackendMixin(DaemonCore):
    """The control-socket half of :class:`qreset.daemon.Daemon` (see the module docstring)."""

    async def query_vms(self) -> list[dict[str, Any]]:
        """
        Every VM with its QEMU's status asked now: the queries run side by side,
        at most :data:`STATUS_QUERIES` at once (one after another, 256 QEMUs took
        seconds under load; unbounded, one ``qreset status`` would queue 256
        commands at once on a loop that is resetting guests).
        """
        monitors = list(self.monitors.values())
        gate = asyncio.Semaphore(STATUS_QUERIES)

        async def refresh(m: VmMonitor) -> None:
            async with gate:
                await m.refresh_status()

        await asyncio.gather(*(refresh(m) for m in monitors))
        return [self._describe(m) for m in monitors]

    async def query_devices(self, vm: str | None) -> list[dict[str, Any]]:
        monitors = [self._monitor(vm)] if vm is not None else list(self.monitors.values())
        topo = None
        with contextlib.suppress(QResetError):
            # Drivers as they are now (libvirt rebinds managed devices at start/stop).
            topo = await self.engine.topology(current=[d.host for m in monitors for d in m.devices])
        out = []
        for m in monitors:
            for dev in m.devices:
                entry: dict[str, Any] = {"vm": m.name, **dev.to_json()}
                if topo is not None and dev.host in topo.functions:
                    info = topo.functions[dev.host].info
                    entry.update({
                        "vendor": f"{info.vendor:04x}", "device": f"{info.device:04x}",
                        "driver": info.driver, "iommu_group": info.iommu_group,
                        "reset_methods": list(info.reset_methods),
                    })
                elif topo is not None:
                    entry["error"] = f"{dev.host} does not exist on host {topo.host_name}"
                out.append(entry)
        return out

    async def query_plan(self, vm: str) -> dict[str, Any]:
        m = self._monitor(vm)
        plan = await self.engine.plan(vm, m.owned, self.ownership(), self.policy, m.backends)
        return plan.to_json()

    async def query_resets(self, vm: str | None, limit: int, before: str | None = None,
                           since: float | None = None, until: float | None = None) -> dict[str, Any]:
        """
        A page of finished cycles, newest first (see :func:`qreset.history.page`),
        read from the journal's segments, so that history reaches past the
        in-memory ring (issue 13); from memory while the journal is degraded
        (cycles are then missing from it, not from memory).
        """
        if self.journal.degraded is not None:
            return history_page(reversed(self.history), vm=vm, limit=limit, before=before,
                                since=since, until=until)
        path = self.journal.path

        def read() -> dict[str, Any]:  # blocking file reads: in a thread
            rows = iter_history(path, vm=vm, since=since)
            return history_page(rows, vm=vm, limit=limit, before=before, since=since, until=until)

        return await asyncio.to_thread(read)

    async def reset_vm(self, vm: str) -> dict[str, Any]:
        return await self._monitor(vm).request_reset()

    async def doctor(self, functions: list[str]) -> list[dict[str, Any]]:
        from qreset.doctor import diagnose

        addrs = [PciAddress.parse(f) for f in functions] if functions else None
        topo = await self.engine.topology(current=addrs or ())
        for a in addrs or []:
            topo.node(a)  # NoSuchFunction names it
        report = diagnose(topo, addrs).to_json()
        rows: list[dict[str, Any]] = report["functions"]
        return rows

    async def query_status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "host": self._host.name if self._host is not None else None,
            "journal": str(self.journal.path),
            # Why cycle records are not being kept (None: they are); see qreset.journal.
            "journal_degraded": self.journal.degraded,
            "uptime_s": round(time.monotonic() - self._t_start, 3),
            "vms": len(self.monitors),
            "connected": sum(m.connected for m in self.monitors.values()),
            **self.stats.status(),
        }
