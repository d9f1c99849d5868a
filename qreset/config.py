"""
The daemon's configuration file (``/etc/qreset/qreset.toml``).

Parsed with :mod:`tomllib` and validated with pydantic v2 models that forbid
unknown keys, because a misspelt key in a file that decides which PCI
functions get reset must not be silently ignored. Every problem becomes one
:class:`~qreset.errors.ConfigError` whose message is a single line naming the
file, the key path (``vm[1].device[0].host``) and what was expected, e.g.::

    /etc/qreset/qreset.toml: vm[0].mode: expected 'park' or 'stop-on-reset', got 'pause'

Relative paths in the file (QMP sockets, the journal, the simulated topology)
are relative to the directory of the file itself, so a config and the files
it names can move together (the demo and the tests rely on this).

See ``configs/qreset.toml`` for a commented example.
"""

from __future__ import annotations

import enum
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
        raise ValueError(f"expected a PCI address string like '0000:01:00.0', got {value!r}")
    try:
        return PciAddress.parse(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


Bdf = Annotated[PciAddress, pydantic.BeforeValidator(_parse_bdf)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class DaemonSection(_Model):
    #: Unix socket of the control server (``qreset status`` etc.); "" disables it.
    control_socket: Path | None = DEFAULT_CONTROL_SOCKET
    #: Append-only JSON-lines journal of every cycle (read back at start).
    journal: Path = DEFAULT_JOURNAL
    #: Root of the sysfs tree to use for the real host (tests use a fake one).
    sysfs_root: Path = Path("/sys")

    @field_validator("control_socket", mode="before")
    @classmethod
    def _empty_disables(cls, value: object) -> object:
        return None if value == "" else value


class SimSection(_Model):
    #: A simulated PCI host topology (configs/sim/*.toml) instead of sysfs.
    topology: Path
    time_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0


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
    listen: str | None = None

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
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:+-]+$")]
    qmp: Path
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
        seen: dict[str, int] = {}
        sockets: dict[Path, int] = {}
        owner: dict[PciAddress, str] = {}
        for i, vm in enumerate(self.vm):
            if vm.name in seen:
                raise _KeyedError(f"vm[{i}].name",
                                  f"duplicate VM name {vm.name!r} (also vm[{seen[vm.name]}])")
            seen[vm.name] = i
            if vm.qmp in sockets:
                raise _KeyedError(f"vm[{i}].qmp",
                                  f"QMP socket {str(vm.qmp)!r} already used by vm[{sockets[vm.qmp]}]")
            sockets[vm.qmp] = i
            for j, dev in enumerate(vm.device):
                if dev.host in owner:
                    raise _KeyedError(
                        f"vm[{i}].device[{j}].host",
                        f"{dev.host} is already assigned to VM {owner[dev.host]!r}",
                    )
                owner[dev.host] = vm.name
        return self

    def mode_of(self, vm: VmSection) -> Mode:
        return vm.mode or self.policy.mode


class _KeyedError(ValueError):
    """A cross-field error that knows its key path (raised inside validators)."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _describe(err: Any) -> str:
    """One pydantic error → 'expected …, got …' in words an operator reads."""
    kind = err.get("type", "")
    given = err.get("input")
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see configs/qreset.toml)"
    if kind == "missing":
        return "required key is missing"
    if kind == "enum":
        expected = err.get("ctx", {}).get("expected", "")
        return f"expected {expected}, got {given!r}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{msg[0].lower()}{msg[1:]}, got {given!r}" if msg else f"invalid value {given!r}"


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path)


def parse_config(data: dict[str, Any], source: str, base: Path | None = None) -> Config:
    """Validate already-parsed TOML ``data``; ``source`` names the file in errors."""
    try:
        cfg = Config.model_validate({**data, "source": source} if "source" not in data else data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        ctx_err = first.get("ctx", {}).get("error")
        if isinstance(ctx_err, _KeyedError):
            raise ConfigError(f"{source}: {ctx_err.key}", ctx_err.why) from None
        raise ConfigError(f"{source}: {_loc(first['loc'])}", _describe(first)) from None
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


def load_config(path: Path) -> Config:
    """Read and validate ``path``. Raises :class:`ConfigError` (one line) on any problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    if "source" in data:
        raise ConfigError(f"{path}: source", "unknown key (check the spelling; see configs/qreset.toml)")
    return parse_config(data, str(path), base=path.resolve().parent)
