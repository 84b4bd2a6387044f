"""End-to-end acknowledgement with a fake kernel (docs/collector.md "Delivery and loss", "Restarts"):
the ring's consumer position, drop intervals, conntrack claims, the audit offset and the outbox move only
once every at_least_once sink made the records durable; a restart continues from the checkpoint with the
same hostwall.seq for what comes again, counts what the kernel counted while no collector ran, and says
what it could not recover. The real kernel and real processes: tests/collector/test_crash_live.py."""
from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
import uvloop

from hostwall.bpf import layout as L
from hostwall.bpf.conntrack import CT_F_CLAIMED
from hostwall.collector.acks import Acks, CommitEntry, CommitLog
from hostwall.collector.checkpoint import Checkpoint, analyze_restart
from hostwall.collector.config import QueueSizes
from hostwall.collector.kernel import CtFamilyScan, CtScan, DropDrain
from hostwall.collector.loss_report import SeqRanges
from hostwall.collector.outbox import Outbox
from hostwall.collector.pipeline import Pipeline
from hostwall.collector.sinks.base import BaseSink, Durability, FullQueuePolicy
from tests.collector.fakes import (
    DROP_KEY,
    DROP_VAL,
    FakeRingBuffer,
    FakeSource,
    MemorySink,
    StubBuilder,
    cfg,
    started,
    until,
)

STRIDE = 128


def restarted(src: FakeSource) -> FakeSource:
    """The same kernel state (ring memory, counters) as a new collector process sees it."""
    src.rb = FakeRingBuffer(src.fake)
    src.cleared, src.freed = [], []
    src.closed = False
    return src


def seqs(records, stream="events"):
    return [r["hostwall"]["seq"] for r in records if r["hostwall"].get("stream") == stream]


def test_the_ring_moves_only_past_durable_batches(tmp_path):
    durable = asyncio.Event()
    src, sink = FakeSource(), MemorySink(durable_gate=durable)
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink])

    async def go():
        task = await started(pipe)
        src.emit(50)
        await until(lambda: len(sink.records) == 50)
        await asyncio.sleep(0.1)
        assert src.rb.consumer_pos == 0 and src.rb.uncommitted_bytes() == 50 * STRIDE   # delivered, not durable
        assert pipe.status()["delivery"]["waiting"] >= 1
        durable.set()
        sink.make_durable()
        await until(lambda: src.rb.consumer_pos == 50 * STRIDE)
        ck = json.loads(pipe.checkpoint.path.read_text())
        assert ck["ring"]["pos"] == 50 * STRIDE and ck["seq"]["events"] == 50   # checkpoint before the kernel
        pipe.stop()
        await task
    uvloop.run(go())
    assert seqs(sink.records) == list(range(50))
    assert {r["hostwall"]["stream"] for r in sink.records} == {"events"}
    assert json.loads(pipe.checkpoint.path.read_text())["clean_stop"] is True


def test_a_stop_before_durability_leaves_the_events_for_the_next_run_with_the_same_seqs(tmp_path):
    durable = asyncio.Event()
    src, first = FakeSource(), MemorySink(durable_gate=durable)
    pipe = Pipeline(cfg(tmp_path, queues=cfg(tmp_path).queues), src, StubBuilder(), [first], shutdown_timeout_s=1.0)

    async def one():
        task = await started(pipe)
        src.emit(30)
        await until(lambda: len(first.records) == 30)
        pipe.stop()
        await task
    uvloop.run(one())
    assert src.rb.consumer_pos == 0                       # nothing was durable: the kernel keeps all 30
    led = pipe.ledger
    # delivered (written), but never durable: the next run sends them again (duplicates, same event.id)
    assert led.lanes["mem"].delivered == 30 and led.check(quiescent=True) == []
    second = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), restarted(src), StubBuilder(), [second])

    async def two():
        task = await started(pipe2)
        await until(lambda: len([r for r in second.records if r["hostwall"]["kind"] == "deny"]) == 30)
        pipe2.stop()
        await task
    uvloop.run(two())
    again = [r for r in second.records if r["hostwall"]["kind"] == "deny"]
    assert [r["ident"] for r in again] == [r["ident"] for r in first.records]      # the same events ...
    assert seqs(again) == seqs(first.records) == list(range(30))                  # ... with the same seqs
    assert pipe2.restart.previous == "clean" and src.rb.consumer_pos == 30 * STRIDE


def test_restart_counts_what_the_kernel_counted_while_down_and_a_reboot(tmp_path):
    src, sink = FakeSource(), MemorySink()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink])

    async def run(p, sink, n):
        task = await started(p)
        src.emit(n)
        await until(lambda: len([r for r in sink.records if r["hostwall"]["kind"] == "deny"]) >= n)
        p.stop()
        await task
    src.loss["deny"]["ringbuf_full"] = 5                  # before the first start: not this collector's
    uvloop.run(run(pipe, sink, 10))
    assert pipe.ledger.lost_by.get("kernel", {}) == {}
    src.loss["deny"]["ringbuf_full"] = 12                 # 7 more while no collector ran
    src.loss["deny"]["budget"] = 3
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), restarted(src), StubBuilder(), [sink2])
    uvloop.run(run(pipe2, sink2, 5))
    assert dict(pipe2.ledger.lost_by["kernel"]) == {"ringbuf_full": 7, "budget": 3}
    assert pipe2.kernel_while_down == {"ringbuf_full": 7, "budget": 3}
    assert seqs(sink2.records) == list(range(10, 15))    # the seq continues
    # a new boot: the checkpoint's ring is gone with its uncommitted events (counted), seqs continue
    ck = json.loads(pipe2.checkpoint.path.read_text())
    ck["ring"]["producer_pos"] = ck["ring"]["pos"] + 4 * STRIDE
    ck["clean_stop"] = False
    pipe2.checkpoint.path.write_text(json.dumps(ck))
    src.ident["boot_id"] = "another-boot"
    sink3 = MemorySink()
    pipe3 = Pipeline(cfg(tmp_path), restarted(src), StubBuilder(), [sink3])
    uvloop.run(run(pipe3, sink3, 2))
    assert pipe3.restart.previous == "reboot" and dict(pipe3.ledger.lost_by["restart"]) == {"reboot": 4}
    loss = [r for r in sink3.records if r["hostwall"]["kind"] == "loss"]
    assert len(loss) == 1 and loss[0]["event"]["action"] == "collector-restart"
    assert loss[0]["hostwall"]["loss"]["lost"] == {"reboot": 4} and loss[0]["hostwall"]["stream"] == "collector"


