"""From rulesets to a hostwall policy and the report of what was and was not translated.

`translate(rulesets, ctx)` inlines INPUT and OUTPUT of every ruleset (flatten.py), decides
`defaults.stateful` from the conntrack ESTABLISHED accepts (and `defaults.essential_icmp` with it:
hostwall passes ICMP errors about tracked connections, RELATED in netfilter, only with essential ICMP
on, which also passes ND, MLD and path-MTU errors before the rules — noted on those accepts; a
ruleset without them gets essential_icmp false, so no message passes that its rules would drop), turns the entries into rules (one per
entry, named after the source rule's comment or chain and line), writes the policy YAML with the
source line of every rule above it, and simplifies it with the exact lint (analysis/lint.py):
rules that never decide a packet, and rules whose removal changes no verdict, are dropped one at a
time, so the policy is small and still exactly the same function of the packet. Every source line ends
with one status (translated, with notes; or left out, with why); nothing is left out silently.
Cost: the flattening, plus one lint per dropped rule (milliseconds each for realistic rulesets).
"""
from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from hostwall.yamldoc import PolicyError

from ..analysis.intervals import addr_text, axis_end, cidrs
from ..analysis.lint import lint
from ..policy import parse_policy
from .flatten import Context, Entry, Flattener, Status, ports_text
from .model import IRuleset, Match, Origin

__all__ = ["Translation", "translate"]


@dataclass
class Translation:
    text: str                                   # the policy YAML
    rules: int
    defaults: dict
    statuses: list[tuple[Origin, Status]]       # every source rule, in file order
    problems: list[tuple[Origin, str]] = field(default_factory=list)
    scope: str = ""

    @property
    def left_out(self) -> list[tuple[Origin, Status]]:
        return [(o, s) for o, s in self.statuses if s.kind in ("untranslated", "out_of_scope")]

    def report(self) -> str:
        out = [f"scope: {self.scope}"]
        n_src = sum(1 for _, s in self.statuses if s.kind not in ("untranslated", "out_of_scope"))
        d = self.defaults
        out.append(f"translated: {n_src} source rules → {self.rules} policy rules; defaults ingress {d['ingress']}, "
                   f"egress {d['egress']}, stateful {str(d['stateful']).lower()}, "
                   f"essential_icmp {str(d.get('essential_icmp', True)).lower()}")
        notes = [(o, s) for o, s in self.statuses if s.kind in ("noted", "not_here") and s.messages]
        if notes:
            out.append(f"notes ({len(notes)}):")
            out += [f"  {o.where()}: {o.text}\n      {'; '.join(s.messages)}" for o, s in notes]
        lo = self.left_out
        out.append(f"left out ({len(lo)}):" if lo else "left out: nothing")
        out += [f"  {o.where()}: {o.text}\n      {'; '.join(s.messages)}" for o, s in lo]
        return "\n".join(out)

    def to_json(self) -> dict:
        return {"rules": self.rules, "defaults": self.defaults, "scope": self.scope,
                "source_rules": [{"file": o.file, "line": o.line, "text": o.text, "chain": o.chain, "status": s.kind,
                                  "messages": s.messages} for o, s in self.statuses]}


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")
    return s[:56] or "rule"


def _peers(e: Entry) -> list[str] | None:
    m = e.match
    full4 = m.peers4 is not None and m.peers4.covers(axis_end(4))
    full6 = m.peers6 is not None and m.peers6.covers(axis_end(6))
    if full4 and full6:
        return None
    out = []
    for fam, sp in ((4, m.peers4), (6, m.peers6)):
        if sp is not None:
            out += cidrs(fam, sp)
    return out


def _rule_dict(e: Entry, d: str, name: str, prio: int) -> dict:
    m = e.match
    r = {"name": name, "priority": prio, "direction": d, "action": e.action}
    if m.proto:
        r["protocol"] = m.proto
    peers = _peers(e)
    if peers is not None:
        r["peers"] = peers
    if m.ports is not None and ports_text(m.ports):
        r["ports"] = ports_text(m.ports)
    if m.icmp is not None and not m.icmp.covers(65536):
        r["icmp_types"] = icmp_entries(m.icmp)
    return r


def icmp_entries(keys) -> list[str]:
    """ICMP keys (type << 8 | code spans) as icmp_types entries: a whole type as "T", else "T/C" per
    code, so a span over several types (a negated --icmp-type) is written out exactly."""
    out = []
    for s, e in keys:
        while s < e:
            whole = s % 256 == 0 and e - s >= 256
            out.append(str(s >> 8) if whole else f"{s >> 8}/{s & 255}")
            s += 256 if whole else 1
    return out


