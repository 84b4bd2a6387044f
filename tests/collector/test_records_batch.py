"""The batch-shaped ring-buffer record path (collector/records/events.py) against the per-record path it
replaced (tests/collector/oracle_records.py, the test oracle): for random batches of every event type,
both families, every protocol kind (TCP/UDP/SCTP ports, ICMP and ICMPv6 echo and other types, a
protocol without ports), flow ends with every end cause, would-drop verdicts, unknown names, bad
types and families, garbage in an IPv4 event's unused address bytes — the orjson bytes of every
record, the builder's counters, its flow table and the counted losses are identical."""
from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock
from hostwall.collector.enrich.host import InstanceStateView
from hostwall.collector.records import RecordBuilder

from .oracle_records import OracleBuilder
from .test_records import HOST, state

EV = L.DTYPES["hw_event"]
CREATED = "2026-12-06T09:00:00.000001Z"
ADDRS = [bytes(16), bytes([10, 0, 0, 1]) + bytes(12), bytes([10, 0, 0, 1]) + b"\xff" * 12,
         bytes([198, 51, 100, 7]) + bytes(12), bytes([0x20, 0x01, 0x0d, 0xb8]) + bytes(11) + b"\x01",
         b"\xfe\x80" + bytes(13) + b"\x02"]


class Ledger:
    def __init__(self):
        self.calls: list[tuple] = []

    def lost(self, stage, reason, n):
        self.calls.append((stage, reason, n))


class OddClock:
    """Not a hostwall Clock: the record path must fall back to clock.wall_ns per instant."""

    def __init__(self, offset: int):
        self.offset = offset

    def wall_ns(self, mono: int) -> int:
        return int(mono) + self.offset


def _u(bits: int):
    return st.integers(0, (1 << bits) - 1)


_addr = st.one_of(st.sampled_from(ADDRS), st.binary(min_size=16, max_size=16))
_mono = st.one_of(st.integers(0, 10**13), st.integers(10**15, 10**16), _u(64))
_event = st.fixed_dictionaries({
    "type": st.sampled_from([1, 1, 2, 2, 3, 3, 4, 4, 0, 7, 255]),
    "family": st.sampled_from([4, 4, 6, 6, 0, 5]),
    "proto": st.sampled_from([6, 6, 17, 132, 1, 58, 47, 0, 255]),
    "icmp_type": st.sampled_from([0, 8, 3, 128, 129, 135, 255]),
    "saddr": _addr, "daddr": _addr,
    "sport": st.one_of(st.sampled_from([0, 53, 40000]), _u(16)), "dport": st.one_of(st.sampled_from([0, 443]), _u(16)),
    "ts_ns": _mono, "start_ns": _mono,
    "packets": st.tuples(_u(62), _u(62)), "bytes": st.tuples(st.integers(0, 10**9), _u(62)),   # sums stay JSON u64
    "cgroup_id": st.one_of(st.just(0), _u(64)), "ifindex": st.sampled_from([0, 2, 3, 0xFFFFFFFF]),
    "rule": st.sampled_from([(7, 0), (7, 0xFFFFFFFF), (8, 3), (0, 0)]),
    "verdict": st.sampled_from([0, 1, 2, 3]), "reason": st.sampled_from([0, 1, 2, 4, 16, 17, 99]),
    "hook": st.sampled_from([0, 1, 2, 5]), "direction": st.sampled_from([0, 1, 2]),
    "tcp_flags": st.sampled_from([0, 0x02, 0x12, 0x04]), "ct_state": st.sampled_from([0, 1, 2, 3, 4, 5, 9]),
    "end_cause": st.sampled_from([0, 1, 2, 3]), "icmp_code": _u(8), "pad2": _u(32),
})


def to_array(events: list[dict]) -> np.ndarray:
    a = np.zeros(len(events), EV)
    for i, e in enumerate(events):
        for k, v in e.items():
            if k == "rule":
                a["revision_id"][i], a["rule_slot"][i] = v
            elif k in ("saddr", "daddr"):
                a[k][i] = np.frombuffer(v, np.uint8)
            else:
                a[k][i] = v
    return a


def pair(monkeypatch, seed: int = 0):
    monkeypatch.setattr("hostwall.collector.records.base.created_now", lambda: CREATED)
    view = InstanceStateView(HOST.pin_dir, state())
    new, old = Ledger(), Ledger()
    return (RecordBuilder(HOST, view, new, max_flows=8, community_id_seed=seed), new,
            OracleBuilder(HOST, view, old, max_flows=8, community_id_seed=seed), old)


