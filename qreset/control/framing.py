"""
QMP framing: the byte stream in, JSON texts out; messages in, bytes out.

QMP messages are JSON objects sent back to back (QEMU
``docs/interop/qmp-spec.rst``). Newlines are a convention, not the
delimiter: QEMU's ``qobject/json-streamer.c`` counts brackets, and so does
:class:`Framer`. Decoding is strict (no NaN/Infinity, no duplicate keys, as
``qobject/json-parser.c``), and every failure becomes a
:class:`RequestError`: the one error type a request can produce, which the
server turns into ``{"error": {"class": ..., "desc": ...}}``.

Nothing here does I/O or knows a command: the server feeds bytes in and
writes what :func:`encode` returns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "Framer",
    "RequestError",
    "decode",
    "encode",
    "error_reply",
    "greeting",
    "one_line",
    "parse_request",
    "printable",
]

_WHITESPACE = frozenset(b" \t\r\n")


class RequestError(Exception):
    """A request-level failure: becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        desc = one_line(desc)
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class Framer:
    """
    Splits the incoming byte stream into JSON texts.

    A text starting with ``{`` or ``[`` ends where its brackets balance
    (outside strings); anything else is a stray token that ends at
    whitespace or at the next ``{``/``[``, and is reported as malformed by
    the decoder. Scanning state is kept across reads so a large message is
    scanned once, not once per chunk; :attr:`pending` lets the caller bound
    a text that never ends.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = -1  # start of the current text, -1 between texts
        self._depth = 0  # 0 with _start >= 0: a stray scalar token
        self._in_str = False
        self._esc = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the complete texts now available (possibly none)."""
        self.buf += data
        out: list[bytes] = []
        buf = self.buf
        i = self._pos
        n = len(buf)
        while i < n:
            b = buf[i]
            if self._start < 0:
                if b in _WHITESPACE:
                    i += 1
                    continue
                self._start = i
                self._depth = 1 if b in b"{[" else 0
                i += 1
                continue
            if self._depth == 0:  # stray token
                if b in _WHITESPACE or b in b"{[":
                    out.append(bytes(buf[self._start:i]))
                    self._start = -1
                    continue  # re-examine b as the start of the next text
                i += 1
                continue
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif b == 0x5C:  # backslash
                    self._esc = True
                elif b == 0x22:  # quote
                    self._in_str = False
            elif b == 0x22:
                self._in_str = True
            elif b in b"{[":
                self._depth += 1
            elif b in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[self._start:i + 1]))
                    self._start = -1
            i += 1
        # Drop consumed bytes so the buffer only holds the pending text.
        cut = self._start if self._start >= 0 else i
        del buf[:cut]
        self._pos = i - cut
        self._start = min(0, self._start)
        return out

    def flush(self) -> bytes:
        """At EOF: the pending stray token, if any (an unterminated object is dropped)."""
        if self._start >= 0 and self._depth == 0:
            return bytes(self.buf[self._start:])
        return b""

    @property
    def pending(self) -> int:
        """Bytes of the incomplete text waiting for more input."""
        return len(self.buf) if self._start >= 0 else 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # QEMU's json-parser.c: "Duplicate key"
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def decode(text: bytes) -> Any:
    """Strict JSON (no NaN/Infinity, no duplicate keys); raises :class:`RequestError`."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise RequestError(f"JSON parse error, {exc.msg} (byte {exc.pos})") from None
    except UnicodeDecodeError:
        raise RequestError("JSON parse error, invalid UTF-8") from None
    except RecursionError:
        raise RequestError("JSON parse error, nesting too deep") from None
    except ValueError as exc:
        raise RequestError(f"JSON parse error, {exc}") from None


def encode(msg: Mapping[str, Any]) -> bytes:
    """One message as sent: compact ASCII JSON and a newline (raises TypeError/ValueError if not JSON)."""
    return json.dumps(msg, default=str, allow_nan=False, ensure_ascii=True).encode() + b"\n"


def error_reply(desc: str, error_class: str = "GenericError", msg_id: Any = None, *,
                has_id: bool = False) -> dict[str, Any]:
    """A QMP error message; ``id`` only when the request had one (qmp-spec.rst, 2.4.2)."""
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        reply["id"] = msg_id
    return reply


def greeting(version: tuple[int, ...], package: str) -> dict[str, Any]:
    """
    The server's first message. The "qemu" triple is what a QMP client parses
    as the server version; we put ours there and name the program in
    "package", as QEMU puts its distribution package name there.
    """
    major, minor, micro = (*version, 0, 0, 0)[:3]
    return {
        "QMP": {
            "version": {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package},
            "capabilities": [],
        }
    }


def parse_request(request: object) -> tuple[str, dict[str, Any]]:
    """
    A decoded request's command and arguments, the envelope checked as
    ``qapi/qmp-dispatch.c`` checks it (same messages). The caller takes ``id``.
    """
    if not isinstance(request, dict):
        raise RequestError("QMP input must be a JSON object")
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise RequestError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise RequestError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise RequestError(f"QMP input member '{printable(key)}' is unexpected")
    if "execute" not in request:
        raise RequestError("QMP input lacks member 'execute'")
    return request["execute"], request.get("arguments", {})


def printable(name: str, limit: int = 64) -> str:
    """A client-supplied name made safe for a one-line message: escaped, shortened."""
    shown = name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."


def one_line(text: str) -> str:
    """Whitespace (newlines included) folded to single spaces; never empty."""
    line = " ".join(text.split())
    return line or "unknown error"
