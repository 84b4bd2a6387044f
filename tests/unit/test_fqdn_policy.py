"""FQDN rules in the policy language (docs/policy.md "FQDN rules"): names and wildcards, the dns section,
every bad input reported with its line and path, set ids across swaps, the compiler's fqdn tables and
the reference model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hostwall.bpf import layout as L
from hostwall.dnsnames import PatternIndex, matches, parse_pattern
from hostwall.enforcer.compiler import CompileError, compile_policy, fqdn_lists
from hostwall.enforcer.dnspolicy import parse_endpoint
from hostwall.enforcer.fqdnsets import allocate_sets, set_key
from hostwall.enforcer.policy import PolicyError, parse_policy
from hostwall.enforcer.reference import Packet, evaluate

DNS = "dns: {upstreams: ['10.0.0.53']}\n"


def issues(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        parse_policy(text, source="p.yaml")
    return [str(i) for i in e.value.issues]


def test_patterns_and_matching():
    assert parse_pattern("Mirror.Example.COM.") == "mirror.example.com"
    assert parse_pattern("*.Pay.example.net") == "*.pay.example.net"
    assert parse_pattern("_dmarc.example.com") == "_dmarc.example.com"
    for bad, why in [("a.*.b", "only as the whole first label"), ("*foo.com", "only as the whole first label"),
                     ("*.*.com", "only once"), ("x..y", "empty label"), (".x", "empty label"), ("*.", "the name it stands under"),
                     ("-a.com", "may not start or end"), ("a" * 64 + ".com", "at most 63"),
                     ("é.com", "xn--"), ("a b.com", "may hold only"), (".".join(["abcdefgh"] * 30), "at most 253")]:
        with pytest.raises(ValueError, match=why):
            parse_pattern(bad)
    assert matches("api.pay.example.net", "*.pay.example.net")
    assert not matches("pay.example.net", "*.pay.example.net")
    assert not matches("a.api.pay.example.net", "*.pay.example.net"), "one label only, as TLS wildcards"
    assert matches("mirror.example.com", "mirror.example.com") and not matches("xmirror.example.com", "mirror.example.com")
    idx = PatternIndex([("*.b.net", 1), ("a.b.net", 2), ("a.b.net", 3)])
    assert idx.lookup("a.b.net") == {1, 2, 3} and idx.lookup("b.net") == set() and idx.lookup("x.a.b.net") == set()


def test_endpoints():
    assert parse_endpoint("127.0.0.53:53") == ("127.0.0.53", 53)
    assert parse_endpoint("10.0.0.1") == ("10.0.0.1", 53)
    assert parse_endpoint("[fd00::1]:5353") == ("fd00::1", 5353)
    assert parse_endpoint("fd00::1") == ("fd00::1", 53)
    for bad in ("dns.google:53", "1.2.3.4:0", "1.2.3.4:99999", "[fd00::1", "[fd00::1]x", "1.2.3.4:dns"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_every_bad_input_is_reported_with_line_and_path():
    text = """version: 1
name: bad
rules:
  - name: in
    priority: 1
    direction: ingress
    action: allow
    fqdns: [ok.example.com]
  - name: wild
    priority: 2
    direction: egress
    action: allow
    fqdns: ["a.*.example.com", "*x.example.com", "x..y", "é.example.com", 7]
  - name: both
    priority: 3
    direction: egress
    action: allow
    peers: [10.0.0.0/8]
    fqdns: [b.example.com]
dns:
  upstreams: ["10.0.0.53:53", "resolver.example:53"]
  listen: ["127.0.0.1:99999"]
  min_ttl: 2h
  max_ttl: 1h