def test_analyze_restart_positions():
    ck = Checkpoint("/nonexistent/x.json", {"version": 1, "seq": {"events": 7}, "ring": {
        "pos": 10 * STRIDE, "seq": 7, "prev_pos": 6 * STRIDE, "prev_seq": 3, "producer_pos": 12 * STRIDE},
        "kernel": {"boot_id": "b", "ring_map_id": 1, "ev_stats_map_id": 2}, "kernel_loss": {"deny": {"budget": 1}}})
    ident = {"boot_id": "b", "ring_map_id": 1, "ev_stats_map_id": 2}
    r = analyze_restart(ck, ident, 10 * STRIDE, STRIDE)
    assert (r.previous, r.events_seq, r.lost, r.baseline) == ("crash", 7, {}, {"deny": {"budget": 1}})
    r = analyze_restart(ck, ident, 6 * STRIDE, STRIDE)        # died between checkpoint and ring commit
    assert (r.events_seq, r.duplicates_possible, r.lost) == (3, 4, {})
    r = analyze_restart(ck, ident, 15 * STRIDE, STRIDE)       # someone else consumed 5
    assert r.lost == {"crash": 5}
    r = analyze_restart(ck, {**ident, "ring_map_id": 9}, 0, STRIDE)
    assert r.previous == "reloaded" and r.lost == {"reloaded": 2} and r.baseline == {}   # new maps: from zero


def test_restart_finds_the_seq_of_any_commit_one_checkpoint_write_held(tmp_path):
    """One commit group runs several ring commits' bookkeeping, writes the checkpoint once, then moves the
    kernel's consumer position commit by commit: a crash in between leaves the kernel at any of them, and
    the seq the restart gives the first event read must be that event's seq (else `verify` sees a gap)."""
    ident = {"boot_id": "b", "ring_map_id": 1, "ev_stats_map_id": 2}
    ck = Checkpoint(tmp_path / "c.json", {"version": 1, "seq": {}, "ring": {}, "kernel": ident})
    ck.commit_ring(2 * STRIDE, 2, 2, 2 * STRIDE)
    ck.ring_applied(2 * STRIDE)                              # an earlier group, applied
    for pos, seq in ((5, 4), (9, 7), (12, 10)):               # one group: befores, one save, then afters
        ck.commit_ring(pos * STRIDE, seq, 3, 12 * STRIDE)
    ck.save()
    disk = Checkpoint(tmp_path / "c.json", json.loads((tmp_path / "c.json").read_text()))
    for kernel_at, seq in ((2, 2), (5, 4), (9, 7), (12, 10)):
        r = analyze_restart(disk, ident, kernel_at * STRIDE, STRIDE)
        assert (r.events_seq, r.duplicates_possible, r.lost) == (seq, 12 - kernel_at, {}), kernel_at
    ck.ring_applied(9 * STRIDE)
    assert [p // STRIDE for p, _ in ck.ring["unapplied"]] == [9, 12]       # the kernel's, then the rest


def test_drop_interval_is_cleared_only_when_durable_and_reexported_after_a_crash(tmp_path):
    durable = asyncio.Event()
    src, sink = FakeSource(), MemorySink(durable_gate=durable)
    keys = np.zeros(2, DROP_KEY)
    keys["family"] = 4
    vals = np.zeros(2, DROP_VAL)
    vals["packets"] = [5, 9]
    src.drains.append(DropDrain(keys, vals, {(1, 3): (4, 400)}, 1_000, 2_000, 0.001))
    builder = StubBuilder()
    pipe = Pipeline(cfg(tmp_path), src, builder, [sink], shutdown_timeout_s=1.0)

    async def one():
        task = await started(pipe)
        await until(lambda: len(sink.records) == 3)
        await asyncio.sleep(0.2)
        assert src.cleared == []                         # read, shipped, not durable: still in the kernel
        assert json.loads(pipe.checkpoint.path.read_text())["drain"]["n"] == 3
        pipe.stop()
        await task
    uvloop.run(one())
    first = [r for r in sink.records if r["hostwall"]["kind"] == "drop_summary"]
    marker = json.loads(pipe.checkpoint.path.read_text())["drain"]
    assert marker is not None and marker["gen"] == 0 and src.cleared == []
    # the next collector finds the interval in generation 0's map (the datapath writes gen 1 now)
    src.pending_gen[0] = DropDrain(keys, vals, {(1, 3): (4, 400)}, 0, 0, 0.0, 0)
    pipe2, records = next_run_until_cleared(tmp_path, src, StubBuilder())
    again = [r for r in records if r["hostwall"]["kind"] == "drop_summary"][:3]
    assert [r["event"]["id"] for r in again] == [r["event"]["id"] for r in first]     # same window, same ids
    assert seqs(again, "drop_summaries") == seqs(first, "drop_summaries") == [0, 1, 2]
    assert src.cleared[0].gen == 0 and json.loads(pipe2.checkpoint.path.read_text())["drain"] is None


def next_run_until_cleared(tmp_path, src: FakeSource, builder) -> tuple[Pipeline, list[dict]]:
    """The next collector over the same kernel state, run until it cleared a drop interval: it and its
    records."""
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), restarted(src), builder, [sink2])

    async def two():
        task = await started(pipe2)
        await until(lambda: len(src.cleared) >= 1)
        pipe2.stop()
        await task
    uvloop.run(two())
    return pipe2, sink2.records


def test_conntrack_claims_are_freed_once_durable(tmp_path):
    durable = asyncio.Event()
    src, sink = FakeSource(), MemorySink(durable_gate=durable)
    ct4, ent = L.DTYPES["hw_ct4_key"], L.DTYPES["hw_ct_entry"]
    e6 = (np.zeros(0, L.DTYPES["hw_ct6_key"]), np.zeros(0, ent))
    src.scans.append(CtScan([CtFamilyScan(4, np.zeros(2, ct4), np.zeros(2, ent), np.zeros(0, ct4), np.zeros(0, ent),
                                          np.array([7, 9]), np.zeros(2, ent)),
                             CtFamilyScan(6, *e6, *e6)], 10, 0, 0))
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink])

    async def go():
        task = await started(pipe)
        await until(lambda: len(sink.records) == 2)
        await asyncio.sleep(0.2)
        assert src.freed == []
        durable.set()
        sink.make_durable()
        await until(lambda: src.freed == [2])
        pipe.stop()
        await task
    uvloop.run(go())
    assert seqs(sink.records, "conntrack") == [0, 1]
    assert json.loads(pipe.checkpoint.path.read_text())["seq"]["conntrack"] == 2


