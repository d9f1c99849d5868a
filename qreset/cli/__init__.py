"""
Command-line entry point.

``qreset SUBCOMMAND ...``. Each subcommand lives in its own module under
``qreset.cli`` and is imported only when it runs, so ``qreset hook`` (run by
libvirt for every guest start) pays for argparse and nothing else.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``.
Exit codes: 0 success, 1 the operation failed (a reset did not come back
clean, the daemon is unreachable), 2 bad arguments or configuration.

A reader that goes away (``qreset reset ... | head -1``) is handled here,
once, for every subcommand: stdout is replaced by :class:`_PipeSafeStdout`,
which on the first ``EPIPE`` points file descriptor 1 at ``/dev/null``
(the Python docs' recipe, "Note on SIGPIPE" in the ``signal`` module) and
carries on without raising. Why not exit at once, as the recipe (exit 1) or
a SIGPIPE death (141) would: a write that fails in the middle of ``qreset
reset`` or ``release`` would otherwise stop a reset between the reset and
the restore, or skip it after printing its plan. The command runs to its end
and exits with its own status (which says whether the operation worked,
not whether someone read all of it); commands that only print, like
``qreset events``, ask :func:`stdout_closed` and stop.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO, cast

#: name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "topology": ("qreset.cli.topology", "show the host PCI tree with reset methods and IOMMU groups"),
    "doctor": ("qreset.cli.doctor", "explain how each function can be reset and what blocks it"),
    "plan": ("qreset.cli.plan", "plan the resets of some functions without touching anything"),
    "reset": ("qreset.cli.reset", "plan, reset, rescan and restore some functions now"),
    "run": ("qreset.cli.run", "run the daemon: coordinate guest resets of the configured VMs"),
    "status": ("qreset.cli.client", "show the daemon's VMs, devices and counters"),
    "history": ("qreset.cli.history", "show past reset cycles from the daemon"),
    "events": ("qreset.cli.client", "follow the daemon's events"),
    "release": ("qreset.cli.release", "reset functions returned to the host and re-probe changed ones"),
    "hook": ("qreset.cli.hook", "libvirt hook entry point (argv: guest op subop extra)"),
    "launch": ("qreset.cli.launch", "start QEMU with a QMP monitor for qreset and serve it"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="qreset",
        description=(
            "Reset every PCI function a guest reset affects, on the host, while the guest "
            "is parked; rescan and restore only what changed."
        ),
        epilog="Run 'qreset COMMAND --help' for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, (_module, help_text) in COMMANDS.items():
        subs[name] = sub.add_parser(name, help=help_text, description=help_text)
    return parser, subs


class _PipeSafeStdout:
    """stdout whose writes never raise BrokenPipeError: see the module docstring."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.closed_pipe = False

    def _gone(self) -> None:
        self.closed_pipe = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()
            # What stayed in the buffer now goes to /dev/null; a second flush cannot fail.
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def stdout_closed() -> bool:
    """Whether the reader of stdout went away (a command that only prints should stop)."""
    out: object = sys.stdout
    return isinstance(out, _PipeSafeStdout) and out.closed_pipe


def main(argv: Sequence[str] | None = None) -> int:
    original = sys.stdout
    if not isinstance(original, _PipeSafeStdout):
        sys.stdout = cast(TextIO, _PipeSafeStdout(original))
    try:
        return _main(argv)
    finally:
        # Flushed here, not at interpreter exit, where a closed pipe would still print.
        sys.stdout.flush()
        sys.stdout = original


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    # Only the chosen subcommand's module is imported (fast hooks).
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in COMMANDS:
        args = parser.parse_args(argv)  # prints help/usage, exits 2 on unknown command
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    module.add_arguments(subs[name], name)
    args = parser.parse_args(argv)
    rc: int = module.run(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
