"""fqdns rules in explain, lint and diff (analysis/fqdn.py), checked against the reference model with
names → addresses snapshots (`learnt`, enforcer/reference.py):

- explain judges with a snapshot and names the names that put the destination into a rule's set;
- lint's claims hold for every snapshot: removing a rule reported shadowed changes no outcome, removing
  one reported redundant no verdict — whatever the names resolve to (static rules too, now that fqdns
  rules may come between them and the next rule);
- diff is exact: a destination in no set changes iff it lies in a reported region; a destination learnt
  for a name changes as its name class's fqdns regions say, or else as a static region says.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.dnsnames import matches
from hostwall.enforcer.analysis.batch import BatchReference
from hostwall.enforcer.analysis.diff import diff
from hostwall.enforcer.analysis.explain import explain
from hostwall.enforcer.analysis.fqdn import covers, load_addresses, name_classes
from hostwall.enforcer.analysis.lint import lint
from hostwall.enforcer.analysis.packet import parse_packet
from hostwall.enforcer.analysis.regions import regions
from hostwall.enforcer.analysis.table import decision_table
from hostwall.enforcer.policy import parse_policy
from hostwall.enforcer.reference import Packet, evaluate

from .strategies import defaults, packets, policy_text, port_spec, rule_dicts
from .test_diff import _inside, _points

NAMES = ["a.example.com", "b.example.com", "*.example.com", "c.example.org", "*.sub.example.com"]
LEARN = ["a.example.com", "b.example.com", "zz.example.com", "c.example.org", "q.sub.example.com", "other.net"]
DNS = 'dns: {upstreams: ["127.0.0.53:53"]}\n'

POLICY = """version: 1
name: lint-fqdn
defaults: {ingress: deny, egress: deny}
rules:
  - {name: dns-out, priority: 1, direction: egress, action: allow, protocol: udp, peers: [192.0.2.53/32], ports: [53]}
  - {name: block, priority: 2, direction: egress, action: deny, protocol: tcp, peers: [203.0.113.0/24]}
  - {name: web-any, priority: 3, direction: egress, action: allow, protocol: tcp, ports: [80]}
  - {name: pre-deny, priority: 5, direction: egress, action: deny, protocol: tcp, ports: [8443], peers: [198.51.100.0/24]}
  - {name: mirrors, priority: 10, direction: egress, action: allow, protocol: tcp, ports: [80, 443], fqdns: ["*.mirrors.example.com"]}
  - {name: http-only, priority: 11, direction: egress, action: allow, protocol: tcp, ports: [80], fqdns: ["cdn.example.org"]}
  - {name: one-mirror, priority: 12, direction: egress, action: allow, protocol: tcp, ports: [443], fqdns: ["a.mirrors.example.com"]}
  - {name: deny-ads, priority: 13, direction: egress, action: deny, protocol: tcp, ports: [443], fqdns: ["ads.example.net"]}
  - {name: late-allow, priority: 30, direction: egress, action: allow, protocol: tcp, ports: [8443], fqdns: ["x.example.com"]}
