"""The collector service: one asyncio loop (uvloop in production) that drains the kernel and feeds sinks.

Tasks (each watched: a task that fails or ends on its own stops the service, which exits 1):

    ring     ring buffer → decoded event batches → `events` queue (bounded, in batches)
    events   events queue → RecordBuilder.on_events → enrich → anomaly.observe → fan-out
    drops    every drop_summary_interval (≤ 1 s): KernelSource.drain_drops → on_drop_summaries, and the
             flow aggregation of the same interval → flow_summary.from_drain
    ct       every conntrack_scan_interval: scan_conntrack → on_conntrack (FIN closes after the close
             grace period, idle ends, active updates), and connections reported in aggregate that
             ended → flow_summary.from_scan
    tick     every second: builder/anomaly tick, enforcer audit-log tail, kernel loss counters
    status   every status_interval: the status JSON ($HOSTWALL_STATE_DIR/collector-<pin stem>.json)
    sink:*   one per sink: its queue → sink.send; flush when idle for a second

Back-pressure (docs/collector.md): fan-out waits until every `block` sink's queue has room, so a
slow local sink stalls record building, the events queue fills, the ring reader stops reading and
the kernel counts `ringbuf_full` — user space never drops for lack of room in front of such a sink.
`drop_oldest` / `drop_newest` sinks never wait; what they shed is counted (`queue_full`).
Fan-out is all-or-nothing per batch (room is awaited first, then every queue takes the batch
without awaiting), so a cancellation can never deliver a batch to one sink and not another.

Kernel calls (drop drain with its RCU grace period, conntrack scans, counters) run on one worker
thread (KernelSource is not thread-safe; ctypes releases the GIL). Ring reads are plain memory reads
of the mmap and stay on the loop. Record building and enrichment run on the loop in batches.

Shutdown (SIGTERM/SIGINT): periodic tasks stop after the run in progress (a drain or scan that took
data out of the kernel always completes); the ring is drained once more and a last drop interval
is exported (summaries add up to the counters at exit); sink queues drain, sinks flush and close —
all within `shutdown_timeout_s`; whatever is still queued then is counted lost ("shutdown").
After a task failure the ring and drop maps are left to the next collector instead; what had been
taken out already is counted lost ("build"/"pipeline"/"sink_failed"). The final status carries the
ledger checked at quiescence.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from . import flow_summary
from .accounting import Ledger
from .config import CollectorConfig, describe
from .sinks.base import FullQueuePolicy
from .syn_proxy import SynWatch

log = logging.getLogger("hostwall.collector")

ENRICH_CHUNK = 1024             # records enriched between two yields to the loop
SHUTDOWN_TIMEOUT_S = 10.0
FINAL_RING_DRAIN_S = 2.0
CLOCK_RECALIBRATE_S = 60.0


class PipelineFailed(RuntimeError):
    """A background task failed; the message names the task and the error (one line)."""


class RecordQueue:
    """FIFO of record batches bounded in records (not batches). Single consumer, many producers.

    wait_room(n) returns once n more records fit (or the queue is empty: a batch larger than the
    capacity is still accepted alone); put_nowait never blocks, so producers that awaited room
    and then put without awaiting can overshoot by at most one batch each (≤ 4 producers)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self.closed = False
        self._dq: deque[list] = deque()
        self._data = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return self.size

    def has_room(self, n: int) -> bool:
        return self.size == 0 or self.size + n <= self.capacity

    async def wait_room(self, n: int) -> None:
        while not self.has_room(n):
            self._room.clear()
            await self._room.wait()

    def put_nowait(self, batch: list) -> None:
        self._dq.append(batch)
        self.size += len(batch)
        self._data.set()

    def pop_oldest(self) -> list:
        b = self._dq.popleft()
        self.size -= len(b)
        self._room.set()
        return b

    async def get(self, timeout: float | None = None) -> list | None:
        """Next batch; None when closed and empty, or on timeout (check `.closed`)."""
        while not self._dq:
            if self.closed:
                return None
            self._data.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._data.wait()
            except TimeoutError:
                return None
        return self.pop_oldest()

    def close(self) -> None:
        self.closed = True
        self._data.set()

    def clear(self) -> int:
        n = self.size
        self._dq.clear()
        self.size = 0
        self._room.set()
        return n


