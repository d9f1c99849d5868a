"""
``qreset status``, ``qreset history``, ``qreset events``: clients of the
daemon's control socket.

The socket speaks QMP (see :mod:`qreset.control`), so these are thin
``qemu.qmp.QMPClient`` users: connect, negotiate, execute, print. The same
data is available to anything that speaks QMP (``qmp-shell
/run/qreset/control.sock``); these commands add the human formatting and
``--json`` for scripts.

- ``status``: ``query-status`` and ``query-vms`` as text, or one JSON object
  ``{"status": ..., "vms": [...]}``.
- ``history [--vm NAME] [--limit N]``: ``query-resets``, newest first.
- ``events``: follow the daemon's events until Ctrl-C (or the daemon goes
  away: exit 1); with ``--json`` one JSON object per line, flushed per event.

Exit codes: 0 success, 1 daemon not reachable or a command failed, 2 bad
arguments.
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
import time
from collections.abc import Mapping, Sequence
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, Runstate

from qreset.cli.common import add_json_argument, fail, print_json
from qreset.qmpsync import DEFAULT_SOCKET

#: Seconds to wait for the daemon to accept and greet us.
CONNECT_TIMEOUT = 10.0
#: Replies (history with full cycle reports) may be far larger than
#: qemu.qmp's 64 KiB default line buffer.
READ_BUFFER = 16 * 1024 * 1024


class _ClientError(Exception):
    """A one-line, user-facing failure (becomes ``qreset: ...`` and exit 1)."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--socket", metavar="PATH", default=None,
        help=f"the daemon's control socket (default: $QRESET_SOCKET or {DEFAULT_SOCKET})",
    )
    if name == "history":
        parser.add_argument("--vm", metavar="NAME", default=None, help="only this VM's cycles")
        parser.add_argument("--limit", metavar="N", type=_positive, default=20,
                            help="at most N cycles, newest first (default: %(default)s)")
    add_json_argument(parser)


def socket_path(args: argparse.Namespace) -> str:
    """--socket, else $QRESET_SOCKET, else the default path."""
    given: str | None = getattr(args, "socket", None)
    return given or os.environ.get("QRESET_SOCKET") or DEFAULT_SOCKET


def run(args: argparse.Namespace) -> int:
    # qemu.qmp logs connection failures at ERROR; without a handler Python
    # prints them to stderr. We report the failure ourselves, in one line.
    logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
    logging.getLogger("qemu.qmp").propagate = False
    command: str = args.command
    path = socket_path(args)
    try:
        if command == "status":
            return asyncio.run(_status(path, args.json))
        if command == "history":
            return asyncio.run(_history(path, args.vm, args.limit, args.json))
        if command == "events":
            return asyncio.run(_events(path, args.json))
    except _ClientError as exc:
        return fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    return fail(f"unknown client command {command!r}")


# ---------------------------------------------------------------- connection


async def _connect(path: str) -> QMPClient:
    """A negotiated QMPClient, or :class:`_ClientError` saying why not, in one line."""
    qmp = QMPClient("qreset-cli", readbuflen=READ_BUFFER)
    try:
        await asyncio.wait_for(qmp.connect(path), CONNECT_TIMEOUT)
    except TimeoutError:
        await qmp.disconnect()
        raise _ClientError(f"daemon at {path} did not answer within {CONNECT_TIMEOUT:.0f} s") from None
    except ConnectError as exc:
        await qmp.disconnect()
        why = _connect_failure(path, exc.exc)
        if not isinstance(exc.exc, OSError | EOFError):
            # qemu.qmp does not keep the message that was not a greeting;
            # the server refuses with an error object: fetch its reason.
            reason = await _refusal_reason(path)
            if reason:
                why = f"{path} refused the session: {reason}"
        raise _ClientError(why) from None
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


async def _execute(qmp: QMPClient, command: str, arguments: Mapping[str, object] | None = None) -> Any:
    try:
        return await qmp.execute(command, arguments)
    except ExecuteError as exc:
        raise _ClientError(f"{command}: {exc.error.error.desc}") from None
    except (ExecInterruptedError, EOFError, ConnectionError) as exc:
        raise _ClientError(f"{command}: the daemon closed the connection ({exc})") from None


# ---------------------------------------------------------------- formatting


#: Keys that name an item of a list of objects (a VM's devices as dicts).
_LABEL_KEYS = ("address", "name", "id", "vm")


