"""The importer's intermediate form: rulesets of chains of rules with raw conditions (from iptables-save
or nft JSON), and `Match`, the conjunction of conditions a hostwall rule can express.

A `Match` is a product set of packets on the peer side of one direction: per family a set of peer
addresses (None: the family is not in the set), a protocol (None: any), destination ports and ICMP
keys (None: any). Products are closed under intersection, which is all the chain inlining needs
(flatten.py): a jump's conditions are AND-ed into every rule of the chain it jumps to. Conditions a
hostwall rule cannot express never become part of a Match: the rule is reported as untranslated
(with why), never approximated. Cost: O(intervals) per operation (intervals.Span).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..analysis.intervals import PORT_END, Span, axis_end

__all__ = ["Match", "Cond", "Origin", "IRule", "IChain", "IRuleset", "universe"]


@dataclass(frozen=True)
class Match:
    peers4: Span | None
    peers6: Span | None
    proto: str | None = None                 # tcp | udp | icmp | icmpv6 | None (any)
    ports: Span | None = None                # destination ports (tcp/udp)
    icmp: Span | None = None                 # ICMP keys type << 8 | code

    def normal(self) -> Match | None:
        p4, p6 = self.peers4, self.peers6
        if self.proto == "icmp":
            p6 = None
        if self.proto == "icmpv6":
            p4 = None
        p4 = p4 if p4 else None
        p6 = p6 if p6 else None
        if p4 is None and p6 is None:
            return None
        if self.ports is not None and not self.ports:
            return None
        if self.icmp is not None and not self.icmp:
            return None
        return Match(p4, p6, self.proto, self.ports, self.icmp)

    def __and__(self, o: Match) -> Match | None:
        if self.proto is not None and o.proto is not None and self.proto != o.proto:
            return None

        def meet(a: Span | None, b: Span | None) -> Span | None:
            return b if a is None else a if b is None else a & b

        def fam(a: Span | None, b: Span | None) -> Span | None:
            return None if a is None or b is None else a & b
        return Match(fam(self.peers4, o.peers4), fam(self.peers6, o.peers6), self.proto or o.proto,
                     meet(self.ports, o.ports), meet(self.icmp, o.icmp)).normal()

    def covers(self, o: Match) -> bool:
        """self ⊇ o (conservative: False when unsure)."""
        for a, b in ((self.peers4, o.peers4), (self.peers6, o.peers6)):
            if b is not None and (a is None or (b - a)):
                return False
        if self.proto is not None and self.proto != o.proto:
            return False
        for a, b in ((self.ports, o.ports), (self.icmp, o.icmp)):
            if a is not None and (b is None or (b - a)):
                return False
        return True

    def minus(self, r: Match, ctx: Match) -> Match:
        """self without the packets of r, when that is a product: r restricts only the peers (relative to
        ctx), so its complement is the other peers; otherwise self unchanged (exact, only less tidy)."""
        if (r.proto, r.ports, r.icmp) != (ctx.proto, ctx.ports, ctx.icmp):
            return self
        p4 = self.peers4 - r.peers4 if self.peers4 is not None and r.peers4 is not None else self.peers4
        p6 = self.peers6 - r.peers6 if self.peers6 is not None and r.peers6 is not None else self.peers6
        return Match(p4, p6, self.proto, self.ports, self.icmp).normal() or self

    def families(self) -> tuple[int, ...]:
        return tuple(f for f, s in ((4, self.peers4), (6, self.peers6)) if s is not None)


def universe(families: tuple[int, ...]) -> Match:
    return Match(Span.full(axis_end(4)) if 4 in families else None, Span.full(axis_end(6)) if 6 in families else None)


def full_ports() -> Span:
    return Span(((1, PORT_END),))


@dataclass(frozen=True)
class Origin:
    """Where a rule came from, for every line of the report: file, line, the rule as written."""
    file: str
    line: int
    text: str
    chain: str = ""
    index: int = 0                        # position in its chain (iptables counters are per position)

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else f"{self.file} ({self.chain} #{self.index + 1})"


@dataclass
class Cond:
    """One condition as the source wrote it. kind: family | src | dst | proto | dport | sport | iif | oif |
    icmp | ct | addrtype_dst | pkttype | tcpflags | frag | unsupported; value as parsed (kind-specific)."""
    kind: str
    value: Any
    neg: bool = False
    text: str = ""


@dataclass
class IRule:
    origin: Origin
    conds: list[Cond] = field(default_factory=list)
    target: str = ""                      # ACCEPT DROP REJECT RETURN LOG JUMP GOTO, or the foreign target's name
    chain_target: str | None = None       # JUMP/GOTO
    comment: str | None = None
    target_text: str = ""                 # target and its options, as written
    log: bool = False                     # nft: a log statement before the verdict (same rule)


@dataclass
class IChain:
    name: str
    hook: str | None = None               # input | output | forward | prerouting | postrouting (base chains)
    policy: str | None = None             # ACCEPT | DROP (base chains)
    rules: list[IRule] = field(default_factory=list)
    origin: Origin | None = None


@dataclass
class IRuleset:
    """One family's filter rules (iptables-save of one family, or one nft table family)."""
    source: str
    families: tuple[int, ...]
    chains: dict[str, IChain] = field(default_factory=dict)
    foreign: list[tuple[Origin, str]] = field(default_factory=list)   # rules of other tables/chains: why not
    problems: list[tuple[Origin, str]] = field(default_factory=list)  # unreadable lines: bad input (exit 2)