class CtIdBuilder(StubBuilder):
    """Conntrack records whose event.id is the entry's first packet, as RecordBuilder's are (a pure
    function of the scan's snapshot), in its order: closes, idle ends, updates."""

    def on_conntrack(self, ek, ee, updates, clock, closed=None):
        out = []
        for kind, ents in (("close", closed[1] if closed else ()), ("end", ee), ("update", updates[1])):
            out += [self._rec("flow", f"{kind}-{int(c)}") for c in (ents["created_ns"] if len(ents) else ())]
        return out


def _ct_scan(closes: list[int], updates: list[int], first_slot: int) -> CtScan:
    """A v4 scan: closes claimed at consecutive slots (created_ns as given) and active-timeout updates."""
    ct4, ct6, ent = L.DTYPES["hw_ct4_key"], L.DTYPES["hw_ct6_key"], L.DTYPES["hw_ct_entry"]
    cl, up = np.zeros(len(closes), ent), np.zeros(len(updates), ent)
    cl["created_ns"], up["created_ns"] = closes, updates
    z4, z6 = (np.zeros(0, ct4), np.zeros(0, ent)), (np.zeros(0, ct6), np.zeros(0, ent))
    return CtScan([CtFamilyScan(4, *z4, np.zeros(len(updates), ct4), up, None, None, np.zeros(len(closes), ct4), cl,
                                np.arange(first_slot, first_slot + len(closes)), cl.copy()),
                   CtFamilyScan(6, *z6, *z6)], 10, 0, 0)


def test_a_conntrack_batch_not_durable_at_a_crash_is_sent_again_with_its_seqs(tmp_path):
    """The journal (collector/ct_journal.py): a scan batch whose records were fanned out but not durable
    when the collector stopped is rebuilt by the next start from its snapshot — same records, same seqs,
    before anything new — its claims are taken over (not reported again by the new scan) and released
    once durable; new records continue after it, so no seq ever names two events."""
    durable = asyncio.Event()
    src, sink = FakeSource(), MemorySink(durable_gate=durable)
    src.scans.append(_ct_scan([101, 102], [201], 7))
    pipe = Pipeline(cfg(tmp_path), src, CtIdBuilder(), [sink], shutdown_timeout_s=0.5)

    async def one():
        task = await started(pipe)
        await until(lambda: len(sink.records) == 3)
        assert len(pipe.ct_journal) == 1                 # journaled before it was fanned out
        pipe.stop()                                      # never durable: abandoned, as after a crash
        await task
    uvloop.run(one())
    first = [(r["event"]["id"], r["hostwall"]["seq"]) for r in sink.records]
    assert first == [("flow-close-101", 0), ("flow-close-102", 1), ("flow-update-201", 2)]
    assert src.freed == [] and json.loads(pipe.checkpoint.path.read_text())["seq"].get("conntrack", 0) == 0

    src2 = restarted(src)
    src2.scans.append(_ct_scan([103], [], 20))          # a new close; the journaled claims are not in it
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), src2, CtIdBuilder(), [sink2])

    async def two():
        task = await started(pipe2)
        await until(lambda: len(sink2.records) >= 4 and len(src2.freed) >= 2)
        await until(lambda: len(pipe2.ct_journal) == 0)
        pipe2.stop()
        await task
    uvloop.run(two())
    got = [(r["event"]["id"], r["hostwall"]["seq"]) for r in sink2.records if r["hostwall"]["stream"] == "conntrack"]
    assert got == first + [("flow-close-103", 3)]
    assert [len(f.closed_idx) for f in src2.adopted] == [2, 0]          # the journaled batch's claims
    assert src2.freed == [2, 1]                                          # released once durable, then the new one
    assert json.loads(pipe2.checkpoint.path.read_text())["seq"]["conntrack"] == 4


def test_the_claim_bit_is_the_collectors_own():
    flags = {k: v for k, v in L.C.items() if k.startswith("HW_CT_F_")}
    assert flags and all(not v & CT_F_CLAIMED for v in flags.values()), flags
    assert CT_F_CLAIMED not in (1, 2)                    # fin_seen bits 0 and 1: the FIN flags


def test_anomaly_records_survive_in_the_outbox_and_are_resent(tmp_path):
    class Detector:
        bucket_s = 0.05

        def __init__(self, n):
            self.n = n

        def observe(self, records):
            pass

        def tick(self, now=None):
            out, self.n = [{"event": {"id": f"anomaly-{i}"}, "hostwall": {"kind": "anomaly"}} for i in range(self.n)], 0
            return out

        def stats(self):
            return {}

        def open_anomalies(self):
            return []

    durable = asyncio.Event()
    src, sink = FakeSource(), MemorySink(durable_gate=durable)
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink], anomaly=Detector(2), shutdown_timeout_s=1.0)

    async def one():
        task = await started(pipe)
        await until(lambda: len(sink.records) == 2)
        pipe.stop()
        await task
    uvloop.run(one())
    assert len(Outbox(pipe.outbox.path).load()) == 2          # never durable: still in the outbox
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), restarted(src), StubBuilder(), [sink2], anomaly=Detector(1))

    async def two():
        task = await started(pipe2)
        await until(lambda: len(sink2.records) == 3 and not pipe2.outbox.path.exists())
        pipe2.stop()
        await task
    uvloop.run(two())
    got = [(r["event"]["id"], r["hostwall"]["seq"]) for r in sink2.records]
    assert got == [("anomaly-0", 0), ("anomaly-1", 1), ("anomaly-0", 2)]     # resent as they were, then new


def owned(stream, seq):
    return {"event": {"id": f"{stream}-{seq}"}, "hostwall": {"stream": stream, "seq": seq}}


