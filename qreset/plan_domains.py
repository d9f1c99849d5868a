"""
Planning steps 2 and 3: one candidate reset per target, then merging overlapping ones.

Pure code over a :class:`~qreset.topology.Topology`; the rules and why are
steps 2 and 3 in :mod:`qreset.plan`'s docstring. A :class:`Candidate` is a
domain still being shaped (mutable while merging); :mod:`qreset.plan_policy`
turns each merged one into a :class:`~qreset.plan_types.Domain` or a refusal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from qreset.pci.address import PciAddress
from qreset.plan_types import Blocker, Method, Owner
from qreset.topology import ResetKind, ResetScope, Topology

__all__ = ["Candidate", "candidates", "merge"]


@dataclass(slots=True)
class Candidate:
    """A domain under construction (mutable while merging)."""

    kind: ResetKind
    target: PciAddress
    affected: set[PciAddress]
    needs: set[PciAddress]          # targets that asked for this reset
    method: Method | None = None    # set for FUNCTION candidates
    slot: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"function:{self.target}" if self.kind is ResetKind.FUNCTION else f"bus:{self.target}"

    def phrase(self) -> str:
        """This reset in words, for reasons and refusals ("slot reset of X (slot 3)")."""
        if self.kind is ResetKind.FUNCTION:
            return f"{self.method.value if self.method else 'reset'} of {self.target}"
        if self.kind is ResetKind.SLOT:
            return f"slot reset of {self.target}" + (f" (slot {self.slot})" if self.slot else "")
        return f"bus reset of {self.target}"


def candidates(
    topo: Topology, me: Owner, targets: Iterable[PciAddress], wide: frozenset[PciAddress],
    fallback: Mapping[PciAddress, str],
) -> tuple[list[Candidate], list[Blocker]]:
    """Step 2: the least disruptive reset of each target, or a blocker when nothing reaches it.

    ``wide`` targets skip their function-level methods (PM treated as a last
    resort); ``fallback`` names why a target's wider reset was refused, for
    the note on the PM reset it falls back to.
    """
    cands: list[Candidate] = []
    blockers: list[Blocker] = []
    for t in sorted(targets):
        node = topo.node(t)
        methods = topo.function_methods(t)
        if methods and t not in wide:
            # Resetting a PF clears VF Enable (PCIe SR-IOV 1.1, 3.3.3.1): its VFs go too.
            affected = {t} | {v for v in node.info.virtfns if v in topo.functions}
            notes = [f"{methods[0]}: first function-level reset method of {t}"]
            if t in fallback:
                notes.append(f"the wider reset is refused: {fallback[t]}")
            cands.append(Candidate(
                ResetKind.FUNCTION, t, affected, {t}, Method(methods[0]), notes=notes,
            ))
            continue
        scope: ResetScope | None = topo.slot_scope(t) or topo.bus_scope(t)
        if scope is None:
            blockers.append(Blocker(t, me, (
                f"{t} has no function-level reset method and sits on a root bus "
                "(no bridge to reset): nothing can reset it"
            )))
            continue
        why = (
            "no function-level reset method" if not methods
            else "PM reset is the last resort (QEMU's order); doing the slot/bus reset"
        )
        cands.append(Candidate(
            scope.kind, scope.target, set(scope.affected) | {t}, {t}, slot=scope.slot,
            notes=[f"{t}: {why}"],
        ))
    return cands, blockers

def merge(topo: Topology, me: Owner, cands: list[Candidate]) -> tuple[list[Candidate], list[Blocker]]:
    """Step 3: merge overlapping candidates until none overlap; refuse pairs no bridge covers."""
    out = list(cands)
    blockers: list[Blocker] = []
    changed = True
    while changed:
        changed = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                if not out[i].affected & out[j].affected:
                    continue
                combined = _combine(topo, out[i], out[j])
                if combined is None:
                    # Two overlapping resets with no common bridge: refuse both.
                    for c in (out[i], out[j]):
                        blockers.extend(
                            Blocker(t, me, f"{out[i].phrase()} and {out[j].phrase()} "
                                    "overlap and no bridge covers both")
                            for t in sorted(c.needs)
                        )
                    del out[j]
                    del out[i]
                else:
                    out[i] = combined
                    del out[j]
                changed = True
                break
            if changed:
                break
    return out, blockers

def _combine(topo: Topology, a: Candidate, b: Candidate) -> Candidate | None:
    for wide, narrow in ((a, b), (b, a)):
        if wide.affected >= narrow.affected and (
            wide.kind is not ResetKind.FUNCTION or narrow.kind is ResetKind.FUNCTION
        ):
            wide.needs |= narrow.needs
            wide.notes.extend(narrow.notes)
            if narrow.key != wide.key:
                wide.notes.append(f"subsumes {narrow.phrase()}")
            return wide
    # Neither contains the other: escalate to the nearest bridge above
    # both whose secondary bus reset reaches everything either hits.
    union = a.affected | b.affected
    start = a.target if a.kind is not ResetKind.FUNCTION else topo.parent(a.target)
    chain: list[PciAddress] = []
    while start is not None and start not in chain:
        chain.append(start)
        start = topo.parent(start)
    for bridge in chain:
        below = topo.below(bridge)
        if below >= union:
            return Candidate(
                ResetKind.BUS, bridge, set(below), a.needs | b.needs,
                notes=[*a.notes, *b.notes,
                       f"{a.phrase()} and {b.phrase()} overlap; bus reset of {bridge} covers both"],
            )
    return None
