"""`hostwall-enforcer lint`: rules that cannot do what they say, decided exactly over the cells of the
compiled policy (table.py), with file:line (docs/policy.md "Tooling").

Kinds of finding, per rule r (first match wins; "cells" are the classes of packets judged alike):
- never_matches: no packet the datapath judges matches r (an empty peers file, icmp with only IPv6
  peers, icmpv6 with only IPv4 peers, …);
- shadowed: r matches packets, but every one of them is decided by an earlier rule (named);
- redundant: r decides some packets, but removing it changes no verdict and no logging: every packet
  it decides would get the same action from the next matching rule or the default;
- conflict: an earlier rule with a different verdict (allow/log vs deny) takes part of r's packets:
  named, with where (the rest of r still applies; a rule that loses everything is `shadowed`); and an
  icmp/icmpv6 deny rule over messages that essential ICMP passes before any rule (`essential_icmp`,
  with the condition: hop limit, embedded packet, link-local source; a deny of any protocol, such as
  a block list, is not flagged for them). ICMP is keyed by type and code, so
  overlapping `icmp_types` shadow and conflict like ports do. `ports` with protocol icmp can never
  match, and validation refuses it before lint runs.

fqdns rules (fqdn.py: their destinations are learnt from DNS at run time) are judged for every DNS
answer: such a rule is `shadowed` when earlier rules decide every packet of its protocol and ports
whatever the destination (a rule over every peer, or an earlier fqdns rule whose names cover its names),
`redundant` when every rule that could decide its packets next (static, fqdns, or the default) has its
action, `conflict` when an earlier rule with the other verdict decides some destinations of its ports
(its names' addresses there never reach it), and `never_matches` when the policy drops the DNS proxy's
queries to every upstream (no set is ever filled). An fqdns rule never shadows or conflicts with a later
static rule (its addresses are unknown); a static rule is redundant only if every fqdns rule that could
come between it and the next deciding rule has its action too.

Where essential ICMP is on, an ICMP message of an essential kind that meets its condition never
reaches the rules: the regions of a finding say "with a hop limit other than 255" and the like.

Cost: the owner sweep (table.DecisionTable.owners) plus one read of each rule's cells; for the max
policy (4096 rules, 110k prefixes) ~1 s after loading (docs/benchmarks.md, suite `policy`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hostwall.bpf import layout as L

from ..policy import ESSENTIAL_ICMP, Policy, Rule
from .fqdn import covers, is_fqdn, upstream_blocked
from .regions import Region, regions
from .stages import COND_NONE, COND_NOT_ESS, ESS_NONE, cond_essential
from .table import DecisionTable, decision_table, paused_gc

__all__ = ["Finding", "lint", "KINDS"]

KINDS = ("never_matches", "shadowed", "redundant", "conflict")
_DENY = L.ACTION["deny"]


@dataclass
class Finding:
    kind: str
    rule: str
    file: str
    line: int
    message: str
    related: list[str] = field(default_factory=list)
    regions: list[tuple[str, Region]] = field(default_factory=list)    # (earlier rule, where it wins)

    def text(self) -> str:
        out = f"{self.file}:{self.line}: rule {self.rule!r}: {self.kind}: {self.message}"
        for name, reg in self.regions:
            out += f"\n    {name!r} decides {reg.text()}"
        return out

    def to_json(self) -> dict:
        return {"kind": self.kind, "rule": self.rule, "file": self.file, "line": self.line, "message": self.message,
                "related": self.related, "regions": [{"rule": n, **r.to_json()} for n, r in self.regions]}


def _why_never(rule: Rule) -> str:
    ps = rule.peers
    if not ps.any and len(ps) == 0:
        return "its peers file lists no prefix, so it matches no address"
    if rule.protocol == "icmp" and not ps.any and not len(ps.v4_net):
        return "protocol icmp is IPv4's, but every peer is IPv6 (use icmpv6, or add IPv4 peers)"
    if rule.protocol == "icmpv6" and not ps.any and not ps.v6_net:
        return "protocol icmpv6 is IPv6's, but every peer is IPv4 (use icmp, or add IPv6 peers)"
    return "it matches no packet the datapath judges"


def _who(policy: Policy, orders, limit: int = 5) -> tuple[str, list[str]]:
    rules = policy.rules
    names = [rules[int(o)].name for o in orders]
    parts = [f"{rules[int(o)].name!r} (line {rules[int(o)].line}, {rules[int(o)].action})" for o in orders[:limit]]
    more = f" and {len(orders) - limit} more" if len(orders) > limit else ""
    return ", ".join(parts) + more, names


def lint(policy: Policy, dt: DecisionTable | None = None, max_regions: int = 3) -> list[Finding]:
    """Every finding, in rule order (the order rules are tried)."""
    with paused_gc():
        return _lint(policy, dt, max_regions)


def _lint(policy: Policy, dt: DecisionTable | None, max_regions: int) -> list[Finding]:
    dt = dt or decision_table(policy)
    first, second = dt.owners(second=True)
    assert second is not None                     # asked for
    rules = policy.rules
    actions = dt.t.actions
    dflt_l4 = np.array([dt.t.default[int(d)] for d in dt.l4_dir], dtype=np.int64)
    deny = (actions == _DENY).astype(np.int8)
    n = len(rules)
    wins = np.bincount(first[first >= 0].ravel(), minlength=n) if n else np.zeros(0, np.int64)
    # redundancy over the whole matrix at once: a decided cell "differs" when the next matching rule
    # (or the default of its direction) has another action; a deciding rule is redundant iff none of
    # its cells differs
    differ_count = np.zeros(n, np.int64)
    if n:
        decided = first >= 0
        nxt = np.where(second >= 0, actions[np.maximum(second, 0)], dflt_l4[None, :])
        differs = decided & (nxt != actions[np.maximum(first, 0)])
        differ_count = np.bincount(first[differs].ravel(), minlength=n)
    fq = [r for r, rule in enumerate(rules) if is_fqdn(rule)]
    for h in fq:                                  # an fqdns rule may come between a rule and the next one
        cols = dt.rule_l4[h]
        sub, sec = first[:, cols], second[:, cols]
        m = (sub >= 0) & (sub < h) & ((sec < 0) | (sec > h)) & (actions[np.maximum(sub, 0)] != actions[h])
        differ_count += np.bincount(sub[m].ravel(), minlength=n)
    blocked = upstream_blocked(policy) if fq else None
    essential = dt.t.essential
    cond = COND_NOT_ESS if essential else COND_NONE          # what the rules see of a cell
    out: list[Finding] = []
    for r, rule in enumerate(rules):
        blocks = dt.blocks(r)
        loc = (rule.name, policy.source, rule.line)
        if r in fq:
            out += _lint_fqdn(policy, dt, r, fq, first, blocked, cond, max_regions)
            continue
        if not blocks:
            out.append(Finding("never_matches", *loc, _why_never(rule)))
            continue
        if not wins[r]:
            earlier = np.unique(np.concatenate([first[np.ix_(rows, cols)].ravel() for rows, cols in blocks]))
            who, names = _who(policy, earlier[earlier != r])
            out.append(Finding("shadowed", *loc, f"never decides a packet: every packet it matches is decided "
                                                 f"earlier by {who}", names))
            continue
        if not differ_count[r]:
            what = rule.action if rule.action != "deny" else "deny (reason default_deny instead of policy_deny " \
                                                            "where the default decides)"
            out.append(Finding("redundant", *loc, f"removing it changes no verdict: every packet it decides gets "
                                                  f"the same action, {what}, from the rules after it or the default"))
        mine = deny[r]
        if essential and mine and rule.protocol in ("icmp", "icmpv6"):
            f = _essential_conflict(dt, r, blocks, first, loc, max_regions)
            if f is not None:
                out.append(f)
        conflict_cells: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for rows, cols in blocks:
            f = first[np.ix_(rows, cols)]
            bad = (f != r) & (deny[f] != mine)       # f >= 0 wherever r matches: the first owner exists
            if bad.any():
                ri, ci = np.nonzero(bad)
                conflict_cells.append((rows[ri], cols[ci], f[bad]))
        if conflict_cells:
            out.append(_conflict(policy, dt, loc, conflict_cells, cond, max_regions,
                                 "part of the traffic it matches is decided earlier with a different verdict by {}"))
    return out


def _conflict(policy: Policy, dt: DecisionTable, loc: tuple[str, str, int], cells: list, cond: int,
              max_regions: int, text: str) -> Finding:
    """The "conflict" finding over `cells`, (rows, cols, owner) triples of the cells an earlier rule (the
    owner) decides with another verdict: `text` formatted with who decides them, and up to two regions
    for each of the first max_regions of those rules."""
    rows, cols, own = (np.concatenate(x) for x in zip(*cells))
    qs = np.unique(own)
    who, names = _who(policy, qs)
    f = Finding("conflict", *loc, text.format(who), names)
    for q in qs[:max_regions]:
        sel = own == q
        for _, reg in regions(dt, rows[sel], cols[sel], conds=np.full(int(sel.sum()), cond))[:2]:
            f.regions.append((policy.rules[int(q)].name, reg))
    return f


def _essential_conflict(dt: DecisionTable, r: int, blocks, first: np.ndarray, loc: tuple[str, str, int],
                        max_regions: int) -> Finding | None:
    """A deny rule that would decide ICMP messages essential ICMP passes first: the cells it decides
    whose messages can be essential, with the condition under which they pass anyway."""
    rows_l, cols_l, kinds_l = [], [], []
    for rows, cols in blocks:
        ess_cols = cols[dt.l4_ess[cols] != ESS_NONE]
        if not len(ess_cols):
            continue
        rr, cc = np.meshgrid(rows, ess_cols, indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        kind = dt.essential_cells(rr, cc)
        keep = (kind != ESS_NONE) & (first[rr, cc] == r)
        rows_l.append(rr[keep])
        cols_l.append(cc[keep])
        kinds_l.append(kind[keep])
    if not rows_l or not sum(len(x) for x in rows_l):
        return None
    rows, cols, kinds = (np.concatenate(x) for x in (rows_l, cols_l, kinds_l))
    f = Finding("conflict", *loc, "essential ICMP passes part of the traffic it denies before any rule "
                                  "(defaults.essential_icmp; set it false to let the rules judge these messages)",
                [ESSENTIAL_ICMP])
    for _, reg in regions(dt, rows, cols, conds=cond_essential(kinds))[:max_regions]:
        f.regions.append((ESSENTIAL_ICMP, reg))
    return f


def _fqdn_blocks(dt: DecisionTable, f: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The cells an fqdns rule may match: every peer class of a family × its L4 classes of that family."""
    cols = dt.rule_l4[f]
    out = []
    for fam in (4, 6):
        rows = np.flatnonzero(dt.peer_family == fam)
        cf = cols[dt.compatible(fam)[cols]]
        if len(rows) and len(cf):
            out.append((rows, cf))
    return out