def _yaml(name: str, defaults: dict, rules: list[tuple[dict, list[Origin]]], header: list[str],
          interface: str) -> str:
    lines = [f"# {h}" for h in header]
    lines += ["version: 1", f"name: {name}", f"defaults: {json.dumps(defaults)}", "rules:" if rules else "rules: []"]
    for r, origins in rules:
        for o in origins[:4]:
            lines.append(f"  # {o.where()}: {o.text}"[:200])
        lines.append(f"  - {json.dumps(r)}")
    lines.append(f"interfaces: [{{name: {interface}}}]")
    return "\n".join(lines) + "\n"


def _simplify(rules: list[tuple[dict, list[Origin]]], render) -> list[tuple[dict, list[Origin]]]:
    """Drop rules that never decide a packet, then, one at a time from the last, rules whose removal
    changes no verdict (exact, analysis/lint.py)."""
    for _ in range(len(rules) + 1):
        try:
            pol = parse_policy(render(rules), source="<import>")
        except PolicyError:
            return rules                        # should not happen; keep the unsimplified policy
        found = lint(pol)
        dead = {f.rule for f in found if f.kind in ("shadowed", "never_matches")}
        if dead:
            rules = [x for x in rules if x[0]["name"] not in dead]
            continue
        red = [f.rule for f in found if f.kind == "redundant"]
        if not red:
            return rules
        rules = [x for x in rules if x[0]["name"] != red[-1]]
    return rules


