"""Stateful tracking through test-run: replies of allowed connections pass a deny-by-default
ingress; related ICMP errors pass; invalid continuations and closed connections do not."""
from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from scapy.layers import inet6 as i6
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from hostwall.bpf import conntrack
from hostwall.bpf import layout as L

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


def out_tcp(flags, sport=40000, dport=443, v6=False, seq=0, ack=None, data=b""):
    """The host's segment; a SYN-ACK by default acknowledges in_tcp's default SYN (seq 0): ack 1."""
    ack = (1 if "S" in flags and "A" in flags else 0) if ack is None else ack
    ip = IPv6(src=ME6, dst=PEER6) if v6 else IP(src=ME, dst=PEER)
    return raw(E / ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq % 2**32, ack=ack % 2**32) / data)


def in_tcp(flags, sport=443, dport=40000, v6=False, src=None, seq=0, ack=1, data=b""):
    """A peer's segment; by default it acknowledges out_tcp's default SYN (seq 0): ack 1."""
    ip = IPv6(src=src or PEER6, dst=ME6) if v6 else IP(src=src or PEER, dst=ME)
    return raw(E / ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq % 2**32, ack=ack % 2**32) / data)


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


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_simultaneous_open_passes_both_ways(harness, v6):
    """TCP simultaneous open (RFC 9293 §3.5; TCP hole punching, libp2p's DCUtR): the peer's own SYN
    answers the host's SYN, then each side sends a SYN-ACK. netfilter tracks it (SYN_SENT2); under
    ingress: deny the peer's SYN and the host's SYN-ACK continue the tracked connection. A SYN-ACK from
    the initiator before the peer's SYN is still no continuation."""
    harness.install(POLICY.replace("egress: allow", "egress: deny").replace(
        "rules:", "rules:\n  - {name: p2p-out, priority: 1, direction: egress, action: allow, protocol: tcp, ports: [443]}") % "true")
    assert harness.run("tc_egress", out_tcp("S", v6=v6)).reason == "pass_rule"
    assert harness.run("tc_egress", out_tcp("SA", v6=v6)).reason != "pass_conntrack"   # no SYN from the peer yet
    assert harness.run("xdp", in_tcp("S", v6=v6)).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("SA", v6=v6)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("SA", v6=v6)).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("A", v6=v6)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("PA", v6=v6)).reason == "pass_conntrack"
    e = _live(harness.dp, 6 if v6 else 4)[1][0]["e"]
    assert L.CT_STATE_NAMES[int(e["state"])] == "established"


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


def test_related_errors_read_the_embedded_packet_past_its_headers(harness):
    """An ICMPv6 error quoting a packet of a tracked flow that carried extension headers (a fragmented
    datagram's first fragment, destination options, ...) is related: the embedded chain is stepped over
    as the outer one is. An error quoting a later fragment (IPv4 or IPv6) holds payload where ports
    would be: never read as a tuple, whatever its bytes (docs/policy.md "Essential ICMP")."""
    harness.install(POLICY % "true")
    assert harness.run("tc_egress", raw(E / IPv6(src=ME6, dst=PEER6) / UDP(sport=5000, dport=53))).passed
    assert harness.run("tc_egress", raw(E / IP(src=ME, dst=PEER) / UDP(sport=5000, dport=53))).passed
    router6, router = "fd00:77::1", "198.51.100.1"
    udp = UDPerror(sport=5000, dport=53)
    for chain in ([i6.IPv6ExtHdrFragment(offset=0, m=1, id=7)], [i6.IPv6ExtHdrDestOpt()],
                  [i6.IPv6ExtHdrHopByHop(), i6.IPv6ExtHdrRouting(), i6.IPv6ExtHdrFragment(offset=0, m=1, id=8),
                   i6.IPv6ExtHdrDestOpt()]):
        chain[-1].nh = 17                   # scapy would write 59 (no next header) before UDPerror
        inner = i6.IPerror6(src=ME6, dst=PEER6)
        for h in chain:
            inner = inner / h
        for err in (ICMPv6DestUnreach(code=4), i6.ICMPv6TimeExceeded(code=1)):
            got = harness.run("xdp", raw(E / IPv6(src=router6, dst=ME6) / err / inner / udp))
            assert got.reason == "pass_related", [type(h).__name__ for h in chain]
    looks_like_ports = Raw(struct.pack("!HHHH", 5000, 53, 8, 0))     # the tracked tuple's ports, as payload
    later4 = IPerror(src=ME, dst=PEER, proto=17, frag=100) / looks_like_ports
    later6 = i6.IPerror6(src=ME6, dst=PEER6) / i6.IPv6ExtHdrFragment(offset=100, nh=17, id=7) / looks_like_ports
    assert harness.run("xdp", raw(E / IP(src=router, dst=ME) / ICMP(type=11, code=1) / later4)).reason == "default_deny"
    assert harness.run("xdp", raw(E / IPv6(src=router6, dst=ME6) / i6.ICMPv6TimeExceeded(code=1) / later6)).reason \
        == "default_deny"
    first4 = IPerror(src=ME, dst=PEER, proto=17, flags="MF") / udp
    assert harness.run("xdp", raw(E / IP(src=router, dst=ME) / ICMP(type=11, code=1) / first4)).reason == "pass_related"


def inet_pton(addr: str, family: int) -> bytes:
    return socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, addr)


def _live(dp, family):
    with conntrack.CtTable(dp.map_fds[conntrack.MAPS[family]], family) as t:
        idx = t.live()
        return idx, t.slots[idx].copy()


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_conntrack_entry_records_flow(harness, v6):
    harness.install(POLICY % "true")
    harness.run("tc_egress", out_tcp("S", v6=v6))
    harness.run("xdp", in_tcp("SA", v6=v6))
    fam = 6 if v6 else 4
    idx, slots = _live(harness.dp, fam)
    assert len(idx) == 1 and len(_live(harness.dp, 10 - fam)[0]) == 0
    me, peer = (ME6, PEER6) if v6 else (ME, PEER)
    key, side = conntrack.key_of(fam, inet_pton(me, fam), inet_pton(peer, fam), 40000, 443, 6)
    assert slots[0]["k"].tobytes() == key.tobytes()
    # the slot is in the bucket the user-space twin of the datapath's hash names
    first = conntrack.first_slot(np.array([key]), fam, int(harness.dp.config()["table_seed"]))[0]
    assert first <= idx[0] < first + conntrack.WAYS
    e = slots[0]["e"]
    assert L.CT_STATE_NAMES[int(e["state"])] == "syn_recv"          # answered, not yet confirmed
    assert e["packets"].tolist() == [1, 1] and int(e["initiator"]) == side
    harness.run("tc_egress", out_tcp("A", v6=v6))                     # the initiator's ACK confirms it
    e = _live(harness.dp, fam)[1][0]["e"]
    assert L.CT_STATE_NAMES[int(e["state"])] == "established" and e["packets"].tolist() == [2, 1]
    assert e["origin"] == L.DIR["egress"]
    assert e["revision_id"] == 1

# ---- the table: full buckets, idle slots ---------------------------------------------------------
T0 = 1_000 * 10**9


def _same_bucket_flows(dp, fam: int, n: int) -> list[tuple[int, int]]:
    """n (sport, dport) of outgoing ME→PEER TCP flows that share one bucket (this instance's seed)."""
    me, peer = (ME6, PEER6) if fam == 6 else (ME, PEER)
    proto_key, side = conntrack.key_of(fam, inet_pton(me, fam), inet_pton(peer, fam), 0, 0, 6)
    sport, dport = np.meshgrid(np.arange(1024, 65536), np.arange(440, 448))
    sport, dport = sport.ravel(), dport.ravel()
    keys = np.repeat(np.array([proto_key]), len(sport))
    keys["port_a"], keys["port_b"] = (dport, sport) if side else (sport, dport)
    first = conntrack.first_slot(keys, fam, int(dp.config()["table_seed"]))
    vals, counts = np.unique(first, return_counts=True)
    assert counts.max() >= n, "no bucket holds enough of 500k flows (hash badly skewed?)"
    pick = first == vals[np.argmax(counts)]
    return list(zip(sport[pick][:n].tolist(), dport[pick][:n].tolist()))


