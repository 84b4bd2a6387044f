"""Bounded flow reports under a flood (bpf/report.h; docs/collector.md, "Flows under a flood"), through
test-run with an injected clock: an unconfirmed connection's start waits for its confirmation when the
budget is down to its reserve; one that ends unconfirmed, and the flows of a source over its share, are
counted in the flow aggregation instead of events; a start that finds the ring buffer full is aggregated,
not lost; the drained aggregation adds up exactly to the kernel's counters."""
from __future__ import annotations

import os

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from hostwall.bpf import bpfsys, flow_agg
from hostwall.bpf import layout as L

from .test_events import set_collect

pytestmark = pytest.mark.bpf

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
T0 = 20_000_000_000_000
NS = 1_000_000_000
POLICY = """
version: 1
name: reports
defaults: {ingress: allow, egress: allow, stateful: true}
"""


def tcp_in(src="10.9.0.1", sport=40000, flags="S", dport=80):
    seq = 1 if "R" in flags else 0      # a RST after the initiator's SYN (seq 0) is at its next sequence number
    ack = 1 if "A" in flags else 0      # an ACK acknowledges the SYN-ACK (seq 0): docs/datapath.md "Sequence checks"
    return raw(E / IP(src=src, dst="10.0.0.1") / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack))


def tcp_out(flags, src="10.9.0.1", sport=40000):
    """The host's segment: its SYN-ACK (seq 0) acknowledges the SYN (seq 0), its RST follows the SYN-ACK."""
    seq, ack = (1 if "R" in flags else 0), (1 if "A" in flags else 0)
    return raw(E / IP(src="10.0.0.1", dst=src) / TCP(sport=80, dport=sport, flags=flags, seq=seq, ack=ack))


def outcomes(dp, etype: str) -> dict[str, int]:
    n = L.C["HW_EV_OUTCOMES"]
    t = {v: k for k, v in L.EVENT_TYPE_NAMES.items()}[etype]
    raw_ = bpfsys.array_slots(dp.map_fds["hw_ev_stats"], t * n, n, 16 * dp.ncpus)
    pk = np.frombuffer(raw_, dtype=L.DTYPES["hw_counter"])["packets"].reshape(n, dp.ncpus).sum(axis=1)
    return {L.EV_OUTCOME_NAMES[o]: int(pk[o]) for o in range(n)}


def delta(after: dict, before: dict) -> dict:
    return {k: (delta(v, before[k]) if isinstance(v, dict) else v - before[k]) for k, v in after.items()}


def drain(dp) -> flow_agg.FlowDrain:
    """Flip the aggregation generation (drops and flows together), wait for readers, drain the old one."""
    old = int(set_collect(dp)["agg_gen"]) & 1
    set_collect(dp, agg_gen=old ^ 1)
    bar = bpfsys.RcuBarrier()
    bar.wait()
    bar.close()
    return flow_agg.drain(dp.map_fds, old, dp.ncpus)


