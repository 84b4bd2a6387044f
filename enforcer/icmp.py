"""ICMP and ICMPv6 type and code names, and the `icmp_types` entries of a rule (docs/policy.md).

Names are the IANA registry names ("ICMP Type Numbers", "ICMPv6 Parameters") in lowercase with
hyphens, plus the spellings iptables/ip6tables and nftables use (echo-request, ping, ttl-exceeded,
neighbour-solicitation, …). An entry is a type (name or number 0-255: every code of it) or
"type/code" (each a name or a number): echo-request, 11, "3/4", "destination-unreachable/fragmentation-needed".

The datapath classifies ICMP by the 16-bit key (type << 8 | code) in place of a destination port, so
an entry becomes an inclusive key range: a whole type is [t << 8, t << 8 | 255]. Pure data and
parsing; no kernel imports. Cost: a dict lookup per entry.
"""
from __future__ import annotations

import difflib
from typing import Any

__all__ = ["TYPES", "CODES", "parse_icmp_type", "icmp_key", "type_name", "ECHO_REQUEST"]

# family -> {name: type}; the first name of a number is its canonical one (type_name)
TYPES: dict[int, dict[str, int]] = {
    4: {
        "echo-reply": 0, "pong": 0,
        "destination-unreachable": 3,
        "source-quench": 4,
        "redirect": 5,
        "alternate-host-address": 6,
        "echo-request": 8, "echo": 8, "ping": 8,
        "router-advertisement": 9,
        "router-solicitation": 10,
        "time-exceeded": 11, "ttl-exceeded": 11,
        "parameter-problem": 12,
        "timestamp-request": 13, "timestamp": 13,
        "timestamp-reply": 14,
        "information-request": 15, "info-request": 15,
        "information-reply": 16, "info-reply": 16,
        "address-mask-request": 17,
        "address-mask-reply": 18,
        "traceroute": 30,
        "photuris": 40,
        "extended-echo-request": 42,
        "extended-echo-reply": 43,
    },
    6: {
        "destination-unreachable": 1,
        "packet-too-big": 2,
        "time-exceeded": 3, "ttl-exceeded": 3,
        "parameter-problem": 4,
        "echo-request": 128, "ping": 128,
        "echo-reply": 129, "pong": 129,
        "multicast-listener-query": 130, "mld-listener-query": 130,
        "multicast-listener-report": 131, "mld-listener-report": 131,
        "multicast-listener-done": 132, "mld-listener-done": 132, "mld-listener-reduction": 132,
        "router-solicitation": 133, "nd-router-solicit": 133,
        "router-advertisement": 134, "nd-router-advert": 134,
        "neighbor-solicitation": 135, "neighbour-solicitation": 135, "nd-neighbor-solicit": 135,
        "neighbor-advertisement": 136, "neighbour-advertisement": 136, "nd-neighbor-advert": 136,
        "redirect": 137, "nd-redirect": 137,
        "router-renumbering": 138,
        "node-information-query": 139,
        "node-information-response": 140,
        "inverse-neighbor-discovery-solicitation": 141, "ind-neighbor-solicit": 141,
        "inverse-neighbor-discovery-advertisement": 142, "ind-neighbor-advert": 142,
        "multicast-listener-report-v2": 143, "mld2-listener-report": 143,
        "home-agent-address-discovery-request": 144,
        "home-agent-address-discovery-reply": 145,
        "mobile-prefix-solicitation": 146,
        "mobile-prefix-advertisement": 147,
        "certification-path-solicitation": 148,
        "certification-path-advertisement": 149,
        "multicast-router-advertisement": 151,
        "multicast-router-solicitation": 152,
        "multicast-router-termination": 153,
        "rpl-control": 155,
        "extended-echo-request": 160,
        "extended-echo-reply": 161,
    },
}

