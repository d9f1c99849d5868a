"""
The TOML schema of a simulated PCI host (``configs/sim/*.toml``), validated with pydantic.

A topology is a flat list of ``[[function]]`` tables; each names its
``parent`` bridge (by ``name``; absent = the root bus) and its ``dev``/``fn``
on that bridge's secondary bus. Bus numbers are *not* written: the simulator
assigns them by depth-first enumeration the way the kernel does
(``pci_scan_child_bus_extend`` in drivers/pci/probe.c), so a file stays valid
when a bridge is added. See configs/sim/README.md for the full format.

Everything here is data and validation; building config-space bytes from it is
:mod:`qreset.pci.sim_config`, running it is :mod:`qreset.pci.sim`. Errors come
out as one :class:`~qreset.errors.ConfigError` naming the file, the key path
(with the function's ``name`` when known) and what was expected.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from qreset.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_size(value: object) -> object:
    """Accept ``4096``, ``"4K"``, ``"16M"``, ``"8GiB"``; pydantic checks the result is an int."""
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None:
            raise ValueError(f"expected a size like 4096, '4K', '16M' or '8G', got {value!r}")
        return int(m[1]) * _UNITS[m[2].upper()]
    return value


def _power_of_two(value: int) -> int:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"expected a power of two, got {value:#x}")
    return value


Size = Annotated[int, BeforeValidator(_parse_size)]

#: Function kinds. The PCIe Device/Port Type each maps to is in sim_config.
FunctionType = Literal[
    "root_port",        # PCIe Root Port (type 4), on the root bus
    "upstream_port",    # PCIe switch upstream port (type 5)
    "downstream_port",  # PCIe switch downstream port (type 6), parent is an upstream_port
    "pcie_pci_bridge",  # PCIe-to-PCI/PCI-X bridge (type 7): secondary bus is conventional PCI
    "pci_bridge",       # conventional PCI-to-PCI bridge (no PCIe capability)
    "endpoint",         # PCIe endpoint (type 0)
    "legacy_endpoint",  # PCIe legacy endpoint (type 1)
    "rc_endpoint",      # root-complex integrated endpoint (type 9), root bus only
    "pci_device",       # conventional PCI device (no PCIe capability, 256-byte config)
]
BRIDGE_TYPES = frozenset({"root_port", "upstream_port", "downstream_port", "pcie_pci_bridge", "pci_bridge"})
CONVENTIONAL_TYPES = frozenset({"pci_bridge", "pci_device"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class BarSpec(_Strict):
    """One Base Address Register. ``index`` defaults to the next free one (a 64-bit BAR uses two)."""

    size: Size
    type: Literal["mem32", "mem64", "io"] = "mem32"
    prefetch: StrictBool = False
    index: int | None = Field(default=None, ge=0, le=5)

    @model_validator(mode="after")
    def _check(self) -> BarSpec:
        _power_of_two(self.size)
        if self.type == "io" and (self.prefetch or self.size < 4 or self.size > 256):
            raise ValueError("an io BAR is 4..256 bytes and never prefetchable")
        if self.type != "io" and self.size < 16:
            raise ValueError("a memory BAR is at least 16 bytes")
        if self.type == "mem32" and self.size > 1 << 31:
            raise ValueError("a 32-bit BAR is at most 2G; use type = 'mem64'")
        return self


class PmSpec(_Strict):
    """Power Management capability. ``no_soft_reset`` = PMCSR No_Soft_Reset (blocks the ``pm`` method)."""

    no_soft_reset: StrictBool = False


class MsiSpec(_Strict):
    vectors: int = Field(default=1, ge=1, le=32)
    addr64: StrictBool = True
    per_vector_mask: StrictBool = False


class MsixSpec(_Strict):
    vectors: int = Field(default=8, ge=1, le=2048)
    bar: int = Field(default=0, ge=0, le=5)
    table_offset: int = Field(default=0, ge=0)
    pba_offset: int | None = None


class AfSpec(_Strict):
    """Advanced Features capability (conventional PCI FLR): ``af_flr`` needs both TP and FLR."""

    flr: StrictBool = True
    tp: StrictBool = True


ACS_BITS = {"sv": 0x01, "tb": 0x02, "rr": 0x04, "cr": 0x08, "uf": 0x10, "ec": 0x20, "dt": 0x40}
AcsBit = Literal["sv", "tb", "rr", "cr", "uf", "ec", "dt"]


class AcsSpec(_Strict):
    """ACS capability: ``cap`` = implemented controls, ``ctrl`` = enabled after boot.

    The kernel enables SV, RR, CR, UF where implemented (``pci_std_enable_acs``
    in drivers/pci/pci.c), which is the default for ``ctrl``; a shorter list
    models firmware or quirks that leave isolation off.
    """

    cap: tuple[AcsBit, ...] = ("sv", "tb", "rr", "cr", "uf")
    ctrl: tuple[AcsBit, ...] | None = None


class SriovSpec(_Strict):
    """SR-IOV on a PF: VFs are generated at Routing ID = PF + offset + stride * i."""

    total_vfs: int = Field(ge=1, le=256)
    num_vfs: int = Field(ge=0, le=256)
    vf_device: int = Field(ge=0, le=0xFFFF)
    offset: int = Field(default=0x80, ge=1, le=0xFFFF)
    stride: int = Field(default=1, ge=1, le=0xFFFF)
    vf_bars: tuple[BarSpec, ...] = ()
    vf_driver: str | None = None
    vf_drivers: tuple[str | None, ...] = ()   # per-VF override of vf_driver, VF0 first
    vf_flr: StrictBool = True
    vf_msix: int = Field(default=3, ge=0, le=2048)
    vf_ready_ms: float = Field(default=10.0, ge=0)
    # What a VF's Vendor/Device ID registers read. The SR-IOV spec (r1.1 sec 3.4.1.1/2)
    # says FFFFh, and the kernel takes them from the PF instead (pci_iov_add_virtfn);
    # "pf" shows the PF's vendor and vf_device there, which most tools assume.
    vf_config_ids: Literal["pf", "ffff"] = "pf"

    @model_validator(mode="after")
    def _check(self) -> SriovSpec:
        if self.num_vfs > self.total_vfs:
            raise ValueError(f"num_vfs {self.num_vfs} > total_vfs {self.total_vfs}")
        return self


class RebarSpec(_Strict):
    """Resizable BAR: ``sizes`` the BAR supports (power-of-two, 1M..128T); current = the BAR's size."""

    bar: int = Field(default=0, ge=0, le=5)
    sizes: tuple[Size, ...]