class _SinkSlot:
    def __init__(self, sink, capacity: int):
        self.sink = sink
        self.name = sink.name
        self.policy = FullQueuePolicy(getattr(sink, "full_queue_policy", FullQueuePolicy.BLOCK))
        self.queue = RecordQueue(capacity)
        self.dead = False
        self.seen_delivered = 0
        self.seen_lost: Counter = Counter()
        self.queue_dropped = 0
        self.abandoned = 0          # sink-internal in-flight records counted lost at shutdown


class Pipeline:
    """Wires a kernel source, a record builder, optional enricher/anomaly detector and sinks.

    source: KernelSource-like (ring, drain_drops, scan_conntrack, kernel_loss, now_ns,
    monotonic_to_wall, set_event_budget, close). builder: collector.records.RecordBuilder-like.
    clock_factory(offset_ns) -> clock object with wall_ns(mono) (hostwall.bpf.clock.Clock)."""

    def __init__(self, cfg: CollectorConfig, source, builder, sinks: list, *, enricher=None, anomaly=None,
                 ledger: Ledger | None = None, clock_factory: Callable[[int], Any] | None = None,
                 audit_log: str | os.PathLike | None = None, status_path: str | os.PathLike | None = None,
                 shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S, close_source: bool = True, metrics=None):
        self.cfg = cfg
        self.source = source
        self.builder = builder
        self.enricher = enricher
        self.anomaly = anomaly
        self.syn_watch = SynWatch(anomaly, lambda: tuple(getattr(getattr(getattr(builder, "instance", None), "state",
                                                                          None), "dos_profiles", ()))) if anomaly else None
        self.ledger = ledger or Ledger()
        self.slots = [_SinkSlot(s, cfg.queues.sink) for s in sinks]
        for s in self.slots:
            if s.name not in self.ledger.lanes:
                self.ledger.add_sink(s.name)
        self._clock_factory = clock_factory or _default_clock
        self.clock = None
        self.audit_log = Path(audit_log) if audit_log else None
        self.status_path = Path(status_path) if status_path else cfg.status_path()
        self.shutdown_timeout_s = shutdown_timeout_s
        self._close_source = close_source
        self.metrics = metrics                      # collector.metrics.SelfMetrics: fed every status write
        self.counters: Counter = Counter()
        self.ring = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._runs: set[asyncio.Future] = set()     # periodic runs in progress (see _every)
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._failure: tuple[str, BaseException] | None = None
        self._pending = 0
        self._events_q: asyncio.Queue | None = None
        self._carry = None
        self._building = 0
        self._kexec: ThreadPoolExecutor | None = None
        self._started = time.time()
        self._clock_at = 0.0
        self._audit_pos: tuple[int, int] | None = None     # (inode, offset)
        self.state = "starting"
        self.last_drain: dict = {}
        self.last_scan: dict = {}

    # ---- public --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Request a clean shutdown (signal handlers call this)."""
        if self._stop is not None:
            self._stop.set()

    async def run(self, *, install_signals: bool = False) -> None:
        """Run until stop() or a task failure; always shuts down cleanly. Raises PipelineFailed."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._events_q = asyncio.Queue(self.cfg.queues.events)
        self._kexec = ThreadPoolExecutor(1, thread_name_prefix="hw-kernel")
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        try:
            await self._start()
            self.state = "running"
            await self._stop.wait()
        finally:
            await self._shutdown()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        if self._failure:
            name, exc = self._failure
            raise PipelineFailed(f"{name}: {type(exc).__name__}: {exc}")

    # ---- start ---------------------------------------------------------------------------------
    async def _start(self) -> None:
        for s in self.slots:
            try:
                await s.sink.start()
            except Exception as e:  # noqa: BLE001 — a sink that cannot start is reported and marked dead
                self._fail(f"sink {s.name}", e)
                s.dead = True
                raise PipelineFailed(f"sink {s.name}: {e}") from None
        if self.metrics is not None:
            try:
                self.metrics.start()
            except Exception as e:  # noqa: BLE001 — reported with its cause, then the pipeline fails
                self._fail("metrics", e)
                raise PipelineFailed(f"metrics: {e}") from None
        self.clock = self._clock_factory(self.source.monotonic_to_wall())
        self._clock_at = time.monotonic()
        await self._k(self.source.set_event_budget, self.cfg.event_budget)
        if hasattr(self.source, "set_knobs"):        # per-source share of flow events (docs/collector.md)
            share = self.cfg.event_source_share
            await self._k(partial(self.source.set_knobs, source_share=self.cfg.event_budget // 10 if share is None
                                  else share))
        if hasattr(self.source, "set_drop_prefixes"):
            await self._k(self.source.set_drop_prefixes, self.cfg.drop_prefix_v4, self.cfg.drop_prefix_v6)
        self.ledger.fold_kernel(await self._k(self.source.kernel_loss))
        self.ring = self.source.ring()
        self._audit_pos = self._audit_resume()
        self._spawn("ring", self._read_ring())
        self._spawn("events", self._build_events())
        self._spawn("drops", self._every(self.cfg.drop_interval_s, self._export_drops))
        self._spawn("ct", self._every(self.cfg.ct_scan_interval_s, self._scan_ct))
        # the anomaly detector evaluates at its bucket boundaries: tick at least that often, so an
        # anomaly is reported within about one bucket of the flood that opens it
        bucket = getattr(getattr(self.anomaly, "cfg", None), "bucket_s", 1.0) or 1.0
        self._spawn("tick", self._every(min(1.0, bucket), self._tick))
        self._spawn("status", self._every(self.cfg.status_interval_s, self._write_status))
        for s in self.slots:
            self._spawn(f"sink {s.name}", self._sink_worker(s))
        await self._write_status()

    def _spawn(self, name: str, coro) -> None:
        t = asyncio.create_task(coro, name=name)
        t.add_done_callback(self._watch)
        self._tasks[name] = t

    def _watch(self, task: asyncio.Task) -> None:
        """Done-callback of every task (as aiokafka's sender): a failure or an unexpected end stops
        the service and is reported; cancellation during shutdown is normal."""
        if task.cancelled() or self._stopping:
            if not task.cancelled() and task.exception() is not None:
                log.error("task %s failed during shutdown: %r", task.get_name(), task.exception())
            return
        exc = task.exception() or RuntimeError("ended unexpectedly")
        self._fail(task.get_name(), exc)

    def _fail(self, name: str, exc: BaseException) -> None:
        log.error("collector task %s failed: %s: %s", name, type(exc).__name__, exc)
        log.debug("task %s traceback", name, exc_info=exc)
        if self._failure is None:
            self._failure = (name, exc)
        self.stop()

    async def _k(self, fn, *args):
        """Run a blocking kernel call on the kernel worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._kexec, fn, *args)

    async def _every(self, interval: float, fn) -> None:
        """Run fn every `interval` s. Each run is shielded: cancelling the loop (shutdown) never
        abandons a run half-way (a drop drain or conntrack scan has already taken data out of the
        kernel); shutdown waits for the run in progress instead."""
        loop = asyncio.get_running_loop()
        nxt = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            run = asyncio.ensure_future(fn())
            self._runs.add(run)
            run.add_done_callback(self._runs.discard)
            await asyncio.shield(run)
            nxt += interval
            if nxt < loop.time():
                nxt = loop.time() + interval        # fell behind: skip, don't burst

    # ---- ring buffer → events ------------------------------------------------------------------
    def _account_read(self, b) -> None:
        self.counters["events_read"] += len(b.records)
        self.counters["ring_discarded"] += b.discarded
        for reason, n in b.errors.items():
            self.counters["decode_errors"] += n
            self.ledger.lose("decode", reason, n, produced="events")

    async def _read_ring(self) -> None:
        ring, batch = self.ring, self.cfg.queues.batch
        while True:
            b = ring.read(batch)
            self._account_read(b)
            if len(b.records):
                self._carry = b.records
                await self._events_q.put(b.records)
                self._carry = None
            elif not b.consumed_bytes:
                self.counters["ring_waits"] += 1
                await ring.wait(1.0)

    async def _final_ring_drain(self) -> None:
        """After the ring task was cancelled: the batch it held, then what is left (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINAL_RING_DRAIN_S
        if self._carry is not None:
            await self._events_q.put(self._carry)
            self._carry = None
        while loop.time() < deadline:
            b = self.ring.read(self.cfg.queues.batch)
            self._account_read(b)
            if len(b.records):
                await self._events_q.put(b.records)
            if not b.consumed_bytes:
                break
        await self._events_q.put(None)

    async def _build_events(self) -> None:
        while True:
            batch = await self._events_q.get()
            if batch is None:
                return
            self._building = len(batch)                 # until built: counted lost if cancelled here
            recs = self._build("events", len(batch), self.builder.on_events, batch, self.clock)
            self._building = 0
            await self._emit(recs, "events")

    def _build(self, source: str, n_inputs: int, fn, *args) -> list[dict]:
        """Call a builder method; if it raises, its inputs (already taken from the kernel) are
        counted lost ("build", "error") before the failure stops the service."""
        try:
            return fn(*args)
        except Exception:
            self.ledger.lose("build", "error", n_inputs, produced=source)
            self._building = 0
            raise

    # ---- periodic sources ------------------------------------------------------------------------
    async def _export_drops(self) -> None:
        d = await self._k(self.source.drain_drops)
        self.ledger.count_drops(d.packets, d.overflow_packets)
        self.counters["drop_intervals"] += 1
        self.last_drain = {"keys": len(d.keys), "packets": d.packets, "overflow_packets": d.overflow_packets,
                           "barrier_ms": round(d.barrier_s * 1e3, 3)}
        t0, t1 = self.clock.wall_ns(d.t0_ns), self.clock.wall_ns(d.t1_ns)
        recs = self._build("drop_summaries", len(d.keys), self.builder.on_drop_summaries, d.keys, d.vals, t0, t1,
                           self.clock, d.sources) if len(d.keys) else []
        if d.overflow:
            recs += self._build("drop_summaries", len(d.overflow), self.builder.on_drop_overflow, d.overflow, t0, t1,
                                self.clock)
        await self._emit(recs, "drop_summaries")
        fl = getattr(d, "flows", None)
        if fl is not None and (len(fl.keys) or fl.overflow):
            self.ledger.count_flows(fl.totals())
            recs = self._build("flow_summaries", len(fl.keys) + len(fl.overflow), flow_summary.from_drain,
                               self.builder, fl, t0, t1, self.clock)
            await self._emit(recs, "flow_summaries")

    async def _scan_ct(self) -> None:
        now = await self._k(self.source.now_ns)
        s = await self._k(self.source.scan_conntrack, now, int(self.cfg.active_timeout_s * 1e9),
                          int(self.cfg.close_grace_s * 1e9))
        closed = s.closed
        self.counters["ct_scans"] += 1
        self.counters["ct_expired"] += s.expired
        self.counters["ct_updates"] += s.updates
        self.counters["ct_closed"] += closed
        self.counters["ct_raced"] += s.raced
        self.last_scan = {"entries": s.scanned, "expired": s.expired, "updates": s.updates, "closed": closed,
                          "raced": s.raced, "ended_before": s.ended}
        t1 = self.clock.wall_ns(now)
        t0, self._last_scan_wall = getattr(self, "_last_scan_wall", None) or t1, t1
        for f in s.families:
            ck = f.closed_keys
            if len(f.expired_keys) or len(f.update_keys) or len(ck):
                recs = self._build("conntrack", len(f.expired_keys) + len(f.update_keys) + len(ck),
                                   self.builder.on_conntrack, f.expired_keys, f.expired_entries,
                                   (f.update_keys, f.update_entries), self.clock,
                                   (ck, f.closed_entries) if len(ck) else None)
                await self._emit(recs, "conntrack")
            if f.agg_keys is not None and len(f.agg_keys):       # ended in aggregate: flow summaries
                recs = self._build("conntrack", len(f.agg_keys), flow_summary.from_scan, self.builder, f.agg_keys,
                                   f.agg_entries, self.cfg.drop_prefix_v4, self.cfg.drop_prefix_v6, t0, t1, self.clock)
                await self._emit(recs, "conntrack")

    async def _tick(self) -> None:
        now = await self._k(self.source.now_ns)
        await self._emit(self.builder.tick(now), "tick")
        if self.anomaly is not None and hasattr(self.source, "port_syns"):   # SYNs per port, proxy switches
            syns, proxy = await self._k(self.source.port_syns), await self._k(self.source.syn_proxy, now)
            await self._emit(self.syn_watch.tick(syns, proxy, time.time()), "anomaly", observe=False)
        if self.anomaly is not None:                     # the detector works in wall-clock seconds
            await self._emit(self.anomaly.tick(time.time()) or [], "anomaly", observe=False)
        await self._tail_audit()
        self.ledger.fold_kernel(await self._k(self.source.kernel_loss))
        if time.monotonic() - self._clock_at >= CLOCK_RECALIBRATE_S:      # follow wall-clock steps
            self.clock = self._clock_factory(self.source.monotonic_to_wall())
            self._clock_at = time.monotonic()

    # ---- audit log -------------------------------------------------------------------------------
    def _audit_resume(self) -> tuple[int, int] | None:
        """Where to continue the enforcer's audit log: the offset in our last status file if it is
        the same file (inode), else its start (re-shipped records have the same event.id)."""
        if self.audit_log is None or not hasattr(self.builder, "on_audit"):
            return None
        try:
            prev = orjson.loads(self.status_path.read_bytes()).get("audit", {})
            return int(prev["inode"]), int(prev["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return (0, 0)

    async def _tail_audit(self) -> None:
        if self._audit_pos is None:
            return
        try:
            st = os.stat(self.audit_log)
        except FileNotFoundError:
            return
        ino, off = self._audit_pos
        if st.st_ino != ino or st.st_size < off:
            ino, off = st.st_ino, 0                     # new or truncated file
        if st.st_size == off:
            self._audit_pos = (ino, off)
            return
        with open(self.audit_log, "rb") as f:
            f.seek(off)
            data = f.read(st.st_size - off)
        end = data.rfind(b"\n") + 1                     # whole lines only
        recs, bad = [], 0
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                recs.append(self.builder.on_audit(orjson.loads(line)))
            except (ValueError, TypeError, AttributeError):
                bad += 1
        self._audit_pos = (ino, off + end)
        if bad:
            self.ledger.lose("decode", "audit_line", bad, produced="audit")
        await self._emit(recs, "audit", observe=False)

    # ---- records → sinks -------------------------------------------------------------------------
    async def _emit(self, records: list[dict], source: str, *, observe: bool = True) -> None:
        """Count, enrich, observe and fan out one batch of records (the only way records leave)."""
        if not records:
            return
        self.ledger.produce(source, len(records))
        self._pending += len(records)           # until fanned out; a failure leaves them for shutdown to count
        if self.enricher is not None and source != "anomaly":
            await self._enrich(records)
        if observe and self.anomaly is not None:
            extra = self.anomaly.observe(records) or []
            if extra:
                self.ledger.produce("anomaly", len(extra))
                self._pending += len(extra)
                records = records + list(extra)
        await self._fan_out(records)
        self._pending -= len(records)

    async def _enrich(self, records: list[dict]) -> None:
        enrich = self.enricher.enrich
        for i in range(0, len(records), ENRICH_CHUNK):
            for r in records[i:i + ENRICH_CHUNK]:
                try:
                    enrich(r)
                except Exception:  # noqa: BLE001 — best effort: the record ships un-enriched (counted)
                    self.counters["enrich_errors"] += 1
            if i + ENRICH_CHUNK < len(records):
                await asyncio.sleep(0)

    async def _fan_out(self, records: list[dict]) -> None:
        km = getattr(self.metrics, "kernel_metrics", None)
        if km is not None:                       # dashboard series from records (top sources, anomalies)
            km.observe(records)
        n = len(records)
        for s in self.slots:
            if s.policy is FullQueuePolicy.BLOCK and not s.dead:
                await s.queue.wait_room(n)
        for s in self.slots:                    # no await from here on: all sinks or none
            if s.dead:
                self.ledger.sink_lose(s.name, "sink_failed", n)
                continue
            if not s.queue.has_room(n):
                if s.policy is FullQueuePolicy.DROP_NEWEST:
                    self.ledger.sink_lose(s.name, "queue_full", n)
                    s.queue_dropped += n
                    continue
                if s.policy is FullQueuePolicy.DROP_OLDEST:
                    while s.queue.size and not s.queue.has_room(n):
                        k = len(s.queue.pop_oldest())
                        self.ledger.sink_lose(s.name, "queue_full", k)
                        s.queue_dropped += k
            s.queue.put_nowait(records)
        self.ledger.fan_out(n)

    async def _sink_worker(self, s: _SinkSlot) -> None:
        try:
            while True:
                batch = await s.queue.get(timeout=1.0)
                if batch is None:
                    if s.queue.closed:
                        break
                    await s.sink.flush()                # idle for a second
                else:
                    await s.sink.send(batch)
                self._sync_sink(s)
            await s.sink.flush()
            self._sync_sink(s)
        except BaseException:
            s.dead = True
            self._sync_sink(s)
            lost = s.queue.clear()
            self.ledger.sink_lose(s.name, "sink_failed", lost)
            raise

    def _sync_sink(self, s: _SinkSlot) -> dict:
        """Move the sink's cumulative counters into the ledger (deltas since the last sync)."""
        st = s.sink.stats()
        d = st.get("delivered", 0) - s.seen_delivered
        if d:
            self.ledger.deliver(s.name, d)
            s.seen_delivered += d
        for reason, v in (st.get("lost") or {}).items():
            d = v - s.seen_lost[reason]
            if d:
                self.ledger.sink_lose(s.name, reason, d)
                s.seen_lost[reason] += d
        return st

    # ---- shutdown --------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        self._stopping = True
        self.state = "stopping"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout_s
        for name in ("drops", "ct", "tick", "status", "ring"):
            await _cancel(self._tasks.get(name))
        if self._runs:                                   # let a drain / scan in progress finish
            done, _ = await asyncio.wait(set(self._runs), timeout=max(0.1, deadline - loop.time()))
            for r in done:
                if not r.cancelled() and r.exception() is not None and self._failure is None:
                    self._fail("periodic", r.exception())
        events = self._tasks.get("events")
        if self._failure is None and self.ring is not None and events is not None and not events.done():
            # healthy stop: everything read is built and shipped, and a last drop interval exported.
            # After a failure the rest stays in the kernel (ring, drop maps) for the next collector.
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await self._final_ring_drain()
                    await events
                    await self._export_drops()
                    # kernel losses since the last tick (the tick task is already stopped)
                    self.ledger.fold_kernel(await self._k(self.source.kernel_loss))
            except TimeoutError:
                log.error("shutdown: record building did not finish in time; counting the rest as lost")
            except Exception as e:                      # noqa: BLE001 — reported, shutdown goes on
                log.error("shutdown: final drain failed: %s: %s", type(e).__name__, e)
        await _cancel(self._tasks.get("events"))
        self._count_abandoned()
        for s in self.slots:
            s.queue.close()
        workers = [self._tasks[f"sink {s.name}"] for s in self.slots if f"sink {s.name}" in self._tasks]
        if workers:
            _, pending = await asyncio.wait(workers, timeout=max(0.1, deadline - loop.time()))
            for t in pending:
                await _cancel(t)
        for s in self.slots:
            try:
                await asyncio.wait_for(s.sink.close(), timeout=max(0.5, deadline - loop.time()))
            except Exception as e:                      # noqa: BLE001
                log.error("shutdown: closing sink %s failed: %s", s.name, e)
            self._sync_sink(s)
            left = s.queue.clear()
            if left:
                self.ledger.sink_lose(s.name, "shutdown", left)
            st = s.sink.stats()
            if st.get("in_flight", 0) > 0:                 # accepted by the sink, never confirmed
                self.ledger.sink_lose(s.name, "shutdown", st["in_flight"])
                s.abandoned = st["in_flight"]
        self.state = "failed" if self._failure else "stopped"
        await self._write_status(final=True)
        if self.metrics is not None:                    # last OTLP push of the final counters
            await asyncio.to_thread(self.metrics.close)
        self._close()

    def _count_abandoned(self) -> None:
        """Events read but never built, and records produced but never fanned out: lost at shutdown."""
        n = 0
        while not self._events_q.empty():
            b = self._events_q.get_nowait()
            n += len(b) if b is not None else 0
        if self._carry is not None:
            n += len(self._carry)
            self._carry = None
        n += self._building
        self._building = 0
        if n:
            self.ledger.lose("pipeline", "shutdown", n, produced="events")
        if self._pending:
            self.ledger.lose("pipeline", "shutdown", self._pending)
            self._pending = 0

    def _close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self._close_source:
            self.source.close()
        if self.enricher is not None and hasattr(self.enricher, "close"):
            self.enricher.close()
        if self._kexec is not None:
            self._kexec.shutdown(wait=False)

    # ---- status ----------------------------------------------------------------------------------
    def observed_in_flight(self) -> dict[str, int]:
        out = {"upstream": self._pending}
        for s in self.slots:
            out[s.name] = s.queue.size + int(s.sink.stats().get("in_flight", 0)) - s.abandoned
        return out

    def status(self, *, final: bool = False) -> dict:
        for s in self.slots:
            self._sync_sink(s)
        obs = self.observed_in_flight()
        ledger = self.ledger.snapshot(obs)
        if final:
            ledger["quiescent_violations"] = self.ledger.check(obs, quiescent=True)
        ring = {}
        if self.ring is not None:
            ring = {"backlog_bytes": self.ring.available_bytes(), "size_bytes": self.ring.size,
                    "records_read": self.counters["events_read"], "decode_errors": self.counters["decode_errors"],
                    "discarded": self.counters["ring_discarded"], "waits": self.counters["ring_waits"]}
        out = {
            "pid": os.getpid(), "state": self.state, "pin_dir": self.cfg.pin_dir,
            "started_at": self._started, "updated_at": time.time(),
            "uptime_s": round(time.time() - self._started, 3),
            "error": f"{self._failure[0]}: {type(self._failure[1]).__name__}: {self._failure[1]}"
            if self._failure else None,
            "ledger": ledger,
            "ring": ring,
            "queues": {"events": {"depth": self._events_q.qsize() if self._events_q else 0,
                                  "capacity_batches": self.cfg.queues.events},
                       "sinks": {s.name: {"depth": s.queue.size, "capacity": s.queue.capacity,
                                          "policy": s.policy.value, "dropped": s.queue_dropped, "dead": s.dead}
                                 for s in self.slots}},
            "sinks": {s.name: s.sink.stats() for s in self.slots},
            "drops": {"intervals": self.counters["drop_intervals"], "last": self.last_drain,
                      "packets": self.ledger.drop_packets.get("summarized", 0),
                      "overflow_packets": self.ledger.drop_packets.get("overflow", 0)},
            "conntrack": {"scans": self.counters["ct_scans"], "expired": self.counters["ct_expired"],
                          "updates": self.counters["ct_updates"], "closed": self.counters["ct_closed"],
                          "raced": self.counters["ct_raced"],
                          "last": self.last_scan},
            "pipeline": {k: v for k, v in sorted(self.counters.items())},
            "config": describe(self.cfg),
        }
        for name, comp in (("builder", self.builder), ("enricher", self.enricher), ("anomaly", self.anomaly)):
            if comp is not None and hasattr(comp, "stats"):
                try:
                    out[name] = comp.stats()
                except Exception as e:                  # noqa: BLE001 — status must not fail
                    out[name] = {"error": repr(e)}
        if self._audit_pos is not None:
            out["audit"] = {"path": str(self.audit_log), "inode": self._audit_pos[0], "offset": self._audit_pos[1]}
        return out

    async def _write_status(self, final: bool = False) -> None:
        """Status JSON; a failed write is logged and counted, never fatal (the data path goes on)."""
        st = self.status(final=final)
        if self.metrics is not None:
            self.metrics.update(st)
        try:
            write_status(self.status_path, st)
        except OSError as e:
            self.counters["status_write_errors"] += 1
            if self.counters["status_write_errors"] in (1, 10, 100, 1000):
                log.warning("cannot write status %s: %s", self.status_path, e)


