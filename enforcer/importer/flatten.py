"""Inline a ruleset's chains into one first-match list per direction, exactly, or say why not.

Translation scope (docs/policy.md "Import"): packets of the protected interface, addressed to this host
(ingress: INPUT) or sent by it (egress: OUTPUT), unicast. Within it, a condition on the local side
(-d on INPUT, -s on OUTPUT, addrtype, pkttype, -i/-o) has one value: true or false, decided from the
interface and this host's addresses (--interface, --local-address); a condition that only holds for
broadcast or multicast destinations, or that hostwall cannot express at all (source ports, TCP flags,
rate limits, marks, sets, …), makes its rule *untranslated*: left out and listed, never approximated.

Chains are inlined with continuations: a chain is translated for a context (the conditions of the
jump that led to it) and a continuation (the complete first-match list of what follows the jump).
Walking a chain backwards, ACCEPT and DROP/REJECT rules become entries, RETURN continues with the
caller's continuation, -j CHAIN inlines the chain with "the rest of this chain" as its continuation,
-g CHAIN with the caller's. Every list ends with the base chain's policy as a catch-all, so every list
is complete for its context and the order of entries is exactly first match (intersections of products
are products, model.Match). `-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT` becomes
`defaults.stateful` (hostwall passes tracked connections before any rule); where that is not the same
(DROP rules before it, a direction without it that drops), the rule is listed with the difference.
Cost: O(entries × rules) for realistic rulesets (jumps copy only the continuation they restrict).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..analysis.intervals import PORT_END, Span, axis_end
from ..analysis.table import ICMP_KEYED
from .model import Cond, IRule, IRuleset, Match, Origin, full_ports, universe

__all__ = ["Context", "Entry", "Status", "Flattener"]

_MCAST = {4: Span(((0xE0000000, 0xF0000000), (0xFFFFFFFF, 1 << 32))), 6: Span(((0xFF << 120, 1 << 128),))}
_PROTO = {"tcp": "tcp", "6": "tcp", "udp": "udp", "17": "udp", "icmp": "icmp", "1": "icmp", "ipv6-icmp": "icmpv6",
          "icmpv6": "icmpv6", "58": "icmpv6", "all": None, "0": None}
_CT_EST = frozenset({"ESTABLISHED", "RELATED"})


@dataclass
class Context:
    interface: str = "eth0"
    local: dict[int, list[int]] = field(default_factory=dict)      # this host's addresses per family
    stateful: bool = True


@dataclass
class Entry:
    match: Match
    action: str                  # allow | deny | log | ct_established (a marker, removed at the end)
    origins: list[Origin]
    new_only: bool = False       # reached only through a conntrack NEW condition (never sees tracked packets)


@dataclass
class Status:
    """What became of one source rule (the worst over every place it was inlined)."""
    kind: str                    # translated | noted | not_here | untranslated | out_of_scope
    messages: list[str] = field(default_factory=list)

    # other_family: the rule is for the other address family only (shown only if nothing else is known)
    RANK = {"other_family": -1, "translated": 0, "not_here": 1, "noted": 2, "out_of_scope": 3, "untranslated": 4}


@dataclass
class _Resolved:
    match: Match | None = None
    never: str | None = None     # the rule cannot match on this interface / host: why
    why: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ct: str | None = None        # "established" marker
    other_family: bool = False   # `never` because the rule is for the other address family
    new_only: bool = False       # a conntrack NEW condition: the original applies it to new connections only


def _iface_match(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else pattern == name


class Flattener:
    def __init__(self, rs: IRuleset, ctx: Context):
        self.rs, self.ctx = rs, ctx
        self.status: dict[Origin, Status] = {}
        self._cache: dict[tuple[int, str, int], _Resolved] = {}
        self._log_pairs: dict[int, str] = {}       # id(ACCEPT rule) -> "log" when a LOG with equal conditions precedes it
        for ch in rs.chains.values():
            for a, b in zip(ch.rules, ch.rules[1:]):
                if a.target == "LOG" and [c.text for c in a.conds] == [c.text for c in b.conds]:
                    if b.target == "ACCEPT":
                        self._log_pairs[id(b)] = "log"
                        self.mark(a.origin, "translated", f"merged with the ACCEPT on line {b.origin.line}: action log "
                                                          "(allow and record)")
                    elif b.target in ("DROP", "REJECT"):
                        self.mark(a.origin, "noted", f"logging of the {b.target} on line {b.origin.line}: hostwall "
                                                     "records denied packets itself (deny records)")

    def mark(self, o: Origin, kind: str, msg: str | None = None) -> None:
        st = self.status.setdefault(o, Status(kind))
        if kind == "other_family" and st.kind != "other_family":
            return
        if st.kind == "other_family" and kind != "other_family":
            st.kind, st.messages = kind, []
        elif Status.RANK[kind] > Status.RANK[st.kind]:
            st.kind = kind
        if msg and msg not in st.messages:
            st.messages.append(msg)

    # ---- conditions ------------------------------------------------------------------------------
    def _local_side(self, c: Cond, d: str, fam: int, r: _Resolved) -> bool | None:
        """A condition on this host's own address: True/False within the scope, None if it decided
        the rule is untranslated (reason added)."""
        sp = c.value.get(fam)
        what = "destination" if d == "ingress" else "source"
        if sp is None:
            r.never = f"{c.text}: no IPv{fam} address"
            return False if not c.neg else True
        if sp.covers(axis_end(fam)):
            return not c.neg
        if d == "ingress" and (sp & _MCAST[fam]):
            r.why.append(f"{c.text}: matches broadcast/multicast destinations, which hostwall's rules cannot tell "
                         "apart (they match the peer's address only)")
            return None
        local = self.ctx.local.get(fam, [])
        if not local:
            r.why.append(f"{c.text}: matches this host's own {what} address; hostwall's rules match only the peer "
                         "(pass --local-address to decide it)")
            return None
        inside = [a in sp for a in local]
        if all(inside) or not any(inside):
            r.notes.append(f"{c.text}: decided for this host's address(es): {'always' if all(inside) ^ c.neg else 'never'}")
            return all(inside) ^ c.neg
        r.why.append(f"{c.text}: holds for some of this host's addresses only")
        return None

    def resolve(self, rule: IRule, d: str, fam: int) -> _Resolved:
        key = (id(rule), d, fam)
        if key in self._cache:
            return self._cache[key]
        r = _Resolved()
        m: Match | None = universe((fam,))
        end = axis_end(fam)
        peer_kind = "src" if d == "ingress" else "dst"
        for c in rule.conds:
            k = c.kind
            if k == "family":
                if c.value != fam:
                    r.never, r.other_family = f"{c.text}: an IPv{c.value} match", True
                continue
            if k in ("src", "dst"):
                if k == peer_kind:
                    sp = c.value.get(fam)
                    if sp is None and not c.neg:
                        r.never, r.other_family = f"{c.text}: no IPv{fam} address", True
                        continue
                    sp = sp or Span()
                    sp = sp.complement(end) if c.neg else sp
                    m = m and m & Match(sp if fam == 4 else None, sp if fam == 6 else None)
                    if m is None:
                        r.never = r.never or f"{c.text}: no address left"
                else:
                    v = self._local_side(c, d, fam, r)
                    if v is False:
                        r.never = r.never or f"{c.text}: never this host's address"
            elif k == "proto":
                name = _PROTO.get(c.value, "?")
                if c.neg or name == "?":
                    r.why.append(f"{c.text}: hostwall's rules match tcp, udp, icmp, icmpv6 or any protocol"
                                 + (" (not a complement)" if c.neg else ""))
                    continue
                if (name == "icmp" and fam == 6) or (name == "icmpv6" and fam == 4):
                    r.never = f"{c.text}: not a protocol of IPv{fam}"
                    continue
                m = m and m & Match(m.peers4, m.peers6, name)
            elif k == "dport":
                sp = c.value - Span.point(0)
                m = m and m & Match(m.peers4, m.peers6, ports=sp.complement(PORT_END) - Span.point(0) if c.neg else sp)
                if m is None:
                    r.never = r.never or f"{c.text}: no port left"
            elif k == "icmp":
                if not ICMP_KEYED:
                    r.why.append(f"{c.text}: this hostwall's policy language has no icmp_types (policy v2): an "
                                 "ICMP rule would match every type")
                    continue
                sp = c.value.complement(PORT_END) if c.neg else c.value
                m = m and m & Match(m.peers4, m.peers6, icmp=sp)
            elif k in ("iif", "oif"):
                if (k == "iif") != (d == "ingress"):
                    r.why.append(f"{c.text}: an {'input' if k == 'iif' else 'output'} interface in the {d} direction")
                    continue
                hit = _iface_match(c.value, self.ctx.interface) ^ c.neg
                if not hit:
                    r.never = f"{c.text}: not the protected interface {self.ctx.interface}" + (
                        " (hostwall never sees loopback traffic)" if c.value == "lo" else "")
            elif k == "ct":
                states = c.value
                if not c.neg and "ESTABLISHED" in states and states <= _CT_EST:
                    r.ct = "established"
                elif not c.neg and "NEW" in states and states <= _CT_EST | {"NEW"} and self.ctx.stateful:
                    r.notes.append(f"{c.text}: hostwall's rules see only packets that no tracked connection claims")
                    r.new_only = r.new_only or not (states & _CT_EST)
                else:
                    r.why.append(f"{c.text}: hostwall has no conntrack state match besides its own tracking "
                                 "(packets netfilter calls INVALID or UNTRACKED are judged by the rules here)")
            elif k == "addrtype_dst" and d == "ingress":
                types = {t.strip().upper() for t in str(c.value).split(",")}
                uni = bool(types & {"LOCAL", "UNICAST"})
                if uni ^ c.neg:
                    r.notes.append(f"{c.text}: true for unicast packets to this host (the translation's scope)")
                else:
                    r.why.append(f"{c.text}: applies only to broadcast/multicast/other destinations, which hostwall's "
                                 "rules cannot tell apart")
            elif k == "pkttype":
                uni = str(c.value).lower() == "unicast"
                if uni ^ c.neg:
                    r.notes.append(f"{c.text}: true for unicast packets (the translation's scope)")
                else:
                    r.why.append(f"{c.text}: applies only to broadcast/multicast packets, which hostwall's rules "
                                 "cannot tell apart")
            elif k == "sport":
                r.why.append(f"{c.text}: hostwall's rules match destination ports only")
            elif k == "tcpflags":
                r.why.append(f"{c.text}: hostwall's rules do not match TCP flags")
            elif k == "frag":
                r.why.append(f"{c.text}: hostwall's rules cannot select fragments (rules with ports never match "
                             "later fragments, rules without ports match them too)")
            else:
                r.why.append(f"{c.text or c.value}: {c.value if k == 'unsupported' else 'not understood here'}")
        if m is not None and m.ports is not None and m.proto not in ("tcp", "udp"):
            r.why.append("ports without -p tcp or -p udp")
        if m is None and r.never is None and not r.why:
            r.never = "matches no packet"
        r.match = m
        self._cache[key] = r
        return r

    # ---- chains --------------------------------------------------------------------------------
    @staticmethod
    def restrict(entries: list[Entry], m: Match) -> list[Entry]:
        """entries AND m, in order, up to the first entry that covers m (the rest is unreachable)."""
        out = []
        for e in entries:
            x = e.match & m
            if x is None:
                continue
            out.append(Entry(x, e.action, e.origins, e.new_only))
            if e.match.covers(m) and e.action != "ct_established":
                break
        return out

    def chain(self, name: str, d: str, fam: int, ctx: Match, cont: list[Entry], stack: tuple[str, ...],
              new_only: bool = False) -> list[Entry]:
        tail = cont
        ch = self.rs.chains[name]
        # a RETURN on the peers alone: the rules after it see only the other peers (keeps entries narrow)
        ctx_at: list[Match] = []
        c = ctx
        for rule in ch.rules:
            ctx_at.append(c)
            res = self.resolve(rule, d, fam)
            if rule.target == "RETURN" and res.never is None and not res.why and res.ct is None and res.match:
                r = ctx & res.match
                if r is not None:
                    c = c.minus(r, ctx)
        for i in range(len(ch.rules) - 1, -1, -1):
            rule = ch.rules[i]
            ctx = ctx_at[i]
            o = rule.origin
            res = self.resolve(rule, d, fam)
            if res.never is not None:          # exactly never here, whatever else it says
                self.mark(o, "other_family" if res.other_family else "not_here", res.never)
                continue
            if res.why:
                self.mark(o, "untranslated", "; ".join(res.why))
                continue
            fresh = new_only or res.new_only
            assert res.match is not None            # resolve: no match comes with `never` or `why`
            m = ctx & res.match
            if m is None:
                self.mark(o, "not_here", "matches nothing in the context it is reached in")
                continue
            for n in res.notes:
                self.mark(o, "noted", n)
            t = rule.target
            if res.ct == "established":
                if t != "ACCEPT" or len(rule.conds) != 1:
                    self.mark(o, "untranslated", "a conntrack ESTABLISHED/RELATED match is translated only as a rule of "
                                                 "its own with -j ACCEPT (hostwall's stateful tracking)")
                    continue
                self.mark(o, "translated", "defaults.stateful: true (tracked connections pass both ways before any rule)")
                tail = [Entry(m, "ct_established", [o])] + tail
                continue
            if t in ("ACCEPT", "DROP", "REJECT"):
                act = "allow" if t == "ACCEPT" else "deny"
                if t == "ACCEPT" and (id(rule) in self._log_pairs or rule.log):
                    act = "log"
                if t != "ACCEPT" and rule.log:
                    self.mark(o, "noted", "its log statement: hostwall records denied packets itself (deny records)")
                if t == "REJECT":
                    self.mark(o, "noted", "REJECT becomes deny: the packet is dropped without an ICMP error or RST")
                self.mark(o, "translated")
                tail = [Entry(m, act, [o], fresh)] + tail
            elif t == "RETURN":
                self.mark(o, "translated")
                tail = self.restrict(cont, m) + tail
            elif t in ("JUMP", "GOTO"):
                target = rule.chain_target
                assert target is not None           # the parser sets it on every JUMP / GOTO
                if target in stack:
                    self.mark(o, "untranslated", f"jump loop through chain {target}")
                    continue
                self.mark(o, "translated")
                after = self.restrict(tail if t == "JUMP" else cont, m)
                sub = self.chain(target, d, fam, m, after, stack + (target,), fresh)
                tail = sub if m.covers(ctx) else sub + tail
            elif t == "LOG":
                if o not in self.status:
                    self.mark(o, "untranslated", "LOG alone: hostwall's log action also decides (allow and record); "
                                                 "logging without a verdict is not translated (verdicts are unaffected)")
            else:
                self.mark(o, "untranslated", f"target {rule.target_text or t}: not a verdict hostwall has")
        return tail

    def base(self, hook: str, d: str, fam: int) -> tuple[list[Entry], str] | None:
        """The first-match list of the base chain of `hook` for one family, and its policy (allow|deny)."""
        ch = next((c for c in self.rs.chains.values() if c.hook == hook), None)
        if ch is None:
            return None
        pol = "deny" if ch.policy == "DROP" else "allow"
        u = universe((fam,))
        origin = ch.origin or Origin(self.rs.source, 0, f":{ch.name}", ch.name)
        self.mark(origin, "translated", f"chain policy {ch.policy}: the {d} default")
        return self.chain(ch.name, d, fam, u, [Entry(u, pol, [origin])], (ch.name,)), pol

    def reached(self) -> set[str]:
        """Chains reachable from INPUT and OUTPUT."""
        seen: set[str] = set()
        todo = [c.name for c in self.rs.chains.values() if c.hook in ("input", "output")]
        while todo:
            n = todo.pop()
            if n in seen or n not in self.rs.chains:
                continue
            seen.add(n)
            todo += [r.chain_target for r in self.rs.chains[n].rules if r.chain_target]
        return seen


def ports_text(sp: Span) -> list:
    """Ports as policy YAML values: 22 or "8000-8100"."""
    if sp == full_ports():
        return []
    return [s if e - s == 1 else f"{s}-{e - 1}" for s, e in sp]
