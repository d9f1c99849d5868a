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
(:class:`qreset.control.ControlBackend`): ``query_*``, ``reset_vm``,
``add_vm``, ``remove_vm``, ``doctor`` return JSON-safe dicts and raise
:class:`~qreset.errors.QResetError` subclasses on bad input. Events go to
the control socket's clients and to an in-memory ring that the tests (and
``query_status``) read.

Run states (explicit, like qemu.qmp's ``Runstate``): CREATED → STARTING →
RUNNING → STOPPING → STOPPED.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic

from qreset import sdnotify
from qreset.config import Config, Mode, VmSection
from qreset.engine import CycleReport, Engine, EngineSettings, ProgressEvent
from qreset.errors import ConfigError, NoSuchFunction, QResetError
from qreset.history import page as history_page
from qreset.journal import Journal, iter_history
from qreset.pci.address import PciAddress
from qreset.pci.host import PciHost
from qreset.plan import Policy, Takeover
from qreset.preflight import UNIX_PATH_MAX
from qreset.vm import MonitorSettings, VmError, VmMonitor

if TYPE_CHECKING:
    from qreset.control import ControlServer
    from qreset.metrics import MetricsServer

logger = logging.getLogger(__name__)

#: Cycle summaries and latencies kept in memory for query_resets/query_status.
HISTORY_MAX = 10_000
#: Past cycles read back into memory at start (older ones: qreset.journal.iter_history);
#: reading 10 000 summaries cost ~10x more start-up time than the recovery itself.
START_HISTORY = 1024
#: Events kept in memory (for tests and late readers).
EVENTS_MAX = 2_000


class DaemonState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class DaemonError(QResetError):
    """The daemon cannot start or serve a request."""


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p90/p99/max of ``values`` (None when empty)."""
    data = sorted(values)
    if not data:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}

    def rank(p: float) -> float:
        k = max(0, min(len(data) - 1, int(-(-p * len(data) // 100)) - 1))
        return round(data[k], 3)

    return {"count": len(data), "p50": rank(50), "p90": rank(90), "p99": rank(99),
            "max": round(data[-1], 3)}


class _Waiter:
    __slots__ = ("fut", "name", "pred")

    def __init__(self, name: str, pred: Callable[[dict[str, Any]], bool] | None,
                 fut: asyncio.Future[dict[str, Any]]) -> None:
        self.name, self.pred, self.fut = name, pred, fut


class Daemon:
    """``qreset run``: see the module docstring."""

    def __init__(self, config: Config, *, host: PciHost | None = None, control: bool = True) -> None:
        self.config = config
        self.state = DaemonState.CREATED
        self.policy = Policy(
            takeover=Takeover(config.policy.takeover.value),
            allow=frozenset(config.policy.allow),
        )
        self.journal = Journal(config.daemon.journal, segment_bytes=config.daemon.journal_segment_bytes,
                               segments=config.daemon.journal_segments)
        self.monitors: dict[str, VmMonitor] = {}
        #: Where each served VM came from: "config", "runtime" (add-vm) or "journal" (replayed).
        self.origins: dict[str, str] = {}
        self.events: deque[tuple[float, str, dict[str, Any]]] = deque(maxlen=EVENTS_MAX)
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_MAX)
        self.counters: Counter[str] = Counter()
        self.latencies_ms: deque[float] = deque(maxlen=HISTORY_MAX)
        self.stop_latencies_ms: deque[float] = deque(maxlen=HISTORY_MAX)
        self.started = asyncio.Event()
        self._host = host
        self._own_host = host is None
        self._engine: Engine | None = None
        self._control = control
        self._server: ControlServer | None = None
        self._metrics: MetricsServer | None = None
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiters: list[_Waiter] = []
        #: Per VM, the run-state actions a previous daemon journaled (qreset.actions).
        self._journaled_actions: dict[str, dict[str, Any]] = {}
        #: Serialises add-vm/remove-vm: a replacement awaits the old monitor's end.
        self._registry_lock = asyncio.Lock()
        self._t_start = time.monotonic()
        self._settings = MonitorSettings(
            on_identity_change=config.policy.on_identity_change,
            cycle_timeout=config.policy.cycle_timeout,
            connect_backoff_max=config.policy.connect_backoff_max,
        )

    # ------------------------------------------------------------------
    # life cycle

    @property
    def host(self) -> PciHost:
        if self._host is None:
            raise DaemonError("the daemon has not opened its host yet")
        return self._host

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise DaemonError("the daemon has not started its engine yet")
        return self._engine

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
            self.history.extend(reversed(past))
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
            for w in self._waiters:
                if not w.fut.done():
                    w.fut.cancel()
            self.state = DaemonState.STOPPED
            logger.info("stopped")

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
        last = next((r for r in reversed(self.history) if r.get("vm") == name), None)
        monitor = VmMonitor(name, qmp, mode, devices, self, unfinished,
                            self._journaled_actions.get(name), last)
        self.monitors[name] = monitor
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
                # Our choice: 0.2 s doubling to 5 s, so a crash loop neither spins nor stalls long.
                await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt))

    # ------------------------------------------------------------------
    # CycleContext (called by the monitors)

    def settings(self) -> MonitorSettings:
        return self._settings

    def ownership(self) -> dict[str, list[PciAddress]]:
        return {name: list(m.owned) for name, m in self.monitors.items()}

    async def run_engine(self, vm: str, owned: Sequence[PciAddress]) -> CycleReport:
        def progress(ev: ProgressEvent) -> None:
            logger.debug("VM %s: %s", vm, ev.line())

        return await self.engine.reset(vm, owned, self.ownership(), self.policy, progress)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((time.time(), name, data))
        if self._server is not None:
            self._server.emit(name, data)
        for w in list(self._waiters):
            if w.name == name and not w.fut.done() and (w.pred is None or w.pred(data)):
                w.fut.set_result(data)
                self._waiters.remove(w)

    def cycle_done(self, monitor: VmMonitor, summary: dict[str, Any]) -> None:
        self.history.append(summary)
        self.counters["cycles"] += 1
        outcome = str(summary.get("outcome"))
        self.counters[f"outcome:{outcome}"] += 1
        if outcome != "resumed":
            self.counters["failures"] += 1
        report = summary.get("report")
        if isinstance(report, dict):
            for dom in report.get("domains") or []:
                if isinstance(dom, dict):
                    self.counters[f"method:{dom.get('method')}"] += 1
        durations = summary.get("durations") or {}
        if "total_ms" in durations:
            self.latencies_ms.append(float(durations["total_ms"]))
        if "event_to_stop_ms" in durations:
            self.stop_latencies_ms.append(float(durations["event_to_stop_ms"]))

    async def wait_event(self, name: str, pred: Callable[[dict[str, Any]], bool] | None = None,
                         timeout: float = 30.0, *, past: bool = False) -> dict[str, Any]:
        """Wait for the next event ``name`` matching ``pred`` (or one already seen if ``past``)."""
        if past:
            for _t, n, data in self.events:
                if n == name and (pred is None or pred(data)):
                    return data
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(name, pred, fut)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    # ------------------------------------------------------------------
    # ControlBackend

    def _monitor(self, vm: str) -> VmMonitor:
        try:
            return self.monitors[vm]
        except KeyError:
            known = ", ".join(sorted(self.monitors)) or "none"
            raise VmError(f"no VM named {vm!r} (known: {known})") from None

    def _describe(self, m: VmMonitor) -> dict[str, Any]:
        origin = self.origins.get(m.name, "runtime")
        # Replayed from the journal and not seen since this daemon started: its QEMU
        # may be gone for good (the guest stopped while no daemon ran to hear it).
        return m.describe() | {"origin": origin, "stale": origin == "journal" and m.connects == 0}

    async def query_vms(self) -> list[dict[str, Any]]:
        out = []
        for m in list(self.monitors.values()):
            await m.refresh_status()
            out.append(self._describe(m))
        return out

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
        plan = await self.engine.plan(vm, m.owned, self.ownership(), self.policy)
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
        methods = {k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("method:")}
        outcomes = {k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("outcome:")}
        return {
            "state": self.state.value,
            "host": self._host.name if self._host is not None else None,
            "journal": str(self.journal.path),
            # Why cycle records are not being kept (None: they are); see qreset.journal.
            "journal_degraded": self.journal.degraded,
            "uptime_s": round(time.monotonic() - self._t_start, 3),
            "vms": len(self.monitors),
            "connected": sum(m.connected for m in self.monitors.values()),
            "cycles": self.counters["cycles"],
            "failures": self.counters["failures"],
            "outcomes": outcomes,
            "resets_by_method": methods,
            "cycle_ms": percentiles(list(self.latencies_ms)),
            "event_to_stop_ms": percentiles(list(self.stop_latencies_ms)),
        }
