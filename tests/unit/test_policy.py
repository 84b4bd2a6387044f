"""Policy loading and validation: every error with path + line, defaults, ordering, peers files."""
from __future__ import annotations

import ipaddress
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.enforcer.policy import (
    MAX_RULES,
    Defaults,
    DosProfile,
    InterfaceConf,
    PeerSet,
    Policy,
    PolicyError,
    PolicyIssue,
    load_policy,
    parse_policy,
)
from hostwall.enforcer.validation import parse_cidr, parse_peer_lines
from hostwall.units import parse_duration, parse_rate

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "policies"

HEAD = "version: 1\nname: t\n"


def issues_of(text: str, **kw) -> list[PolicyIssue]:
    with pytest.raises(PolicyError) as ei:
        parse_policy(text, **kw)
    assert str(ei.value) == "\n".join(map(str, ei.value.issues))
    return ei.value.issues


def one(issues: list[PolicyIssue], path: str, line: int | None, *words: str) -> PolicyIssue:
    """Exactly one issue at `path`, on `line`, whose message holds every word."""
    hits = [i for i in issues if i.path == path]
    assert len(hits) == 1, f"expected one issue at {path!r}, got {[str(i) for i in issues]}"
    hit = hits[0]
    assert hit.line == line, str(hit)
    for w in words:
        assert w in hit.message, str(hit)
    return hit


def rule(extra: str = "", name: str = "r1", priority: str = "10", direction: str = "ingress",
         action: str = "allow") -> str:
    body = f"  - name: {name}\n    priority: {priority}\n    direction: {direction}\n    action: {action}\n"
    return body + textwrap.indent(textwrap.dedent(extra), "    ") if extra else body


def with_rules(*rules: str) -> str:
    return HEAD + "rules:\n" + "".join(rules)


# ---------------------------------------------------------------- valid policies

def test_design_example_loads_fully():
    p = load_policy(DATA / "example.yaml")
    assert (p.version, p.name, p.revision) == (1, "edge-web", "42")
    assert p.defaults == Defaults(ingress="deny", egress="allow", stateful=True, audit=False)
    assert [r.name for r in p.rules] == ["threat-intel", "ssh-admin"]      # priority 5 before 10
    intel, ssh = p.rules
    assert (intel.index, intel.line, intel.action, intel.protocol, intel.ports) == (1, 17, "deny", "any", None)
    assert (ssh.index, ssh.line, ssh.protocol) == (0, 10, "tcp")
    assert ssh.ports == ((22, 22), (8000, 8100))
    assert ssh.peers.cidrs() == ["10.20.0.0/16", "2001:db8:20::/48"]
    assert not intel.peers.any and len(intel.peers) == 5
    assert p.prefix_count == 7
    assert p.dos_profiles == {"web": DosProfile(
        name="web", per_source_pps=2000, per_source_burst=4000, per_source_bps=20_000_000,
        syn_per_source_pps=200, syn_global_pps=50000, udp_per_source_pps=1000, icmp_per_source_pps=50,
        ports=((53, "udp", 5000),), ban_after_s=3.0, ban_duration_s=60.0, source_prefix_v4=32,
        source_prefix_v6=64)}
    assert p.interfaces == (InterfaceConf("eth0", "auto", "web"),)
    assert p.source == str(DATA / "example.yaml")


@pytest.mark.parametrize("path", sorted(DATA.glob("*.yaml")) + [ROOT / "examples" / "policy.yaml"],
                         ids=lambda p: p.name)
def test_valid_files_load(path):
    p = load_policy(path)
    assert isinstance(p, Policy) and p.version == 1
    assert list(p.rules) == sorted(p.rules, key=lambda r: (r.priority, r.index))