def test_the_outbox_forgets_exactly_the_records_that_settled(tmp_path):
    """A restart resends the outbox grouped by stream, so its batches settle in another order than the
    lines were appended: settling the collector stream's two records must keep the anomaly between
    them (a count of leading lines would drop it, and a second crash would lose it; CI saw that gap)."""
    box = Outbox(tmp_path / "o.jsonl")
    for r in (owned("collector", 0), owned("anomaly", 7), owned("collector", 1)):
        box.append([r])
    again = Outbox(box.path)
    pending = again.load()
    again.settle([r for r in pending if r["hostwall"]["stream"] == "collector"])
    assert [r["event"]["id"] for r in Outbox(box.path).load()] == ["anomaly-7"]
    again.settle([owned("anomaly", 7)])
    assert not box.path.exists() and len(again) == 0


def test_a_batch_the_outbox_never_held_settles_nothing_else(tmp_path):
    box = Outbox(tmp_path / "o.jsonl")
    box.append([owned("anomaly", 0)])
    box.settle([owned("collector", 3), owned("collector", 4)])     # its append failed: no lines here
    assert [r["event"]["id"] for r in Outbox(box.path).load()] == ["anomaly-0"] and len(box) == 1


def test_the_outbox_makes_a_new_file_and_each_rewrite_durable_before_relying_on_it(tmp_path, monkeypatch):
    """A machine crash must find the outbox's unsettled records: the append that creates the file fsyncs
    the directory; a rewrite (settle) fdatasyncs the new file before renaming it over the old one and
    fsyncs the directory after, and an append does not create a file that exists."""
    import hostwall.collector.outbox as outbox_mod
    steps: list[tuple] = []
    real = os.fdatasync
    monkeypatch.setattr(outbox_mod, "fsync_dir", lambda d: steps.append(("dir", sorted(os.listdir(d)))))

    def fdatasync(fd):
        steps.append(("data", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    box = Outbox(tmp_path / "o.jsonl")
    box.append([owned("anomaly", 0)])
    box.append([owned("anomaly", 1)])
    assert steps == [("data", "o.jsonl"), ("dir", ["o.jsonl"]), ("data", "o.jsonl")], steps
    steps.clear()
    box.settle([owned("anomaly", 0)])
    tmp = f".o.jsonl.tmp{os.getpid()}"
    assert steps == [("data", tmp), ("dir", ["o.jsonl"])], steps
    assert [r["hostwall"]["seq"] for r in Outbox(box.path).load()] == [1]


def test_a_sink_loss_becomes_a_loss_record_with_the_seqs(tmp_path):
    class Lossy(BaseSink):
        def __init__(self):
            super().__init__("lossy")
            self.records = []

        async def _send(self, records):
            keep = [r for r in records if r["hostwall"]["seq"] % 10 != 3]
            self._lose_records("spool_full", [r for r in records if r["hostwall"]["seq"] % 10 == 3])
            self.records += records
            self._deliver(len(keep))

    src, sink = FakeSource(), Lossy()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink])

    async def go():
        task = await started(pipe)
        src.emit(30)
        await until(lambda: any(r["hostwall"]["kind"] == "loss" for r in sink.records))
        pipe.stop()
        await task
    uvloop.run(go())
    loss = [r for r in sink.records if r["hostwall"]["kind"] == "loss"]
    assert [(x["hostwall"]["loss"]["stream"], x["hostwall"]["loss"]["reason"], x["hostwall"]["loss"]["ranges"])
            for x in loss] == [("events", "spool_full", [[3, 3], [13, 13], [23, 23]])]
    assert loss[0]["hostwall"]["loss"]["sink"] == "lossy" and loss[0]["hostwall"]["loss"]["count"] == 3


def test_best_effort_sinks_are_not_waited_for(tmp_path):
    gate = asyncio.Event()
    src = FakeSource()
    slow = MemorySink("slow", FullQueuePolicy.DROP_OLDEST, gate=gate)
    assert slow.durability is Durability.BEST_EFFORT
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [slow])

    async def go():
        task = await started(pipe)
        src.emit(20)
        await until(lambda: src.rb.consumer_pos == 20 * STRIDE)    # nobody to wait for: released at once
        gate.set()
        pipe.stop()
        await task
    uvloop.run(go())


def test_acks_and_commit_log_order():
    async def go():
        acks, log = Acks(), CommitLog()
        done = []
        t = [acks.issue() for _ in range(3)]
        log.add(CommitEntry(t[0], lambda: done.append(0)))
        log.add(CommitEntry(None, lambda: done.append("x")))      # no ticket: waits for the one before
        log.add(CommitEntry(t[2], lambda: done.append(2)))
        log.add(CommitEntry(t[1], lambda: done.append(1)))
        assert log.take_ready() == ([], False)
        acks.advance(1)
        await asyncio.sleep(0)
        assert [e.before and e for e in log.take_ready()[0]] and done == [0, "x"]
        acks.advance(3)
        log.take_ready()
        assert done == [0, "x", 2, 1] and acks.open == 0
        t4 = acks.issue()
        log.add(CommitEntry(t4, lambda: done.append(4)))
        assert acks.abandon() == 1 and await t4.wait() is False
        assert log.take_ready() == ([], True) and done == [0, "x", 2, 1]
    asyncio.run(go())


def test_seq_ranges_merge_and_cap():
    r = SeqRanges()
    r.add([5, 3, 4, 9, 10, 1])
    assert r.ranges == [[1, 1], [3, 5], [9, 10]] and r.count == 6
    r.add(range(0, 5000, 2))
    assert r.count == 2506 and len(r.ranges) == 1         # over MAX_RANGES: the span, the count exact


@pytest.mark.parametrize("policy", ["none", "interval", "always"])
def test_jsonl_settles_on_its_fsync_policy(tmp_path, policy):
    from hostwall.collector.sinks.jsonl import JsonlSink

    async def go():
        s = JsonlSink(tmp_path / "f.jsonl", fsync=policy, fsync_interval_s=3600)
        await s.start()
        await s.send([{"event": {"id": "a"}}])
        after_send = s.settled_calls
        await s.flush()
        after_flush = s.settled_calls
        await s.close()
        return after_send, after_flush
    assert asyncio.run(go()) == {"none": (1, 1), "interval": (0, 1), "always": (1, 1)}[policy]


