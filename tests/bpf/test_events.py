"""Kernel reporting: flow/deny/log events into the ring buffer within budget, and drop aggregation
that adds up exactly to the drop counters (docs/collector.md "Delivery and loss")."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L

pytestmark = pytest.mark.bpf

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
POLICY = """
version: 1
name: ev
defaults: {ingress: deny, egress: allow}
rules:
  - {name: web, priority: 1, direction: ingress, action: allow, protocol: tcp, ports: [80]}
  - {name: audit-me, priority: 2, direction: ingress, action: log, protocol: udp, ports: [514]}
  - {name: bad, priority: 3, direction: ingress, action: deny, peers: [198.51.100.0/24]}
"""


def syn(src="10.0.0.9", sport=40000, dport=80, flags="S"):
    """The peer's segment (seq 0); with ACK it acknowledges the host's SYN-ACK (seq 0)."""
    ack = 1 if "A" in flags else 0
    return raw(E / IP(src=src, dst="10.0.0.1") / TCP(sport=sport, dport=dport, flags=flags, ack=ack))


def reply(flags, src="10.0.0.9", sport=40000):
    """The host's segment: a SYN-ACK (seq 0) acknowledges the SYN, a RST follows the SYN-ACK (seq 1)."""
    seq, ack = (1 if "R" in flags else 0), (1 if "A" in flags else 0)
    return raw(E / IP(src="10.0.0.1", dst=src) / TCP(sport=80, dport=sport, flags=flags, seq=seq, ack=ack))


def set_collect(dp, **kw):
    raw_ = bpfsys.map_lookup(dp.map_fds["hw_collect"], b"\0" * 4, L.DTYPES["hw_collect"].itemsize)
    col = np.frombuffer(raw_, dtype=L.DTYPES["hw_collect"]).copy()
    for k, v in kw.items():
        col[k] = v
    bpfsys.map_update(dp.map_fds["hw_collect"], b"\0" * 4, col.tobytes())
    return col[0]


def drain_drops(dp) -> tuple[np.ndarray, np.ndarray, dict]:
    """Flip the aggregation generation, wait for readers, read+delete the old map (summed over CPUs)."""
    old = int(set_collect(dp)["agg_gen"]) & 1
    set_collect(dp, agg_gen=old ^ 1)
    bar = bpfsys.RcuBarrier()
    bar.wait()
    bar.close()
    fd = dp.map_fds[f"hw_drops{old}"]
    kdt, vdt = L.DTYPES["hw_drop_key"], L.DTYPES["hw_drop_val"]
    keys, vals = [], []
    for k in list(bpfsys.map_keys(fd, kdt.itemsize)):
        v = np.frombuffer(bpfsys.map_lookup(fd, k, vdt.itemsize * dp.ncpus), dtype=vdt)
        keys.append(np.frombuffer(k, dtype=kdt)[0])
        vals.append((v["packets"].sum(), v["bytes"].sum()))
        bpfsys.map_delete(fd, k)
    ov = {}
    ofd = dp.map_fds["hw_drop_overflow"]
    stride = L.DTYPES["hw_counter"].itemsize
    for verdict in (1, 2):
        for reason in range(L.REASONS):
            idx = (old * L.VERDICTS + verdict) * L.REASONS + reason
            v = np.frombuffer(bpfsys.map_lookup(ofd, idx.to_bytes(4, "little"), stride * dp.ncpus), dtype=L.DTYPES["hw_counter"])
            if v["packets"].sum():
                ov[(verdict, reason)] = int(v["packets"].sum())
                bpfsys.map_update(ofd, idx.to_bytes(4, "little"), bytes(stride * dp.ncpus))
    return np.array(keys, dtype=kdt), np.array(vals, dtype=np.uint64).reshape(-1, 2), ov


def test_flow_start_and_end_events(harness, events):
    harness.install(POLICY)
    harness.run("xdp", syn())
    harness.run("tc_egress", reply("SA"))
    harness.run("xdp", syn(flags="A"))
    harness.run("tc_egress", reply("R"))
    evs = events.drain()
    types = [L.EVENT_TYPE_NAMES[int(e["type"])] for e in evs]
    assert types == ["flow_start", "flow_end"], types
    start, end = evs
    assert bytes(start["saddr"][:4]) == bytes([10, 0, 0, 9]) and int(start["dport"]) == 80
    assert int(start["rule_slot"]) == harness.slots["web"] and int(start["revision_id"]) == 1
    # the end is reported from the initiator's side, with both directions' totals
    assert bytes(end["saddr"][:4]) == bytes([10, 0, 0, 9]) and int(end["sport"]) == 40000
    assert end["packets"].tolist() == [2, 2]
    assert L.CT_STATE_NAMES[int(end["ct_state"])] == "closed"
    assert int(end["start_ns"]) <= int(end["ts_ns"])


def test_deny_event_once_per_key_and_interval_and_log_events(harness, events):
    harness.install(POLICY)
    for sport in range(5):
        harness.run("xdp", syn(src="198.51.100.7", sport=1000 + sport, dport=22))
    harness.run("xdp", raw(E / IP(src="10.0.0.9", dst="10.0.0.1") / UDP(sport=5, dport=514)))
    evs = events.drain()
    types = [L.EVENT_TYPE_NAMES[int(e["type"])] for e in evs]
    assert types.count("deny") == 1 and types.count("log") == 1, types
    deny = evs[types.index("deny")]
    assert L.REASON_NAMES[int(deny["reason"])] == "policy_deny" and int(deny["rule_slot"]) == harness.slots["bad"]
    drain_drops(harness.dp)                      # new interval: the same key reports again
    harness.run("xdp", syn(src="198.51.100.7", sport=2000, dport=22))
    assert [L.EVENT_TYPE_NAMES[int(e["type"])] for e in events.drain()] == ["deny"]


