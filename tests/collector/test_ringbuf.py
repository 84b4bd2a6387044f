"""collector.ringbuf: the record walk over synthetic ring buffers laid out like the kernel's (busy,
discard, wrong lengths, wrap-around through the double mapping, batch limits), property-tested
against a simple model; then the real kernel ring buffer (mmap, poll wake-up, full ring) fed by a
small BCC program."""
from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.bpf.ringbuf import EVENT_DTYPE, RingWalker, slot_size
from tests.collector.fakes import FakeRing

REC = EVENT_DTYPE.itemsize
DENY = L.C["HW_EV_DENY"]


def seqs(batch) -> list[int]:
    return batch.records["start_ns"].tolist()


def test_round_trip_fields_and_positions():
    r = FakeRing()
    w = r.walker()
    for _ in range(5):
        assert r.emit()
    assert w.available_bytes() == 5 * slot_size(REC)
    b = w.read()
    assert seqs(b) == [0, 1, 2, 3, 4]
    assert b.records.dtype == EVENT_DTYPE and b.records.flags.c_contiguous
    assert (b.records["dport"] == 443).all() and (b.records["type"] == DENY).all()
    assert w.available_bytes() == 0 and w.consumer_pos == w.producer_pos
    assert not b.errors and b.consumed_bytes == 5 * slot_size(REC)
    assert len(w.read().records) == 0


def test_records_are_copies_not_views_of_the_ring():
    r = FakeRing()
    w = r.walker()
    r.emit()
    b = w.read()
    r.data[:] = b"\xff" * len(r.data)              # the producer reuses the space
    assert seqs(b) == [0]


def test_wrap_around_through_the_double_mapping():
    r = FakeRing(4096)                              # 31 records fit; offsets wrap every 32 slots
    w = r.walker()
    got = []
    for k in range(40):
        for _ in range(k % 7 + 1):
            assert r.emit()
        got += seqs(w.read())
    assert got == list(range(r.seq))
    assert w.consumer_pos > 4 * r.size            # wrapped several times


def test_stops_at_a_busy_record_and_resumes_in_order():
    r = FakeRing()
    w = r.walker()
    r.emit()
    held = r.reserve(REC)                           # reserved, not committed yet
    r.emit(r.event(seq=100))
    b = w.read()
    assert seqs(b) == [0]                           # nothing behind the busy record is consumed
    assert w.available_bytes() == 2 * slot_size(REC)
    r.commit(held, r.event(seq=50))
    assert seqs(w.read()) == [50, 100]


def test_discarded_records_are_skipped_not_errors():
    r = FakeRing()
    w = r.walker()
    r.emit()
    r.emit(discard=True)
    r.emit()
    b = w.read()
    assert seqs(b) == [0, 2] and b.discarded == 1 and not b.errors


def test_wrong_length_records_are_counted_decode_errors():
    r = FakeRing()
    w = r.walker()
    r.emit()
    r.emit(b"\x01" * 24)                            # a record of another size
    r.emit()
    r.emit(b"\x02" * (REC + 8))
    b = w.read()
    assert seqs(b) == [0, 1] and b.errors == {"length": 2} and b.read == 4
    assert w.available_bytes() == 0


def test_unknown_type_and_family_are_decode_errors():
    r = FakeRing()
    w = r.walker()
    r.emit(r.event(type_=77))
    r.emit(r.event(family=5))
    r.emit()
    b = w.read()
    assert seqs(b) == [2]
    assert b.errors == {"unknown_type": 1, "bad_family": 1}


def test_max_records_leaves_the_rest():
    r = FakeRing()
    w = r.walker()
    for _ in range(10):
        r.emit()
    assert seqs(w.read(4)) == [0, 1, 2, 3]
    assert w.available_bytes() == 6 * slot_size(REC)
    assert seqs(w.read(100)) == list(range(4, 10))


def test_full_ring_refuses_and_drains():
    r = FakeRing(4096)
    w = r.walker()
    n = 0
    while r.emit():
        n += 1
    assert n == (4096 - 8) // slot_size(REC)
    assert len(w.read().records) == n
    assert r.emit()


def test_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        RingWalker(bytearray(8), bytearray(8), bytearray(6000), 3000)


