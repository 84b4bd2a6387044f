"""explain's DoS part says what the source guards spare (docs/dos.md "Tracked connections")."""
from __future__ import annotations

from hostwall.enforcer.analysis.explain import explain
from hostwall.enforcer.analysis.packet import parse_packet
from hostwall.enforcer.policy import parse_policy

POLICY = """
version: 1
name: dosx
defaults: {{ingress: allow, egress: allow, stateful: {stateful}}}
dos:
  profiles:
    p:
      per_source: {{pps: 5, burst: 5}}
      ban: {{after: 1s, duration: 60s}}
interfaces:
  - {{name: eth0, dos_profile: p}}
"""
PKT = "ingress udp 192.0.2.53:53 -> 10.0.0.1:40000 on eth0"
AUTO = {"prefix": "192.0.2.53/32", "kind": "automatic", "profile": "p", "reason": "udp_flood"}
OPERATOR = {"prefix": "192.0.2.0/24", "kind": "operator"}


def test_explain_says_host_opened_connections_and_errors_about_them_are_spared():
    ex = explain(parse_policy(POLICY.format(stateful="true")), parse_packet(PKT), bans=[AUTO, OPERATOR])
    text = ex.text()
    spare = [d for d in ex.dos if "spared" in d]
    assert len(spare) == 1, ex.dos
    assert "connection this host opened" in spare[0] and "pass_conntrack_over_limit" in spare[0]
    assert "ICMP error quoting one" in spare[0] and "pass_related_over_limit" in spare[0]
    assert "operator bans" in spare[0]
    # spared errors share one bucket; the shared limits of all sources are TCP/UDP ones (docs/dos.md)
    assert "spared errors together at one source's ICMP rate" in spare[0]
    assert "multicast or broadcast" in spare[0] and "limits of all sources together still apply" not in spare[0]
    # the live bans: the automatic one spares those connections, the operator's cuts everything
    assert "192.0.2.53/32 (automatic, udp_flood; a connection this host opened excepted)" in text, text
    assert "192.0.2.0/24 (operator)" in text


def test_explain_spares_nothing_without_connection_tracking():
    ex = explain(parse_policy(POLICY.format(stateful="false")), parse_packet(PKT), bans=[AUTO])
    assert not [d for d in ex.dos if "spared" in d], ex.dos
    assert "excepted" not in ex.text()


def test_the_headline_verdict_is_the_ban_that_applies():
    """A banned source is dropped before any rule (bpf/hostwall.bpf.c dos_check): the headline says
    so, and the rules' verdict is kept as what would happen without the ban."""
    pol = parse_policy(POLICY.format(stateful="true"))
    ex = explain(pol, parse_packet(PKT), bans=[OPERATOR])
    head = ex.text().splitlines()[1]
    assert head.startswith("verdict  drop (banned") and "192.0.2.0/24" in head, ex.text()
    assert "without the ban: allow (pass_default" in ex.text()
    js = ex.to_json()
    assert (js["verdict"], js["reason"]) == ("drop", "banned")
    assert js["without_bans"]["verdict"] == "allow"
    # an automatic ban drops a new packet; it spares a reply on a connection this host opened
    assert explain(pol, parse_packet(PKT), bans=[AUTO]).to_json()["verdict"] == "drop"
    spared = explain(pol, parse_packet(PKT + " state reply"), bans=[AUTO])
    assert spared.to_json()["verdict"] == "allow" and spared.to_json()["without_bans"] is None
    # the operator's ban cuts that connection too (docs/dos.md "Tracked connections")
    assert explain(pol, parse_packet(PKT + " state reply"), bans=[OPERATOR]).to_json()["verdict"] == "drop"
    # audit mode: the ban becomes would_drop
    audit = parse_policy(POLICY.format(stateful="true").replace("stateful: true", "stateful: true, audit: true"))
    assert explain(audit, parse_packet(PKT), bans=[OPERATOR]).to_json()["verdict"] == "would_drop"


TWO_IF = POLICY.replace("  - {{name: eth0, dos_profile: p}}", "  - {{name: eth0, dos_profile: p}}\n  - {{name: eth1}}")