def test_event_budget_caps_the_ring_buffer_and_new_flows_wait_for_confirmation(harness, events):
    """2000 new connections in 2 s against a budget of 100 events/s: an unconfirmed connection's start
    may only use the budget above its reserve, so ~100/s are emitted and the others wait (PENDING, no
    loss counted): their start is reported when they are confirmed (tests/bpf/test_flow_reports.py)."""
    from hostwall.bpf import conntrack
    harness.install(POLICY.replace("ingress: deny", "ingress: allow"))
    dp = harness.dp
    set_collect(dp, event_budget=100 * dp.ncpus)        # 100 events/s per CPU, 50 ms burst = 5
    t0 = 10_000_000_000_000
    dp.set_config(test_now_ns=t0)
    # 2 s of simulated time, one new flow every 1 ms, on one CPU (each CPU has its own bucket):
    # at most 5 (burst) + 100/s * 2 s may pass
    import os
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    outcomes = L.C["HW_EV_OUTCOMES"]

    def start_outcomes():
        raw_ = bpfsys.array_slots(dp.map_fds["hw_ev_stats"], L.C["HW_EV_FLOW_START"] * outcomes, outcomes,
                                  16 * dp.ncpus)
        pk = np.frombuffer(raw_, dtype=L.DTYPES["hw_counter"])["packets"].reshape(outcomes, dp.ncpus).sum(axis=1)
        return {L.EV_OUTCOME_NAMES[o]: int(pk[o]) for o in range(outcomes)}
    before = start_outcomes()
    try:
        for i in range(2000):
            dp.set_config(test_now_ns=t0 + i * 1_000_000)
            bpfsys.prog_test_run(dp.prog_fds["xdp_ingress"], syn(sport=10000 + i))
    finally:
        os.sched_setaffinity(0, cpus)
    emitted = len(events.drain())
    got = {k: v - before[k] for k, v in start_outcomes().items()}
    assert 150 <= emitted <= 5 + 200 + 1, emitted
    assert got == {"emitted": emitted, "budget": 0, "ringbuf_full": 0, "aggregated": 0}
    with conntrack.CtTable(dp.map_fds["hw_ct4"], 4) as t:
        reports = t.slots[t.live()]["e"]["report"]
    assert int((reports == L.C["HW_REP_PENDING"]).sum()) + emitted == 2000 == len(reports)
    set_collect(dp, event_budget=L.C["HW_EVENT_BUDGET"])


def test_drop_summaries_add_up_to_the_drop_counters(harness, events):
    harness.install(POLICY)
    dp = harness.dp
    drain_drops(dp)
    drain_drops(dp)
    before = dp.stats()
    sent = 0
    for i in range(300):
        harness.run("xdp", syn(src=f"198.51.100.{i % 50}", sport=1000 + i, dport=22 + i % 3))   # policy_deny
        harness.run("xdp", syn(src=f"203.0.113.{i % 7}", sport=1000 + i, dport=443))         # default_deny
        sent += 2
    keys, vals, ov = drain_drops(dp)
    after = dp.stats()
    hook = L.C["HW_HOOK_XDP_INGRESS"]
    for reason in ("HW_R_POLICY_DENY", "HW_R_DEFAULT_DENY"):
        r = L.C[reason]
        idx = L.stats_index(hook, L.C["HW_V_DROP"], r)
        counted = int(after["packets"][idx] - before["packets"][idx])
        summed = int(vals[keys["reason"] == r][:, 0].sum()) + ov.get((1, r), 0)
        assert summed == counted == 300, (reason, summed, counted)
    # aggregation is by /24 source prefix: one key per (prefix, dport)
    pd = keys[keys["reason"] == L.C["HW_R_POLICY_DENY"]]
    assert len(pd) == 3 and set(int(p) for p in pd["dport"]) == {22, 23, 24}
    assert all(bytes(k["src"][:4]) == bytes([198, 51, 100, 0]) and k["prefix_len"] == 24 for k in pd)


def test_full_aggregation_map_overflows_into_counted_slots(harness, events):
    harness.install(POLICY)
    dp = harness.dp
    drain_drops(dp)
    set_collect(dp, agg_prefix_v4=32)
    n = L.C["HW_DROP_AGG_MAX"] + 300
    base = int.from_bytes(bytes([11, 0, 0, 0]), "big")
    frame = bytearray(syn(src="11.0.0.0", dport=22))
    fd = dp.prog_fds["xdp_ingress"]
    try:
        for i in range(n):
            frame[26:30] = (base + i).to_bytes(4, "big")
            bpfsys.prog_test_run(fd, bytes(frame))      # IPv4 checksum is not verified by the datapath
        keys, vals, ov = drain_drops(dp)
    finally:
        set_collect(dp, agg_prefix_v4=24)
    total = int(vals[:, 0].sum()) + sum(ov.values())
    assert len(keys) == L.C["HW_DROP_AGG_MAX"]
    assert ov.get((1, L.C["HW_R_DEFAULT_DENY"]), 0) >= 300
    assert total == n