def write_status(path: Path, data: dict) -> None:
    """Atomic (tmp + rename) JSON write; readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
                                 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS, default=str))
    os.replace(tmp, path)


async def _cancel(task: asyncio.Task | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):     # noqa: BLE001 — already reported by _watch
        pass


def _default_clock(offset_ns: int):
    from hostwall.bpf.clock import Clock
    return Clock(offset_ns)


# ---- the production wiring ----------------------------------------------------------------------

def build_pipeline(cfg: CollectorConfig) -> Pipeline:
    """Real components for `cfg`: KernelSource on the pin dir, RecordBuilder, Enricher, the anomaly
    detector when this build has one, and the configured sinks. Raises KernelSourceError /
    SinkUnavailable with a one-line message."""
    from .enrich import Enricher
    from .enrich.host import HostInfo, InstanceStateView
    from .kernel import KernelSource
    from .metrics import SelfMetrics
    from .records import RecordBuilder
    from .sinks import build_sink

    sinks = [build_sink(spec, cfg) for spec in cfg.sinks]     # unavailable sinks fail before the kernel is touched
    source = KernelSource(cfg.pin_dir)
    host = HostInfo.detect(cfg.pin_dir)
    if cfg.hostname:
        host = replace(host, hostname=cfg.hostname)
    instance = InstanceStateView(cfg.pin_dir)
    ledger = Ledger([s.name for s in sinks])
    builder = RecordBuilder(host, instance, ledger)
    enricher = Enricher(host, instance)
    anomaly = None
    try:
        from .anomaly import AnomalyConfig, AnomalyDetector
    except ImportError:                                     # not in this build
        AnomalyDetector = None
    if AnomalyDetector is not None:
        anomaly = AnomalyDetector(cfg.anomaly if isinstance(cfg.anomaly, AnomalyConfig) else None, host)
    return Pipeline(cfg, source, builder, sinks, enricher=enricher, anomaly=anomaly, ledger=ledger,
                    audit_log=instance.audit_log, metrics=SelfMetrics.from_config(cfg))
