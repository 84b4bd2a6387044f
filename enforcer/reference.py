"""Pure-Python reference evaluator: the stateless policy semantics the BPF datapath must match.

First match wins over `policy.rules` (already sorted by priority, then file order), restricted to
the packet's direction. Connection tracking is modelled elsewhere, on top of this. Cost: O(rules ×
prefixes) per packet — a test oracle, not a fast path.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from .policy import Direction, Policy, Rule

__all__ = ["Packet", "Decision", "match", "evaluate", "PROTO_NUMBERS"]

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
_PORTED = (6, 17)
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Packet:
    """What the datapath knows of a packet. fragment=True: a non-first fragment (ports unknown)."""
    direction: Direction
    family: Literal[4, 6]
    src: str
    dst: str
    protocol: int
    sport: int = 0
    dport: int = 0
    fragment: bool = False

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

    @property
    def peer(self) -> IPAddr:
        """The address rules' peers are matched against: source on ingress, destination on egress."""
        return ipaddress.ip_address(self.src if self.direction == "ingress" else self.dst)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Literal["allow", "drop", "would_drop"]
    reason: str | None      # "policy_deny" | "default_deny" for drop/would_drop; None for allow
    rule: str | None        # matching rule name; None when the default applied


def match(rule: Rule, pkt: Packet) -> bool:
    """True if `rule` matches `pkt` (direction, protocol, ports, peers)."""
    return _match(rule, pkt, pkt.peer)


def _match(rule: Rule, pkt: Packet, peer: IPAddr) -> bool:
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
    return rule.peers.any or rule.peers.contains(peer)


def evaluate(policy: Policy, pkt: Packet) -> Decision:
    """Verdict of `policy` for `pkt`: first matching rule, else defaults[direction]; audit turns
    every drop into would_drop (same reason and rule)."""
    peer = pkt.peer
    for rule in policy.rules:
        if _match(rule, pkt, peer):
            if rule.action == "deny":
                return _drop(policy, "policy_deny", rule.name)
            return Decision("allow", None, rule.name)
    if getattr(policy.defaults, pkt.direction) == "allow":
        return Decision("allow", None, None)
    return _drop(policy, "default_deny", None)


def _drop(policy: Policy, reason: str, rule: str | None) -> Decision:
    return Decision("would_drop" if policy.defaults.audit else "drop", reason, rule)
