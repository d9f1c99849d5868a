"""
The daemon's VM registry: the VMs it serves and how they came and go.

Three origins (``query-vms`` shows each as ``origin``): the configuration
file, ``add-vm`` at run time (the libvirt hook, ``qreset launch``), and the
journal (a VM a previous daemon had been given with ``add-vm``, served again
after a restart; the configuration wins a clash). ``add-vm`` and
``remove-vm`` are journaled so that a restarted daemon knows them;
``remove-vm`` with ``release`` resets the VM's functions for the host
(:mod:`qreset.release`). ``check-devices`` answers the hook's question at
``prepare``: may a VM with these devices start?

One named task per VM (``vm[NAME]``) in the daemon's TaskGroup runs its
:class:`~qreset.vm.VmMonitor` under a guard that restarts a crashed monitor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pydantic

from qreset.backoff import backoff_delay
from qreset.config import Mode, VmSection
from qreset.daemon_base import DaemonCore, DaemonError
from qreset.errors import ConfigError, NoSuchFunction, QResetError
from qreset.pci.address import PciAddress
from qreset.preflight import UNIX_PATH_MAX
from qreset.vm import VmMonitor

if TYPE_CHECKING:
    from qreset.vm import CycleContext

logger = logging.getLogger("qreset.daemon")


class VmRegistry(DaemonCore):
    """The registry half of :class:`qreset.daemon.Daemon` (see the module docstring)."""

    def _replay(self, registered: dict[str, dict[str, Any]],
                unfinished: dict[str, list[dict[str, Any]]]) -> None:
        """Serve again the VMs a previous daemon had been given with add-vm (config first)."""
        for name, rec in registered.items():
            if name in self.monitors:
                logger.warning("journal: VM %s was added at run time but the configuration has a VM "
                               "of that name: serving the configured one", name)
                continue
            try:
                section, mode = self._validate_add(name, rec["qmp"], rec["devices"], rec["mode"])
            except ConfigError as exc:
                logger.warning("journal: not serving VM %s again: %s", name, exc)
                continue
            self._start_monitor(name, section.qmp, mode, section.devices, unfinished.get(name))
            self.origins[name] = "journal"
            logger.info("VM %s served again (added at run time; qmp %s)", name, section.qmp)

    def _start_monitor(self, name: str, qmp: Path, mode: Mode, devices: Sequence[PciAddress],
                       unfinished: list[dict[str, Any]] | None = None) -> VmMonitor:
        if self._tg is None:
            raise DaemonError("daemon is not running")
        last = self.stats.last_of(name)
        # Daemon (this class's only concrete subclass) is the monitors' CycleContext.
        monitor = VmMonitor(name, qmp, mode, devices, cast("CycleContext", self), unfinished,
                            self._journaled_actions.get(name), last)
        self.monitors[name] = monitor
        self.monitors_changed()
        self._tasks[name] = self._tg.create_task(self._guard(monitor), name=f"vm[{name}]")
        return monitor

    async def _guard(self, monitor: VmMonitor) -> None:
        """A VM's task: a bug in one VM's handling must not take the others down."""
        attempt = 0
        while True:
            try:
                await monitor.run()
                return
            except Exception:
                attempt += 1
                logger.exception("VM %s: monitor crashed; restarting it", monitor.name)
                # The one backoff formula (qreset.backoff), scaled so the first restarts come
                # within a fraction of a second and capped at 5 s: a crash loop neither spins
                # nor leaves a VM unserved for long.
                await asyncio.sleep(backoff_delay(attempt, 5.0, scale=0.2))

    def _validate_add(self, name: str, qmp: str, devices: list[str],
                      mode: str | None) -> tuple[VmSection, Mode]:
        """The add-vm arguments as a VmSection and the mode it resolves to (ConfigError if bad)."""
        where = f"add-vm {name!r}"
        # The socket may appear later (QEMU not started yet), but a relative path would
        # depend on the daemon's working directory, one past sun_path could never be
        # connected to, and a path that exists as something else would be retried
        # forever with nothing but debug lines.
        if not isinstance(qmp, str) or not qmp or not Path(qmp).is_absolute():
            raise ConfigError(f"{where}: qmp", f"expected an absolute socket path, got {qmp!r}")
        if len(os.fsencode(qmp)) >= UNIX_PATH_MAX:
            raise ConfigError(f"{where}: qmp", f"socket path longer than {UNIX_PATH_MAX - 1} bytes "
                              "(sun_path holds 108 with the NUL, unix(7))")
        try:
            section = VmSection.model_validate({
                "name": name, "qmp": qmp, "mode": mode,
                "device": [{"host": d} for d in devices],
            })
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{where}: {key}", str(err["msg"]).removeprefix("Value error, ")) from None
        if section.qmp.exists() and not section.qmp.is_socket():
            raise ConfigError(f"{where}: qmp", f"{qmp} exists and is not a socket")
        for other in self.monitors.values():
            if other.name == name:
                continue
            if other.qmp == section.qmp:
                raise ConfigError(f"{where}: qmp", f"socket {qmp} is already used by VM {other.name!r}")
            clash = set(other.owned) & set(section.devices)
            if clash:
                taken = ", ".join(map(str, sorted(clash)))
                raise ConfigError(f"{where}: devices", f"{taken} already assigned to VM {other.name!r}")
        return section, section.mode or self.config.policy.mode

    async def add_vm(self, name: str, qmp: str, devices: list[str], mode: str | None) -> dict[str, Any]:
        async with self._registry_lock:
            return await self._add_vm(name, qmp, devices, mode)

    async def _add_vm(self, name: str, qmp: str, devices: list[str], mode: str | None) -> dict[str, Any]:
        where = f"add-vm {name!r}"
        section, resolved = self._validate_add(name, qmp, devices, mode)
        existing = self.monitors.get(name)
        if existing is not None:
            differences = [
                what for what, same in (
                    (f"qmp {existing.qmp}", existing.qmp == section.qmp),
                    ("devices " + (",".join(map(str, sorted(existing.configured))) or "none"),
                     set(existing.configured) == set(section.devices)),
                    (f"mode {existing.mode.value}", existing.mode is resolved),
                ) if not same
            ]
            if not differences:
                # The same registration again (libvirt's 'reconnect' after libvirtd
                # restarts, a retried hook): nothing to do, and no journal record.
                logger.info("VM %s: add-vm of an identical VM: already served", name)
                existing.nudge()  # its QEMU is (back) there: connect now if not connected
                return self._describe(existing) | {"added": False}
            if not (self.origins.get(name) == "journal" and existing.connects == 0):
                raise ConfigError(f"{where}: name", f"a VM named {name!r} already exists with "
                                  + ", ".join(differences))
            # A replayed VM never seen since this daemon started: its guest stopped
            # while no daemon ran, and this is the guest started anew. Replace it.
            logger.warning("VM %s: replacing the stale VM replayed from the journal (%s)", name,
                           ", ".join(differences))
            await self._stop_monitor(name)
        monitor = self._start_monitor(name, section.qmp, resolved, section.devices)
        self.origins[name] = "runtime"
        logger.info("VM %s added (qmp %s)", name, qmp)
        persisted = await self._journal_registry({
            "vm": name, "phase": "add-vm", "qmp": str(section.qmp),
            "devices": [str(a) for a in section.devices], "mode": resolved.value,
        })
        return self._describe(monitor) | {"added": True, "persisted": persisted}

    async def _journal_registry(self, record: dict[str, Any]) -> bool:
        """
        Journal an add-vm/remove-vm (fsynced). A failure is logged and reported
        (``persisted: false``), not raised: the VM is served (or removed) now
        either way, only a restart would not know about it.
        """
        try:
            await self.journal.append({"cycle": f"reg-{uuid.uuid4().hex[:16]}", **record})
            why = self.journal.degraded  # append does not raise: it degrades the journal
        except QResetError as exc:
            why = str(exc)
        if why is not None:
            logger.error("VM %s: %s not journaled, a restarted daemon will not know of it "
                         "(unless the journal recovers first: its checkpoint carries it): %s",
                         record["vm"], record["phase"], why)
            return False
        return True

    async def _stop_monitor(self, name: str) -> VmMonitor:
        """End a VM's monitor (its cycle in progress completes) and forget it."""
        monitor = self._monitor(name)
        await monitor.close()
        task = self._tasks.pop(name, None)
        if task is not None:
            await asyncio.wait({task}, timeout=self._settings.cycle_timeout + 15)
        self.monitors.pop(name, None)
        self.monitors_changed()
        self.origins.pop(name, None)
        return monitor

    async def remove_vm(self, name: str, release: bool) -> dict[str, Any]:
        async with self._registry_lock:
            origin = self.origins.get(name)
            monitor = await self._stop_monitor(name)
            persisted = True
            if origin != "config":  # configured VMs come back from the file at start anyway
                persisted = await self._journal_registry({"vm": name, "phase": "remove-vm"})
        owned = list(monitor.owned)
        logger.info("VM %s removed", name)
        result: dict[str, Any] = {"vm": name, "removed": True, "released": None, "persisted": persisted}
        if release and owned:
            # The functions go back to the host: reset them now that no VM owns them,
            # and re-probe those whose identity changed (qreset.release).
            from qreset.release import release as release_functions

            report = await release_functions(self.engine, name, owned, self.ownership(), self.policy)
            result["released"] = report.to_json()
            (logger.info if report.ok else logger.warning)(
                "VM %s: released %s (%s)", name, ", ".join(map(str, owned)),
                "reset and rescanned" if report.ok else "release did not come back clean")
        return result

    async def check_devices(self, name: str, devices: list[str]) -> dict[str, Any]:
        """
        Whether a VM ``name`` with ``devices`` may start (``check-devices``, asked by
        the libvirt hook at prepare/start). Unsafe when a device is absent from
        this host or a bridge, when it is another VM's, or when its reset
        domain would take in another VM's function (or another VM's domain
        would take in one of these) without consent in ``policy.allow``: one
        of the two VMs' resets would then be refused.
        """
        wanted = sorted({PciAddress.parse(d) for d in devices})
        others = {vm: owned for vm, owned in self.ownership().items() if vm != name}
        reasons = await self._not_assignable(wanted)
        for vm, owned in others.items():
            for addr in sorted(set(owned) & set(wanted)):
                reasons.append(f"{addr} is assigned to running VM {vm!r}")
        if reasons or not wanted:
            return {"safe": not reasons, "reasons": reasons}
        plan = await self.engine.plan(name, wanted, others, self.policy)
        for b in plan.refusals:
            if b.owner.name in others:
                reasons.append(b.reason)
        together = {**others, name: list(wanted)}
        for vm, owned in others.items():
            if not owned:
                continue
            other_plan = await self.engine.plan(vm, owned, together, self.policy)
            for b in other_plan.refusals:
                if b.owner.name == name:
                    reasons.append(f"VM {vm!r}: {b.reason}")
        return {"safe": not reasons, "reasons": reasons}

    async def _not_assignable(self, wanted: Sequence[PciAddress]) -> list[str]:
        """
        Why each of ``wanted`` cannot be a VM's device on this host: absent, or a
        bridge. Presence is asked of the host now (a sysfs directory, no config
        read), not of the engine's cached topology: a function removed since it
        was cached must not pass, and reading config spaces here could catch a
        device in the middle of another VM's reset.
        """
        reasons: list[str] = []
        topo = await self.engine.topology()
        for addr in wanted:
            try:
                await self.host.info(addr)
            except NoSuchFunction:
                reasons.append(f"{addr} is absent on this host ({self.host.name})")
                continue
            if addr in topo and topo.is_bridge(addr):
                # vfio-pci binds type 0 headers only: vfio_pci_core_register_device()
                # returns -EINVAL for hdr_type != PCI_HEADER_TYPE_NORMAL.
                reasons.append(f"{addr} is a PCI bridge, not a device a VM can be given")
        return reasons