def test_lab_example_matches_lab_plan():
    from hostwall.enforcer.reference import Packet, evaluate
    p = load_policy(ROOT / "examples" / "policy.yaml")
    assert (p.defaults.ingress, p.defaults.egress, p.defaults.stateful) == ("deny", "allow", True)
    ok = [(4, "10.66.2.5", 6, 22), (4, "10.66.2.5", 6, 80), (4, "10.66.2.5", 6, 8050), (4, "10.66.2.5", 17, 5353),
          (4, "10.66.2.5", 1, 0), (6, "fd66:2::5", 6, 22), (6, "fd66:2::5", 58, 0), (6, "fd66:2::5", 17, 5353)]
    for fam, src, proto, port in ok:
        dst = "10.66.1.2" if fam == 4 else "fd66:1::2"
        assert evaluate(p, Packet("ingress", fam, src, dst, proto, 40000, port)).verdict == "allow", (src, port)
    for fam, src in [(4, "10.66.3.7"), (6, "fd66:3::7")]:
        dst = "10.66.1.2" if fam == 4 else "fd66:1::2"
        d = evaluate(p, Packet("ingress", fam, src, dst, 6, 40000, 22))
        assert (d.verdict, d.reason) == ("drop", "policy_deny")
    assert evaluate(p, Packet("ingress", 4, "10.66.2.5", "10.66.1.2", 6, 1, 23)).reason == "default_deny"
    assert evaluate(p, Packet("egress", 4, "10.66.1.2", "10.66.3.7", 6, 1, 23)).verdict == "allow"


def test_defaults_apply_when_omitted():
    p = parse_policy(with_rules(rule()))
    assert p.defaults == Defaults("deny", "allow", True, False)
    r = p.rules[0]
    assert r.protocol == "any" and r.peers.any and r.ports is None and len(r.peers) == 0
    assert p.revision.startswith("sha256:") and len(p.revision) == len("sha256:") + 12
    assert p.source == "<string>" and p.dos_profiles == {} and p.interfaces == ()


def test_rules_sorted_by_priority_then_file_order():
    p = parse_policy(with_rules(rule(name="a", priority="50"), rule(name="b", priority="7"),
                                rule(name="c", priority="50"), rule(name="d", priority="7")))
    assert [(r.name, r.index) for r in p.rules] == [("b", 1), ("d", 3), ("a", 0), ("c", 2)]
    assert [r.line for r in sorted(p.rules, key=lambda r: r.index)] == [4, 8, 12, 16]


def test_ports_are_merged_and_sorted():
    p = parse_policy(with_rules(rule("ports: [443, '80-90', 85, '91 - 95', 22]\n")))
    assert p.rules[0].ports == ((22, 22), (80, 95), (443, 443))


def test_revision_integer_and_content_hash(tmp_path):
    assert parse_policy(HEAD + "revision: 42\n").revision == "42"
    (tmp_path / "l.txt").write_text("10.0.0.0/8\n")
    pol = tmp_path / "p.yaml"
    pol.write_text(with_rules(rule("peers_file: l.txt\n")))
    r1 = load_policy(pol).revision
    assert load_policy(pol).revision == r1                              # deterministic
    (tmp_path / "l.txt").write_text("10.0.0.0/9\n")
    assert load_policy(pol).revision != r1                              # peers file is part of the hash


