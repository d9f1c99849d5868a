"""
``qreset status`` and ``qreset events``, and what every client of the
daemon's control socket shares (``qreset history`` is :mod:`qreset.cli.history`).

The socket speaks QMP (see :mod:`qreset.control`), so these are thin
``qemu.qmp.QMPClient`` users: connect, negotiate, execute, print. The same
data is available to anything that speaks QMP (``qmp-shell
/run/qreset/qreset.sock``); these commands add the human formatting and
``--json`` for scripts.

- ``status``: ``query-status`` and ``query-vms`` as text, or one JSON object
  ``{"status": ..., "vms": [...]}``.
- ``events``: follow the daemon's events until Ctrl-C (or the daemon goes
  away: exit 1; or stdout's reader does: exit 0); with ``--json`` one JSON
  object per line, flushed per event.

Exit codes: 0 success, 1 daemon not reachable or a command failed, 2 bad
arguments. A failure is one line on stderr, never a traceback: qemu.qmp
quotes a message it could not parse in its exceptions (MiBs for a reply cut
short), so every message shown is shortened to one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Mapping
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient, Runstate

from qreset import qmp_events
from qreset.cli import stdout_closed
from qreset.cli.common import add_json_argument, fail, print_json
from qreset.cli.render import format_event, humanize, status_cell, table
from qreset.qmpsync import DEFAULT_SOCKET

#: Seconds to wait for the daemon to accept and greet us.
CONNECT_TIMEOUT = 10.0
#: Replies (a page of history with full cycle reports) may be far larger than
#: qemu.qmp's 64 KiB default line buffer.
READ_BUFFER = 16 * 1024 * 1024


class ClientError(Exception):
    """A one-line, user-facing failure (becomes ``qreset: ...`` and exit 1)."""


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """``--socket`` and ``--json``, shared by every client command."""
    parser.add_argument(
        "--socket", metavar="PATH", default=None,
        help=f"the daemon's control socket (default: $QRESET_SOCKET or {DEFAULT_SOCKET})",
    )
    add_json_argument(parser)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_client_arguments(parser)


def socket_path(args: argparse.Namespace) -> str:
    """--socket, else $QRESET_SOCKET, else the default path."""
    given: str | None = getattr(args, "socket", None)
    return given or os.environ.get("QRESET_SOCKET") or DEFAULT_SOCKET


def run(args: argparse.Namespace) -> int:
    command: str = args.command
    path = socket_path(args)
    if command == "status":
        return run_client(command, _status(path, args.json))
    if command == "events":
        return run_client(command, _events(path, args.json))
    return fail(f"unknown client command {command!r}")


def run_client(command: str, main: Coroutine[Any, Any, int]) -> int:
    """Run a client command's coroutine; every failure becomes one line on stderr and exit 1."""
    # qemu.qmp logs connection failures at ERROR; without a handler Python
    # prints them to stderr. We report the failure ourselves, in one line.
    logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
    logging.getLogger("qemu.qmp").propagate = False
    try:
        return asyncio.run(main)
    except ClientError as exc:
        return fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a protocol or library failure: still one line, never a traceback
        return fail(f"{command}: {type(exc).__name__}: {short(str(exc))}", 1)


