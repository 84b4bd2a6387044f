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
AUTO = {"prefix": "192.0.2.53/32", "kind": "automatic", "reason": "udp_flood"}
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
