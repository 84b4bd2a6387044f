"""The collector against the real datapath: load it (BCC), pin it, open it with KernelSource as the
collector does, run packets through BPF_PROG_TEST_RUN, then drain the real ring buffer, the real
drop aggregation and the real conntrack maps and check the counts against the kernel's own counters.

These tests FAIL (not skip) while bpf/hostwall.bpf.c lacks the reporting maps: the collector
cannot work without them."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections import Counter

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from hostwall.bpf import bpfsys, conntrack, slot_table
from hostwall.bpf import layout as L
from hostwall.collector.kernel import MAPS, KernelSource

pytestmark = pytest.mark.bpf

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
ME = "10.0.0.1"
POLICY = """
version: 1
name: live
defaults: {ingress: deny, egress: allow}
rules:
  - {name: web, priority: 1, direction: ingress, action: allow, protocol: tcp, ports: [80]}
  - {name: dns, priority: 2, direction: ingress, action: allow, protocol: udp, ports: [53]}
  - {name: audit-me, priority: 3, direction: ingress, action: log, protocol: udp, ports: [514]}
  - {name: bad, priority: 4, direction: ingress, action: deny, peers: [198.51.100.0/24]}
"""
V_DROP = L.C["HW_V_DROP"]


def future_test_clock(seconds: int) -> int:
    """A datapath test clock `seconds` past the real monotonic clock, on a 10 s boundary. Per-CPU token
    buckets (the event budget, shares) keep the last time they saw: a fixed test time below the host's
    uptime would find them "in the future" and never refill (the outcome then depends on the uptime and
    on which CPU earlier tests ran)."""
    now_s = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 10**9
    return (now_s + seconds) // 10 * 10 * 10**9
R_POLICY, R_DEFAULT = L.C["HW_R_POLICY_DENY"], L.C["HW_R_DEFAULT_DENY"]


def seg(sport: int, dport: int, flags: str, seq: int | None = None) -> TCP:
    """A segment of a connection whose ISNs are 0 on both sides: a SYN at 0, anything after at 1 (or
    `seq`), an ACK acknowledging the other side's SYN (1): in window for the datapath's sequence checks
    (docs/datapath.md "Sequence checks")."""
    return TCP(sport=sport, dport=dport, flags=flags, seq=(0 if "S" in flags else 1) if seq is None else seq,
               ack=1 if "A" in flags else 0)


def tcp_in(src="10.0.0.9", sport=40000, dport=80, flags="S", seq=None):
    return raw(E / IP(src=src, dst=ME) / seg(sport, dport, flags, seq))


def tcp_out(flags, dst="10.0.0.9", dport=40000, sport=80, seq=None):
    return raw(E / IP(src=ME, dst=dst) / seg(sport, dport, flags, seq))


def udp_in(src="10.0.0.9", sport=5000, dport=53):
    return raw(E / IP(src=src, dst=ME) / UDP(sport=sport, dport=dport))


@pytest.fixture(scope="module")
def instance():
    """(Datapath, pin dir): the real datapath, loaded and pinned where the collector finds it."""
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)")
    src = L.program_text()
    missing = [m for m in MAPS if m not in src]
    if missing:
        pytest.fail(f"the kernel side of the collector has not landed: bpf/ defines no "
                    f"{', '.join(missing)} (docs/collector.md)", pytrace=False)
    from hostwall.enforcer.datapath import Datapath
    dp = Datapath.load()
    pin = f"/sys/fs/bpf/hostwall-test/collector-{secrets.token_hex(3)}"
    dp.pin(pin)
    yield dp, pin
    Datapath.unpin(pin)
    dp.close()


@pytest.fixture
def kernel(instance):
    """A fresh KernelSource on the pinned instance, with the policy installed and state cleared."""
    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.policy import parse_policy
    dp, pin = instance
    pol = parse_policy(POLICY)
    slots = {r.name: i for i, r in enumerate(pol.rules)}
    dp.install(compile_policy(pol, slots, 1))
    dp.clear_conntrack()
    ks = KernelSource(pin)
    ks.drain_drops()
    ks.drain_drops()                                   # both generations empty
    with ks.ring() as rb:
        rb.read(1 << 20)
    yield ks, dp, slots
    dp.set_config(test_now_ns=0, detached_ns=0)
    ks.set_knobs(event_budget=L.C["HW_EVENT_BUDGET"], agg_prefix_v4=24, agg_prefix_v6=64)
    dp.clear_conntrack()
    ks.close()


def xdp(dp, frame: bytes) -> int:
    return bpfsys.prog_test_run(dp.prog_fds["xdp_ingress"], frame).retval


def egress(dp, frame: bytes) -> int:
    return bpfsys.prog_test_run(dp.prog_fds["tc_egress"], frame).retval


def emitted(ks) -> Counter:
    return Counter({t: o["emitted"] for t, o in ks.kernel_loss().items()})


def test_missing_pins_are_a_clear_error(tmp_path):
    from hostwall.collector.kernel import KernelSourceError
    with pytest.raises(KernelSourceError, match="no hostwall instance is pinned there"):
        KernelSource(tmp_path)


def test_ring_buffer_events_decode_with_the_kernel_counts(kernel):
    ks, dp, slots = kernel
    before = emitted(ks)
    xdp(dp, tcp_in())                                  # flow_start (allowed SYN opens a connection)
    egress(dp, tcp_out("SA"))
    xdp(dp, tcp_in(flags="A"))
    egress(dp, tcp_out("R"))                           # flow_end (RST)
    xdp(dp, tcp_in(src="198.51.100.7", dport=22))      # deny (first drop of its key)
    xdp(dp, tcp_in(src="198.51.100.7", sport=40001, dport=22))   # same key: no second event
    xdp(dp, udp_in(dport=514))                         # log (and, allowed, it opens a UDP flow)
    with ks.ring() as rb:
        b = rb.read()
        assert rb.available_bytes() == 0
    ev = b.records
    types = Counter(L.EVENT_TYPE_NAMES[int(t)] for t in ev["type"])
    assert types == {"flow_start": 2, "flow_end": 1, "deny": 1, "log": 1}, types
    assert not b.errors and b.discarded == 0
    assert emitted(ks) - before == types               # every emitted event was read, once
    deny = ev[ev["type"] == L.C["HW_EV_DENY"]][0]
    assert bytes(deny["saddr"][:4]) == bytes([198, 51, 100, 7]) and int(deny["dport"]) == 22
    assert (int(deny["verdict"]), int(deny["reason"]), int(deny["rule_slot"])) == (V_DROP, R_POLICY, slots["bad"])
    end = ev[ev["type"] == L.C["HW_EV_FLOW_END"]][0]
    assert end["packets"].tolist() == [2, 2] and int(end["start_ns"]) <= int(end["ts_ns"])
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert 0 <= mono - int(end["ts_ns"]) < 60 * 10**9  # CLOCK_MONOTONIC, as the clock conversion assumes


def test_drop_drain_adds_up_exactly_to_the_drop_counters(kernel):
    ks, dp, _ = kernel
    before = ks.drop_counters()
    for i in range(300):
        xdp(dp, tcp_in(src=f"198.51.100.{i % 50}", sport=1000 + i, dport=22 + i % 3))   # policy_deny
        xdp(dp, tcp_in(src=f"203.0.113.{i % 7}", sport=1000 + i, dport=443))           # default_deny
    d = ks.drain_drops()
    delta = ks.drop_counters() - before
    assert (d.packets_by() == delta).all()
    assert delta[V_DROP, R_POLICY] == 300 and delta[V_DROP, R_DEFAULT] == 300
    pd = d.keys[d.keys["reason"] == R_POLICY]
    assert sorted(int(p) for p in pd["dport"]) == [22, 23, 24]             # one key per (/24, dport)
    assert all(bytes(k["src"][:4]) == bytes([198, 51, 100, 0]) and k["prefix_len"] == 24 for k in pd)
    assert d.vals["packets"][d.keys["reason"] == R_POLICY].tolist() == [100, 100, 100]
    assert (d.vals["first_ns"] <= d.vals["last_ns"]).all() and d.t0_ns <= d.t1_ns and not d.overflow
    assert d.barrier_s < 1.0
    again = ks.drain_drops()                          # the drained generation was deleted
    assert len(again.keys) == 0 and again.t0_ns == d.t1_ns


def _drop_src_slot(keys: np.ndarray, seed: int) -> np.ndarray:
    """The hw_drop_srcs slot of each key (hw_drop_src rows): agg_src's hash over the first 32 bytes,
    by the user-space twin of tbl_first_slot."""
    k32 = np.frombuffer(np.ascontiguousarray(keys).tobytes(), np.uint8).reshape(len(keys), -1)[:, :32]
    return slot_table.first_slot(np.ascontiguousarray(k32).view([("w", "<u8", (4,))]).ravel(), seed,
                                 L.C["HW_DROP_SRC_SLOTS"], 1)


def test_drop_drain_lists_individual_peers_with_exact_counts(kernel):
    """The per-interval peer table behind the summaries' top talkers: every peer of a key, one host
    each, its packets and IP-layer bytes exact when no other peer of the interval shares its slot
    (which the user-space twin of the hash tells); drained with the aggregate and zeroed."""
    ks, dp, _ = kernel
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})            # one CPU: per-CPU slots fill in the order sent
    try:
        ks.drain_drops()
        sent: Counter = Counter()
        for i in range(300):
            for src, dport in ((f"198.51.100.{i % 50}", 22), (f"203.0.113.{i % 7}", 443)):
                xdp(dp, tcp_in(src=src, sport=1000 + i, dport=dport))
                sent[(src, dport)] += 1
        d = ks.drain_drops()
    finally:
        os.sched_setaffinity(0, cpus)
    agg = {int(k["dport"]): k for k in d.keys}
    want = np.zeros(len(sent), L.DTYPES["hw_drop_src"])
    for i, (src, dport) in enumerate(sent):
        want["k"][i] = agg[dport]
        want["k"]["src"][i][:4] = np.frombuffer(socket.inet_aton(src), np.uint8)
    slot = _drop_src_slot(want, int(dp.config()["table_seed"]))
    first_in_slot = {}
    for i, sl in enumerate(slot.tolist()):
        first_in_slot.setdefault(sl, i)            # sent in this order: the first key keeps the slot
    got = {(socket.inet_ntoa(bytes(s["k"]["src"][:4])), int(s["k"]["dport"])): (int(s["packets"]), int(s["bytes"]))
           for s in d.sources}
    assert got, "no individual peers were drained"
    holders = {i for i in first_in_slot.values()}
    for i, (key, n) in enumerate(sent.items()):
        if i in holders:
            assert got.get(key) == (n, 40 * n), (key, got.get(key))      # 40 = IP + TCP header bytes
        else:
            assert key not in got                                          # lost its slot: not listed
    assert len(got) == len(holders) and len(sent) - len(holders) == len(slot) - len(set(slot.tolist()))
    for s in d.sources:                             # each lies in its summary's prefix, key for key
        k = s["k"].copy()
        assert bytes(k["src"][:3]) == bytes(agg[int(k["dport"])]["src"][:3]) and k["prefix_len"] == 24
    assert len(ks.drain_drops().sources) == 0      # the drained slots were zeroed


def test_full_aggregation_map_overflow_is_drained_and_zeroed(kernel):
    ks, dp, _ = kernel
    ks.set_knobs(agg_prefix_v4=32)
    n = L.C["HW_DROP_AGG_MAX"] + 300
    before = ks.drop_counters()
    frame = bytearray(tcp_in(src="11.0.0.0", dport=22))
    base = int.from_bytes(bytes([11, 0, 0, 0]), "big")
    fd = dp.prog_fds["xdp_ingress"]
    for i in range(n):
        frame[26:30] = (base + i).to_bytes(4, "big")  # the datapath does not verify the IP checksum
        bpfsys.prog_test_run(fd, bytes(frame))
    d = ks.drain_drops()
    assert len(d.keys) == L.C["HW_DROP_AGG_MAX"]
    assert d.overflow_packets >= 300 and set(d.overflow) == {(V_DROP, R_DEFAULT)}
    assert (d.packets_by() == ks.drop_counters() - before).all() and d.packets_by().sum() == n
    xdp(dp, tcp_in(src="11.0.0.1", dport=22))
    assert ks.drain_drops().overflow == {} and ks.drain_drops().overflow == {}   # slots were zeroed


def test_conntrack_scan_expires_idle_entries_and_reports_long_lived_ones(kernel):
    ks, dp, _ = kernel
    t0 = future_test_clock(10_000)
    at = 10 * 10**9
    dp.set_config(test_now_ns=t0)
    assert ks.now_ns() == t0
    xdp(dp, udp_in())                                  # UDP flow, never answered: unconfirmed, 10 s
    xdp(dp, tcp_in(src="10.0.0.8"))                    # TCP flow, confirmed by its ACK: 5 days
    egress(dp, tcp_out("SA", dst="10.0.0.8"))
    xdp(dp, tcp_in(src="10.0.0.8", flags="A"))
    first = ks.scan_conntrack(t0 + 10**9, at)
    assert (first.scanned, first.expired, first.updates) == (2, 0, 0)
    dp.set_config(test_now_ns=t0 + 12 * 10**9)
    xdp(dp, tcp_in(src="10.0.0.8", flags="A"))        # activity after the first 10 s boundary
    s = ks.scan_conntrack(t0 + 15 * 10**9, at)         # UDP idle 15 s > 10 s
    assert (s.expired, s.updates, s.ended) == (1, 1, 0)
    gone = s.families[0]
    assert gone.family == 4 and int(gone.update_keys["proto"][0]) == 6
    assert gone.update_entries["packets"][0].tolist() == [3, 1]
    assert int(gone.expired_keys["proto"][0]) == 17 and int(gone.expired_entries["last_ns"][0]) == t0
    assert int(gone.expired_entries["fin_seen"][0]) == 0            # the builder sees the entry as it was
    with conntrack.CtTable(ks.fds["hw_ct4"], 4) as table:
        left = table.slots[table.live()]                # claimed, not freed: until its end record is durable
        assert sorted(left["k"]["proto"].tolist()) == [6, 17]
        claimed = left[left["k"]["proto"] == 17]["e"]["fin_seen"][0]
        assert claimed & conntrack.CLAIM_BITS == conntrack.CLAIM_BITS
    assert ks.scan_conntrack(t0 + 32 * 10**9, at).expired == 0    # pending in this process: not again
    # a new collector (after a crash) finds the claim and reports the end again; then frees it
    ks2 = KernelSource(ks.pin_dir)
    try:
        again = ks2.scan_conntrack(t0 + 33 * 10**9, at)
        assert (again.expired, again.reclaimed) == (1, 1)
        assert ks2.free_claims(again.families[0]) == 1
    finally:
        ks2.close()
    assert ks.free_claims(gone) == 0                   # the slot is free already
    with conntrack.CtTable(ks.fds["hw_ct4"], 4) as table:
        assert table.slots[table.live()]["k"]["proto"].tolist() == [6]      # freed in the kernel; TCP stays
    assert ks.scan_conntrack(t0 + 34 * 10**9, at).expired == 0



def test_conntrack_scan_expires_a_single_exchange_udp_flow_sooner_than_a_stream(kernel):
    """The scan's timeouts are the datapath's (ct_scan.ct_timeout_ns against conntrack.h): a UDP query and
    its answer idle HW_CT_TO_UDP_UNASSURED, a flow with a packet after its first reply HW_CT_TO_UDP_REPLIED."""
    ks, dp, _ = kernel
    t0 = future_test_clock(10_000)
    dp.set_config(test_now_ns=t0)
    xdp(dp, udp_in(sport=6000))                                    # a lookup and its answer
    egress(dp, raw(E / IP(src=ME, dst="10.0.0.9") / UDP(sport=53, dport=6000)))
    for _ in range(2):                                             # a stream
        xdp(dp, udp_in(sport=6001))
        egress(dp, raw(E / IP(src=ME, dst="10.0.0.9") / UDP(sport=53, dport=6001)))
    idle = L.C["HW_CT_TO_UDP_UNASSURED"] * 10**9
    assert ks.scan_conntrack(t0 + idle - 10**9, 0).expired == 0
    s = ks.scan_conntrack(t0 + idle + 10**9, 0)
    assert s.expired == 1 and s.families[0].expired_keys["port_a"].tolist() + \
        s.families[0].expired_keys["port_b"].tolist() in ([6000, 53], [53, 6000])
    assert ks.free_claims(s.families[0]) == 1
    assert ks.scan_conntrack(t0 + L.C["HW_CT_TO_UDP_REPLIED"] * 10**9 - 10**9, 0).expired == 0
    assert ks.scan_conntrack(t0 + L.C["HW_CT_TO_UDP_REPLIED"] * 10**9 + 10**9, 0).expired == 1

def test_a_detach_ends_every_connection_still_tracked_once_through_the_claims(kernel, tmp_path, monkeypatch):
    """The enforcer's clean stop (control.detach) notes the detach time in hw_config before it unpins; a
    collector still holding the maps then claims every connection the datapath still tracked and had not
    reported: an established TCP one and an answered UDP flow end "detach", at the detach time; a UDP flow
    already idle past its timeout at the detach ends "idle_timeout" as always; a FIN close not yet quiet
    for its grace period is a close now (no packet can follow). Reported once; no updates."""
    from hostwall.bpf.clock import Clock
    from hostwall.bpf.state import InstanceState
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.records import RecordBuilder
    from hostwall.enforcer import control
    ks, dp, _ = kernel
    t0 = future_test_clock(20_000)
    dp.set_config(test_now_ns=t0)
    xdp(dp, udp_in(src="10.0.0.7"))                    # never answered: idle past 10 s at the detach
    dp.set_config(test_now_ns=t0 + 8 * 10**9)
    xdp(dp, tcp_in(src="10.0.0.8"))                    # established
    egress(dp, tcp_out("SA", dst="10.0.0.8"))
    xdp(dp, tcp_in(src="10.0.0.8", flags="A"))
    xdp(dp, udp_in(src="10.0.0.9"))                    # answered UDP
    egress(dp, raw(E / IP(src=ME, dst="10.0.0.9") / UDP(sport=53, dport=5000)))
    xdp(dp, tcp_in(src="10.0.0.6"))                    # closed by both FINs just before the detach
    egress(dp, tcp_out("SA", dst="10.0.0.6"))
    xdp(dp, tcp_in(src="10.0.0.6", flags="FA"))
    egress(dp, tcp_out("FA", dst="10.0.0.6"))
    at = 10 * 10**9
    before = ks.scan_conntrack(t0 + 9 * 10**9, at)
    assert (before.detached_ns, before.detached, before.expired, before.closed) == (0, 0, 0, 0)
    det = t0 + 12 * 10**9
    dp.set_config(test_now_ns=det)
    other = f"{ks.pin_dir}-stop"                       # the same maps pinned twice: detach one pin
    dp.pin(other)
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    InstanceState(pin_dir=other, build="live").save()   # an instance of no interface: all of them detached
    assert control.detach(other) == [] and not os.path.exists(other)
    assert ks.detached_ns() == det
    s = ks.scan_conntrack(det + 10**9, at)             # 1 s after the detach: no grace period wait
    assert (s.detached_ns, s.detached, s.expired, s.closed, s.updates) == (det, 2, 1, 1, 0)
    f = s.families[0]
    assert sorted(f.detached_keys["proto"].tolist()) == [6, 17]
    b = RecordBuilder(HostInfo("live", "b", str(ks.pin_dir)), None)
    recs = b.on_conntrack(f.expired_keys, f.expired_entries, None, Clock(0), (f.closed_keys, f.closed_entries),
                          (f.detached_keys, f.detached_entries, f.detached_ns))
    why = sorted((r["hostwall"]["flow"]["end_reason"], r["source"]["ip"]) for r in recs)
    assert why == [("detach", "10.0.0.8"), ("detach", "10.0.0.9"), ("fin", "10.0.0.6"), ("idle_timeout", "10.0.0.7")]
    for r in recs:
        if r["hostwall"]["flow"]["end_reason"] == "detach":
            assert r["event"]["duration"] == det - (t0 + 8 * 10**9)      # first packet → the detach
            assert r["event"]["end"] == r["hostwall"]["flow"]["end"] and r["event"]["reason"] == "datapath detached"
    again = ks.scan_conntrack(det + 2 * 10**9, at)     # pending in this process: not twice
    assert (again.detached, again.expired, again.closed, again.updates) == (0, 0, 0, 0)
    assert ks.free_claims(f) == 4                       # durable: idle and detach slots freed, the close marked
    later = ks.scan_conntrack(det + 3 * 10**9, at)
    assert (later.detached, later.expired, later.closed) == (0, 0, 0)


def test_a_detach_of_an_instance_without_state_notes_nothing(kernel, tmp_path, monkeypatch):
    """control.detach with no state file (another HOSTWALL_STATE_DIR, state lost) detached no interface:
    the programs may still run on these maps, so no detach is noted and no live connection is ended."""
    from hostwall.enforcer import control
    ks, dp, _ = kernel
    t0 = future_test_clock(20_000)
    dp.set_config(test_now_ns=t0)
    xdp(dp, tcp_in(src="10.0.0.8"))
    egress(dp, tcp_out("SA", dst="10.0.0.8"))
    other = f"{ks.pin_dir}-nostate"
    dp.pin(other)
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    assert control.detach(other) == [] and not os.path.exists(other)
    assert ks.detached_ns() == 0
    s = ks.scan_conntrack(t0 + 10**9, 10 * 10**9)
    assert (s.detached_ns, s.detached, s.expired) == (0, 0, 0)


def test_a_stale_detach_note_on_a_datapath_that_still_sees_packets_is_ignored_and_counted(kernel):
    """A detach note with a tracked connection's packet after it (a note left by a kill between the note
    and the unpin, then adopted; a note on a datapath still attached elsewhere) is stale: the scan ends
    no live connection, counts the stale note, and the connection keeps passing (its slot not freed)."""
    ks, dp, _ = kernel
    t0 = future_test_clock(20_000)
    dp.set_config(test_now_ns=t0)
    peer = "10.0.0.20"
    out = lambda fl: raw(E / IP(src=ME, dst=peer) / seg(40123, 443, fl))   # noqa: E731
    inn = lambda fl: raw(E / IP(src=peer, dst=ME) / seg(443, 40123, fl))   # noqa: E731
    egress(dp, out("S"))
    xdp(dp, inn("SA"))
    egress(dp, out("A"))
    dp.set_config(test_now_ns=t0 + 2 * 10**9, detached_ns=t0 + 10**9)      # the note, then a packet
    assert xdp(dp, inn("A")) == 2                                         # XDP_PASS: tracked
    s = ks.scan_conntrack(t0 + 3 * 10**9, 10 * 10**9)
    assert (s.detached_ns, s.detached, s.expired, s.closed, s.stale_detach) == (0, 0, 0, 0, 1)
    assert ks.free_claims(s.families[0]) == 0
    dp.set_config(test_now_ns=t0 + 4 * 10**9)
    assert xdp(dp, inn("A")) == 2                                         # still tracked, not dropped
    again = ks.scan_conntrack(t0 + 5 * 10**9, 10 * 10**9)
    assert (again.detached, again.stale_detach) == (0, 1)


def test_conntrack_scan_aggregates_connections_that_ended_unconfirmed(kernel):
    """A connection whose start waited for confirmation (PENDING: the budget was at its reserve) and
    that expired unconfirmed is not a flow end of its own: the scan returns it for a flow summary."""
    from hostwall.collector import flow_summary
    from hostwall.collector.records import RecordBuilder
    from tests.collector.test_records import CLOCK, HOST, validator
    ks, dp, _ = kernel
    t0 = future_test_clock(20_000)
    dp.set_config(test_now_ns=t0)
    ks.set_event_budget(dp.ncpus)                      # 1 event/s per CPU: never above the reserve
    try:
        for sport in (5001, 5002):
            xdp(dp, udp_in(sport=sport))
    finally:
        ks.set_event_budget(L.C["HW_EVENT_BUDGET"])
        # the budget buckets last saw this test's clock, ahead of the real one: let them start full again
        zero = bytes(L.DTYPES["hw_ev_budget"].itemsize * dp.ncpus)
        bpfsys.map_update(dp.map_fds["hw_ev_budget"], b"\0" * 4, zero)
    s = ks.scan_conntrack(t0 + 11 * 10**9, 10**12)
    fam = s.families[0]
    assert len(fam.expired_keys) == 0 and len(fam.agg_keys) == 2 and s.expired == 2
    recs = flow_summary.from_scan(RecordBuilder(HOST, None), fam.agg_keys, fam.agg_entries, 24, 64,
                                  CLOCK.wall_ns(t0), CLOCK.wall_ns(t0 + 11 * 10**9), CLOCK)
    assert len(recs) == 1
    r = recs[0]
    assert r["hostwall"]["summary"] == {"kind": "unconfirmed", "flows": 2, "ended": 2, "origin": "conntrack_scan"}
    assert r["source"]["address"].endswith("/24") and r["destination"]["port"] == 53
    assert not list(validator("flow.schema.json").iter_errors(r))


def test_a_fin_closed_connection_is_reported_after_its_grace_with_its_last_ack_and_precise_times(kernel):
    """Counts equal a capture: the last ACK after both FINs belongs to the flow. The datapath does not
    report a FIN close itself; the scan reports it once the connection has been quiet for the grace
    period, marks it reported (no second report, late packets still pass), with the first and last
    packets on the precise clock (not the 4 ms tick) and IP-layer bytes."""
    from hostwall.bpf.clock import Clock
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.records import RecordBuilder
    ks, dp, _ = kernel
    dp.clear_conntrack()
    with ks.ring() as rb:
        rb.read()
        t_open = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        xdp(dp, tcp_in(sport=41000))                                      # SYN      (client →)
        t_opened = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        egress(dp, tcp_out("SA", dport=41000))                            # SYN-ACK  (← server)
        xdp(dp, raw(E / IP(src="10.0.0.9", dst=ME) / seg(41000, 80, "PA") / (b"x" * 100)))
        egress(dp, tcp_out("FA", dport=41000))                            # server FIN
        xdp(dp, tcp_in(sport=41000, flags="FA", seq=101))                 # client FIN: both FINs seen
        time.sleep(0.01)                                                  # the last ACK, 10 ms later
        t_last = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        xdp(dp, tcp_in(sport=41000, flags="A"))
        t_lasted = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        types = Counter(L.EVENT_TYPE_NAMES[int(t)] for t in rb.read().records["type"])
    assert types == {"flow_start": 1}, types                             # no flow_end at the FINs
    now = ks.now_ns()
    assert ks.scan_conntrack(now, 60 * 10**9, 2 * 10**9).closed == 0     # not quiet long enough yet
    s = ks.scan_conntrack(now + 3 * 10**9, 60 * 10**9, 2 * 10**9)
    assert s.closed == 1 and s.expired == 0
    f = s.families[0]
    e = f.closed_entries[0]
    assert e["packets"].tolist() == [4, 2]                               # SYN, data, FIN, last ACK / SYN-ACK, FIN
    assert e["bytes"].tolist() == [40 + 140 + 40 + 40, 40 + 40]          # IP-layer: 20 + 20 + payload
    assert t_open <= int(e["created_ns"]) <= t_opened                   # precise: within the call
    assert t_last <= int(e["end_ns"]) <= t_lasted
    assert ks.scan_conntrack(now + 4 * 10**9, 60 * 10**9, 2 * 10**9).closed == 0    # reported once
    assert xdp(dp, tcp_in(sport=41000, flags="A")) == 2                  # a late packet still passes (XDP_PASS)
    b = RecordBuilder(HostInfo("live", "b", str(ks.pin_dir)), None)
    [r] = b.on_conntrack(f.expired_keys, f.expired_entries, None, Clock(0), (f.closed_keys, f.closed_entries))
    assert r["hostwall"]["flow"]["end_reason"] == "fin" and (r["source"]["packets"], r["destination"]["packets"]) == (4, 2)
    assert r["event"]["duration"] == int(e["end_ns"]) - int(e["created_ns"]) >= 10**7
    dp.clear_conntrack()


def test_a_fin_close_in_aggregate_ends_in_a_scan_summary_after_its_grace(kernel):
    """A connection reported in aggregate (no room in the event budget: its start was counted in kind
    over_budget) and closed by both FINs is the scan's too: after the grace period its end, last ACK
    included, goes to a flow summary (not a flow record), and it is marked reported (counted once)."""
    from hostwall.collector import flow_summary
    from hostwall.collector.records import RecordBuilder
    from tests.collector.test_records import CLOCK, HOST, validator
    ks, dp, _ = kernel
    dp.clear_conntrack()
    ks.set_event_budget(0)                             # no events at all: every start is aggregated
    try:
        xdp(dp, tcp_in(sport=41100))                   # SYN: its start waits (pending)
        egress(dp, tcp_out("SA", dport=41100))
        xdp(dp, tcp_in(sport=41100, flags="A"))        # confirmed: no room, so over_budget
        egress(dp, tcp_out("FA", dport=41100))
        xdp(dp, tcp_in(sport=41100, flags="FA"))
        xdp(dp, tcp_in(sport=41100, flags="A"))        # the last ACK
    finally:
        ks.set_event_budget(L.C["HW_EVENT_BUDGET"])
    now = ks.now_ns()
    s = ks.scan_conntrack(now + 3 * 10**9, 60 * 10**9, 2 * 10**9)
    f = s.families[0]
    assert (s.closed, s.expired, len(f.closed_keys), len(f.agg_keys), f.agg_closed) == (1, 0, 0, 1, 1)
    assert int(f.agg_entries[0]["report"]) == L.C["HW_REP_AGG_BUDGET"]
    assert ks.scan_conntrack(now + 4 * 10**9, 60 * 10**9, 2 * 10**9).closed == 0      # reported once
    [r] = flow_summary.from_scan(RecordBuilder(HOST, None), f.agg_keys, f.agg_entries, 24, 64,
                                 CLOCK.wall_ns(now), CLOCK.wall_ns(now + 3 * 10**9), CLOCK)
    assert r["hostwall"]["summary"] == {"kind": "over_budget", "flows": 0, "ended": 1, "origin": "conntrack_scan"}
    assert r["network"]["packets"] == 6 and r["source"]["address"] == "10.0.0.0/24"   # 4 in, 2 out
    assert not list(validator("flow.schema.json").iter_errors(r))
    dp.clear_conntrack()


def closed_by_fins(dp, sport: int) -> None:
    """A connection to port 80 from `sport`: SYN, SYN-ACK, the host's FIN, the client's, the last ACK."""
    xdp(dp, tcp_in(sport=sport))
    egress(dp, tcp_out("SA", dport=sport))
    egress(dp, tcp_out("FA", dport=sport))
    xdp(dp, tcp_in(sport=sport, flags="FA"))
    xdp(dp, tcp_in(sport=sport, flags="A"))


def test_a_close_is_claimed_until_durable_and_a_crash_reports_it_again_with_the_same_id(kernel):
    """The close grace period's report is released like every other (docs/collector.md "Delivery and
    loss"): the scan claims the closed connection (`reported` = REPORTED_CLAIMED: the datapath treats it
    as reported), free_claims() marks it durable; a collector that died in between leaves the claim, and
    the next one reports the close again with the same event.id, even after a late packet."""
    from hostwall.bpf.clock import Clock
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.records import RecordBuilder
    ks, dp, _ = kernel
    dp.clear_conntrack()
    closed_by_fins(dp, 42000)
    grace, at = 2 * 10**9, 60 * 10**9

    def reported() -> list[int]:
        with conntrack.CtTable(ks.fds["hw_ct4"], 4) as table:
            return table.slots[table.live()]["e"]["reported"].tolist()

    def record(scan) -> dict:
        f = scan.families[0]
        b = RecordBuilder(HostInfo("live", "b", str(ks.pin_dir)), None)
        [r] = b.on_conntrack(f.expired_keys, f.expired_entries, None, Clock(0), (f.closed_keys, f.closed_entries))
        return r

    now = ks.now_ns() + 3 * 10**9
    first = ks.scan_conntrack(now, at, grace)
    assert first.closed == 1 and reported() == [conntrack.REPORTED_CLAIMED]
    rec = record(first)
    assert ks.scan_conntrack(now + 10**9, at, grace).closed == 0          # pending here: not twice
    assert xdp(dp, tcp_in(sport=42000, flags="A")) == 2                   # a late packet after the claim
    crashed = KernelSource(ks.pin_dir)                                    # the next collector, after a crash
    try:
        again = crashed.scan_conntrack(now + 2 * 10**9, at, grace)
        assert (again.closed, again.reclaimed) == (1, 1)
        assert again.families[0].closed_entries["packets"][0].tolist() == [4, 2]    # the late packet counted
        assert record(again)["event"]["id"] == rec["event"]["id"]          # a duplicate, deduplicated downstream
        assert crashed.free_claims(again.families[0]) == 1                  # durable: reported for good
        assert reported() == [conntrack.REPORTED_DURABLE]
    finally:
        crashed.close()
    assert ks.free_claims(first.families[0]) == 0                        # released already
    nxt = KernelSource(ks.pin_dir)
    try:
        assert nxt.scan_conntrack(now + 3 * 10**9, at, grace).closed == 0   # durable: never again
        fin_to = L.C["HW_CT_TO_FIN"] * 10**9
        gone = nxt.scan_conntrack(now + fin_to + 10 * 10**9, at, grace)     # its FIN timeout: freed, not listed
        assert (gone.closed, gone.expired, gone.ended) == (0, 0, 1) and reported() == []
    finally:
        nxt.close()


def ct4_entry(ks) -> np.void:
    """The one live hw_ct4 entry."""
    with conntrack.CtTable(ks.fds["hw_ct4"], 4) as table:
        [e] = table.slots[table.live()]["e"]
        return e.copy()


def test_a_slot_renewed_for_a_reused_tuple_is_a_new_generation_to_the_scan(kernel):
    """An established connection, then the host's SYN-ACK to a new SYN on its tuple (docs/datapath.md
    "Reused tuples"): the datapath reports the old end once (end_cause reused, at its last packet); the
    slot holds the new connection with a new created_ns and its marks reset, so the scan reports nothing
    for it (neither closed nor expired) and its start comes at its ACK."""
    ks, dp, _ = kernel
    dp.clear_conntrack()
    xdp(dp, tcp_in(sport=43000))
    egress(dp, tcp_out("SA", dport=43000))
    xdp(dp, tcp_in(sport=43000, flags="A"))
    old = ct4_entry(ks)
    assert L.CT_STATE_NAMES[int(old["state"])] == "established"
    with ks.ring() as rb:
        rb.read()
        assert xdp(dp, tcp_in(sport=43000, seq=7_000_000)) == 2           # XDP_PASS: out of window, unchanged
        new_syn_ack = raw(E / IP(src=ME, dst="10.0.0.9") / TCP(sport=80, dport=43000, flags="SA", seq=5_000_000,
                                                               ack=7_000_001))
        assert egress(dp, new_syn_ack) == 0                               # TC_ACT_OK
        [end] = rb.read().records
        assert (L.EVENT_TYPE_NAMES[int(end["type"])], L.CT_END_CAUSE_NAMES[int(end["end_cause"])]) == \
            ("flow_end", "reused")
        assert (int(end["start_ns"]), int(end["ts_ns"])) == (int(old["created_ns"]), int(old["end_ns"]))
        e = ct4_entry(ks)
        assert (L.CT_STATE_NAMES[int(e["state"])], int(e["reported"]), int(e["fin_seen"])) == ("syn_recv", 0, 0)
        assert int(e["created_ns"]) > int(old["created_ns"]) and e["packets"].tolist() == [0, 1]
        scan = ks.scan_conntrack(ks.now_ns() + 3 * 10**9, 60 * 10**9, 2 * 10**9)
        assert (scan.closed, scan.expired, scan.reclaimed) == (0, 0, 0)
        ack = raw(E / IP(src="10.0.0.9", dst=ME) / TCP(sport=43000, dport=80, flags="A", seq=7_000_001, ack=5_000_001))
        assert xdp(dp, ack) == 2                                          # XDP_PASS: confirmed
        [start] = [r for r in rb.read().records if L.EVENT_TYPE_NAMES[int(r["type"])] == "flow_start"]
    assert int(start["start_ns"]) == int(e["created_ns"])
    assert L.CT_STATE_NAMES[int(ct4_entry(ks)["state"])] == "established"
    dp.clear_conntrack()


def test_a_syn_ack_on_a_claimed_close_renews_nothing(kernel):
    """A connection closed by FINs whose close the scan claimed (`reported` 2), then a SYN-ACK of the host
    to a SYN the entry does not know: only an established entry is renewed (docs/datapath.md "Reused
    tuples"; a new SYN on a closing tuple is judged afresh), so the entry and its claim stay, the claim
    is released onto the same connection, and no second end is reported."""
    ks, dp, _ = kernel
    dp.clear_conntrack()
    closed_by_fins(dp, 43000)
    first = ks.scan_conntrack(ks.now_ns() + 3 * 10**9, 60 * 10**9, 2 * 10**9)
    old = ct4_entry(ks)
    assert first.closed == 1 and int(old["reported"]) == conntrack.REPORTED_CLAIMED
    with ks.ring() as rb:
        rb.read()
        new_syn_ack = raw(E / IP(src=ME, dst="10.0.0.9") / TCP(sport=80, dport=43000, flags="SA", seq=5_000_000,
                                                               ack=7_000_001))
        assert egress(dp, new_syn_ack) == 0                               # TC_ACT_OK: out of window
        assert list(rb.read().records["type"]) == []
    e = ct4_entry(ks)
    assert (L.CT_STATE_NAMES[int(e["state"])], int(e["created_ns"]), e["packets"].tolist()) == \
        ("closing", int(old["created_ns"]), old["packets"].tolist())
    assert ks.free_claims(first.families[0]) == 1
    assert int(ct4_entry(ks)["reported"]) == conntrack.REPORTED_DURABLE
    dp.clear_conntrack()


def test_event_budget_losses_are_counted_by_type(kernel):
    ks, dp, _ = kernel
    before = ks.kernel_loss()["deny"]
    ks.set_event_budget(0)                             # no events at all: every one is over budget
    for i in range(3):
        xdp(dp, tcp_in(src=f"198.51.{i}.7", dport=22))  # three keys → three deny events wanted
    after = ks.kernel_loss()["deny"]
    assert after["budget"] - before["budget"] == 3 and after["emitted"] == before["emitted"]
    with ks.ring() as rb:
        assert rb.available_bytes() == 0
    assert int(ks.knobs()["event_budget"]) == 0


def test_pipeline_end_to_end_on_the_real_kernel(kernel, tmp_path):
    """Service wiring on the real maps: ring events and drop summaries reach a JSONL file; summary
    packets equal the kernel's drop counters; the ledger balances with nothing in flight."""
    import uvloop

    from hostwall.collector.accounting import Ledger
    from hostwall.collector.config import CollectorConfig, QueueSizes
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.pipeline import Pipeline
    from hostwall.collector.records import RecordBuilder
    from hostwall.collector.sinks.jsonl import JsonlSink

    ks, dp, _ = kernel
    out = tmp_path / "flows.jsonl"
    sink = JsonlSink(out, fsync="none")
    ledger = Ledger([sink.name])
    cfg = CollectorConfig(pin_dir=str(ks.pin_dir), drop_interval_s=0.1, ct_scan_interval_s=0.5,
                          status_interval_s=0.2, status_file=str(tmp_path / "status.json"),
                          queues=QueueSizes(events=8, sink=10000, batch=512), event_budget=5000, drop_prefix_v4=16)
    builder = RecordBuilder(HostInfo(hostname="live", boot_id="b", pin_dir=str(ks.pin_dir)), None, ledger)
    pipe = Pipeline(cfg, ks, builder, [sink], ledger=ledger, close_source=False)
    before = ks.drop_counters()
    ev_before = emitted(ks)

    async def go():
        task = asyncio.ensure_future(pipe.run())
        while pipe.state != "running":
            await asyncio.sleep(0.01)
        for i in range(50):
            xdp(dp, tcp_in(src=f"198.51.100.{i}", sport=2000 + i, dport=22))
            xdp(dp, tcp_in(src="203.0.113.5", sport=2000 + i, dport=8080))
        xdp(dp, tcp_in(src="10.0.0.7", sport=45000))                     # flow start
        await asyncio.sleep(0.5)
        pipe.stop()
        await task
    uvloop.run(go())
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    kinds = Counter(r["hostwall"]["kind"] for r in recs)
    evs = emitted(ks) - ev_before
    assert kinds["deny"] == evs["deny"] == 2 and kinds["flow"] == evs["flow_start"] == 1
    summed = sum(r["network"]["packets"] for r in recs if r["hostwall"]["kind"] == "drop_summary")
    assert summed == int((ks.drop_counters() - before).sum()) == 100
    assert {r["hostwall"]["source"]["prefix"] for r in recs if r["hostwall"]["kind"] == "drop_summary"} == {
        "198.51.0.0/16", "203.0.0.0/16"}                 # the configured prefix reached the kernel
    assert int(ks.knobs()["event_budget"]) == 5000
    assert ledger.check(quiescent=True) == [] and ledger.lost_upstream == 0
    st = json.loads((tmp_path / "status.json").read_text())
    assert st["state"] == "stopped" and st["ledger"]["ok"]
    assert st["ring"]["backlog_bytes"] == 0 and st["ring"]["records_read"] == evs["deny"] + evs["flow_start"]


def test_cli_run_status_and_sigterm(kernel, tmp_path):
    """`hostwall-collector run` as an operator starts it: banner, records, `status --json`, SIGTERM."""
    import signal
    import subprocess
    import sys

    ks, dp, _ = kernel
    repo = str(L.HEADER.parent.parent)
    env = dict(os.environ, HOSTWALL_STATE_DIR=str(tmp_path / "state"), PYTHONPATH=repo)
    out = tmp_path / "flows.jsonl"
    cli = [sys.executable, "-m", "hostwall.collector.cli"]
    p = subprocess.Popen(cli + ["run", "--pin-dir", str(ks.pin_dir), "--sink", f"jsonl:{out}"], env=env, cwd=repo,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = p.stdout.readline()
        assert "collecting from" in banner, banner + p.stderr.read()[-2000:]
        for i in range(10):
            xdp(dp, tcp_in(src=f"198.51.{100 + i}.1", dport=22))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = subprocess.run(cli + ["status", "--json", "--pin-dir", str(ks.pin_dir)], env=env, cwd=repo,
                               capture_output=True, text=True, timeout=30)
            st = json.loads(r.stdout) if r.returncode == 0 else {}
            if st.get("ledger", {}).get("sinks", {}).get(f"jsonl:{out}", {}).get("delivered", 0) >= 20:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"records did not arrive: {st}")
        assert st["alive"] and st["state"] == "running" and st["ledger"]["ok"]
        p.send_signal(signal.SIGTERM)
        rest, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err[-2000:]
    assert "produced 20 = delivered 20 + lost 0 + in flight 0 ok" in rest
    kinds = Counter(json.loads(x)["hostwall"]["kind"] for x in out.read_text().splitlines())
    assert kinds == {"deny": 10, "drop_summary": 10}
