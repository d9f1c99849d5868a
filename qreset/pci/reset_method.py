"""
Narrowing ``reset_method`` for one reset, and putting back what the kernel accepts.

To make ``echo 1 > reset`` use one method, qreset writes that method to the
function's ``reset_method`` first and writes the previous list back afterwards.
The kernel's ``reset_method_store`` (drivers/pci/pci.c) checks every name it is
given against the function's methods *as probed now*
(``pci_reset_fn_methods[m].reset_fn(pdev, PCI_RESET_PROBE)``): one unsupported
name and the whole write fails with EINVAL ("Unsupported reset method '%s'"),
leaving the list unchanged. ``default`` re-runs ``pci_init_reset_methods``:
every method that probes OK now, in the kernel's order.

A previous list can hold a name the kernel no longer accepts: ``bus`` is
probed at enumeration, before function 1 of a multifunction device exists
(``pci_device_add`` probes before the device joins ``bus->devices``), so
function 0 lists ``bus`` until something rewrites the list, and then the
kernel refuses it. Writing that list back fails every time. What is put back
instead is the previous list minus the names the kernel refuses now, in the
previous order, or ``default`` when that is the same thing; then it is read
back and compared, so the attribute never silently differs from what was
meant.

The functions here take the attribute as two plain callables (``read`` returns
the text or None when the attribute is missing; ``write`` raises
:class:`~qreset.errors.HostError`), so the sysfs host runs them in its thread
and the simulated host against its model of the store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from qreset.errors import HostError, ResetFailed

logger = logging.getLogger(__name__)

Read = Callable[[], "str | None"]
Write = Callable[[str], None]


def narrow(read: Read, write: Write, method: str, where: str) -> str:
    """Make ``method`` the only method; return the previous list (as read, stripped)."""
    previous = read()
    if previous is None:
        raise ResetFailed(where, "missing: cannot choose a reset method (Linux < 5.15?)")
    previous = previous.strip()
    if method not in previous.split():
        raise ResetFailed(where, f"method {method!r} is not enabled (have: {previous or 'none'})")
    try:
        write(method)
    except HostError as exc:
        raise ResetFailed(where, f"narrowing to {method!r}: {exc.why}") from exc
    return previous


def put_back(read: Read, write: Write, previous: str, where: str) -> str:
    """Write ``previous`` back, or the part of it the kernel accepts now; return what is there.

    Raises HostError only when nothing could be written (the attribute is
    left narrowed); a result other than ``previous`` is logged, never silent.
    """
    try:
        write(previous + "\n")
    except HostError as exc:
        logger.debug("%s: %s; keeping what the kernel accepts now", where, exc)
        return _put_back_supported(read, write, previous, where, exc)
    return _check(read, previous, previous, where)


def _put_back_supported(read: Read, write: Write, previous: str, where: str, why: HostError) -> str:
    # "default" = pci_init_reset_methods(): the methods that probe OK now.
    try:
        write("default")
    except HostError as exc:
        raise HostError(where, f"could not restore {previous!r} nor 'default': {exc.why}") from exc
    supported = (read() or "").split()
    wanted = [m for m in previous.split() if m in supported]
    dropped = [m for m in previous.split() if m not in supported]
    if wanted != supported:
        try:
            write(" ".join(wanted) + "\n")
        except HostError as exc:
            logger.warning("%s: could not write %r (%s); left at the kernel's default %r",
                           where, " ".join(wanted), exc.why, " ".join(supported))
            return " ".join(supported)
    result = _check(read, " ".join(wanted), previous, where)
    logger.info("%s: put back %r: the kernel no longer supports %s (%s)", where, result,
                " ".join(repr(m) for m in dropped) or "a name in it", why.why)
    return result


def _check(read: Read, expected: str, previous: str, where: str) -> str:
    """Read the attribute back; a list other than ``expected`` is reported."""
    try:
        now = read()
    except HostError as exc:
        logger.warning("%s: cannot read back after restoring %r: %s", where, previous, exc.why)
        return expected
    got = " ".join((now or "").split())
    if got != " ".join(expected.split()):
        logger.warning("%s: reads %r after restoring %r (expected %r)", where, got, previous, expected)
    return got
