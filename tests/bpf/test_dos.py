"""DoS guards in XDP through test-run with an injected clock, against enforcer/dos_reference.py."""
from __future__ import annotations

import ipaddress
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import raw

from hostwall.bpf import bpfsys, dos_sources, syn_proxy
from hostwall.bpf import layout as L
from hostwall.enforcer import bans, dos_reference
from hostwall.enforcer.dos_reference import DosModel, Pkt, ProfileParams

pytestmark = pytest.mark.bpf

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
LO = 1
NS = 1_000_000_000
# the packets' clock: whole thousands of seconds, at least 3000 s ahead of CLOCK_MONOTONIC, because what
# reads the maps with the real clock (`bans.listing` leaves out bans that ended before now) must see the
# test's bans as current (a fixed 50 000 s failed once the machine had been up 13.9 hours)
T0 = (time.monotonic_ns() // NS // 1000 + 4) * 1000 * NS
POLICY = """
version: 1
name: dos
defaults: {{ingress: allow, egress: allow, stateful: {stateful}, audit: {audit}}}
dos:
  profiles:
    p:
{profile}
interfaces:
  - {{name: lo, dos_profile: p}}
"""


def install(harness, profile_yaml: str, audit: bool = False, stateful: bool = False) -> ProfileParams:
    body = "\n".join("      " + line for line in profile_yaml.strip().splitlines())
    harness.install(POLICY.format(profile=body, audit=str(audit).lower(), stateful=str(stateful).lower()),
                    dos_interfaces={LO: "p"})
    harness.dp.set_config(test_now_ns=T0)
    _reset_state(harness.dp)
    return ProfileParams.from_record(harness.compiled.dos_profiles[0])


def _reset_state(dp):
    with dos_sources.table(dp.map_fds[dos_sources.MAP]) as t:
        t.clear()
    for k in list(bpfsys.map_keys(dp.map_fds["hw_dos_banned"], L.DTYPES["hw_dos_key"].itemsize)):
        bpfsys.map_delete(dp.map_fds["hw_dos_banned"], k)
    zero = bytes(L.DTYPES["hw_bucket"].itemsize)
    for i in range(L.C["HW_DOS_PROFILES_MAX"] * 16):
        bpfsys.map_update(dp.map_fds["hw_dos_global"], i.to_bytes(4, "little"), zero)
    syn_proxy.clear(dp.map_fds)


def frame(p: Pkt) -> bytes:
    v6 = ":" in p.src
    ip = IPv6(src=p.src, dst="fd00::1") if v6 else IP(src=p.src, dst="10.0.0.1")
    if p.proto == 6:
        l4 = TCP(sport=1234, dport=p.dport or 80, flags="S" if p.syn else "A")
    elif p.proto == 17:
        l4 = UDP(sport=1234, dport=p.dport or 53)
    else:
        l4 = ICMPv6EchoRequest() if v6 else ICMP()
    f = raw(E / ip / l4)
    pad = max(0, p.length - len(f))
    return f + b"\0" * pad


def send(harness, p: Pkt, now: int):
    harness.dp.set_config(test_now_ns=now)
    return harness.run("xdp", frame(p), ifindex=LO)


frame_of = frame


def outcome_reason(o) -> str | None:
    return None if o.verdict == "allow" else o.reason


SOURCES = ["10.1.1.1", "10.1.1.2", "10.1.2.1", "fd00:1::1", "fd00:1::2", "fd00:2::1"]


@st.composite
def profiles(draw):
    lines = []
    ps = draw(st.sampled_from([None, 5, 20]))
    if ps:
        lines.append(f"per_source: {{pps: {ps}, burst: {draw(st.sampled_from([ps, 2 * ps]))}}}")
    syn = draw(st.sampled_from([None, 3]))
    glob = draw(st.sampled_from([None, 6]))
    port = draw(st.sampled_from([None, 4]))
    if syn or glob or port:
        parts = ([f"per_source_pps: {syn}"] if syn else []) + ([f"global_pps: {glob}"] if glob else []) + \
                ([f"per_port_pps: {port}"] if port else [])
        lines.append("syn: {" + ", ".join(parts) + "}")
    if draw(st.booleans()):
        lines.append(f"udp: {{per_source_pps: {draw(st.sampled_from([2, 8]))}}}")
    if draw(st.booleans()):
        lines.append("icmp: {per_source_pps: 2}")
    if draw(st.booleans()):
        lines.append("ports: [{port: 53, protocol: udp, pps: 4}]")
    if draw(st.booleans()):
        lines.append("ban: {after: 2s, duration: 3s}")
    lines.append(f"source_prefix_v4: {draw(st.sampled_from([24, 32]))}")
    lines.append(f"source_prefix_v6: {draw(st.sampled_from([64, 128]))}")
    return "\n".join(lines)


packets = st.builds(Pkt, src=st.sampled_from(SOURCES), proto=st.sampled_from([6, 17, 1]),
                    syn=st.booleans(), dport=st.sampled_from([53, 80]), length=st.sampled_from([64, 600]))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(profile=profiles(), steps=st.lists(st.tuples(st.sampled_from([0, 1_000_000, 50_000_000, 400_000_000, 1_500_000_000]),
                                                     packets), min_size=1, max_size=60))
def test_buckets_match_reference(harness, profile, steps):
    params = install(harness, profile)
    model = DosModel(params)
    now = T0
    for dt, p in steps:
        if p.proto == 1 and ":" in p.src:
            p = Pkt(p.src, 58, p.syn, p.dport, p.length)
        now += dt
        got = outcome_reason(send(harness, p, now))
        want = model.check(p, now)
        assert got == want, f"{profile}\n{p} at +{(now - T0) / NS:.3f}s: kernel {got}, reference {want}"


def test_rate_burst_refill_and_prefix_grouping(harness):
    install(harness, "per_source: {pps: 10, burst: 10}\nsource_prefix_v4: 24\nsource_prefix_v6: 64")
    r = [outcome_reason(send(harness, Pkt("10.9.9.1", 17), T0)) for _ in range(12)]
    assert r == [None] * 10 + ["rate_limit"] * 2
    # another address of the same /24 shares the bucket; another /24 has its own
    assert outcome_reason(send(harness, Pkt("10.9.9.200", 17), T0)) == "rate_limit"
    assert outcome_reason(send(harness, Pkt("10.9.8.1", 17), T0)) is None
    # 10 pps refills one token every 100 ms
    assert outcome_reason(send(harness, Pkt("10.9.9.1", 17), T0 + 100_000_000)) is None
    assert outcome_reason(send(harness, Pkt("10.9.9.1", 17), T0 + 100_000_000)) == "rate_limit"
    # IPv6 groups by /64
    for _ in range(10):
        send(harness, Pkt("fd00:7::1", 17), T0)
    assert outcome_reason(send(harness, Pkt("fd00:7::ffff", 17), T0)) == "rate_limit"
    assert outcome_reason(send(harness, Pkt("fd00:8::1", 17), T0)) is None


def test_only_syns_consume_the_syn_bucket(harness):
    install(harness, "syn: {per_source_pps: 2}")
    assert [outcome_reason(send(harness, Pkt("10.2.2.2", 6, syn=True), T0)) for _ in range(3)] == \
        [None, None, "syn_flood"]
    assert all(outcome_reason(send(harness, Pkt("10.2.2.2", 6, syn=False), T0)) is None for _ in range(20))


def test_port_limit_is_shared_by_all_sources(harness):
    install(harness, "ports: [{port: 53, protocol: udp, pps: 3}]")
    r = [outcome_reason(send(harness, Pkt(f"10.3.{i}.1", 17, dport=53), T0)) for i in range(5)]
    assert r == [None, None, None, "port_limit", "port_limit"]
    assert outcome_reason(send(harness, Pkt("10.3.9.1", 17, dport=80), T0)) is None


def test_port_limits_match_port_and_protocol_in_every_entry(harness):
    """A per-port limit is its port and its protocol, in the first entry as in later ones (bpf/dos.h
    compares the two as one word, the first entry before the loop)."""
    install(harness, "ports: [{port: 53, protocol: tcp, pps: 1}, {port: 53, protocol: udp, pps: 2}, "
                     "{port: 80, protocol: udp, pps: 1}]")
    assert [outcome_reason(send(harness, Pkt(f"10.5.{i}.1", 17, dport=53), T0)) for i in range(3)] == \
        [None, None, "port_limit"]
    assert [outcome_reason(send(harness, Pkt(f"10.6.{i}.1", 6, dport=53), T0)) for i in range(2)] == \
        [None, "port_limit"]
    assert [outcome_reason(send(harness, Pkt(f"10.7.{i}.1", 17, dport=80), T0)) for i in range(2)] == \
        [None, "port_limit"]
    assert outcome_reason(send(harness, Pkt("10.8.0.1", 6, dport=80), T0)) is None       # no tcp/80 entry
    assert outcome_reason(send(harness, Pkt("10.8.0.2", 17, dport=8080), T0)) is None


def test_ban_after_streak_and_expiry(harness):
    install(harness, "per_source: {pps: 2, burst: 2}\nban: {after: 3s, duration: 10s}")
    now = T0
    for _ in range(40):                     # 4 s of over-limit traffic, 10 packets/s
        got = outcome_reason(send(harness, Pkt("10.4.4.4", 17), now))
        now += 100_000_000
        if now - T0 > 3_500_000_000:        # the packet that completes the 3 s streak starts the ban
            assert got == "banned"
    listed = bans.listing(harness.dp, ("p",))
    assert [(b["prefix"], b["kind"], b["reason"]) for b in listed] == [("10.4.4.4/32", "automatic", "rate_limit")]
    assert outcome_reason(send(harness, Pkt("10.4.4.4", 6), now + 5 * NS)) == "banned"     # any protocol
    assert outcome_reason(send(harness, Pkt("10.4.4.4", 17), now + 11 * NS)) is None     # expired by itself


def _banned_for_60s(harness, src: str) -> int:
    """Ban `src` automatically (2 s over its limit, ban for 60 s); returns the clock after it."""
    install(harness, "per_source: {pps: 2, burst: 2}\nban: {after: 1s, duration: 60s}")
    now = T0
    for _ in range(20):
        got = outcome_reason(send(harness, Pkt(src, 17), now))
        now += 100_000_000
    assert got == "banned"
    return now


def test_lifting_an_automatic_ban_frees_the_source_at_once(harness):
    """`ban del` removes the listing and clears the ban where the datapath looks: the source's slot."""
    now = _banned_for_60s(harness, "10.4.4.5")
    assert bans.delete(harness.dp, "10.4.4.5/32")
    assert bans.listing(harness.dp, ("p",)) == []
    assert outcome_reason(send(harness, Pkt("10.4.4.5", 17), now + 5 * NS)) is None   # the ban had 55 s left
    assert not bans.delete(harness.dp, "10.4.4.5/32")


def test_lifting_an_automatic_ban_clears_every_slot_of_the_source(harness):
    """Two CPUs inserting one new source at once can leave it in two ways of its bucket; the datapath
    reads the first, so `ban del` must lift the ban in each (here: a copy in the bucket's last way)."""
    now = _banned_for_60s(harness, "10.4.4.6")
    with dos_sources.table(harness.dp.map_fds[dos_sources.MAP]) as t:
        (i,) = np.flatnonzero(t.slots["slot_state"] == dos_sources.LIVE)
        last = i - i % dos_sources.WAYS + dos_sources.WAYS - 1
        assert i != last
        t.slots[last] = t.slots[i]
    assert outcome_reason(send(harness, Pkt("10.4.4.6", 17), now)) == "banned"
    assert bans.delete(harness.dp, "10.4.4.6/32")
    assert outcome_reason(send(harness, Pkt("10.4.4.6", 17), now + 5 * NS)) is None   # the ban had 55 s left


def test_audit_mode_counts_would_drop(harness):
    install(harness, "udp: {per_source_pps: 1}", audit=True)
    send(harness, Pkt("10.5.5.5", 17), T0)
    o = send(harness, Pkt("10.5.5.5", 17), T0)
    assert (o.passed, o.verdict, o.reason) == (True, "would_drop", "udp_flood")


def test_operator_ban_add_and_delete(harness):
    install(harness, "per_source: {pps: 1000}")
    bans.add(harness.dp, "10.6.0.0/16", None)
    try:
        o = send(harness, Pkt("10.6.1.2", 6), T0)
        assert (o.passed, o.reason) == (False, "banned")
        assert [b["prefix"] for b in bans.listing(harness.dp)] == ["10.6.0.0/16"]
    finally:
        assert bans.delete(harness.dp, "10.6.0.0/16")
    assert outcome_reason(send(harness, Pkt("10.6.1.2", 6), T0)) is None


def test_interface_without_profile_is_not_limited(harness):
    harness.install(POLICY.format(profile="      per_source: {pps: 1, burst: 1}", audit="false", stateful="false"),
                    dos_interfaces={999: "p"})                  # the profile sits on another interface
    _reset_state(harness.dp)
    for _ in range(5):
        assert send(harness, Pkt("10.7.7.7", 17), T0).verdict == "allow"


def test_profile_counters_per_reason(harness):
    install(harness, "icmp: {per_source_pps: 1}")
    before = harness.dp.dos_stats()
    for _ in range(4):
        send(harness, Pkt("10.8.8.8", 1), T0)
    after = harness.dp.dos_stats()
    k = 0 * L.REASONS + L.C["HW_R_ICMP_FLOOD"]
    assert int(after[k]["packets"] - before[k]["packets"]) == 3


def test_full_source_buckets_evict_and_count(harness):
    """A new source whose bucket is full evicts the least recently seen unbanned one of that bucket,
    and the eviction is counted; the evicted source starts again from a full bucket."""
    install(harness, "per_source: {pps: 2, burst: 2}")
    dp = harness.dp
    seed = int(dp.config()["table_seed"])
    # WAYS + 1 /32 sources of one bucket (this instance's seed)
    base = int.from_bytes(bytes([11, 0, 0, 0]), "big")
    keys = np.zeros(200_000, L.DTYPES["hw_dos_key"])
    addrs = (base + np.arange(len(keys))).astype(">u4")
    keys["addr"][:, :4] = addrs.view(np.uint8).reshape(-1, 4)
    keys["family"], keys["prefix_len"], keys["profile"] = 4, 32, 0
    first = dos_sources.first_slot(keys, seed)
    vals, counts = np.unique(first, return_counts=True)
    assert counts.max() > dos_sources.WAYS
    srcs = [str(ipaddress.ip_address(int(a))) for a in addrs[first == vals[np.argmax(counts)]][:dos_sources.WAYS + 1]]
    before = dp.dos_src_stats()
    for i, src in enumerate(srcs[:-1]):
        dp.set_config(test_now_ns=T0 + i * 10**6)
        for _ in range(3):                              # burst 2: the third is over the limit
            out = harness.run("xdp", frame_of(Pkt(src, 17)), ifindex=LO)
        assert out.reason == "rate_limit"
    dp.set_config(test_now_ns=T0 + 10**7)
    assert harness.run("xdp", frame_of(Pkt(srcs[-1], 17)), ifindex=LO).reason != "rate_limit"
    after = dp.dos_src_stats()
    assert after["inserted"] - before["inserted"] == dos_sources.WAYS + 1
    assert after["evicted"] - before["evicted"] == 1
    # the first source (least recently seen) was evicted: its bucket is full again; the others are not
    assert harness.run("xdp", frame_of(Pkt(srcs[0], 17)), ifindex=LO).reason != "rate_limit"
    assert harness.run("xdp", frame_of(Pkt(srcs[2], 17)), ifindex=LO).reason == "rate_limit"
    with dos_sources.table(dp.map_fds[dos_sources.MAP]) as t:
        assert len(t.live()) == dos_sources.WAYS + 0   # srcs[0] came back by evicting the next oldest
    _reset_state(dp)


# ---- tracked connections pass the source guards (docs/dos.md "Tracked connections") -----------------
ME, ME6 = "10.0.0.1", "fd00::1"
RESOLVER, RESOLVER6 = "192.0.2.53", "fd00:53::53"
SPARED = "pass_conntrack_over_limit"


def _ip(src: str, dst: str):
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def udp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return raw(E / _ip(src, dst) / UDP(sport=sport, dport=dport))


def tcp(src: str, dst: str, sport: int, dport: int, flags: str, seq: int = 0, ack: int | None = None) -> bytes:
    """A segment; with ACK set it acknowledges, by default, the other side's SYN at seq 0 (ack 1)."""
    ack = (1 if "A" in flags else 0) if ack is None else ack
    return raw(E / _ip(src, dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack))


def at(harness, hook: str, frame_: bytes, now: int):
    harness.dp.set_config(test_now_ns=now)
    return harness.run(hook, frame_, ifindex=LO if hook == "xdp" else 0)


def flood_until_banned(harness, src: str, me: str, now: int) -> int:
    """Spoofed UDP from `src` to ports the host never used, 10/s for 3 s: banned (ban.after 1 s of
    over-limit packets). Returns the time after the flood."""
    got = None
    for i in range(30):
        got = at(harness, "xdp", udp(src, me, 53, 1000 + i), now).reason
        now += 100_000_000
    assert got == "banned"
    return now


@pytest.mark.parametrize("v6", [False, True])
def test_banned_resolver_still_answers_the_hosts_query(harness, v6):
    """A flood claiming to come from the host's resolver bans the resolver's address; the resolver's
    real reply to the host's query (the tracked tuple) still passes, the flood and new flows do not."""
    me, res = (ME6, RESOLVER6) if v6 else (ME, RESOLVER)
    install(harness, "udp: {per_source_pps: 5}\nban: {after: 1s, duration: 60s}", stateful=True)
    assert at(harness, "tc_egress", udp(me, res, 40000, 53), T0).reason == "pass_default"     # the query
    now = flood_until_banned(harness, res, me, T0)
    reply = at(harness, "xdp", udp(res, me, 53, 40000), now)
    assert (reply.passed, reply.verdict, reply.reason) == (True, "allow", SPARED)
    assert at(harness, "xdp", udp(res, me, 53, 40000), now).reason == SPARED              # confirmed: again
    assert at(harness, "xdp", udp(res, me, 53, 1001), now).reason == "banned"             # the flood
    assert at(harness, "xdp", udp(res, me, 53, 40001), now).reason == "banned"            # another port
    assert at(harness, "xdp", tcp(res, me, 53, 40000, "S"), now).reason == "banned"       # another protocol
    kind = [(b["kind"], b["reason"]) for b in bans.listing(harness.dp, ("p",))]
    assert kind == [("automatic", "udp_flood")]                                            # still banned


@pytest.mark.parametrize("v6", [False, True])
def test_banned_peer_keeps_the_tcp_connections_the_host_opened(harness, v6):
    """The same for TCP: a connection the host opened goes on while its peer is banned. One the peer
    opened does not (its handshake can be completed blind, and a real client stays bounded by its limits),
    nor a new connection from the peer, nor a packet of a connection the host reset."""
    me, peer = (ME6, RESOLVER6) if v6 else (ME, RESOLVER)
    install(harness, "per_source: {pps: 5, burst: 5}\nban: {after: 1s, duration: 60s}", stateful=True)
    now = T0
    at(harness, "tc_egress", tcp(me, peer, 40000, 443, "S"), now)                 # the host opens one
    assert at(harness, "xdp", tcp(peer, me, 443, 40000, "SA"), now).reason == "pass_conntrack"
    at(harness, "tc_egress", tcp(me, peer, 40000, 443, "A"), now)
    assert at(harness, "xdp", tcp(peer, me, 50000, 22, "S"), now).reason == "pass_default"     # the peer opens one
    at(harness, "tc_egress", tcp(me, peer, 22, 50000, "SA"), now)
    assert at(harness, "xdp", tcp(peer, me, 50000, 22, "A"), now).reason == "pass_conntrack"
    now = flood_until_banned(harness, peer, me, now)
    got = at(harness, "xdp", tcp(peer, me, 443, 40000, "PA"), now)
    assert (got.passed, got.reason) == (True, SPARED)
    assert at(harness, "xdp", tcp(peer, me, 50000, 22, "PA"), now).reason == "banned"      # inbound: not spared
    assert at(harness, "xdp", tcp(peer, me, 50001, 22, "S"), now).reason == "banned"       # a new connection
    # outside the connection's sequence window a RST or FIN is not its packet: not spared (dos.h)
    for flags, seq in (("R", 12345), ("RA", 12345), ("FA", 1 + 10**6)):
        got = at(harness, "xdp", tcp(peer, me, 443, 40000, flags, seq=seq), now)
        assert (got.passed, got.reason) == (False, "banned"), flags
    assert at(harness, "xdp", tcp(peer, me, 443, 40000, "PA", seq=1), now).reason == SPARED   # still open
    at(harness, "tc_egress", tcp(me, peer, 40000, 443, "R", seq=1), now)                    # the host resets one
    assert at(harness, "xdp", tcp(peer, me, 443, 40000, "A"), now).reason == "banned"       # not a continuation
    assert at(harness, "xdp", tcp(peer, me, 443, 40000, "R"), now).reason == "banned"       # closed: not spared


def test_a_source_cannot_make_its_own_tuple_spared(harness):
    """What a (spoofing) source can bring into conntrack by itself is never spared: an inbound SYN (then
    RST: closed; or FIN), and an ICMP echo request matching the host's own ping to that address (echo
    entries are keyed by id: it would be answered, reflecting the flood)."""
    install(harness, "per_source: {pps: 5, burst: 5}\nban: {after: 1s, duration: 60s}", stateful=True)
    now = T0
    assert at(harness, "xdp", tcp(RESOLVER, ME, 50000, 22, "S"), now).reason == "pass_default"
    assert at(harness, "xdp", tcp(RESOLVER, ME, 50000, 22, "R", seq=1), now).reason == "pass_conntrack"  # after its SYN
    assert at(harness, "xdp", tcp(RESOLVER, ME, 50002, 22, "S"), now).reason == "pass_default"
    # a FIN before the handshake is answered changes nothing (docs/datapath.md "Sequence checks")
    assert at(harness, "xdp", tcp(RESOLVER, ME, 50002, 22, "F"), now).reason == "pass_conntrack_out_of_window"
    ping = raw(E / IP(src=ME, dst=RESOLVER) / ICMP(type=8, id=77, seq=1))
    at(harness, "tc_egress", ping, now)                                                      # the host's ping
    now = flood_until_banned(harness, RESOLVER, ME, now)
    assert at(harness, "xdp", tcp(RESOLVER, ME, 50000, 22, "R"), now).reason == "banned"
    assert at(harness, "xdp", tcp(RESOLVER, ME, 50002, 22, "PA"), now).reason == "banned"
    request = raw(E / IP(src=RESOLVER, dst=ME) / ICMP(type=8, id=77, seq=2))
    assert at(harness, "xdp", request, now).reason == "banned"
    reply = raw(E / IP(src=RESOLVER, dst=ME) / ICMP(type=0, id=77, seq=1))
    assert at(harness, "xdp", reply, now).reason == SPARED                                   # the real reply


def test_inbound_udp_flows_and_operator_bans_are_not_spared(harness):
    """An inbound UDP flow's tuple is the sender's choice and the host's reply confirms it without the
    sender seeing it: a spoofed flood on one tuple would be spared, so it is not. Operator bans cut all."""
    install(harness, "udp: {per_source_pps: 5}\nban: {after: 1s, duration: 60s}", stateful=True)
    assert at(harness, "xdp", udp(RESOLVER, ME, 5000, 5353), T0).reason == "pass_default"
    assert at(harness, "tc_egress", udp(ME, RESOLVER, 5353, 5000), T0).reason == "pass_conntrack"
    now = flood_until_banned(harness, RESOLVER, ME, T0)
    assert at(harness, "xdp", udp(RESOLVER, ME, 5000, 5353), now).reason == "banned"
    # operator ban: the host's own query's reply is cut too
    at(harness, "tc_egress", udp(ME, "192.0.2.54", 40000, 53), now)
    bans.add(harness.dp, "192.0.2.54/32", None)
    try:
        assert at(harness, "xdp", udp("192.0.2.54", ME, 53, 40000), now).reason == "banned"
    finally:
        assert bans.delete(harness.dp, "192.0.2.54/32")


def test_tracked_packets_take_free_tokens_but_never_ban_their_source(harness):
    """A tracked connection's packets take their source's tokens while there are any; over the limit
    they pass without and do not count towards a ban. The reference model says the same."""
    params = install(harness, "udp: {per_source_pps: 2}\nban: {after: 1s, duration: 60s}", stateful=True)
    model = DosModel(params)
    at(harness, "tc_egress", udp(ME, RESOLVER, 40000, 53), T0)
    now, got, want = T0, [], []
    for _ in range(30):                                    # 10/s for 3 s: over the limit all along
        o = at(harness, "xdp", udp(RESOLVER, ME, 53, 40000), now)
        got.append((o.verdict, o.reason))
        want.append((model.check(Pkt(RESOLVER, 17, dport=40000, tracked=True), now),
                     SPARED if model.spared else "pass_conntrack"))
        now += 100_000_000
    assert [("allow", w[1]) for w in want] == got and {w[0] for w in want} == {None}
    assert got[:3] == [("allow", "pass_conntrack")] * 2 + [("allow", SPARED)]         # 2 tokens, then none
    # no ban: an untracked packet (at the time of the last tracked one) meets the empty bucket, no ban
    last = now - 100_000_000
    assert at(harness, "xdp", udp(RESOLVER, ME, 53, 1000), last).reason == "udp_flood"
    assert model.check(Pkt(RESOLVER, 17, dport=1000), last) == "udp_flood"
    assert bans.listing(harness.dp, ("p",)) == []


def test_first_fragment_of_a_tracked_reply_is_spared_later_fragments_are_not(harness):
    """A first fragment carries the ports: spared as its connection's packet. A later fragment has no
    tuple to look up: dropped while its source is banned (docs/dos.md "Tracked connections")."""
    install(harness, "udp: {per_source_pps: 5}\nban: {after: 1s, duration: 60s}", stateful=True)
    at(harness, "tc_egress", udp(ME, RESOLVER, 40000, 53), T0)
    now = flood_until_banned(harness, RESOLVER, ME, T0)
    first = raw(E / IP(src=RESOLVER, dst=ME, id=7, flags="MF", frag=0) / UDP(sport=53, dport=40000) / (b"x" * 64))
    later = raw(E / IP(src=RESOLVER, dst=ME, id=7, proto=17, frag=9) / (b"y" * 64))
    assert at(harness, "xdp", first, now).reason == SPARED
    assert at(harness, "xdp", later, now).reason == "banned"


# ---- ICMP errors about the host's own connections (docs/dos.md "Tracked connections") ---------------
ROUTER, ROUTER6 = "198.51.100.1", "fd00:77::1"
SPARED_ERROR = "pass_related_over_limit"


def path_mtu_error(src: str, dst: str, quoted: bytes) -> bytes:
    """A frag-needed (ICMP 3/4) or packet-too-big (ICMPv6 2) from `src` to `dst` quoting `quoted` (an IP
    packet without its Ethernet header)."""
    if ":" in src:
        return raw(E / IPv6(src=src, dst=dst) / ICMPv6PacketTooBig(mtu=1280) / quoted)
    return raw(E / IP(src=src, dst=dst) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted)


def ip_tcp(src: str, dst: str, sport: int, dport: int, flags: str = "A") -> bytes:
    return raw(_ip(src, dst) / TCP(sport=sport, dport=dport, flags=flags))


@pytest.mark.parametrize("v6", [False, True])
def test_path_mtu_errors_about_host_opened_connections_pass_a_banned_router(harness, v6):
    """A spoofed flood bans the upstream router's prefix; its path-MTU errors about a connection the
    host opened still pass (else the connection black-holes, RFC 1191 / RFC 4890). Errors quoting an
    inbound connection, a closed one, no connection, or a packet the host did not send do not, nor
    does an echo request matching the host's ping."""
    me, peer, router = (ME6, RESOLVER6, ROUTER6) if v6 else (ME, RESOLVER, ROUTER)
    install(harness, "per_source: {pps: 5, burst: 5}\nban: {after: 1s, duration: 60s}", stateful=True)
    now = T0
    at(harness, "tc_egress", tcp(me, peer, 40000, 443, "S"), now)                 # the host opens one
    assert at(harness, "xdp", tcp(peer, me, 443, 40000, "SA"), now).reason == "pass_conntrack"
    at(harness, "tc_egress", tcp(me, peer, 40001, 443, "S"), now)                 # and one it resets
    at(harness, "tc_egress", tcp(me, peer, 40001, 443, "R", seq=1), now)        # at its next number
    assert at(harness, "xdp", tcp(peer, me, 50000, 22, "S"), now).reason == "pass_default"     # the peer opens one
    at(harness, "tc_egress", tcp(me, peer, 22, 50000, "SA"), now)
    ping = raw(E / _ip(me, router) / (ICMPv6EchoRequest(id=77) if v6 else ICMP(type=8, id=77)))
    at(harness, "tc_egress", ping, now)                                            # the host pings the router
    now = flood_until_banned(harness, router, me, now)
    got = at(harness, "xdp", path_mtu_error(router, me, ip_tcp(me, peer, 40000, 443)), now)
    assert (got.passed, got.verdict, got.reason) == (True, "allow", SPARED_ERROR)
    assert got.rule_slot == harness.slots["essential_icmp"]                        # counted as pass_related is
    for quoted in (ip_tcp(me, peer, 22, 50000),                 # an inbound connection
                   ip_tcp(me, peer, 40001, 443),                # a closed one
                   ip_tcp(me, peer, 40002, 443),                # no connection
                   ip_tcp(peer, me, 443, 40000)):               # the peer's packet: not the host's to hear of
        assert at(harness, "xdp", path_mtu_error(router, me, quoted), now).reason == "banned", quoted.hex()
    request = raw(E / _ip(router, me) / (ICMPv6EchoRequest(id=77) if v6 else ICMP(type=8, id=77)))
    assert at(harness, "xdp", request, now).reason == "banned"
    bans.add(harness.dp, f"{router}/{128 if v6 else 32}", None)                   # operator bans cut it too
    try:
        assert at(harness, "xdp", path_mtu_error(router, me, ip_tcp(me, peer, 40000, 443)), now).reason == "banned"
    finally:
        assert bans.delete(harness.dp, f"{router}/{128 if v6 else 32}")


@pytest.mark.parametrize("v6", [False, True])
def test_errors_about_host_opened_connections_take_free_tokens_then_pass_over_the_limit(harness, v6):
    """Over its ICMP limit (not banned) a router's errors about a host-opened UDP flow pass as the
    reference model says (it spares them as tracked errors); its other errors meet the limit."""
    me, peer, router = (ME6, RESOLVER6, ROUTER6) if v6 else (ME, RESOLVER, ROUTER)
    params = install(harness, "icmp: {per_source_pps: 2}", stateful=True)
    model = DosModel(params)
    at(harness, "tc_egress", udp(me, peer, 40000, 53), T0)
    quoted = raw(_ip(me, peer) / UDP(sport=40000, dport=53))
    got, want = [], []
    for _ in range(6):                                     # 6 at once: 2 tokens, then over the limit
        o = at(harness, "xdp", path_mtu_error(router, me, quoted), T0)
        got.append(o.reason)
        reason = model.check(Pkt(router, 58 if v6 else 1, tracked=True, error=True), T0)
        want.append(reason or (SPARED_ERROR if model.spared else "pass_related"))
    # its 2 tokens, then the profile's shared bucket for spared errors (icmp_pps: 2), then over the limit
    assert got == want == ["pass_related"] * 2 + [SPARED_ERROR] * 2 + ["icmp_flood"] * 2
    other = raw(_ip(me, peer) / UDP(sport=40001, dport=53))
    assert at(harness, "xdp", path_mtu_error(router, me, other), T0).reason == "icmp_flood"


def test_spared_errors_need_essential_icmp(harness):
    """With essential_icmp off, errors about tracked connections meet the rules (docs/policy.md): a spared
    error is then dropped for the limit it was over, as a spared packet that does not continue its
    connection is."""
    policy = POLICY.format(profile="      icmp: {per_source_pps: 1}", audit="false", stateful="true")
    harness.install(policy.replace("audit: false", "audit: false, essential_icmp: false"), dos_interfaces={LO: "p"})
    _reset_state(harness.dp)
    at(harness, "tc_egress", udp(ME, RESOLVER, 40000, 53), T0)
    err = path_mtu_error(ROUTER, ME, raw(_ip(ME, RESOLVER) / UDP(sport=40000, dport=53)))
    assert at(harness, "xdp", err, T0).reason == "pass_default"            # a token: the policy decides
    assert at(harness, "xdp", err, T0).reason == "icmp_flood"              # over: not spared without it


def icmp_error(src: str, dst: str, kind: int, quoted: bytes, code: int = 0) -> bytes:
    """An ICMP (v4) or ICMPv6 error of type `kind` from `src` to `dst` quoting `quoted` (an IP packet)."""
    if ":" in src:
        head = {1: ICMPv6DestUnreach, 2: ICMPv6PacketTooBig, 3: ICMPv6TimeExceeded, 4: ICMPv6ParamProblem}[kind]
        return raw(E / IPv6(src=src, dst=dst) / head(code=code) / quoted)
    return raw(E / IP(src=src, dst=dst) / ICMP(type=kind, code=code) / quoted)


@pytest.mark.parametrize("v6", [False, True])
def test_spared_errors_of_a_profile_share_one_sources_icmp_rate(harness, v6):
    """Host-opened tuples with fixed ports are public (NTP 123 <-> 123): a spoofed flood of errors quoting
    one from many sources gets, all together, one source's ICMP rate past their limits (one bucket per
    profile, as the reference model says); the rest are dropped for the limit they were over."""
    me, peer = (ME6, RESOLVER6) if v6 else (ME, RESOLVER)
    assert (dos_reference.ERR_PPS, dos_reference.GLOBAL_ERR) == (L.C["HW_DOS_ERR_PPS"], L.C["HW_DOS_GLOBAL_ERR"])
    params = install(harness, "icmp: {per_source_pps: 2}", stateful=True)
    model = DosModel(params)
    at(harness, "tc_egress", udp(me, peer, 123, 123), T0)
    quoted = raw(_ip(me, peer) / UDP(sport=123, dport=123))
    got, want = [], []
    for t in (T0, T0 + NS // 2, T0 + NS):
        for i in range(10):                                 # 10 sources, 3 errors each at every t
            src = f"fd00:66:{i + 1}::1" if v6 else f"203.0.113.{i + 1}"
            for _ in range(3):
                got.append(at(harness, "xdp", icmp_error(src, me, 3 if not v6 else 1, quoted), t).reason)
                reason = model.check(Pkt(src, 58 if v6 else 1, tracked=True, error=True), t)
                want.append(reason or (SPARED_ERROR if model.spared else "pass_related"))
    assert got == want
    # each source's own tokens (2, then 1 per 0.5 s), then the shared bucket: 2 at T0, 1 per 0.5 s after
    assert (got.count("pass_related"), got.count(SPARED_ERROR), got.count("icmp_flood")) == (40, 4, 46)


@pytest.mark.parametrize("v6", [False, True])
def test_errors_quoting_multicast_or_broadcast_are_not_spared(harness, v6):
    """The host's multicast and broadcast flows (mDNS to 224.0.0.251 / ff02::fb, DHCP to
    255.255.255.255) have public tuples and no one peer: errors quoting them are never spared."""
    me = ME6 if v6 else ME
    install(harness, "per_source: {pps: 5, burst: 5}\nban: {after: 1s, duration: 60s}", stateful=True)
    groups = [("ff02::fb", 5353, 5353), ("ff05::1:3", 546, 547)] if v6 else \
             [("224.0.0.251", 5353, 5353), ("255.255.255.255", 68, 67)]
    for dst, sport, dport in groups:
        assert at(harness, "tc_egress", udp(me, dst, sport, dport), T0).reason == "pass_default"
    now = flood_until_banned(harness, ROUTER6 if v6 else ROUTER, me, T0)
    for dst, sport, dport in groups:
        quoted = raw(_ip(me, dst) / UDP(sport=sport, dport=dport))
        err = icmp_error(ROUTER6 if v6 else ROUTER, me, 1 if v6 else 3, quoted, code=3)
        assert at(harness, "xdp", err, now).reason == "banned", dst


@pytest.mark.parametrize("v6", [False, True])
def test_only_unreachable_too_big_time_exceeded_parameter_problem_are_spared(harness, v6):
    """docs/dos.md lists the errors spared: v4 3, 11, 12; v6 1, 2, 3, 4. Source quench (4) and redirect
    (5) from a banned router stay banned. Of a quoted ICMP message only the host's echo request counts:
    an echo reply or a timestamp with the host's ping id is not the host's ping."""
    me, peer, router = (ME6, RESOLVER6, ROUTER6) if v6 else (ME, RESOLVER, ROUTER)
    install(harness, "per_source: {pps: 5, burst: 5}\nban: {after: 1s, duration: 60s}", stateful=True)
    at(harness, "tc_egress", udp(me, peer, 40000, 53), T0)
    ping = ICMPv6EchoRequest(id=77) if v6 else ICMP(type=8, id=77)
    at(harness, "tc_egress", raw(E / _ip(me, peer) / ping), T0)
    now = flood_until_banned(harness, router, me, T0)
    quoted = raw(_ip(me, peer) / UDP(sport=40000, dport=53))
    spared = (1, 2, 3, 4) if v6 else (3, 11, 12)
    for kind in spared + (() if v6 else (4, 5)):
        want = SPARED_ERROR if kind in spared else "banned"
        assert at(harness, "xdp", icmp_error(router, me, kind, quoted), now).reason == want, kind
    pinged = raw(_ip(me, peer) / ping)
    assert at(harness, "xdp", icmp_error(router, me, 3 if v6 else 11, pinged), now).reason == SPARED_ERROR
    # a second later the shared budget (5) is full again: "banned" below is the quoted type's doing
    later = now + 10**9
    others = (ICMPv6EchoReply(id=77),) if v6 else (ICMP(type=0, id=77), ICMP(type=13, id=77))
    for other in others:
        quoted_other = raw(_ip(me, peer) / other)
        assert at(harness, "xdp", icmp_error(router, me, 3 if v6 else 11, quoted_other), later).reason == "banned"
    assert at(harness, "xdp", icmp_error(router, me, 3 if v6 else 11, pinged), later).reason == SPARED_ERROR
