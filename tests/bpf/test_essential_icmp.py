"""Essential ICMP through test-run (docs/policy.md "Essential ICMP"): with defaults.essential_icmp
(default true) neighbour/router discovery, MLD, path-MTU errors and ICMP errors about tracked
connections pass before any rule, counted under the pseudo-rule essential_icmp; with false the rules
judge them. Random type/code matching against the reference is in test_differential.py."""
from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6MLQuery,
    ICMPv6MLReport2,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6ND_RS,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import raw

pytestmark = pytest.mark.bpf

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
ME, PEER, ROUTER = "10.0.0.1", "192.0.2.9", "198.51.100.1"
ME6, PEER6, LL = "fd00::1", "fd00:99::9", "fe80::99"
POLICY = """
version: 1
name: essential
defaults: {ingress: deny, egress: deny, essential_icmp: %s}
rules:
  - {name: web-in, priority: 1, direction: ingress, action: allow, protocol: tcp, ports: [80]}
  - {name: dns-out, priority: 1, direction: egress, action: allow, protocol: udp, ports: [53]}
"""

ND_IN = {
    "router-solicitation": IPv6(src=LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS(),
    "router-advertisement": IPv6(src=LL, dst="ff02::1", hlim=255) / ICMPv6ND_RA(),
    "neighbour-solicitation from a global address": IPv6(src=PEER6, dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt=ME6),
    "neighbour-solicitation for DAD": IPv6(src="::", dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt=ME6),
    "neighbour-advertisement": IPv6(src=PEER6, dst=ME6, hlim=255) / ICMPv6ND_NA(tgt=PEER6),
    "redirect": IPv6(src=LL, dst=ME6, hlim=255) / ICMPv6ND_Redirect(tgt=LL, dst=PEER6),
    "mld query": IPv6(src=LL, dst="ff02::1", hlim=1) / ICMPv6MLQuery(),
    "mld v2 report": IPv6(src="fe80::1", dst="ff02::16", hlim=1) / ICMPv6MLReport2(),
}
NOT_ESSENTIAL_IN = {
    "neighbour-solicitation from off-link (hop limit 64)": IPv6(src=PEER6, dst=ME6, hlim=64) / ICMPv6ND_NS(tgt=ME6),
    "router-advertisement with hop limit 254": IPv6(src=LL, dst="ff02::1", hlim=254) / ICMPv6ND_RA(),
    "mld query from a global address": IPv6(src=PEER6, dst="ff02::1", hlim=1) / ICMPv6MLQuery(),
    "mld query with hop limit 2": IPv6(src=LL, dst="ff02::1", hlim=2) / ICMPv6MLQuery(),
    "packet too big about someone else's packet": IPv6(src=PEER6, dst=ME6) / ICMPv6PacketTooBig(mtu=1280)
    / IPerror6(src=PEER6, dst="fd00:77::7") / UDPerror(sport=1, dport=53),
    "packet too big embedding nothing": IPv6(src=PEER6, dst=ME6) / ICMPv6PacketTooBig(mtu=1280),
    "fragmentation needed about someone else's packet": IP(src=ROUTER, dst=ME) / ICMP(type=3, code=4)
    / IPerror(src=PEER, dst=ME) / UDPerror(sport=1, dport=53),
    "port unreachable about an untracked packet": IP(src=ROUTER, dst=ME) / ICMP(type=3, code=3)
    / IPerror(src=ME, dst=PEER) / UDPerror(sport=1, dport=53),
}
PMTU_IN = {
    "fragmentation needed (RFC 1191)": IP(src=ROUTER, dst=ME) / ICMP(type=3, code=4, nexthopmtu=1400)
    / IPerror(src=ME, dst=PEER) / UDPerror(sport=40000, dport=443),
    "packet too big": IPv6(src="fd00:77::1", dst=ME6) / ICMPv6PacketTooBig(mtu=1280)
    / IPerror6(src=ME6, dst=PEER6) / UDPerror(sport=40000, dport=443),
}


def run(harness, hook, pkt):
    return harness.run(hook, raw(E / pkt))


@pytest.mark.parametrize("name", sorted({**ND_IN, **PMTU_IN}))
@pytest.mark.parametrize("hook", ["xdp", "tc_ingress"])
def test_essential_messages_pass_before_any_rule(harness, name, hook):
    harness.install(POLICY % "true")
    got = run(harness, hook, {**ND_IN, **PMTU_IN}[name])
    assert (got.passed, got.reason, got.rule_slot) == (True, "pass_essential", harness.slots["essential_icmp"])


@pytest.mark.parametrize("name", sorted({**ND_IN, **PMTU_IN}))
def test_with_essential_icmp_false_the_rules_judge_them(harness, name):
    harness.install(POLICY % "false")
    got = run(harness, "xdp", {**ND_IN, **PMTU_IN}[name])
    assert (got.passed, got.reason) == (False, "default_deny")
    assert "essential_icmp" not in harness.slots


@pytest.mark.parametrize("name", sorted(NOT_ESSENTIAL_IN))
def test_look_alikes_are_left_to_the_rules(harness, name):
    harness.install(POLICY % "true")
    assert run(harness, "xdp", NOT_ESSENTIAL_IN[name]).reason == "default_deny"


def test_host_sends_its_own_neighbour_discovery_under_egress_deny(harness):
    harness.install(POLICY % "true")
    ns = IPv6(src=ME6, dst="ff02::1:ff99:9", hlim=255) / ICMPv6ND_NS(tgt=PEER6)
    na = IPv6(src=ME6, dst=PEER6, hlim=255) / ICMPv6ND_NA(tgt=ME6)
    report = IPv6(src="fe80::1", dst="ff02::16", hlim=1) / ICMPv6MLReport2()
    for p in (ns, na, report):
        assert run(harness, "tc_egress", p).reason == "pass_essential"
    assert run(harness, "tc_egress", IPv6(src=ME6, dst=PEER6, hlim=64) / ICMPv6ND_NA(tgt=ME6)).reason == "default_deny"


def test_errors_about_tracked_connections_are_essential_too(harness):
    """pass_related is part of essential_icmp: with false, an error about a tracked flow meets the rules."""
    query = IP(src=ME, dst=PEER) / UDP(sport=40000, dport=53)
    err = IP(src=ROUTER, dst=ME) / ICMP(type=3, code=3) / IPerror(src=ME, dst=PEER) / UDPerror(sport=40000, dport=53)
    for essential, want in (("true", "pass_related"), ("false", "default_deny")):
        harness.install(POLICY % essential)
        assert run(harness, "tc_egress", query).reason == "pass_rule"
        got = run(harness, "xdp", err)
        assert got.reason == want
        assert got.rule_slot == (harness.slots["essential_icmp"] if essential == "true" else None)


def test_essential_icmp_counts_under_its_own_slot(harness):
    harness.install(POLICY % "true")
    slot = harness.slots["essential_icmp"]
    before = int(harness.dp.rule_stats()["packets"][slot])
    for p in ND_IN.values():
        run(harness, "xdp", p)
    assert int(harness.dp.rule_stats()["packets"][slot]) - before == len(ND_IN)
