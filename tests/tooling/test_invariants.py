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
from hostwall.enforcer.icmp import icmp_key
from hostwall.enforcer.policy import parse_policy
from hostwall.enforcer.reference import evaluate

from .strategies import ICMP_SPECS, V4, V6, packets, policies

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


def test_icmp_invariants_see_types_and_essential_icmp():
    """A `never` over ICMPv6 from outside holds while essential ICMP is off and the rules deny it; with
    essential ICMP on it fails on the essential messages (packet too big about this host, neighbour discovery with hop limit
255, …), and the counterexample is one of them,
    allowed by the reference model as essential. ICMP types in the set narrow it exactly."""
    text = """version: 1
name: icmp
defaults: {ingress: deny, egress: allow, essential_icmp: ESS}
rules:
  - {name: ping, priority: 1, direction: ingress, action: allow, protocol: icmpv6, icmp_types: [echo-request], peers: ["fd00::/16"]}
  - {name: pmtu, priority: 2, direction: ingress, action: allow, protocol: icmp, icmp_types: ["3/4"]}
"""
    cases = """invariants:
  - {name: no icmpv6 from outside, never: {direction: ingress, protocol: icmpv6, from: "::/0", except: ["fd00::/16"]}}
  - {name: no ping from outside, never: {direction: ingress, protocol: icmpv6, icmp_types: [echo-request], from: "::/0", except: ["fd00::/16"]}}
  - {name: pmtu always, always: {direction: ingress, protocol: icmp, icmp_types: ["3/4"]}}
  - {name: no other unreachable, never: {direction: ingress, protocol: icmp, icmp_types: ["3/0", "3/5"]}}
"""
    for ess in ("false", "true"):
        p = parse_policy(text.replace("ESS", ess), "p.yaml")
        cf = parse_cases(cases, "c.yaml", p)
        res = [check_invariant(p, decision_table(p), inv, cf.local) for inv in cf.invariants]
        assert [r.holds for r in res] == [ess == "false", True, True, True], [r.text() for r in res]
    r = res[0]
    ce = r.counterexample
    assert ce.protocol == 58 and (ce.hop_limit in (1, 255) or ce.about == ce.dst) and r.outcome.reason == "pass_essential"
    assert evaluate(p, ce.reference()).rule == "essential_icmp"
    assert "(essential ICMP)" in r.text()
    assert all(reg.condition() for reg in r.regions)


@st.composite
def selectors(draw) -> str:
    d = draw(st.sampled_from(["ingress", "egress"]))
    sel = {"direction": d, "protocol": draw(st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "any"]))}
    if sel["protocol"] in ("tcp", "udp", "any") and draw(st.booleans()):
        sel["ports"] = draw(st.lists(st.sampled_from([22, 53, 80, "8000-8100", "1-1024"]), min_size=1, max_size=3))
    if sel["protocol"] in ("icmp", "icmpv6") and draw(st.booleans()):
        sel["icmp_types"] = draw(st.lists(st.sampled_from(ICMP_SPECS[sel["protocol"]]), min_size=1, max_size=3))
    if draw(st.booleans()):
        sel["from" if d == "ingress" else "to"] = draw(st.lists(st.sampled_from(V4 + V6), min_size=1, max_size=3))
    if draw(st.booleans()):
        sel["except"] = draw(st.lists(st.sampled_from(V4 + V6), min_size=1, max_size=2))
    kind = draw(st.sampled_from(["never", "always"]))
    import json
    return f"invariants:\n  - name: x\n    {kind}: {json.dumps(sel)}\n"


def _in_set(sel, p) -> bool:
    """Later fragments are outside every set: they follow their first fragment (invariants.py)."""
    proto = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(p.protocol, "other")
    if p.fragment or p.direction != sel.direction or (sel.protocols is not None and proto not in sel.protocols):
        return False
    if sel.ports is not None and proto in ("tcp", "udp") and p.dport not in sel.ports:
        return False
    if sel.icmp_keys is not None and proto in ("icmp", "icmpv6") and icmp_key(*p.icmp) not in sel.icmp_keys:
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
