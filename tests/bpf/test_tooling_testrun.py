"""`test` judges by the loaded programs too: on random policies and random cases — new packets and
packets of connections a prior packet opened (`state: established | reply`, TCP flags of every kind) —
the datapath (test-run, every hook that sees the packet) agrees with the reference model and its
conntrack model (enforcer/analysis/ctmodel.py), ICMP of every kind included (types and codes matched
by `icmp_types`, essential ICMP with its hop limits, embedded packets and link-local sources); a wrong
expectation fails the CLI naming the case."""
from __future__ import annotations

import itertools
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.bpf.fqdn import FqdnMaps
from hostwall.enforcer.analysis.cases import load_cases
from hostwall.enforcer.analysis.judge import reference_outcomes, run_tests
from hostwall.enforcer.analysis.packet import ICMP_ERRORS, CasePacket
from hostwall.enforcer.policy import parse_policy
from hostwall.enforcer.testrun import TestRun
from tests.tooling.strategies import HOP_LIMITS, ICMP_POINTS, PORT_POINTS, V4_HOSTS, V6_HOSTS, policies
from tests.tooling.test_fqdn_tooling import FQ_CASES, FQ_POLICY, FQ_SNAPSHOT, LEARN, fqdn_policies

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
    icmp_type, icmp_code, ttl, about = None, 0, 64, None
    src, dst = draw(st.sampled_from(hosts)), draw(st.sampled_from(hosts))
    if proto in (1, 58):
        echo = (8, 0) if fam == 4 else (128, 129)
        if state != "new":
            icmp_type = draw(st.sampled_from(echo))
        else:                              # any type/code, essential kinds and their neighbours often
            icmp_type, icmp_code = draw(st.sampled_from(ICMP_POINTS[fam]))
            ttl = draw(st.sampled_from(HOP_LIMITS))
            if icmp_type in ICMP_ERRORS[fam]:
                about = draw(st.sampled_from([None, dst, src]))
    return CasePacket(direction=draw(st.sampled_from(["ingress", "egress"])), protocol=proto, src=src, dst=dst,
                      sport=draw(st.sampled_from(PORT_POINTS)) if ported else 0,
                      dport=draw(st.sampled_from(PORT_POINTS)) if ported else 0,
                      flags=draw(st.sampled_from(["S", "SA", "A", "PA", "R", "FA", "RA"])) if proto == 6 and not frag else "",
                      icmp_type=icmp_type, icmp_code=icmp_code, icmp_id=draw(st.integers(1, 3)), fragment=frag,
                      state=state, hop_limit=ttl, about=about)


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


def test_self_addressed_tuples(datapath):
    """A tuple that is its own reverse (an echo from an address to itself, equal ports) names its
    sender the initiator in the datapath's normalised key: as a reply it is judged by the rules, as
    the same direction it continues. The conntrack model agrees (found by the test above)."""
    policy = parse_policy('version: 1\nname: t\ndefaults: {ingress: allow, egress: allow, stateful: true}\nrules: []\n')
    pkts = [CasePacket("ingress", 1, "0.0.0.0", "0.0.0.0", icmp_type=8, state="reply"),
            CasePacket("ingress", 17, "10.0.0.1", "10.0.0.1", 53, 53, state="reply"),
            CasePacket("ingress", 6, "10.0.0.1", "10.0.0.1", 80, 80, "A", state="reply"),
            CasePacket("ingress", 6, "10.0.0.1", "10.0.0.1", 80, 80, "A", state="established"),
            CasePacket("ingress", 6, "10.0.0.1", "10.0.0.1", 80, 81, "SA", state="reply")]
    tr = TestRun(policy, dp=datapath)
    try:
        got = tr.judge(pkts)
    finally:
        tr.close()
    want = reference_outcomes(policy, pkts)
    assert [w.reason for w in want] == ["pass_default"] * 3 + ["pass_conntrack"] * 2
    for p, g, w in zip(pkts, got, want):
        assert all(o == w for o in g.values()), (p.text(), g, w)


