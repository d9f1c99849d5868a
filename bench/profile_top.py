"""
What a ``py-spy record --format raw`` profile of the daemon says, in a few lines.

``bench.scale --profile FILE`` records the daemon during the soak (py-spy at
100 Hz, idle samples left out: py-spy drops a thread's sample when it sits
in a blocking call such as ``epoll_wait``). This prints how busy the daemon's
threads were (samples over rate × duration), the functions that were on
CPU themselves (self samples), and the share of samples under each of a few
parts of a cycle (inclusive), to say what limits a cycle's latency.

    .venv/bin/python -m bench.profile_top FILE [--seconds 120] [--rate 100]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

#: Parts of the daemon's work, by a frame's function and file (first match wins per sample).
PARTS = (
    ("json encode/decode", re.compile(r"\((json/|.*message\.py)")),
    ("journal (append, fsync, fold)", re.compile(r"\(.*qreset/journal")),
    ("engine: plan", re.compile(r"\(.*qreset/plan")),
    ("engine: refresh/topology", re.compile(r"\(.*qreset/topology")),
    ("engine: execute (sim host)", re.compile(r"\(.*qreset/(execute|pci/sim)")),
    ("engine: other", re.compile(r"\(.*qreset/(engine|locks|restore|diff)")),
    ("QMP transport (qemu.qmp)", re.compile(r"\((.*/)?qmp/")),
    ("cycle machine and monitor", re.compile(r"\(.*qreset/(cycle|vm)")),
    ("control socket / status", re.compile(r"\(.*qreset/(control|daemon_backend)")),
    ("asyncio event loop", re.compile(r"\(.*asyncio/")),
)


def parse(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--seconds", type=float, default=120.0, help="recorded duration (120)")
    ap.add_argument("--rate", type=float, default=100.0, help="py-spy sampling rate, Hz (100)")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    samples = parse(args.profile)
    total = sum(n for _s, n in samples)
    if not total:
        print(f"{args.profile}: no samples")
        return 1
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    for stack, n in samples:
        threads[stack[0] if stack[0].startswith(("thread", "process")) else "?"] += n
        own[re.sub(r":\d+\)$", ")", stack[-1])] += n
        for name, pat in PARTS:
            # The innermost frame of the sample that belongs to a part names it.
            if any(pat.search(f) for f in reversed(stack)):
                parts[name] += n
                break
        else:
            parts["other"] += n
    print(f"{total} samples = {total / args.rate:.1f} s on CPU over {args.seconds:g} s "
          f"({100 * total / (args.rate * args.seconds):.0f}% of one core)")
    for t, n in threads.most_common(4):
        print(f"  {100 * n / total:5.1f}%  {t}")
    print("by part (a sample counted once, under the first matching part from the list):")
    for name, n in parts.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("on CPU themselves (self):")
    for fn, n in own.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
