"""Reference evaluator: first match by priority (ties in file order), peers, protocols, ports,
fragments, defaults and audit; plus a randomized comparison with an independent oracle."""
from __future__ import annotations

import ipaddress

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.enforcer.policy import parse_policy
from hostwall.enforcer.reference import Decision, Packet, evaluate, match

TCP, UDP, ICMP, ICMP6, GRE = 6, 17, 1, 58, 47


def pol(rules: list[dict], **defaults) -> Policy:  # noqa: F821
    doc = {"version": 1, "name": "t", "rules": rules}
    if defaults:
        doc["defaults"] = defaults
    return parse_policy(yaml.safe_dump(doc, sort_keys=False))


def r(name: str, priority: int = 10, direction: str = "ingress", action: str = "allow", **kw) -> dict:
    return {"name": name, "priority": priority, "direction": direction, "action": action, **kw}


def pkt4(src="10.0.0.1", dst="10.9.9.9", proto=TCP, dport=80, direction="ingress", fragment=False) -> Packet:
    sport = 40000 if proto in (TCP, UDP) else 0
    return Packet(direction, 4, src, dst, proto, sport, dport if proto in (TCP, UDP) else 0, fragment)


def pkt6(src="2001:db8::1", dst="2001:db8:ffff::9", proto=TCP, dport=80, direction="ingress") -> Packet:
    return Packet(direction, 6, src, dst, proto, 40000, dport)


def test_first_match_by_priority():
    p = pol([r("late-allow", priority=20), r("early-deny", priority=5, action="deny")])
    assert evaluate(p, pkt4()) == Decision("drop", "policy_deny", "early-deny")


def test_equal_priority_keeps_file_order():
    p = pol([r("first", priority=7, action="deny"), r("second", priority=7), r("lower", priority=8)])
    assert evaluate(p, pkt4()).rule == "first"
    p = pol([r("first", priority=7), r("second", priority=7, action="deny")])
    assert evaluate(p, pkt4()) == Decision("allow", None, "first")


def test_defaults_per_direction():
    p = pol([])
    assert evaluate(p, pkt4()) == Decision("drop", "default_deny", None)
    assert evaluate(p, pkt4(direction="egress")) == Decision("allow", None, None)
    p = pol([], ingress="allow", egress="deny")
    assert evaluate(p, pkt4()) == Decision("allow", None, None)
    assert evaluate(p, pkt4(direction="egress")) == Decision("drop", "default_deny", None)


def test_rules_only_apply_to_their_direction():
    p = pol([r("out-deny", direction="egress", action="deny")])
    assert evaluate(p, pkt4(direction="egress")).rule == "out-deny"
    assert evaluate(p, pkt4()) == Decision("drop", "default_deny", None)
    assert not match(p.rules[0], pkt4())


def test_log_is_allow_with_rule():
    p = pol([r("watch", action="log")])
    assert evaluate(p, pkt4()) == Decision("allow", None, "watch")


def test_audit_turns_drops_into_would_drop():
    p = pol([r("deny-web", action="deny", ports=[80]), r("ok", ports=[22])], audit=True)
    assert evaluate(p, pkt4(dport=80)) == Decision("would_drop", "policy_deny", "deny-web")
    assert evaluate(p, pkt4(dport=443)) == Decision("would_drop", "default_deny", None)
    assert evaluate(p, pkt4(dport=22)) == Decision("allow", None, "ok")


def test_peer_is_source_on_ingress_destination_on_egress():
    p = pol([r("in", peers=["10.0.0.0/8"]), r("out", direction="egress", peers=["192.0.2.0/24"])],
            egress="deny")
    assert evaluate(p, pkt4(src="10.1.1.1", dst="192.0.2.1")).rule == "in"
    assert evaluate(p, pkt4(src="192.0.2.1", dst="10.1.1.1")).rule is None
    assert evaluate(p, pkt4(src="10.1.1.1", dst="192.0.2.1", direction="egress")).rule == "out"
    assert evaluate(p, pkt4(src="192.0.2.1", dst="10.1.1.1", direction="egress")).reason == "default_deny"


