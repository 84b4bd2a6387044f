"""`hostwall-enforcer diff OLD NEW`: the traffic whose verdict changes, exactly, and the rule-level
changes that cause it (docs/policy.md "Tooling").

Verdict changes come from the compiled tables of both policies (table.py): the two partitions of each
axis are overlaid (every boundary of either), so every joint cell lies in one cell of OLD and one of
NEW and has one old and one new outcome. The cells whose verdict differs are reported as regions
(regions.py: peer ranges × protocol × ports × direction) with the deciding rule on each side: every
packet whose verdict changes lies in a reported region, and every packet of a reported region changes
(tests/tooling/test_diff.py checks both against the reference model on random policy pairs).
`by_rule` also reports traffic that keeps its verdict but changes its deciding rule (counters, log).

The stages before the rules (stages.py, docs/policy.md "Semantics"): when either policy has
`essential_icmp`, every cell is read twice where essential ICMP can apply — its packets that meet the
essential condition (passed by the pseudo-rule essential_icmp on a side that has it, judged by the
rules on the other) and the rest (judged by the rules on both) — and the regions say which (e.g.
"with hop limit 255 (essential ICMP)", "except essential ICMP"). Later fragments are judged by no
rule: they change verdict only when `audit` changes (drop ↔ would_drop, one region per direction and
family).

fqdns rules (fqdn.py) match destinations the DNS proxy learns at run time. The regions above are for
destinations in no fqdns set (there the fqdns rules match nothing, as compiled). Changes for destinations
in a set are their own kind (`fqdn_changes`): the names of both policies' fqdns rules are cut into
classes that both treat alike (fqdn.name_classes); for each, both policies are diffed with the rules
whose patterns match the class matching every destination, and the regions decided by one of those
rules on either side are reported as "for destinations learnt for NAMES". Exact for a destination learnt
for the names of one class; one learnt for names of several classes takes the first matching rule among
theirs. Rule changes of fqdns rules list the names added and removed.

The OLD side may be the running instance (enforcer/running.py reads its active tables), so
`apply --dry-run` shows what the swap would change against what is enforced, not against a file.
Cost: O(joint cells) memory and time after both owner sweeps; ~2 s for a max policy and an edited copy,
~4 s of CPU for two unrelated max policies (~6·10^4 regions; docs/benchmarks.md, suite `policy`). fqdns
changes: two compiles per name class.
"""
from __future__ import annotations

import bisect
import difflib
import ipaddress
from dataclasses import dataclass, field

import numpy as np

from ..classify import sorted_unique
from ..policy import ESSENTIAL_ICMP, Policy
from .fqdn import is_fqdn, name_classes, with_names
from .intervals import Span, cidrs
from .regions import Region, fragment_region, icmp_keys_text, regions
from .stages import COND_NONE, COND_NOT_ESS, ESS_NONE, cond_essential
from .table import ALLOW, VERDICT_NAMES, Axes, DecisionTable, decision_table, paused_gc

__all__ = ["VerdictChange", "FqdnChange", "RuleChange", "PolicyDiff", "diff_tables", "rule_changes", "setting_changes",
           "fqdn_changes", "diff"]


@dataclass(frozen=True)
class VerdictChange:
    region: Region
    old: tuple[str, str | None]        # (verdict, deciding rule or None = the default)
    new: tuple[str, str | None]

    def text(self) -> str:
        def side(v: tuple[str, str | None]) -> str:
            return f"{v[0]} ({'rule ' + repr(v[1]) if v[1] else 'default'})"
        return f"{self.region.text()}: {side(self.old)} → {side(self.new)}"

    def to_json(self, peers: bool = True) -> dict:
        return {**self.region.to_json(peers), "old": {"verdict": self.old[0], "rule": self.old[1]},
                "new": {"verdict": self.new[0], "rule": self.new[1]}}


@dataclass(frozen=True)
class FqdnChange:
    """A verdict change for destinations the DNS proxy learnt for `names` (fqdns rules' sets)."""
    names: tuple[str, ...]
    change: VerdictChange

    def text(self) -> str:
        return f"learnt for {', '.join(self.names)}: {self.change.text()}"

    def to_json(self) -> dict:
        return {"names": list(self.names), **self.change.to_json()}