def _open_at(harness, t_ns: int, flow: tuple[int, int], v6: bool = False) -> None:
    harness.dp.set_config(test_now_ns=t_ns)
    assert harness.run("tc_egress", out_tcp("S", sport=flow[0], dport=flow[1], v6=v6)).reason == "pass_default"


def _reply(harness, flags: str, flow: tuple[int, int], v6: bool = False, ack: int = 1) -> str:
    return harness.run("xdp", in_tcp(flags, sport=flow[1], dport=flow[0], v6=v6, ack=ack)).reason


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_full_bucket_evicts_least_recent_and_reports_its_flow(harness, events, v6):
    fam = 6 if v6 else 4
    harness.install(POLICY % "true")
    flows = _same_bucket_flows(harness.dp, fam, conntrack.WAYS + 1)
    for i, f in enumerate(flows[:-1]):
        _open_at(harness, T0 + i * 10**9, f, v6)
    harness.dp.set_config(test_now_ns=T0 + 5 * 10**9)       # the first flow is the least recently used:
    for f in flows[1:-1]:                                     # the others see a reply (still unconfirmed)
        assert _reply(harness, "SA", f, v6) == "pass_conntrack"
    before = harness.dp.ct_stats()[fam]
    events.drain()
    _open_at(harness, T0 + 8 * 10**9, flows[-1], v6)         # within the unconfirmed timeout: none is idle
    after = harness.dp.ct_stats()[fam]
    assert after["evicted_unconfirmed"] - before["evicted_unconfirmed"] == 1
    assert after["inserted"] - before["inserted"] == 1 and after["evicted_established"] == before["evicted_established"]
    ends = [e for e in events.drain() if L.EVENT_TYPE_NAMES[int(e["type"])] == "flow_end"]
    assert len(ends) == 1
    end = ends[0]
    assert L.CT_END_CAUSE_NAMES[int(end["end_cause"])] == "evicted_unconfirmed"
    me = inet_pton(ME6 if v6 else ME, fam)
    assert bytes(end["saddr"][:len(me)]) == me and (int(end["sport"]), int(end["dport"])) == flows[0]
    assert end["packets"].tolist() == [1, 0] and int(end["ts_ns"]) == T0 and int(end["start_ns"]) == T0
    assert int(end["family"]) == fam and int(end["proto"]) == 6
    # the evicted connection is no longer tracked: its reply meets the ingress default; the rest pass
    assert _reply(harness, "SA", flows[0], v6) == "default_deny"
    for f in flows[1:]:
        assert _reply(harness, "A" if f != flows[-1] else "SA", f, v6) == "pass_conntrack"
    assert len(_live(harness.dp, fam)[0]) == conntrack.WAYS


def test_idle_slot_is_reused_before_any_live_one_is_evicted(harness, events):
    harness.install(POLICY % "true")
    flows = _same_bucket_flows(harness.dp, 4, conntrack.WAYS + 1)
    _open_at(harness, T0, flows[0])                  # SYN_SENT: idle after HW_CT_TO_UNCONFIRMED
    later = T0 + (L.C["HW_CT_TO_UNCONFIRMED"] + 1) * 10**9
    for f in flows[1:-1]:
        _open_at(harness, later, f)
    before = harness.dp.ct_stats()[4]
    events.drain()
    _open_at(harness, later, flows[-1])
    after = harness.dp.ct_stats()[4]
    assert after["reused_idle"] - before["reused_idle"] == 1
    assert (after["evicted_unconfirmed"], after["evicted_established"]) == (before["evicted_unconfirmed"],
                                                                          before["evicted_established"])
    ends = [e for e in events.drain() if L.EVENT_TYPE_NAMES[int(e["type"])] == "flow_end"]
    assert [(int(e["sport"]), L.CT_END_CAUSE_NAMES[int(e["end_cause"])]) for e in ends] == [(flows[0][0], "idle")]
    for f in flows[1:]:
        assert _reply(harness, "SA", f) == "pass_conntrack"


def test_closed_connection_is_not_reported_twice_when_its_slot_is_taken(harness, events):
    harness.install(POLICY % "true")
    flows = _same_bucket_flows(harness.dp, 4, conntrack.WAYS + 1)
    _open_at(harness, T0, flows[0])
    assert _reply(harness, "RA", flows[0], ack=1) == "pass_conntrack"     # refused (it ACKs the SYN): closed,
    # its flow_end is reported now
    for f in flows[1:-1]:
        _open_at(harness, T0 + 10**9, f)
    events.drain()
    _open_at(harness, T0 + 2 * 10**9, flows[-1])       # evicts the closed one (least recent)
    assert [e for e in events.drain() if L.EVENT_TYPE_NAMES[int(e["type"])] == "flow_end"] == []


def test_restart_with_another_build_carries_connections_over(harness):
    """control._migrate_conntrack: a freshly loaded datapath takes over the tables slot for slot, with
    the old hash seed, so replies of connections opened before the restart still pass."""
    import os

    from hostwall.bpf import bpfsys
    from hostwall.bpf.instance import Instance
    from hostwall.enforcer.control import CONNTRACK_MAPS, _migrate_conntrack
    from hostwall.enforcer.datapath import Datapath
    harness.install(POLICY % "true")
    for sport, v6 in ((40000, False), (40001, False), (40000, True)):     # established: loading takes longer
        harness.run("tc_egress", out_tcp("S", sport=sport, v6=v6))       # than an unconfirmed entry lives
        harness.run("xdp", in_tcp("SA", dport=sport, v6=v6))
        harness.run("tc_egress", out_tcp("A", sport=sport, v6=v6))
    new = Datapath.load()
    # the old build is seen through its pins, of which a build with other maps shares only conntrack's
    pins = f"/sys/fs/bpf/hostwall-test-migrate-{os.getpid()}"
    try:
        os.makedirs(f"{pins}/maps")
        for name in CONNTRACK_MAPS:
            bpfsys.obj_pin(harness.dp.map_fds[name], f"{pins}/maps/{name}")
        old = Instance.open_maps(pins, CONNTRACK_MAPS)
        assert old is not None and Instance.open_maps(pins, ("hw_frag4",)) is None
        new.install(harness.compiled)
        assert new.config()["table_seed"] != harness.dp.config()["table_seed"]   # random per load
        try:
            assert _migrate_conntrack(old, new) == 3
        finally:
            old.close()
        assert new.config()["table_seed"] == harness.dp.config()["table_seed"]
        other = type(harness)(new)
        other.slots = harness.slots
        for sport in (40000, 40001):
            assert other.run("xdp", in_tcp("PA", dport=sport)).reason == "pass_conntrack"
        assert other.run("xdp", in_tcp("PA", v6=True)).reason == "pass_conntrack"
        assert other.run("xdp", in_tcp("PA", dport=40002)).reason == "default_deny"   # never opened
    finally:
        new.close()
        Instance.unpin(pins)


