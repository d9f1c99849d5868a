"""
qreset: host-side PCI resets coordinated with QEMU guest resets.

Pipeline (one module per stage): QMP event → :mod:`qreset.inventory` →
:mod:`qreset.topology` → :mod:`qreset.plan` → :mod:`qreset.execute` →
:mod:`qreset.diff` (rescan) → restore / escalate → resume → :mod:`qreset.journal`.
"""

__version__ = "0.1.0"
