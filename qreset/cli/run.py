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


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
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
