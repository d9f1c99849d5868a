"""
Who coordinates a launched VM: the host's daemon, or one embedded in ``qreset launch``.

:class:`Coordinator` is the daemon as launch needs it (add the VM, wait for
its monitor, remove it at exit); :func:`coordinator` asks the control socket
first and only runs an embedded :class:`~qreset.daemon.Daemon` when nothing
answers, with its own control socket beside the VM's QMP sockets so it never
takes the place of the host's daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qreset.errors import QResetError

if TYPE_CHECKING:
    from qreset.config import Config
    from qreset.daemon import Daemon

__all__ = [
    "DEFAULT_CONFIG", "Coordinator", "EmbeddedDaemon", "LaunchError", "RemoteDaemon", "find_coordinator",
    "load_config", "socket_ok",
]

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/qreset/qreset.toml")
#: sockaddr_un.sun_path (Linux include/uapi/linux/un.h UNIX_PATH_MAX, NUL included).
_UNIX_PATH_MAX = 108


class LaunchError(QResetError):
    """A one-line reason ``qreset launch`` cannot go on (exit 2 before QEMU starts)."""


def socket_ok(path: Path) -> None:
    if len(os.fsencode(str(path))) >= _UNIX_PATH_MAX:
        raise LaunchError(f"socket path {path} is longer than {_UNIX_PATH_MAX - 1} bytes; use --run-dir")


class Coordinator(Protocol):
    """The daemon as launch needs it: remote (control socket) or embedded (in this process)."""

    @property
    def where(self) -> str: ...

    async def add(self, name: str, qmp: Path, devices: list[str], mode: str | None) -> None: ...

    async def connected(self, name: str) -> bool: ...

    async def remove(self, name: str, release: bool) -> dict[str, Any]: ...

    async def close(self) -> None: ...


@dataclass
class RemoteDaemon:
    """The host's daemon, over its control socket (synchronous QMP in a worker thread)."""

    socket: str

    @property
    def where(self) -> str:
        return f"daemon at {self.socket}"

    async def _call(self, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        from qreset.qmpsync import call

        return await asyncio.to_thread(call, self.socket, command, timeout, **arguments)

    async def add(self, name: str, qmp: Path, devices: list[str], mode: str | None) -> None:
        args: dict[str, Any] = {"name": name, "qmp": str(qmp), "devices": devices}
        if mode is not None:
            args["mode"] = mode
        await self._call("add-vm", **args)

    async def connected(self, name: str) -> bool:
        vms = await self._call("query-vms")
        return any(isinstance(v, dict) and v.get("name") == name and v.get("connected") for v in vms or [])

    async def remove(self, name: str, release: bool) -> dict[str, Any]:
        result = await self._call("remove-vm", 300.0, name=name, release=release)
        return result if isinstance(result, dict) else {}

    async def close(self) -> None:
        return None


class EmbeddedDaemon:
    """A :class:`qreset.daemon.Daemon` run in this process for one VM."""

    def __init__(self, daemon: Daemon, control: Path | None) -> None:
        self.daemon = daemon
        self.where = f"embedded daemon (control socket {control})" if control else "embedded daemon"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.daemon.run(), name="qreset.launch.daemon")
        started = asyncio.create_task(self.daemon.started.wait(), name="qreset.launch.started")
        await asyncio.wait({self._task, started}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            started.cancel()
            self._task.result()  # raises why it could not start
            raise LaunchError("the embedded daemon stopped at once")

    async def add(self, name: str, qmp: Path, devices: list[str], mode: str | None) -> None:
        await self.daemon.add_vm(name, str(qmp), devices, mode)

    async def connected(self, name: str) -> bool:
        monitor = self.daemon.monitors.get(name)
        return monitor is not None and monitor.connected

    async def remove(self, name: str, release: bool) -> dict[str, Any]:
        return await self.daemon.remove_vm(name, release)

    async def close(self) -> None:
        if self._task is None:
            return
        self.daemon.request_stop()
        with contextlib.suppress(Exception):
            await self._task


def load_config(path: Path | None) -> Config:
    from qreset.config import Config, load_config

    if path is not None:
        return load_config(path)
    if DEFAULT_CONFIG.exists():
        return load_config(DEFAULT_CONFIG)
    return Config()


async def find_coordinator(args: argparse.Namespace, cfg: Config, rundir: Path, name: str) -> Coordinator:
    """The host's daemon if one answers on the control socket, else an embedded one."""
    from qreset.qmpsync import DaemonUnreachable, call

    socket = args.socket or os.environ.get("QRESET_SOCKET") or cfg.daemon.control_socket
    if socket is not None:
        try:
            await asyncio.to_thread(call, str(socket), "query-status", 5.0)
            return RemoteDaemon(str(socket))
        except DaemonUnreachable as exc:
            logger.info("no daemon: %s", exc)
    from qreset.daemon import Daemon
    from qreset.preflight import check_host, check_paths

    control = rundir / f"{name}.control.sock"
    socket_ok(control)
    cfg = cfg.model_copy(update={"daemon": cfg.daemon.model_copy(update={"control_socket": control})})
    # What `qreset run` checks before it creates anything (qreset.preflight): a
    # journal path that is a directory, a device not on this host... is one line
    # and exit 2 here too, before QEMU starts, not a failure of the embedded daemon.
    check_paths(cfg)
    await check_host(cfg)
    embedded = EmbeddedDaemon(Daemon(cfg), control)
    await embedded.start()
    return embedded