def test_v4_and_v6_peers():
    p = pol([r("mixed", peers=["10.20.0.0/16", "2001:db8:20::/48", "198.51.100.7"])])
    assert evaluate(p, pkt4(src="10.20.255.1")).rule == "mixed"
    assert evaluate(p, pkt4(src="198.51.100.7")).rule == "mixed"
    assert evaluate(p, pkt4(src="198.51.100.8")).rule is None
    assert evaluate(p, pkt4(src="10.21.0.1")).rule is None
    assert evaluate(p, pkt6(src="2001:db8:20:ffff::1")).rule == "mixed"
    assert evaluate(p, pkt6(src="2001:db8:21::1")).rule is None
    # only v4 prefixes: no IPv6 packet matches, not even an IPv4-mapped one
    p = pol([r("v4", peers=["0.0.0.0/0"])])
    assert evaluate(p, pkt4(src="203.0.113.1")).rule == "v4"
    assert evaluate(p, pkt6(src="::ffff:203.0.113.1")).rule is None
    # no peers = any address of both families
    p = pol([r("all")])
    assert evaluate(p, pkt4()).rule == "all" and evaluate(p, pkt6()).rule == "all"


def test_protocols():
    p = pol([r("t", protocol="tcp"), r("u", protocol="udp"), r("i", protocol="icmp"),
             r("i6", protocol="icmpv6"), r("rest", priority=99)])
    assert evaluate(p, pkt4(proto=TCP)).rule == "t"
    assert evaluate(p, pkt4(proto=UDP)).rule == "u"
    assert evaluate(p, pkt4(proto=ICMP)).rule == "i"
    assert evaluate(p, pkt6(proto=ICMP6, dport=0)).rule == "i6"
    assert evaluate(p, pkt4(proto=GRE)).rule == "rest"                  # any matches every protocol


def test_ports_restrict_to_tcp_udp():
    p = pol([r("web", ports=[80, "8000-8100"])])                        # protocol any + ports = tcp + udp
    for proto in (TCP, UDP):
        for port, hit in [(80, True), (8000, True), (8100, True), (8101, False), (79, False)]:
            assert (evaluate(p, pkt4(proto=proto, dport=port)).rule == "web") is hit, (proto, port)
    assert evaluate(p, pkt4(proto=ICMP)).rule is None
    assert evaluate(p, pkt4(proto=GRE)).rule is None
    p = pol([r("udp-dns", protocol="udp", ports=[53])])
    assert evaluate(p, pkt4(proto=UDP, dport=53)).rule == "udp-dns"
    assert evaluate(p, pkt4(proto=TCP, dport=53)).rule is None


def test_non_first_fragments_follow_their_first_fragment_not_the_rules():
    """A later fragment carries no ports: rules never judge it. Without the state of its first
    fragment (the datapath's fragment table) it is fragment_unmatched, whatever rules or defaults say."""
    p = pol([r("web", protocol="tcp", ports=[80]), r("peer", priority=20, peers=["10.0.0.0/8"], action="allow")],
            ingress="allow")
    assert evaluate(p, pkt4(dport=80)).rule == "web"
    frag = pkt4(dport=0, fragment=True)
    assert evaluate(p, frag) == Decision("drop", "fragment_unmatched", None)
    assert not match(p.rules[0], Packet("ingress", 4, "10.0.0.1", "10.9.9.9", TCP, 0, 80, fragment=True))
    assert match(p.rules[1], frag)                      # match() itself still sees a portless rule


def test_packet_validation():
    with pytest.raises(ValueError):
        Packet("ingress", 4, "2001:db8::1", "10.0.0.1", TCP)
    with pytest.raises(ValueError):
        Packet("sideways", 4, "10.0.0.1", "10.0.0.2", TCP)
    with pytest.raises(ValueError):
        Packet("ingress", 4, "10.0.0.1", "10.0.0.2", TCP, 0, 70000)


# ---------------------------------------------------------------- randomized comparison

PREFIXES = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "192.0.2.0/24", "0.0.0.0/0",
            "2001:db8::/32", "2001:db8:1::/48", "::/0", "2001:db8:1::5/128"]