def test_loss_records_validate_as_ecs_and_ocsf(tmp_path):
    from pathlib import Path

    import jsonschema

    from hostwall.collector.encoders.ocsf import to_ocsf
    from hostwall.collector.loss_report import LossReporter
    from tests.conformance import ocsf as ocsf_check
    schema = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "loss.schema.json").read_text())
    rep = LossReporter("h1", "/sys/fs/bpf/hostwall/x")
    r = SeqRanges()
    r.add([1, 2, 9])
    recs = [rep.sink_loss("kafka://b:9092", "spool_full", "events", r),
            rep.restart({"previous": "crash", "lost": {"crash": 2}, "previous_pid": 7}, kernel_while_down={"budget": 3},
                        previous_run=None, seqs={"events": 10})]
    for i, rec in enumerate(recs):
        rec["hostwall"].update(seq=i, stream="collector")
        jsonschema.validate(rec, schema)
        assert ocsf_check.validate(to_ocsf(rec)) == [], ocsf_check.validate(to_ocsf(rec))
    assert recs[0]["hostwall"]["loss"]["ranges"] == [[1, 2], [9, 9]] and recs[1]["event"]["reason"] == "crash"


def test_an_anomaly_left_open_by_a_crash_is_closed_by_the_next_start(tmp_path):
    import time as _time
    from pathlib import Path

    import jsonschema

    from hostwall.collector.anomaly import AnomalyDetector, _Key
    from hostwall.collector.enrich.host import HostInfo

    det = AnomalyDetector(host=HostInfo("fw-1", version="0.1.0"))
    t_open = _time.time() - 30
    bucket = round(t_open / det.cfg.bucket_s) - 1
    k = _Key("drops", "source_prefix", "10.9.9.0/24", {"source_prefix": "10.9.9.0/24"},
             talkers={"10.9.9.7": {bucket: [40, 40, 4000]}})      # source -> {bucket: [count, packets, bytes]}
    opened = det._open(k, t_open, 900.0, 40.0)

    class Once:
        bucket_s = 0.05

        def __init__(self, recs):
            self.recs = recs

        def observe(self, records):
            pass

        def tick(self, now=None):
            out, self.recs = self.recs, []
            return out

        def stats(self):
            return {}

        def open_anomalies(self):
            return []

    src, sink = FakeSource(), MemorySink()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink], anomaly=Once([opened]))

    async def run(p, sink, n):
        task = await started(p)
        await until(lambda: len([r for r in sink.records if r["hostwall"]["kind"] == "anomaly"]) >= n
                    and not p.commits)
        p.stop()
        await task
    uvloop.run(run(pipe, sink, 1))
    ck = json.loads(pipe.checkpoint.path.read_text())
    assert list(ck["open_anomalies"]) == [opened["hostwall"]["anomaly"]["id"]]
    ck["clean_stop"] = False                               # as if it had been killed
    pipe.checkpoint.path.write_text(json.dumps(ck))
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), restarted(src), StubBuilder(), [sink2], anomaly=Once([]))
    uvloop.run(run(pipe2, sink2, 1))
    close = [r for r in sink2.records if r["hostwall"]["kind"] == "anomaly"]
    assert len(close) == 1 and close[0]["hostwall"]["anomaly"]["state"] == "close"
    assert close[0]["hostwall"]["anomaly"]["id"] == opened["hostwall"]["anomaly"]["id"]
    assert close[0]["event"]["reason"] == "collector restarted" and close[0]["hostwall"]["stream"] == "anomaly"
    schema = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "anomaly.schema.json").read_text())
    jsonschema.validate(close[0], schema)
    assert json.loads(pipe2.checkpoint.path.read_text())["open_anomalies"] == {}



def test_flow_summaries_ride_the_drop_interval_and_are_exported_again_after_a_crash(tmp_path):
    """The datapath's flow summaries are read with the drop interval of the same generation, numbered in
    its `drop_summaries` stream, counted by the ledger, and cleared with it only once durable; a restart
    exports them again with the same event ids and seqs."""
    from hostwall.collector.records import RecordBuilder
    from tests.collector.test_flood_records import drain as flow_drain
    from tests.collector.test_records import HOST

    def interval(gen: int = 0, t: int = 1_000) -> DropDrain:
        flows = flow_drain([(bytes([10, 66, 128, 0]), 24, 8080, 6, 0, "unconfirmed", 900, 900, 1800, 108_000),
                            (bytes([10, 66, 3, 0]), 24, 5353, 17, 0, "over_share", 50, 40, 40, 2_400)],
                           overflow={"over_share": (12, 0, 0, 0)})
        flows.gen = gen
        return DropDrain(np.zeros(0, DROP_KEY), np.zeros(0, DROP_VAL), {}, t, 2 * t, 0.001, gen, flows=flows)

    src, sink = FakeSource(), MemorySink(durable_gate=asyncio.Event())
    src.drains.append(interval())
    pipe = Pipeline(cfg(tmp_path), src, RecordBuilder(HOST, None), [sink], shutdown_timeout_s=1.0)

    async def one():
        task = await started(pipe)
        await until(lambda: len(sink.records) == 3)
        assert src.cleared == []                         # shipped, not durable: still in the kernel
        assert json.loads(pipe.checkpoint.path.read_text())["drain"]["n"] == 3
        pipe.stop()
        await task
    uvloop.run(one())
    first = [r for r in sink.records if r["hostwall"]["kind"] == "flow_summary"]
    assert len(first) == 3 and seqs(first, "drop_summaries") == [0, 1, 2]
    assert pipe.ledger.flow_counts["unconfirmed"]["flows"] == 900
    assert pipe.ledger.flow_counts["over_share"]["flows"] == 62
    src.pending_gen[0] = interval(0, 0)                  # the next collector finds generation 0 uncleared
    _, records = next_run_until_cleared(tmp_path, src, RecordBuilder(HOST, None))
    again = [r for r in records if r["hostwall"]["kind"] == "flow_summary"][:3]
    assert [r["event"]["id"] for r in again] == [r["event"]["id"] for r in first]     # same window, same ids
    assert seqs(again, "drop_summaries") == [0, 1, 2]
    assert src.cleared[0].flows is not None and src.cleared[0].flows.gen == 0