def _label(item: Mapping[str, Any]) -> str | None:
    return next((str(item[k]) for k in _LABEL_KEYS if isinstance(item.get(k), str | int)), None)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, list) and all(isinstance(v, dict) and _label(v) for v in value):
        return ",".join(str(_label(v)) for v in value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _is_flat(value: Any) -> bool:
    """Fits in a table cell: a scalar, a list of scalars or of labelled objects."""
    if isinstance(value, list):
        return all(not isinstance(v, dict | list) or (isinstance(v, dict) and _label(v)) for v in value)
    return not isinstance(value, dict)


def table(rows: Sequence[Mapping[str, Any]], first: Sequence[str] = ()) -> list[str]:
    """
    Rows of dicts as aligned text columns. Columns are the keys with flat
    values, ``first`` ones leading, then in order of first appearance; nested
    values are left to ``--json``.
    """
    columns: list[str] = [c for c in first if any(c in r for r in rows)]
    for row in rows:
        for key, value in row.items():
            if key not in columns and _is_flat(value):
                columns.append(key)
    if not columns:
        return []
    cells = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells]


def _when(value: Any) -> Any:
    """UNIX times (the journal's ``t``) shown as UTC timestamps."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))
    return value


_TIME_KEYS = ("t", "time", "started", "ended", "since", "start_time")


def _humanize(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _when(v) if k in _TIME_KEYS else v for k, v in row.items()}


# ---------------------------------------------------------------- commands


def _status_cell(key: str, value: Any) -> str:
    """A status value; counters by name and percentile blocks as ``k=v`` pairs (unset ones left out)."""
    if key in _TIME_KEYS:
        return _cell(_when(value))
    if isinstance(value, dict) and all(not isinstance(v, dict | list) for v in value.values()):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items() if v is not None) or "-"
    return _cell(value)


async def _status(path: str, as_json: bool) -> int:
    qmp = await _connect(path)
    try:
        status = await _execute(qmp, "query-status")
        vms = await _execute(qmp, "query-vms")
    finally:
        await qmp.disconnect()
    if as_json:
        print_json({"status": status, "vms": vms})
        return 0
    print(f"qreset daemon at {path}")
    if isinstance(status, dict):
        width = max((len(k) for k in status), default=0)
        for key, value in status.items():
            print(f"  {key.ljust(width)}  {_status_cell(key, value)}")
    if not vms:
        print("no VMs")
        return 0
    print()
    rows = [_humanize(v) for v in vms if isinstance(v, dict)]
    for line in table(rows, first=("name", "state", "mode", "qmp", "devices")):
        print(line)
    return 0


async def _history(path: str, vm: str | None, limit: int, as_json: bool) -> int:
    qmp = await _connect(path)
    try:
        arguments: dict[str, object] = {"limit": limit}
        if vm is not None:
            arguments["vm"] = vm
        resets = await _execute(qmp, "query-resets", arguments)
    finally:
        await qmp.disconnect()
    if as_json:
        print_json(resets)
        return 0
    if not resets:
        print("no reset cycles" + (f" for {vm}" if vm else ""))
        return 0
    rows = [_humanize(r) for r in resets if isinstance(r, dict)]
    first = ("t", "time", "vm", "cycle", "phase", "ok", "outcome", "trigger", "duration")
    for line in table(rows, first=first):
        print(line)
    return 0


def format_event(event: Mapping[str, Any]) -> str:
    """One line: UTC time with microseconds, event name, data as key=value."""
    ts = event.get("timestamp")
    when = "-"
    if isinstance(ts, dict) and isinstance(ts.get("seconds"), int):
        micro = ts.get("microseconds", 0)
        micro = micro if isinstance(micro, int) else 0
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts["seconds"])) + f".{micro:06d}Z"
    data = event.get("data")
    parts = [when, str(event.get("event", "?"))]
    if isinstance(data, dict):
        parts += [f"{k}={_cell(v)}" for k, v in data.items()]
    elif data is not None:
        parts.append(_cell(data))
    return " ".join(parts)


async def _events(path: str, as_json: bool) -> int:
    """Print events until SIGINT/SIGTERM (exit 0) or the daemon hangs up (exit 1)."""
    qmp = await _connect(path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def printer() -> None:
        async for event in qmp.events:
            if as_json:
                sys.stdout.write(json.dumps(dict(event), default=str) + "\n")
            else:
                sys.stdout.write(format_event(event) + "\n")
            sys.stdout.flush()

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
        with contextlib.suppress(Exception):
            await qmp.disconnect()
    if stop.is_set():
        return 0
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise _ClientError(f"events: {task.exception()}")
    raise _ClientError(f"the daemon at {path} closed the connection")
