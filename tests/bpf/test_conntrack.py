"""Stateful tracking through test-run: replies of allowed connections pass a deny-by-default
ingress; related ICMP errors pass; invalid continuations and closed connections do not."""
from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import raw

from enforcer import layout as L
from enforcer._internal import bpfsys

pytestmark = pytest.mark.bpf

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
ME, PEER = "10.0.0.1", "192.0.2.9"
ME6, PEER6 = "fd00::1", "fd00:99::9"
POLICY = """
version: 1
name: ct
defaults: {ingress: deny, egress: allow, stateful: %s}
rules:
  - {name: ssh-in, priority: 1, direction: ingress, action: allow, protocol: tcp, ports: [22]}
"""


def out_tcp(flags, sport=40000, dport=443, v6=False):
    ip = IPv6(src=ME6, dst=PEER6) if v6 else IP(src=ME, dst=PEER)
    return raw(E / ip / TCP(sport=sport, dport=dport, flags=flags))


def in_tcp(flags, sport=443, dport=40000, v6=False, src=None):
    ip = IPv6(src=src or PEER6, dst=ME6) if v6 else IP(src=src or PEER, dst=ME)
    return raw(E / ip / TCP(sport=sport, dport=dport, flags=flags))


@pytest.mark.parametrize("v6", [False, True])
def test_tcp_reply_passes_default_deny_and_ends_with_rst(harness, v6):
    harness.install(POLICY % "true")
    assert harness.run("xdp", in_tcp("SA", v6=v6)).passed is False           # nothing tracked yet
    assert harness.run("tc_egress", out_tcp("S", v6=v6)).reason == "pass_default"
    got = harness.run("xdp", in_tcp("SA", v6=v6))
    assert (got.passed, got.reason) == (True, "pass_conntrack")
    assert harness.run("tc_egress", out_tcp("A", v6=v6)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("PA", v6=v6)).reason == "pass_conntrack"
    # another port of the same peer is not part of the connection
    assert harness.run("xdp", in_tcp("A", dport=40001, v6=v6)).reason == "default_deny"
    # RST closes it: later packets are judged by policy again, and flagged as invalid continuations
    assert harness.run("xdp", in_tcp("R", v6=v6)).reason == "pass_conntrack"
    got = harness.run("xdp", in_tcp("A", v6=v6))
    assert (got.passed, got.reason) == (False, "conntrack_invalid")


def test_stateless_policy_tracks_nothing(harness):
    harness.install(POLICY % "false")
    harness.run("tc_egress", out_tcp("S"))
    assert harness.run("xdp", in_tcp("SA")).reason == "default_deny"


def test_spoofed_initiator_direction_is_invalid(harness):
    """A packet claiming to come from the initiator but arriving on the reply path is not let in."""
    harness.install(POLICY % "true")
    harness.run("tc_egress", out_tcp("S"))
    spoof = raw(E / IP(src=ME, dst=PEER) / TCP(sport=40000, dport=443, flags="A"))
    got = harness.run("xdp", spoof)
    assert (got.passed, got.reason) == (False, "conntrack_invalid")


def test_syn_ack_from_initiator_is_invalid(harness):
    harness.install(POLICY % "true")
    harness.run("xdp", in_tcp("S", sport=50000, dport=22))           # allowed by ssh-in: tracked
    got = harness.run("xdp", in_tcp("SA", sport=50000, dport=22))
    # invalid as a continuation, but the ssh-in rule still allows it statelessly
    assert (got.passed, got.reason) == (True, "pass_rule")
    got = harness.run("tc_egress", out_tcp("SA", sport=22, dport=50000, v6=False).replace(b"", b""))
    assert got.passed


def test_inbound_allowed_connection_replies_leave(harness):
    harness.install(POLICY.replace("egress: allow", "egress: deny") % "true")
    assert harness.run("tc_egress", out_tcp("SA", sport=22, dport=50000)).reason == "default_deny"
    harness.run("xdp", in_tcp("S", sport=50000, dport=22))
    assert harness.run("tc_egress", out_tcp("SA", sport=22, dport=50000)).reason == "pass_conntrack"


def test_udp_reply_and_related_icmp_error(harness):
    harness.install(POLICY % "true")
    out = raw(E / IP(src=ME, dst=PEER) / UDP(sport=5000, dport=53))
    reply = raw(E / IP(src=PEER, dst=ME) / UDP(sport=53, dport=5000))
    err = raw(E / IP(src="198.51.100.1", dst=ME) / ICMP(type=3, code=1)
              / IPerror(src=ME, dst=PEER) / UDPerror(sport=5000, dport=53))
    unrelated = raw(E / IP(src="198.51.100.1", dst=ME) / ICMP(type=3, code=1)
                    / IPerror(src=ME, dst=PEER) / UDPerror(sport=5001, dport=53))
    assert harness.run("xdp", reply).reason == "default_deny"
    assert harness.run("xdp", err).reason == "default_deny"
    harness.run("tc_egress", out)
    assert harness.run("xdp", reply).reason == "pass_conntrack"
    assert harness.run("xdp", err).reason == "pass_related"
    assert harness.run("xdp", unrelated).reason == "default_deny"


def test_icmp_echo_v4_and_v6(harness):
    harness.install(POLICY % "true")
    harness.run("tc_egress", raw(E / IP(src=ME, dst=PEER) / ICMP(type=8, id=77)))
    assert harness.run("xdp", raw(E / IP(src=PEER, dst=ME) / ICMP(type=0, id=77))).reason == "pass_conntrack"
    assert harness.run("xdp", raw(E / IP(src=PEER, dst=ME) / ICMP(type=0, id=78))).reason == "default_deny"
    harness.run("tc_egress", raw(E / IPv6(src=ME6, dst=PEER6) / ICMPv6EchoRequest(id=9)))
    assert harness.run("xdp", raw(E / IPv6(src=PEER6, dst=ME6) / ICMPv6EchoReply(id=9))).reason == "pass_conntrack"
    err6 = raw(E / IPv6(src="fd00:77::1", dst=ME6) / ICMPv6DestUnreach()
               / IPv6(src=ME6, dst=PEER6) / ICMPv6EchoRequest(id=9))
    assert harness.run("xdp", err6).reason == "pass_related"


def test_conntrack_entry_records_flow(harness):
    harness.install(POLICY % "true")
    harness.run("tc_egress", out_tcp("S"))
    harness.run("xdp", in_tcp("SA"))
    fd = harness.dp.map_fds["hw_ct4"]
    keys = list(bpfsys.map_keys(fd, L.DTYPES["hw_ct4_key"].itemsize))
    assert len(keys) == 1
    import numpy as np
    e = np.frombuffer(bpfsys.map_lookup(fd, keys[0], L.DTYPES["hw_ct_entry"].itemsize), dtype=L.DTYPES["hw_ct_entry"])[0]
    assert L.CT_STATE_NAMES[int(e["state"])] == "established"
    assert e["packets"].tolist() == [1, 1]
    assert e["origin"] == L.DIR["egress"]
    assert e["revision_id"] == 1