def short(text: str, limit: int = 200) -> str:
    """One line of at most ``limit`` characters (a protocol error may quote MiBs of reply)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + "..."


# ---------------------------------------------------------------- connection


async def disconnect(qmp: QMPClient) -> None:
    """Disconnect without raising: qemu.qmp re-raises a reader failure here (quoting the message)."""
    with contextlib.suppress(Exception):
        await qmp.disconnect()


# ---------------------------------------------------------------- connection


async def connect(path: str, listener: EventListener | None = None) -> QMPClient:
    """
    A negotiated QMPClient, or :class:`_ClientError` saying why not, in one line.
    With ``listener``, the events go there (registered before connecting, so none
    is missed) and nowhere else (:mod:`qreset.qmp_events`: qemu.qmp's default
    listener would keep every event of a long ``qreset events`` forever).
    """
    qmp = QMPClient("qreset-cli", readbuflen=READ_BUFFER)
    if listener is not None:
        qmp_events.quiet(qmp).register_listener(listener)
    try:
        await asyncio.wait_for(qmp.connect(path), CONNECT_TIMEOUT)
    except TimeoutError:
        await disconnect(qmp)
        raise ClientError(f"daemon at {path} did not answer within {CONNECT_TIMEOUT:.0f} s") from None
    except ConnectError as exc:
        await disconnect(qmp)
        why = _connect_failure(path, exc.exc)
        if not isinstance(exc.exc, OSError | EOFError):
            # qemu.qmp does not keep the message that was not a greeting;
            # the server refuses with an error object: fetch its reason.
            reason = await _refusal_reason(path)
            if reason:
                why = f"{path} refused the session: {reason}"
        raise ClientError(why) from None
    return qmp


async def _refusal_reason(path: str) -> str | None:
    """The ``desc`` of the error a refusing server sends instead of its greeting."""
    try:
        # 2 s: a refusing server answers at once; this only bounds a hung one.
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 2.0)
    except (OSError, TimeoutError):
        return None
    try:
        line = await asyncio.wait_for(reader.readline(), 2.0)
        msg = json.loads(line)
        desc = msg["error"]["desc"] if isinstance(msg, dict) and isinstance(msg.get("error"), dict) else None
        return " ".join(desc.split()) if isinstance(desc, str) else None
    except (OSError, TimeoutError, ValueError):
        return None
    finally:
        writer.close()


def _connect_failure(path: str, cause: BaseException) -> str:
    if isinstance(cause, FileNotFoundError):
        return f"daemon not running (no control socket at {path})"
    if isinstance(cause, ConnectionRefusedError):
        return f"daemon not running (nothing listening on {path})"
    if isinstance(cause, PermissionError):
        return f"permission denied on {path} (run as root or as the daemon's user)"
    if isinstance(cause, OSError):
        return f"cannot connect to {path}: {cause.strerror or cause}"
    if isinstance(cause, EOFError):
        return f"daemon at {path} closed the connection before greeting"
    # GreetingError/NegotiationError wrap the message that was not a greeting,
    # e.g. the server's "permission denied" or "too many clients" error.
    detail = " ".join(str(cause).split())
    return f"{path} refused the session: {detail}"


async def execute(qmp: QMPClient, command: str, arguments: Mapping[str, object] | None = None) -> Any:
    try:
        return await qmp.execute(command, arguments)
    except ExecuteError as exc:
        desc = short(exc.error.error.desc, 1000)
        # The server names the command in argument errors already.
        raise ClientError(desc if desc.startswith(f"{command}: ") else f"{command}: {desc}") from None
    except (ExecInterruptedError, EOFError, ConnectionError) as exc:
        raise ClientError(f"{command}: the daemon closed the connection ({short(str(exc))})") from None


# ---------------------------------------------------------------- formatting



# ---------------------------------------------------------------- commands


async def _status(path: str, as_json: bool) -> int:
    qmp = await connect(path)
    try:
        status = await execute(qmp, "query-status")
        vms = await execute(qmp, "query-vms")
    finally:
        await disconnect(qmp)
    if as_json:
        print_json({"status": status, "vms": vms})
        return 0
    print(f"qreset daemon at {path}")
    if isinstance(status, dict):
        width = max((len(k) for k in status), default=0)
        for key, value in status.items():
            print(f"  {key.ljust(width)}  {status_cell(key, value)}")
    if not vms:
        print("no VMs")
        return 0
    print()
    rows = [humanize(v) for v in vms if isinstance(v, dict)]
    for line in table(rows, first=("name", "state", "mode", "qmp", "devices")):
        print(line)
    return 0




async def _events(path: str, as_json: bool) -> int:
    """Print events until SIGINT/SIGTERM (exit 0) or the daemon hangs up (exit 1)."""
    events = qmp_events.Listener()
    qmp = await connect(path, events)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def printer() -> None:
        async for event in events:
            if as_json:
                sys.stdout.write(json.dumps(dict(event), default=str) + "\n")
            else:
                sys.stdout.write(format_event(event) + "\n")
            sys.stdout.flush()
            if stdout_closed():  # | head -1 has what it wanted
                stop.set()
                return

    async def hangup() -> None:
        while qmp.runstate is Runstate.RUNNING:
            await qmp.runstate_changed()

    tasks = {
        asyncio.create_task(printer(), name="qreset.events.printer"),
        asyncio.create_task(hangup(), name="qreset.events.hangup"),
        asyncio.create_task(stop.wait(), name="qreset.events.stop"),
    }
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await disconnect(qmp)
    if stop.is_set():
        return 0
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise ClientError(f"events: {task.exception()}")
    raise ClientError(f"the daemon at {path} closed the connection")
