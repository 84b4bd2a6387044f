"""The cases file and the packet syntax: every problem reported at once with file:line and path; a
wrong expectation fails `test` and names the case (CLI, reference model); JUnit XML for CI; the wire
frames `test` hands to test-run are what scapy builds (fields and checksums)."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6Unknown, IPv6
from scapy.layers.l2 import Ether

from hostwall.enforcer.analysis.cases import parse_cases
from hostwall.enforcer.analysis.frames import frame
from hostwall.enforcer.analysis.judge import run_tests
from hostwall.enforcer.analysis.junit import junit_xml
from hostwall.enforcer.analysis.packet import parse_packet
from hostwall.enforcer.policy import parse_policy
from hostwall.yamldoc import PolicyError

ROOT = Path(__file__).resolve().parents[2]
POLICY = """version: 1
name: web
defaults: {ingress: deny, egress: allow}
rules:
  - {name: ssh-admin, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: [10.20.0.0/16]}
  - {name: web, priority: 20, direction: ingress, action: allow, protocol: tcp, ports: [80, 443]}
  - {name: no-smtp-out, priority: 30, direction: egress, action: deny, protocol: tcp, ports: [25]}
"""
CASES = """local: [192.0.2.10, "2001:db8::10"]
cases:
  - name: ssh from the admin network
    packet: ingress tcp 10.20.1.5:40000 -> :22
    expect: {verdict: allow, rule: ssh-admin}
  - name: ssh from elsewhere
    packet: {direction: ingress, protocol: tcp, src: 203.0.113.9, dport: 22}
    expect: {verdict: drop, reason: default_deny, rule: null}
  - name: web over IPv6
    packet: ingress tcp [2001:db8:1::5]:5555 -> :443
    expect: allow
  - name: replies of outbound https pass the deny-by-default ingress
    packet: ingress tcp 198.51.100.7:443 -> :40001 flags SA
    state: reply
    expect: {verdict: allow, reason: pass_conntrack, rule: null}
  - name: a SYN-ACK from the side that opened is judged by the rules
    packet: ingress tcp 203.0.113.7:5555 -> :443 flags SA
    state: established
    expect: {verdict: allow, reason: pass_rule, rule: web}
  - name: smtp out is blocked
    packet: egress tcp :40000 -> 198.51.100.25:25
    expect: {verdict: drop, rule: no-smtp-out}
invariants:
  - name: no ssh from outside the admin network
    never: {direction: ingress, protocol: tcp, ports: [22], except: [10.20.0.0/16]}
"""


def test_packet_syntax_round_trip_and_errors():
    p = parse_packet("ingress tcp 10.1.2.3:5555 -> 10.0.0.1:22 flags SA on eth0 state reply")
    assert (p.src, p.sport, p.dst, p.dport, p.flags, p.interface, p.state) == ("10.1.2.3", 5555, "10.0.0.1", 22, "SA",
                                                                               "eth0", "reply")
    assert parse_packet(p.text()) == p
    q = parse_packet("ingress icmpv6 [2001:db8::7] -> 2001:db8::1 type echo-request id 9")
    assert (q.icmp, q.icmp_id, q.family) == ((128, 0), 9, 6)
    assert parse_packet("egress udp :5353 -> 8.8.8.8:53").src == "192.0.2.1"
    assert parse_packet("ingress gre 10.0.0.1 -> 10.0.0.2").protocol == 47
    assert parse_packet("ingress tcp 10.0.0.1 -> 10.0.0.2 frag").fragment
    for bad, why in [("ingress tpc 1.2.3.4:1 -> :2", "unknown protocol"), ("inbound tcp 1.2.3.4:1 -> :2", "direction"),
                     ("ingress tcp 1.2.3.4 -> 10.0.0.1", "destination port"), ("ingress tcp 1.2.3.4:70000 -> :2", "port"),
                     ("ingress icmp 2001:db8::1 -> 2001:db8::2", "malformed"), ("ingress udp 1.2.3.4:1 -> :2 state reply flags S",
                                                                                 "flags belong"),
                     ("ingress gre 1.2.3.4 -> 1.2.3.5 state reply", "state applies")]:
        with pytest.raises(ValueError, match=why):
            parse_packet(bad)


def test_every_problem_is_reported_with_line_and_path():
    policy = parse_policy(POLICY, "p.yaml")
    bad = """cases:
  - name: a
    packet: ingress tcp 1.2.3.4 -> :22x
    expect: allow
  - name: b
    packet: ingress tcp 1.2.3.4:1 -> :22
    expect: {verdict: maybe, rule: ssh-admn}
  - name: c
    packet: egress udp :1 -> 8.8.8.8:53
