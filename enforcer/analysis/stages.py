"""The stages before the rules, as the exact analysis sees them (docs/policy.md "Semantics"): later
IP fragments follow their first fragment, and essential ICMP passes before any rule.

Neither stage is in the classification tables the cells come from (table.py), and both are decided by
fields the rules never read (fragment offset; hop limit, the embedded packet of an ICMP error, an
MLD sender's link-local source). So the analysis adds them as *conditions* on the cells:

- A cell whose keys are ICMP messages of one essential *kind* (below) has two variants: the packets
  that meet the kind's condition (passed as essential ICMP when `defaults.essential_icmp` is on, the
  pseudo-rule `essential_icmp`) and those that do not (judged by the rules). Every such cell has both
  (a hop limit or an embedded packet can always be otherwise), except ingress MLD, whose condition also
  asks for a link-local source (fe80::/10 or ::): only peer classes with such addresses meet it.
- Later fragments never reach the rules; statelessly they are `fragment_unmatched` (drop, or
  would_drop in audit mode). They are not in any cell; diff reports them as one region per direction
  and family when audit changes.

A region carries its condition (`COND_*`) so that "every packet of a region is judged as reported"
stays true: e.g. `ingress icmpv6 type 135 from any IPv6 with hop limit 255` (essential) beside the
same keys `with a hop limit other than 255` (rules). ICMP errors about tracked connections
(`pass_related`) depend on connection state, which no cell holds: the cells describe the packets of
no connection (as `test` cases do, whose errors embed a packet of no tracked connection). Pure data and a few set operations; no kernel imports. The kinds mirror reference.essential_icmp
and bpf/essential.h (tests/tooling checks the analysis against the reference model).
"""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, TypeVar

from hostwall.bpf import layout as L

from .intervals import V6_END, Span

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ESS_NONE", "ESS_ND", "ESS_MLD", "ESS_PMTU", "KIND_NAMES", "COND_NONE", "COND_NOT_ESS", "COND_FRAG",
           "cond_essential", "cond_kind", "essential_spans", "kinds_in", "LINK_LOCAL", "cond_text", "essential_fields",
           "kind_of_message"]

ESS_NONE, ESS_ND, ESS_MLD, ESS_PMTU = 0, 1, 2, 3
KIND_NAMES = {ESS_ND: "neighbour/router discovery", ESS_MLD: "multicast listener discovery",
              ESS_PMTU: "path-MTU error"}

# region conditions: none (every packet of the cells), "not essential ICMP" (the packets the rules
# judge where essential ICMP is on), a later fragment, or essential ICMP of one kind (4 + kind)
COND_NONE, COND_NOT_ESS, COND_FRAG = 0, 1, 2
_COND_ESS = 4
_IntOrArray = TypeVar("_IntOrArray", int, "np.ndarray")    # a condition, or one per cell


def cond_essential(kind: _IntOrArray) -> _IntOrArray:
    return _COND_ESS + kind


def cond_kind(cond: int) -> int:
    """The essential kind of an essential condition, ESS_NONE for the others."""
    return cond - _COND_ESS if cond >= _COND_ESS else ESS_NONE


_P_ICMP, _P_ICMP6 = L.PROTO_IDX["icmp"], L.PROTO_IDX["icmpv6"]


def _t(lo: int, hi: int) -> tuple[int, int]:
    """Keys of ICMP types lo..hi, every code: [lo << 8, (hi + 1) << 8)."""
    return lo << 8, (hi + 1) << 8


# per protocol index: sorted, disjoint (start, stop, kind) key ranges (reference.essential_icmp)
_SPANS: dict[int, list[tuple[int, int, int]]] = {
    _P_ICMP: [((3 << 8) | 4, ((3 << 8) | 4) + 1, ESS_PMTU)],
    _P_ICMP6: [(*_t(2, 2), ESS_PMTU), (*_t(130, 132), ESS_MLD), (*_t(133, 137), ESS_ND), (*_t(143, 143), ESS_MLD)],
}

LINK_LOCAL = Span.of([(int(ipaddress.ip_address("fe80::")), int(ipaddress.ip_address("fe80::")) + (1 << 118)),
                      (0, 1)])
assert LINK_LOCAL.iv[-1][1] < V6_END


def essential_spans(pidx: int) -> list[tuple[int, int, int]]:
    """(start, stop, kind) key ranges of a protocol index whose messages can be essential."""
    return _SPANS.get(pidx, [])


def kind_of_message(family: int, icmp_type: int, code: int) -> int:
    pidx = _P_ICMP if family == 4 else _P_ICMP6
    key = (icmp_type << 8) | code
    return next((k for s, e, k in _SPANS[pidx] if s <= key < e), ESS_NONE)


def kinds_in(protocol: str, keys: Span) -> set[int]:
    """Essential kinds whose keys meet `keys` (protocol by name; "any": both ICMP families')."""
    pidxs = [_P_ICMP, _P_ICMP6] if protocol == "any" else [L.PROTO_IDX.get(protocol, -1)]
    return {k for p in pidxs for s, e, k in _SPANS.get(p, []) if keys & Span(((s, e),))}


def _ess_phrase(kind: int, direction: str) -> tuple[str, str]:
    """(condition met, condition not met) of one kind, as words after the keys of a region."""
    if kind == ESS_ND:
        return "with hop limit 255", "with a hop limit other than 255"
    if kind == ESS_MLD:
        if direction == "ingress":          # the peer is the source: the region's peers are link-local
            return "with hop limit 1", "unless from a link-local source (fe80::/10 or ::) with hop limit 1"
        return ("with hop limit 1 from a link-local address of this host",
                "unless with hop limit 1 from a link-local address of this host")
    who = "this host" if direction == "ingress" else "the peer"
    return f"about a packet {who} sent", f"not about a packet {who} sent"


def cond_text(cond: int, direction: str, protocol: str, keys: Span) -> str:
    """The condition part of a region's text ("" for none), e.g. "with hop limit 255 (essential ICMP)"."""
    if cond == COND_NOT_ESS:
        kinds = kinds_in(protocol, keys)
        if not kinds:
            return ""
        if len(kinds) == 1 and protocol in ("icmp", "icmpv6"):
            return _ess_phrase(kinds.pop(), direction)[1]
        return "except essential ICMP"
    k = cond_kind(cond)
    if k:
        return f"{_ess_phrase(k, direction)[0]} (essential ICMP)"
    return ""


def essential_fields(kind: int, direction: str, family: int, peer: str, local: str) -> dict:
    """Packet fields that meet `kind`'s condition (reference.Packet keywords, plus "src"/"dst" when the
    local side must be link-local): ND hop limit 255; MLD hop limit 1 from a link-local source; a
    path-MTU error about a packet its destination sent."""
    if kind == ESS_ND:
        return {"hop_limit": 255}
    if kind == ESS_MLD:
        if direction == "egress":
            return {"hop_limit": 1, "src": "fe80::1"}
        return {"hop_limit": 1}
    if kind == ESS_PMTU:
        return {"inner_src": local if direction == "ingress" else peer}
    return {}
