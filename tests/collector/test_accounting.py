"""collector.accounting.Ledger: produced = delivered + lost + in_flight per sink, kernel losses folded
in, and the checks catch miscounting (negative or unexplained in-flight records)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.collector.accounting import Ledger


def test_balance_of_one_sink():
    led = Ledger(["jsonl"])
    led.produce("events", 10)
    led.lose("decode", "length", 2, produced="events")
    led.fan_out(10)
    led.deliver("jsonl", 7)
    led.sink_lose("jsonl", "write_error", 1)
    b = led.balance("jsonl")
    assert b == {"produced": 12, "delivered": 7, "lost": 3, "in_flight": 2}
    assert led.check({"upstream": 0, "jsonl": 2}) == []
    led.deliver("jsonl", 2)
    assert led.check(quiescent=True) == []


def test_builder_hook_counts_produced_and_lost():
    led = Ledger(["s"])
    led.lost("decode", "unknown_event_type", 3)         # RecordBuilder's ledger.lost(stage, reason, n)
    assert led.produced == 3 and led.lost_upstream == 3
    assert led.check(quiescent=True) == []


def test_kernel_losses_fold_in_after_the_baseline():
    led = Ledger(["s"])
    led.fold_kernel({"deny": {"emitted": 100, "budget": 40, "ringbuf_full": 5}})   # before us: not ours
    assert led.produced == 0
    led.fold_kernel({"deny": {"emitted": 150, "budget": 43, "ringbuf_full": 5},
                     "flow_start": {"emitted": 1, "budget": 2, "ringbuf_full": 0}})
    assert dict(led.lost_by["kernel"]) == {"budget": 3 + 2}      # deny +3, flow_start (new type) +2
    assert led.produced_by["kernel"] == 5
    led.fold_kernel({"deny": {"emitted": 1, "budget": 1, "ringbuf_full": 0},         # datapath reloaded
                     "flow_start": {"emitted": 1, "budget": 2, "ringbuf_full": 0}})
    assert led.lost_by["kernel"]["budget"] == 6
    assert led.check(quiescent=True) == []
    assert led.snapshot()["kernel_events"]["deny"]["emitted"] == 1


def test_check_catches_miscounting():
    led = Ledger(["a", "b"])
    led.produce("events", 5)
    led.fan_out(5)
    led.deliver("a", 6)                                  # delivered more than it got
    bad = led.check({"upstream": 0, "a": 0, "b": 5})
    assert any("a: in_flight -1 < 0" in v for v in bad)
    assert not any(v.startswith("b:") for v in bad)
    led2 = Ledger(["a"])
    led2.produce("events", 5)
    led2.fan_out(5)
    led2.deliver("a", 3)
    assert any("queues hold 0" in v for v in led2.check({"a": 0}))
    assert any("at quiescence" in v for v in led2.check(quiescent=True))


def test_sinks_are_independent_lanes():
    led = Ledger(["fast", "slow"])
    led.produce("drop_summaries", 4)
    led.fan_out(4)
    led.deliver("fast", 4)
    led.sink_lose("slow", "queue_full", 4)
    assert led.balance("fast")["delivered"] == 4 and led.balance("slow")["lost"] == 4
    assert led.check(quiescent=True) == []
    with pytest.raises(RuntimeError):
        led.add_sink("late")
    with pytest.raises(ValueError):
        Ledger(["x"]).add_sink("x")


def test_snapshot_is_json_and_says_ok():
    led = Ledger(["s"])
    led.produce("events", 2)
    led.fan_out(2)
    led.deliver("s", 2)
    led.count_drops(1000, 7)
    snap = json.loads(json.dumps(led.snapshot({"upstream": 0, "s": 0})))
    assert snap["ok"] and snap["sinks"]["s"]["delivered"] == 2 and snap["drop_packets"] == {"summarized": 1000,
                                                                                             "overflow": 7}


step = st.one_of(st.tuples(st.just("produce"), st.integers(0, 50)),
                 st.tuples(st.just("decode_error"), st.integers(0, 5)),
                 st.tuples(st.just("kernel"), st.integers(0, 9)),
                 st.tuples(st.just("fan"), st.integers(0, 60)),
                 st.tuples(st.sampled_from(["deliver", "lose", "drop_queue"]), st.sampled_from(["a", "b"]),
                           st.integers(0, 60)))


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=80))
def test_any_consistent_history_balances(history):
    """Drive the ledger like the pipeline does (with a model of its queues); check() finds nothing
    and every sink's balance adds up, at every step; at the end, flushing everything quiesces."""
    led = Ledger(["a", "b"])
    pending, queued = 0, {"a": 0, "b": 0}
    kernel = 0
    led.fold_kernel({"deny": {"emitted": 0, "budget": 0, "ringbuf_full": 0}})
    for s in history:
        if s[0] == "produce":
            led.produce("events", s[1])
            pending += s[1]
        elif s[0] == "decode_error":
            led.lose("decode", "length", s[1], produced="events")
        elif s[0] == "kernel":
            kernel += s[1]
            led.fold_kernel({"deny": {"emitted": 0, "budget": kernel, "ringbuf_full": 0}})
        elif s[0] == "fan":
            n = min(s[1], pending)
            led.fan_out(n)
            pending -= n
            queued = {k: v + n for k, v in queued.items()}
        else:
            op, sink, n = s
            n = min(n, queued[sink])
            queued[sink] -= n
            if op == "deliver":
                led.deliver(sink, n)
            else:
                led.sink_lose(sink, "queue_full" if op == "drop_queue" else "write_error", n)
        assert led.check({"upstream": pending, **queued}) == []
    led.fan_out(pending)
    for sink in ("a", "b"):
        led.deliver(sink, queued[sink] + pending)
    assert led.check(quiescent=True) == []
    for sink in ("a", "b"):
        b = led.balance(sink)
        assert b["produced"] == b["delivered"] + b["lost"] and b["in_flight"] == 0