dns: {upstreams: ["192.0.2.53:53"]}
"""


def test_explain_judges_with_a_snapshot_and_names_the_names():
    policy = parse_policy(POLICY, "p.yaml")
    pkt = parse_packet("egress tcp :40000 -> 198.51.100.7:443")
    ex = explain(policy, pkt)
    assert ex.outcome.verdict == "drop" and ex.outcome.reason == "default_deny"
    assert [f["rule"] for f in ex.fqdn] == ["mirrors", "one-mirror", "deny-ads"]
    assert all(f["names"] is None and f["after"] is None for f in ex.fqdn)
    assert "--fqdn-addresses FILE" in ex.text()
    learnt = {"a.mirrors.example.com": ["198.51.100.7"], "ads.example.net": ["198.51.100.7", "198.51.100.9"],
              "cdn.example.org": ["198.51.100.7"]}
    ex = explain(policy, pkt, learnt=learnt, snapshot="snap.yaml")
    assert (ex.outcome.verdict, ex.outcome.rule) == ("allow", "mirrors")
    assert [r.name for r in ex.matching] == ["mirrors", "one-mirror", "deny-ads"]
    assert {f["rule"]: f["names"] for f in ex.fqdn} == {"mirrors": ["a.mirrors.example.com"],
                                                       "one-mirror": ["a.mirrors.example.com"],
                                                       "deny-ads": ["ads.example.net"]}
    text = ex.text()
    assert "198.51.100.7 is in its set: learnt for a.mirrors.example.com" in text and "snapshot: snap.yaml" in text
    # port 80: web-any (static, tried first) decides; the fqdns rules are tried after it
    ex = explain(policy, parse_packet("egress tcp :40000 -> 198.51.100.7:80"), learnt=learnt, snapshot="s")
    assert ex.outcome.rule == "web-any"
    assert {f["rule"]: f["after"] for f in ex.fqdn} == {"mirrors": "web-any", "http-only": "web-any"}
    assert "it cannot decide it" in ex.text()
    # the destination in no set: not learnt for any of the rule's names
    ex = explain(policy, parse_packet("egress tcp :40000 -> 198.51.100.8:443"), learnt=learnt, snapshot="s")
    assert ex.outcome.reason == "default_deny" and all(f["names"] == [] for f in ex.fqdn)
    assert not explain(policy, parse_packet("ingress tcp 198.51.100.7:40000 -> :443")).fqdn


def test_lint_fqdn_findings():
    found = {(f.kind, f.rule): f for f in lint(parse_policy(POLICY, "p.yaml"))}
    assert set(found) == {("conflict", "web-any"), ("conflict", "mirrors"), ("shadowed", "http-only"),
                          ("shadowed", "one-mirror"), ("redundant", "deny-ads"), ("conflict", "late-allow")}, \
        [f.text() for f in found.values()]
    f = found[("conflict", "mirrors")]
    assert f.line == 9 and [(n, r.text()) for n, r in f.regions] == [("block", "egress tcp port 80, 443 to 203.0.113.0/24")]
    assert found[("shadowed", "http-only")].related == ["block", "web-any"]
    assert found[("shadowed", "one-mirror")].related == ["block", "mirrors"]     # mirrors' names cover it
    # pre-deny is not redundant: removing it lets late-allow's names in 198.51.100.0/24 through
    without = POLICY.replace("  - {name: late-allow", "#")
    assert ("redundant", "pre-deny") in {(f.kind, f.rule) for f in lint(parse_policy(without))}
    # the proxy's upstream is dropped: no set is ever filled
    blocked = {(f.kind, f.rule): f for f in lint(parse_policy(POLICY.replace("  - {name: dns-out", "#"), "p.yaml"))}
    assert {r for k, r in blocked if k == "never_matches"} == {"mirrors", "http-only", "one-mirror", "deny-ads",
                                                                  "late-allow"}
    assert "udp to 192.0.2.53:53 (the egress default, default_deny)" in blocked[("never_matches", "mirrors")].message


def test_name_classes_and_covers():
    old = parse_policy(POLICY)
    classes = {tuple(v): k for k, v in name_classes(old).items()}
    assert classes[("a.mirrors.example.com",)] == (frozenset({"mirrors", "one-mirror"}),)
    assert classes[("*.mirrors.example.com",)] == (frozenset({"mirrors"}),)
    assert covers(["*.example.com"], ["a.example.com"]) and not covers(["a.example.com"], ["*.example.com"])
    assert not covers(["*.example.com"], ["a.b.example.com"]) and covers(["x.org", "*.y.org"], ["z.y.org", "x.org"])


def test_diff_fqdn_changes_and_rule_changes():
    old = parse_policy(POLICY, "old.yaml")
    new = parse_policy(POLICY.replace('ports: [80, 443], fqdns: ["*.mirrors.example.com"]',
                                      'ports: [443], fqdns: ["*.mirrors.example.com", "cdn.example.org"]')
                       .replace("name: deny-ads, priority: 13, direction: egress, action: deny",
                                "name: deny-ads, priority: 13, direction: egress, action: allow"), "new.yaml")
    d = diff(old, new)
    assert d.has_fqdn and not d.changes
    lines = {c.text() for c in d.fqdn}
    assert "learnt for ads.example.net: egress tcp port 443 to any IPv4 except 203.0.113.0/24: " \
           "drop (rule 'deny-ads') → allow (rule 'deny-ads')" in lines
    assert "learnt for cdn.example.org: egress tcp port 443 to any IPv4 except 203.0.113.0/24: " \
           "drop (default) → allow (rule 'mirrors')" in lines
    assert not any("port 80" in t for t in lines)          # web-any and block decide port 80 before mirrors
    changes = {r.name: r for r in d.rules}
    assert "fqdns +[cdn.example.org]" in changes["mirrors"].text() and "ports [80, 443] → [443]" in changes["mirrors"].text()
    assert "action deny → allow" in changes["deny-ads"].text()
    text = d.text()
    assert "verdict changes: 0 regions (destinations in no fqdns set)" in text and "fqdns verdict changes: " in text
    assert json.loads(json.dumps(d.to_json()))["fqdn_changes"]


# ---------------------------------------------------------------- against the reference model

@st.composite
def fqdn_rule(draw, i: int, prefix: str = "f") -> dict:
    proto = draw(st.sampled_from(["tcp", "udp", "any", "icmp"]))
    r = {"name": f"{prefix}{i}", "priority": draw(st.integers(0, 5)), "direction": "egress",
         "action": draw(st.sampled_from(["allow", "deny", "log"])), "protocol": proto,
         "fqdns": draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))}
    if proto in ("tcp", "udp", "any") and draw(st.booleans()):
        r["ports"] = draw(port_spec())
    return r


def _rule(draw, i: int, prefix: str) -> dict:
    """An fqdns rule or a static one, the static ones mostly egress (where fqdns rules come between)."""
    if draw(st.booleans()):
        return draw(fqdn_rule(i, prefix + "f"))
    r = draw(rule_dicts(i, prefix))
    return {**r, "direction": "egress"} if draw(st.integers(0, 3)) else r


@st.composite
def fqdn_policies(draw) -> str:
    rules = [_rule(draw, i, "r") for i in range(draw(st.integers(1, 8)))]
    return policy_text(rules, draw(defaults())) + DNS


@st.composite
def fqdn_pairs(draw) -> tuple[str, str]:
    old = [_rule(draw, i, "r") for i in range(draw(st.integers(0, 7)))]
    new = [dict(r) for r in old if draw(st.integers(0, 4))]
    for i, r in enumerate(new):
        k = draw(st.integers(0, 4))
        if k == 0:
            new[i] = {**_rule(draw, 0, "x"), "name": r["name"]}
        elif k == 1 and "fqdns" in r:
            new[i] = {**r, "fqdns": draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))}
    new += [_rule(draw, i, "n") for i in range(draw(st.integers(0, 3)))]
    new = draw(st.permutations(new)) if draw(st.booleans()) else new
    d_old = draw(defaults())
    d_new = draw(defaults()) if draw(st.integers(0, 3)) == 0 else d_old
    return policy_text(old, d_old, "old") + DNS, policy_text(new, d_new, "new") + DNS


def _snapshots(p: Packet) -> list[dict]:
    """No set, each name alone, and every name at once (the destination in every set)."""
    return [{}] + [{n: [p.dst]} for n in LEARN] + [{n: [p.dst] for n in LEARN}]


def _without(text: str, name: str) -> str:
    head, _, rest = text.partition("rules: ")
    rules, _, tail = rest.partition("\n")
    return head + "rules: " + json.dumps([r for r in json.loads(rules) if r["name"] != name]) + "\n" + tail


def _cell_packets(policy) -> list[Packet]:
    """One packet from every egress cell of the policy's decision table (fqdns rules' cells included)."""
    dt = decision_table(policy)
    rows, cols = np.nonzero(dt.reachable() & (dt.l4_dir == L.DIR["egress"])[None, :])
    return [reg.sample({4: "192.0.2.1", 6: "2001:db8::1"})
            for _, reg in regions(dt, rows, cols, tags=np.arange(len(rows)))]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=fqdn_policies(), pkts=st.lists(packets(fragments=False), min_size=1, max_size=25))
def test_lint_claims_hold_for_every_snapshot(text, pkts):
    policy = parse_policy(text)
    pkts = pkts + _cell_packets(policy)
    for f in lint(policy):
        if f.kind not in ("shadowed", "redundant", "never_matches"):
            continue
        other = parse_policy(_without(text, f.rule))
        for p in pkts:
            for learnt in _snapshots(p):
                a, b = evaluate(policy, p, learnt), evaluate(other, p, learnt)
                if f.kind == "redundant":
                    assert a.verdict == b.verdict, (f.text(), p, learnt, a, b)
                else:
                    assert a == b, (f.text(), p, learnt, a, b)


def _class_of(name: str, patterns: set[str]) -> str | None:
    if name in patterns:
        return name
    return next((p for p in patterns if p.startswith("*.") and matches(name, p)), None)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=fqdn_pairs(), pkts=st.lists(packets(fragments=False), min_size=1, max_size=25))
def test_diff_is_exact_for_destinations_in_and_out_of_the_sets(pair, pkts):
    old, new = parse_policy(pair[0], "old.yaml"), parse_policy(pair[1], "new.yaml")
    d = diff(old, new)
    patterns = {p for pol in (old, new) for r in pol.rules if r.fqdns for p in r.fqdns}
    pkts = pkts + _cell_packets(old) + _cell_packets(new)
    for c in d.fqdn:                                   # every packet of a fqdns region changes as reported
        name = c.names[0].replace("*", "zz9")
        for p in _points(c.change.region)[:12]:
            learnt = {name: [p.dst]}
            a, b = evaluate(old, p, learnt), evaluate(new, p, learnt)
            assert (a.verdict, a.rule) == c.change.old and (b.verdict, b.rule) == c.change.new, (c.text(), p, a, b)
    for p in pkts:
        for n in [None, *LEARN]:
            learnt = {n: [p.dst]} if n else {}
            a, b = evaluate(old, p, learnt), evaluate(new, p, learnt)
            changed = a.verdict != b.verdict
            cls = _class_of(n, patterns) if n and p.direction == "egress" else None
            fq = [c.change for c in d.fqdn if cls in c.names and _inside(c.change.region, p)] if cls else []
            static = [c for c in d.changes if _inside(c.region, p)]
            assert len(fq) <= 1, (p, n, [c.text() for c in fq])
            if fq:
                assert (a.verdict, a.rule) == fq[0].old and (b.verdict, b.rule) == fq[0].new, (p, n, fq[0].text())
            elif cls is None:
                assert changed == bool(static), (p, n, a, b, [c.text() for c in static])
                if static:
                    assert (a.verdict, a.rule) == static[0].old and (b.verdict, b.rule) == static[0].new
            elif changed:                              # decided by static rules on both sides: a static region
                assert static and (a.verdict, a.rule) == static[0].old and (b.verdict, b.rule) == static[0].new, \
                    (p, n, a, b, d.text())


# ---------------------------------------------------------------- CLI

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_explain_with_fqdn_addresses(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "snap.yaml").write_text("A.Mirrors.Example.com.: [198.51.100.7]\nads.example.net: 198.51.100.9\n")
    assert load_addresses(str(tmp_path / "snap.yaml")) == {"a.mirrors.example.com": ("198.51.100.7",),
                                                           "ads.example.net": ("198.51.100.9",)}
    r = _cli("explain", "p.yaml", "egress tcp :40000 -> 198.51.100.7:443", "--fqdn-addresses", "snap.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "decided by rule 'mirrors' (p.yaml:9" in r.stdout
    assert "198.51.100.7 is in its set: learnt for a.mirrors.example.com" in r.stdout
    (tmp_path / "bad.yaml").write_text("x.example.com: [not-an-address]\n")
    r = _cli("explain", "p.yaml", "egress tcp :40000 -> 198.51.100.7:443", "--fqdn-addresses", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "x.example.com[0]: 'not-an-address' is not an IP address" in r.stderr


def test_a_snapshot_lists_valid_dns_names_only(tmp_path):
    """A snapshot name the DNS proxy could never learn is an input error, not a silent mismatch: the
    kernel's name map keeps at most a DNS name's length (an over-long one is truncated there, so the
    swap's fill_sets would not match it while the reference model's wildcard does), and a pattern is
    not a name."""
    for text, why in ((f"{'x' * 64}.example.net: [198.51.100.9]\n", "at most 63"),
                      (f"{'abcdefgh.' * 30}example.net: [198.51.100.9]\n", "at most 253"),
                      ("'*.example.net': [198.51.100.9]\n", "a name, not a pattern"),
                      ("a..example.net: [198.51.100.9]\n", "empty label")):
        (tmp_path / "s.yaml").write_text(text)
        with pytest.raises(ValueError, match=why):
            load_addresses(str(tmp_path / "s.yaml"))


def test_cli_lint_fqdn(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY)
    r = _cli("lint", "p.yaml", "--strict", cwd=tmp_path)
    assert r.returncode == 1
    assert "p.yaml:10: rule 'http-only': shadowed: never decides a packet, whatever its names resolve to" in r.stdout
    assert "p.yaml:12: rule 'deny-ads': redundant:" in r.stdout


def test_cli_diff_fqdn(tmp_path):
    (tmp_path / "old.yaml").write_text(POLICY)
    (tmp_path / "new.yaml").write_text(POLICY.replace('fqdns: ["x.example.com"]', 'fqdns: ["x.example.com", "y.example.com"]'))
    r = _cli("diff", "old.yaml", "new.yaml", "--exit-code", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr          # no destination outside the sets changes
    assert "~ late-allow" in r.stdout and "fqdns +[y.example.com]" in r.stdout
    assert "learnt for y.example.com: egress tcp port 8443 to any IPv4 except 198.51.100.0/24, 203.0.113.0/24: " \
           "drop (default) → allow (rule 'late-allow')" in r.stdout


# ---------------------------------------------------------------- test with a snapshot

def _learnt_for(pkts: list[Packet], draw_names: list[str]) -> dict[str, list[str]]:
    """A snapshot putting the packets' destinations under some of the names (a name may hold several)."""
    out: dict[str, list[str]] = {}
    for i, p in enumerate(pkts):
        if draw_names:
            out.setdefault(draw_names[i % len(draw_names)], []).append(p.dst)
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=fqdn_policies(), pkts=st.lists(packets(fragments=False), min_size=1, max_size=25),
       names=st.lists(st.sampled_from(LEARN), max_size=4, unique=True))