def test_connections_in_aggregate_end_in_the_scan_batch_and_its_journal(tmp_path):
    """Ends of connections counted in aggregate become flow summaries of the scan's `conntrack` batch; they
    are claimed and released like the other ends, and a batch not durable at a crash is rebuilt from the
    journal with the same summary (its window is journaled) and seq."""
    from hostwall.collector.records import RecordBuilder
    from tests.collector.test_records import HOST, ct4

    ct6, ent = L.DTYPES["hw_ct6_key"], L.DTYPES["hw_ct_entry"]
    rows = [ct4("10.66.9.1", "10.66.1.2", 40000 + i, 80, state=1, report=L.C["HW_REP_PENDING"]) for i in range(3)]
    keys, ents = np.concatenate([k for k, _ in rows]), np.concatenate([e for _, e in rows])
    z4 = (np.zeros(0, L.DTYPES["hw_ct4_key"]), np.zeros(0, ent))
    z6 = (np.zeros(0, ct6), np.zeros(0, ent))
    scan = CtScan([CtFamilyScan(4, *z4, *z4, np.array([3, 4, 5]), ents.copy(), *z4, None, None, keys, ents, 0),
                   CtFamilyScan(6, *z6, *z6)], 10, 0, 0)
    assert scan.expired == 3 and scan.closed == 0
    src, sink = FakeSource(), MemorySink(durable_gate=asyncio.Event())
    src.scans.append(scan)
    pipe = Pipeline(cfg(tmp_path), src, RecordBuilder(HOST, None), [sink], shutdown_timeout_s=0.5)

    async def one():
        task = await started(pipe)
        await until(lambda: len(sink.records) == 1)
        assert len(pipe.ct_journal) == 1
        pipe.stop()                                      # never durable
        await task
    uvloop.run(one())
    [rec] = sink.records
    assert (rec["hostwall"]["stream"], rec["hostwall"]["seq"]) == ("conntrack", 0)
    assert rec["hostwall"]["summary"] == {"kind": "unconfirmed", "flows": 3, "ended": 3, "origin": "conntrack_scan"}
    assert src.freed == []
    src2 = restarted(src)
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), src2, RecordBuilder(HOST, None), [sink2])

    async def two():
        task = await started(pipe2)
        await until(lambda: len(sink2.records) >= 1 and src2.freed == [3])
        await until(lambda: len(pipe2.ct_journal) == 0)
        pipe2.stop()
        await task
    uvloop.run(two())
    [again] = [r for r in sink2.records if r["hostwall"]["stream"] == "conntrack"]
    assert (again["event"]["id"], again["hostwall"]["seq"]) == (rec["event"]["id"], 0)
    assert [len(f.agg_keys) for f in src2.adopted] == [3, 0]


def test_a_detach_seen_at_the_stop_ends_the_tracked_connections_through_the_journal(tmp_path):
    """The enforcer detached (hw_config.detached_ns) after the last periodic scan, then the collector is
    stopped: the stop scans once more, so the connections the datapath still tracked get their flow end
    (end_reason detach, ended at the detach), journaled like every scan batch; not durable at the stop,
    the next start sends the same records with the same seqs and releases the claims then."""
    from hostwall.collector.records import RecordBuilder
    from tests.collector.test_records import HOST, T, ct4

    ct6, ent = L.DTYPES["hw_ct6_key"], L.DTYPES["hw_ct_entry"]
    rows = [ct4("10.66.9.1", "10.66.1.2", 40000, 80), ct4("10.66.9.1", "10.66.1.2", 5000, 53, proto=17)]
    keys, ents = np.concatenate([k for k, _ in rows]), np.concatenate([e for _, e in rows])
    z4 = (np.zeros(0, L.DTYPES["hw_ct4_key"]), np.zeros(0, ent))
    z6 = (np.zeros(0, ct6), np.zeros(0, ent))
    det = T + 9 * 10**9
    scan = CtScan([CtFamilyScan(4, *z4, *z4, np.array([3, 4]), ents.copy(), detached_keys=keys,
                                detached_entries=ents, detached_ns=det), CtFamilyScan(6, *z6, *z6)], 10, 0, 0, 0, det)
    src, sink = FakeSource(), MemorySink(durable_gate=asyncio.Event())
    pipe = Pipeline(cfg(tmp_path, ct_scan_interval_s=3600), src, RecordBuilder(HOST, None), [sink],
                    shutdown_timeout_s=0.5)

    async def one():
        task = await started(pipe)
        src.detached = det                               # the enforcer detaches after the last scan
        src.scans.append(scan)
        pipe.stop()                                      # never durable
        await task
    uvloop.run(one())
    ends = [r for r in sink.records if r["hostwall"]["stream"] == "conntrack"]
    assert [r["hostwall"]["flow"]["end_reason"] for r in ends] == ["detach", "detach"]
    assert [r["network"]["transport"] for r in ends] == ["tcp", "udp"]
    assert {r["event"]["end"] for r in ends} == {r["@timestamp"] for r in ends}
    assert all(r["event"]["duration"] == det - T and r["event"]["type"] == ["end"] for r in ends)
    assert [r["hostwall"]["seq"] for r in ends] == [0, 1] and src.freed == []
    assert pipe.status()["conntrack"]["detached"] == 2
    src2 = restarted(src)
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), src2, RecordBuilder(HOST, None), [sink2])

    async def two():
        task = await started(pipe2)
        await until(lambda: src2.freed == [2] and len(pipe2.ct_journal) == 0)
        pipe2.stop()
        await task
    uvloop.run(two())
    again = [r for r in sink2.records if r["hostwall"]["stream"] == "conntrack"]
    same = [(r["event"]["id"], r["hostwall"]["seq"], r["@timestamp"], r["event"]["duration"]) for r in again]
    assert same == [(r["event"]["id"], r["hostwall"]["seq"], r["@timestamp"], r["event"]["duration"]) for r in ends]
    assert [len(f.detached_keys) for f in src2.adopted] == [2, 0]


# ---- holes a kill -9 could open (found hunting the crash test's flakes) -----------------------------

def _ecs(stream, seq):
    return {"@timestamp": "2026-01-01T00:00:00Z", "event": {"id": f"{stream}-{seq}", "kind": "event"},
            "observer": {"hostname": "h"}, "hostwall": {"kind": "anomaly", "stream": stream, "seq": seq}}


