"""The Kafka sink's spool edge cases, with its broker down (no broker needed: a dead port it delivered to
before): a full spool counts `spool_full` with the seqs and marks the sink failing, a full disk (ENOSPC)
counts `disk_full`, the sink keeps accepting and recovers when there is room; every batch settles
(durable in the spool, or counted); a sink that never delivered to an unreachable broker does not start
(docs/collector.md "Kafka, OTLP and self-metrics")."""
from __future__ import annotations

import asyncio
import errno
import os

import pytest

from hostwall.collector.config import KafkaOptions
from hostwall.collector.sinks.base import SinkUnavailable
from hostwall.collector.sinks.kafka import CONNECTED_MARKER, KafkaSink
from hostwall.collector.sinks.kafka_wire import spool_dir_for
from tests.peers import free_ports


def records(n: int, start: int = 0, pad: int = 900) -> list[dict]:
    return [{"event": {"id": f"e{i}"}, "hostwall": {"kind": "flow", "seq": i, "stream": "events"},
             "network": {"community_id": f"1:k{i % 7}"}, "pad": "x" * pad} for i in range(start, start + n)]


def sink(tmp_path, *, known: bool = True, **opts) -> KafkaSink:
    port, = free_ports(1)
    boot = f"127.0.0.1:{port}"
    o = KafkaOptions(**{"spool_dir": str(tmp_path), "connect_timeout_s": 2.0, "spool_fsync": "none", **opts})
    if known:                                        # as if it had delivered to this broker before
        d = spool_dir_for(tmp_path, boot)
        d.mkdir(parents=True)
        (d / CONNECTED_MARKER).write_text(boot)
    return KafkaSink(boot, options=o)


def test_an_unreachable_broker_it_never_delivered_to_fails_the_start(tmp_path):
    s = sink(tmp_path, known=False)
    with pytest.raises(SinkUnavailable, match=r": unreachable: no TCP connection to .* never delivered to"):
        asyncio.run(s.start())


def test_a_full_spool_counts_spool_full_with_seqs_and_the_sink_is_failing(tmp_path):
    async def go():
        s = sink(tmp_path, spool_max_bytes=64 << 10, spool_segment_bytes=16 << 10)
        await s.start()
        assert s.health()["state"] == "degraded" and s.degraded
        await s.send(records(120))                  # ~110 KiB into a 64 KiB spool
        h = s.health()
        st = s.stats()
        lost = st["lost"].get("spool_full", 0)
        assert 0 < lost < 120 and st["spool"]["pending"] == 120 - lost
        assert h["state"] == "failing" and "spool full" in h["reason"] and h["spool_fill_ratio"] > 0.8
        assert s.settled_calls == 1 and s.unsettled_calls == 0     # durable in the spool, or counted
        seqs = s.take_lost_seqs()[("events", "spool_full")]
        assert seqs.count == lost and seqs.ranges == [[120 - lost, 119]]   # the newest are refused
        await s.close()
        assert s.stats()["lost"]["carried_over"] == 120 - lost and s.in_flight == 0
    asyncio.run(go())


def test_a_full_disk_counts_disk_full_keeps_running_and_recovers(tmp_path, monkeypatch):
    import hostwall.collector.sinks.spool_format as sf

    async def go():
        s = sink(tmp_path)
        await s.start()
        await s.send(records(10))
        real = os.write

        def full(fd, buf):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(sf.os, "write", full)
        await s.send(records(5, 10))
        monkeypatch.setattr(sf.os, "write", real)
        assert s.stats()["lost"] == {"disk_full": 5} and s.health()["state"] == "failing"
        assert "disk full" in s.health()["reason"]
        await s.send(records(5, 15))                # room again: spooling goes on, failing clears
        assert s.health()["state"] == "degraded" and s.stats()["spool"]["pending"] == 15
        assert s.settled_calls == 3
        await s.close()
    asyncio.run(go())


def test_a_batch_the_spool_takes_only_in_part_is_not_replayed_besides_its_flight(tmp_path):
    """Mirroring a batch still in the producer into a nearly full spool: the part that fits must not
    be replayed as the spool's own records (the flight delivers or loses them, once); it is acknowledged
    in the spool at once."""
    from hostwall.collector.sinks.kafka_replay import Flight

    async def go():
        s = sink(tmp_path, spool_max_bytes=64 << 10, spool_segment_bytes=16 << 10)
        await s.start()
        await s.send(records(40))                   # ~37 KiB of the spool's 64
        first = s.spool.next_seq
        msgs = [("hostwall-flows", b"k", b"v" * 4000, [], 100 + i) for i in range(12)]   # ~48 KiB: part fits
        f = Flight(msgs, len(msgs), len(msgs), 0.0, 48000, ("hostwall-flows", 0))
        await s._mirror([f])
        took = s.spool.next_seq - first
        assert 0 < took < len(msgs), took
        assert s.counters["mirror_refused"] == len(msgs) - took and f.seqs is None
        assert all(s.spool.is_acked(q) for q in range(first, first + took)), "the replay would send them"
        assert s.spool.pending == 40
        await s.close()
    asyncio.run(go())


class StallingProducer:
    """Accepts its first batch (acknowledged when the test says so) and never the second."""

    def __init__(self):
        self.acks: list[asyncio.Future] = []

    async def send_batch(self, batch, topic, partition=None):
        if self.acks:
            await asyncio.Event().wait()
        self.acks.append(asyncio.get_running_loop().create_future())
        return self.acks[-1]

    async def stop(self):
        pass