def test_peers_file_relative_to_policy_folder(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    (sub / "lists").mkdir(parents=True)
    (sub / "lists" / "x.txt").write_text("# hdr\n\n10.1.0.0/16  # trailing\r\n2001:db8::1\n198.51.100.1\n10.1.0.0/16\n")
    (sub / "p.yaml").write_text(with_rules(rule("peers_file: lists/x.txt\n")))
    monkeypatch.chdir(tmp_path)
    peers = load_policy(Path("conf") / "p.yaml").rules[0].peers
    assert peers.cidrs() == ["10.1.0.0/16", "198.51.100.1/32", "2001:db8::1/128"]   # dedup, sorted
    assert peers.v4_net.dtype == np.uint32 and peers.v4_len.dtype == np.uint8
    assert int(peers.v4_net[0]) == int(ipaddress.IPv4Address("10.1.0.0"))          # host byte order value


def test_shared_peers_file_parsed_once(tmp_path):
    (tmp_path / "l.txt").write_text("10.0.0.0/8\n")
    (tmp_path / "p.yaml").write_text(with_rules(rule("peers_file: l.txt\n", name="a"),
                                                rule("peers_file: ./l.txt\n", name="b", direction="egress")))
    p = load_policy(tmp_path / "p.yaml")
    assert p.rules[0].peers is p.rules[1].peers and p.prefix_count == 2


def test_progress_reports_total(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"10.{i >> 8}.{i & 255}.0/24\n" for i in range(40000)))
    (tmp_path / "b.txt").write_text("10.0.0.0/8\n" * 10)
    (tmp_path / "p.yaml").write_text(with_rules(rule("peers_file: a.txt\n", name="a"),
                                                rule("peers_file: b.txt\n", name="b")))
    calls = []
    load_policy(tmp_path / "p.yaml", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (40010, 40010)
    assert len(calls) >= 3 and all(t == 40010 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_yaml_merge_keys_are_not_duplicates():
    text = HEAD + "x: &base {priority: 1, direction: ingress, action: allow}\n"
    assert any(i.path == "x" for i in issues_of(text))                  # unknown top-level key still reported
    text = HEAD + "rules:\n  - &b {name: a, priority: 1, direction: ingress, action: allow}\n" \
                  "  - <<: *b\n    name: b\n    priority: 2\n"
    p = parse_policy(text)
    assert [(r.name, r.priority) for r in p.rules] == [("a", 1), ("b", 2)]


# ---------------------------------------------------------------- document-level errors

def test_yaml_syntax_error_has_line():
    iss = issues_of(HEAD + "rules:\n  - name: [unclosed\n")
    assert len(iss) == 1 and iss[0].path == "" and iss[0].line in (4, 5)
    assert "YAML syntax error" in iss[0].message


def test_tabs_tags_and_recursive_aliases():
    one(issues_of(HEAD + "rules:\n\t- x\n"), "", 4, "tabs")
    one(issues_of(HEAD + "x: !!python/object:os.system {}\n"), "x", 3, "unsupported YAML tag")
    one(issues_of(HEAD + "defaults: !!binary aGk=\n"), "defaults", 3, "mapping")
    one(issues_of(HEAD + "rules: &a [*a]\n"), "rules[0]", 3, "recursive")


def test_empty_and_non_mapping_documents():
    one(issues_of(""), "", 1, "empty")
    one(issues_of("- 1\n- 2\n"), "", 1, "mapping")


def test_missing_file():
    with pytest.raises(PolicyError) as ei:
        load_policy("/nonexistent/hostwall.yaml")
    assert ei.value.issues[0].file == "/nonexistent/hostwall.yaml" and "cannot read" in str(ei.value)


def test_version_and_name():
    one(issues_of("version: 2\nname: t\n"), "version", 1, "expected 1")
    one(issues_of("version: '1'\nname: t\n"), "version", 1, "integer")     # one issue, not type + const
    iss = issues_of("name: t\n")
    one(iss, "version", 1, "missing")
    one(issues_of("version: 1\n"), "name", 1, "missing")
    one(issues_of("version: 1\nname: 'a b/c'\n"), "name", 2, "invalid")


def test_unknown_keys_everywhere():
    text = (HEAD + "colour: red\ndefaults:\n  ingres: deny\nrules:\n"
            + rule("prots: [22]\n")
            + "dos:\n  profiles:\n    p1:\n      per_source: {pps: 1, bursts: 2}\n      bogus: 1\n"
              "interfaces:\n  - {name: eth0, mode: native}\n")
    iss = issues_of(text)
    one(iss, "colour", 3, "unknown key 'colour'")
    one(iss, "defaults.ingres", 5, "did you mean 'ingress'")
    one(iss, "rules[0].prots", 11, "did you mean 'ports'")
    one(iss, "dos.profiles.p1.per_source.bursts", 15, "did you mean 'burst'")
    one(iss, "dos.profiles.p1.bogus", 16, "unknown key")
    one(iss, "interfaces[0].mode", 18, "unknown key")
    assert len(iss) == 6


def test_duplicate_yaml_keys():
    iss = issues_of(HEAD + "rules:\n" + rule() + "    priority: 3\n")
    one(iss, "rules[0].priority", 8, "duplicate key", "line 5")


def test_wrong_types():
    iss = issues_of(HEAD + "defaults:\n  stateful: 'yes'\n  audit: 1\nrules:\n" + rule(priority="ten"))
    one(iss, "defaults.stateful", 4, "true or false", "'yes'")
    one(iss, "defaults.audit", 5, "true or false")
    one(iss, "rules[0].priority", 8, "integer", "'ten'")
    assert len(iss) == 3
    one(issues_of(HEAD + "rules: {a: 1}\n"), "rules", 3, "list")
    one(issues_of(HEAD + "rules:\n  - just-a-string\n"), "rules[0]", 4, "mapping")


def test_rule_names():
    iss = issues_of(with_rules(rule(name="Bad.Name"), rule(name="dup"), rule(name="dup")))
    one(iss, "rules[0].name", 4, "lowercase")
    one(iss, "rules[2].name", 12, "duplicate rule name 'dup'", "line 8")
    one(issues_of(with_rules(rule(name="x" * 65))), "rules[0].name", 4, "64")


def test_required_rule_fields():
    iss = issues_of(HEAD + "rules:\n  - name: a\n    direction: ingress\n")
    one(iss, "rules[0].priority", 4, "missing required key 'priority'")
    one(iss, "rules[0].action", 4, "missing required key 'action'")
    assert len(iss) == 2


def test_enums():
    iss = issues_of(with_rules(rule("protocol: sctp\n", direction="inbound", action="reject")))
    one(iss, "rules[0].direction", 6, "'inbound'", "ingress, egress")
    one(iss, "rules[0].action", 7, "'reject'", "allow, deny, log")
    one(iss, "rules[0].protocol", 8, "'sctp'", "tcp, udp, icmp, icmpv6, any")
    one(issues_of(HEAD + "defaults: {ingress: drop}\n"), "defaults.ingress", 3, "allow, deny")


@pytest.mark.parametrize("prio,ok", [("-1", False), ("0", True), ("1000000", True), ("1000001", False)])
def test_priority_range(prio, ok):
    text = with_rules(rule(priority=prio))
    if ok:
        assert parse_policy(text).rules[0].priority == int(prio)
    else:
        one(issues_of(text), "rules[0].priority", 5, "between 0 and 1000000")


def test_bad_cidrs():
    iss = issues_of(with_rules(rule(
        "peers:\n  - 10.0.0.1/8\n  - 10.0.0.300/24\n  - '2001:db8::1/32'\n  - 10.0.0.0/33\n  - 5\n"
        "  - '2001:db8::/129'\n  - '10.0.0.0/'\n")))
    one(iss, "rules[0].peers[0]", 9, "10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8")
    one(iss, "rules[0].peers[1]", 10, "not a valid")
    one(iss, "rules[0].peers[2]", 11, "did you mean 2001:db8::/32")
    one(iss, "rules[0].peers[3]", 12, "0-32")
    one(iss, "rules[0].peers[4]", 13, "string")
    one(iss, "rules[0].peers[5]", 14, "0-128")
    one(iss, "rules[0].peers[6]", 15, "prefix length")
    assert len(iss) == 7


def test_empty_peers_list():
    one(issues_of(with_rules(rule("peers: []\n"))), "rules[0].peers", 8, "empty")


@pytest.mark.parametrize("entry,words", [
    ("0", ["out of range", "1 and 65535"]),
    ("65536", ["out of range"]),
    ("'0-10'", ["port 0"]),
    ("'100-70000'", ["port 70000"]),
    ("'90-80'", ["reversed", "80-90"]),
    ("'1-2-3'", ["invalid", "LO-HI"]),
    ("'http'", ["invalid"]),
    ("''", ["invalid"]),
    ("true", ["integer or a string"]),
])
def test_bad_ports(entry, words):
    iss = issues_of(with_rules(rule(f"protocol: tcp\nports:\n  - 22\n  - {entry}\n")))
    one(iss, "rules[0].ports[1]", 11, *words)
    assert len(iss) == 1


@pytest.mark.parametrize("proto", ["icmp", "icmpv6"])
def test_ports_need_tcp_udp_or_any(proto):
    one(issues_of(with_rules(rule(f"protocol: {proto}\nports: [22]\n"))), "rules[0].ports", 9, "tcp, udp or any")
    parse_policy(with_rules(rule("protocol: any\nports: [22]\n")))      # any + ports is fine


def test_peers_and_peers_file_together(tmp_path):
    (tmp_path / "l.txt").write_text("10.0.0.0/8\n")
    iss = issues_of(with_rules(rule("peers: [10.0.0.0/8]\npeers_file: l.txt\n")), base_dir=str(tmp_path))
    one(iss, "rules[0].peers_file", 9, "either peers or peers_file")
    assert len(iss) == 1


def test_peers_file_missing_or_unreadable(tmp_path):
    (tmp_path / "adir").mkdir()
    iss = issues_of(with_rules(rule("peers_file: nope.txt\n", name="a"), rule("peers_file: adir\n", name="b")),
                    source="pol.yaml", base_dir=str(tmp_path))
    one(iss, "rules[0].peers_file", 8, "cannot read", "nope.txt", "relative to the policy file")
    one(iss, "rules[1].peers_file", 13, "cannot read")
    assert all(i.file == "pol.yaml" for i in iss)


def test_bad_lines_in_peers_file(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("# ok\n10.0.0.0/8\n10.0.0.1/8   # host bits\nnot-an-ip\n\n2001:db8::/129\n")
    (tmp_path / "p.yaml").write_text(with_rules(rule("peers_file: l.txt\n")))
    with pytest.raises(PolicyError) as ei:
        load_policy(tmp_path / "p.yaml")
    iss = ei.value.issues
    assert [(i.file, i.line, i.path) for i in iss] == [(str(lst), n, "rules[0].peers_file") for n in (3, 4, 6)]
    assert "did you mean 10.0.0.0/8" in iss[0].message and "not a valid" in iss[1].message
    assert str(iss[0]).startswith(f"{lst}:3: rules[0].peers_file: ")


def test_many_bad_lines_are_capped(tmp_path):
    (tmp_path / "l.txt").write_text("10.0.0.0/8\n" + "bad\n" * 30 + "10.0.0.1/8\n" * 5)
    iss = issues_of(with_rules(rule("peers_file: l.txt\n")), base_dir=str(tmp_path))
    assert len(iss) == 21
    assert [i.line for i in iss[:20]] == list(range(2, 22))
    assert iss[20].line is None and "... and 15 more" in iss[20].message


def test_interfaces():
    iss = issues_of(HEAD + "dos:\n  profiles:\n    web: {}\ninterfaces:\n"
                    "  - {name: eth0, xdp_mode: turbo}\n  - {name: eth1, dos_profile: webb}\n  - {name: eth0}\n"
                    "  - {xdp_mode: auto}\n  - {name: 'bad/name'}\n")
    one(iss, "interfaces[0].xdp_mode", 7, "native, generic, auto")
    one(iss, "interfaces[1].dos_profile", 8, "unknown DoS profile 'webb'", "web")
    one(iss, "interfaces[2].name", 9, "listed twice")
    one(iss, "interfaces[3].name", 10, "missing")
    one(iss, "interfaces[4].name", 11, "interface name")
    assert len(iss) == 5
    one(issues_of(HEAD + "interfaces: [{name: eth0, dos_profile: web}]\n"), "interfaces[0].dos_profile", 3,
        "dos.profiles")


def test_dos_profile_errors():
    text = HEAD + textwrap.dedent("""\
        dos:
          profiles:
            web:
              per_source: {pps: 2000, burst: 1000, bps: 20Mbps}
              syn: {per_source_pps: 0, global_pps: -5}
              udp: {per_source_pps: 1.5}
              icmp: {per_source_pps: '50'}
              ports: [{port: 53, protocol: udp, pps: 10}, {port: 53, protocol: udp, pps: 20}, {port: 0, protocol: sctp}]
              ban: {after: 0s, duration: 3 fortnights}
              source_prefix_v4: 0
              source_prefix_v6: 129
            other:
              per_source: {burst: 10, bps: 0}
              ban: {after: 3s}
            "bad name": {}
        """)
    iss = issues_of(text)
    pre = "dos.profiles.web."
    one(iss, pre + "per_source.burst", 6, "below pps")
    one(iss, pre + "per_source.bps", 6, "unknown rate unit 'Mbps'")
    one(iss, pre + "syn.per_source_pps", 7, "greater than 0")
    one(iss, pre + "syn.global_pps", 7, "greater than 0")
    one(iss, pre + "udp.per_source_pps", 8, "integer")
    one(iss, pre + "icmp.per_source_pps", 9, "integer")
    one(iss, pre + "ports[1]", 10, "listed twice")
    one(iss, pre + "ports[2].port", 10, "between 1 and 65535")
    one(iss, pre + "ports[2].protocol", 10, "tcp, udp")
    one(iss, pre + "ports[2].pps", 10, "missing")
    one(iss, pre + "ban.after", 11, "greater than 0")
    one(iss, pre + "ban.duration", 11, "unknown duration unit")
    one(iss, pre + "source_prefix_v4", 12, "between 1 and 32")
    one(iss, pre + "source_prefix_v6", 13, "between 1 and 128")
    one(iss, "dos.profiles.other.per_source.burst", 15, "needs per_source.pps")
    one(iss, "dos.profiles.other.per_source.bps", 15, "greater than 0")
    one(iss, "dos.profiles.other.ban.duration", 16, "missing")
    one(iss, "dos.profiles.bad name", 17, "invalid name")
    assert len(iss) == 18


def test_too_many_rules():
    text = with_rules(*(rule(name=f"r{i}") for i in range(MAX_RULES + 1)))
    iss = issues_of(text)
    one(iss, "rules", 3, "4097 entries exceed the limit of 4096")
    assert len(iss) == 1
    assert len(parse_policy(with_rules(*(rule(name=f"r{i}") for i in range(MAX_RULES)))).rules) == MAX_RULES


def test_five_different_errors_all_reported():
    text = textwrap.dedent("""\
        version: 1
        name: five
        defaults:
          stateful: "yes"
        rules:
          - name: a
            priority: ten
            direction: ingress
            action: allow
          - name: b
            priority: 1
            direction: ingress
            action: allow
            peers: [10.0.0.1/8]
            ports: ["90-80"]
          - name: a
            priority: 2
            direction: sideways
            action: allow
        """)
    iss = issues_of(text)
    assert [(i.line, i.path) for i in iss] == [
        (4, "defaults.stateful"), (7, "rules[0].priority"), (14, "rules[1].peers[0]"),
        (15, "rules[1].ports[0]"), (16, "rules[2].name"), (18, "rules[2].direction")]
    assert len(str(PolicyError(iss)).splitlines()) == 6


def test_schema_and_semantic_do_not_double_report():
    iss = issues_of(with_rules(rule("ports: [0, 70000]\npeers: [5]\n", priority="-3")))
    assert sorted(i.path for i in iss) == ["rules[0].peers[0]", "rules[0].ports[0]", "rules[0].ports[1]",
                                           "rules[0].priority"]


def test_issue_format():
    i = PolicyIssue("rules[3].ports[1]", 12, "bad", "p.yaml")
    assert str(i) == "p.yaml:12: rules[3].ports[1]: bad"
    assert str(PolicyIssue("", None, "bad", "p.yaml")) == "p.yaml: bad"
    e = PolicyError([i, i])
    assert str(e) == "p.yaml:12: rules[3].ports[1]: bad\np.yaml:12: rules[3].ports[1]: bad"
    import pickle
    assert pickle.loads(pickle.dumps(e)).issues == [i, i]


# ---------------------------------------------------------------- value parsers

@pytest.mark.parametrize("text,bps", [("20Mbit", 20_000_000), ("1Gbit", 10**9), ("500kbit", 500_000),
                                      ("1.5gbit", 1_500_000_000), (12345, 12345), ("800", 800), ("2 Tbit", 2 * 10**12)])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("bad", ["20MB", "fast", "0bit", "-1Mbit", "", True])
def test_parse_rate_rejects(bad):
    with pytest.raises(ValueError):
        parse_rate(bad)


@pytest.mark.parametrize("text,s", [("3s", 3.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), (7, 7.0),
                                    (0.25, 0.25), ("1.5s", 1.5)])
def test_parse_duration(text, s):
    assert parse_duration(text) == pytest.approx(s)


@pytest.mark.parametrize("bad", ["3d", "0ms", "s", "-1s", True, float("inf")])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


# ---------------------------------------------------------------- PeerSet

def test_peerset_contains_and_equality():
    ps = PeerSet.from_cidrs(["10.0.0.0/8", "0.0.0.0/32", "192.0.2.7", "2001:db8::/32", "::/0"])
    ip = ipaddress.ip_address
    assert ps.contains(ip("10.255.1.1")) and ps.contains(ip("192.0.2.7")) and ps.contains(ip("0.0.0.0"))
    assert not ps.contains(ip("11.0.0.0")) and not ps.contains(ip("192.0.2.8"))
    assert ps.contains(ip("fe80::1"))                                   # ::/0
    v4only = PeerSet.from_cidrs(["0.0.0.0/0"])
    assert v4only.contains(ip("1.2.3.4")) and not v4only.contains(ip("::1"))
    assert PeerSet.everything().contains(ip("::1")) and PeerSet.everything().any
    assert len(ps) == 5 and len(PeerSet.everything()) == 0
    assert ps == PeerSet.from_cidrs(reversed(["10.0.0.0/8", "0.0.0.0/32", "192.0.2.7", "2001:db8::/32", "::/0"]))
    assert ps != v4only and hash(ps) == hash(PeerSet.from_cidrs(ps.cidrs()))
    with pytest.raises(ValueError):
        ps.v4_net[0] = 1                                                # arrays are read-only
    with pytest.raises(ValueError, match="host bits"):
        PeerSet.from_cidrs(["10.0.0.1/8"])


# ---------------------------------------------------------------- fast CIDR parser vs ipaddress

def _reference(s: str):
    """ipaddress's verdict on a CIDR line: (family, net, len) or None if invalid / host bits set."""
    try:
        n = ipaddress.ip_network(s.strip(), strict=True)
    except ValueError:
        return None
    return (n.version, int(n.network_address), n.prefixlen)


def _ours(s: str):
    try:
        return parse_cidr(s)
    except ValueError:
        return None


_addr = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
                  st.ip_addresses(v=6).map(lambda a: a.exploded))
_plen = st.one_of(st.integers(0, 140).map(str), st.sampled_from(["", "08", "-1", "+8", "x", "1 "]))
_cidr = st.one_of(
    st.tuples(_addr, st.booleans(), _plen).map(lambda t: t[0] + ("/" + t[2] if t[1] else "")),
    st.text(alphabet="0123456789abcdef.:/x ", max_size=24),
)


@settings(max_examples=600, deadline=None)
@given(_cidr)
def test_fast_cidr_parser_matches_ipaddress(s):
    assert _ours(s) == _reference(s)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_cidr, st.sampled_from(["", "  # c", "#", "\t"])), max_size=30))
