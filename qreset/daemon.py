"""
The daemon (``qreset run``): one engine, one journal, one monitor per VM.

Shape (aiomqtt-like): :meth:`Daemon.run` opens the journal and the host,
starts the control socket, then runs one named task per VM (``vm[NAME]``, a
:class:`~qreset.vm.VmMonitor`) in an :class:`asyncio.TaskGroup` until
:meth:`Daemon.request_stop` (SIGTERM/SIGINT). The single
:class:`~qreset.engine.Engine` is shared by every VM: its domain locks are
what keeps two VMs from resetting one domain at the same time, while
independent VMs never wait for each other.

Start-up reads the journal back (its active segment only, streamed: see
:mod:`qreset.journal`): a cycle with no terminal record means a
previous daemon died while a guest was parked or stopped, and that VM's
monitor finishes it as soon as it connects (see ``VmMonitor._recover``).
A journal that cannot be written does not stop the daemon: it runs with
the journal degraded (``journal_degraded`` in ``query-status``), because
guests a predecessor left parked must be resumed and resets must go on.

VMs registered at run time (``add-vm``: the libvirt hook, ``qreset launch``)
are journaled (``add-vm``/``remove-vm`` records, fsynced) and served again
by the next daemon, after the configuration's VMs: a restart or a crash of
the daemon must not leave running libvirt guests uncoordinated. On a clash
the configuration wins (a replayed VM with the name, the QMP socket or a
device of a configured one is skipped with a warning). A replayed VM whose
QEMU is gone is kept (its monitor connects whenever the socket appears) and
shown ``"stale": true`` in ``query-vms`` until it connects; it goes away with
``remove-vm`` (the hook's ``stopped``/``release``), or is replaced by an
``add-vm`` of the same name with other parameters. ``add-vm`` of a VM
identical to one already served is a no-op (the hook's ``reconnect`` relies
on it); a different one with the same name is refused.
Shutdown lets cycles in progress complete, puts back the run-state actions
park mode changed exactly as it found them (qreset.actions: with no daemon a
reset must not park the guest forever), and resumes anything parked meanwhile.

The daemon is also the control socket's backend
(:class:`qreset.control.ControlBackend`). This module is its life cycle and
the :class:`~qreset.vm.CycleContext` its monitors call; the rest lives apart
(:mod:`qreset.daemon_base`): the VM registry (:mod:`qreset.daemon_registry`),
the control backend's queries (:mod:`qreset.daemon_backend`), and the
counters, latencies and event ring (:mod:`qreset.daemon_stats`). Events go
to the control socket's clients and to that ring, which ``query_status`` and
the tests read.

Run states (explicit, like qemu.qmp's ``Runstate``): CREATED → STARTING →
RUNNING → STOPPING → STOPPED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from qreset import sdnotify
from qreset.daemon_backend import ControlBackendMixin
from qreset.daemon_base import DaemonCore, DaemonError, DaemonState
from qreset.daemon_registry import VmRegistry
from qreset.daemon_stats import EVENTS_MAX, HISTORY_MAX, percentiles
from qreset.engine import CycleReport, Engine, EngineSettings, ProgressEvent
from qreset.journal import iter_history
from qreset.pci.address import PciAddress
from qreset.pci.host import PciHost
from qreset.vm import VmMonitor

__all__ = ["EVENTS_MAX", "HISTORY_MAX", "START_HISTORY", "Daemon", "DaemonCore", "DaemonError",
           "DaemonState", "percentiles"]

logger = logging.getLogger(__name__)

#: Past cycles read back into memory at start (older ones: qreset.journal.iter_history);
#: reading 10 000 summaries cost ~10x more start-up time than the recovery itself.
START_HISTORY = 1024


class Daemon(VmRegistry, ControlBackendMixin):
    """``qreset run``: see the module docstring."""

    # ------------------------------------------------------------------
    # life cycle

    def request_stop(self) -> None:
        """Ask :meth:`run` to finish (signal handlers call this)."""
        if not self._stop.is_set():
            logger.info("stop requested")
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    def _open_host(self) -> PciHost:
        sim = self.config.sim
        if sim is not None:
            from qreset.pci.sim import SimHost

            return SimHost.from_toml(sim.topology, time_scale=sim.time_scale)
        from qreset.pci.sysfs import SysfsHost

        return SysfsHost(self.config.daemon.sysfs_root)

    async def _start_control(self) -> None:
        path = self.config.daemon.control_socket
        if not self._control or path is None:
            return
        try:
            from qreset.control import ControlServer
        except ImportError as exc:  # the control socket is optional for the daemon's job
            logger.warning("control socket disabled: qreset.control unavailable (%s)", exc)
            return
        server = ControlServer(path, backend=self)
        await server.start()
        self._server = server

    async def run(self, *, signals: bool = False) -> None:
        """Serve until :meth:`request_stop`. Raises QResetError if it cannot start."""
        if self.state is not DaemonState.CREATED:
            raise DaemonError(f"daemon already {self.state.value}")
        self.state = DaemonState.STARTING
        self._t_start = time.monotonic()
        if signals:
            self.install_signal_handlers()
        # First, before anything is created: a journal path that is not a regular
        # file is a ConfigError; an unreadable or unwritable one only degrades it
        # (the guests a predecessor left parked must still be resumed).
        recovery = await self.journal.open()
        try:
            past = await asyncio.to_thread(
                lambda: list(iter_history(self.journal.path, limit=START_HISTORY)))
            self.stats.load(past[::-1])
            unfinished = recovery.unfinished()
            registered = recovery.registered()
            self._journaled_actions = recovery.actions()
            if self._host is None:
                self._host = self._open_host()
            self._engine = Engine(self._host, EngineSettings(poll_timeout=self.config.policy.poll_timeout))
            await self._start_control()
            if self.config.metrics.listen is not None:
                from qreset.metrics import MetricsServer

                self._metrics = MetricsServer(self.config.metrics.listen, self.query_status)
                await self._metrics.start()
            configured = {vm.name for vm in self.config.vm}
            for name in sorted(set(unfinished) - configured - set(registered)):
                logger.warning("journal: VM %s has an open cycle but is not configured; leaving it",
                               name)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for vm in self.config.vm:
                    self._start_monitor(vm.name, vm.qmp, self.config.mode_of(vm), vm.devices,
                                        unfinished.get(vm.name))
                    self.origins[vm.name] = "config"
                self._replay(registered, unfinished)
                self.state = DaemonState.RUNNING
                self.started.set()
                logger.info("running: %d VM(s), host %s, journal %s", len(self.monitors),
                            self._host.name, self.journal.path)
                degraded = self.journal.degraded
                sdnotify.ready(f"serving {len(self.monitors)} VM(s)"
                               + (f"; journal degraded: {degraded}" if degraded else ""))
                await self._stop.wait()
                self.state = DaemonState.STOPPING
                sdnotify.notify("STOPPING=1")
                for monitor in list(self.monitors.values()):
                    await monitor.close()
        finally:
            self.state = DaemonState.STOPPING
            self._tg = None
            if self._server is not None:
                with contextlib.suppress(Exception):
                    await self._server.close()
                self._server = None
            if self._metrics is not None:
                with contextlib.suppress(Exception):
                    await self._metrics.close()
                self._metrics = None
            await self.journal.close()
            if self._own_host and self._host is not None:
                with contextlib.suppress(Exception):
                    await self._host.close()
            self.ring.cancel_waiters()
            self.state = DaemonState.STOPPED
            logger.info("stopped")

    # ------------------------------------------------------------------
    # CycleContext (called by the monitors)

    async def run_engine(self, vm: str, owned: Sequence[PciAddress]) -> CycleReport:
        def progress(ev: ProgressEvent) -> None:
            logger.debug("VM %s: %s", vm, ev.line())

        monitor = self.monitors.get(vm)
        return await self.engine.reset(vm, owned, self.ownership(), self.policy, progress,
                                       backends=monitor.backends if monitor else None)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        self.ring.add(name, data)
        if self._server is not None:
            self._server.emit(name, data)

    def cycle_done(self, monitor: VmMonitor, summary: dict[str, Any]) -> None:
        self.stats.record(summary)

    async def wait_event(self, name: str, pred: Callable[[dict[str, Any]], bool] | None = None,
                         timeout: float = 30.0, *, past: bool = False) -> dict[str, Any]:
        """Wait for the next event ``name`` matching ``pred`` (or one already seen if ``past``)."""
        return await self.ring.wait(name, pred, timeout, past=past)
