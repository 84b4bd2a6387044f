"""Pure-Python reference evaluator: the stateless policy semantics the BPF datapath must match.

Order of judgement (docs/policy.md): a later fragment follows its first fragment (state: modelled by
the fragment table; without it every later fragment is `fragment_unmatched`); essential ICMP passes
before any rule (defaults.essential_icmp); then first match wins over `policy.rules` (already sorted
by priority, then file order), restricted to the packet's direction; else the direction's default.
A rule with `fqdns` matches an egress packet whose destination one of its names resolved to: `learnt`
maps names (as asked) to the addresses the DNS proxy learnt for them and that have not expired
(docs/policy.md "FQDN rules"); without it, fqdns rules match nothing.
Connection tracking (and so ICMP errors about tracked connections, `pass_related`) is modelled
elsewhere, on top of this. Cost: O(rules × prefixes) per packet — a test oracle, not a fast path.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from hostwall.dnsnames import matches

from .icmp import ECHO_REQUEST, icmp_key
from .policy import ESSENTIAL_ICMP, Direction, Policy, Rule

__all__ = ["Packet", "Decision", "match", "evaluate", "essential_icmp", "fqdn_has", "fqdn_names", "PROTO_NUMBERS", "Learnt"]

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
_PORTED = (6, 17)
_LINK_LOCAL = ipaddress.ip_network("fe80::/10")
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
Learnt = Mapping[str, Collection[str]]


@dataclass(frozen=True, slots=True)
class Packet:
    """What the datapath knows of a packet. fragment=True: a non-first fragment (ports unknown).

    ICMP/ICMPv6 (protocol 1 / 58): icmp_type (None: an echo request of the family) and icmp_code;
    inner_src: an error's embedded packet's source address (None: the error embeds no packet).
    hop_limit: IPv4 TTL / IPv6 hop limit (neighbour discovery must arrive with 255)."""
    direction: Direction
    family: Literal[4, 6]
    src: str
    dst: str
    protocol: int
    sport: int = 0
    dport: int = 0
    fragment: bool = False
    icmp_type: int | None = None
    icmp_code: int = 0
    hop_limit: int = 64
    inner_src: str | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("ingress", "egress"):
            raise ValueError(f"direction must be ingress or egress, not {self.direction!r}")
        for a in (self.src, self.dst):
            if ipaddress.ip_address(a).version != self.family:
                raise ValueError(f"address {a!r} is not IPv{self.family}")
        if not 0 <= self.protocol <= 255:
            raise ValueError(f"protocol {self.protocol} is not an IP protocol number")
        if not (0 <= self.sport <= 65535 and 0 <= self.dport <= 65535):
            raise ValueError("ports must be 0-65535")
        if not (0 <= self.icmp_code <= 255 and 0 <= (self.icmp_type or 0) <= 255 and 0 <= self.hop_limit <= 255):
            raise ValueError("icmp_type, icmp_code and hop_limit are 0-255")

    @property
    def peer(self) -> IPAddr:
        """The address rules' peers are matched against: source on ingress, destination on egress."""
        return ipaddress.ip_address(self.src if self.direction == "ingress" else self.dst)

    @property
    def icmp(self) -> tuple[int, int]:
        """(type, code) of an ICMP packet, the echo request of its family when icmp_type is None."""
        return (ECHO_REQUEST[self.family] if self.icmp_type is None else self.icmp_type), self.icmp_code


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Literal["allow", "drop", "would_drop"]
    # drop/would_drop: "policy_deny" | "default_deny" | "fragment_unmatched"; allow: None (a rule or the
    # default) or "pass_essential" (essential ICMP, rule "essential_icmp")
    reason: str | None
    rule: str | None        # matching rule name (or the pseudo-rule); None when the default applied


def match(rule: Rule, pkt: Packet, learnt: Learnt | None = None) -> bool:
    """True if `rule` matches `pkt` (direction, protocol, ports or ICMP types, peers or fqdns)."""
    return _match(rule, pkt, pkt.peer, learnt)


