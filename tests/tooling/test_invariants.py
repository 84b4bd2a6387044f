"""Invariants (`never` / `always`) are decided exactly over the cells: a seeded violation is found with a
counterexample the reference model confirms; on random policies and packet sets, a violated invariant's
counterexample lies in the set and breaks it, and every sampled packet of a set that holds keeps it."""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.enforcer.analysis.cases import parse_cases
from hostwall.enforcer.analysis.invariants import check_invariant
from hostwall.enforcer.analysis.table import decision_table
from hostwall.enforcer.policy import parse_policy
from hostwall.enforcer.reference import evaluate

from .strategies import V4, V6, packets, policies

POLICY = """version: 1
name: inv
defaults: {ingress: deny, egress: allow}
rules:
  - {name: ssh-admin, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: [10.20.0.0/16]}
  - {name: web, priority: 20, direction: ingress, action: allow, protocol: tcp, ports: [80, 443, "8000-8100"]}
  - {name: monitoring, priority: 30, direction: ingress, action: allow, protocol: tcp, ports: [9100], peers: [10.30.0.0/24]}
"""
CASES = """invariants:
  - name: no ssh from outside the admin network
    never: {direction: ingress, protocol: tcp, ports: [22], from: 0.0.0.0/0, except: [10.20.0.0/16]}
  - name: monitoring always gets in
    always: {direction: ingress, protocol: tcp, ports: [9100], from: 10.30.0.0/24}
"""


def _run(policy_text: str):
    p = parse_policy(policy_text, "p.yaml")
    cf = parse_cases(CASES, "c.yaml", p)
    dt = decision_table(p)
    return p, [check_invariant(p, dt, inv, cf.local) for inv in cf.invariants]


def test_seeded_violation_has_a_valid_counterexample():
    _, res = _run(POLICY)
    assert all(r.holds for r in res), [r.text() for r in res]
    # the seeded mistake: ssh opened to everyone "for a minute"
    bad = POLICY.replace("  - {name: ssh-admin", "  - {name: oops, priority: 5, direction: ingress, action: allow, "
                         "protocol: tcp, ports: [\"20-25\"]}\n  - {name: ssh-admin")
    p, res = _run(bad)
    r = res[0]
    assert not r.holds and res[1].holds
    ce = r.counterexample
    assert ce.dport == 22 and ce.protocol == 6 and ce.direction == "ingress"
    assert ipaddress.ip_address(ce.src) not in ipaddress.ip_network("10.20.0.0/16")
    d = evaluate(p, ce.reference())
    assert d.verdict == "allow" and d.rule == "oops" and r.outcome.rule == "oops"
    assert "VIOLATED" in r.text() and "'oops'" in r.text()
    # every region reported lies inside the invariant's set
    for reg in r.regions:
        assert reg.direction == "ingress" and reg.protocol == "tcp" and set(range(22, 23)) >= {s for s, _ in reg.keys}


@st.composite
def selectors(draw) -> str:
    d = draw(st.sampled_from(["ingress", "egress"]))
    sel = {"direction": d, "protocol": draw(st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "any"]))}
    if sel["protocol"] in ("tcp", "udp", "any") and draw(st.booleans()):
        sel["ports"] = draw(st.lists(st.sampled_from([22, 53, 80, "8000-8100", "1-1024"]), min_size=1, max_size=3))
    if draw(st.booleans()):
        sel["from" if d == "ingress" else "to"] = draw(st.lists(st.sampled_from(V4 + V6), min_size=1, max_size=3))
    if draw(st.booleans()):
        sel["except"] = draw(st.lists(st.sampled_from(V4 + V6), min_size=1, max_size=2))
    kind = draw(st.sampled_from(["never", "always"]))
    import json
    return f"invariants:\n  - name: x\n    {kind}: {json.dumps(sel)}\n"


def _in_set(sel, p) -> bool:
    proto = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(p.protocol, "other")
    if p.direction != sel.direction or (sel.protocols is not None and proto not in sel.protocols):
        return False
    if sel.ports is not None and proto in ("tcp", "udp") and (p.fragment or p.dport not in sel.ports):
        return False
    span = sel.peers.get(p.family)
    return span is not None and int(p.peer) in span


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=policies(max_rules=8), cases=selectors(), pkts=st.lists(packets(), min_size=1, max_size=40))
def test_invariants_are_exact(text, cases, pkts):
    p = parse_policy(text)
    cf = parse_cases(cases, "c.yaml", p)
    inv = cf.invariants[0]
    r = check_invariant(p, decision_table(p), inv, cf.local)
    if not r.holds:
        ce = r.counterexample.reference()
        assert _in_set(inv.selector, ce), (inv.selector.text(), r.counterexample.text())
        assert (evaluate(p, ce).verdict == "allow") == (inv.kind == "never")
    else:
        for pk in pkts:
            if _in_set(inv.selector, pk):
                assert (evaluate(p, pk).verdict == "allow") == (inv.kind == "always"), (inv.selector.text(), pk)
