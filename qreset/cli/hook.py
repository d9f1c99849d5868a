"""
``qreset hook``: the libvirt hook (installed as ``/etc/libvirt/hooks/qemu.d/qreset``).

libvirt runs hooks synchronously with argv ``guest op subop extra`` and the
domain XML on stdin (https://libvirt.org/hooks.html). Hooks in ``qemu.d`` are
chained, so this one prints nothing on stdout; it never calls back into
libvirt (that deadlocks libvirtd); it starts fast (argparse, ElementTree and a
synchronous QMP client only — no asyncio event loop, no pydantic).

- ``prepare``/``start``: if the guest has PCI hostdevs, ask the daemon
  (``check-devices``) whether any of them lies in a reset domain with a
  function of another running VM; exit 1 with the reason on stderr if so
  (libvirt aborts the start). Daemon unreachable: warn, exit 0.
- ``started``: ``add-vm`` with the hostdevs and qreset's own QMP monitor
  (see :data:`qreset.libvirt.COMMANDLINE_SNIPPET`), in stop-on-reset mode:
  libvirt treats a SHUTDOWN event as a poweroff, so park mode is unsafe here.
- ``stopped``: ``remove-vm`` with ``release: true``: the daemon resets every
  function the guest had (whole domains), rescans, re-probes changed ones —
  while they are still bound to vfio-pci, before libvirt re-attaches managed
  devices to their host drivers.
- ``release``: ``remove-vm`` again (idempotent) in case ``stopped`` failed,
  without the reset: libvirt has re-attached managed devices to host drivers
  by then.
- ``reconnect`` (libvirtd restarted and re-attaches to a running guest): the
  same ``add-vm`` as ``started``. The daemon treats an identical ``add-vm``
  as a no-op, so this re-registers a guest the daemon lost (it was down when
  the guest started, or its journal was lost) and changes nothing otherwise.
- Any other operation (migrate, restore, attach, ...): nothing.

Only ``prepare``/``start`` may exit non-zero: failing any other operation
would not undo anything and libvirt only logs it.

Finding the daemon: libvirt runs hooks with only ``LC_ALL``, ``PATH`` and
``HOME`` in the environment, so ``$QRESET_SOCKET`` is normally absent. The
socket is ``--socket``, else ``$QRESET_SOCKET``, else ``[daemon]
control_socket`` of the daemon's configuration file (``--config``, default
``/etc/qreset/qreset.toml``, read only if it exists), else the daemon's
default ``/run/qreset/qreset.sock``.

Park mode under libvirt is refused at ``prepare``/``start``: libvirt handles
every ``SHUTDOWN`` event as a poweroff whatever its reason (libvirt's
``qemuProcessHandleShutdown`` kills QEMU, or with ``on_poweroff=restart``
fake-reboots it with ``system_reset`` + ``cont``, which park mode's
``reboot=shutdown`` turns into another shutdown), so a guest reset parked as
``SHUTDOWN`` ends the domain. A configuration that names the guest in a
``[[vm]]`` with ``mode = "park"`` therefore stops the start with that reason;
the hook itself always registers guests in stop-on-reset mode.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

#: Operations whose non-zero exit aborts the guest start.
_GATING = ("prepare", "start")
#: The daemon's configuration file (qreset.config's default; read only if present).
DEFAULT_CONFIG = "/etc/qreset/qreset.toml"
#: Why park mode cannot serve a libvirt guest (see the module docstring).
PARK_UNDER_LIBVIRT = (
    'is configured with mode = "park", which libvirt cannot host: libvirt handles every '
    "SHUTDOWN event as a poweroff (it kills QEMU, or with on_poweroff=restart fake-reboots "
    "it into \"Resetting the Virtual Machine is required\"); use mode = \"stop-on-reset\" "
    "(docs/operators.md, \"Under libvirt\")"
)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.description = __doc__.split("\n\n")[1] if __doc__ else None
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "install:  ln -s $(command -v qreset-libvirt-hook) /etc/libvirt/hooks/qemu.d/qreset\n"
        "          (or copy scripts/libvirt-hook there), then restart libvirtd.\n"
        "example:  qreset hook vm1 started begin - < /etc/libvirt/qemu/vm1.xml"
    )
    parser.add_argument("guest", help="libvirt domain name")
    parser.add_argument("op", help="prepare, start, started, stopped, release, ...")
    parser.add_argument("subop", nargs="?", default="-")
    parser.add_argument("extra", nargs="?", default="-")
    parser.add_argument(
        "--socket", default=os.environ.get("QRESET_SOCKET"),
        help="the daemon's control socket (default: $QRESET_SOCKET, else control_socket of "
             "--config, else the daemon's default, /run/qreset/qreset.sock)",
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, metavar="FILE",
        help="the daemon's configuration, read (if it exists) for its control socket and for "
             "guests configured in park mode (default: %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the daemon (release can take a while)")


def _err(message: str) -> None:
    print(f"qreset hook: {message}", file=sys.stderr)


def _read_config(path: str) -> tuple[str | None, dict[str, str]]:
    """``(control_socket, {vm name: mode})`` from the daemon's TOML file; nothing if absent.

    A file that cannot be read or parsed yields nothing: the daemon reports its
    own configuration errors, and a hook must not block a start over them.
    """
    import stat
    import tomllib
    from pathlib import Path

    try:
        # O_NONBLOCK and a regular-file check: a FIFO (or a device) at that path must not
        # hang libvirt's synchronous hook call. 1 MiB is the daemon's own bound (qreset.config).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None, {}
            data = tomllib.loads(f.read(1 << 20).decode("utf-8", "replace"))
    except (OSError, tomllib.TOMLDecodeError, RecursionError):
        return None, {}
    daemon = data.get("daemon")
    sock = daemon.get("control_socket") if isinstance(daemon, dict) else None
    if isinstance(sock, str) and sock:
        sock = str(Path(path).parent / sock) if not sock.startswith("/") else sock
    else:
        sock = None
    vms = data.get("vm")
    modes: dict[str, str] = {}
    if isinstance(vms, list):
        for vm in vms:
            if isinstance(vm, dict) and isinstance(vm.get("name"), str) and isinstance(vm.get("mode"), str):
                modes[vm["name"]] = vm["mode"]
    return sock, modes


def _call(sock: str, timeout: float, command: str, **arguments: Any) -> Any:
    from qreset.qmpsync import call

    return call(sock, command, timeout, **arguments)


def run(args: argparse.Namespace) -> int:
    op: str = args.op
    if op not in ("prepare", "start", "started", "reconnect", "stopped", "release"):
        return 0
    from qreset.errors import QResetError
    from qreset.libvirt import default_qmp_path, parse_domain_xml
    from qreset.qmpsync import DEFAULT_SOCKET, DaemonUnreachable

    # Imported here, not for the argparse default: ignored operations (most of
    # libvirt's calls) then exit without loading the socket and JSON modules.
    configured_socket, modes = _read_config(args.config)
    args.socket = args.socket or configured_socket or DEFAULT_SOCKET

    try:
        xml = sys.stdin.read() if not sys.stdin.isatty() else ""
        dom = parse_domain_xml(xml, where=f"{args.guest} domain XML") if xml.strip() else None
    except QResetError as exc:
        _err(str(exc))
        return 1 if op in _GATING else 0
    devices = [str(a) for a in dom.hostdevs] if dom else []
    try:
        if op in _GATING:
            if not devices:
                return 0
            if modes.get(args.guest) == "park":
                _err(f"unsafe to start {args.guest}: {args.guest} {PARK_UNDER_LIBVIRT}")
                return 1
            verdict = _call(args.socket, args.timeout, "check-devices", name=args.guest, devices=devices)
            if isinstance(verdict, dict) and not verdict.get("safe", True):
                for reason in verdict.get("reasons", []):
                    _err(f"unsafe to start {args.guest}: {reason}")
                return 1
        elif op in ("started", "reconnect"):
            if not devices:
                return 0
            qmp = (dom.qmp if dom else None) or default_qmp_path(args.guest)
            _call(args.socket, args.timeout, "add-vm", name=args.guest, qmp=qmp,
                  devices=devices, mode="stop-on-reset")
        elif dom is not None and not devices:
            return 0  # never registered: nothing to remove (and no noise in libvirt's log)
        else:  # stopped / release
            # Only 'stopped' releases: by 'release', libvirt has handed managed devices
            # back to host drivers, and a reset then would hit a driver's device.
            _call(args.socket, args.timeout, "remove-vm", name=args.guest, release=op == "stopped")
    except DaemonUnreachable as exc:
        # No daemon: nothing can be coordinated, but the guest may still run.
        _err(f"{op}: {exc}")
    except QResetError as exc:
        # An error reply is not proof that starting is unsafe: report it, let libvirt go on.
        if op != "release":  # at 'release' the VM was normally deregistered at 'stopped'
            _err(f"{op}: {exc}")
    return 0