@pytest.fixture
def one_cpu():
    """Each CPU has its own budget bucket: run the test's packets on one."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    yield
    os.sched_setaffinity(0, cpus)


@pytest.fixture
def reports(harness, events, one_cpu):
    harness.install(POLICY)
    harness.dp.set_config(test_now_ns=T0)
    drain(harness.dp)
    drain(harness.dp)
    yield harness
    set_collect(harness.dp, event_budget=L.C["HW_EVENT_BUDGET"], source_share=L.C["HW_EVENT_BUDGET"] // 10)


def run(h, hook, frame, now=None):
    if now is not None:
        h.dp.set_config(test_now_ns=now)
    return h.run(hook, frame)


def test_unconfirmed_start_waits_for_confirmation_then_is_reported(reports, events):
    h = reports
    # one event a second per CPU: the bucket (50 ms + 1) never holds its reserve for a new connection
    set_collect(h.dp, event_budget=h.dp.ncpus)
    run(h, "xdp", tcp_in(), T0 + 5 * NS)                  # a full bucket, yet the start waits
    run(h, "tc_egress", tcp_out("SA"))
    assert events.drain() == []
    run(h, "xdp", tcp_in(flags="A"), T0 + 5 * NS + 2_000_000)   # the handshake completes: confirmed
    evs = events.drain()
    assert [L.EVENT_TYPE_NAMES[int(e["type"])] for e in evs] == ["flow_start"]
    start = evs[0]
    assert int(start["ts_ns"]) == int(start["start_ns"]) == T0 + 5 * NS   # stamped with the first packet
    assert bytes(start["saddr"][:4]) == bytes([10, 9, 0, 1]) and int(start["sport"]) == 40000
    assert L.CT_STATE_NAMES[int(start["ct_state"])] == "established"
    run(h, "tc_egress", tcp_out("R"), T0 + 7 * NS)        # a second later: a token for its end
    assert [L.EVENT_TYPE_NAMES[int(e["type"])] for e in events.drain()] == ["flow_end"]


def test_connection_ending_unconfirmed_is_aggregated(reports, events):
    h = reports
    set_collect(h.dp, event_budget=h.dp.ncpus)
    s0, st0, en0 = flow_agg.stats(h.dp.map_fds, h.dp.ncpus), outcomes(h.dp, "flow_start"), outcomes(h.dp, "flow_end")
    run(h, "xdp", tcp_in(sport=41000), T0 + 5 * NS)       # waits
    run(h, "xdp", tcp_in(sport=41000, flags="R"))          # refused by its own initiator: ends unconfirmed
    assert events.drain() == []
    got = delta(flow_agg.stats(h.dp.map_fds, h.dp.ncpus), s0)["unconfirmed"]
    assert got == {"flows": 1, "ended": 1, "packets": 2, "bytes": 2 * (len(tcp_in()) - 14)}    # IP-layer bytes
    assert delta(outcomes(h.dp, "flow_start"), st0)["aggregated"] == 1
    assert delta(outcomes(h.dp, "flow_end"), en0)["aggregated"] == 1
    d = drain(h.dp)
    assert d.totals()["unconfirmed"] == got
    k = d.keys[d.keys["kind"] == L.C["HW_AGG_UNCONFIRMED"]][0]
    assert bytes(k["peer"][:4]) == bytes([10, 9, 0, 0]) and int(k["prefix_len"]) == 24 and int(k["dport"]) == 80


def test_source_over_its_share_is_aggregated_others_keep_their_events(reports, events):
    h = reports
    set_collect(h.dp, source_share=3)
    s0 = flow_agg.stats(h.dp.map_fds, h.dp.ncpus)
    for i in range(5):                                    # the flooder: 5 flows, a share of 3
        run(h, "xdp", tcp_in(src="10.9.1.1", sport=42000 + i), T0 + 10 * NS)
    run(h, "xdp", tcp_in(src="10.9.2.2", sport=42100))    # another source keeps its own records
    evs = events.drain()
    assert sorted((bytes(e["saddr"][:4])[3], int(e["sport"])) for e in evs) == \
        [(1, 42000), (1, 42001), (1, 42002), (2, 42100)]
    for i in range(5):                                    # their ends follow their starts' way
        run(h, "xdp", tcp_in(src="10.9.1.1", sport=42000 + i, flags="R"))
    ends = [int(e["sport"]) for e in events.drain() if L.EVENT_TYPE_NAMES[int(e["type"])] == "flow_end"]
    assert sorted(ends) == [42000, 42001, 42002]
    got = delta(flow_agg.stats(h.dp.map_fds, h.dp.ncpus), s0)["over_share"]
    assert (got["flows"], got["ended"], got["packets"]) == (2, 2, 4)
    assert drain(h.dp).totals()["over_share"] == got
    # the share refills: a second later the flooder has 3 events again
    run(h, "xdp", tcp_in(src="10.9.1.1", sport=42010), T0 + 11 * NS)
    assert len(events.drain()) == 1


def test_start_that_finds_the_ring_full_is_aggregated_not_lost(reports, events):
    h = reports
    set_collect(h.dp, event_budget=10**9)
    dp = h.dp
    ring_events = L.C["HW_RINGBUF_BYTES"] // (L.DTYPES["hw_event"].itemsize + 8)
    frame = bytearray(raw(E / IP(src="10.10.0.1", dst="10.0.0.1") / UDP(sport=1, dport=53)))
    st0, s0 = outcomes(dp, "flow_start"), flow_agg.stats(dp.map_fds, dp.ncpus)
    n = ring_events + 500
    for i in range(n):                                    # nobody reads the ring meanwhile
        dp.set_config(test_now_ns=T0 + 100 * NS + i * 1000) if i % 4096 == 0 else None
        frame[34:36] = (1024 + i % 60000).to_bytes(2, "big")
        frame[26:30] = bytes([10, 10, (i >> 8) & 0xff, i & 0xff])
        bpfsys.prog_test_run(dp.prog_fds["xdp_ingress"], bytes(frame))
    got = delta(outcomes(dp, "flow_start"), st0)
    agg = delta(flow_agg.stats(dp.map_fds, dp.ncpus), s0)["over_budget"]["flows"]
    assert got["ringbuf_full"] == got["budget"] == 0
    assert got["aggregated"] == agg >= 400 and got["emitted"] + got["aggregated"] == n
    events.drain()


def test_aggregation_overflow_is_counted_and_adds_up(reports, events):
    """More keys than the aggregation map holds: the rest goes to the counted overflow slots, and
    summaries + overflow equal the counters."""
    h = reports
    dp = h.dp
    set_collect(dp, source_share=1, agg_prefix_v4=32, event_budget=10**9)
    try:
        s0 = flow_agg.stats(dp.map_fds, dp.ncpus)
        n = L.C["HW_FLOW_AGG_MAX"] + 200
        frame = bytearray(raw(E / IP(src="11.0.0.0", dst="10.0.0.1") / UDP(sport=7, dport=53)))
        dp.set_config(test_now_ns=T0 + 200 * NS)
        base = int.from_bytes(bytes([11, 0, 0, 0]), "big")
        for i in range(n):                                # each source: 1 event, then aggregated
            frame[26:30] = (base + i).to_bytes(4, "big")
            for sport in (7, 8):
                frame[34:36] = sport.to_bytes(2, "big")
                bpfsys.prog_test_run(dp.prog_fds["xdp_ingress"], bytes(frame))
        d = drain(dp)
        got = delta(flow_agg.stats(dp.map_fds, dp.ncpus), s0)["over_share"]
        assert len(d.keys) == L.C["HW_FLOW_AGG_MAX"] and L.C["HW_AGG_OVER_SHARE"] in d.overflow
        assert d.totals()["over_share"] == got and got["flows"] == n
    finally:
        set_collect(dp, agg_prefix_v4=24)
        events.drain()
