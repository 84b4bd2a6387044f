"""The loaded XDP/TC programs judge exactly like the reference evaluator (enforcer/reference.py).

Random policies (peers v4/v6, protocols, ports and ranges, ICMP types and codes by name, number and
type/code, priorities with ties, defaults, audit, essential ICMP on and off) and random packets drawn
from the same small address/port/type universe, so that rules overlap and hit often. Conntrack and
the fragment table are cleared after every packet: the packets here are judged by policy alone."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.enforcer.reference import Packet, evaluate

from .packets import frame

pytestmark = pytest.mark.bpf

V4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.2.0.0/15", "10.3.128.0/17", "0.0.0.0/1",
      "192.168.0.0/16", "10.1.2.128/25"]
V6 = ["fd00::/16", "fd00:1::/32", "fd00:1:2::/48", "fd00:1:2::3/128", "fd00:2::/31", "::/1", "fd00:1:2:0:8000::/65"]
V4_HOSTS = ["10.1.2.3", "10.1.2.200", "10.1.9.9", "10.2.0.1", "10.3.200.1", "10.9.9.9", "192.168.1.1", "11.0.0.1",
            "200.1.1.1", "10.3.127.255", "10.1.2.127", "10.1.2.128"]
V6_HOSTS = ["fd00:1:2::3", "fd00:1:2::4", "fd00:1:3::1", "fd00:2::1", "fd00:3::1", "fd01::1", "2001:db8::1",
            "fd00:1:2:0:8000::1", "fd00:1:2:0:7fff::1", "::1:2", "fe80::1", "fe80::2", "::"]
PORTS = [1, 22, 53, 80, 443, 8000, 8050, 8100, 8101, 65535]
# icmp_types entries of rules, and the (type, code) of packets, per family: names, numbers, type/code,
# the essential messages (ND, MLD, path-MTU errors) and their neighbours
ICMP_SPECS = {
    4: ["echo-request", "echo-reply", 8, 0, 3, "3/4", "3/3", "destination-unreachable/fragmentation-needed",
        "time-exceeded", "11/1", 5, "redirect/host-redirect", "timestamp", "12/0", 255, "255/255"],
    6: ["echo-request", "echo-reply", 128, 1, "1/4", "packet-too-big", "2/0", 3, "time-exceeded/ttl-zero-during-transit",
        "4/1", "neighbour-solicitation", "nd-router-advert", 136, 137, 133, "mld-listener-query", 143, "131/0"],
}
ICMP_MESSAGES = {
    4: [(8, 0), (0, 0), (3, 4), (3, 3), (3, 1), (11, 0), (11, 1), (5, 1), (13, 0), (12, 0), (255, 255), (4, 0)],
    6: [(128, 0), (129, 0), (1, 4), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 1), (133, 0), (134, 0), (135, 0),
        (136, 0), (137, 0), (130, 0), (131, 0), (132, 0), (143, 0), (138, 0)],
}


def port_spec():
    single = st.sampled_from(PORTS).map(str)
    rng = st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS)).map(lambda t: f"{min(t)}-{max(t)}")
    return st.lists(st.one_of(single, rng), min_size=1, max_size=3)


@st.composite
def rules(draw, i):
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "any"]))
    r = {"name": f"r{i}", "priority": draw(st.integers(0, 5)), "direction": draw(st.sampled_from(["ingress", "egress"])),
         "action": draw(st.sampled_from(["allow", "deny", "log"])), "protocol": proto}
    if draw(st.booleans()):
        r["peers"] = draw(st.lists(st.sampled_from(V4 + V6), min_size=1, max_size=4, unique=True))
    if proto in ("tcp", "udp", "any") and draw(st.booleans()):
        r["ports"] = draw(port_spec())
    if proto in ("icmp", "icmpv6") and draw(st.booleans()):
        r["icmp_types"] = draw(st.lists(st.sampled_from(ICMP_SPECS[4 if proto == "icmp" else 6]),
                                        min_size=1, max_size=4))
    return r


@st.composite
def policies(draw):
    n = draw(st.integers(0, 10))
    rs = [draw(rules(i)) for i in range(n)]
    d = {"ingress": draw(st.sampled_from(["allow", "deny"])), "egress": draw(st.sampled_from(["allow", "deny"])),
         "stateful": draw(st.booleans()), "audit": draw(st.booleans()), "essential_icmp": draw(st.booleans())}
    import json
    return f"version: 1\nname: diff\ndefaults: {json.dumps(d)}\nrules: {json.dumps(rs)}\n"


@st.composite
def packets(draw, icmp_only: bool = False):
    fam = draw(st.sampled_from([4, 6]))
    hosts = V4_HOSTS if fam == 4 else V6_HOSTS
    proto = 1 if fam == 4 else 58
    if not icmp_only:
        proto = draw(st.sampled_from([6, 17, proto, 47]))
    frag = draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else False
    ports = proto in (6, 17)
    src, dst = draw(st.sampled_from(hosts)), draw(st.sampled_from(hosts))
    icmp = {}
    if proto in (1, 58) and not frag:
        t, code = draw(st.one_of(st.sampled_from(ICMP_MESSAGES[fam]),
                                 st.tuples(st.integers(0, 255), st.integers(0, 255))))
        inner = draw(st.sampled_from([None, dst, src, hosts[0]]))     # dst: an error about our own packet
        icmp = {"icmp_type": t, "icmp_code": code, "hop_limit": draw(st.sampled_from([1, 64, 255])),
                "inner_src": inner}
    return Packet(direction=draw(st.sampled_from(["ingress", "egress"])), family=fam,
                  src=src, dst=dst, protocol=proto,
                  sport=draw(st.sampled_from(PORTS)) if ports else 0, dport=draw(st.sampled_from(PORTS)) if ports else 0,
                  fragment=frag, **icmp)


def check(harness, policy, pkt: Packet, hooks: list[str] | None = None, clear: bool = True, **frame_kw):
    """hooks: default all that judge the packet's direction; clear=False when no earlier packet made
    conntrack state this one could meet (clearing costs ~0.1 s)."""
    want = evaluate(policy, pkt)
    hooks = hooks or (["xdp", "tc_ingress"] if pkt.direction == "ingress" else ["tc_egress"])
    wire = frame(pkt, **frame_kw)
    for hook in hooks:
        got = harness.run(hook, wire)
        if clear:
            harness.dp.clear_conntrack()
        ctx = f"{hook} {pkt} {frame_kw}: want {want}, got {got}"
        assert got.verdict == want.verdict, ctx
        assert got.passed == (want.verdict != "drop"), ctx
        if want.verdict == "allow":
            assert got.reason == (want.reason or ("pass_rule" if want.rule else "pass_default")), ctx
        else:
            assert got.reason == want.reason, ctx
        want_slot = harness.slots[want.rule] if want.rule else None
        assert got.rule_slot == want_slot, ctx


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(policy_text=policies(), pkts=st.lists(packets(), min_size=1, max_size=25))
def test_datapath_matches_reference(harness, policy_text, pkts):
    policy = harness.install(policy_text)
    for pkt in pkts:
        check(harness, policy, pkt)


@st.composite
def icmp_policies(draw):
    """Policies of ICMP rules only (so icmp_types decide often), both families, essential on or off."""
    import json
    rs = []
    for i in range(draw(st.integers(1, 8))):
        r = draw(rules(i))
        r["protocol"] = proto = draw(st.sampled_from(["icmp", "icmpv6"]))
        r.pop("ports", None)
        if draw(st.integers(0, 3)):
            r["icmp_types"] = draw(st.lists(st.sampled_from(ICMP_SPECS[4 if proto == "icmp" else 6]),
                                            min_size=1, max_size=4))
        else:
            r.pop("icmp_types", None)
        rs.append(r)
    d = {"ingress": draw(st.sampled_from(["allow", "deny"])), "egress": draw(st.sampled_from(["allow", "deny"])),
         "audit": draw(st.booleans()), "essential_icmp": draw(st.booleans())}
    return f"version: 1\nname: icmp\ndefaults: {json.dumps(d)}\nrules: {json.dumps(rs)}\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(policy_text=icmp_policies(), pkts=st.lists(packets(icmp_only=True), min_size=1, max_size=25))
def test_icmp_types_and_codes_match_reference(harness, policy_text, pkts):
    """ICMP and ICMPv6 type/code matching (names, numbers, type/code) and essential ICMP (ND with hop
    limit 255, MLD from link-local with hop limit 1, path-MTU errors about our own packets), v4 and v6."""
    policy = harness.install(policy_text)
    for pkt in pkts:
        check(harness, policy, pkt)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(policy_text=policies(), pkts=st.lists(packets().filter(lambda p: p.family == 6 and not p.fragment),
                                             min_size=1, max_size=10),
       ext=st.lists(st.sampled_from(["hbh", "dst", "rt"]), max_size=4), vlan=st.booleans())
def test_v6_extension_headers_and_vlan_are_skipped(harness, policy_text, pkts, ext, vlan):
    policy = harness.install(policy_text)
    for pkt in pkts:
        check(harness, policy, pkt, ext=tuple(ext), vlan=vlan)


def test_first_match_by_priority_then_file_order(harness):
    policy = harness.install("""