class SlotSpec(_Strict):
    """The slot a root/downstream port's link goes to (``/sys/bus/pci/slots/NAME``)."""

    name: str = Field(min_length=1)
    hotplug: StrictBool = False


class FunctionSpec(_Strict):
    """One PCI function of the simulated host (see configs/sim/README.md)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    type: FunctionType
    parent: str | None = None
    dev: int | None = Field(default=None, ge=0, le=31)
    fn: int = Field(default=0, ge=0, le=7)
    vendor: int | None = Field(default=None, ge=0, le=0xFFFE)
    device: int | None = Field(default=None, ge=0, le=0xFFFF)
    class_code: int | None = Field(default=None, alias="class", ge=0, le=0xFFFFFF)
    revision: int = Field(default=0, ge=0, le=0xFF)
    subsystem_vendor: int = Field(default=0, ge=0, le=0xFFFF)
    subsystem_device: int = Field(default=0, ge=0, le=0xFFFF)
    bars: tuple[BarSpec, ...] = ()
    rom: Size | None = None
    pm: StrictBool | PmSpec = True
    msi: StrictBool | MsiSpec = False
    msix: StrictBool | MsixSpec = False
    flr: StrictBool = False
    af: StrictBool | AfSpec = False
    aer: StrictBool | None = None
    acs: StrictBool | AcsSpec | None = None
    ltr: StrictBool = False
    rebar: RebarSpec | None = None
    sriov: SriovSpec | None = None
    link_speed: int = Field(default=3, ge=1, le=6)
    driver: str | None = None
    native_driver: str | None = None
    driver_override: str | None = None   # what sysfs driver_override holds (libvirt: "vfio-pci")
    device_specific: StrictBool = False
    ready_ms: float = Field(default=20.0, ge=0)
    slot: SlotSpec | None = None
    #: Whether this bridge has ``reset_subordinate``; None: what ``[host] kernel`` has.
    reset_subordinate: StrictBool | None = None
    iommu_group: int | None = Field(default=None, ge=0)
    interrupt_pin: int = Field(default=1, ge=0, le=4)

    @property
    def is_bridge(self) -> bool:
        return self.type in BRIDGE_TYPES

    @property
    def is_pcie(self) -> bool:
        return self.type not in CONVENTIONAL_TYPES


class HostSpec(_Strict):
    description: str = ""
    domain: int = Field(default=0, ge=0, le=0xFFFF)
    iommu: StrictBool = True
    #: The kernel release the host runs ("6.1.0-28", "6.13"): decides the sysfs
    #: features a bridge has unless the function says (``reset_subordinate``).
    #: None: a kernel without them unless a function says otherwise.
    kernel: str | None = Field(default=None, pattern=r"^[0-9]+\.[0-9]+([.-][0-9A-Za-z.+~-]*)?$")

    def kernel_at_least(self, major: int, minor: int) -> bool:
        if self.kernel is None:
            return False
        parts = re.split(r"[.-]", self.kernel)
        return (int(parts[0]), int(parts[1])) >= (major, minor)


class TopologySpec(_Strict):
    host: HostSpec = HostSpec()
    function: tuple[FunctionSpec, ...] = Field(min_length=1)


# -- semantic checks (pydantic checked the shapes) --------------------------

_PARENT_RULES: dict[str, frozenset[str | None]] = {
    "root_port": frozenset({None}),
    "rc_endpoint": frozenset({None}),
    "upstream_port": frozenset({"root_port", "downstream_port"}),
    "downstream_port": frozenset({"upstream_port"}),
    "pcie_pci_bridge": frozenset({None, "root_port", "downstream_port"}),
    "pci_bridge": frozenset({None, "pcie_pci_bridge", "pci_bridge"}),
    "endpoint": frozenset({None, "root_port", "downstream_port"}),
    "legacy_endpoint": frozenset({None, "root_port", "downstream_port"}),
    "pci_device": frozenset({None, "pcie_pci_bridge", "pci_bridge"}),
}


def _where(fn_index: int, spec: FunctionSpec | None, key: str = "") -> str:
    who = f"function[{fn_index}]" if spec is None else f"function[{fn_index}] ({spec.name!r})"
    return f"{who}.{key}" if key else who


def _check_semantics(top: TopologySpec) -> None:
    """Raise ValueError('key: why') for what the schema alone cannot see."""
    by_name: dict[str, tuple[int, FunctionSpec]] = {}
    for i, f in enumerate(top.function):
        if f.name in by_name:
            first = by_name[f.name][0]
            raise ValueError(f"{_where(i, f, 'name')}: duplicate name (first at function[{first}])")
        by_name[f.name] = (i, f)
    seen_at: dict[tuple[str | None, int, int], str] = {}
    for i, f in enumerate(top.function):
        parent_type: str | None = None
        if f.parent is not None:
            if f.parent not in by_name:
                raise ValueError(f"{_where(i, f, 'parent')}: no function is named {f.parent!r}")
            parent = by_name[f.parent][1]
            if not parent.is_bridge:
                raise ValueError(f"{_where(i, f, 'parent')}: {f.parent!r} is a {parent.type}, not a bridge")
            parent_type = parent.type
        allowed = _PARENT_RULES[f.type]
        if parent_type not in allowed:
            where = "the root bus" if parent_type is None else f"a {parent_type}"
            want = ", ".join(sorted("the root bus" if a is None else a for a in allowed))
            raise ValueError(f"{_where(i, f, 'parent')}: a {f.type} cannot sit on {where} (expected: {want})")
        if f.parent is None and f.dev is None:
            raise ValueError(f"{_where(i, f, 'dev')}: required for a function on the root bus")
        dev = f.dev or 0
        if parent_type in ("root_port", "downstream_port") and dev != 0:
            raise ValueError(f"{_where(i, f, 'dev')}: below a PCIe port only device 0 exists (got {dev})")
        key = (f.parent, dev, f.fn)
        if key in seen_at:
            raise ValueError(f"{_where(i, f, 'fn')}: {dev:02x}.{f.fn} is already used by {seen_at[key]!r}")
        seen_at[key] = f.name
        if not f.is_bridge and (f.vendor is None or f.device is None or f.class_code is None):
            raise ValueError(f"{_where(i, f)}: an endpoint needs vendor, device and class")
        if f.slot is not None and f.type not in ("root_port", "downstream_port"):
            raise ValueError(f"{_where(i, f, 'slot')}: only root and downstream ports have slots")
        if f.reset_subordinate and not f.is_bridge:
            raise ValueError(f"{_where(i, f, 'reset_subordinate')}: only bridges have reset_subordinate")
        if f.sriov is not None and f.type != "endpoint":
            raise ValueError(f"{_where(i, f, 'sriov')}: only PCIe endpoints are SR-IOV PFs")
        if not f.is_pcie:
            for cap in ("flr", "aer", "acs", "ltr", "rebar", "sriov", "msix"):
                if getattr(f, cap):
                    raise ValueError(f"{_where(i, f, cap)}: a conventional PCI function has no {cap}")
        nbars = 2 if f.is_bridge else 6
        used: set[int] = set()
        nxt = 0
        for j, bar in enumerate(f.bars):
            idx = nxt if bar.index is None else bar.index
            width = 2 if bar.type == "mem64" else 1
            if idx + width > nbars or used & {idx, idx + width - 1}:
                what = f"BAR{idx} (64-bit: two slots)" if width == 2 else f"BAR{idx}"
                raise ValueError(f"{_where(i, f, f'bars[{j}]')}: {what} overlaps another BAR "
                                 f"or is past BAR{nbars - 1}")
            used |= {idx, idx + width - 1}
            nxt = idx + width
        if f.rebar is not None:
            for s in f.rebar.sizes:
                if s < 1 << 20 or s & (s - 1):
                    raise ValueError(f"{_where(i, f, 'rebar.sizes')}: {s:#x} is not a power of two >= 1M")
    # multifunction devices need function 0 (the kernel scans fn 0 first: pci_scan_slot)
    for (par, devno, fnno), fname in seen_at.items():
        if fnno != 0 and (par, devno, 0) not in seen_at:
            idx, spec = by_name[fname]
            raise ValueError(f"{_where(idx, spec, 'fn')}: device {devno:02x} has function {fnno} "
                             "but no function 0")


# Union-member tags pydantic puts in error locations (not keys of the file).
_TAGS = frozenset({"bool", "int", "str", "float", "tuple", "list", "none"})


def _strip(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    return tuple(k for k in loc if not (isinstance(k, str) and (k[:1].isupper() or k in _TAGS)))


def load_topology(data: dict[str, Any], where: str) -> TopologySpec:
    """Validate ``data``; raise ConfigError('<where>:<key>', what was expected)."""
    try:
        top = TopologySpec.model_validate(data)
    except ValidationError as exc:
        # With unions (``pm = true`` or a table) pydantic reports one error per member;
        # the one that got deepest into the input says what is actually wrong.
        errors = exc.errors()
        err = max(errors, key=lambda e: len(e["loc"]))
        loc = _strip(err["loc"])
        others = {_strip(e["loc"]) for e in errors} - {loc}
        others = {o for o in others if loc[:len(o)] != o}  # a union's shallower alternatives
        parts: list[str] = []
        for k in loc:
            if isinstance(k, int):
                parts[-1:] = [f"{parts[-1]}[{k}]"] if parts else [f"[{k}]"]
            else:
                parts.append(str(k))
        key = ".".join(parts)
        # Name the function when the error is inside one.
        if len(loc) >= 2 and loc[0] == "function" and isinstance(loc[1], int):
            funcs = data.get("function")
            if isinstance(funcs, list) and loc[1] < len(funcs) and isinstance(funcs[loc[1]], dict):
                name = funcs[loc[1]].get("name")
                if isinstance(name, str):
                    key = key.replace(f"function[{loc[1]}]", f"function[{loc[1]}] ({name!r})", 1)
        more = f" (+{len(others)} more)" if others else ""
        msg = err["msg"]
        if err["type"] == "bool_type" and any(_strip(e["loc"]) == loc and e is not err for e in errors):
            msg = "expected true, false or a table of options"
        raise ConfigError(f"{where}:{key}", f"{msg}{more}") from None
    try:
        _check_semantics(top)
    except ValueError as exc:
        key, _, why = str(exc).partition(": ")
        raise ConfigError(f"{where}:{key}", why) from None
    return top


def read_topology(path: Path) -> TopologySpec:
    """Read and validate a TOML topology file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(str(path), exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return load_topology(data, str(path))