def translate(rulesets: list[IRuleset], ctx: Context, name: str = "imported", header: Sequence[str] = ()) -> Translation:
    # pass 1: is any ESTABLISHED accept reached? (NEW conditions depend on it)
    probe = [Flattener(rs, Context(ctx.interface, ctx.local, True)) for rs in rulesets]
    stateful = False
    for fl in probe:
        for d, hook in (("ingress", "input"), ("egress", "output")):
            for fam in fl.rs.families:
                got = fl.base(hook, d, fam)
                stateful |= bool(got and any(e.action == "ct_established" for e in got[0]))
    ctx = Context(ctx.interface, ctx.local, stateful)
    fls = [Flattener(rs, ctx) for rs in rulesets]
    lists: dict[str, list[tuple[int, list[Entry], str]]] = {"ingress": [], "egress": []}
    for fl in fls:
        for d, hook in (("ingress", "input"), ("egress", "output")):
            for fam in fl.rs.families:
                got = fl.base(hook, d, fam)
                if got is not None:
                    lists[d].append((fam, got[0], got[1]))
    defaults = {"ingress": "allow", "egress": "allow", "stateful": stateful, "audit": False,
                "essential_icmp": stateful}
    markers: dict[str, list[Origin]] = {"ingress": [], "egress": []}
    for d in ("ingress", "egress"):
        if lists[d]:
            defaults[d] = lists[d][0][2]
    out: list[tuple[str, Entry]] = []
    for d in ("ingress", "egress"):
        per_fam: dict[int, list[Entry]] = {}
        for fam, entries, _pol in lists[d]:
            fl = next(f for f in fls if fam in f.rs.families)
            for k, e in enumerate(entries):
                if e.action != "ct_established":
                    continue
                markers[d] += e.origins
                fl.mark(e.origins[0], "noted", "RELATED ICMP errors pass with defaults.essential_icmp, which also passes "
                                               "IPv6 neighbour/router discovery, MLD and path-MTU errors before any "
                                               "rule (the original judges those by its rules)")
                before = [x for x in entries[:k] if x.action == "deny" and not x.new_only and (x.match & e.match) is not None]
                if before:
                    lines = ", ".join(sorted({o.where() for x in before for o in x.origins}))
                    fl.mark(e.origins[0], "untranslated",
                            f"DROP/REJECT rules before it ({lines}) also drop packets of tracked connections in the "
                            "original; hostwall passes tracked connections before any rule")
            keep = [e for e in entries if e.action != "ct_established"]
            while keep and keep[-1].action == defaults[d] and _is_catch_all(keep[-1], fam):
                keep.pop()
            per_fam[fam] = per_fam.get(fam, []) + keep
        out += [(d, e) for e in _align(per_fam.get(4, []), per_fam.get(6, []))]
    if stateful:
        for d in ("ingress", "egress"):
            other = "egress" if d == "ingress" else "ingress"
            if markers[d] or not markers[other]:
                continue
            drops = defaults[d] == "deny" or any(e.action == "deny" and not e.new_only for dd, e in out if dd == d)
            if drops:
                for o in markers[other]:
                    fl = next(f for f in fls if o.file == f.rs.source)
                    fl.mark(o, "untranslated", f"hostwall tracks connections both ways; the original has no "
                                               f"ESTABLISHED accept for {d} and judges replies there by rules that "
                                               "drop some packets")
    # rules, named after the source
    used: dict[str, int] = {}
    rules: list[tuple[dict, list[Origin]]] = []
    for i, (d, e) in enumerate(out):
        o = e.origins[0]
        src_rule = next((r for fl in fls for ch in fl.rs.chains.values() for r in ch.rules if r.origin == o), None)
        where = f"l{o.line}" if o.line else f"r{o.index + 1}"
        base = _slug(src_rule.comment) if src_rule is not None and src_rule.comment else \
            _slug(f"{(o.chain or d).split()[-1]}-{where}")
        n = used.get(base, 0) + 1
        used[base] = n
        rname = base if n == 1 else f"{base}-{n}"
        rules.append((_rule_dict(e, d, rname, 10 * (i + 1)), e.origins))

    def render(rs: list[tuple[dict, list[Origin]]]) -> str:
        return _yaml(name, defaults, rs, list(header), ctx.interface)
    rules = _simplify(rules, render)
    statuses: list[tuple[Origin, Status]] = []
    problems: list[tuple[Origin, str]] = []
    for fl in fls:
        rs = fl.rs
        reached = fl.reached()
        jumpers: dict[str, list[Origin]] = {}
        for ch in rs.chains.values():
            for r in ch.rules:
                if r.chain_target:
                    jumpers.setdefault(r.chain_target, []).append(r.origin)
        for ch in rs.chains.values():
            for r in ch.rules:
                st = fl.status.get(r.origin)
                if ch.name not in reached:
                    why = ("the FORWARD chain filters routed traffic (containers, VMs, a router): not this host's "
                           "own traffic, which hostwall judges") if ch.hook == "forward" else \
                        f"chain {ch.name} is not reached from INPUT or OUTPUT"
                    st = Status("out_of_scope", [why])
                elif st is None:
                    via = [o for o in jumpers.get(ch.name, []) if fl.status.get(o, Status("x")).kind == "untranslated"]
                    st = Status("untranslated", [f"reached only through rules that were left out (line "
                                                 f"{', '.join(str(o.line) for o in via)})"]) if via else \
                        Status("not_here", ["no packet reaches it here (the rules that lead to it cannot match)"])
                elif st.kind == "other_family":
                    st = Status("not_here", st.messages)
                statuses.append((r.origin, st))
        statuses += [(o, Status("out_of_scope", [why])) for o, why in rs.foreign]
        problems += rs.problems
    statuses.sort(key=lambda t: (t[0].file, t[0].line, t[0].index))
    local = ", ".join(addr_text(f, a) for f, v in sorted(ctx.local.items()) for a in v) or "not given"
    scope = (f"unicast packets to and from this host on {ctx.interface} (this host's addresses: {local}); "
             "broadcast and multicast traffic is judged by the same rules")
    return Translation(render(rules), len(rules), defaults, statuses, problems, scope)


def _align(a: list[Entry], b: list[Entry]) -> list[Entry]:
    """Interleave the IPv4 and IPv6 lists keeping each one's order (the families never match the same
    packet, so only the order within a family matters), merging IPv4/IPv6 entries that differ only in
    their peers and come from the same source text (longest common subsequence)."""
    def key(e: Entry) -> tuple:
        return (e.action, e.match.proto, e.match.ports, e.match.icmp, e.origins[0].text)
    sm = difflib.SequenceMatcher(a=[key(e) for e in a], b=[key(e) for e in b], autojunk=False)
    out: list[Entry] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            out += [Entry(Match(x.match.peers4, y.match.peers6, x.match.proto, x.match.ports, x.match.icmp), x.action,
                          x.origins + [o for o in y.origins if o not in x.origins], x.new_only and y.new_only)
                    for x, y in zip(a[i1:i2], b[j1:j2])]
        else:
            out += a[i1:i2] + b[j1:j2]
    return out


def _is_catch_all(e: Entry, fam: int) -> bool:
    m = e.match
    sp = m.peers4 if fam == 4 else m.peers6
    return m.proto is None and m.ports is None and m.icmp is None and sp is not None and sp.covers(axis_end(fam))