version: 1
name: prio
defaults: {ingress: allow}
rules:
  - {name: late-allow, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [22]}
  - {name: tie-first, priority: 5, direction: ingress, action: deny, protocol: tcp, peers: [10.1.0.0/16]}
  - {name: tie-second, priority: 5, direction: ingress, action: allow, protocol: tcp, peers: [10.1.2.0/24]}
""")
    pkt = Packet("ingress", 4, "10.1.2.3", "10.9.9.9", 6, 1000, 22)
    got = harness.run("xdp", frame(pkt))
    assert (got.passed, got.reason, got.rule_slot) == (False, "policy_deny", harness.slots["tie-first"])
    assert evaluate(policy, pkt).rule == "tie-first"


def test_4096_rules_and_100k_prefixes_match_reference(harness, tmp_path):
    """The largest policy the datapath holds still judges like the reference (sampled packets)."""
    import random
    rnd = random.Random(7)
    blk = tmp_path / "block.txt"
    nets = {f"{rnd.randrange(11, 223)}.{rnd.randrange(256)}.{rnd.randrange(256)}.0/24" for _ in range(100_000)}
    blk.write_text("\n".join(sorted(nets)) + "\n")
    lines = ["version: 1", "name: big", "defaults: {ingress: deny, egress: allow}", "rules:",
             "  - {name: intel, priority: 1, direction: ingress, action: deny, peers_file: block.txt}"]
    for i in range(4095):
        a, b = rnd.randrange(11, 223), rnd.randrange(256)
        lo = rnd.randrange(1, 60000)
        lines.append(f"  - {{name: r{i}, priority: {rnd.randrange(2, 50)}, direction: {rnd.choice(['ingress', 'egress'])}, "
                     f"action: {rnd.choice(['allow', 'deny'])}, protocol: {rnd.choice(['tcp', 'udp'])}, "
                     f"peers: [{a}.{b}.0.0/16], ports: [\"{lo}-{lo + rnd.randrange(0, 500)}\"]}}")
    (tmp_path / "p.yaml").write_text("\n".join(lines) + "\n")
    from hostwall.enforcer.policy import load_policy
    policy = load_policy(tmp_path / "p.yaml")
    harness.install(policy)
    listed = sorted(nets)
    for i in range(300):
        if i % 3 == 0:
            src = listed[rnd.randrange(len(listed))].replace("0/24", str(rnd.randrange(1, 255)))
        else:
            src = str(ipaddress.IPv4Address(rnd.randrange(11 << 24, 223 << 24)))
        r = policy.rules[rnd.randrange(1, len(policy.rules))]
        port = r.ports[0][0] if r.ports and i % 2 else rnd.randrange(1, 65536)
        check(harness, policy, Packet(rnd.choice(["ingress", "egress"]), 4, src, src, 6 if i % 2 else 17, 999, port))


def _bounds(top, sub_bits: int, bucket: int, bits: int) -> list[int]:
    """Both sides of every boundary of a top-16 bucket's next `sub_bits` bits and of its sub-table entries."""
    first = int(top["first"][bucket])
    assert first & L.C["HW_SUB_FLAG"], "the bucket is not dense: the sub-table path goes untested"
    stride = 16 - ((first >> L.C["HW_SUB_SHIFT_POS"]) & 15)
    out: set[int] = set()
    for step in (16 - sub_bits, 16 - stride):
        for j in range(0, 1 << 16, 1 << step):
            at = ((bucket << 16) | j) << (bits - 32)
            out |= {at - 1, at}
    out.add(((bucket + 1) << (bits - 16)) - 1)
    return sorted(out)