def _lint_fqdn(policy: Policy, dt: DecisionTable, f: int, fq: list[int], first: np.ndarray, blocked: list[str] | None,
               cond: int, max_regions: int) -> list[Finding]:
    """Findings of the fqdns rule `f`, true for every DNS answer (module docstring)."""
    rules, actions = policy.rules, dt.t.actions
    rule = rules[f]
    loc = (rule.name, policy.source, rule.line)
    blocks = _fqdn_blocks(dt, f)
    if not blocks:
        return [Finding("never_matches", *loc, "its protocol and ports match no packet the datapath judges")]
    if blocked:
        return [Finding("never_matches", *loc, "the policy drops the DNS proxy's queries to every upstream ("
                        + "; ".join(blocked) + "): no name resolves through the proxy, so its set stays empty")]
    covering = [g for g in fq if g < f and covers(rules[g].fqdns or (), rule.fqdns or ())]
    dflt = np.array([dt.t.default[int(d)] for d in dt.l4_dir], dtype=np.int64)
    later = [h for h in fq if h > f]
    earlier: set[int] = set()
    free_any = differs = False
    bad_cells = []
    for rows, cols in blocks:
        own = first[np.ix_(rows, cols)]
        static = (own >= 0) & (own < f)
        by_fqdn = np.zeros(len(cols), dtype=bool)
        for g in covering:
            hit = np.isin(cols, dt.rule_l4[g])
            if (hit[None, :] & ~static).any():
                earlier.add(g)
            by_fqdn |= hit
        earlier.update(np.unique(own[static]).tolist())
        free = ~static & ~by_fqdn[None, :]
        if free.any():
            free_any = True
            nxt = np.where(own >= 0, actions[np.maximum(own, 0)], dflt[cols][None, :])
            d = free & (nxt != actions[f])
            for h in later:                       # fqdns rules between f and the next static decider
                inh = np.isin(cols, dt.rule_l4[h])[None, :] & ((own < 0) | (own > h))
                d |= free & inh & (actions[h] != actions[f])
            differs = differs or bool(d.any())
        bad = static & ((actions[np.maximum(own, 0)] == _DENY) != (actions[f] == _DENY))
        if bad.any():
            ri, ci = np.nonzero(bad)
            bad_cells.append((rows[ri], cols[ci], own[bad]))
    out = []
    if not free_any:
        who, names = _who(policy, sorted(earlier))
        return [Finding("shadowed", *loc, "never decides a packet, whatever its names resolve to: every packet of its "
                                          f"protocol and ports is decided earlier by {who}", names)]
    if not differs:
        out.append(Finding("redundant", *loc, f"removing it changes no verdict, whatever its names resolve to: every "
                                              f"rule that could decide its packets next, or the default, also gives "
                                              f"{rule.action}"))
    if bad_cells:
        out.append(_conflict(policy, dt, loc, bad_cells, cond, max_regions,
                             "its names' addresses in part of its traffic never reach it: an earlier rule with a "
                             "different verdict decides there first, {}"))
    return out
