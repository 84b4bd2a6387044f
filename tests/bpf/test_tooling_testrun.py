"""`test` judges by the loaded programs too: on random policies and random cases — new packets and
packets of connections a prior packet opened (`state: established | reply`, TCP flags of every kind) —
the datapath (test-run, every hook that sees the packet) agrees with the reference model and its
conntrack model (enforcer/analysis/ctmodel.py); a wrong expectation fails the CLI naming the case."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.enforcer.analysis.judge import reference_outcomes
from hostwall.enforcer.analysis.packet import CasePacket
from hostwall.enforcer.policy import parse_policy
from hostwall.enforcer.testrun import TestRun
from tests.tooling.strategies import PORT_POINTS, V4_HOSTS, V6_HOSTS, policies

pytestmark = pytest.mark.bpf
ROOT = Path(__file__).resolve().parents[2]


@st.composite
def case_packets(draw) -> CasePacket:
    fam = draw(st.sampled_from([4, 6]))
    hosts = V4_HOSTS if fam == 4 else V6_HOSTS
    proto = draw(st.sampled_from([6, 6, 17, 1 if fam == 4 else 58, 47]))
    frag = proto in (6, 17, 47) and draw(st.integers(0, 12)) == 0
    ported = proto in (6, 17) and not frag
    state = draw(st.sampled_from(["new", "new", "established", "reply"])) if not frag and proto != 47 else "new"
    icmp_type = None
    if proto in (1, 58):
        echo = (8, 0) if fam == 4 else (128, 129)
        icmp_type = draw(st.sampled_from(echo if state != "new" else (*echo, 3 if fam == 4 else 1)))
    return CasePacket(direction=draw(st.sampled_from(["ingress", "egress"])), protocol=proto,
                      src=draw(st.sampled_from(hosts)), dst=draw(st.sampled_from(hosts)),
                      sport=draw(st.sampled_from(PORT_POINTS)) if ported else 0,
                      dport=draw(st.sampled_from(PORT_POINTS)) if ported else 0,
                      flags=draw(st.sampled_from(["S", "SA", "A", "PA", "R", "FA", "RA"])) if proto == 6 and not frag else "",
                      icmp_type=icmp_type, icmp_id=draw(st.integers(1, 3)), fragment=frag, state=state)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.data_too_large])
@given(text=policies(max_rules=8), pkts=st.lists(case_packets(), min_size=1, max_size=12))
def test_datapath_agrees_with_the_reference_and_conntrack_models(datapath, text, pkts):
    policy = parse_policy(text)
    tr = TestRun(policy, dp=datapath)
    try:
        got = tr.judge(pkts)
    finally:
        tr.close()
    want = reference_outcomes(policy, pkts)
    for p, g, w in zip(pkts, got, want):
        for hook, o in g.items():
            assert o == w, f"{hook} `{p.text()}`: datapath {o.text()}, reference {w.text()}\n{text}"


POLICY = """version: 1
name: web
defaults: {ingress: deny, egress: allow}
rules:
  - {name: ssh-admin, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: [10.20.0.0/16]}
  - {name: web, priority: 20, direction: ingress, action: log, protocol: tcp, ports: [80, 443]}
  - {name: no-smtp-out, priority: 30, direction: egress, action: deny, protocol: tcp, ports: [25]}
"""
CASES = """cases:
  - name: ssh from the admin network
    packet: ingress tcp 10.20.1.5:40000 -> :22
    expect: {verdict: allow, reason: pass_rule, rule: ssh-admin}
  - name: web is logged
    packet: ingress tcp [2001:db8:1::5]:5555 -> :443
    expect: {verdict: allow, rule: web}
  - name: replies of outbound https
    packet: ingress tcp 198.51.100.7:443 -> :40001 flags SA
    state: reply
    expect: {verdict: allow, reason: pass_conntrack}
  - name: a second SYN of an open connection
    packet: egress tcp :40001 -> 198.51.100.7:443
    state: established
    expect: {verdict: allow, reason: pass_conntrack}
  - name: smtp out is blocked
    packet: egress tcp :40000 -> 198.51.100.25:25
    expect: {verdict: drop, rule: no-smtp-out}
"""


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=180)


def test_cli_test_with_the_datapath(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "c.yaml").write_text(CASES)
    r = _cli("test", "p.yaml", "c.yaml", "--junit", "j.xml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reference model and datapath (test-run)" in r.stdout
    assert ET.parse(tmp_path / "j.xml").getroot().get("tests") == "5"
    (tmp_path / "w.yaml").write_text(CASES.replace("expect: {verdict: drop, rule: no-smtp-out}", "expect: allow"))
    r = _cli("test", "p.yaml", "w.yaml", cwd=tmp_path)
    assert r.returncode == 1 and "case 'smtp out is blocked'" in r.stdout and "verdict drop, expected allow" in r.stdout
    assert "datapath disagrees" not in r.stdout