def check_same(nb, nl, ob, ol, batches, clock):
    for b in batches:
        got, want = nb.on_events(b, clock), ob.on_events(b, clock)
        assert [orjson.dumps(r) for r in got] == [orjson.dumps(r) for r in want]
    assert nb.stats() == ob.stats()
    assert list(nb.flows.d.items()) == list(ob.flows.d.items())
    assert nl.calls == ol.calls


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_event, min_size=0, max_size=24), min_size=1, max_size=4),
       seed=st.sampled_from([0, 7]), odd_clock=st.booleans(), offset=st.sampled_from([1_700_000_000 * 10**9, -5, 0]))
def test_batch_path_builds_the_oracles_records_byte_for_byte(monkeypatch, batches, seed, odd_clock, offset):
    nb, nl, ob, ol = pair(monkeypatch, seed)
    clock = OddClock(offset) if odd_clock else Clock(offset)
    check_same(nb, nl, ob, ol, [to_array(b) for b in batches], clock)


def test_a_load_balancers_batch_with_repeated_tuples_is_identical(monkeypatch):
    """Many events of few tuples (the endpoint cache's hits), starts and ends of the same flows, both
    families, in a batch of the ring reader's size and in raw-bytes and other-byte-order forms."""
    rng = np.random.default_rng(17)
    n = 4096
    a = np.zeros(n, EV)
    a["type"] = rng.choice([1, 2, 3, 4], n)
    a["family"] = rng.choice([4, 6], n)
    a["proto"] = rng.choice([6, 17, 1, 58], n)
    a["icmp_type"] = rng.choice([8, 0, 128, 129, 3], n)
    peers = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    a["saddr"] = peers[rng.integers(0, 16, n)]
    a["daddr"] = peers[rng.integers(0, 16, n)]
    a["sport"] = rng.choice([40000, 40001, 53], n)
    a["dport"] = rng.choice([443, 80], n)
    a["start_ns"] = rng.integers(10**12, 2 * 10**12, n)
    a["ts_ns"] = a["start_ns"] + rng.integers(0, 10**10, n)
    a["packets"] = rng.integers(0, 100, (n, 2))
    a["bytes"] = rng.integers(0, 10**6, (n, 2))
    a["verdict"] = rng.choice([0, 1, 2], n)
    a["reason"] = rng.choice([2, 16, 17], n)
    a["ifindex"] = rng.choice([0, 2], n)
    a["direction"] = rng.choice([0, 1], n)
    a["end_cause"] = rng.choice([0, 1, 2], n)
    a["ct_state"] = rng.choice([0, 2, 3, 4, 5], n)
    a["revision_id"], a["rule_slot"] = 7, rng.choice([0, 0xFFFFFFFF], n)
    nb, nl, ob, ol = pair(monkeypatch)
    clock = Clock(1_700_000_000 * 10**9)
    swapped = a.astype(a.dtype.newbyteorder(">"))
    check_same(nb, nl, ob, ol, [a, a.tobytes(), swapped], clock)
    assert nb.counters["records"] == 3 * n


@pytest.mark.parametrize("bad", [b"\x00" * 7, np.zeros(3, [("x", "u1")])])
def test_a_batch_of_the_wrong_layout_is_counted_alike(monkeypatch, bad):
    nb, nl, ob, ol = pair(monkeypatch)
    check_same(nb, nl, ob, ol, [bad], Clock(0))
    assert nl.calls == [("decode", "bad_event_layout", 1)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, (1 << 62) - 1), min_size=1, max_size=300),
       st.integers(0, (1 << 62) - 1), st.integers(0, 5 * 10**9))
def test_the_vectorised_time_text_is_iso_ns(instants, base, spread):
    """timefmt.iso_text (the builder's `@timestamp` / `event.start` / `event.end` text) is iso_ns's for any
    instant it is used for: random ones over its whole range, and a batch's few seconds around `base`
    (microsecond and second boundaries, repeated seconds)."""
    from hostwall.collector.records.timefmt import iso_ns, iso_text
    near = [min(base + d, (1 << 62) - 1) for d in (0, 999, 1000, 999_999_999, 10**9, spread)]
    wall = np.array(instants + near, np.int64)
    assert iso_text(wall) == [iso_ns(t) for t in wall.tolist()]
