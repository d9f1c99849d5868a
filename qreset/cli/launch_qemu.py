"""
QEMU's command line as ``qreset launch`` reads and extends it. Pure, no I/O.

QEMU accepts ``-opt V``, ``--opt V`` and ``-opt=V``, and ``key=value,...``
option strings where ``,,`` is a literal comma (``qemu_opts_parse`` in
util/qemu-option.c); these helpers read just what launch needs (the assigned
vfio-pci devices, the guest name, ``-S``) and build the monitor options it adds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["exit_code", "has_flag", "monitor_args", "qemu_name", "vfio_devices"]


def _opts(value: str) -> dict[str, str]:
    """QEMU's ``key=value,...`` option string (``,,`` is a literal comma); a bare first word is ''."""
    out: dict[str, str] = {}
    parts = re.split(r"(?<!,),(?!,)", value)
    for i, raw in enumerate(parts):
        key, eq, val = raw.replace(",,", ",").partition("=")
        if eq:
            out[key] = val
        elif i == 0:
            out[""] = key
    return out


def _option_values(argv: Sequence[str], flag: str) -> list[str]:
    """Values of ``-flag V``, ``--flag V`` and ``-flag=V`` (QEMU accepts all three)."""
    values = []
    for i, arg in enumerate(argv):
        for spelling in (f"-{flag}", f"--{flag}"):
            if arg == spelling and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif arg.startswith(spelling + "="):
                values.append(arg[len(spelling) + 1:])
    return values


def vfio_devices(argv: Sequence[str]) -> list[str]:
    """Host PCI addresses of the ``-device vfio-pci`` options (``host=`` or ``sysfsdev=``)."""
    found = []
    for value in _option_values(argv, "device"):
        opts = _opts(value)
        if (opts.get("driver") or opts.get("")) != "vfio-pci":
            continue
        if "host" in opts:
            found.append(opts["host"])
        elif "sysfsdev" in opts:
            found.append(Path(opts["sysfsdev"]).name)
    return found


def qemu_name(argv: Sequence[str]) -> str | None:
    """The guest name of ``-name NAME`` or ``-name guest=NAME,...``."""
    for value in _option_values(argv, "name"):
        opts = _opts(value)
        return opts.get("guest") or opts.get("") or None
    return None


def has_flag(argv: Sequence[str], flag: str) -> bool:
    return f"-{flag}" in argv or f"--{flag}" in argv


def monitor_args(chardev_id: str, path: Path) -> list[str]:
    """The options that give QEMU one more QMP monitor on a unix socket it listens on."""
    return ["-chardev", f"socket,id={chardev_id},path={path},server=on,wait=off",
            "-mon", f"chardev={chardev_id},mode=control"]


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it (signal N → 128+N)."""
    return 128 - returncode if returncode < 0 else returncode
