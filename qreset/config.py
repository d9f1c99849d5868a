"""
The daemon's configuration file (``/etc/qreset/qreset.toml``).

Parsed with :mod:`tomllib` and validated with pydantic v2 models that forbid
unknown keys, because a misspelt key in a file that decides which PCI
functions get reset must not be silently ignored. Every problem becomes one
:class:`~qreset.errors.ConfigError` whose message is a single line naming the
file, the key path (``vm.web1.device[0].host``: a VM is named by its name,
or ``vm[3]`` when it has no valid one) and what was expected, e.g.::

    /etc/qreset/qreset.toml: vm.web1.mode: expected 'park' or 'stop-on-reset', got 'pause'

Numbers are strict (TOML's ``true`` is not 1 s) and bounded; paths are
non-empty; the file itself must be a regular file of at most 1 MiB (never a
FIFO read forever) and nesting that exhausts tomllib's recursion is one line
too. What depends on the machine (the paths' kinds and clashes, the host's
functions) is checked by :mod:`qreset.preflight`, which ``qreset run`` calls
before it creates anything.

Relative paths in the file (QMP sockets, the journal, the simulated topology)
are relative to the directory of the file itself, so a config and the files
it names can move together (the demo and the tests rely on this).

See ``configs/qreset.toml`` for a commented example.
"""

from __future__ import annotations

import enum
import os
import re
import stat
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qreset.errors import AddressError, ConfigError
from qreset.pci.address import PciAddress

DEFAULT_CONFIG = Path("/etc/qreset/qreset.toml")
DEFAULT_CONTROL_SOCKET = Path("/run/qreset/qreset.sock")
DEFAULT_JOURNAL = Path("/var/lib/qreset/journal.jsonl")


class Mode(enum.StrEnum):
    """How a VM's guest resets are caught (see :mod:`qreset.vm`)."""

    #: ``set-action reboot=shutdown,shutdown=pause``: the guest is parked *before*
    #: QEMU's own system reset runs; qreset finishes the reset afterwards.
    PARK = "park"
    #: On the ``RESET`` event, ``stop`` at once (for hosts where libvirt owns
    #: the SHUTDOWN semantics): the guest ran briefly after QEMU's reset.
    STOP_ON_RESET = "stop-on-reset"


class OnIdentityChange(enum.StrEnum):
    """What to do with a VM whose device came back as a different device."""

    STOP = "stop"      # leave the VM stopped, reason in the journal and an event
    RESUME = "resume"  # resume anyway (QEMU keeps its stale view of the device)


class TakeoverChoice(enum.StrEnum):
    GAPS = "gaps"
    ALL = "all"