invariants:
  - name: d
    never: {direction: ingress, protocol: tcp, ports: [22], to: 10.0.0.1}
"""
    with pytest.raises(PolicyError) as e:
        parse_cases(bad, "c.yaml", policy)
    msgs = [str(i) for i in e.value.issues]
    assert any(m.startswith("c.yaml:3: cases[0].packet:") and "port '22x'" in m for m in msgs), msgs
    assert any(m.startswith("c.yaml:7: cases[1].expect.verdict:") for m in msgs), msgs
    assert any(m.startswith("c.yaml:7: cases[1].expect.rule:") and "did you mean 'ssh-admin'" in m for m in msgs), msgs
    assert any(m.startswith("c.yaml:8: cases[2]:") and "expect is missing" in m for m in msgs), msgs
    assert any("invariants[0].never.to" in m and "this host's own address" in m for m in msgs), msgs


def test_reference_run_and_junit():
    policy = parse_policy(POLICY, "p.yaml")
    cf = parse_cases(CASES, "c.yaml", policy)
    rep = run_tests(policy, cf)
    assert not rep.failed, rep.text()
    wrong = CASES.replace("expect: {verdict: drop, rule: no-smtp-out}", "expect: {verdict: allow}")
    rep = run_tests(policy, parse_cases(wrong, "c.yaml", policy))
    assert rep.failed and [r.case.name for r in rep.failures] == ["smtp out is blocked"]
    assert "c.yaml:20: case 'smtp out is blocked'" in rep.text()
    root = ET.fromstring(junit_xml(rep))
    assert root.get("tests") == "7" and root.get("failures") == "1"
    failed = [tc for tc in root.iter("testcase") if tc.find("failure") is not None]
    assert [tc.get("name") for tc in failed] == ["smtp out is blocked"]
    assert failed[0].get("line") == "20"


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_test_validate_lint_diff_explain(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "c.yaml").write_text(CASES)
    r = _cli("test", "p.yaml", "c.yaml", "--reference-only", "--junit", "out.xml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ET.parse(tmp_path / "out.xml").getroot().get("failures") == "0"
    (tmp_path / "bad.yaml").write_text(CASES.replace("rule: ssh-admin}", "rule: web}"))
    r = _cli("test", "p.yaml", "bad.yaml", "--reference-only", cwd=tmp_path)
    assert r.returncode == 1 and "case 'ssh from the admin network'" in r.stdout and "rule 'ssh-admin', expected 'web'" in r.stdout
    r = _cli("validate", "p.yaml", "--cases", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 1 and "case 'ssh from the admin network'" in r.stdout
    (tmp_path / "typo.yaml").write_text("cases:\n  - name: x\n    packet: ingress tcp 1.2.3.4:1 -> :22\n    expect: {rule: nope}\n")
    r = _cli("test", "p.yaml", "typo.yaml", "--reference-only", cwd=tmp_path)
    assert r.returncode == 2 and "typo.yaml:4: cases[0].expect.rule: the policy has no rule 'nope'" in r.stderr
    (tmp_path / "q.yaml").write_text(POLICY + "  - {name: dup-web, priority: 40, direction: ingress, action: allow, "
                                               "protocol: tcp, ports: [443]}\n")
    r = _cli("lint", "q.yaml", cwd=tmp_path)
    assert r.returncode == 0 and "q.yaml:8: rule 'dup-web': shadowed:" in r.stdout
    assert _cli("lint", "q.yaml", "--strict", cwd=tmp_path).returncode == 1
    assert _cli("lint", "p.yaml", "--strict", cwd=tmp_path).returncode == 0
    r = _cli("diff", "p.yaml", "q.yaml", "--exit-code", cwd=tmp_path)
    assert r.returncode == 0 and "verdict changes: 0 regions" in r.stdout and "+ dup-web" in r.stdout
    (tmp_path / "r.yaml").write_text(POLICY.replace("ports: [80, 443]", "ports: [80]"))
    r = _cli("diff", "p.yaml", "r.yaml", "--exit-code", cwd=tmp_path)
    assert r.returncode == 1 and "ingress tcp port 443 from any IPv4: allow (rule 'web') → drop (default)" in r.stdout
    r = _cli("explain", "p.yaml", "ingress", "tcp", "10.20.3.4:5555", "->", ":22", cwd=tmp_path)
    assert r.returncode == 0 and "decided by rule 'ssh-admin' (p.yaml:5" in r.stdout
    r = _cli("explain", "p.yaml", "ingress tcp 10.9.9.9:5555 -> :443", "--json", cwd=tmp_path)
    assert '"rule": "web"' in r.stdout
    assert _cli("explain", "p.yaml", "ingress tcp nowhere -> :22", cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("text", ["ingress tcp 10.1.2.3:5555 -> 10.0.0.1:22 flags SA",
                                  "egress udp 10.0.0.1:5353 -> 8.8.8.8:53",
                                  "ingress icmp 10.1.2.3 -> 10.0.0.1 type echo-request id 7",
                                  "ingress tcp [2001:db8::7]:40000 -> [2001:db8::1]:443 flags PA",
                                  "ingress udp [2001:db8::7]:53 -> [2001:db8::1]:5000",
                                  "ingress icmpv6 2001:db8::7 -> 2001:db8::1 type 128 id 3"])
def test_frames_are_what_scapy_builds(text):
    p = parse_packet(text)
    got = Ether(frame(p))
    ip = IP(src=p.src, dst=p.dst, id=1, flags=0) if p.family == 4 else IPv6(src=p.src, dst=p.dst)
    l4 = {6: lambda: TCP(sport=p.sport, dport=p.dport, flags=p.flags, seq=1000, ack=1017 if "A" in p.flags else 0,
                         window=65535),
          17: lambda: UDP(sport=p.sport, dport=p.dport),
          1: lambda: ICMP(type=8, id=p.icmp_id, seq=1),
          58: lambda: ICMPv6EchoRequest(id=p.icmp_id, seq=1)}[p.protocol]()
    want = Ether(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / l4 / b"hostwall-probe!!"))
    assert bytes(got) == bytes(want)


@pytest.mark.parametrize("text", ["ingress icmp 10.1.2.3 -> 10.0.0.1 type 3/4 about 10.0.0.1 ttl 30",
                                  "egress icmp 10.0.0.1 -> 10.1.2.3 type time-exceeded about 10.1.2.3",
                                  "ingress icmpv6 [2001:db8::7] -> 2001:db8::1 type packet-too-big about 2001:db8::1",
                                  "ingress icmpv6 fe80::7 -> ff02::1 type neighbor-advertisement ttl 255"])
def test_icmp_error_and_hop_limit_frames_are_what_scapy_builds(text):
    """An error with `about` embeds an IP header from that address to the error's sender and 8 bytes of
    UDP (after an MTU of 1280); `ttl` is the outer TTL / hop limit."""
    p = parse_packet(text)
    assert parse_packet(p.text()) == p
    udp = bytes(UDP(sport=40000, dport=53, len=24, chksum=0))[:8]
    if p.family == 4:
        ip = IP(src=p.src, dst=p.dst, id=1, flags=0, ttl=p.hop_limit)
        inner = bytes(IP(src=p.about, dst=p.src, id=1, flags=0, ttl=64, proto=17, len=44))[:20]
    else:
        ip = IPv6(src=p.src, dst=p.dst, hlim=p.hop_limit)
        inner = bytes(IPv6(src=p.about, dst=p.src, plen=24, nh=17, hlim=64))[:40] if p.about else b""
    if p.about:                                       # type, code, checksum, MTU 1280, the embedded packet
        rest = (1280).to_bytes(4, "big") + inner + udp
    else:                                             # type, code, checksum, id 0, seq 1, payload
        rest = b"\x00\x00\x00\x01hostwall-probe!!"
    if p.family == 4:
        l4 = ICMP(bytes([p.icmp[0], p.icmp_code, 0, 0]) + rest)
        del l4.chksum                                 # scapy computes it
    else:
        l4 = ICMPv6Unknown(type=p.icmp[0], code=p.icmp_code, msgbody=rest)
    want = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / l4
    assert frame(p) == bytes(want), (Ether(frame(p)).show(dump=True), want.show2(dump=True))
    ref = p.reference()
    assert (ref.hop_limit, ref.inner_src) == (p.hop_limit, p.about)
