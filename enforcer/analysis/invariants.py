"""Invariants of `test`: `never` (no packet of a set is allowed) and `always` (every packet of a set is
allowed), decided exactly over the cells of the compiled policy (table.py), no sampling.

The set (cases.Selector) is cut by the cells: the peer classes with an address in the set, the L4
classes of its direction and protocols with a key in the set. The invariant holds iff no such cell has
the wrong verdict. Essential ICMP (stages.py) passes before the rules: with `defaults.essential_icmp`
on, a `never` also fails where the set holds ICMP messages of an essential kind that can meet its
condition (hop limit, embedded packet, a link-local MLD source: the set names no such field, so it
holds both kinds of packet), and the counterexample meets it. Later fragments follow their first
fragment's verdict; they are outside every set (a set of ports names whole packets). When it does not hold, the counterexample is a concrete packet inside both the set
and a violating cell, and the reference model (enforcer/reference.py, an implementation independent of
the compiler) must judge it the same way: if it does not, that is a bug in hostwall, raised as such.
Cost: the owner sweep once per policy, then O(cells in the set) per invariant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hostwall.bpf import layout as L

from ..policy import Policy
from ..reference import evaluate
from .cases import Invariant, Selector
from .ctmodel import Outcome, outcome_of
from .intervals import PORT_END, Span, addr_text
from .packet import CasePacket
from .regions import Region, regions
from .stages import COND_NONE, ESS_MLD, ESS_NONE, LINK_LOCAL, cond_essential, cond_kind, essential_fields
from .table import ALLOW, ICMP_KEYED, PIDX_NAMES, DecisionTable

__all__ = ["InvariantResult", "check_invariant"]


class AnalysisBug(AssertionError):
    """The exact analysis and the reference model disagree: a bug in hostwall, not in the policy."""


@dataclass
class InvariantResult:
    invariant: Invariant
    holds: bool
    counterexample: CasePacket | None = None
    outcome: Outcome | None = None
    regions: list[Region] = field(default_factory=list)      # where it fails (first few), within the set
    cells: int = 0                                            # violating cells in all

    def text(self) -> str:
        inv = self.invariant
        head = f"invariant {inv.name!r} ({inv.kind}: {inv.selector.text()})"
        if self.holds:
            return f"{head}: holds"
        pkt, outcome = self.counterexample, self.outcome
        assert pkt is not None and outcome is not None    # a violated invariant has its counterexample
        out = [f"{head}: VIOLATED, e.g. `{pkt.text()}` → {outcome.text()}"]
        out += [f"    violated for {r.text()}" for r in self.regions]
        return "\n".join(out)


def _keys_of(sel: Selector, pidx_name: str) -> Span:
    if pidx_name in ("tcp", "udp") and sel.ports is not None:
        return sel.ports
    if pidx_name in ("icmp", "icmpv6") and sel.icmp_keys is not None:
        return sel.icmp_keys
    return Span.full(PORT_END)


def check_invariant(policy: Policy, dt: DecisionTable, inv: Invariant, local: dict[int, str],
                    max_regions: int = 3) -> InvariantResult:
    sel = inv.selector
    d = L.DIR[sel.direction]
    verdict = dt.verdict_matrix()
    cols_all = np.flatnonzero(dt.l4_dir == d)
    keys_by_col = {}
    cols = []
    for c in cols_all:
        name = PIDX_NAMES[int(dt.l4_pidx[c])]
        if sel.protocols is not None and name not in sel.protocols:
            continue
        k = dt.l4_spans([c])[(d, int(dt.l4_pidx[c]))] & _keys_of(sel, name)
        if k:
            keys_by_col[int(c)] = k
            cols.append(int(c))
    cols_a = np.array(cols, dtype=np.int64)
    bad_rows, bad_cols, bad_conds = [], [], []
    essential = inv.kind == "never" and dt.t.essential
    for fam, span in sorted(sel.peers.items()):
        rows = dt.peer_classes_in(fam, span)
        cf = cols_a[dt.compatible(fam)[cols_a]] if len(cols_a) else cols_a
        if not len(rows) or not len(cf):
            continue
        v = verdict[np.ix_(rows, cf)]
        bad = (v == ALLOW) if inv.kind == "never" else (v != ALLOW)
        ri, ci = np.nonzero(bad)
        bad_rows.append(rows[ri])
        bad_cols.append(cf[ci])
        bad_conds.append(np.full(len(ri), COND_NONE, dtype=np.int64))
        sub = np.flatnonzero(dt.l4_ess[cf] != ESS_NONE) if essential else ()
        if len(sub):                   # essential messages the rules would not allow pass before them
            ecf = cf[sub]
            rr, cc = np.meshgrid(rows, ecf, indexing="ij")
            kind = dt.l4_ess[cc]
            mld_in = (kind == ESS_MLD) & (dt.l4_dir[cc] == L.DIR["ingress"])
            if mld_in.any():            # ingress MLD: only from link-local sources inside the set
                ll = np.isin(rr, dt.peer_classes_in(6, span & LINK_LOCAL)) if fam == 6 else np.zeros(rr.shape, bool)
                kind = np.where(mld_in & ~ll, ESS_NONE, kind)
            ri, ci = np.nonzero(~bad[:, sub] & (kind != ESS_NONE))
            bad_rows.append(rows[ri])
            bad_cols.append(ecf[ci])
            bad_conds.append(cond_essential(kind[ri, ci]).astype(np.int64))
    rows = np.concatenate(bad_rows) if bad_rows else np.zeros(0, np.int64)
    cols_v = np.concatenate(bad_cols) if bad_cols else np.zeros(0, np.int64)
    conds = np.concatenate(bad_conds) if bad_conds else np.zeros(0, np.int64)
    if not len(rows):
        return InvariantResult(inv, True)
    # the counterexample: the first violating cell, a packet inside it and inside the set (meeting the
    # essential condition where that is what violates)
    pc, lc, cond = int(rows[0]), int(cols_v[0]), int(conds[0])
    fam = int(dt.peer_family[pc])
    within = dt.peer_span([pc], fam) & sel.peers[fam]
    if cond_kind(cond) == ESS_MLD and sel.direction == "ingress":
        within &= LINK_LOCAL
    peer = within.sample()
    name = PIDX_NAMES[int(dt.l4_pidx[lc])]
    keys = keys_by_col[lc]
    key = (keys - Span.point(0)).sample() if name in ("tcp", "udp") else None
    key = keys.first() if key is None else key
    assert peer is not None and key is not None       # the cell is inside the set: neither span is empty
    pkt = _packet(sel.direction, fam, name, addr_text(fam, peer), key, local, cond)
    out = outcome_of(evaluate(policy, pkt.reference()))
    if (out.verdict == "allow") != (inv.kind == "never"):
        raise AnalysisBug(f"invariant {inv.name!r}: the cell analysis says `{pkt.text()}` violates it, the "
                          f"reference model judges {out.text()}")
    regs = []
    for _, r in regions(dt, rows, cols_v, conds=conds):
        peers = r.peers & sel.peers.get(r.family, Span())
        keys = r.keys & _keys_of(sel, r.protocol)
        if peers and keys:
            regs.append(Region(r.direction, r.family, r.protocol, keys, peers, cond=r.cond))
        if len(regs) >= max_regions:
            break
    return InvariantResult(inv, False, pkt, out, regs, len(rows))


def _packet(direction: str, fam: int, proto: str, peer: str, key: int, local: dict[int, str],
            cond: int = COND_NONE) -> CasePacket:
    loc = local[fam]
    src, dst = (peer, loc) if direction == "ingress" else (loc, peer)
    if cond_kind(cond):                           # an essential ICMP message: the fields that make it one
        kw = essential_fields(cond_kind(cond), direction, fam, peer, loc)
        return CasePacket(direction, 1 if proto == "icmp" else 58, kw.get("src", src), dst, icmp_type=key >> 8,
                          icmp_code=key & 255, hop_limit=kw.get("hop_limit", 64), about=kw.get("inner_src"))
    if proto in ("tcp", "udp"):
        if key == 0:
            return CasePacket(direction, 6 if proto == "tcp" else 17, src, dst, fragment=True)
        return CasePacket(direction, 6 if proto == "tcp" else 17, src, dst, 40000, key, "S" if proto == "tcp" else "")
    if proto in ("icmp", "icmpv6"):
        t, c = (key >> 8, key & 255) if ICMP_KEYED else (None, 0)
        return CasePacket(direction, 1 if proto == "icmp" else 58, src, dst, icmp_type=t, icmp_code=c)
    return CasePacket(direction, 47, src, dst)