@dataclass(frozen=True)
class RuleChange:
    kind: str                          # added | removed | changed | moved
    name: str
    where: str
    details: tuple[str, ...] = ()

    def text(self) -> str:
        mark = {"added": "+", "removed": "-", "changed": "~", "moved": "↕"}[self.kind]
        return f"{mark} {self.name} ({self.where}): {self.kind}" + (f": {'; '.join(self.details)}" if self.details else "")


@dataclass
class PolicyDiff:
    old_label: str
    new_label: str
    changes: list[VerdictChange] = field(default_factory=list)
    rules: list[RuleChange] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    fqdn: list[FqdnChange] = field(default_factory=list)
    has_fqdn: bool = False             # either policy has fqdns rules: the regions are for no-set destinations

    @property
    def empty(self) -> bool:
        return not (self.changes or self.rules or self.settings or self.fqdn)

    def text(self, limit: int = 200) -> str:
        out = [f"--- {self.old_label}", f"+++ {self.new_label}"]
        n = len(self.changes)
        out.append(f"verdict changes: {n} region{'s' if n != 1 else ''}"
                   + (" (destinations in no fqdns set)" if self.has_fqdn else "")
                   + (":" if n else " (no packet changes verdict)"))
        out += [f"  {c.text()}" for c in self.changes[:limit]]
        if n > limit:
            out.append(f"  … and {n - limit} more (--json lists all)")
        if self.has_fqdn:
            k = len(self.fqdn)
            out.append(f"fqdns verdict changes: {k} region{'s' if k != 1 else ''} (destinations the DNS proxy learnt "
                       "for these names, addresses known at run time)" + (":" if k else ""))
            out += [f"  {c.text()}" for c in self.fqdn[:limit]]
            if k > limit:
                out.append(f"  … and {k - limit} more (--json lists all)")
        if self.rules:
            out.append(f"rule changes: {len(self.rules)}")
            out += [f"  {r.text()}" for r in self.rules]
        if self.settings:
            out.append("settings:")
            out += [f"  {s}" for s in self.settings]
        return "\n".join(out)

    def to_json(self) -> dict:
        """Peers inline when short; a set shared by several regions or longer than 64 CIDRs is listed
        once under peer_sets and named by its index (a diff of unrelated block lists repeats them)."""
        sets: dict[tuple[int, int], int] = {}
        table: list[list[str]] = []
        changes = []
        for c in self.changes:
            j = c.to_json(peers=False)
            key = c.region.peer_key
            if key is not None and key in sets:
                j["peer_set"] = sets[key]
            else:
                nets = cidrs(c.region.family, c.region.peers)
                if key is not None and len(nets) > 64:
                    sets[key] = len(table)
                    table.append(nets)
                    j["peer_set"] = sets[key]
                else:
                    j["peers"] = nets
            changes.append(j)
        return {"old": self.old_label, "new": self.new_label, "verdict_changes": changes, "peer_sets": table,
                "fqdn_changes": [c.to_json() for c in self.fqdn],
                "rule_changes": [{"kind": r.kind, "rule": r.name, "where": r.where, "details": list(r.details)}
                                 for r in self.rules], "settings": self.settings}


# ---------------------------------------------------------------- joint axes

def _sorted_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.union1d(a, b)."""
    return sorted_unique(np.concatenate([a, b]))


def _setdiff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.setdiff1d(a, b) (sorted, unique) by sorts and a binary search."""
    ua, ub = sorted_unique(a), sorted_unique(b)
    if not len(ub):
        return ua
    i = np.minimum(np.searchsorted(ub, ua), len(ub) - 1)
    return ua[ub[i] != ua]


