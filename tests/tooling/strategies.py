"""Hypothesis strategies shared by the policy-tooling tests: small random policies over a small
address/port universe (so rules overlap, nest and shadow each other often) and packets drawn from the
same universe, plus points on the edges of every prefix and range (where off-by-one errors live)."""
from __future__ import annotations

import ipaddress
import json

from hypothesis import strategies as st

from hostwall.enforcer.reference import Packet

V4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.2.0.0/15", "10.3.128.0/17", "0.0.0.0/1",
      "192.168.0.0/16", "10.1.2.128/25", "0.0.0.0/0"]
V6 = ["fd00::/16", "fd00:1::/32", "fd00:1:2::/48", "fd00:1:2::3/128", "fd00:2::/31", "::/1", "fd00:1:2:0:8000::/65",
      "::/0"]
PORTS = [1, 22, 53, 80, 443, 8000, 8050, 8100, 8101, 65535]


def _edges(nets: list[str]) -> list[str]:
    out = set()
    for n in nets:
        net = ipaddress.ip_network(n)
        first, last = int(net.network_address), int(net.broadcast_address)
        cls = type(net.network_address)
        for v in (first - 1, first, first + 1, last - 1, last, last + 1):
            if 0 <= v < (1 << net.max_prefixlen):
                out.add(str(cls(v)))
    return sorted(out)


V4_HOSTS = _edges(V4) + ["11.0.0.1", "200.1.1.1", "192.168.1.1"]
V6_HOSTS = _edges(V6) + ["2001:db8::1", "fe80::1", "fd01::1"]
PORT_POINTS = sorted({p + d for p in PORTS for d in (-1, 0, 1) if 1 <= p + d <= 65535})
# icmp_types entries per protocol (names, numbers, type/code), and the (type, code) packets are drawn
# from: their edges, echo, the essential kinds (path-MTU errors, ND, MLD) and their neighbours
ICMP_SPECS = {"icmp": ["echo-request", "echo-reply", 3, "3/4", "destination-unreachable/port-unreachable", 11, "5/1",
                       0, 255, "255/255"],
              "icmpv6": ["echo-request", 2, "packet-too-big", 1, "1/4", 133, "neighbor-solicitation", 136, 137,
                         130, "mld-listener-report", 143, 0, 255, "255/255", "135/1"]}
ICMP_POINTS = {4: [(0, 0), (3, 0), (3, 3), (3, 4), (3, 5), (3, 255), (5, 1), (8, 0), (11, 0), (2, 0), (255, 255),
                   (4, 0)],
               6: [(1, 4), (2, 0), (2, 1), (3, 0), (128, 0), (129, 0), (130, 0), (131, 0), (132, 0), (133, 0),
                   (135, 0), (135, 1), (136, 0), (137, 0), (138, 0), (143, 0), (144, 0), (255, 255), (0, 0)]}
HOP_LIMITS = [64, 255, 1, 254]


def port_spec():
    single = st.sampled_from(PORTS).map(str)
    rng = st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS)).map(lambda t: f"{min(t)}-{max(t)}")
    return st.lists(st.one_of(single, rng), min_size=1, max_size=3)


@st.composite
def rule_dicts(draw, i: int, prefix: str = "r"):
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "any"]))
    r = {"name": f"{prefix}{i}", "priority": draw(st.integers(0, 5)),
         "direction": draw(st.sampled_from(["ingress", "egress"])),
         "action": draw(st.sampled_from(["allow", "deny", "log"])), "protocol": proto}
    if draw(st.booleans()):
        r["peers"] = draw(st.lists(st.sampled_from(V4 + V6), min_size=1, max_size=4, unique=True))
    if proto in ("tcp", "udp", "any") and draw(st.booleans()):
        r["ports"] = draw(port_spec())
    if proto in ("icmp", "icmpv6") and draw(st.booleans()):
        r["icmp_types"] = draw(st.lists(st.sampled_from(ICMP_SPECS[proto]), min_size=1, max_size=3))
    return r


def policy_text(rules: list[dict], defaults: dict, name: str = "t") -> str:
    return f"version: 1\nname: {name}\ndefaults: {json.dumps(defaults)}\nrules: {json.dumps(rules)}\n"


@st.composite
def defaults(draw) -> dict:
    return {"ingress": draw(st.sampled_from(["allow", "deny"])), "egress": draw(st.sampled_from(["allow", "deny"])),
            "stateful": draw(st.booleans()), "audit": draw(st.integers(0, 5)) == 0,
            "essential_icmp": draw(st.booleans())}


@st.composite
def policies(draw, max_rules: int = 10) -> str:
    n = draw(st.integers(0, max_rules))
    return policy_text([draw(rule_dicts(i)) for i in range(n)], draw(defaults()))


@st.composite
def policy_pairs(draw) -> tuple[str, str]:
    """OLD and NEW: NEW is OLD edited (rules dropped, changed, added, reordered; defaults changed), so
    the pair has both shared structure and real differences."""
    n = draw(st.integers(0, 8))
    old = [draw(rule_dicts(i)) for i in range(n)]
    new = [dict(r) for r in old if draw(st.integers(0, 4))]
    for i, r in enumerate(new):
        if draw(st.integers(0, 3)) == 0:
            new[i] = {**draw(rule_dicts(0)), "name": r["name"]}
    new += [draw(rule_dicts(i, "n")) for i in range(draw(st.integers(0, 3)))]
    new = draw(st.permutations(new)) if draw(st.booleans()) else new
    d_old = draw(defaults())
    d_new = draw(defaults()) if draw(st.integers(0, 3)) == 0 else d_old
    return policy_text(old, d_old, "old"), policy_text(new, d_new, "new")


@st.composite
def packets(draw, fragments: bool = True) -> Packet:
    fam = draw(st.sampled_from([4, 6]))
    hosts = V4_HOSTS if fam == 4 else V6_HOSTS
    proto = draw(st.sampled_from([6, 17, 1 if fam == 4 else 58, 47]))
    frag = fragments and draw(st.integers(0, 9)) == 0
    ported = proto in (6, 17) and not frag
    src, dst = draw(st.sampled_from(hosts)), draw(st.sampled_from(hosts))
    kw = {}
    if proto in (1, 58):
        t, c = draw(st.sampled_from(ICMP_POINTS[fam]))
        kw = {"icmp_type": t, "icmp_code": c, "hop_limit": draw(st.sampled_from(HOP_LIMITS)),
              "inner_src": draw(st.sampled_from([None, dst, src]))}
    return Packet(direction=draw(st.sampled_from(["ingress", "egress"])), family=fam, src=src, dst=dst,
                  protocol=proto, sport=draw(st.sampled_from(PORT_POINTS)) if ported else 0,
                  dport=draw(st.sampled_from(PORT_POINTS)) if ported else 0, fragment=frag, **kw)