def test_batch_judges_fqdns_rules_by_the_snapshot(text, pkts, names):
    """The batch model `test` uses equals reference.evaluate with the same snapshot, and with none (the
    sets empty: an fqdns rule matches nothing — the batch model once read it as matching every peer)."""
    policy = parse_policy(text)
    learnt = _learnt_for(pkts, names)
    for snap in (None, learnt):
        got = BatchReference(policy, snap).evaluate(pkts)
        assert got == [evaluate(policy, p, snap) for p in pkts], (text, snap)


FQ_POLICY = """version: 1
name: fq-test
defaults: {ingress: deny, egress: deny, stateful: true}
rules:
  - {name: dns, priority: 1, direction: egress, action: allow, protocol: udp, ports: [53], peers: [192.0.2.53/32]}
  - {name: mirrors, priority: 10, direction: egress, action: allow, protocol: tcp, ports: [443], fqdns: ["*.mirrors.example.test"]}
  - {name: api, priority: 20, direction: egress, action: allow, protocol: tcp, fqdns: ["api.example.test"]}
dns: {upstreams: ["192.0.2.53:53"]}
"""
FQ_SNAPSHOT = """deb.mirrors.example.test: [198.51.100.10, "2001:db8::10"]
api.example.test: 198.51.100.20
other.example.test: [198.51.100.30]
"""
FQ_CASES = """cases:
  - name: a mirror listed in the snapshot
    packet: egress tcp :40000 -> 198.51.100.10:443
    expect: {verdict: allow, rule: mirrors}
  - name: a mirror over IPv6
    packet: egress tcp :40000 -> [2001:db8::10]:443
    expect: {verdict: allow, rule: mirrors}
  - name: the api on any port
    packet: egress tcp :40000 -> 198.51.100.20:8443
    expect: {verdict: allow, rule: api}
  - name: an address learnt for an unlisted name falls through
    packet: egress tcp :40000 -> 198.51.100.30:443
    expect: {verdict: drop, reason: default_deny}
  - name: the reply of a mirror connection
    packet: ingress tcp 198.51.100.10:443 -> :40000 flags SA
    state: reply
    expect: {verdict: allow, reason: pass_conntrack}
invariants:
  - {name: no ssh out to the api, never: {direction: egress, protocol: tcp, ports: [22], to: 198.51.100.20/32}}
"""


