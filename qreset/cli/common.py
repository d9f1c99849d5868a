"""Options and helpers shared by the subcommands (host selection, JSON output, errors)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qreset.pci.host import PciHost

if TYPE_CHECKING:
    from qreset.pci.address import PciAddress
    from qreset.plan import Policy
    from qreset.topology import Topology


def add_host_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sysfs-root DIR`` / ``--sim FILE`` (mutually exclusive; default: real /sys)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--sysfs-root", metavar="DIR", type=Path, default=None,
        help="read the PCI host from this sysfs tree (default: /sys)",
    )
    group.add_argument(
        "--sim", metavar="FILE", type=Path, default=None,
        help="use a simulated PCI host described by this TOML topology (see configs/sim/)",
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def open_host(args: argparse.Namespace, time_scale: float = 1.0) -> PciHost:
    """The host the options name. Raises QResetError (ConfigError/HostError) on bad input."""
    if getattr(args, "sim", None) is not None:
        from qreset.pci.sim import SimHost

        return SimHost.from_toml(args.sim, time_scale=time_scale)
    from qreset.pci.sysfs import SysfsHost

    return SysfsHost(args.sysfs_root or Path("/sys"))


def print_json(obj: Any) -> None:
    print_text(json.dumps(obj, indent=2, sort_keys=False, default=str))


def print_text(text: str) -> None:
    """Write ``text`` and a newline to stdout; a reader that went away (``| head``) is not an error.

    Python's recipe for SIGPIPE-less programs: point stdout at /dev/null so the
    interpreter's final flush does not raise again.
    """
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def fail(message: str, code: int = 2) -> int:
    """One line on stderr, prefixed like every qreset error; returns ``code``."""
    print(f"qreset: {message}", file=sys.stderr)
    return code


def host_argument_error(args: argparse.Namespace) -> str | None:
    """A one-line complaint about ``--sim``/``--sysfs-root`` when they name nothing usable.

    Checked before opening the host so a typo is a bad-argument error (exit 2)
    naming the path, not a failure deep inside loading.
    """
    sim = getattr(args, "sim", None)
    if sim is not None and not Path(sim).is_file():
        return f"--sim {sim}: no such file"
    root = getattr(args, "sysfs_root", None)
    if root is not None and not Path(root).is_dir():
        return f"--sysfs-root {root}: no such directory"
    return None


def unknown_functions(topo: Topology, addresses: Iterable[PciAddress]) -> str | None:
    """A one-line complaint naming the ``addresses`` ``topo`` does not have, or None."""
    unknown = [str(a) for a in addresses if a not in topo.functions]
    if not unknown:
        return None
    return f"no such PCI function on {topo.host_name}: {', '.join(unknown)}"


class HostUnreadable(Exception):
    """Reading the host for a read-only command failed; ``code`` is the exit status it means."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def read_topology(args: argparse.Namespace) -> Topology:
    """:func:`load_topology` for the read-only commands (``topology``, ``doctor``).

    A bad ``--sim`` file is bad input (exit 2), a host that cannot be read a
    failed inspection (exit 1): raises :class:`HostUnreadable` with that code.
    """
    import asyncio

    from qreset.errors import ConfigError, QResetError

    try:
        return asyncio.run(load_topology(args))
    except ConfigError as exc:
        raise HostUnreadable(str(exc), 2) from None
    except QResetError as exc:
        raise HostUnreadable(str(exc), 1) from None


async def load_topology(args: argparse.Namespace, time_scale: float = 1.0) -> Topology:
    """Open the host the options name, load its :class:`~qreset.topology.Topology`, close it."""
    from qreset.topology import Topology

    host = open_host(args, time_scale)
    try:
        return await Topology.load(host)
    finally:
        await host.close()


# -- the arguments `qreset plan` and `qreset reset` share ---------------------------


class BadArguments(ValueError):
    """A command-line argument that does not parse; the message quotes it."""


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The functions to plan for, whose they are, and the policy (``plan``, ``reset``)."""
    parser.add_argument("functions", nargs="+", metavar="BDF", help="functions of one VM")
    parser.add_argument("--vm", default="cli", help="name of the VM the functions belong to (default: cli)")
    parser.add_argument("--policy", choices=("all", "gaps"), default="all",
                        help="all: reset everything ourselves; gaps: only what QEMU's reset cannot")
    parser.add_argument("--allow", nargs="+", action="extend", default=[], metavar="BDF",
                        help="functions of other VMs or host drivers a reset may hit anyway")
    parser.add_argument("--other", action="append", default=[], metavar="VM=BDF,BDF",
                        help="functions held by another VM (repeatable)")
    parser.add_argument("--vfio-ioctl-ok", action="store_true",
                        help="the VFIO groups are idle: VFIO hot reset may be planned")
    parser.add_argument(
        "--bus-method", action="append", default=[], metavar="METHOD",
        choices=("bus", "reset_subordinate", "vfio_hot_reset", "user_sbr"),
        help="allowed method for slot/bus domains, repeatable, in preference order "
             "(default: bus, reset_subordinate, vfio_hot_reset, user_sbr)",
    )


def policy_from_arguments(args: argparse.Namespace, allow: frozenset[PciAddress]) -> Policy:
    """The :class:`~qreset.plan.Policy` the planning options describe."""
    from qreset.plan import Method, Policy, Takeover

    extra: dict[str, Any] = {}
    if args.bus_method:
        extra["bus_methods"] = tuple(dict.fromkeys(Method(m) for m in args.bus_method))
    if getattr(args, "pm_last", False):
        extra["pm_suffices"] = False
    return Policy(takeover=Takeover(args.policy), allow=allow, vfio_ioctl_ok=args.vfio_ioctl_ok, **extra)


def parse_plan_arguments(
    args: argparse.Namespace,
) -> tuple[list[PciAddress], frozenset[PciAddress], dict[str, list[PciAddress]]]:
    """``(functions, allow, other VMs)`` from :func:`add_plan_arguments`' options.

    Raises :class:`BadArguments` naming the option and quoting the value.
    """
    from qreset.errors import AddressError
    from qreset.pci.address import PciAddress

    try:
        mine = [PciAddress.parse(b) for b in args.functions]
        allow = frozenset(PciAddress.parse(b) for b in args.allow)
    except AddressError as exc:
        raise BadArguments(str(exc)) from None
    verb = {"plan": "planned"}.get(args.command, args.command)
    others: dict[str, list[PciAddress]] = {}
    for item in args.other:
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise BadArguments(f"--other {item!r}: expected VM=BDF[,BDF...]")
        if name == args.vm:
            raise BadArguments(f"--other {item!r}: {name} is the VM being {verb} (--vm)")
        try:
            others.setdefault(name, []).extend(PciAddress.parse(b) for b in rest.split(",") if b.strip())
        except AddressError as exc:
            raise BadArguments(f"--other {item!r}: {exc}") from None
    clash = sorted(set(mine) & {a for v in others.values() for a in v})
    if clash:
        raise BadArguments(f"{', '.join(map(str, clash))} listed both for {args.vm} and in --other")
    return mine, allow, others
