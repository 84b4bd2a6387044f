"""collector.pipeline with a fake kernel (a synthetic ring buffer and canned drop/conntrack results),
a stand-in record builder and in-memory sinks: delivery, back-pressure, full-queue policies, loss
accounting, task failures, signals, shutdown, the status file. One test runs the real RecordBuilder
and JSONL sink end to end."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter

import numpy as np
import pytest
import uvloop

from hostwall.bpf import layout as L
from hostwall.collector.accounting import Ledger
from hostwall.collector.config import QueueSizes
from hostwall.collector.kernel import CtFamilyScan, CtScan, DropDrain
from hostwall.collector.pipeline import Pipeline, PipelineFailed, RecordQueue
from hostwall.collector.sinks.base import FullQueuePolicy
from tests.collector.fakes import DROP_KEY, DROP_VAL, FakeSource, MemorySink, StubBuilder, cfg, started, until


def status(tmp_path) -> dict:
    return json.loads((tmp_path / "status.json").read_text())


def denies(sink) -> int:
    return sum(r["hostwall"]["kind"] == "deny" for r in sink.records)


# ---- tests --------------------------------------------------------------------------------------

def test_events_are_delivered_and_the_ledger_balances(tmp_path):
    src, sink = FakeSource(), MemorySink()
    pipe = Pipeline(cfg(tmp_path, event_budget=1234), src, StubBuilder(), [sink])

    async def go():
        task = await started(pipe)
        assert src.emit(300) == 300
        await until(lambda: len(sink.records) == 300)
        src.emit(5)                                      # emitted right before the stop: still shipped
        pipe.stop()
        await task
    uvloop.run(go())
    assert [r["ident"] for r in sink.records if r["hostwall"]["kind"] == "deny"] == list(range(305))
    assert src.budget == 1234 and src.closed and src.rb.closed and sink.closed
    st = status(tmp_path)
    assert st["state"] == "stopped" and st["ledger"]["ok"] and st["ledger"]["quiescent_violations"] == []
    assert st["ledger"]["produced_by_source"]["events"] == 305
    b = st["ledger"]["sinks"]["mem"]
    assert b == {**b, "produced": 305, "delivered": 305, "lost": 0, "in_flight": 0}
    assert st["ring"] == {} or st["ring"]["backlog_bytes"] == 0


def test_decode_errors_and_kernel_losses_are_counted(tmp_path):
    src, sink = FakeSource(), MemorySink()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink])

    async def go():
        task = await started(pipe)
        src.emit(10, bad_len=3)
        src.loss["deny"]["budget"] = 7                   # the kernel refused 7 events since start
        src.loss["deny"]["ringbuf_full"] = 2
        await until(lambda: len(sink.records) == 10 and pipe.ledger.lost_upstream == 12)
        pipe.stop()
        await task
    uvloop.run(go())
    led = pipe.ledger
    assert dict(led.lost_by["decode"]) == {"length": 3}
    assert dict(led.lost_by["kernel"]) == {"budget": 7, "ringbuf_full": 2}
    assert led.balance("mem") == {"produced": 22, "delivered": 10, "lost": 12, "in_flight": 0}
    assert led.check(quiescent=True) == []


def test_drop_summaries_overflow_and_conntrack_reach_the_builder(tmp_path):
    src, sink, builder = FakeSource(), MemorySink(), StubBuilder()
    keys = np.zeros(2, DROP_KEY)
    keys["family"], keys["verdict"], keys["reason"] = 4, 1, 2
    vals = np.zeros(2, DROP_VAL)
    vals["packets"] = [5, 9]
    src.drains.append(DropDrain(keys, vals, {(1, 3): (4, 400)}, 1_000, 2_000, 0.001))
    ct4 = L.DTYPES["hw_ct4_key"]
    ent = L.DTYPES["hw_ct_entry"]
    src.scans.append(CtScan([CtFamilyScan(4, np.zeros(3, ct4), np.zeros(3, ent), np.zeros(1, ct4), np.zeros(1, ent)),
                             CtFamilyScan(6, np.zeros(0, L.DTYPES["hw_ct6_key"]), np.zeros(0, ent),
                                          np.zeros(0, L.DTYPES["hw_ct6_key"]), np.zeros(0, ent))], 10, 0, 1))
    pipe = Pipeline(cfg(tmp_path), src, builder, [sink])

    async def go():
        task = await started(pipe)
        await until(lambda: len(sink.records) >= 7)
        pipe.stop()
        await task
    uvloop.run(go())
    kinds = Counter(r["hostwall"]["kind"] for r in sink.records)
    assert kinds == {"drop_summary": 3, "flow": 4}
    assert builder.drop_windows[0] == (src.monotonic_to_wall() + 1_000, src.monotonic_to_wall() + 2_000)
    assert builder.ct_families == [3]                    # the empty v6 family is not sent
    assert pipe.ledger.drop_packets == {"summarized": 14, "overflow": 4}
    st = status(tmp_path)
    assert st["conntrack"]["expired"] == 3 and st["conntrack"]["updates"] == 1 and st["drops"]["packets"] == 14


def test_back_pressure_stops_reading_the_ring_and_loses_nothing(tmp_path):
    gate = asyncio.Event()
    src, sink = FakeSource(), MemorySink(gate=gate)
    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=1, sink=10, batch=5)), src, StubBuilder(), [sink])

    async def go():
        task = await started(pipe)
        src.emit(100)
        # back-pressure reached the reader: the sink holds one batch, its queue and the events queue are full
        await until(lambda: pipe.slots[0].queue.size == 10 and pipe._events_q.full())
        await asyncio.sleep(0.1)                          # and it stays so: the reader reads no further
        unread = src.rb.unread_bytes() // 128
        assert 55 <= unread < 100                         # reading stopped: the rest waits in the ring
        assert src.rb.available_bytes() // 128 == 100     # and nothing is released before it is durable
        assert pipe.ledger.lost_upstream == 0 and not pipe.ledger.lanes["mem"].lost
        gate.set()
        await until(lambda: len(sink.records) == 100)
        pipe.stop()
        await task
    uvloop.run(go())
    assert [r["ident"] for r in sink.records] == list(range(100))
    assert pipe.ledger.check(quiescent=True) == []


def test_a_busy_sink_gets_what_queued_meanwhile_in_one_call_settled_batch_by_batch(tmp_path):
    """The adaptive flush (docs/collector.md "Delivery and loss"): each batch alone while the sink keeps
    up, what queued up while it was busy in one call (up to queues.batch records); that call settles as
    as many batches as it holds, so the ring is released exactly up to what is durable."""
    gate, durable = asyncio.Event(), asyncio.Event()
    src, sink = FakeSource(), MemorySink(gate=gate, durable_gate=durable)
    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=4, sink=1000, batch=10)), src, StubBuilder(), [sink])

    async def go():
        task = await started(pipe)
        src.emit(3)
        await until(lambda: sink.in_flight == 3)          # the first call waits at the sink's gate
        for k in range(1, 5):                             # four more batches of 3 queue up behind it
            src.emit(3)
            await until(lambda k=k: pipe.slots[0].queue.size == 3 * k)
        gate.set()
        await until(lambda: len(sink.records) == 15)
        assert sink.sends == [3, 9, 3]                    # 3 + 3 + 3 fit the limit of 10; the fourth waits
        assert pipe.acks.issued == 5 and sink.batches == 5
        assert sink.settled_calls == 0 and sink.unsettled_calls == 5
        assert src.rb.consumer_pos == 0                   # nothing durable: nothing released
        durable.set()
        sink.make_durable()
        await until(lambda: src.rb.consumer_pos == src.rb.producer_pos)
        assert sink.settled_calls == 5 and sink.unsettled_calls == 0
        src.emit(2)                                       # the sink keeps up again: a batch alone
        await until(lambda: len(sink.records) == 17)
        pipe.stop()
        await task
    uvloop.run(go())
    assert sink.sends[-1] == 2
    assert [r["ident"] for r in sink.records] == list(range(17))
    assert pipe.ledger.check(quiescent=True) == []


def test_drop_oldest_sink_sheds_and_counts_while_a_blocking_sink_gets_everything(tmp_path):
    gate, fast, lossy, src, pipe = shedding_pipe(tmp_path, 20)

    async def go():
        task = await started(pipe)
        for _ in range(5):
            src.emit(100)
            await until(lambda: src.rb.available_bytes() == 0)
        await until(lambda: denies(fast) == 500)
        gate.set()
        pipe.stop()
        await task
    uvloop.run(go())
    led = pipe.ledger
    assert denies(fast) == 500                           # (and the loss records naming what lossy shed)
    shed = led.lanes["lossy"].lost["queue_full"]
    assert shed > 0 and len(lossy.records) + shed == led.produced
    assert led.check(quiescent=True) == []
    assert status(tmp_path)["queues"]["sinks"]["lossy"]["dropped"] == shed


def test_a_failing_task_stops_the_service_with_its_name(tmp_path):
    src, sink = FakeSource(), MemorySink()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(fail_on_events=True), [sink])

    async def go():
        task = await started(pipe)
        src.emit(3)
        await task
    with pytest.raises(PipelineFailed, match=r"^events: ValueError: cannot build"):
        uvloop.run(go())
    st = status(tmp_path)
    assert st["state"] == "failed" and st["error"].startswith("events: ValueError")
    assert sink.closed and src.closed
    led = pipe.ledger                                    # the batch being built is counted lost
    assert dict(led.lost_by["build"]) == {"error": 3} and led.check(quiescent=True) == []


def test_a_failing_sink_stops_the_service_and_its_records_are_counted(tmp_path):
    src, sink = FakeSource(), MemorySink(fail_after=10)
    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=4, sink=1000, batch=10)), src, StubBuilder(), [sink])

    async def go():
        task = await started(pipe)
        src.emit(50)
        await task
    with pytest.raises(PipelineFailed, match=r"^sink mem: OSError: disk on fire"):
        uvloop.run(go())
    lane = pipe.ledger.lanes["mem"]
    assert lane.delivered == 10 and lane.lost["sink_error"] == 10
    assert pipe.ledger.check(quiescent=True) == []


def test_sigterm_stops_cleanly_and_flushes(tmp_path):
    src, sink = FakeSource(), MemorySink()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink])

    async def go():
        task = asyncio.ensure_future(pipe.run(install_signals=True))
        await until(lambda: pipe.state == "running")
        src.emit(20)
        await until(lambda: len(sink.records) == 20)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)
    uvloop.run(go())
    assert sink.flushes >= 1 and sink.closed and status(tmp_path)["state"] == "stopped"


def test_sink_that_cannot_start_fails_before_touching_the_kernel(tmp_path):
    class NoStart(MemorySink):
        async def start(self):
            raise OSError("permission denied: /var/log/x")

    src = FakeSource()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [NoStart()])
    with pytest.raises(PipelineFailed, match="permission denied"):
        uvloop.run(pipe.run())
    assert src.budget is None


def test_audit_log_is_shipped_once_and_resumed(tmp_path):
    audit = tmp_path / "audit.jsonl"
    audit.write_text('{"event": {"action": "policy-apply"}, "n": 1}\n{"event": {"action": "policy-apply"}, "n": 2}\n'
                     '{"partial": ')                     # an unfinished line waits for its newline
    src, sink = FakeSource(), MemorySink()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink], audit_log=audit)

    async def go(p, want: int):
        task = await started(p)
        await until(lambda: len([r for r in p.slots[0].sink.records if r["hostwall"]["kind"] == "audit"]) == want)
        p.stop()
        await task
    uvloop.run(go(pipe, 2))
    assert [r["n"] for r in sink.records if r["hostwall"]["kind"] == "audit"] == [1, 2]
    with open(audit, "a") as f:
        f.write('"x"}\n{"n": 3}\n')
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), FakeSource(), StubBuilder(), [sink2], audit_log=audit)
    uvloop.run(go(pipe2, 2))
    assert [r.get("n", r.get("partial")) for r in sink2.records] == ["x", 3]


def test_dns_log_is_numbered_in_its_stream_resent_until_durable_and_its_losses_counted(tmp_path):
    """The DNS proxy's decision log follows the delivery contract: records in stream `dns` with seqs, the
    offset checkpointed only once they are durable (a run whose sink never made them durable leaves them
    for the next, same seqs), lines that are no record and records the proxy never wrote are counted."""
    log = tmp_path / "fw.dns.jsonl"
    log.write_text('{"n": 1}\n{"n": 2}\nnot a record\n')

    def dns(sink):
        return [r for r in sink.records if r["hostwall"]["kind"] == "dns"]

    async def go(p, want: int, then=None):
        task = await started(p)
        await until(lambda: len(dns(p.slots[0].sink)) == want)
        if then is not None:
            await then(p)
        p.stop()
        await task

    src = FakeSource()
    src.loss["dns"] = {"emitted": 2, "budget": 0, "write_error": 0}

    async def proxy_loses(p):                   # the proxy suppressed 5 records and could not write 1
        src.loss["dns"] = {"emitted": 2, "budget": 5, "write_error": 1}
        await until(lambda: p.ledger.lost_by["kernel"]["write_error"] == 1)
        assert p.ledger.lost_by["kernel"]["budget"] == 5
        assert p.ledger.lost_by["decode"]["dns_line"] == 1

    never = MemorySink(durable_gate=asyncio.Event())     # shipped, never durable
    uvloop.run(go(Pipeline(cfg(tmp_path), src, StubBuilder(), [never], dns_log=log), 2, proxy_loses))
    first = [(r["n"], r["hostwall"]["stream"], r["hostwall"]["seq"]) for r in dns(never)]
    assert first == [(1, "dns", 0), (2, "dns", 1)]

    sink = MemorySink()
    uvloop.run(go(Pipeline(cfg(tmp_path), FakeSource(), StubBuilder(), [sink], dns_log=log), 2))
    assert [(r["n"], r["hostwall"]["seq"]) for r in dns(sink)] == [(1, 0), (2, 1)], "sent again, same seqs"
    assert status(tmp_path)["dns"]["offset"] == log.stat().st_size

    with open(log, "a") as f:
        f.write('{"n": 3}\n')
    sink = MemorySink()
    uvloop.run(go(Pipeline(cfg(tmp_path), FakeSource(), StubBuilder(), [sink], dns_log=log), 1))
    assert [(r["n"], r["hostwall"]["seq"]) for r in dns(sink)] == [(3, 2)], "durable ones are not sent again"


def test_status_file_shows_queues_backlog_and_components(tmp_path):
    gate = asyncio.Event()
    src, sink = FakeSource(), MemorySink(gate=gate)

    class Enricher:
        def enrich(self, r):
            r["enriched"] = True

        def stats(self):
            return {"hit_rate": 0.5}

        def close(self):
            pass

    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=1, sink=10, batch=5)), src, StubBuilder(), [sink],
                    enricher=Enricher())

    async def go():
        task = await started(pipe)
        src.emit(100)
        await until(lambda: pipe.slots[0].queue.size == 10 and pipe._events_q.full())
        t = time.time()
        await until(lambda: status(tmp_path)["updated_at"] > t)       # a status written since
        st = status(tmp_path)
        assert st["state"] == "running" and st["ring"]["backlog_bytes"] > 0
        assert st["queues"]["sinks"]["mem"]["depth"] == 10 and st["queues"]["sinks"]["mem"]["policy"] == "block"
        assert st["enricher"] == {"hit_rate": 0.5} and st["builder"]["events"] >= 1
        assert st["ledger"]["ok"], st["ledger"]["violations"]
        assert st["ledger"]["sinks"]["mem"]["in_flight"] > 0
        gate.set()
        pipe.stop()
        await task
    uvloop.run(go())
    assert all(r["enriched"] for r in sink.records)


def test_record_queue_bounds_in_records():
    async def go():
        q = RecordQueue(10)
        q.put_nowait([1] * 8)
        assert not q.has_room(3) and q.has_room(2)
        waiter = asyncio.ensure_future(q.wait_room(3))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        assert await q.get() == [1] * 8
        await asyncio.wait_for(waiter, 1)
        q.put_nowait([2] * 50)                           # an oversized batch fits an empty queue
        q.close()
        assert len(await q.get()) == 50 and await q.get() is None
    uvloop.run(go())


def test_record_queue_get_many_takes_what_waited_up_to_the_limit():
    async def go():
        q = RecordQueue(100)
        assert await q.get_many(10, timeout=0.01) is None             # nothing queued: times out
        for k in (4, 4, 3, 1):
            q.put_nowait([k] * k)
        assert await q.get_many(10) == [[4] * 4, [4] * 4]              # 4 + 4 fit, + 3 would not
        assert q.size == 4
        assert await q.get_many(2) == [[3] * 3]                        # the first batch, whatever its size
        assert await q.get_many(10) == [[1]] and q.size == 0
        q.close()
        assert await q.get_many(10) is None
    uvloop.run(go())


def test_real_record_builder_and_jsonl_end_to_end(tmp_path):
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.records import RecordBuilder
    from hostwall.collector.sinks.jsonl import JsonlSink

    src = FakeSource()
    out = tmp_path / "flows.jsonl"
    sink = JsonlSink(out, fsync="none")
    ledger = Ledger([sink.name])
    builder = RecordBuilder(HostInfo(hostname="h1", boot_id="b", pin_dir="/p"), None, ledger)
    pipe = Pipeline(cfg(tmp_path), src, builder, [sink], ledger=ledger)

    async def go():
        task = await started(pipe)
        src.emit(40)
        await until(lambda: sink.delivered == 40)
        pipe.stop()
        await task
    uvloop.run(go())
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 40 and len({r["event"]["id"] for r in recs}) == 40
    assert all(r["hostwall"]["kind"] == "deny" and r["observer"]["hostname"] == "h1" for r in recs)
    assert ledger.check(quiescent=True) == []


def test_console_sink_summarises_flows_drops_and_anomalies():
    import io

    from rich.console import Console

    from hostwall.collector.sinks.console import ConsoleSink

    buf = io.StringIO()
    sink = ConsoleSink(console=Console(file=buf, width=140, force_terminal=False), refresh_hz=50)
    flow = {"hostwall": {"kind": "flow"}, "network": {"transport": "tcp", "bytes": 9000, "packets": 7},
            "source": {"ip": "10.0.0.9", "port": 40000}, "destination": {"ip": "10.0.0.1", "port": 443}}
    small = {**flow, "network": {"transport": "udp", "bytes": 10, "packets": 1}}
    drop = {"hostwall": {"kind": "drop_summary", "reason": "syn_flood", "verdict": "drop"},
            "network": {"packets": 1234}}
    anomaly = {"hostwall": {"kind": "anomaly", "anomaly": {"state": "open", "severity": "high"}},
               "message": "drops anomaly open: source_prefix 198.51.100.0/24 at 900.0/s"}

    async def go():
        await sink.start()
        await sink.send([flow, small, drop, drop, anomaly])
        await asyncio.sleep(0.05)
        await sink.close()
    uvloop.run(go())
    out = buf.getvalue()
    assert "10.0.0.9:40000" in out and "9.0k" in out and "syn_flood" in out and "2.5k" in out
    assert "198.51.100.0/24 at 900.0/s" in out and "[high]" in out
    assert sink.stats()["delivered"] == 5 and sink.full_queue_policy is FullQueuePolicy.DROP_OLDEST
    s = sink.summary
    assert s.kinds == {"flow": 2, "drop_summary": 2, "anomaly": 1} and s.drops[("syn_flood", "drop")] == 2468


def test_a_console_sink_runs_best_effort_next_to_a_blocking_sink(tmp_path):
    """console is best_effort (docs/collector.md "End-to-end acknowledgement"): the pipeline accepts it
    with its drop_oldest queue and never waits for it to release kernel data."""
    import io

    from rich.console import Console

    from hostwall.collector.sinks.console import ConsoleSink

    src, mem = FakeSource(), MemorySink()
    con = ConsoleSink(console=Console(file=io.StringIO(), width=120, force_terminal=False), refresh_hz=20)
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [mem, con])
    assert [s.acknowledges for s in pipe.slots] == [True, False]

    async def go():
        task = await started(pipe)
        src.emit(50)
        await until(lambda: len(mem.records) == 50 and src.rb.available_bytes() == 0)
        pipe.stop()
        await task
    uvloop.run(go())
    assert con.summary.kinds["deny"] == 50
    assert pipe.ledger.balance("console") == {"produced": 50, "delivered": 50, "lost": 0, "in_flight": 0}


def shedding_pipe(tmp_path, sink_capacity: int):
    """A `fast` block sink and a `lossy` drop_oldest sink stalled until the gate is set."""
    gate = asyncio.Event()
    fast, lossy = MemorySink("fast"), MemorySink("lossy", FullQueuePolicy.DROP_OLDEST, gate=gate)
    src = FakeSource()
    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=2, sink=sink_capacity, batch=10)), src, StubBuilder(),
                    [fast, lossy])
    return gate, fast, lossy, src, pipe


def lossy_reports(fast: MemorySink) -> list[dict]:
    """The loss records about sink `lossy` that sink `fast` got."""
    return [r["hostwall"]["loss"] for r in fast.records
            if r["hostwall"]["kind"] == "loss" and r["hostwall"]["loss"]["sink"] == "lossy"]


def named_and_got(fast: MemorySink, lossy: MemorySink) -> tuple[set, set]:
    """(events seqs named queue_full in loss records, events seqs sink `lossy` got)."""
    got = {r["hostwall"]["seq"] for r in lossy.records if r["hostwall"]["kind"] == "deny"}
    named = {q for x in lossy_reports(fast) if x["reason"] == "queue_full" and x["stream"] == "events"
             for lo, hi in x["ranges"] for q in range(lo, hi + 1)}
    return named, got


def test_records_a_drop_oldest_sink_sheds_are_named_in_loss_records(tmp_path):
    """queue_full is a sink loss like any other (docs/records.md "Completeness"): the seqs the pipeline
    shed in front of a drop_oldest sink are in loss records, so that sink's consumer can tell the gap from
    a loss after the collector."""
    gate, fast, lossy, src, pipe = shedding_pipe(tmp_path, 20)

    async def go():
        task = await started(pipe)
        src.emit(300)
        await until(lambda: denies(fast) == 300)
        shed = pipe.ledger.lanes["lossy"].lost["queue_full"]
        assert shed > 0
        await until(lambda: sum(x["count"] for x in lossy_reports(fast)) == shed)
        gate.set()
        pipe.stop()
        await task
    uvloop.run(go())
    named, got = named_and_got(fast, lossy)
    assert named and not named & got and named | got == set(range(300))


def test_a_steadily_shedding_sink_gets_one_loss_record_per_tick_not_per_commit(tmp_path):
    """What the pipeline sheds in front of a best_effort sink never holds back the kernel release, so it is
    reported on the 1 s tick, one record per (sink, stream, reason) — not before every commit (up to 100/s),
    each with an outbox append (fdatasync on the loop) and a fan-out (docs/collector.md "Delivery and loss")."""
    gate, fast, lossy, src, pipe = shedding_pipe(tmp_path, 50)
    appends: list[int] = []
    real = pipe.outbox.append

    def counting(recs):
        appends.append(len(recs))
        return real(recs)
    pipe.outbox.append = counting

    async def go():
        task = await started(pipe)
        src.emit(100)
        await until(lambda: denies(fast) == 100)
        n0, c0, r0 = len(appends), pipe.counters["commits"], len(lossy_reports(fast))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while loop.time() - t0 < 1.0:               # the workload: 1000 events/s for a second
            src.emit(10)
            await asyncio.sleep(0.01)
        commits, records, outbox = pipe.counters["commits"] - c0, len(lossy_reports(fast)) - r0, len(appends) - n0
        gate.set()
        pipe.stop()
        await task
        return commits, records, outbox
    commits, records, outbox = uvloop.run(go())
    assert commits >= 20                            # the pipeline committed steadily meanwhile
    assert records <= 2 and outbox <= 2, (commits, records, outbox)     # ≤ 2 ticks in the second
    named, got = named_and_got(fast, lossy)
    assert named and not named & got and named | got == set(range(pipe.seq["events"]))   # all named, later


def test_what_a_best_effort_sink_lost_before_a_task_failure_is_kept_in_a_loss_record(tmp_path):
    """A task failure stops the pipeline without the last commit (nothing more is released). What it shed
    in front of a best_effort sink was released with the commits before the failure, so its loss records
    are due then and must be kept (the outbox: the next start sends them), not dropped with the tick that
    never came."""
    from hostwall.collector.outbox import Outbox
    gate, fast, lossy, src, pipe = shedding_pipe(tmp_path, 20)

    async def go():
        task = await started(pipe)
        src.emit(200)
        await until(lambda: denies(fast) == 200)
        await until(lambda: pipe.commits.committed > 5)
        shed = pipe.ledger.lanes["lossy"].lost["queue_full"]
        pipe._fail("ring", RuntimeError("boom"))       # as a task failure (what _watch does)
        gate.set()
        with pytest.raises(PipelineFailed):
            await task
        return shed
    shed = uvloop.run(go())
    kept = [r["hostwall"]["loss"] for r in Outbox(pipe.outbox.path).load() if r["hostwall"]["kind"] == "loss"]
    reported = lossy_reports(fast) + [x for x in kept if x.get("sink") == "lossy"]
    assert shed > 0 and sum(x["count"] for x in reported if x["reason"] == "queue_full") == shed, (shed, reported)


def test_a_drop_export_waiting_for_a_blocked_sink_at_the_deadline_is_counted_once(tmp_path):
    """A drop export (a shielded periodic run) waits in the fan-out for room in a stalled `block` sink when the
    shutdown deadline comes: the shutdown counts its records `requeued`, and clearing the sink's queue must not
    let it fan them out after all — the ledger stays balanced and the interval stays in the kernel for the
    next collector (docs/collector.md "Delivery and loss")."""
    gate = asyncio.Event()
    blk, lossy = MemorySink("blk", gate=gate), MemorySink("lossy", FullQueuePolicy.DROP_OLDEST)
    src = FakeSource()
    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=2, sink=20, batch=10)), src, StubBuilder(), [blk, lossy],
                    shutdown_timeout_s=0.5)

    async def go():
        task = await started(pipe)
        src.emit(300)
        await until(lambda: pipe.slots[0].queue.size >= 20)
        keys = np.zeros(2, DROP_KEY)
        keys["family"], keys["verdict"], keys["reason"] = 4, 1, 2
        vals = np.zeros(2, DROP_VAL)
        vals["packets"] = [5, 9]
        src.drains.append(DropDrain(keys, vals, {(1, 3): (4, 400)}, 1_000, 2_000, 0.001))
        await until(lambda: pipe.ledger.produced_by.get("drop_summaries", 0) > 0)   # its run waits for room
        pipe.stop()
        await task
    uvloop.run(go())
    obs = pipe.observed_in_flight()
    assert pipe._pending == 0 and pipe.ledger.check(obs, quiescent=True) == [], (obs, pipe.ledger.check(obs))
    assert src.cleared == []                        # the drop interval stays for the next collector
    assert not any(r["hostwall"]["kind"] == "drop_summary" for r in lossy.records)