POLICY = """version: 1
name: web
defaults: {ingress: deny, egress: allow}
rules:
  - {name: ssh-admin, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: [10.20.0.0/16]}
  - {name: web, priority: 20, direction: ingress, action: log, protocol: tcp, ports: [80, 443]}
  - {name: no-smtp-out, priority: 30, direction: egress, action: deny, protocol: tcp, ports: [25]}
  - {name: ping, priority: 40, direction: ingress, action: allow, protocol: icmp, icmp_types: [echo-request]}
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
  - name: ping is allowed
    packet: ingress icmp 203.0.113.9 -> 192.0.2.1 type echo-request
    expect: {verdict: allow, rule: ping}
  - name: other unreachables are not
    packet: ingress icmp 203.0.113.9 -> 192.0.2.1 type 3/1 about 192.0.2.1
    expect: {verdict: drop, reason: default_deny}
  - name: fragmentation needed about our packet passes as essential ICMP
    packet: ingress icmp 203.0.113.9 -> 192.0.2.1 type 3/4 about 192.0.2.1
    expect: {verdict: allow, reason: pass_essential, rule: essential_icmp}
  - name: neighbour solicitation with hop limit 255
    packet: ingress icmpv6 fe80::9 -> 2001:db8::1 type neighbor-solicitation ttl 255
    expect: {verdict: allow, reason: pass_essential}
  - name: neighbour solicitation routed from afar
    packet: ingress icmpv6 2001:db8:99::9 -> 2001:db8::1 type neighbor-solicitation ttl 60
    expect: {verdict: drop, reason: default_deny}
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
    assert ET.parse(tmp_path / "j.xml").getroot().get("tests") == "10"
    (tmp_path / "w.yaml").write_text(CASES.replace("expect: {verdict: drop, rule: no-smtp-out}", "expect: allow"))
    r = _cli("test", "p.yaml", "w.yaml", cwd=tmp_path)
    assert r.returncode == 1 and "case 'smtp out is blocked'" in r.stdout and "verdict drop, expected allow" in r.stdout
    assert "datapath disagrees" not in r.stdout


# ---------------------------------------------------------------- fqdns rules judged against a snapshot

@st.composite
def fqdn_cases(draw) -> tuple[str, dict[str, list[str]], list[CasePacket]]:
    """A policy with fqdns rules, a names → addresses snapshot over the test hosts, and egress packets
    (half of them to a snapshot address), some of them replies of connections they opened."""
    text = draw(fqdn_policies())
    learnt: dict[str, list[str]] = {}
    for name in draw(st.lists(st.sampled_from(LEARN), max_size=4, unique=True)):
        learnt[name] = draw(st.lists(st.sampled_from(V4_HOSTS + V6_HOSTS), min_size=1, max_size=3, unique=True))
    listed = [a for ips in learnt.values() for a in ips]
    pkts = []
    for _ in range(draw(st.integers(1, 10))):
        dst = draw(st.sampled_from(listed)) if listed and draw(st.booleans()) else draw(st.sampled_from(V4_HOSTS + V6_HOSTS))
        fam = 6 if ":" in dst else 4
        src = "192.0.2.1" if fam == 4 else "2001:db8::1"
        proto = draw(st.sampled_from([6, 17]))
        state = draw(st.sampled_from(["new", "new", "established"]))
        pkts.append(CasePacket("egress", proto, src, dst, 40000, draw(st.sampled_from(PORT_POINTS)),
                               "S" if proto == 6 else "", state=state))
    return text, learnt, pkts


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=fqdn_cases())
def test_datapath_with_a_snapshot_agrees_with_the_reference_model(datapath, case):
    """The snapshot learnt into the instance and its sets filled as a swap fills them: every hook agrees
    with the reference model judging by the same snapshot."""
    text, learnt, pkts = case
    policy = parse_policy(text)
    tr = TestRun(policy, dp=datapath, learnt=learnt)
    try:
        got = tr.judge(pkts)
    finally:
        tr.close()
    want = reference_outcomes(policy, pkts, learnt=learnt)
    for p, g, w in zip(pkts, got, want):
        for hook, o in g.items():
            assert o == w, f"{hook} `{p.text()}`: datapath {o.text()}, reference {w.text()}\n{text}\n{learnt}"


def test_a_datapath_with_other_addresses_disagrees(datapath, tmp_path):
    """The cross-check is live for fqdns rules: a kernel whose sets hold other addresses than the
    reference model's snapshot fails the cases it judges differently, as disagreements; the same
    snapshot on both sides agrees; closing a shared instance leaves its sets and names empty."""
    policy = parse_policy(FQ_POLICY)
    (tmp_path / "c.yaml").write_text(FQ_CASES.split("invariants:")[0])
    cf = load_cases(str(tmp_path / "c.yaml"), policy)
    learnt = {"deb.mirrors.example.test": ["198.51.100.10", "2001:db8::10"], "api.example.test": ["198.51.100.20"]}
    other = {"deb.mirrors.example.test": ["198.51.100.99"]}
    for kernel, bad in ((learnt, set()), (other, {"a mirror listed in the snapshot", "a mirror over IPv6",
                                                 "the api on any port", "the reply of a mirror connection"})):
        tr = TestRun(policy, dp=datapath, learnt=kernel)
        try:
            rep = run_tests(policy, cf, tr.judge, learnt, "snapshot")
        finally:
            tr.close()
        assert {r.case.name for r in rep.results if r.disagreements} == bad, rep.text()
        assert not any(r.misses for r in rep.results), rep.text()
    fm = FqdnMaps(datapath.map_fds)
    try:
        assert fm.set_entries() == [] and fm.learnt() == []
    finally:
        fm.close()


def test_cli_test_with_fqdn_addresses_and_the_datapath(tmp_path):
    (tmp_path / "p.yaml").write_text(FQ_POLICY)
    (tmp_path / "c.yaml").write_text(FQ_CASES.split("invariants:")[0])
    (tmp_path / "snap.yaml").write_text(FQ_SNAPSHOT)
    r = _cli("test", "p.yaml", "c.yaml", "--fqdn-addresses", "snap.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reference model and datapath (test-run); fqdns sets from snap.yaml" in r.stdout
    # an expectation that an address outside the snapshot's names is allowed fails, naming the case
    (tmp_path / "w.yaml").write_text(FQ_CASES.split("invariants:")[0].replace(
        "expect: {verdict: drop, reason: default_deny}", "expect: {verdict: allow, rule: mirrors}"))
    r = _cli("test", "p.yaml", "w.yaml", "--fqdn-addresses", "snap.yaml", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "case 'an address learnt for an unlisted name falls through'" in r.stdout
    assert "verdict drop, expected allow" in r.stdout and "datapath disagrees" not in r.stdout


def test_a_snapshot_too_big_for_the_kernel_leaves_a_shared_instance_clean(datapath):
    """A snapshot the learnt-name maps cannot hold (HW_DNS_NAMES_MAX + 1 names) makes TestRun raise
    from its constructor — no close() follows — and the names it had entered before the map filled are
    removed again: the next TestRun on the shared instance fills its sets from its own snapshot only."""
    from hostwall.bpf import layout as L
    from hostwall.enforcer.testrun import DatapathError
    policy = parse_policy(FQ_POLICY)
    big = {f"n{i}.deb.mirrors.example.test": ["198.51.100.10"] for i in range(L.C["HW_DNS_NAMES_MAX"] + 1)}
    with pytest.raises(DatapathError, match="does not fit the learnt-name maps"):
        TestRun(policy, dp=datapath, learnt=big)
    fm = FqdnMaps(datapath.map_fds)
    try:
        assert fm.set_entries() == [] and fm.learnt() == [] and fm.names() == {}
    finally:
        fm.close()


@pytest.mark.parametrize("ingress", ["deny", "allow"])
def test_every_tcp_flag_set_after_its_opener_agrees_with_the_conntrack_model(datapath, ingress):
    """Every combination of FIN/SYN/RST/PSH/ACK on a connection its SYN opened, from either side, both
    directions and families: the datapath's sequence checks (docs/datapath.md "Sequence checks") and
    the conntrack model (analysis/ctmodel.py) give the same outcome — in window, out of window, invalid."""
    policy = parse_policy(f"version: 1\nname: t\ndefaults: {{ingress: {ingress}, egress: allow, stateful: true}}\n"
                          "rules: []\n")
    pkts = []
    for n in range(32):
        flags = "".join(c for i, c in enumerate("FSRPA") if n >> i & 1)
        for d, state, (peer, me) in itertools.product(("ingress", "egress"), ("established", "reply"),
                                                      (("198.51.100.7", "192.0.2.1"), ("2001:db8:9::7", "2001:db8::1"))):
            src, dst, sport, dport = (peer, me, 443, 40000) if d == "ingress" else (me, peer, 40000, 443)
            pkts.append(CasePacket(d, 6, src, dst, sport, dport, flags=flags, state=state))
    tr = TestRun(policy, dp=datapath)
    try:
        got = tr.judge(pkts)
    finally:
        tr.close()
    reasons = set()
    for p, g, w in zip(pkts, got, reference_outcomes(policy, pkts)):
        reasons.add(w.reason)
        for hook, o in g.items():
            assert o == w, f"{hook} `{p.text()}`: datapath {o.text()}, model {w.text()}"
    assert {"pass_conntrack", "pass_conntrack_out_of_window"} <= reasons