def fqdn_has(rule: Rule, peer: IPAddr, learnt: Learnt | None) -> bool:
    """Is `peer` an address learnt for a name that one of the rule's fqdns patterns matches?"""
    return next(fqdn_names(rule, peer, learnt), None) is not None


def fqdn_names(rule: Rule, peer: IPAddr, learnt: Learnt | None) -> Iterator[str]:
    """The learnt names that one of the rule's fqdns patterns matches and that hold `peer`."""
    for name, ips in (learnt or {}).items():
        if any(matches(name, pat) for pat in rule.fqdns or ()) and \
                any(ipaddress.ip_address(a) == peer for a in ips):
            yield name


def _match(rule: Rule, pkt: Packet, peer: IPAddr, learnt: Learnt | None = None) -> bool:
    if rule.direction != pkt.direction:
        return False
    if rule.protocol != "any" and PROTO_NUMBERS[rule.protocol] != pkt.protocol:
        return False
    if rule.ports is not None:
        # ports restrict to tcp/udp with a known destination port (protocol any + ports = tcp+udp)
        if pkt.protocol not in _PORTED or pkt.fragment:
            return False
        if not any(lo <= pkt.dport <= hi for lo, hi in rule.ports):
            return False
    if rule.icmp_types is not None:
        # only on icmp/icmpv6 rules (validation), so the protocol test above already held
        if pkt.fragment:
            return False
        key = icmp_key(*pkt.icmp)
        if not any(lo <= key <= hi for lo, hi in rule.icmp_types):
            return False
    if rule.fqdns is not None:
        return fqdn_has(rule, peer, learnt)
    return rule.peers.any or rule.peers.contains(peer)


def essential_icmp(pkt: Packet) -> bool:
    """Does `pkt` pass as essential ICMP (defaults.essential_icmp; bpf/essential.h)? Neighbour and
    router discovery with hop limit 255; MLD from a link-local source (or ::) with hop limit 1; path-MTU
    errors (ICMPv6 packet too big, ICMP fragmentation needed) that embed a packet their destination sent."""
    if pkt.fragment:
        return False
    t, code = pkt.icmp
    ours = pkt.inner_src is not None and ipaddress.ip_address(pkt.inner_src) == ipaddress.ip_address(pkt.dst)
    if pkt.family == 6 and pkt.protocol == 58:
        if 133 <= t <= 137:
            return pkt.hop_limit == 255
        if t in (130, 131, 132, 143):
            src = ipaddress.ip_address(pkt.src)
            return pkt.hop_limit == 1 and (src in _LINK_LOCAL or src.is_unspecified)
        return t == 2 and ours
    if pkt.family == 4 and pkt.protocol == 1:
        return t == 3 and code == 4 and ours
    return False


def evaluate(policy: Policy, pkt: Packet, learnt: Learnt | None = None) -> Decision:
    """Verdict of `policy` for `pkt` with no connection state: a later fragment is fragment_unmatched;
    essential ICMP passes; else the first matching rule (fqdns rules by `learnt`), else
    defaults[direction]. Audit turns every drop into would_drop (same reason and rule)."""
    if pkt.fragment:
        return _drop(policy, "fragment_unmatched", None)
    if policy.defaults.essential_icmp and essential_icmp(pkt):
        return Decision("allow", "pass_essential", ESSENTIAL_ICMP)
    peer = pkt.peer
    for rule in policy.rules:
        if _match(rule, pkt, peer, learnt):
            if rule.action == "deny":
                return _drop(policy, "policy_deny", rule.name)
            return Decision("allow", None, rule.name)
    if getattr(policy.defaults, pkt.direction) == "allow":
        return Decision("allow", None, None)
    return _drop(policy, "default_deny", None)


def _drop(policy: Policy, reason: str, rule: str | None) -> Decision:
    return Decision("would_drop" if policy.defaults.audit else "drop", reason, rule)