def _parse_bdf(value: object) -> PciAddress:
    if isinstance(value, PciAddress):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a PCI address string like '0000:01:00.0', got {_short(value)}")
    try:
        return PciAddress.parse(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


#: PATH_MAX, the longest path the kernel takes, with its NUL (include/uapi/linux/limits.h).
PATH_MAX = 4096


def _parse_path(value: object) -> Path:
    """A path key: a non-empty string the kernel can take (``Path("")`` would mean ".")."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a path string, got {_short(value)}")
    if not value:
        raise ValueError("empty path")
    if "\0" in value:
        raise ValueError(f"path contains a NUL character: {_short(value)}")
    if len(value.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise ValueError(f"path longer than {PATH_MAX - 1} bytes")
    return Path(value)


Bdf = Annotated[PciAddress, pydantic.BeforeValidator(_parse_bdf)]
FsPath = Annotated[Path, pydantic.BeforeValidator(_parse_path)]
#: Numbers are strict: TOML's ``true`` is not 1 s (pydantic's lax mode would say it is).
#: Our bound: a day; a longer timeout or backoff is a typo, and asyncio takes any finite one.
Seconds = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False, strict=True)]
#: What a VM name may be (it appears in keys, log lines, task names and file names).
VM_NAME_PATTERN = r"^[A-Za-z0-9_.:+-]{1,64}$"
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=VM_NAME_PATTERN, strict=True)]


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line quotes input, never a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class DaemonSection(_Model):
    #: Unix socket of the control server (``qreset status`` etc.); "" disables it.
    control_socket: FsPath | None = DEFAULT_CONTROL_SOCKET
    #: Append-only JSON-lines journal of every cycle (read back at start).
    journal: FsPath = DEFAULT_JOURNAL
    #: Size past which the journal is rotated: start-up reads at most about this much.
    journal_segment_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, strict=True)
    #: Rotated journal segments kept (JOURNAL.1 ... JOURNAL.N): how far ``qreset history`` reaches.
    journal_segments: int = Field(default=8, ge=1, le=1000, strict=True)
    #: Root of the sysfs tree to use for the real host (tests use a fake one).
    sysfs_root: FsPath = Path("/sys")

    @field_validator("control_socket", mode="before")
    @classmethod
    def _empty_disables(cls, value: object) -> object:
        return None if value == "" else value


class SimSection(_Model):
    #: A simulated PCI host topology (configs/sim/*.toml) instead of sysfs.
    topology: FsPath
    #: Our bound: 1000x slower than real time is already a debugging aid, nothing more.
    time_scale: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False, strict=True)] = 1.0


class PolicySection(_Model):
    mode: Mode = Mode.PARK
    takeover: TakeoverChoice = TakeoverChoice.ALL
    on_identity_change: OnIdentityChange = OnIdentityChange.STOP
    #: Functions of other VMs / host drivers a reset may hit anyway (explicit consent).
    allow: tuple[Bdf, ...] = ()
    #: How long a function may take to answer after a reset (kernel: PCIE_RESET_READY_POLL_MS, 60 s).
    poll_timeout: Seconds = 60.0
    #: Upper bound on one whole cycle's engine run; past it the VM is resumed and the cycle failed.
    cycle_timeout: Seconds = 120.0
    #: Cap of the jittered reconnect backoff to a VM's QMP socket.
    connect_backoff_max: Seconds = 30.0


class MetricsSection(_Model):
    """Prometheus text of the daemon's counters (needs the ``metrics`` extra; see qreset.metrics)."""

    #: ``"unix:/run/qreset/metrics.sock"`` or a loopback ``"127.0.0.1:9477"``; unset: not served.
    listen: Annotated[str, Field(strict=True)] | None = None

    @field_validator("listen")
    @classmethod
    def _loopback_or_unix(cls, value: str | None) -> str | None:
        if value is not None:
            from qreset.metrics import parse_listen

            try:
                parse_listen(value)
            except ConfigError as exc:
                raise ValueError(exc.why) from None
        return value


class DeviceEntry(_Model):
    """A device of a VM that QMP cannot tell us (not a vfio-pci device in QEMU's view)."""

    host: Bdf


class VmSection(_Model):
    name: Name
    qmp: FsPath
    mode: Mode | None = None
    device: tuple[DeviceEntry, ...] = ()

    @property
    def devices(self) -> tuple[PciAddress, ...]:
        return tuple(d.host for d in self.device)


class Config(_Model):
    daemon: DaemonSection = DaemonSection()
    sim: SimSection | None = None
    policy: PolicySection = PolicySection()
    metrics: MetricsSection = MetricsSection()
    vm: tuple[VmSection, ...] = ()
    #: Where the file was read from (not a TOML key; set by :func:`load_config`).
    source: str = Field(default="<built-in>", exclude=True)

    @model_validator(mode="after")
    def _unique(self) -> Config:
        """Names and devices once each (paths are compared resolved, in :mod:`qreset.preflight`)."""
        seen: dict[str, int] = {}
        owner: dict[PciAddress, str] = {}
        for i, vm in enumerate(self.vm):
            if vm.name in seen:
                raise _KeyedError(f"vm[{i}].name",
                                  f"duplicate VM name {vm.name!r} (also vm[{seen[vm.name]}])")
            seen[vm.name] = i
            for j, dev in enumerate(vm.device):
                if owner.get(dev.host) == vm.name:
                    raise _KeyedError(f"vm.{vm.name}.device[{j}].host", f"{dev.host} is listed twice")
                if dev.host in owner:
                    raise _KeyedError(f"vm.{vm.name}.device[{j}].host",
                                      f"{dev.host} is already assigned to VM {owner[dev.host]!r}")
                owner[dev.host] = vm.name
        allowed: set[PciAddress] = set()
        for k, addr in enumerate(self.policy.allow):
            if addr in allowed:
                raise _KeyedError(f"policy.allow[{k}]", f"{addr} is listed twice")
            allowed.add(addr)
        return self

    def mode_of(self, vm: VmSection) -> Mode:
        return vm.mode or self.policy.mode


class _KeyedError(ValueError):
    """A cross-field error that knows its key path (raised inside validators)."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_VM_NAME = re.compile(VM_NAME_PATTERN)


def _vm_names(data: dict[str, Any]) -> dict[int, str]:
    """Index → name of the ``[[vm]]`` entries whose name can stand for them in a key."""
    entries = data.get("vm")
    if not isinstance(entries, list):
        return {}
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    return {i: n for i, n in enumerate(names)
            if isinstance(n, str) and _VM_NAME.match(n) and names.count(n) == 1}


def _loc(loc: Sequence[int | str], vm_names: dict[int, str]) -> str:
    """A pydantic location as a key path: ``vm.web1.device[0].host`` (``vm[3]`` when unnamed).

    A key that is not a short plain word is quoted with repr() and cut, so a
    key holding a newline cannot break the one-line message, nor a 100 KB key
    make it 100 KB.
    """
    out = ""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "vm" and isinstance(parts[1], int) and parts[1] in vm_names:
        out, parts = f"vm.{vm_names[parts[1]]}", parts[2:]
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            plain = _PLAIN_KEY.match(part) and len(part) <= 60
            out += ("." if out else "") + (part if plain else _short(part))
    return out or "(top level)"


def _describe(err: Any) -> str:
    """One pydantic error → 'expected …, got …' in words an operator reads."""
    kind = err.get("type", "")
    given = _short(err.get("input"))
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see configs/qreset.toml)"
    if kind == "missing":
        return "required key is missing"
    if kind == "enum":
        expected = err.get("ctx", {}).get("expected", "")
        return f"expected {expected}, got {given}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{msg[0].lower()}{msg[1:]}, got {given}" if msg else f"invalid value {given}"


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path)


def parse_config(data: dict[str, Any], source: str, base: Path | None = None) -> Config:
    """Validate already-parsed TOML ``data``; ``source`` names the file in errors."""
    if "source" in data:
        raise ConfigError(f"{source}: source", "unknown key (check the spelling; see configs/qreset.toml)")
    try:
        cfg = Config.model_validate({**data, "source": source})
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        # A misspelt key also makes the right one "missing": name the cause, the spelling.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        ctx_err = first.get("ctx", {}).get("error")
        if isinstance(ctx_err, _KeyedError):
            raise ConfigError(f"{source}: {ctx_err.key}", ctx_err.why) from None
        raise ConfigError(f"{source}: {_loc(first['loc'], _vm_names(data))}", _describe(first)) from None
    if base is None:
        return cfg
    # Relative paths are relative to the config file's directory.
    daemon = cfg.daemon.model_copy(update={
        "journal": _resolve(base, cfg.daemon.journal),
        "control_socket": None if cfg.daemon.control_socket is None
        else _resolve(base, cfg.daemon.control_socket),
        "sysfs_root": _resolve(base, cfg.daemon.sysfs_root),
    })
    sim = None if cfg.sim is None else cfg.sim.model_copy(
        update={"topology": _resolve(base, cfg.sim.topology)})
    vms = tuple(vm.model_copy(update={"qmp": _resolve(base, vm.qmp)}) for vm in cfg.vm)
    return cfg.model_copy(update={"daemon": daemon, "sim": sim, "vm": vms})


#: A configuration is a few KB; past this it is not one (and tomllib would take seconds).
MAX_CONFIG_BYTES = 1 << 20


def read_file(path: Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, or ConfigError naming it.

    Opened non-blocking and checked with fstat before reading: a FIFO or a
    device given as the file must be refused, not read forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(str(path), "not a regular file")
        if st.st_size > limit:
            raise ConfigError(str(path), f"file too large ({st.st_size} bytes, at most {limit})")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def parse_toml(raw: bytes, where: str) -> dict[str, Any]:
    """TOML ``raw`` as a dict, or ConfigError naming ``where`` (never a traceback)."""
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, f"not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: "x = [[[[…" of
        # a few KB exhausts the interpreter's stack.
        raise ConfigError(where, "not valid TOML: arrays or tables nested too deeply") from None


def load_config(path: Path) -> Config:
    """Read and validate ``path``. Raises :class:`ConfigError` (one line) on any problem.

    This checks the file alone; :func:`qreset.preflight.validate` also checks
    it against the machine (paths, the host's functions) and is what
    ``qreset run`` calls before it creates anything.
    """
    data = parse_toml(read_file(path), str(path))
    return parse_config(data, str(path), base=path.resolve().parent)