# (family, type) -> {code name: code}
CODES: dict[tuple[int, int], dict[str, int]] = {
    (4, 3): {
        "network-unreachable": 0, "net-unreachable": 0,
        "host-unreachable": 1,
        "protocol-unreachable": 2, "prot-unreachable": 2,
        "port-unreachable": 3,
        "fragmentation-needed": 4, "frag-needed": 4,
        "source-route-failed": 5,
        "network-unknown": 6, "net-unknown": 6,
        "host-unknown": 7,
        "source-host-isolated": 8, "host-isolated": 8,
        "network-prohibited": 9, "net-prohibited": 9,
        "host-prohibited": 10,
        "tos-network-unreachable": 11, "tos-net-unreachable": 11,
        "tos-host-unreachable": 12,
        "communication-prohibited": 13, "admin-prohibited": 13,
        "host-precedence-violation": 14,
        "precedence-cutoff": 15,
    },
    (4, 5): {
        "network-redirect": 0, "net-redirect": 0,
        "host-redirect": 1,
        "tos-network-redirect": 2, "tos-net-redirect": 2,
        "tos-host-redirect": 3,
    },
    (4, 9): {"normal-router-advertisement": 0, "does-not-route-common-traffic": 16},
    (4, 11): {
        "ttl-zero-during-transit": 0, "ttl-exceeded-in-transit": 0,
        "ttl-zero-during-reassembly": 1, "fragment-reassembly-time-exceeded": 1,
    },
    (4, 12): {
        "pointer-indicates-error": 0, "ip-header-bad": 0,
        "required-option-missing": 1, "missing-required-option": 1,
        "bad-length": 2,
    },
    (6, 1): {
        "no-route": 0,
        "communication-prohibited": 1, "admin-prohibited": 1,
        "beyond-scope": 2,
        "address-unreachable": 3, "addr-unreachable": 3,
        "port-unreachable": 4,
        "failed-policy": 5, "policy-fail": 5,
        "reject-route": 6,
        "source-routing-header-error": 7,
        "headers-too-long": 8,
    },
    (6, 3): {
        "ttl-zero-during-transit": 0, "hop-limit-exceeded": 0,
        "ttl-zero-during-reassembly": 1, "fragment-reassembly-time-exceeded": 1,
    },
    (6, 4): {
        "bad-header": 0, "erroneous-header-field": 0,
        "unknown-header-type": 1, "unrecognized-next-header": 1,
        "unknown-option": 2, "unrecognized-option": 2,
        "incomplete-header-chain": 3,
    },
}

ECHO_REQUEST = {4: 8, 6: 128}
_PROTO_FAMILY = {"icmp": 4, "icmpv6": 6}
_OTHER = {4: "icmpv6", 6: "icmp"}


def icmp_key(icmp_type: int, code: int) -> int:
    """The datapath's 16-bit L4 key of an ICMP message (bpf/classify.h l4_class)."""
    return (icmp_type << 8) | code


def type_name(family: int, icmp_type: int) -> str:
    """Canonical name of a type (its first name in TYPES), or the number as text."""
    for name, t in TYPES[family].items():
        if t == icmp_type:
            return name
    return str(icmp_type)


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def _unknown(kind: str, word: str, known: dict[str, int], where: str) -> ValueError:
    close = difflib.get_close_matches(word, list(known), n=2)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown {kind} {word!r}{where}{hint} (or give a number 0-255)")


def parse_icmp_type(value: Any, protocol: str) -> tuple[int, int]:
    """One `icmp_types` entry of a rule with `protocol` icmp or icmpv6 -> inclusive key range
    (lo, hi) over type << 8 | code. ValueError with a one-line message naming what is wrong."""
    family = _PROTO_FAMILY[protocol]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not an ICMP type; use a name like echo-request, a number 0-255 "
                         "or 'type/code' like '3/4'")
    if isinstance(value, int):
        if not 0 <= value <= 255:
            raise ValueError(f"ICMP type {value} is out of range; types are 0-255")
        return icmp_key(value, 0), icmp_key(value, 255)
    tpart, sep, cpart = value.strip().lower().partition("/")
    tpart, cpart = tpart.strip(), cpart.strip()
    if not tpart or (sep and not cpart):
        raise ValueError(f"malformed ICMP type {value!r}; use a name, a number 0-255 or 'type/code'")
    t = _number(tpart)
    if t is None:
        t = TYPES[family].get(tpart)
        if t is None:
            if tpart in TYPES[10 - family]:         # the other family's name (4 <-> 6)
                raise ValueError(f"{tpart!r} is an {_OTHER[family]} type, not {protocol}; "
                                 f"use protocol {_OTHER[family]} in a rule of its own")
            raise _unknown(f"{protocol} type", tpart, TYPES[family], "")
    elif t > 255:
        raise ValueError(f"ICMP type {t} in {value!r} is out of range; types are 0-255")
    if not sep:
        return icmp_key(t, 0), icmp_key(t, 255)
    c = _number(cpart)
    if c is None:
        codes = CODES.get((family, t), {})
        c = codes.get(cpart)
        if c is None:
            if not codes:
                raise ValueError(f"{type_name(family, t)} ({t}) has no named codes; give the code as a "
                                 f"number 0-255, like '{t}/0'")
            raise _unknown("code", cpart, codes, f" of {type_name(family, t)}")
    elif c > 255:
        raise ValueError(f"ICMP code {c} in {value!r} is out of range; codes are 0-255")
    return icmp_key(t, c), icmp_key(t, c)