def test_a_jsonl_line_torn_by_a_kill_does_not_swallow_the_next_runs_first_record(tmp_path):
    """A SIGKILL during a large write(2) leaves a short write: the file ends in part of a line, a batch
    never settled (it comes again). The next run's first line must not be glued to that fragment: one
    undecodable line of both would lose a record the sink settled (the restarted collector's first records
    are the outbox's anomalies: CI's crash test saw one anomaly seq missing from the JSONL file)."""
    from hostwall.collector.sinks.jsonl import JsonlSink
    from hostwall.collector.verify import Verifier, read_jsonl
    path = tmp_path / "f.jsonl"

    async def run(records, cut_last_write=0):
        s = JsonlSink(path, fsync="always")
        await s.start()
        await s.send(records)
        await s.close()
        if cut_last_write:                               # the kill tore the write: part of its last line
            os.truncate(path, path.stat().st_size - cut_last_write)
        return s
    asyncio.run(run([_ecs("anomaly", 0), _ecs("anomaly", 1)], cut_last_write=40))
    second = asyncio.run(run([_ecs("anomaly", 1), _ecs("anomaly", 2)]))  # 1 again (never settled), then new
    v = Verifier()
    for r in read_jsonl(path, v):
        v.add(r)
    (rep,) = v.report()
    assert (v.undecodable, rep.received, rep.unexplained) == (0, 3, []), (v.undecodable, rep.as_dict())
    assert second.stats()["torn_bytes"] > 0


def test_an_outbox_line_torn_by_a_kill_does_not_swallow_the_next_append(tmp_path):
    """A kill during the outbox's write(2) leaves part of a line (those records were never fanned out:
    counted `outbox_torn`). The next run appends after it: its first record must survive a second crash
    before anything settles (glued to the fragment it would be one more unreadable line, its seq a gap)."""
    box = Outbox(tmp_path / "o.jsonl")
    box.append([owned("anomaly", 0), owned("anomaly", 1)])
    os.truncate(box.path, box.path.stat().st_size - 5)          # the kill tore the last line
    second = Outbox(box.path)
    assert [r["event"]["id"] for r in second.load()] == ["anomaly-0"] and second.damaged == 1
    second.append([owned("anomaly", 1)])                        # the next run's record (same seq: never sent)
    third = Outbox(box.path)                                    # a second kill before anything settled
    assert [r["event"]["id"] for r in third.load()] == ["anomaly-0", "anomaly-1"] and third.damaged == 0


def test_the_checkpoint_keeps_the_kernels_position_while_later_commits_are_unapplied(tmp_path):
    """A commit group moves the consumer position commit by commit, and a later commit's kernel release
    awaits (a conntrack claim release runs on the kernel thread), so another task may write the checkpoint
    while the kernel is at an earlier commit. That file must still name the kernel's position and its
    seq: the fallback (one seq per slot) is wrong once a slot held no record (an undecodable event, a
    discarded reservation), and the restart would number events again with seqs off by that many."""
    ident = {"boot_id": "b", "ring_map_id": 1, "ev_stats_map_id": 2}
    ck = Checkpoint(tmp_path / "c.json", {"version": 1, "seq": {}, "ring": {}, "kernel": ident})
    ck.commit_ring(5 * STRIDE, 3, 5, 9 * STRIDE)             # 5 slots, 3 records (2 undecodable)
    ck.commit_ring(9 * STRIDE, 6, 4, 9 * STRIDE)             # 4 slots, 3 records
    ck.save()
    ck.ring_applied(5 * STRIDE)                              # the kernel is at 5 now ...
    ck.save()                                                # ... when a drop interval's checkpoint is written
    disk = Checkpoint(tmp_path / "c.json", json.loads((tmp_path / "c.json").read_text()))
    r = analyze_restart(disk, ident, 5 * STRIDE, STRIDE)
    assert (r.events_seq, r.duplicates_possible, r.lost) == (3, 4, {})


def test_a_sink_loss_is_in_the_outbox_before_the_kernel_lets_go_of_the_lost_records(tmp_path):
    """A sink that counts records lost settles them, and the pipeline then releases their kernel data.
    The sink's note of their seqs lives in memory until a loss record is made of it: a kill in between
    would leave a gap nothing explains. So the loss record must be in the outbox (or delivered) by the time
    the ring's consumer position moves past the lost events. The tick (which also reports sink losses) is
    stopped here, so only the commit path can have made it."""
    class Lossy(BaseSink):
        def __init__(self):
            super().__init__("lossy")
            self.records = []

        async def _send(self, records):
            self._lose_records("spool_full", [r for r in records if r["hostwall"].get("seq", 0) % 10 == 3])
            self.records += records
            self._deliver(len([r for r in records if r["hostwall"].get("seq", 0) % 10 != 3]))

    src, sink = FakeSource(), Lossy()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink])
    seen = {}

    async def go():
        task = await started(pipe)
        pipe._tasks["tick"].cancel()
        src.emit(30)
        await until(lambda: not src.rb.unread_bytes() and not src.rb.uncommitted_bytes())  # all 30 released
        box = Outbox(pipe.outbox.path).load() if pipe.outbox.path.exists() else []
        seen["loss"] = [r for r in box + sink.records if r["hostwall"]["kind"] == "loss"]
        pipe.stop()
        await task
    uvloop.run(go())
    explained = {s for x in seen["loss"] for a, b in x["hostwall"]["loss"]["ranges"] for s in range(a, b + 1)}
    assert explained == {3, 13, 23}, seen