def test_a_send_cancelled_with_a_batch_in_flight_counts_each_record_once(tmp_path):
    """The shutdown deadline cancels a send whose first partition's batch is in the producer and whose
    second waits for room: the batch in flight counts when the broker acknowledges it — delivered, not also
    lost; the records never handed over stay in flight with their call unsettled, for the pipeline to count
    `requeued` and keep in the kernel (docs/collector.md "The loss ledger")."""
    async def go():
        s = sink(tmp_path, spool_after_s=60.0)
        await s.start()                              # degraded (no broker): make it healthy on a stand-in
        p = s._producer = StallingProducer()
        s._partitions = {t: [0, 1] for t in s.topics}
        s.degraded = False
        recs = records(40)
        send = asyncio.ensure_future(s.send(recs))
        while not p.acks:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)                    # the second batch waits in send_batch
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        first = s.stats()["window"]["records"]
        assert 0 < first < 40
        p.acks[0].set_result(None)                   # the broker acknowledges the batch in flight
        await asyncio.sleep(0)
        st = s.stats()
        assert st["delivered"] == first and st["lost"] == {} and st["in_flight"] == 40 - first, st
        await s.close()
        st = s.stats()
        assert st["delivered"] == first and st["lost"] == {} and st["in_flight"] == 40 - first, st
        assert s.settled_calls == 0 and s.unsettled_calls == 1     # the kernel keeps the batch
    asyncio.run(go())


def test_a_send_cancelled_while_waiting_for_spool_room_loses_only_what_is_not_spooled(tmp_path):
    """spool_overflow: block and a full spool: the send waits for room until the shutdown deadline cancels
    it. What it spooled is carried over to the next run; the rest stays in flight, its call unsettled, for
    the pipeline to count `requeued` — each record once."""
    async def go():
        s = sink(tmp_path, spool_max_bytes=64 << 10, spool_segment_bytes=16 << 10, spool_overflow="block")
        await s.start()
        send = asyncio.ensure_future(s.send(records(120)))   # ~110 KiB into a 64 KiB spool
        while not s.counters["spool_waits"]:
            await asyncio.sleep(0.01)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        spooled = s.spool.pending
        assert 0 < spooled < 120
        assert s.stats()["lost"] == {} and s.in_flight == 120
        await s.close()
        assert s.stats()["lost"] == {"carried_over": spooled} and s.in_flight == 120 - spooled
        assert s.settled_calls == 0 and s.unsettled_calls == 1
    asyncio.run(go())


def test_a_send_cancelled_in_the_spools_fdatasync_carries_its_written_records_over_once(tmp_path):
    """The shutdown deadline cancels a send inside Spool.append after its write(2), while the fdatasync runs:
    the records are in the spool, so they are carried over (the next run sends them) and the call settles —
    counting them untaken would leave them `requeued` in the kernel too, and the next run would send them
    twice."""
    async def go():
        s = sink(tmp_path, spool_fsync="always")
        await s.start()
        real, stall = s.spool.sync, asyncio.Event()

        async def slow_sync():                       # an fdatasync that outlasts the shutdown deadline
            await stall.wait()
            return await real()
        s.spool.sync = slow_sync
        send = asyncio.ensure_future(s.send(records(10)))
        while s.spool.next_seq < 10:
            await asyncio.sleep(0.01)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        s.spool.sync = real
        assert s.counters["spooled"] == 10 and s.stats()["lost"] == {}
        await s.close()
        st = s.stats()
        assert st["lost"] == {"carried_over": 10} and st["in_flight"] == 0, st
        assert s.settled_calls == 1 and s.unsettled_calls == 0     # the kernel may release them
    asyncio.run(go())


def test_records_a_cut_send_never_spooled_stay_in_the_kernel_and_are_requeued(tmp_path):
    """A pipeline stopped while its Kafka sink waits for spool room (spool_overflow: block): nothing is
    counted `cancelled` and released, nor `sink_failed` (the sink did not fail) — what never reached the spool
    is `requeued`, and the ring keeps it for the next collector (docs/collector.md "The loss ledger")."""
    import uvloop

    from hostwall.collector.config import QueueSizes
    from hostwall.collector.pipeline import Pipeline
    from tests.collector.fakes import FakeSource, StubBuilder, cfg, started, until

    src = FakeSource(ring_size=1 << 18)
    s = sink(tmp_path, spool_max_bytes=32 << 10, spool_segment_bytes=8 << 10, spool_overflow="block")
    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=4, sink=256, batch=64)), src, StubBuilder(), [s],
                    shutdown_timeout_s=0.5)

    async def go():
        task = await started(pipe)
        src.emit(1500)
        await until(lambda: s.counters["spool_waits"] > 0)
        pipe.stop()
        await task
    uvloop.run(go())
    lost = dict(pipe.ledger.lanes[s.name].lost)
    assert set(lost) == {"requeued", "carried_over"} and lost["requeued"] > 0, lost   # not cancelled, sink_failed
    assert src.rb.uncommitted_bytes() // 128 >= lost["requeued"]           # the kernel keeps them
    assert pipe.ledger.check(quiescent=True) == []
