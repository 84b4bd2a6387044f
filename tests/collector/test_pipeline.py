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
from hostwall.bpf.ringbuf import RingWalker, check_events
from hostwall.collector.accounting import Ledger
from hostwall.collector.config import CollectorConfig, JsonlOptions, QueueSizes
from hostwall.collector.kernel import CtFamilyScan, CtScan, DropDrain
from hostwall.collector.pipeline import Pipeline, PipelineFailed, RecordQueue
from hostwall.collector.sinks.base import BaseSink, FullQueuePolicy

from .test_ringbuf import FakeRing

DROP_KEY, DROP_VAL = L.DTYPES["hw_drop_key"], L.DTYPES["hw_drop_val"]


# ---- fakes --------------------------------------------------------------------------------------

class FakeRingBuffer(RingWalker):
    def __init__(self, fake: FakeRing):
        super().__init__(fake.cons, fake.prod, fake.data, fake.size, validate=check_events)
        self._evt: asyncio.Event | None = None
        self.closed = False

    async def wait(self, timeout=None) -> bool:
        if self.available_bytes():
            return True
        self._evt = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._evt.wait()
        except TimeoutError:
            pass
        finally:
            self._evt = None
        return self.available_bytes() > 0

    def notify(self) -> None:
        if self._evt is not None:
            self._evt.set()

    def close(self) -> None:
        self.closed = True


class FakeSource:
    def __init__(self, ring_size: int = 1 << 16):
        self.fake = FakeRing(ring_size)
        self.rb = FakeRingBuffer(self.fake)
        self.budget = None
        self.drains: list[DropDrain] = []
        self.scans: list[CtScan] = []
        self.loss = {"deny": {"emitted": 0, "budget": 0, "ringbuf_full": 0}}
        self.closed = False

    # the KernelSource surface used by the pipeline
    def ring(self):
        return self.rb

    def monotonic_to_wall(self) -> int:
        return 1_700_000_000 * 10**9

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def set_event_budget(self, n: int) -> None:
        self.budget = n

    def kernel_loss(self) -> dict:
        return json.loads(json.dumps(self.loss))

    def drain_drops(self) -> DropDrain:
        if self.drains:
            return self.drains.pop(0)
        now = self.now_ns()
        return DropDrain(np.zeros(0, DROP_KEY), np.zeros(0, DROP_VAL), {}, now, now, 0.0)

    def scan_conntrack(self, now_ns, at_ns, grace_ns) -> CtScan:
        return self.scans.pop(0) if self.scans else CtScan([], 0, 0, 0)

    def close(self) -> None:
        self.closed = True

    # test helpers
    def emit(self, n: int, bad_len: int = 0) -> int:
        done = 0
        for _ in range(n):
            if not self.fake.emit():
                break
            done += 1
        for _ in range(bad_len):
            self.fake.emit(b"\x00" * 24)
        self.rb.notify()
        return done


class StubBuilder:
    """Minimal RecordBuilder stand-in: one record per input row, with the row's identity."""

    def __init__(self, fail_on_events: bool = False):
        self.fail = fail_on_events
        self.calls: Counter = Counter()
        self.drop_windows: list[tuple] = []
        self.ct_families: list[int] = []

    def _rec(self, kind: str, ident) -> dict:
        return {"event": {"id": f"{kind}-{ident}", "dataset": f"hostwall.{kind}"}, "hostwall": {"kind": kind},
                "ident": ident}

    def on_events(self, batch, clock):
        self.calls["events"] += 1
        if self.fail:
            raise ValueError("cannot build")
        return [self._rec("deny", int(s)) for s in batch["start_ns"]]

    def on_drop_summaries(self, keys, vals, t0, t1, clock, sources=None):
        self.drop_windows.append((t0, t1))
        return [self._rec("drop_summary", int(p)) for p in vals["packets"]]

    def on_drop_overflow(self, counts, t0, t1, clock):
        return [self._rec("drop_summary", f"overflow-{v}-{r}") for (v, r) in counts]

    def on_conntrack(self, ek, ee, updates, clock, closed=None):
        self.ct_families.append(len(ek))
        return [self._rec("flow", i) for i in range(len(ek) + len(updates[0]) + (len(closed[0]) if closed else 0))]

    def on_audit(self, rec):
        return {**rec, "hostwall": {"kind": "audit"}}

    def tick(self, now):
        self.calls["tick"] += 1
        return []

    def stats(self):
        return dict(self.calls)