def test_an_automatic_ban_applies_only_on_interfaces_bound_to_its_profile():
    """bpf/dos.h dos_check: operator bans on every interface (manual_banned); an automatic ban is keyed
    by its profile and meets only packets of interfaces bound to it (dos_profile → dos_source)."""
    pol = parse_policy(TWO_IF.format(stateful="true"))
    on1 = explain(pol, parse_packet(PKT.replace("eth0", "eth1")), bans=[AUTO])
    assert (on1.to_json()["verdict"], on1.to_json()["reason"]) == ("allow", "pass_default"), on1.text()
    assert "profile p only" in on1.text() and "dropped as banned" not in on1.text(), on1.text()
    assert [b["applies"] for b in on1.to_json()["bans"]] == [False]
    assert explain(pol, parse_packet(PKT), bans=[AUTO]).to_json()["reason"] == "banned"
    other = explain(pol, parse_packet(PKT), bans=[{**AUTO, "profile": "q"}])
    assert other.to_json()["verdict"] == "allow", other.text()
    assert explain(pol, parse_packet(PKT.replace("eth0", "eth1")), bans=[OPERATOR]).to_json()["reason"] == "banned"
    # without 'on IF', the one profile bound (p, on eth0) is assumed, as for the DoS limits
    assert explain(pol, parse_packet(PKT.replace(" on eth0", "")), bans=[AUTO]).to_json()["reason"] == "banned"


ICMP_ERR = "ingress icmp 192.0.2.53 -> 10.0.0.1 type 3 code 4 about 10.0.0.1 on eth0"


def test_an_echo_request_is_never_spared_by_an_automatic_ban():
    """bpf/dos.h dos_spares: an echo request is never spared (echo entries are keyed by id alone)."""
    pol = parse_policy(POLICY.format(stateful="true"))
    req = explain(pol, parse_packet("ingress icmp 192.0.2.53 -> 10.0.0.1 type echo-request state reply on eth0"),
                  bans=[AUTO])
    assert req.to_json()["reason"] == "banned", req.text()
    rep = explain(pol, parse_packet("ingress icmp 192.0.2.53 -> 10.0.0.1 type echo-reply state reply on eth0"),
                  bans=[AUTO])
    assert rep.to_json()["verdict"] == "allow", rep.text()


def test_an_icmp_error_about_the_hosts_packet_is_said_to_be_spared_within_the_shared_budget():
    """bpf/dos.h dos_error_spares: an error of types 3/11/12 (v6 1-4) quoting the host's packet on a
    connection it opened passes an automatic ban within the profile's shared budget (essential ICMP
    on). The packet syntax cannot say which connection the error quotes: the output says when it passes."""
    pol = parse_policy(POLICY.format(stateful="true"))
    ex = explain(pol, parse_packet(ICMP_ERR), bans=[AUTO])
    lines = ex.text().splitlines()
    assert lines[1].startswith("verdict  drop (banned"), ex.text()
    assert "pass_related_over_limit" in lines[2] and "shared" in lines[2], ex.text()
    assert "pass_related_over_limit" in ex.to_json()["ban_spares"]
    for other in (explain(pol, parse_packet(ICMP_ERR), bans=[OPERATOR]),                    # operator: never
                  explain(pol, parse_packet(ICMP_ERR.replace("about 10.0.0.1", "about 10.9.9.9")), bans=[AUTO]),
                  explain(pol, parse_packet(ICMP_ERR.replace("type 3 code 4", "type 5")), bans=[AUTO]),
                  explain(parse_policy(POLICY.format(stateful="true, essential_icmp: false")),
                          parse_packet(ICMP_ERR), bans=[AUTO])):
        assert other.to_json()["reason"] == "banned" and other.to_json()["ban_spares"] is None, other.text()
        assert "pass_related_over_limit" not in other.text().splitlines()[2]
    v6 = ICMP_ERR.replace("192.0.2.53", "2001:db8:5::53").replace("10.0.0.1", "2001:db8::1").replace(
        "icmp", "icmpv6").replace("type 3 code 4", "type 2")
    ex6 = explain(pol, parse_packet(v6), bans=[{**AUTO, "prefix": "2001:db8:5::/64"}])
    assert ex6.to_json()["ban_spares"] is not None, ex6.text()