def test_peer_file_parser_matches_ipaddress(items):
    lines = [c + tail for c, tail in items]
    res = parse_peer_lines(lines, keep_bad=1000)
    want4, want6, bad = set(), set(), []
    for n, line in enumerate(lines, 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        ref = _reference(body)
        if ref is None:
            bad.append(n)
        else:
            (want4 if ref[0] == 4 else want6).add(ref[1:])
    assert [ln for ln, _ in res.bad] == bad and res.bad_total == len(bad)
    assert set(zip(map(int, res.v4_net), map(int, res.v4_len))) == want4
    assert set(zip(res.v6_net, res.v6_len)) == want6
    assert len(res.v4_net) == len(want4)                                 # deduplicated


def test_peers_file_100k_lines_loads_every_prefix(tmp_path):
    rnd = random.Random(7)
    lines = []
    for _ in range(100_000):
        ln = rnd.choice([16, 24, 28, 32])
        n = rnd.getrandbits(32) & ~((1 << (32 - ln)) - 1) & 0xFFFFFFFF
        lines.append(f"{ipaddress.IPv4Address(n)}/{ln}")
    lines[500] += "   # comment"
    (tmp_path / "big.txt").write_text("# big list\n" + "\n".join(lines) + "\n")
    (tmp_path / "p.yaml").write_text(with_rules(rule("peers_file: big.txt\n", action="deny")))
    p = load_policy(tmp_path / "p.yaml")      # its speed: `bench swap` / `bench policy` (compile_s)
    assert p.prefix_count == len(set(lines[:500] + [lines[500].split()[0]] + lines[501:]))


def test_non_string_mapping_key_is_an_error_not_a_crash():
    with pytest.raises(PolicyError) as e:
        parse_policy("version: 1\nname: x\ndos: {profiles: {1: {}}}\n")
    assert any("names must be strings" in i.message and i.line == 3 for i in e.value.issues), e.value.issues
