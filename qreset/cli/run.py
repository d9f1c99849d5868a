"""
``qreset run``: the daemon.

Reads the configuration (``--config``, default /etc/qreset/qreset.toml),
optionally swaps the host for a simulated one (``--sim FILE``), logs to
stderr (journald adds its own timestamps under systemd; we keep ours for
the terminal and the demo) and serves until SIGTERM/SIGINT. Exit codes: 0
after a clean stop, 1 when the daemon could not start or died, 2 for a bad
configuration (checked whole before anything is created: qreset.preflight).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import sys
from pathlib import Path

from qreset.cli.common import fail
from qreset.config import DEFAULT_CONFIG
from qreset.errors import ConfigError, QResetError
from qreset.preflight import validate


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--config", metavar="FILE", type=Path, default=DEFAULT_CONFIG,
                        help=f"configuration file (default: {DEFAULT_CONFIG})")
    parser.add_argument("--sim", metavar="FILE", type=Path, default=None,
                        help="use a simulated PCI host described by this topology (overrides [sim])")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: -v debug for qreset, -vv also the QMP library")


def setup_logging(verbose: int) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # qemu.qmp logs every hang-up of a QEMU that exits as an error; the daemon
    # reports disconnections itself, once, in its own words.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)


def raise_nofile() -> None:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit. The daemon holds a QMP socket
    per VM plus its journal, control and metrics sockets (bench.scale: 264 fds for
    256 VMs), and systemd starts services with a soft limit of 1024 (systemd.exec(5),
    LimitNOFILE=): ~1000 VMs would fail to connect. select() is not used (asyncio's
    default loop uses epoll), so fds above 1023 are safe.
    """
    log = logging.getLogger("qreset.run")
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if resource.RLIM_INFINITY in (hard, soft) or soft < hard:
            # Linux refuses an infinite nofile (fs.nr_open bounds it): keep the soft one then.
            target = soft if hard == resource.RLIM_INFINITY else hard
            if target != soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                log.debug("RLIMIT_NOFILE: soft limit raised from %d to %d", soft, target)
                return
        log.debug("RLIMIT_NOFILE: soft limit %d (hard %d)", soft, hard)
    except (OSError, ValueError) as exc:  # not fatal: the daemon serves fewer VMs
        log.debug("RLIMIT_NOFILE: could not raise the soft limit: %s", exc)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    raise_nofile()
    # Everything about the configuration is checked before anything is created
    # (journal, sockets, directories): a bad file is exit 2 and one line, never
    # a half-started daemon (qreset.preflight).
    try:
        config = validate(args.config, sim=args.sim)
    except ConfigError as exc:
        return fail(str(exc), 2)

    from qreset.daemon import Daemon

    daemon = Daemon(config)
    try:
        asyncio.run(daemon.run(signals=True))
    except ConfigError as exc:  # found at start, before anything is created (e.g. a FIFO journal)
        return fail(str(exc), 2)
    except QResetError as exc:
        return fail(str(exc), 1)
    except ExceptionGroup as group:  # from the TaskGroup: a VM task died of a bug
        return fail("daemon failed: " + "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions), 1)
    return 0