def test_dense_buckets_match_reference_at_every_boundary(harness):
    """Top-16 buckets dense with prefixes (hw_sub4/6, docs/datapath.md "Classification"): a source at, and
    next to, every /24 boundary of the IPv4 bucket, every next-8-bit boundary of the IPv6 one, and every
    sub-table entry's boundary, judged like the reference (deny list, allow list, default). Every source is
    new, so no packet meets another's conntrack state; XDP judges all, TC ingress every 8th (~37 s with the program load)."""
    import json
    import random

    rnd = random.Random(11)
    deny4 = {f"10.1.{rnd.randrange(256)}.{rnd.randrange(256)}/32" for _ in range(300)}
    deny4 |= {f"10.1.{rnd.randrange(256)}.{rnd.randrange(16) * 16}/28" for _ in range(60)}
    deny6 = {f"fd00:{rnd.randrange(65536):x}:{rnd.randrange(65536):x}::/48" for _ in range(200)}
    deny6 |= {f"fd00:{rnd.randrange(65536):x}::{rnd.randrange(65536):x}/128" for _ in range(100)}
    allow = [f"10.1.{b}.0/24" for b in range(0, 256, 7)] + [f"fd00:{b:x}00::/24" for b in range(0, 256, 9)]
    text = ("version: 1\nname: dense\ndefaults: {ingress: deny, egress: allow, stateful: false}\nrules:\n"
            f"  - {{name: deny-dense, priority: 1, direction: ingress, action: deny, peers: {json.dumps(sorted(deny4 | deny6))}}}\n"
            f"  - {{name: allow-some, priority: 2, direction: ingress, action: allow, peers: {json.dumps(allow)}}}\n")
    policy = harness.install(text)
    cp = harness.compiled
    srcs = [str(ipaddress.IPv4Address(a)) for a in _bounds(cp.top4, 8, 0x0A01, 32)]
    srcs += [str(ipaddress.IPv6Address(a)) for a in _bounds(cp.top6, 8, 0xFD00, 128)]
    for i, src in enumerate(srcs):
        fam = 6 if ":" in src else 4
        check(harness, policy, Packet("ingress", fam, src, "10.9.9.9" if fam == 4 else "fd01::1", 6, 999, 80),
              hooks=["xdp", "tc_ingress"] if i % 8 == 0 else ["xdp"], clear=False)