def _joint_peers(a: Axes, b: Axes, ga: np.ndarray, gb: np.ndarray):
    """Overlay of both peer partitions: per family the union of the interval starts, each tagged with
    the (a group, b group) it lies in."""
    u4 = _sorted_union(a.v4_starts, b.v4_starts)
    ca4 = ga[a.v4_cls[np.searchsorted(a.v4_starts, u4, side="right") - 1]]
    cb4 = gb[b.v4_cls[np.searchsorted(b.v4_starts, u4, side="right") - 1]]
    u6 = sorted(set(a.v6_starts) | set(b.v6_starts))
    ca6 = ga[a.v6_cls[[bisect.bisect_right(a.v6_starts, v) - 1 for v in u6]]]
    cb6 = gb[b.v6_cls[[bisect.bisect_right(b.v6_starts, v) - 1 for v in u6]]]
    return u4, ca4, cb4, u6, ca6, cb6


def _joint_l4(a: Axes, b: Axes, ga: np.ndarray, gb: np.ndarray):
    """Overlaid key intervals per (direction, pidx), tagged by the (a group, b group) pair; returns
    (intervals, {tag: (a group, b group)})."""
    def by_seg(ax: Axes, g: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
        out: dict[tuple[int, int], list] = {}
        for c, s, e in ax.l4_iv:
            out.setdefault((int(ax.l4_dir[c]), int(ax.l4_pidx[c])), []).append((s, e, int(g[c])))
        return out
    sa, sb = by_seg(a, ga), by_seg(b, gb)
    pairs: dict[tuple[int, int], int] = {}
    ivs = []
    for seg in sorted(set(sa) | set(sb)):
        la, lb = sorted(sa.get(seg, [])), sorted(sb.get(seg, []))
        bounds = sorted({s for s, _, _ in la} | {e for _, e, _ in la} | {s for s, _, _ in lb} | {e for _, e, _ in lb})
        starts_a = [s for s, _, _ in la]
        starts_b = [s for s, _, _ in lb]
        for s, e in zip(bounds, bounds[1:]):
            i, j = bisect.bisect_right(starts_a, s) - 1, bisect.bisect_right(starts_b, s) - 1
            if i < 0 or j < 0 or s >= la[i][1] or s >= lb[j][1]:
                continue                          # outside the key domain of one side (never: same domain)
            tag = pairs.setdefault((la[i][2], lb[j][2]), len(pairs))
            ivs.append((seg[0], seg[1], s, e, tag))
    return ivs, {v: k for k, v in pairs.items()}


def diff_tables(a: DecisionTable, b: DecisionTable, by_rule: bool = False) -> list[VerdictChange]:
    """Regions whose verdict (or, with by_rule, deciding rule) differs between a (old) and b (new).
    Works on each side's outcome groups (DecisionTable.outcome_groups), overlaid."""
    gpa, gla, fa, dira = a.outcome_groups()
    gpb, glb, fb, dirb = b.outcome_groups()
    u4, ca4, cb4, u6, ca6, cb6 = _joint_peers(a, b, gpa, gpb)
    ka = np.concatenate([ca4, ca6]).astype(np.int64)
    kb = np.concatenate([cb4, cb6]).astype(np.int64)
    fam = np.concatenate([np.full(len(ca4), 4), np.full(len(ca6), 6)])
    nb = int(gpb.max(initial=0)) + 1
    pair_key = (ka * nb + kb) * 8 + fam
    uniq, inv = np.unique(pair_key, return_inverse=True)
    pa = (uniq // 8) // nb
    pb = (uniq // 8) % nb
    l4_ivs, l4_pairs = _joint_l4(a, b, gla, glb)
    ax = Axes(u4, inv[:len(ca4)], u6, inv[len(ca4):], len(uniq), l4_ivs)
    la = np.array([l4_pairs[int(t)][0] for t in ax.l4_tag], dtype=np.int64)
    lb = np.array([l4_pairs[int(t)][1] for t in ax.l4_tag], dtype=np.int64)
    # verdicts per outcome group (small), then gathered over the joint cells; the owners are gathered
    # only at the changed cells (full owner matrices only for by_rule), from the small group tables
    gva = a.group_verdicts(fa, np.broadcast_to(dira, fa.shape))
    gvb = b.group_verdicts(fb, np.broadcast_to(dirb, fb.shape))
    old_v, new_v = gva[np.ix_(pa, la)], gvb[np.ix_(pb, lb)]
    reach = ax.reachable()
    span = max(a.nrules, b.nrules) + 3
    ess = span - 2                                        # owner code of the pseudo-rule essential_icmp
    names = {n: i for i, n in enumerate(sorted(set(a.t.names) | set(b.t.names) | {ESSENTIAL_ICMP}))}
    ida = np.array([names[n] for n in a.t.names] + [-1] * (span - a.nrules), dtype=np.int64)
    idb = np.array([names[n] for n in b.t.names] + [-1] * (span - b.nrules), dtype=np.int64)
    ida[ess] = idb[ess] = names[ESSENTIAL_ICMP]           # index -1 (default) reads a trailing -1

    def changes(ov, orr, nv, nrr, mask):
        ch = ov != nv
        if by_rule:
            ch = ch | (ida[orr] != idb[nrr])
        return np.nonzero(ch & mask)
    split = a.t.essential or b.t.essential
    if by_rule:
        rows, cols = changes(old_v, fa[np.ix_(pa, la)], new_v, fb[np.ix_(pb, lb)], reach)
    else:
        rows, cols = np.nonzero((old_v != new_v) & reach)
    conds = np.full(len(rows), COND_NOT_ESS if split else COND_NONE, dtype=np.int64)
    flat = rows * old_v.shape[1] + cols
    pick = [(rows, cols, old_v.ravel()[flat], fa[pa[rows], la[cols]], new_v.ravel()[flat], fb[pb[rows], lb[cols]],
             conds)]
    if split:                                             # the packets that meet an essential condition
        ecols = np.flatnonzero(ax.l4_ess != ESS_NONE)
        if len(ecols):
            rr, cc = np.meshgrid(np.arange(ax.n_peer), ecols, indexing="ij")
            kind = ax.essential_cells(rr.ravel(), cc.ravel()).reshape(rr.shape)

            def side(t, r, v):
                return (np.full(r.shape, ess), np.full(v.shape, ALLOW, dtype=v.dtype)) if t.essential else (r, v)
            eor, eov = side(a.t, fa[np.ix_(pa, la[ecols])], old_v[:, ecols])
            enr, env = side(b.t, fb[np.ix_(pb, lb[ecols])], new_v[:, ecols])
            er, ec = changes(eov, eor, env, enr, reach[:, ecols] & (kind != ESS_NONE))
            pick.append((er, ecols[ec], eov[er, ec], eor[er, ec], env[er, ec], enr[er, ec],
                         cond_essential(kind[er, ec])))
    rows, cols, ov, orr, nv, nrr, conds = (np.concatenate(x) for x in zip(*pick))
    out = []
    if len(rows):
        tags = (((ov.astype(np.int64) * span + orr + 1) * 4 + nv) * span + nrr + 1)

        def name(t: DecisionTable, r: int) -> str | None:
            return ESSENTIAL_ICMP if r == ess else t.t.names[r] if r >= 0 else None
        for tag, reg in regions(ax, rows, cols, tags, conds):
            t = int(tag)
            nr, t = t % span - 1, t // span
            nvv, t = t % 4, t // 4
            o, ovv = t % span - 1, t // span
            out.append(VerdictChange(reg, (VERDICT_NAMES[ovv], name(a, o)), (VERDICT_NAMES[nvv], name(b, nr))))
    if a.t.audit != b.t.audit:                            # later fragments: fragment_unmatched on both sides
        fa_, fb_ = ("would_drop" if t.audit else "drop" for t in (a.t, b.t))
        out += [VerdictChange(fragment_region(d, f), (fa_, None), (fb_, None))
                for d in ("ingress", "egress") for f in (4, 6)]
    return out


# ---------------------------------------------------------------- rules and settings

def _peers_delta(old, new) -> str | None:
    if old == new:                                   # PeerSet equality: array compares, no formatting
        return None
    if old.any != new.any:
        return f"peers {'any' if old.any else f'{len(old)} prefixes'} → {'any' if new.any else f'{len(new)} prefixes'}"

    def v4(ps) -> np.ndarray:                        # (net << 6 | len): one int64 per IPv4 prefix
        return (ps.v4_net.astype(np.int64) << 6) | ps.v4_len.astype(np.int64)

    def v6(ps) -> set:
        return {(6, n, ln) for n, ln in zip(ps.v6_net, ps.v6_len)}

    def v4_items(x: np.ndarray) -> list:
        return [(4, k >> 6, k & 63) for k in x[:4].tolist()]

    def txt(items: list) -> str:
        return ", ".join(f"{ipaddress.ip_address(n) if f == 6 else ipaddress.IPv4Address(n)}/{ln}" for f, n, ln in items[:3])
    a4, b4 = v4(old), v4(new)
    if len(a4) + len(b4) <= 256:                     # a few prefixes: sets beat setdiff1d's per-call cost
        sa, sb = set(a4.tolist()), set(b4.tolist())
        add4 = np.array(sorted(sb - sa), dtype=np.int64)
        rem4 = np.array(sorted(sa - sb), dtype=np.int64)
    else:
        add4, rem4 = _setdiff(b4, a4), _setdiff(a4, b4)          # sorted, unique
    a6, b6 = v6(old), v6(new)
    add = v4_items(add4) + sorted(b6 - a6)
    rem = v4_items(rem4) + sorted(a6 - b6)
    n_add, n_rem = len(add4) + len(b6 - a6), len(rem4) + len(a6 - b6)
    parts = []
    if n_add:
        parts.append(f"+{n_add} ({txt(add)}{', …' if n_add > 3 else ''})")
    if n_rem:
        parts.append(f"-{n_rem} ({txt(rem)}{', …' if n_rem > 3 else ''})")
    return "peers " + " ".join(parts)


def _ranges(v, icmp: bool = False) -> str:
    if v is None:
        return "any"
    if icmp:                                         # type << 8 | code keys, as "type 3 code 4"
        return "[" + icmp_keys_text(Span.of((a, b + 1) for a, b in v), limit=1 << 16) + "]"
    return "[" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in v) + "]"


def _names(names, mark: str = "") -> str:
    return f"{mark}[{', '.join(names)}]" if names else ""


def rule_changes(old_rules, new_rules, old_src: str = "old", new_src: str = "new") -> list[RuleChange]:
    """Added, removed, changed (field by field) and moved rules, by name. Rules are Rule objects or
    anything with name, priority, direction, action (and optionally protocol, peers, ports, line)."""
    old = {r.name: r for r in old_rules}
    new = {r.name: r for r in new_rules}
    out = []

    def where(r, src) -> str:
        return f"{src}:{r.line}" if getattr(r, "line", 0) else src
    for r in new_rules:
        if r.name not in old:
            out.append(RuleChange("added", r.name, where(r, new_src), (f"{r.direction} {r.action}",)
                                  + ((f"fqdns {_names(r.fqdns)}",) if getattr(r, "fqdns", None) else ())))
    for r in old_rules:
        if r.name not in new:
            out.append(RuleChange("removed", r.name, where(r, old_src), (f"{r.direction} {r.action}",)
                                  + ((f"fqdns {_names(r.fqdns)}",) if getattr(r, "fqdns", None) else ())))
    for r in new_rules:
        o = old.get(r.name)
        if o is None:
            continue
        det = [f"{f} {getattr(o, f)} → {getattr(r, f)}" for f in ("priority", "direction", "action", "protocol")
               if hasattr(o, f) and getattr(o, f) != getattr(r, f)]
        of, nf = getattr(o, "fqdns", None), getattr(r, "fqdns", None)
        if of is not None or nf is not None:
            if of is None or nf is None:
                det.append(f"destinations {'peers' if of is None else 'fqdns ' + _names(of)} → "
                           f"{'peers' if nf is None else 'fqdns ' + _names(nf)}")
            elif of != nf:
                det.append("fqdns " + " ".join(x for x in (_names(sorted(set(nf) - set(of)), "+"),
                                                           _names(sorted(set(of) - set(nf)), "-")) if x))
        if hasattr(o, "peers") and of is None and nf is None:
            pd = _peers_delta(o.peers, r.peers)
            if pd:
                det.append(pd)
        for f in ("ports", "icmp_types"):
            if hasattr(o, f) and getattr(o, f, None) != getattr(r, f, None):
                icmp = f == "icmp_types"
                det.append(f"{f} {_ranges(getattr(o, f), icmp)} → {_ranges(getattr(r, f), icmp)}")
        if det:
            out.append(RuleChange("changed", r.name, f"{where(o, old_src)} → {where(r, new_src)}", tuple(det)))
    common_old = [r.name for r in old_rules if r.name in new]
    common_new = [r.name for r in new_rules if r.name in old]
    sm = difflib.SequenceMatcher(a=common_old, b=common_new, autojunk=False)
    kept = {common_old[blk.a + k] for blk in sm.get_matching_blocks() for k in range(blk.size)}
    pos_old = {n: i for i, n in enumerate(common_old)}
    for i, n in enumerate(common_new):
        if n not in kept:
            out.append(RuleChange("moved", n, where(new[n], new_src),
                                  (f"tried {pos_old[n] + 1}. → {i + 1}. among the rules of both",)))
    return out


def setting_changes(old: Policy, new: Policy) -> list[str]:
    out = []
    for f in ("ingress", "egress", "stateful", "audit", "essential_icmp"):
        a, b = getattr(old.defaults, f, None), getattr(new.defaults, f, None)
        if a != b:
            out.append(f"defaults.{f}: {_setting(a)} → {_setting(b)}")
    for n in sorted(set(old.dos_profiles) | set(new.dos_profiles)):
        a, b = old.dos_profiles.get(n), new.dos_profiles.get(n)
        if a != b:
            out.append(f"dos profile {n!r}: {'added' if a is None else 'removed' if b is None else 'changed'}")
    oi = {i.name: i for i in old.interfaces}
    ni = {i.name: i for i in new.interfaces}
    for n in sorted(set(oi) | set(ni)):
        if oi.get(n) != ni.get(n):
            out.append(f"interface {n}: {_interface(oi.get(n))} → {_interface(ni.get(n))}")
    return out


def _setting(v) -> str:
    """A default as the policy file spells it (docs/policy.md: `true`/`false`), not Python's True/False."""
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _interface(i) -> str:
    """An `interfaces` entry as the policy file's keys, or `none` (an interface added or removed)."""
    return "none" if i is None else f"xdp_mode {i.xdp_mode}, dos_profile {i.dos_profile or 'none'}"


def fqdn_changes(old: Policy, new: Policy, by_rule: bool = False) -> list[FqdnChange]:
    """Verdict changes for destinations learnt for the names of each name class (module docstring):
    per class one diff of the two policies with that class's fqdns rules over every destination; the
    regions decided by one of those rules on either side. Cost: two compiles per class."""
    out = []
    for (ro, rn), names in name_classes(old, new).items():
        ch = diff_tables(decision_table(with_names(old, ro)), decision_table(with_names(new, rn)), by_rule)
        out += [FqdnChange(tuple(names), c) for c in ch if c.old[1] in ro or c.new[1] in rn]
    return out


def diff(old: Policy, new: Policy, by_rule: bool = False) -> PolicyDiff:
    with paused_gc():
        return _diff(old, new, by_rule)


def _diff(old: Policy, new: Policy, by_rule: bool) -> PolicyDiff:
    d = PolicyDiff(f"{old.source} ({old.name} revision {old.revision})", f"{new.source} ({new.name} revision {new.revision})")
    d.changes = diff_tables(decision_table(old), decision_table(new), by_rule)
    d.rules = rule_changes(old.rules, new.rules, old.source, new.source)
    d.settings = setting_changes(old, new)
    d.has_fqdn = any(is_fqdn(r) for p in (old, new) for r in p.rules)
    if d.has_fqdn:
        d.fqdn = fqdn_changes(old, new, by_rule)
    return d