# ---- tracking under attack: unconfirmed entries go first -----------------------------------------
def _establish(harness, t_ns: int, flow: tuple[int, int], v6: bool = False) -> None:
    """An outgoing connection through its whole handshake (confirmed: SYN, SYN-ACK, ACK)."""
    _open_at(harness, t_ns, flow, v6)
    assert _reply(harness, "SA", flow, v6) == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("A", sport=flow[0], dport=flow[1], v6=v6)).reason == "pass_conntrack"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_full_bucket_evicts_unconfirmed_entries_before_an_established_one(harness, events, v6):
    """The established connection is the least recently used slot of its bucket, yet every new
    connection evicts an unconfirmed one (least recently used among them), never it."""
    fam = 6 if v6 else 4
    harness.install(POLICY % "true")
    flows = _same_bucket_flows(harness.dp, fam, conntrack.WAYS + 4)
    _establish(harness, T0, flows[0], v6)
    for i, f in enumerate(flows[1:conntrack.WAYS]):
        _open_at(harness, T0 + (1 + i) * 10**8, f, v6)
    before = harness.dp.ct_stats()[fam]
    events.drain()
    for f in flows[conntrack.WAYS:]:                      # a SYN flood into this bucket
        _open_at(harness, T0 + 2 * 10**9, f, v6)
    after = harness.dp.ct_stats()[fam]
    assert after["evicted_unconfirmed"] - before["evicted_unconfirmed"] == 4
    assert after["evicted_established"] == before["evicted_established"]
    ends = [e for e in events.drain() if L.EVENT_TYPE_NAMES[int(e["type"])] == "flow_end"]
    assert {L.CT_END_CAUSE_NAMES[int(e["end_cause"])] for e in ends} == {"evicted_unconfirmed"}
    # the established connection still passes its replies; the first unconfirmed ones were evicted
    assert _reply(harness, "PA", flows[0], v6) == "pass_conntrack"
    assert _reply(harness, "SA", flows[1], v6) == "default_deny"


def test_bucket_of_established_connections_evicts_the_least_recently_used(harness, events):
    harness.install(POLICY % "true")
    flows = _same_bucket_flows(harness.dp, 4, conntrack.WAYS + 1)
    for i, f in enumerate(flows[:-1]):
        _establish(harness, T0 + i * 10**9, f)
    harness.dp.set_config(test_now_ns=T0 + 5 * 10**9)
    assert _reply(harness, "PA", flows[0]) == "pass_conntrack"   # flows[1] is now the least recently used
    before = harness.dp.ct_stats()[4]
    events.drain()
    _open_at(harness, T0 + 6 * 10**9, flows[-1])
    after = harness.dp.ct_stats()[4]
    assert after["evicted_established"] - before["evicted_established"] == 1
    ends = [e for e in events.drain() if L.EVENT_TYPE_NAMES[int(e["type"])] == "flow_end"]
    assert [(int(e["sport"]), L.CT_END_CAUSE_NAMES[int(e["end_cause"])]) for e in ends] == \
        [(flows[1][0], "evicted_established")]


def test_unconfirmed_timeout_is_a_policy_setting(harness):
    for policy, alive in ((POLICY % "true", True), (POLICY % "true" + "conntrack: {unconfirmed_timeout: 3s}\n", False)):
        harness.install(policy)
        flows = _same_bucket_flows(harness.dp, 4, 2)
        _open_at(harness, T0, flows[0])                   # unconfirmed
        _establish(harness, T0, flows[1])                 # confirmed: the long timeout
        harness.dp.set_config(test_now_ns=T0 + 4 * 10**9)
        assert (_reply(harness, "SA", flows[0]) == "pass_conntrack") is alive
        assert _reply(harness, "PA", flows[1]) == "pass_conntrack"
        harness.dp.clear_conntrack()


def test_unconfirmed_timeout_at_its_floor_is_exact(harness):
    """The shortest timeout a policy can set, 1 s: an entry idle exactly that long lives, one idle 1 ns
    longer has expired. ct_expired_u answers for an entry idle at most 1 s without reading its state
    (docs/datapath.md "Speed"), which is exact only while no timeout is shorter."""
    harness.install(POLICY % "true" + "conntrack: {unconfirmed_timeout: 1s}\n")
    flows = _same_bucket_flows(harness.dp, 4, 2)
    for f in flows:
        _open_at(harness, T0, f)                        # unconfirmed, both at T0
    harness.dp.set_config(test_now_ns=T0 + 10**9)
    assert _reply(harness, "SA", flows[0]) == "pass_conntrack"
    harness.dp.set_config(test_now_ns=T0 + 10**9 + 1)
    assert _reply(harness, "SA", flows[1]) != "pass_conntrack"


# ---- sequence checks: a blind RST or FIN does not end a connection (docs/datapath.md "Sequence checks")
ISN_ME, ISN_PEER = 1000, 5000000


