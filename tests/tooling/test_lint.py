"""`lint` is exact: each claim is checked by removing the rule and diffing (analysis/diff.py, itself
checked against the reference model), in both directions — a rule is reported `shadowed` or
`never_matches` iff removing it changes nothing at all, `redundant` iff removing it changes no verdict
but the rule decides some packets; a `conflict` region is decided by the named earlier rule although
the later rule matches it with another verdict."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings

from hostwall.enforcer.analysis.diff import diff_tables
from hostwall.enforcer.analysis.lint import lint
from hostwall.enforcer.analysis.table import decision_table
from hostwall.enforcer.policy import PolicyError, parse_policy
from hostwall.enforcer.reference import evaluate, match

from .strategies import policies

POLICY = """version: 1
name: lint
defaults: {ingress: deny, egress: allow}
rules:
  - {name: block, priority: 1, direction: ingress, action: deny, peers: [10.0.0.0/8]}
  - {name: ssh-office, priority: 2, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: [10.1.0.0/16, "fd00::/8"]}
  - {name: ping6-v4, priority: 3, direction: ingress, action: allow, protocol: icmp, peers: ["fd00::/8"]}
  - {name: ssh-lab, priority: 4, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: [10.1.2.0/24]}
  - {name: no-dns, priority: 5, direction: ingress, action: deny, protocol: udp, ports: [53]}
  - {name: dns-out, priority: 6, direction: egress, action: allow, protocol: udp, ports: [53]}
  - {name: web, priority: 7, direction: ingress, action: allow, protocol: tcp, ports: [80, 443]}
"""


def test_each_kind_with_file_and_line():
    found = {(f.kind, f.rule): f for f in lint(parse_policy(POLICY, "p.yaml"))}
    assert set(found) == {("conflict", "ssh-office"), ("never_matches", "ping6-v4"), ("shadowed", "ssh-lab"),
                          ("redundant", "no-dns"), ("redundant", "dns-out"), ("conflict", "web")}
    f = found[("shadowed", "ssh-lab")]
    assert f.text().startswith("p.yaml:8: rule 'ssh-lab': shadowed:") and f.related == ["block"]
    assert "protocol icmp is IPv4's" in found[("never_matches", "ping6-v4")].message
    c = found[("conflict", "ssh-office")]
    assert [(n, r.text()) for n, r in c.regions] == [("block", "ingress tcp port 22 from 10.1.0.0/16")]
    assert json.loads(json.dumps([f.to_json() for f in found.values()]))


def _without(text: str, name: str) -> str:
    head, _, rules = text.partition("rules: ")
    return head + "rules: " + json.dumps([r for r in json.loads(rules) if r["name"] != name]) + "\n"


ICMP_POLICY = """version: 1
name: lint-icmp
defaults: {ingress: allow, egress: allow}
rules:
  - {name: echo, priority: 1, direction: ingress, action: allow, protocol: icmp, icmp_types: [echo-request]}
  - {name: ping-deny, priority: 2, direction: ingress, action: deny, protocol: icmp, icmp_types: [8, 0]}
  - {name: unreach-all, priority: 3, direction: ingress, action: deny, protocol: icmp, icmp_types: [destination-unreachable]}
  - {name: unreach-4, priority: 4, direction: ingress, action: allow, protocol: icmp, icmp_types: ["3/4"]}
  - {name: nd-deny, priority: 5, direction: ingress, action: deny, protocol: icmpv6, peers: ["fe80::/10"]}
  - {name: echo-again, priority: 6, direction: ingress, action: allow, protocol: icmp, icmp_types: ["8/0", "8/1"]}
"""


def test_icmp_types_overlap_shadow_and_essential_icmp():
    found = {(f.kind, f.rule): f for f in lint(parse_policy(ICMP_POLICY, "p.yaml"))}
    assert set(found) == {("conflict", "ping-deny"), ("conflict", "unreach-all"), ("shadowed", "unreach-4"),
                          ("conflict", "nd-deny"), ("shadowed", "echo-again")}, [f.text() for f in found.values()]
    assert [reg.text() for _, reg in found[("conflict", "ping-deny")].regions] == ["ingress icmp type 8 from any IPv4"]
    assert "'unreach-all' (line 7, deny)" in found[("shadowed", "unreach-4")].message
    assert found[("shadowed", "echo-again")].related == ["echo"]
    f = found[("conflict", "unreach-all")]
    assert f.related == ["essential_icmp"]
    assert [reg.text() for _, reg in f.regions] == [
        "ingress icmp type 3 code 4 from any IPv4 about a packet this host sent (essential ICMP)"]
    nd = {reg.text() for _, reg in found[("conflict", "nd-deny")].regions}
    assert "ingress icmpv6 type 133-137 from fe80::/10 with hop limit 255 (essential ICMP)" in nd
    off = lint(parse_policy(ICMP_POLICY.replace("allow, egress: allow}", "allow, egress: allow, essential_icmp: false}")))
    assert {(f.kind, f.rule) for f in off} == {("conflict", "ping-deny"), ("shadowed", "unreach-4"),
                                               ("shadowed", "echo-again")}
    # ports with icmp can never match: validation refuses the rule before lint sees it
    try:
        parse_policy(ICMP_POLICY.replace("icmp_types: [echo-request]", "ports: [22]"))
    except PolicyError as e:
        assert "ports apply to tcp, udp or any, not icmp" in str(e)
    else:
        raise AssertionError("ports with icmp validated")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=policies(max_rules=8))
def test_lint_claims_hold_both_ways(text):
    policy = parse_policy(text)
    dt = decision_table(policy)
    found = lint(policy, dt)
    kinds = {}
    for f in found:
        kinds.setdefault(f.rule, set()).add(f.kind)
    actions = {r.name: r.action for r in policy.rules}

    def action(outcome) -> str:          # what decides: the rule's action, or the verdict of the default
        return actions[outcome[1]] if outcome[1] else ("allow" if outcome[0] == "allow" else "deny")
    for rule in policy.rules:
        k = kinds.get(rule.name, set())
        other = decision_table(parse_policy(_without(text, rule.name)))
        any_change = diff_tables(dt, other, by_rule=True)
        verdict_change = [c for c in any_change if action(c.old) != action(c.new)]
        dead = bool(k & {"shadowed", "never_matches"})
        assert dead == (not any_change), (rule.name, k, [c.text() for c in any_change])
        if not dead:
            assert ("redundant" in k) == (not verdict_change), (rule.name, k, [c.text() for c in verdict_change])
    for f in found:
        if f.kind != "conflict":
            continue
        r = next(x for x in policy.rules if x.name == f.rule)
        for q, reg in f.regions:
            p = reg.sample({4: "192.0.2.1", 6: "2001:db8::1"})
            d = evaluate(policy, p)
            assert d.rule == q and match(r, p), (f.text(), p, d)
            assert (d.verdict == "allow") != (r.action in ("allow", "log"))
