"""
The one retry-delay formula of qreset.

aiomqtt's jittered exponential backoff, ``random.uniform(0, 1.5 ** min(10,
attempt))``: full jitter (so many monitors retrying at once spread out) and
growth that stops after ten attempts (1.5 ** 10 ≈ 58). ``scale`` shrinks it
for loops whose first retries must come fast (a parked guest waits on them);
``cap`` bounds it.

Used by the VM monitors (reconnect, resume retries) and the daemon's
crash-restart guard (qreset.daemon_registry).
"""

from __future__ import annotations

import random


def backoff_delay(attempt: int, cap: float, *, scale: float = 1.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): jittered, scaled, capped."""
    return min(cap, scale * random.uniform(0, 1.5 ** min(10, max(0, attempt))))