class MemorySink(BaseSink):
    def __init__(self, name="mem", policy=FullQueuePolicy.BLOCK, gate: asyncio.Event | None = None,
                 fail_after: int | None = None):
        super().__init__(name)
        self.full_queue_policy = policy
        self.records: list[dict] = []
        self.gate = gate
        self.fail_after = fail_after
        self.flushes = 0
        self.started = self.closed = False

    async def start(self):
        self.started = True

    async def _send(self, records):
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_after is not None and len(self.records) >= self.fail_after:
            raise OSError("disk on fire")
        self.records += records
        self._deliver(len(records))

    async def flush(self):
        self.flushes += 1

    async def close(self):
        self.closed = True


def cfg(tmp_path, **kw) -> CollectorConfig:
    base = dict(pin_dir=str(tmp_path / "pin"), drop_interval_s=0.05, ct_scan_interval_s=0.05, active_timeout_s=60,
                status_interval_s=0.05, status_file=str(tmp_path / "status.json"),
                queues=QueueSizes(events=4, sink=1000, batch=64), jsonl=JsonlOptions(fsync="none"))
    base.update(kw)
    return CollectorConfig(**base)


async def until(pred, timeout=5.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def started(pipe: Pipeline):
    task = asyncio.ensure_future(pipe.run())
    await until(lambda: pipe.state == "running" or task.done())
    return task


def status(tmp_path) -> dict:
    return json.loads((tmp_path / "status.json").read_text())


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
        await asyncio.sleep(0.3)
        backlog = src.rb.available_bytes() // 128
        assert 55 <= backlog < 100                        # reading stopped: the rest waits in the ring
        assert pipe.ledger.lost_upstream == 0 and not pipe.ledger.lanes["mem"].lost
        gate.set()
        await until(lambda: len(sink.records) == 100)
        pipe.stop()
        await task
    uvloop.run(go())
    assert [r["ident"] for r in sink.records] == list(range(100))
    assert pipe.ledger.check(quiescent=True) == []


def test_drop_oldest_sink_sheds_and_counts_while_a_blocking_sink_gets_everything(tmp_path):
    gate = asyncio.Event()
    fast, lossy = MemorySink("fast"), MemorySink("lossy", FullQueuePolicy.DROP_OLDEST, gate=gate)
    src = FakeSource()
    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=2, sink=20, batch=10)), src, StubBuilder(), [fast, lossy])

    async def go():
        task = await started(pipe)
        for _ in range(5):
            src.emit(100)
            await until(lambda: src.rb.available_bytes() == 0)
        await until(lambda: len(fast.records) == 500)
        gate.set()
        pipe.stop()
        await task
    uvloop.run(go())
    led = pipe.ledger
    assert len(fast.records) == 500
    shed = led.lanes["lossy"].lost["queue_full"]
    assert shed > 0 and len(lossy.records) + shed == 500
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

    async def go(p):
        task = await started(p)
        await asyncio.sleep(1.3)
        p.stop()
        await task
    uvloop.run(go(pipe))
    assert [r["n"] for r in sink.records if r["hostwall"]["kind"] == "audit"] == [1, 2]
    with open(audit, "a") as f:
        f.write('"x"}\n{"n": 3}\n')
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), FakeSource(), StubBuilder(), [sink2], audit_log=audit)
    uvloop.run(go(pipe2))
    assert [r.get("n", r.get("partial")) for r in sink2.records] == ["x", 3]


def test_status_file_shows_queues_backlog_and_components(tmp_path):
    gate = asyncio.Event()
    src, sink = FakeSource(), MemorySink(gate=gate)

    class Enricher:
        def enrich(self, r):
            r["enriched"] = True

        def stats(self):
            return {"hit_rate": 0.5}

    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=1, sink=10, batch=5)), src, StubBuilder(), [sink],
                    enricher=Enricher())

    async def go():
        task = await started(pipe)
        src.emit(100)
        await asyncio.sleep(0.3)
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