def _handshake(harness, v6: bool, sport: int = 40000, install: bool = True) -> None:
    """SYN (seq ISN_ME), SYN-ACK (ISN_PEER, acks it), ACK: established, both sides' sequences learnt."""
    if install:
        harness.install(POLICY % "true")
    assert harness.run("tc_egress", out_tcp("S", sport=sport, v6=v6, seq=ISN_ME)).reason == "pass_default"
    assert harness.run("xdp", in_tcp("SA", dport=sport, v6=v6, seq=ISN_PEER, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("A", sport=sport, v6=v6, seq=ISN_ME + 1, ack=ISN_PEER + 1)).reason == \
        "pass_conntrack"


def _state(harness, v6: bool, sport: int = 40000) -> str:
    (e,) = [e for e in _live(harness.dp, 6 if v6 else 4)[1]
            if e["k"]["proto"] == 6 and sport in (int(e["k"]["port_a"]), int(e["k"]["port_b"]))]
    return L.CT_STATE_NAMES[int(e["e"]["state"])]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_blind_rst_leaves_the_connection_open(harness, v6):
    _handshake(harness, v6)
    # 100 bytes from the peer; the host acknowledges them
    assert harness.run("xdp", in_tcp("PA", v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 1, data=b"x" * 100)).reason == \
        "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("A", v6=v6, seq=ISN_ME + 1, ack=ISN_PEER + 101)).reason == "pass_conntrack"
    for seq in (0, ISN_PEER + 100, ISN_PEER + 102, ISN_PEER + 101 + 70000, ISN_PEER - 2**31):
        got = harness.run("xdp", in_tcp("R", v6=v6, seq=seq))
        assert (got.passed, got.reason) == (True, "pass_conntrack_out_of_window"), seq
    assert _state(harness, v6) == "established"
    assert harness.run("xdp", in_tcp("PA", v6=v6, seq=ISN_PEER + 101, ack=ISN_ME + 1, data=b"y")).reason == \
        "pass_conntrack"
    # a RST at the sequence the host acknowledged closes it
    assert harness.run("xdp", in_tcp("R", v6=v6, seq=ISN_PEER + 102)).reason == "pass_conntrack"   # after 'y': exact
    assert _state(harness, v6) == "closed"
    got = harness.run("xdp", in_tcp("A", v6=v6, seq=ISN_PEER + 102, ack=ISN_ME + 1))
    assert (got.passed, got.reason) == (False, "conntrack_invalid")


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_rst_at_the_acknowledged_sequence_closes(harness, v6):
    _handshake(harness, v6)
    assert harness.run("xdp", in_tcp("RA", v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert _state(harness, v6) == "closed"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_host_rst_closes_at_its_own_sequence(harness, v6):
    _handshake(harness, v6)
    assert harness.run("tc_egress", out_tcp("R", v6=v6, seq=ISN_ME + 1)).reason == "pass_conntrack"
    assert _state(harness, v6) == "closed"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_rst_to_the_hosts_syn_must_acknowledge_it(harness, v6):
    harness.install(POLICY % "true")
    assert harness.run("tc_egress", out_tcp("S", v6=v6, seq=ISN_ME)).reason == "pass_default"
    for flags, ack in (("R", 0), ("RA", ISN_ME), ("RA", ISN_ME + 2), ("R", ISN_ME + 1)):
        got = harness.run("xdp", in_tcp(flags, v6=v6, ack=ack))
        assert (got.passed, got.reason) == (True, "pass_conntrack_out_of_window"), (flags, ack)
    assert _state(harness, v6) == "syn_sent"
    assert harness.run("xdp", in_tcp("SA", v6=v6, seq=ISN_PEER, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("S", sport=40001, v6=v6, seq=ISN_ME)).reason == "pass_default"
    assert harness.run("xdp", in_tcp("RA", dport=40001, v6=v6, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert _state(harness, v6, 40001) == "closed"       # connection refused


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_blind_fin_does_not_shorten_the_connection(harness, v6):
    _handshake(harness, v6)
    for seq in (ISN_PEER + 1 + 70000, ISN_PEER + 1 - 70000, ISN_PEER + 2**31):
        got = harness.run("xdp", in_tcp("FA", v6=v6, seq=seq, ack=ISN_ME + 1))
        assert (got.passed, got.reason) == (True, "pass_conntrack_out_of_window"), seq
    assert _state(harness, v6) == "established"
    assert harness.run("xdp", in_tcp("FA", v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert _state(harness, v6) == "fin_wait"


def test_blind_data_does_not_move_the_window_for_a_later_rst(harness):
    """A spoofed segment far from the peer's sequence passes (the stack drops it) but teaches nothing:
    a RST at its end is still out of window."""
    _handshake(harness, False)
    far = ISN_PEER + 1 + 10**6
    assert harness.run("xdp", in_tcp("PA", seq=far, ack=ISN_ME + 1, data=b"z" * 10)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("R", seq=far + 10)).reason == "pass_conntrack_out_of_window"
    assert _state(harness, False) == "established"


def test_entry_without_sequence_state_accepts_and_learns(harness):
    """An entry carried over from a build without sequence state (seq_known 0): a RST closes it as before;
    another learns from its next packets."""
    _handshake(harness, False)
    _handshake(harness, False, sport=40001, install=False)
    for t in conntrack.tables(harness.dp.map_fds)[:1]:
        with t:
            idx = t.live()
            t.slots["e"]["seq_known"][idx] = 0
    assert harness.run("xdp", in_tcp("PA", dport=40001, seq=7, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("R", dport=40001, seq=3)).reason == "pass_conntrack_out_of_window"
    assert harness.run("xdp", in_tcp("R", seq=123)).reason == "pass_conntrack"          # nothing learnt: accepted
    assert _state(harness, False) == "closed"


def test_restart_after_upgrade_carries_entries_without_sequence_state(harness):
    """A pinned table of the build before the sequence state (88-byte entries) is carried over by
    control._migrate_conntrack, field by field, with nothing learnt: the reply still passes, and a RST
    is accepted as before (no state), after which the entry is closed."""
    import os

    from hostwall.bpf import bpfsys
    from hostwall.bpf.instance import Instance
    from hostwall.enforcer.control import _migrate_conntrack
    from hostwall.enforcer.datapath import Datapath
    # the old layout is main's, literally (a wrong guess of it must fail here, not carry garbage over)
    main_entry = [("created_ns", 0), ("last_ns", 8), ("end_ns", 16), ("packets", 24), ("bytes", 40),
                  ("cgroup_id", 56), ("rule_slot", 64), ("revision_id", 68), ("state", 72), ("initiator", 73),
                  ("origin", 74), ("fin_seen", 75), ("reported", 76), ("report", 77), ("pad", 78),
                  ("slot_state", 80)]
    for fam, size in ((4, 104), (6, 128)):
        old_dt = conntrack.OLD_SLOT_DT[fam]
        assert (old_dt.itemsize, old_dt.fields["e"][1], old_dt.fields["k"][1], old_dt["e"].itemsize) == (size, 0, 88, 88)
        assert [(n, old_dt["e"].fields[n][1]) for n in old_dt["e"].names] == main_entry
        assert old_dt["e"]["pad"].shape == (2,) and old_dt["e"]["slot_state"] == np.uint64
    _handshake(harness, False)
    _handshake(harness, True, install=False)
    new = Datapath.load()
    pins = f"/sys/fs/bpf/hostwall-test-upgrade-{os.getpid()}"
    fds = []
    try:
        os.makedirs(f"{pins}/maps")
        bpfsys.obj_pin(harness.dp.map_fds["hw_config"], f"{pins}/maps/hw_config")
        for fam in (4, 6):        # the old build's table: the same connections in the old layout
            fd = bpfsys.map_create(2, 4, conntrack.OLD_SLOT_DT[fam].itemsize, L.CT_MAX, bpfsys.BPF_F_MMAPABLE)
            fds.append(fd)
            with conntrack.CtTable(harness.dp.map_fds[conntrack.MAPS[fam]], fam) as s, \
                    conntrack.CtTable(fd, fam, conntrack.OLD_SLOT_DT[fam]) as d:
                idx = s.live()
                d.slots["k"][idx] = s.slots["k"][idx]
                for name in conntrack.OLD_SLOT_DT[fam]["e"].names:
                    if name != "pad":
                        d.slots["e"][name][idx] = s.slots["e"][name][idx]
            bpfsys.obj_pin(fd, f"{pins}/maps/{conntrack.MAPS[fam]}")
        old = Instance.open_maps(pins, ("hw_config", "hw_ct4", "hw_ct6"))
        new.install(harness.compiled)
        try:
            assert _migrate_conntrack(old, new) == 2
        finally:
            old.close()
        other = type(harness)(new)
        other.slots = harness.slots
        for v6 in (False, True):
            assert other.run("xdp", in_tcp("PA", v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 1)).reason == "pass_conntrack"
            # learnt from that first packet: a RST elsewhere is out of window, one at its end closes
            assert other.run("xdp", in_tcp("R", v6=v6, seq=12345)).reason == "pass_conntrack_out_of_window"
            assert other.run("xdp", in_tcp("R", v6=v6, seq=ISN_PEER + 1)).reason == "pass_conntrack"
            assert other.run("xdp", in_tcp("A", v6=v6, seq=ISN_PEER + 1)).reason == "conntrack_invalid"
    finally:
        for fd in fds:
            os.close(fd)
        new.close()
        Instance.unpin(pins)


# ---- review of the sequence checks: a blind attacker must guess both sequence spaces ---------------
def _xdp_frame(harness, frame: bytes):
    """An XDP test-run of a hand-made frame (harness.run builds nothing: the frame is as given)."""
    return harness.run("xdp", frame)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_ip_length_beyond_the_frame_is_malformed(harness, v6):
    """A 54-byte frame whose IP length says 65535 (the kernel drops it: ip_rcv_core / ipv6_rcv) must not
    teach a 64 KiB segment end: malformed. Ethernet padding (a frame longer than its IP length) is fine."""
    _handshake(harness, v6)
    ip = IPv6(src=PEER6, dst=ME6, plen=65000) if v6 else IP(src=PEER, dst=ME, len=65535)
    lying = raw(E / ip / TCP(sport=443, dport=40000, flags="A", seq=ISN_PEER + 1, ack=ISN_ME + 1))
    got = _xdp_frame(harness, lying)
    assert (got.passed, got.reason) == (False, "malformed")
    padded = in_tcp("A", v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 1) + b"\0" * 20
    assert harness.run("xdp", padded).reason == "pass_conntrack"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_peer_segment_with_unacceptable_ack_teaches_nothing(harness, v6):
    """A spoofed segment within the peer's slack but acknowledging data the host never sent (or older
    than the ACK window) passes and moves nothing: a RST at its end stays out of window. The same
    segment with an acceptable ACK is learnt: a RST at its end closes."""
    _handshake(harness, v6)
    for bad_ack in (ISN_ME + 2, ISN_ME + 1 - 70000, 0x9E3779B9):
        assert harness.run("xdp", in_tcp("PA", v6=v6, seq=ISN_PEER + 1 + 100, ack=bad_ack, data=b"z" * 10)).reason == \
            "pass_conntrack"
        assert harness.run("xdp", in_tcp("R", v6=v6, seq=ISN_PEER + 111)).reason == "pass_conntrack_out_of_window"
    assert _state(harness, v6) == "established"
    assert harness.run("xdp", in_tcp("PA", v6=v6, seq=ISN_PEER + 1 + 100, ack=ISN_ME + 1, data=b"z" * 10)).reason == \
        "pass_conntrack"
    assert harness.run("xdp", in_tcp("R", v6=v6, seq=ISN_PEER + 111)).reason == "pass_conntrack"
    assert _state(harness, v6) == "closed"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_rst_or_fin_with_unacceptable_ack_changes_nothing(harness, v6):
    """RFC 5961 §5: a peer's RST (with ACK) or FIN at the right sequence number but an ACK of unsent or
    long-acknowledged data, or a FIN without ACK, is out of window; with an acceptable ACK it ends."""
    _handshake(harness, v6)
    for flags, ack in (("RA", ISN_ME + 2), ("RA", ISN_ME + 1 - 70000), ("FA", ISN_ME + 2), ("FA", ISN_ME - 70000),
                       ("F", ISN_ME + 1)):
        got = harness.run("xdp", in_tcp(flags, v6=v6, seq=ISN_PEER + 1, ack=ack))
        assert (got.passed, got.reason) == (True, "pass_conntrack_out_of_window"), (flags, ack)
    assert _state(harness, v6) == "established"
    assert harness.run("xdp", in_tcp("FA", v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert _state(harness, v6) == "fin_wait"


@pytest.mark.parametrize("host_rst", [False, True], ids=["attacker_rst", "host_rst"])
def test_syn_ack_must_acknowledge_the_hosts_syn(harness, host_rst):
    """SYN_SENT: a SYN-ACK with another ACK changes nothing and teaches nothing (out of window), so
    neither the attacker's RST at its own ISN+1 nor the host's RST answering it (seq = its ACK) closes
    the entry; the real handshake then carries data under ingress: deny."""
    harness.install(POLICY % "true")
    assert harness.run("tc_egress", out_tcp("S", seq=ISN_ME)).reason == "pass_default"
    X, A = 424242, 31337
    assert harness.run("xdp", in_tcp("SA", seq=X, ack=A)).reason == "pass_conntrack_out_of_window"
    assert _state(harness, False) == "syn_sent"
    if host_rst:
        assert harness.run("tc_egress", out_tcp("R", seq=A)).reason == "pass_conntrack_out_of_window"
    else:
        assert harness.run("xdp", in_tcp("R", seq=X + 1)).reason == "pass_conntrack_out_of_window"
    assert _state(harness, False) == "syn_sent"
    assert harness.run("xdp", in_tcp("SA", seq=ISN_PEER, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("A", seq=ISN_ME + 1, ack=ISN_PEER + 1)).reason == "pass_conntrack"
    got = harness.run("xdp", in_tcp("PA", seq=ISN_PEER + 1, ack=ISN_ME + 1, data=b"hello"))
    assert (got.passed, got.reason) == (True, "pass_conntrack")


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_simultaneous_open_rst_before_the_hosts_syn_ack_must_acknowledge_its_syn(harness, v6):
    """A bare SYN from the peer in syn_sent (simultaneous open) carries no ACK to check; until the host
    answers it (its SYN-ACK acknowledges that SYN), a RST at that SYN's next number closes nothing
    unless it acknowledges the host's SYN. After the host's SYN-ACK the kernel accepts it too: so do we."""
    harness.install(POLICY % "true")
    assert harness.run("tc_egress", out_tcp("S", v6=v6, seq=ISN_ME)).reason == "pass_default"
    X = 424242
    assert harness.run("xdp", in_tcp("S", v6=v6, seq=X)).reason == "pass_conntrack"
    for flags, ack in (("R", 0), ("RA", ISN_ME + 7)):
        got = harness.run("xdp", in_tcp(flags, v6=v6, seq=X + 1, ack=ack))
        assert got.reason == "pass_conntrack_out_of_window", flags
    assert _state(harness, v6) == "syn_recv"
    # the peer's SYN was learnt: a SYN-ACK must acknowledge it exactly
    assert harness.run("tc_egress", out_tcp("SA", v6=v6, seq=ISN_ME, ack=X + 7)).reason == \
        "pass_conntrack_out_of_window"
    assert harness.run("tc_egress", out_tcp("SA", v6=v6, seq=ISN_ME, ack=X + 1)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("R", v6=v6, seq=X + 1)).reason == "pass_conntrack"
    assert _state(harness, v6) == "closed"


def test_out_of_window_is_no_bypass_of_the_state_machine(harness):
    """An out-of-window packet the state machine refuses anyway is invalid, not passed: a responder SYN|FIN
    on an established tuple, and a FIN with data after a RST closed the entry (ingress: deny drops them)."""
    _handshake(harness, False)
    for seq in (ISN_PEER + 1, ISN_PEER + 10**6):
        got = harness.run("xdp", in_tcp("SF", seq=seq, ack=ISN_ME + 1))
        assert (got.passed, got.reason) == (False, "conntrack_invalid"), seq
    assert harness.run("xdp", in_tcp("R", seq=ISN_PEER + 1)).reason == "pass_conntrack"
    assert _state(harness, False) == "closed"
    for seq in (ISN_PEER + 1, ISN_PEER + 10**6):
        got = harness.run("xdp", in_tcp("FPA", seq=seq, ack=ISN_ME + 1, data=b"payload after the reset"))
        assert (got.passed, got.reason) == (False, "conntrack_invalid"), seq


def test_ipv6_jumbo_super_packet_counts_what_it_carries(harness):
    """IPv6 BIG TCP on TC: payload length 0, the skb (test-run: the frame) holds the segment. Its end is
    what it carries, not a fixed 64 KiB: the host's RST right after it is exact and closes."""
    _handshake(harness, True)
    s = ISN_ME + 1
    big = raw(E / IPv6(src=ME6, dst=PEER6, plen=0) / TCP(sport=40000, dport=443, flags="PA", seq=s,
                                                         ack=ISN_PEER + 1) / (b"d" * 64))
    assert harness.run("tc_egress", big).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("R", v6=True, seq=s + 64)).reason == "pass_conntrack"
    assert _state(harness, True) == "closed"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_retried_syn_with_a_new_isn_is_learnt_afresh(harness, v6):
    """The host's connect() retried on the same tuple with a new ISN: the refusal acknowledging the new
    SYN closes, and on another tuple the handshake on the new ISN leaves the host's FIN in window."""
    harness.install(POLICY % "true")
    new = ISN_ME + 10**7
    for sport in (40000, 40001):
        assert harness.run("tc_egress", out_tcp("S", sport=sport, v6=v6, seq=ISN_ME)).reason == "pass_default"
        assert harness.run("tc_egress", out_tcp("S", sport=sport, v6=v6, seq=new)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("RA", dport=40000, v6=v6, ack=new + 1)).reason == "pass_conntrack"
    assert _state(harness, v6, 40000) == "closed"
    assert harness.run("xdp", in_tcp("SA", dport=40001, v6=v6, seq=ISN_PEER, ack=new + 1)).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("A", sport=40001, v6=v6, seq=new + 1, ack=ISN_PEER + 1)).reason == \
        "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("FA", sport=40001, v6=v6, seq=new + 1, ack=ISN_PEER + 1)).reason == \
        "pass_conntrack"
    assert _state(harness, v6, 40001) == "fin_wait"


def test_out_of_window_first_fragment_on_a_proxied_port_is_no_cookie_ack(harness):
    """SYN proxy: an out-of-window FIN-ACK first fragment of a tracked connection passes as
    pass_conntrack_out_of_window (it is not a cookie ACK to check)."""
    from . import test_syn_proxy as sp
    sp.install(harness)
    src = "10.81.0.7"
    assert sp.send(harness, sp.syn(src, sport=41000, seq=1000)).reason == "pass_rule"   # the port's refresh SYN
    assert harness.run("tc_egress", raw(E / IP(src=sp.ME, dst=src) / TCP(sport=8080, dport=41000, flags="SA",
                                                                         seq=9000, ack=1001))).reason == "pass_conntrack"
    assert sp.send(harness, sp.ack(src, 41000, 1001, 9001)).reason == "pass_conntrack"

    def fin_frag(seq):
        return raw(E / IP(src=src, dst=sp.ME, flags="MF", frag=0, id=77) /
                   TCP(sport=41000, dport=8080, flags="FA", seq=seq, ack=9001) / (b"q" * 16))
    o = sp.send(harness, fin_frag(1001 + 200000))
    assert (o.passed, o.reason) == (True, "pass_conntrack_out_of_window")
    o = sp.send(harness, fin_frag(1001))
    assert (o.passed, o.reason) == (True, "pass_conntrack")


def test_migration_leaves_out_a_slot_the_running_datapath_claims(harness, monkeypatch):
    """copy_tables while the old datapath runs: a slot listed LIVE that the datapath claims (BUSY) before
    its row is read is not copied (a BUSY copy would never be released: a dead slot)."""
    from hostwall.enforcer.datapath import Datapath
    _handshake(harness, False)
    _handshake(harness, False, sport=40001, install=False)
    real = conntrack.CtTable.live

    def racing(self):
        idx = real(self)
        if self.family == 4 and len(idx) == 2 and self.slots.dtype == conntrack.SLOT_DT[4]:
            self.slots["e"]["slot_state"][idx[0]] = L.C["HW_SLOT_BUSY"]    # claimed meanwhile
        return idx
    new = Datapath.load()
    try:
        monkeypatch.setattr(conntrack.CtTable, "live", racing)
        assert conntrack.copy_tables(harness.dp.map_fds, new.map_fds) == 1
        monkeypatch.undo()
        with conntrack.CtTable(new.map_fds["hw_ct4"], 4) as t:
            states = t.slots["e"]["slot_state"]
            assert (np.count_nonzero(states == L.C["HW_SLOT_LIVE"]), np.count_nonzero(states == L.C["HW_SLOT_BUSY"])) \
                == (1, 0)
    finally:
        new.close()


def _tfo_client_carries_on(harness, v6: bool) -> None:
    """The host's TFO connection (its SYN carried 100 bytes, from T0) is established: the peer's data
    passes ingress: deny after 11 s idle (past the unconfirmed timeout) and its FIN counts."""
    assert _state(harness, v6) == "established"
    harness.dp.set_config(test_now_ns=T0 + 11 * 10**9)
    got = harness.run("xdp", in_tcp("PA", v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 101, data=b"r" * 50))
    assert got.reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("FA", v6=v6, seq=ISN_PEER + 51, ack=ISN_ME + 101)).reason == "pass_conntrack"
    assert _state(harness, v6) == "fin_wait"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tfo_syn_ack_refusing_the_data_confirms_as_client(harness, v6):
    """TCP Fast Open fallback (RFC 7413 §4.2.2): the host's SYN carries 100 bytes, the server acknowledges
    only ISN+1 (cookie refused, TFO off, data stripped) and the host resends them. That SYN-ACK is in
    window, so the entry is confirmed and the peer's later data passes ingress: deny after 11 s idle (past
    the unconfirmed timeout). A SYN-ACK acknowledging neither ISN+1 nor the data's end stays out."""
    harness.install(POLICY % "true")
    harness.dp.set_config(test_now_ns=T0)
    assert harness.run("tc_egress", out_tcp("S", v6=v6, seq=ISN_ME, data=b"d" * 100)).reason == "pass_default"
    for ack in (ISN_ME, ISN_ME + 2, ISN_ME + 100):
        assert harness.run("xdp", in_tcp("SA", v6=v6, seq=ISN_PEER, ack=ack)).reason == "pass_conntrack_out_of_window"
    assert harness.run("xdp", in_tcp("SA", v6=v6, seq=ISN_PEER, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("PA", v6=v6, seq=ISN_ME + 1, ack=ISN_PEER + 1, data=b"d" * 100)).reason \
        == "pass_conntrack"
    _tfo_client_carries_on(harness, v6)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tfo_syn_ack_refusing_the_data_confirms_as_server(harness, v6):
    """The peer's TFO SYN with 100 bytes to the host's allowed port; the host (no TFO, stale cookie)
    acknowledges ISN+1 only: its SYN-ACK is in window and the peer's ACK confirms the connection."""
    harness.install(POLICY % "true")
    syn = in_tcp("S", sport=50000, dport=22, v6=v6, seq=ISN_PEER, ack=0, data=b"d" * 100)
    assert harness.run("xdp", syn).reason == "pass_rule"
    assert harness.run("tc_egress", out_tcp("SA", sport=22, dport=50000, v6=v6, seq=ISN_ME, ack=ISN_PEER + 1)).reason \
        == "pass_conntrack"
    assert harness.run("xdp", in_tcp("A", sport=50000, dport=22, v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 1)).reason \
        == "pass_conntrack"
    assert _state(harness, v6, sport=22) == "established"
    # the resent data, then the peer's RST at the number the host acknowledged, close it
    assert harness.run("xdp", in_tcp("PA", sport=50000, dport=22, v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 1,
                                     data=b"d" * 100)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("R", sport=50000, dport=22, v6=v6, seq=ISN_PEER + 101)).reason == "pass_conntrack"
    assert _state(harness, v6, sport=22) == "closed"



@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tfo_bare_syn_retransmission_keeps_the_data_end_as_client(harness, v6):
    """The host's TFO SYN carries 100 bytes; its SYN-ACK is lost, so the host retransmits the bare SYN
    (Linux queues the data apart and retransmits the SYN alone: tcp_output.c tcp_send_syn_data). The
    server had accepted the data: its retransmitted SYN-ACK acknowledges ISN+101, which the host's
    kernel accepts (snd_nxt). The retransmission is the same SYN (same ISN) and must not shrink the
    host's end back to ISN+1, or that SYN-ACK is out of window, the entry stays syn_sent (no FIN counts:
    docs/datapath.md "Sequence checks") and the peer's data is dropped under ingress: deny after the
    unconfirmed timeout."""
    harness.install(POLICY % "true")
    harness.dp.set_config(test_now_ns=T0)
    assert harness.run("tc_egress", out_tcp("S", v6=v6, seq=ISN_ME, data=b"d" * 100)).reason == "pass_default"
    assert harness.run("tc_egress", out_tcp("S", v6=v6, seq=ISN_ME)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("SA", v6=v6, seq=ISN_PEER, ack=ISN_ME + 101)).reason == "pass_conntrack"
    assert _state(harness, v6) == "syn_recv"
    assert harness.run("tc_egress", out_tcp("A", v6=v6, seq=ISN_ME + 101, ack=ISN_PEER + 1)).reason == "pass_conntrack"
    _tfo_client_carries_on(harness, v6)
    # the TFO fallback still holds after the retransmission: a server that refused the data acks ISN+1
    harness.dp.set_config(test_now_ns=T0)
    assert harness.run("tc_egress", out_tcp("S", sport=40001, v6=v6, seq=ISN_ME, data=b"d" * 100)).reason \
        == "pass_default"
    assert harness.run("tc_egress", out_tcp("S", sport=40001, v6=v6, seq=ISN_ME)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("SA", dport=40001, v6=v6, seq=ISN_PEER, ack=ISN_ME + 2)).reason \
        == "pass_conntrack_out_of_window"
    assert harness.run("xdp", in_tcp("SA", dport=40001, v6=v6, seq=ISN_PEER, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert _state(harness, v6, sport=40001) == "syn_recv"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tfo_server_syn_ack_retransmission_after_its_data_keeps_the_hosts_end(harness, v6):
    """The host as TCP Fast Open server: the peer's SYN carries 100 bytes, the host's SYN-ACK accepts
    them and the host answers with 500 bytes before the handshake completes (RFC 7413 §4.2.2). The
    peer's ACK is lost, so the host retransmits its SYN-ACK (same ISN: tcp_fastopen_synack_timer); the
    peer, established, acknowledges the SYN-ACK and the 500 bytes. That ACK is acceptable (the host
    sent those bytes; its kernel completes the handshake on it) and confirms the entry: the
    retransmitted SYN-ACK must not pull the host's end back to ISN+1, which left the entry syn_recv —
    unconfirmed, evicted first and expiring after the unconfirmed timeout though the kernel runs it."""
    harness.install(POLICY % "true")
    kw = {"sport": 50000, "dport": 22, "v6": v6}
    assert harness.run("xdp", in_tcp("S", seq=ISN_PEER, ack=0, data=b"d" * 100, **kw)).reason == "pass_rule"
    synack = out_tcp("SA", sport=22, dport=50000, v6=v6, seq=ISN_ME, ack=ISN_PEER + 101)
    assert harness.run("tc_egress", synack).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("PA", sport=22, dport=50000, v6=v6, seq=ISN_ME + 1, ack=ISN_PEER + 101,
                                            data=b"r" * 500)).reason == "pass_conntrack"
    assert harness.run("tc_egress", synack).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("A", seq=ISN_PEER + 101, ack=ISN_ME + 501, **kw)).reason == "pass_conntrack"
    assert _state(harness, v6, sport=50000) == "established"
    # a SYN-ACK with another ISN (a restarted listener) still starts the host's side afresh
    assert harness.run("xdp", in_tcp("S", sport=50001, dport=22, v6=v6, seq=ISN_PEER, ack=0)).reason == "pass_rule"
    for isn in (ISN_ME, ISN_ME + 2**31):
        assert harness.run("tc_egress", out_tcp("SA", sport=22, dport=50001, v6=v6, seq=isn,
                                                ack=ISN_PEER + 1)).reason == "pass_conntrack"
    got = harness.run("xdp", in_tcp("A", sport=50001, dport=22, v6=v6, seq=ISN_PEER + 1, ack=ISN_ME + 1))
    assert got.reason == "pass_conntrack_out_of_window"
    assert harness.run("xdp", in_tcp("A", sport=50001, dport=22, v6=v6, seq=ISN_PEER + 1,
                                     ack=ISN_ME + 2**31 + 1)).reason == "pass_conntrack"
    assert _state(harness, v6, sport=50001) == "established"

def _burst_loss(harness, v6: bool, mss: int = 1400) -> int:
    """The peer sends bulk data; 50 segments (70 KB, > HW_CT_SEQ_SLACK) are lost in one burst before XDP,
    200 arrive past the hole (the host's duplicate ACKs stay at the hole), the hole is retransmitted and
    the host acknowledges everything (its own ACK, trusted: TC egress). Returns the peer's next number."""
    _handshake(harness, v6)
    hole = ISN_PEER + 1
    s = hole + 50 * mss
    for _ in range(200):
        assert harness.run("xdp", in_tcp("A", v6=v6, seq=s, ack=ISN_ME + 1, data=b"x" * mss)).reason == "pass_conntrack"
        assert harness.run("tc_egress", out_tcp("A", v6=v6, seq=ISN_ME + 1, ack=hole)).reason == "pass_conntrack"
        s += mss
    for i in range(50):
        harness.run("xdp", in_tcp("A", v6=v6, seq=hole + i * mss, ack=ISN_ME + 1, data=b"x" * mss))
    assert harness.run("tc_egress", out_tcp("A", v6=v6, seq=ISN_ME + 1, ack=s)).reason == "pass_conntrack"
    return s


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_peer_burst_loss_over_the_slack_then_fin_closes(harness, v6):
    """The peer's end follows what the host acknowledged, so after a burst loss larger than the slack its
    new data and then its FIN are in window (the entry does not stay established for days)."""
    s = _burst_loss(harness, v6)
    for _ in range(5):
        assert harness.run("xdp", in_tcp("A", v6=v6, seq=s, ack=ISN_ME + 1, data=b"x" * 1400)).reason == "pass_conntrack"
        s += 1400
    assert harness.run("xdp", in_tcp("FA", v6=v6, seq=s, ack=ISN_ME + 1)).reason == "pass_conntrack"
    assert _state(harness, v6) == "fin_wait"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_peer_burst_loss_over_the_slack_then_rst_after_data_closes(harness, v6):
    """As above, then the peer aborts right after new data (RST at its next number, before the host's
    ACK): exact, so it closes; a RST 70 KB past it stays out of window."""
    s = _burst_loss(harness, v6)
    assert harness.run("xdp", in_tcp("PA", v6=v6, seq=s, ack=ISN_ME + 1, data=b"x" * 1400)).reason == "pass_conntrack"
    s += 1400
    assert harness.run("xdp", in_tcp("R", v6=v6, seq=s + 70000)).reason == "pass_conntrack_out_of_window"
    assert harness.run("xdp", in_tcp("R", v6=v6, seq=s)).reason == "pass_conntrack"
    assert _state(harness, v6) == "closed"


def test_peer_ack_does_not_move_the_hosts_end(harness):
    """Only the host's own ACKs move the other side's end: a peer's ACK past the host's end is
    unacceptable, so the host's FIN far ahead of what it sent stays out of window... and the host's
    real FIN stays in."""
    _handshake(harness, False)
    far = ISN_ME + 1 + 10**6
    assert harness.run("xdp", in_tcp("A", seq=ISN_PEER + 1, ack=far)).reason == "pass_conntrack"
    assert harness.run("tc_egress", out_tcp("FA", seq=far, ack=ISN_PEER + 1)).reason == "pass_conntrack_out_of_window"
    assert harness.run("tc_egress", out_tcp("FA", seq=ISN_ME + 1, ack=ISN_PEER + 1)).reason == "pass_conntrack"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_blind_ack_does_not_confirm_a_connection_to_the_host(harness, v6):
    """A spoofed SYN to an allowed port, the host's SYN-ACK, then a blind ACK (the attacker never saw the
    host's ISN): the connection stays unconfirmed — it expires after the unconfirmed timeout instead of
    holding an established entry for days (and its slot against eviction) — and the ACK passes for the
    stack to judge. The peer's ACK of the host's SYN-ACK then confirms it."""
    harness.install(POLICY % "true")
    kw = {"sport": 50000, "dport": 22, "v6": v6}
    assert harness.run("xdp", in_tcp("S", seq=ISN_PEER, ack=0, **kw)).reason == "pass_rule"
    assert harness.run("tc_egress", out_tcp("SA", sport=22, dport=50000, v6=v6, seq=ISN_ME,
                                            ack=ISN_PEER + 1)).reason == "pass_conntrack"
    for ack in (ISN_ME + 2, ISN_ME + 1 + 70000, ISN_ME + 1 - 70000, ISN_ME + 2**31):    # ct_ack_ok's window
        got = harness.run("xdp", in_tcp("A", seq=ISN_PEER + 1, ack=ack, **kw))
        assert (got.passed, got.reason) == (True, "pass_conntrack_out_of_window"), ack
        got = harness.run("xdp", in_tcp("PA", seq=ISN_PEER + 1, ack=ack, data=b"x" * 10, **kw))
        assert (got.passed, got.reason) == (True, "pass_conntrack_out_of_window"), ack
    assert _state(harness, v6, sport=22) == "syn_recv"
    assert harness.run("xdp", in_tcp("A", seq=ISN_PEER + 1, ack=ISN_ME + 1, **kw)).reason == "pass_conntrack"
    assert _state(harness, v6, sport=22) == "established"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_fin_before_the_handshake_is_answered_changes_nothing(harness, v6):
    """A spoofed SYN then its FIN, before the host's SYN-ACK left (XDP judges the FIN first): real TCP
    sends no FIN in SYN_SENT (netfilter: invalid). It passes unchanged — the entry stays unconfirmed
    (evicted first, 10 s), not fin_wait, which a full bucket ranks with established connections and
    keeps 120 s. The handshake then completes as usual."""
    harness.install(POLICY % "true")
    kw = {"sport": 50000, "dport": 22, "v6": v6}
    assert harness.run("xdp", in_tcp("S", seq=ISN_PEER, ack=0, **kw)).reason == "pass_rule"
    for flags in ("F", "FA"):
        got = harness.run("xdp", in_tcp(flags, seq=ISN_PEER + 1, ack=ISN_ME + 1, **kw))
        assert (got.passed, got.reason) == (True, "pass_conntrack_out_of_window"), flags
    assert _state(harness, v6, sport=22) == "syn_sent"
    assert harness.run("tc_egress", out_tcp("SA", sport=22, dport=50000, v6=v6, seq=ISN_ME,
                                            ack=ISN_PEER + 1)).reason == "pass_conntrack"
    assert harness.run("xdp", in_tcp("A", seq=ISN_PEER + 1, ack=ISN_ME + 1, **kw)).reason == "pass_conntrack"
    assert _state(harness, v6, sport=22) == "established"
    # the host's SYN: the peer's FIN before its SYN-ACK changes nothing either
    assert harness.run("tc_egress", out_tcp("S", sport=40001, v6=v6, seq=ISN_ME)).reason == "pass_default"
    got = harness.run("xdp", in_tcp("FA", dport=40001, v6=v6, seq=ISN_PEER, ack=ISN_ME + 1))
    assert (got.passed, got.reason) == (True, "pass_conntrack_out_of_window")
    assert _state(harness, v6, sport=40001) == "syn_sent"


# ---- UDP flows of a single exchange (docs/datapath.md "Connection tracking": unassured) ---------------
def _udp(out: bool, sport: int, dport: int, v6: bool = False) -> bytes:
    """A datagram of the flow ME:sport → PEER:dport: the host's (out) or the peer's reply."""
    me, peer = (ME6, PEER6) if v6 else (ME, PEER)
    ip = (IPv6 if v6 else IP)(src=me, dst=peer) if out else (IPv6 if v6 else IP)(src=peer, dst=me)
    return raw(E / ip / (UDP(sport=sport, dport=dport) if out else UDP(sport=dport, dport=sport)))


def _mixed_bucket_flows(dp, fam: int, n_tcp: int, n_udp: int) -> tuple[list, list]:
    """(sport, dport) of outgoing TCP and UDP flows ME→PEER that all share one bucket."""
    me, peer = (ME6, PEER6) if fam == 6 else (ME, PEER)
    sport, dport = np.meshgrid(np.arange(1024, 65536), np.arange(440, 448))
    sport, dport = sport.ravel(), dport.ravel()
    firsts = {}
    for proto in (6, 17):
        pk, side = conntrack.key_of(fam, inet_pton(me, fam), inet_pton(peer, fam), 0, 0, proto)
        keys = np.repeat(np.array([pk]), len(sport))
        keys["port_a"], keys["port_b"] = (dport, sport) if side else (sport, dport)
        firsts[proto] = conntrack.first_slot(keys, fam, int(dp.config()["table_seed"]))
    vt, ct = np.unique(firsts[6], return_counts=True)
    vu, cu = np.unique(firsts[17], return_counts=True)
    ok = np.intersect1d(vt[ct >= n_tcp], vu[cu >= n_udp])
    assert len(ok), "no bucket holds both"
    pick = {p: firsts[p] == ok[0] for p in (6, 17)}
    flows = {p: list(zip(sport[pick[p]].tolist(), dport[pick[p]].tolist())) for p in (6, 17)}
    return flows[6][:n_tcp], flows[17][:n_udp]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_udp_flow_of_a_single_exchange_expires_sooner(harness, v6):
    """One datagram and its reply (a DNS lookup) keep the flow HW_CT_TO_UDP_UNASSURED; a packet after the
    first reply, from either side (netfilter's assured UDP: a second request, a server's push, a
    keepalive), makes it a stream: HW_CT_TO_UDP_REPLIED."""
    harness.install(POLICY % "true")
    once, again, push = (5000, 53), (5001, 53), (5002, 53)
    for f in (once, again, push):
        harness.dp.set_config(test_now_ns=T0)
        assert harness.run("tc_egress", _udp(True, *f, v6=v6)).reason == "pass_default"
        assert harness.run("xdp", _udp(False, *f, v6=v6)).reason == "pass_conntrack"
    unassured = L.C["HW_CT_TO_UDP_UNASSURED"]
    assert unassured < L.C["HW_CT_TO_UDP_REPLIED"]
    harness.dp.set_config(test_now_ns=T0 + (unassured - 1) * 10**9)
    assert harness.run("tc_egress", _udp(True, *again, v6=v6)).reason == "pass_conntrack"   # a second request
    assert harness.run("xdp", _udp(False, *push, v6=v6)).reason == "pass_conntrack"         # the server pushes
    harness.dp.set_config(test_now_ns=T0 + (2 * unassured) * 10**9)
    assert harness.run("xdp", _udp(False, *once, v6=v6)).reason == "default_deny"
    assert harness.run("xdp", _udp(False, *again, v6=v6)).reason == "pass_conntrack"
    assert harness.run("xdp", _udp(False, *push, v6=v6)).reason == "pass_conntrack"


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_full_bucket_evicts_single_exchange_udp_before_an_established_connection(harness, events, v6):
    """A bucket of 3 established TCP connections (the least recently used slots) and a UDP flow of one
    exchange: a new connection evicts the UDP flow, not the idle TCP connection the host opened."""
    fam = 6 if v6 else 4
    harness.install(POLICY % "true")
    tcp, udp = _mixed_bucket_flows(harness.dp, fam, conntrack.WAYS, 1)
    for i, f in enumerate(tcp[:-1]):
        _establish(harness, T0 + i * 10**8, f, v6)
    harness.dp.set_config(test_now_ns=T0 + 10**9)
    assert harness.run("tc_egress", _udp(True, *udp[0], v6=v6)).reason == "pass_default"
    assert harness.run("xdp", _udp(False, *udp[0], v6=v6)).reason == "pass_conntrack"
    before = harness.dp.ct_stats()[fam]
    events.drain()
    _open_at(harness, T0 + 2 * 10**9, tcp[-1], v6)
    after = harness.dp.ct_stats()[fam]
    assert after["evicted_established"] - before["evicted_established"] == 1
    ends = [e for e in events.drain() if L.EVENT_TYPE_NAMES[int(e["type"])] == "flow_end"]
    assert [(int(e["proto"]), int(e["sport"])) for e in ends] == [(17, udp[0][0])]
    for f in tcp[:-1]:
        assert _reply(harness, "PA", f, v6) == "pass_conntrack"
