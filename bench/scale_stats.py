"""
Figures of the scale bench (:mod:`bench.scale`) from the daemon's journal.

A :class:`Tracker` reads each journal record once: ``cycle-start`` and
terminal records per VM (to match injected NMIs with cycles and find lost
ones), and the terminal summaries' ``durations`` and engine ``phases`` (to
split event→resumed into what the reset methods wait for, what a shared
domain's lock costs, and the daemon's own overhead). :func:`render` prints a
run next to the 1-VM run as ratios.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

#: Terminal phases of a cycle (qreset.journal.TERMINAL_PHASES; kept here so the bench
#: reads any daemon's journal without importing its internals).
TERMINAL = frozenset({"resumed", "stopped", "failed", "poweroff"})
SKIP = frozenset({"note", "add-vm", "remove-vm"})
#: Engine phases that are the reset method's own waits (the spec's delays scaled by the
#: sim's time_scale: FLR 100 ms, bus 2 + 100 ms / 1100 ms conventional, then the poll).
METHOD_PHASES = ("assert", "settle", "poll")

METRICS = {
    "total": "event→resumed",
    "method": "  reset method's own waits",
    "lock": "  shared-domain lock wait",
    "overhead": "overhead (event→resumed − method)",
    "overhead_nolock": "overhead − lock wait",
    "parked": "  event→parked (cycle-start+query)",
    "engine_extra": "  engine − method − lock",
    "resume": "  resume (toggle, system_reset, cont)",
    "journal": "  rest: parked+engine-done appends",
    "durable": "QEMU event→terminal record written",
    "qmp_commands": "QMP commands per cycle",
}


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    data = sorted(values)
    if not data:
        return 0.0
    k = max(0, min(len(data) - 1, -(-len(data) * p // 100) - 1))
    return data[int(k)]


def cycle_figures(rec: dict[str, Any]) -> dict[str, float]:
    """The figures of one terminal record (ms); empty when it has no durations."""
    dur = rec.get("durations") or {}
    if "total_ms" not in dur:
        return {}
    domains = [d for d in ((rec.get("report") or {}).get("domains") or []) if isinstance(d, dict)]
    # Domains of one cycle run in parallel: the longest is what the guest waited for.
    method = max((sum(float(d.get("phases", {}).get(p, 0.0)) for p in METHOD_PHASES) * 1000.0
                  for d in domains), default=0.0)
    lock = max((float(d.get("phases", {}).get("lock", 0.0)) * 1000.0 for d in domains), default=0.0)
    total = float(dur["total_ms"])
    parked = float(dur.get("event_to_parked_ms", 0.0))
    engine = float(dur.get("engine_ms", 0.0))
    resume = float(dur.get("resume_ms", 0.0))
    out = {"total": total, "method": method, "lock": lock, "overhead": total - method,
           "overhead_nolock": total - method - lock, "parked": parked,
           "engine_extra": engine - method - lock, "resume": resume,
           "journal": total - parked - engine - resume}
    if isinstance(rec.get("t"), (int, float)) and isinstance(rec.get("event_ts"), (int, float)):
        out["durable"] = (float(rec["t"]) - float(rec["event_ts"])) * 1000.0
    qmp = rec.get("qmp_commands")
    if isinstance(qmp, (int, float)):
        out["qmp_commands"] = float(qmp)
    elif isinstance(qmp, dict):  # a per-command breakdown: count them all
        out["qmp_commands"] = float(sum(v for v in qmp.values() if isinstance(v, (int, float))))
    return out


class Tracker:
    """Cycle bookkeeping from journal records, tagged with the bench phase they began in."""

    def __init__(self, shared: frozenset[str]) -> None:
        self.shared = shared
        self.phase = "start"
        self.injected: Counter[str] = Counter()
        self.starts: Counter[str] = Counter()
        self._terminals: Counter[str] = Counter()
        self.open: dict[str, tuple[str, str]] = {}     # cycle id -> (vm, phase tag)
        self.rows: list[tuple[str, str, dict[str, Any]]] = []  # (tag, vm, terminal record)
        self.cycles_total = 0

    def terminals(self, vm: str) -> int:
        return self._terminals[vm]

    def add(self, rec: dict[str, Any]) -> None:
        phase, vm, cid = rec.get("phase"), str(rec.get("vm")), str(rec.get("cycle"))
        if phase in SKIP:
            return
        if phase == "cycle-start":
            self.starts[vm] += 1
            self.open[cid] = (vm, self.phase)
        elif phase in TERMINAL:
            self._terminals[vm] += 1
            self.cycles_total += 1
            _vm, tag = self.open.pop(cid, (vm, self.phase))
            self.rows.append((tag, vm, rec))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "injected": sum(self.injected.values()),
            "cycles": self.cycles_total,
            "failures": sum(1 for _t, _v, r in self.rows if r.get("outcome", r.get("phase")) != "resumed"),
            "failure_errors": dict(Counter(
                str(r.get("error"))[:160] for _t, _v, r in self.rows
                if r.get("outcome", r.get("phase")) != "resumed").most_common(5)),
            "lost": sorted(self.open),
            "unanswered": sum(max(0, n - self.starts[vm]) for vm, n in self.injected.items()),
            "extra_cycles": sum(max(0, self.starts[vm] - n) for vm, n in self.injected.items()),
            "by_phase": {},
        }
        for tag in sorted({t for t, _v, _r in self.rows}):
            subsets: list[tuple[str, frozenset[str] | None, bool]] = [("all", None, True)]
            if self.shared:  # VF guests (own domains) and shared-bus guests apart
                subsets += [("vf", self.shared, False), ("shared-bus", self.shared, True)]
            for subset, group, inside in subsets:
                figs = [cycle_figures(r) for t, vm, r in self.rows
                        if t == tag and (group is None or (vm in group) == inside)]
                figs = [f for f in figs if f]
                if not figs:
                    continue
                stats = {}
                for key in METRICS:
                    vals = [f[key] for f in figs if key in f]
                    if vals:
                        stats[key] = {"p50": round(percentile(vals, 50), 2),
                                      "p99": round(percentile(vals, 99), 2),
                                      "max": round(max(vals), 2)}
                out["by_phase"][f"{tag}/{subset}"] = {"cycles": len(figs), "ms": stats}
        return out


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "   -"
    return f"{a / b:5.1f}×"


def render(out: dict[str, Any]) -> str:
    base, full = out["baseline"], out["full"]
    args = out["args"]
    lines = [
        f"qreset scale bench: {full.get('vms')} guests (QEMU TCG, bench.firmware), bursts of "
        f"{full.get('burst')}, soak {args['soak']:g} s, sim time_scale {args['time_scale']}; "
        f"{out['cpus']} CPUs, load {full.get('load_start')} → {full.get('load_end')}",
        f"guests started in {full.get('guests_start_s')} s, daemon connected to all in "
        f"{full.get('connect_s')} s; idle CPU s/s: {full.get('idle_cpu_per_s')}",
        "",
        f"{'':38} {'1 VM':>22} {'N VMs':>22}",
    ]
    for key in ("injected", "cycles", "failures", "unanswered", "extra_cycles", "not_ready_skipped"):
        lines.append(f"{key:<38} {base.get(key, '-')!s:>22} {full.get(key, '-')!s:>22}")
    lines.append(f"{'lost cycles':<38} {len(base.get('lost', [])):>22} {len(full.get('lost', [])):>22}")
    lines.append(f"{'guests not running at the end':<38} {len(base.get('not_running', {})):>22} "
                 f"{len(full.get('not_running', {})):>22}")
    lines.append(f"{'journal bytes per cycle':<38} {base.get('journal_bytes_per_cycle')!s:>22} "
                 f"{full.get('journal_bytes_per_cycle')!s:>22}")
    b_s, f_s = base.get("daemon_samples") or [{}], full.get("daemon_samples") or [{}]
    for key, unit in (("rss_kb", "kB"), ("fds", "")):
        lines.append(f"{'daemon ' + key + ' start → end':<38} "
                     f"{str(b_s[0].get(key)) + ' → ' + str(b_s[-1].get(key)):>22} "
                     f"{str(f_s[0].get(key)) + ' → ' + str(f_s[-1].get(key)):>22} {unit}")
    lines.append(f"{'daemon fd soft limit':<38} {b_s[0].get('nofile_soft')!s:>22} "
                 f"{f_s[0].get('nofile_soft')!s:>22}")
    if len(f_s) > 2:
        lines.append("daemon over the run (phase, cycles, RSS kB, fds, CPU s): " + "; ".join(
            f"{s.get('phase')} {s.get('cycles')} {s.get('rss_kb')} {s.get('fds')} {s.get('cpu_s', 0):.0f}"
            for s in f_s))
    lines.append("")
    lines.append(f"{'ms (p50 / p99)':<38} {'1 VM':>17} {'N VMs':>17}   {'ratio p50':>9} {'ratio p99':>9}")
    bb = base.get("by_phase", {}).get("soak/all", {}).get("ms", {})
    for tag in sorted(full.get("by_phase", {})):
        block = full["by_phase"][tag]
        lines.append(f"-- {tag}: {block['cycles']} cycles")
        for key, label in METRICS.items():
            f = block["ms"].get(key)
            if f is None:
                continue
            b = bb.get(key, {})
            bs = f"{b.get('p50', 0):7.2f} / {b.get('p99', 0):7.2f}" if b else f"{'-':>17}"
            lines.append(f"{label:<38} {bs:>17} {f['p50']:7.2f} / {f['p99']:7.2f}   "
                         f"{_ratio(f['p50'], b.get('p50')):>9} {_ratio(f['p99'], b.get('p99')):>9}")
    lines.append("")
    def fmt(s: dict[str, Any] | None) -> str:
        return f"{s['p50']:.1f} (max {s['max']:.1f}, n={s['count']})" if s else "-"

    for key in sorted(set(base.get("status_ms", {})) | set(full.get("status_ms", {}))):
        b, f = base.get("status_ms", {}).get(key), full.get("status_ms", {}).get(key)
        lines.append(f"{'status ' + key + ' ms':<38} {fmt(b):>22} {fmt(f):>22}")
    return "\n".join(lines)