ADDRS4 = ["10.0.0.1", "10.1.2.3", "10.1.9.9", "192.0.2.5", "203.0.113.9"]
ADDRS6 = ["2001:db8::1", "2001:db8:1::5", "2001:db8:1::6", "2001:db9::1"]
PORTS = [22, 53, 80, 443, 8000, 8080, 8100]

rule_st = st.fixed_dictionaries(
    {"priority": st.integers(0, 4), "direction": st.sampled_from(["ingress", "egress"]),
     "action": st.sampled_from(["allow", "deny", "log"])},
    optional={"protocol": st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "any"]),
              "peers": st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=3),
              "ports": st.lists(st.sampled_from([22, 53, 80, "8000-8100", "1-1024"]), min_size=1, max_size=3)})


@st.composite
def packets(draw):
    fam = draw(st.sampled_from([4, 6]))
    pool = ADDRS4 if fam == 4 else ADDRS6
    proto = draw(st.sampled_from([TCP, UDP, ICMP, ICMP6, GRE]))
    ported = proto in (TCP, UDP)
    frag = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else False
    dport = draw(st.sampled_from(PORTS)) if ported else 0      # a fragment's dport must be ignored
    return Packet(draw(st.sampled_from(["ingress", "egress"])), fam, draw(st.sampled_from(pool)),
                  draw(st.sampled_from(pool)), proto, 1234 if dport else 0, dport, frag)


def oracle(rules: list[dict], defaults: dict, pkt: Packet) -> Decision:
    """Independent restatement of docs/policy.md with ipaddress networks and a stable sort."""
    numbers = {"tcp": TCP, "udp": UDP, "icmp": ICMP, "icmpv6": ICMP6}
    if pkt.fragment:                     # follows its first fragment; no state here: unmatched
        return Decision("would_drop" if defaults["audit"] else "drop", "fragment_unmatched", None)
    peer = ipaddress.ip_address(pkt.src if pkt.direction == "ingress" else pkt.dst)
    ordered = sorted(enumerate(rules), key=lambda t: t[1]["priority"])
    for i, rl in ordered:  # noqa: B007 — i names the deciding rule after the break
        if rl["direction"] != pkt.direction:
            continue
        proto = rl.get("protocol", "any")
        if proto != "any" and numbers[proto] != pkt.protocol:
            continue
        if "ports" in rl:
            if pkt.protocol not in (TCP, UDP) or pkt.fragment:
                continue
            spans = [(int(str(x).split("-")[0]), int(str(x).split("-")[-1])) for x in rl["ports"]]
            if not any(a <= pkt.dport <= b for a, b in spans):
                continue
        if "peers" in rl and not any(peer in ipaddress.ip_network(c) for c in rl["peers"]
                                     if ipaddress.ip_network(c).version == peer.version):
            continue
        verdict, reason = ("drop", "policy_deny") if rl["action"] == "deny" else ("allow", None)
        break
    else:
        i = None
        verdict, reason = ("allow", None) if defaults[pkt.direction] == "allow" else ("drop", "default_deny")
    if verdict == "drop" and defaults["audit"]:
        verdict = "would_drop"
    return Decision(verdict, reason, None if i is None else f"r{i}")


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(rule_st, max_size=8), pkts=st.lists(packets(), min_size=1, max_size=10),
       ingress=st.sampled_from(["allow", "deny"]), egress=st.sampled_from(["allow", "deny"]), audit=st.booleans())
def test_matches_independent_oracle(rules, pkts, ingress, egress, audit):
    rules = [dict(rl, name=f"r{i}") for i, rl in enumerate(rules)]
    rules = [rl for rl in rules if not ("ports" in rl and rl.get("protocol") in ("icmp", "icmpv6"))]
    rules = [dict(rl, name=f"r{i}") for i, rl in enumerate(rules)]
    defaults = {"ingress": ingress, "egress": egress, "audit": audit}
    p = pol(rules, **defaults)
    for pkt in pkts:
        assert evaluate(p, pkt) == oracle(rules, defaults, pkt), pkt
