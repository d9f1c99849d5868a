"""
A QMP man-in-the-middle for tests: a real QEMU behind it, chosen replies altered.

Real QEMU never sends a malformed ``query-pci`` or a vfio-pci device whose host
is not a BDF, and it cannot be asked to vanish between two given commands. The
proxy forwards every line both ways unchanged except for the commands a rule
names (matched on ``execute`` and, if the rule gives them, exactly its ``arguments``):

* ``Reply(value)``: answer ``{"return": value}`` itself, QEMU never sees it;
* ``Fail(desc)``: answer a ``GenericError`` with ``desc``;
* ``Cut()``: close the client's connection instead of forwarding it (QEMU is
  gone as far as the daemon can tell; the guest stays in whatever state it is);
* ``Tap(fn)``: call ``fn(msg)`` when the command arrives, then forward it (a
  test looks at the world at that exact moment, or kills the client there).
  A tapped command reaches QEMU even if its client dies right then: the
  proxy keeps QEMU's side open until QEMU answered it (QEMU drops the
  commands it has queued but not yet run when a monitor's connection closes:
  monitor/qmp.c ``monitor_qmp_cleanup_queue_and_resume``).

QEMU's greeting, events and every other reply are QEMU's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Reply:
    value: Any


@dataclass(frozen=True)
class Fail:
    desc: str


@dataclass(frozen=True)
class Cut:
    pass


@dataclass(frozen=True)
class Tap:
    fn: Callable[[dict[str, Any]], None]


@dataclass
class Rule:
    execute: str
    action: Reply | Fail | Cut | Tap
    arguments: dict[str, Any] = field(default_factory=dict)
    times: int | None = None  # None: every time
    hits: int = 0

    def matches(self, msg: dict[str, Any]) -> bool:
        if msg.get("execute") != self.execute or (self.times is not None and self.hits >= self.times):
            return False
        return not self.arguments or (msg.get("arguments") or {}) == self.arguments


class QmpProxy:
    """Listens on ``path``, connects each client to QEMU's QMP socket ``upstream``."""

    def __init__(self, path: Path, upstream: Path, rules: list[Rule] | None = None) -> None:
        self.path = path
        self.upstream = upstream
        self.rules = rules or []
        self.seen: list[str] = []  # every command a client sent, in order
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> QmpProxy:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            qreader, qwriter = await asyncio.open_unix_connection(str(self.upstream))
        except OSError:
            cwriter.close()
            self._conns.discard(task)
            return

        tapped: set[Any] = set()        # ids of tapped commands QEMU has not answered yet
        answered = asyncio.Event()
        client_gone = False

        async def down() -> None:  # QEMU -> client, unchanged
            nonlocal client_gone
            while line := await qreader.readline():
                if tapped:
                    with contextlib.suppress(ValueError):
                        tapped.discard(json.loads(line).get("id"))
                    if not tapped:
                        answered.set()
                if client_gone:
                    continue
                try:
                    cwriter.write(line)
                    await cwriter.drain()
                except ConnectionError:
                    client_gone = True

        async def messages() -> AsyncIterator[tuple[bytes, dict[str, Any]]]:
            # qemu.qmp sends bare JSON objects with no newline: decode as a stream.
            decoder = json.JSONDecoder()
            buf = ""
            while chunk := await creader.read(65536):
                buf += chunk.decode()
                while buf.strip():
                    text = buf.lstrip()
                    try:
                        msg, end = decoder.raw_decode(text)
                    except json.JSONDecodeError:
                        break  # incomplete: read more
                    buf = text[end:]
                    yield text[:end].encode(), msg

        async def up() -> None:  # client -> QEMU, unless a rule answers
            async for line, msg in messages():
                self.seen.append(str(msg.get("execute")))
                rule = next((r for r in self.rules if r.matches(msg)), None)
                if rule is None:
                    qwriter.write(line)
                    await qwriter.drain()
                    continue
                rule.hits += 1
                if isinstance(rule.action, Cut):
                    return
                if isinstance(rule.action, Tap):
                    tapped.add(msg.get("id"))
                    answered.clear()
                    rule.action.fn(msg)
                    qwriter.write(line)
                    await qwriter.drain()
                    continue
                ans: dict[str, Any] = (
                    {"return": rule.action.value} if isinstance(rule.action, Reply)
                    else {"error": {"class": "GenericError", "desc": rule.action.desc}})
                if "id" in msg:
                    ans["id"] = msg["id"]
                cwriter.write(json.dumps(ans).encode() + b"\r\n")
                await cwriter.drain()

        pumps = [asyncio.create_task(down()), asyncio.create_task(up())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if tapped and not pumps[0].done():   # let QEMU answer what was tapped
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered.wait(), 10)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (cwriter, qwriter):
                w.close()
            self._conns.discard(task)