def test_a_journaled_conntrack_batch_is_rebuilt_whatever_the_new_flow_table_holds(tmp_path):
    """RecordBuilder makes an expired entry whose end was reported already (a close claimed, not durable
    yet) into an end record only while its flow is still open in the builder's flow table. A restarted
    collector's table is another one, so rebuilding a journaled batch from the entries alone could make
    fewer records than were numbered: a seq gap, and later seqs naming other events. The journal keeps what
    the first build decided."""
    from hostwall.bpf.conntrack import REPORTED_CLAIMED
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.records import RecordBuilder
    from hostwall.collector.records.flowtable import OpenFlow
    ct4, ct6, ent = L.DTYPES["hw_ct4_key"], L.DTYPES["hw_ct6_key"], L.DTYPES["hw_ct_entry"]
    keys, ents = np.zeros(2, ct4), np.zeros(2, ent)
    keys["port_a"], keys["port_b"], keys["proto"] = [40001, 40002], 80, 6
    ents["created_ns"], ents["last_ns"], ents["end_ns"] = [10**9, 2 * 10**9], 5 * 10**9, 5 * 10**9
    ents["reported"][1] = REPORTED_CLAIMED                     # its close was claimed, never durable
    z6 = (np.zeros(0, ct6), np.zeros(0, ent))
    scan = CtScan([CtFamilyScan(4, keys, ents, np.zeros(0, ct4), np.zeros(0, ent), np.array([3, 4]), ents.copy()),
                   CtFamilyScan(6, *z6, *z6)], 2, 0, 0)
    host = HostInfo("h", "b", str(tmp_path / "pins"))
    first = RecordBuilder(host, None)
    for k, e in first._ct_rows(keys, ents):                     # run A's table still has both flows open
        first.flows.open(first._ct_key(k, e), OpenFlow(int(e["created_ns"]), int(e["end_ns"]), 0, 0))
    src, sink = FakeSource(), MemorySink(durable_gate=asyncio.Event())
    src.scans.append(scan)
    pipe = Pipeline(cfg(tmp_path), src, first, [sink], shutdown_timeout_s=0.5)

    async def one():
        task = await started(pipe)
        await until(lambda: len(sink.records) == 2)
        pipe.stop()                                           # never durable: as after a crash
        await task
    uvloop.run(one())
    before = [(r["event"]["id"], r["hostwall"]["seq"]) for r in sink.records]
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), restarted(src), RecordBuilder(host, None), [sink2])   # an empty flow table

    async def two():
        task = await started(pipe2)
        await until(lambda: len(pipe2.ct_journal) == 0 and len(src.freed) >= 1)
        pipe2.stop()
        await task
    uvloop.run(two())
    again = [(r["event"]["id"], r["hostwall"]["seq"]) for r in sink2.records if r["hostwall"]["stream"] == "conntrack"]
    assert again == before and [s for _, s in before] == [0, 1], (before, again)


def test_a_torn_jsonl_line_that_cannot_be_cut_is_ended_by_a_newline(tmp_path, monkeypatch):
    """An append-only file (chattr +a) cannot be truncated: the sink must still start, and end the
    fragment with a newline so the next record stays a line of its own."""
    import errno

    from hostwall.collector.sinks.jsonl import JsonlSink
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"whole": 1}\n{"torn')

    def refuse(fd, n):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "ftruncate", refuse)

    async def go():
        s = JsonlSink(path, fsync="always")
        await s.start()
        await s.send([_ecs("anomaly", 0)])
        await s.close()
        return s
    s = asyncio.run(go())
    lines = path.read_bytes().split(b"\n")
    assert lines[:2] == [b'{"whole": 1}', b'{"torn'] and json.loads(lines[2])["hostwall"]["seq"] == 0, lines
    assert s.stats()["torn_bytes"] == len(b'{"torn')


def test_an_outbox_whose_torn_line_cannot_be_cut_starts_the_next_append_on_a_new_line(tmp_path, monkeypatch):
    box = Outbox(tmp_path / "o.jsonl")
    box.append([owned("anomaly", 0), owned("anomaly", 1)])
    os.truncate(box.path, box.path.stat().st_size - 5)
    second = Outbox(box.path)
    monkeypatch.setattr(second, "_rewrite", lambda sync=False: False)      # a full disk: no room for the tmp copy
    assert [r["event"]["id"] for r in second.load()] == ["anomaly-0"]
    second.append([owned("anomaly", 1)])
    third = Outbox(box.path)
    assert [r["event"]["id"] for r in third.load()] == ["anomaly-0", "anomaly-1"] and third.damaged == 1


def test_events_the_final_drain_read_but_could_not_queue_by_the_deadline_are_counted_requeued(tmp_path):
    """Shutdown with a slow sink and a full ring: the last ring drain reads batch after batch and waits for
    room in the events queue when the shutdown deadline comes. The batch it holds then stays in the kernel
    (never committed) and is counted `requeued` like the rest read but not built: every event read is
    produced (built, or requeued) — `status` adds up."""
    class Slow(MemorySink):
        async def _send(self, records):
            await asyncio.sleep(0.02)
            await super()._send(records)

    src, sink = FakeSource(), Slow()
    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=1, sink=10, batch=5)), src, StubBuilder(), [sink],
                    shutdown_timeout_s=0.5)

    async def go():
        task = await started(pipe)
        src.emit(500)
        await until(lambda: len(sink.records) >= 20)
        pipe.stop()
        await task
    uvloop.run(go())
    read = pipe.counters["events_read"]
    assert read > len(sink.records) and pipe.ledger.produced_by["events"] == read, (read, dict(pipe.ledger.produced_by))
    assert pipe.ledger.check(quiescent=True) == []


def test_the_first_scan_after_a_restart_summarises_from_the_last_durable_scan(tmp_path):
    """Flow summaries of connections in aggregate that ended cover the time since the previous scan
    (docs/records.md "Time": a summary carries its interval). The first scan of a restarted collector
    covers the time since the last run's last durable scan (checkpoint ct_last_scan), not an empty window."""
    from hostwall.collector.records import RecordBuilder, iso_ns
    from tests.collector.test_records import HOST, ct4

    src, sink = FakeSource(), MemorySink()
    pipe = Pipeline(cfg(tmp_path), src, RecordBuilder(HOST, None), [sink])

    async def one():
        task = await started(pipe)
        await until(lambda: pipe.counters["ct_scans"] >= 2)
        pipe.stop()
        await task
    uvloop.run(one())
    last = int(json.loads(pipe.checkpoint.path.read_text())["ct_last_scan"])    # committed at the stop
    ent = L.DTYPES["hw_ct_entry"]
    rows = [ct4("10.66.9.1", "10.66.1.2", 40000 + i, 80, state=1, report=L.C["HW_REP_PENDING"]) for i in range(2)]
    keys, ents = np.concatenate([k for k, _ in rows]), np.concatenate([e for _, e in rows])
    z4 = (np.zeros(0, L.DTYPES["hw_ct4_key"]), np.zeros(0, ent))
    src2 = restarted(src)
    src2.scans.append(CtScan([CtFamilyScan(4, *z4, *z4, np.array([3, 4]), ents.copy(), *z4, None, None, keys, ents,
                                           0)], 10, 0, 0))
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), src2, RecordBuilder(HOST, None), [sink2])

    async def two():
        task = await started(pipe2)
        await until(lambda: any(r["hostwall"]["kind"] == "flow_summary" for r in sink2.records))
        pipe2.stop()
        await task
    uvloop.run(two())
    [rec] = [r for r in sink2.records if r["hostwall"]["kind"] == "flow_summary"]
    assert rec["event"]["start"] == iso_ns(src.monotonic_to_wall() + last) < rec["event"]["end"], rec["event"]
