"""
``qreset run`` for the scale bench, optionally with an experimental journal.

``python -m bench.scale_daemon [--group-commit] run --config FILE`` runs the
real CLI. ``--group-commit`` used to patch in a prototype of the append path
below; qreset/journal.py now ships it (see :func:`install`), so the flag
changes nothing:

- the line is written with one ``os.write`` on an ``O_APPEND`` descriptor
  from the event loop (a page-cache write of ~2 KB; the old path made
  three thread-pool round trips per record: aiofiles ``write``, ``flush``,
  then ``to_thread(fsync)``, all under the journal lock);
- ``sync=True`` callers then wait for a *shared* fsync: one fsync in flight
  at a time, covering every line written before it started (group commit),
  so N concurrent cycles pay about two fsyncs of latency, not N.

Same durability promise per record: ``append`` returns after the line is in
the kernel (``sync=False``) or on disk (``sync=True``).
"""

from __future__ import annotations

import sys


def install() -> None:
    """
    Nothing to install any more: qreset.journal.Journal itself now writes with
    one os.write and shares fsyncs between concurrent appends (group commit),
    so ``--group-commit`` runs the shipped journal (kept so scripts still work).
    The prototype that was patched in here is in git history.
    """


def main(argv: list[str]) -> int:
    if argv[:1] == ["--group-commit"]:
        install()
        argv = argv[1:]
    from qreset.cli import main as qreset_main

    return qreset_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