"""
    got = issues(text)
    want = [
        ("p.yaml:8: rules[0].fqdns:", "egress rules only"),
        ("p.yaml:13: rules[1].fqdns[0]:", "whole first label"),
        ("p.yaml:13: rules[1].fqdns[1]:", "whole first label"),
        ("p.yaml:13: rules[1].fqdns[2]:", "empty label"),
        ("p.yaml:13: rules[1].fqdns[3]:", "xn--"),
        ("p.yaml:13: rules[1].fqdns[4]:", "must be a string"),
        ("p.yaml:19: rules[2].fqdns:", "either peers or fqdns"),
        ("p.yaml:21: dns.upstreams[1]:", "not an IP address"),
        ("p.yaml:22: dns.listen[0]:", "is not 1-65535"),
        ("p.yaml:23: dns.min_ttl:", "above max_ttl"),
    ]
    for where, what in want:
        assert any(g.startswith(where) and what in g for g in got), (where, what, got)
    assert len(got) == len(want), got


def test_fqdns_without_dns_section():
    got = issues("version: 1\nname: x\nrules:\n  - {name: a, priority: 1, direction: egress, action: allow, "
                 "fqdns: [a.example.com]}\n")
    assert len(got) == 1 and got[0].startswith("p.yaml:4: rules[0].fqdns:") and "need the dns section" in got[0]


def test_dns_section_schema_errors():
    got = issues("version: 1\nname: x\ndns: {listen: [], max_ips_per_name: 0, refuse_unlisted: maybe, "
                 "extra: 1, cache_size: -1}\n")
    joined = "\n".join(got)
    for path in ("dns.upstreams", "dns.listen", "dns.max_ips_per_name", "dns.refuse_unlisted", "dns.extra",
                 "dns.cache_size"):
        assert f": {path}:" in joined, (path, got)


def policy(rules: list[dict], egress="deny", dns: dict | None = None):
    return parse_policy(f"version: 1\nname: fq\ndefaults: {{egress: {egress}}}\nrules: {json.dumps(rules)}\n"
                        f"dns: {json.dumps(dns or {'upstreams': ['10.0.0.53']})}\n")


def test_policy_model_and_defaults():
    p = policy([{"name": "m", "priority": 1, "direction": "egress", "action": "allow",
                 "fqdns": ["B.example.com", "a.example.com", "b.example.com."]}])
    assert p.rules[0].fqdns == ("a.example.com", "b.example.com")
    d = p.dns
    assert (d.listen, d.min_ttl_s, d.max_ttl_s, d.max_ips_per_name, d.refuse_unlisted, d.cache_size) == \
        ((("127.0.0.1", 53),), 5.0, 3600.0, 256, False, 10000)
    off = policy([{"name": "m", "priority": 1, "direction": "egress", "action": "allow", "fqdns": ["a.example.com"]}],
                 dns={"upstreams": ["10.0.0.53"], "cache_size": 0}).dns
    assert off.cache_size == 0 and type(off).from_dict(off.as_dict()) == off


def test_compiler_fqdn_tables():
    rules = [{"name": "early", "priority": 1, "direction": "egress", "action": "allow", "protocol": "tcp",
              "ports": [22], "peers": ["10.0.0.0/8"]},
             {"name": "m", "priority": 2, "direction": "egress", "action": "allow", "protocol": "tcp", "ports": [443],
              "fqdns": ["a.example.com"]},
             {"name": "m2", "priority": 3, "direction": "egress", "action": "log", "fqdns": ["a.example.com"]},
             {"name": "n", "priority": 4, "direction": "egress", "action": "deny", "protocol": "udp",
              "fqdns": ["*.example.net"]}]
    p = policy(rules)
    assert fqdn_lists(p) == [("a.example.com",), ("*.example.net",)]
    cp = compile_policy(p, {r.name: i for i, r in enumerate(p.rules)}, 1, fqdn_sets={("a.example.com",): 7,
                                                                                    ("*.example.net",): 3})
    assert int(cp.hdr["fqdn_rules"][0]) == 3
    assert cp.fqdn_rules.tolist() == [(1, 7), (2, 7), (3, 3)]
    # fqdns rules are in no peer class: only the static rule has bits there
    words = cp.peer_cls["words"][:, 0]
    assert np.all((words & np.uint64(0b1110)) == 0) and np.any(words & np.uint64(1))
    # the L4 class of egress tcp/443 holds m and m2 (fqdn indices 0, 1); udp/53 holds m2 and n (1, 2)
    key = L.l4_key(L.DIR["egress"], L.PROTO_IDX["tcp"], 443)
    l4 = cp.l4["cls"].reshape(-1)
    assert int(cp.fqdn_l4["rules"][l4[key]]) == 0b011
    assert int(cp.fqdn_l4["rules"][l4[L.l4_key(L.DIR["egress"], L.PROTO_IDX["udp"], 53)]]) == 0b110
    assert int(cp.fqdn_l4["rules"][l4[L.l4_key(L.DIR["ingress"], L.PROTO_IDX["tcp"], 443)]]) == 0
    # each class's first candidate inlined (order, set): the datapath's common case reads no hw_fqdn_rules
    first = {k: tuple(int(x) for x in cp.fqdn_l4[["order0", "set0"]][l4[k]].tolist()) for k in
             (key, L.l4_key(L.DIR["egress"], L.PROTO_IDX["udp"], 53), L.l4_key(L.DIR["ingress"], L.PROTO_IDX["tcp"], 443))}
    assert list(first.values()) == [(1, 7), (2, 7), (0, 0)]


def test_too_many_fqdns_rules_do_not_fit():
    rules = [{"name": f"r{i}", "priority": i, "direction": "egress", "action": "allow", "fqdns": [f"h{i}.example.com"]}
             for i in range(L.FQDN_RULES_MAX + 1)]
    p = policy(rules)
    with pytest.raises(CompileError, match="65 rules with fqdns; the datapath holds 64"):
        compile_policy(p, {r.name: i for i, r in enumerate(p.rules)}, 1)


def test_set_ids_are_stable_and_reused_one_swap_later():
    a, b, c = ("a.com",), ("*.b.net", "b.net"), ("c.org",)
    s1, fresh = allocate_sets({}, [a, b])
    assert s1 == {set_key(a): 1, set_key(b): 2} and fresh == [1, 2]
    s2, fresh = allocate_sets(s1, [b, c])            # a retired; c must not take its id yet
    assert s2 == {set_key(b): 2, set_key(c): 3} and fresh == [3]
    s3, fresh = allocate_sets(s2, [b, c, a])
    assert s3[set_key(a)] == 1 and fresh == [1]


def test_reference_model():
    p = policy([{"name": "dns", "priority": 0, "direction": "egress", "action": "allow", "protocol": "udp",
                 "ports": [53], "peers": ["10.0.0.53/32"]},
                {"name": "m", "priority": 1, "direction": "egress", "action": "allow", "protocol": "tcp",
                 "fqdns": ["*.cdn.example.com"]}])
    pkt = Packet("egress", 4, "10.9.9.9", "10.1.1.1", 6, 40000, 443)
    assert evaluate(p, pkt).verdict == "drop"
    assert evaluate(p, pkt, {"x.cdn.example.com": ["10.1.1.1"]}).rule == "m"
    assert evaluate(p, pkt, {"x.y.cdn.example.com": ["10.1.1.1"]}).verdict == "drop"
    assert evaluate(p, pkt, {"x.cdn.example.com": ["10.1.1.2"]}).verdict == "drop"
    ingress = Packet("ingress", 4, "10.1.1.1", "10.9.9.9", 6, 443, 40000)
    assert evaluate(p, ingress, {"x.cdn.example.com": ["10.1.1.1"]}).rule is None


def test_status_text_of_the_datapath_outcomes():
    """`status` (text) shows the dynamic set's per-packet outcomes, and says when an instance of another build
    leaves them unreadable (Instance.fqdn_stats None) rather than printing zeros."""
    from hostwall.enforcer.cli import _fqdn_datapath
    assert _fqdn_datapath({"hit": 3, "expired": 1, "miss": 2}) == \
        "datapath (first packets that probed the set): hit 3, expired 1, miss 2"
    assert _fqdn_datapath(None) == "datapath: not readable (an instance of another build)"