ops = st.lists(st.one_of(
    st.tuples(st.just("emit"), st.integers(1, 5)),
    st.tuples(st.just("short"), st.sampled_from([8, 24, 64, REC - 8, REC + 8, 200])),
    st.tuples(st.just("discard"), st.just(1)),
    st.tuples(st.just("hold"), st.just(1)),
    st.tuples(st.just("release"), st.just(1)),
    st.tuples(st.just("read"), st.integers(1, 12)),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_matches_a_model_of_the_ring(script):
    """Whatever the interleaving: records come out once, in commit order, never past a busy one;
    every wrong-length record is counted; a read takes at most its limit; positions agree."""
    r = FakeRing(2048)
    w = r.walker(validate=None)
    slots: list = []            # production order: ["ok", seq] | ["bad"] | ["discard"] | ["held", pos]
    out, bad = [], 0
    for op, arg in script:
        if op == "emit":
            for _ in range(arg):
                if not r.emit():
                    break
                slots.append(["ok", r.seq - 1])
        elif op == "short" and r.emit(b"\x07" * arg):
            slots.append(["bad"])
        elif op == "discard" and r.emit(discard=True):
            slots.append(["discard"])
        elif op == "hold" and not any(s[0] == "held" for s in slots):
            pos = r.reserve(REC)
            if pos is not None:
                slots.append(["held", pos])
        elif op == "release":
            for s in slots:
                if s[0] == "held":
                    r.commit(s[1], r.event(seq=10_000 + len(out)))
                    s[:] = ["ok", 10_000 + len(out)]
                    break
        elif op == "read":
            b = w.read(arg)
            assert len(b.records) + b.errors.get("length", 0) <= arg
            out += seqs(b)
            bad += b.errors.get("length", 0)
        assert w.consumer_pos <= w.producer_pos
    final = w.read(10_000)
    out += seqs(final)
    bad += final.errors.get("length", 0)
    held = next((i for i, s in enumerate(slots) if s[0] == "held"), len(slots))
    assert out == [s[1] for s in slots[:held] if s[0] == "ok"]
    assert bad == sum(1 for s in slots[:held] if s[0] == "bad")
    if held == len(slots):
        assert w.available_bytes() == 0


# ---- the real kernel ring buffer ----------------------------------------------------------------

@pytest.fixture(scope="module")
def producer():
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    from hostwall.bench.collector import Producer
    p = Producer(ring_bytes=1 << 16)               # 64 KiB: 511 records, wraps quickly
    yield p
    p.close()


@pytest.fixture
def kring(producer):
    from hostwall.bpf.ringbuf import RingBuffer
    rb = RingBuffer(producer.ring_fd())
    rb.read(1 << 20)                               # start empty
    yield rb
    rb.close()


@pytest.mark.bpf
def test_kernel_ring_records_in_order_across_wraps(producer, kring):
    assert kring.size == 1 << 16
    got = []
    for k in (1, 7, 300, 511, 2, 450, 511, 100):
        producer.produce(k)
        b = kring.read()
        assert len(b.records) == k and not b.errors
        got += b.records["start_ns"].tolist()
    assert np.all(np.diff(got) == 1)
    assert kring.consumer_pos == kring.producer_pos > 3 * kring.size


@pytest.mark.bpf
def test_kernel_ring_full_then_drained(producer, kring):
    cap = (kring.size - 8) // slot_size(REC)
    producer.produce(cap + 50)                     # 50 reservations fail in the kernel
    assert kring.available_bytes() == cap * slot_size(REC)
    b = kring.read()
    assert len(b.records) == cap
    assert kring.available_bytes() == 0


@pytest.mark.bpf
def test_kernel_discard_and_wrong_size_records(producer, kring):
    producer.produce(2)
    producer.produce_discard()
    producer.produce_short()
    producer.produce(1)
    b = kring.read()
    assert len(b.records) == 3 and b.discarded == 1 and b.errors == {"length": 1}
    assert (b.records["type"] == DENY).all() and (b.records["family"] == 4).all()


@pytest.mark.bpf
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_kernel_ring_wakes_the_loop_without_polling(producer, kring, loop):
    async def main():
        t0 = time.monotonic()
        assert await kring.wait(0.2) is False          # nothing: sleeps until the timeout
        assert time.monotonic() - t0 >= 0.19
        asyncio.get_running_loop().call_later(0.05, producer.produce, 3)
        t0 = time.monotonic()
        assert await kring.wait(5.0) is True           # woken by the kernel, not by the timeout
        assert time.monotonic() - t0 < 2.0
        assert len(kring.read().records) == 3
        producer.produce(1)
        assert await kring.wait(5.0) is True           # data already there: no sleep at all
        kring.read()

    if loop == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())


@pytest.mark.bpf
def test_kernel_ring_concurrent_producer_loses_and_duplicates_nothing(producer, kring):
    """A producer on another thread (test-run releases the GIL, so the kernel writes while we
    read): every committed record comes out exactly once and in order."""
    import threading

    start = int(producer.bpf[b"hw_seq"][0].value)
    stop = threading.Event()

    def produce():
        for _ in range(60):
            producer.produce(400)
        stop.set()

    t = threading.Thread(target=produce)
    t.start()
    got = []
    while not stop.is_set() or kring.available_bytes():
        b = kring.read(97)                             # small, odd batches: many partial walks
        assert not b.errors
        got += b.records["start_ns"].tolist()
        if not len(b.records):
            time.sleep(0.0002)                         # let the producer thread have the GIL
    t.join()
    end = int(producer.bpf[b"hw_seq"][0].value)
    assert got == list(range(start, end)) and end - start > 1000