def test_cli_test_with_fqdn_addresses_reference_only(tmp_path):
    (tmp_path / "p.yaml").write_text(FQ_POLICY)
    (tmp_path / "c.yaml").write_text(FQ_CASES)
    (tmp_path / "snap.yaml").write_text(FQ_SNAPSHOT)
    r = _cli("test", "p.yaml", "c.yaml", "--reference-only", "--fqdn-addresses", "snap.yaml", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr        # the api rule allows any tcp port: ssh to it too
    assert "case" not in r.stdout.split("FAILED")[0], r.stdout
    assert "'no ssh out to the api'" in r.stdout and "5 passed, 0 failed" in r.stdout
    assert "fqdns sets from snap.yaml" in r.stdout
    ok = FQ_CASES.split("invariants:")[0]
    (tmp_path / "ok.yaml").write_text(ok)
    r = _cli("test", "p.yaml", "ok.yaml", "--reference-only", "--fqdn-addresses", "snap.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # without the snapshot the sets are empty: every case that expects an fqdns rule fails, by name
    r = _cli("test", "p.yaml", "ok.yaml", "--reference-only", cwd=tmp_path)
    assert r.returncode == 1 and "3 passed" not in r.stdout
    for name in ("a mirror listed in the snapshot", "a mirror over IPv6", "the api on any port"):
        assert f"case {name!r}" in r.stdout, r.stdout
    assert "case 'an address learnt for an unlisted name falls through'" not in r.stdout
    r = _cli("validate", "p.yaml", "--cases", "ok.yaml", "--fqdn-addresses", "snap.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "bad.yaml").write_text("api.example.test: [nope]\n")
    r = _cli("test", "p.yaml", "ok.yaml", "--reference-only", "--fqdn-addresses", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "api.example.test[0]: 'nope' is not an IP address" in r.stderr
    # the snapshot judges the cases only: without --cases it is an input error, not silently ignored (apply
    # would otherwise change the policy as if the option did something)
    for args in (["validate"], ["apply", "--pin-dir", str(tmp_path / "none")]):   # a private pin dir: no instance
        r = _cli(*args[:1], "p.yaml", "--fqdn-addresses", "snap.yaml", *args[1:], cwd=tmp_path)
        assert r.returncode == 2 and "--fqdn-addresses judges the --cases file" in r.stderr, (args, r.stdout, r.stderr)
    r = _cli("apply", "p.yaml", "--reference-only", "--pin-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert r.returncode == 2 and "--reference-only judges the --cases file" in r.stderr, (r.stdout, r.stderr)
