"""The collector service: one asyncio loop (uvloop in production) that drains the kernel and feeds sinks.

Tasks (each watched: a task that fails or ends on its own stops the service, which exits 1):

    ring     ring buffer → decoded event batches → `events` queue (bounded, in batches)
    events   events queue → RecordBuilder.on_events → enrich → anomaly.observe → fan-out
    drops    every drop_summary_interval (≤ 1 s): read a drop interval and the flow aggregation of the same
             generation → drop and flow summaries → clear once durable
    ct       every conntrack_scan_interval: claim FIN closes after the close grace period, idle ends,
             active updates → release the claims once durable; connections reported in aggregate that
             ended → flow summaries in the same batch
    tick     every second (or anomaly bucket): builder/anomaly tick, the per-port SYN signal and the SYN
             proxy's switches, the enforcer's audit and DNS logs, kernel loss counters, sink loss reports
    status   every status_interval: the status JSON ($HOSTWALL_STATE_DIR/collector-<pin stem>.json)
    commit   end-to-end acknowledgement: releases kernel data once every at_least_once sink has it
    sink:*   one per sink: its queue → sink.send; flush when idle for a second

End-to-end acknowledgement (docs/collector.md "Delivery and loss"): the ring buffer is read ahead of its
consumer position; each fanned-out batch gets a ticket (collector/acks.py) and the consumer position
moves past a batch's events only when every at_least_once sink settled that batch (durable, or counted
lost). The same holds for what the collector takes out of the kernel itself: a drop interval is cleared
from its map, and claimed conntrack ends are freed (FIN closes marked reported), only once their records
are durable; the offsets in the enforcer's logs and every stream's hostwall.seq are checkpointed
(collector/checkpoint.py) only then; conntrack scan batches are journaled until durable
(collector/ct_journal.py) so a restart numbers them as before; records made from the collector's own
state (anomalies, loss reports) go through the outbox (collector/outbox.py). The checkpoint is written
before the kernel side moves. So a kill -9 at any instant leaves everything not yet durable in the
kernel, the journal or the outbox, and the next start sends it again (same event.id and seq).

Back-pressure: fan-out waits until every `block` sink's queue has room, so a slow local sink stalls
record building, the events queue fills, the ring reader stops reading and the kernel counts
`ringbuf_full` — user space never drops for lack of room in front of such a sink. `drop_oldest` /
`drop_newest` sinks never wait; what they shed is counted (`queue_full`). Fan-out is all-or-nothing per
batch (room is awaited first, then every queue takes the batch without awaiting).

Kernel calls (drop reads with their RCU grace period, conntrack scans, counters) run on one worker
thread (KernelSource is not thread-safe; ctypes releases the GIL). Ring reads are plain memory reads
of the mmap and stay on the loop. Record building and enrichment run on the loop in batches.

Shutdown (SIGTERM/SIGINT): periodic tasks stop after the run in progress; the ring is drained once
more and a last drop interval is exported; sink queues drain, sinks flush and close, the last durable
batches are committed — all within `shutdown_timeout_s`. Whatever is not durable then stays in the
kernel (counted `requeued`, not lost: the next collector reads it again). After a task failure nothing
more is committed. The final status carries the ledger checked at quiescence.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hostwall.bpf.clock import Clock

from .accounting import Ledger
from .acks import Acks, CommitEntry, CommitLog, Ticket
from .checkpoint import Checkpoint, Restart
from .config import CollectorConfig
from .ct_journal import CtJournal
from .loss_report import LossReporter
from .outbox import Outbox
from .parts import Detector, Enricher, KernelSource, MetricsSink, RecordBuilder, Ring
from .queues import RecordQueue, SinkSlot
from .shutdown import Shutdown
from .sinks.base import FullQueuePolicy, Sink
from .sources import Sources, previous_run
from .status import build_status, write_status
from .syn_proxy import SynWatch

log = logging.getLogger("hostwall.collector")

__all__ = ["Pipeline", "PipelineFailed", "RecordQueue", "StartFailed", "write_status"]

ENRICH_CHUNK = 1024             # records enriched between two yields to the loop
SHUTDOWN_TIMEOUT_S = 10.0
FINAL_RING_DRAIN_S = 2.0
COMMIT_INTERVAL_S = 0.01        # commits (checkpoint write + kernel release) at most this often


class PipelineFailed(RuntimeError):
    """A background task failed; the message names the task and the error (one line)."""


class StartFailed(PipelineFailed):
    """A part could not start (a sink that cannot work with its destination, the metrics endpoint):
    nothing was read from the kernel. The message is the part's own one line (what, where, what to do)."""


class Pipeline(Sources, Shutdown):
    """Wires a kernel source, a record builder, optional enricher/anomaly detector and sinks (the
    protocols of collector/parts.py). clock_factory(offset_ns) -> clock with wall_ns(mono)
    (hostwall.bpf.clock.Clock)."""

    def __init__(self, cfg: CollectorConfig, source: KernelSource, builder: RecordBuilder, sinks: list[Sink], *,
                 enricher: Enricher | None = None, anomaly: Detector | None = None, ledger: Ledger | None = None,
                 clock_factory: Callable[[int], Any] | None = None, audit_log: str | os.PathLike | None = None,
                 status_path: str | os.PathLike | None = None, shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
                 close_source: bool = True, metrics: MetricsSink | None = None, hostname: str | None = None,
                 checkpoint: Checkpoint | None = None, outbox: Outbox | None = None,
                 dns_log: str | os.PathLike | None = None):
        self.cfg = cfg
        self.source = source
        self.builder = builder
        self.enricher = enricher
        self.anomaly = anomaly
        self.syn_watch = SynWatch.of(anomaly, builder)  # the per-port SYN signal, the SYN proxy's switches
        self.ledger = ledger or Ledger()
        self.slots = [SinkSlot(s, cfg.queues.sink) for s in sinks]
        for s in self.slots:
            if s.name not in self.ledger.lanes:
                self.ledger.add_sink(s.name)
        self._clock_factory = clock_factory or Clock
        self.clock = None
        self.audit_log = Path(audit_log) if audit_log else None
        self.dns_log = Path(dns_log) if dns_log else None
        self.status_path = Path(status_path) if status_path else cfg.status_path()
        self.checkpoint = checkpoint or Checkpoint.load(cfg.state_path(self.status_path))
        self.outbox = outbox or Outbox(cfg.outbox_path(self.status_path))
        self.ct_journal = CtJournal(cfg.ct_journal_path(self.status_path))
        self.shutdown_timeout_s = shutdown_timeout_s
        self._close_source = close_source
        self.metrics = metrics                      # fed every status write
        self.hostname = hostname or cfg.hostname or os.uname().nodename
        self.losses = LossReporter(self.hostname, cfg.pin_dir)
        self.counters: Counter = Counter()
        self.ring: Ring | None = None
        self.acks = Acks()
        self.commits = CommitLog()
        self.seq: dict[str, int] = {}
        self.restart: Restart | None = None
        self.previous_run: dict | None = None
        self.kernel_while_down: dict[str, int] = {}
        self._drain_checked = False
        self._ct_checked = False
        self._detach_seen = False
        self._boot_id = ""
        self.logs: dict = {}                        # stream -> (JsonlTail, builder method): collector/sources.py
        self._settle_evt: asyncio.Event | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._runs: set[asyncio.Future] = set()     # periodic runs in progress (see _every)
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._failure: tuple[str, BaseException] | None = None
        self._pending = 0
        self._abandons = 0                          # times Shutdown._count_abandoned counted _pending
        self._events_q: asyncio.Queue | None = None
        self._carry: tuple | None = None
        self._building = 0
        self._kexec: ThreadPoolExecutor | None = None
        self._started = time.time()
        self._clock_at = 0.0
        self.state = "starting"
        self.last_drain: dict = {}
        self.last_scan: dict = {}
        self.reader = None                          # the instance's reader lock (bpf/retired.py; Sources)
        self.detached_ns = 0                        # the detach a scan reported (collector/retired_drain.py)
        self.retired_drained: list[dict] = []       # retired instances drained before this run (collector/retired_drain.py)

    # ---- public --------------------------------------------------------------------------------
    @property
    def detach_reported(self) -> bool:
        """A conntrack scan saw the detach note and reported the ends of what was tracked (docs/collector.md
        "Detach")."""
        return self._detach_seen

    def stop(self) -> None:
        """Request a clean shutdown (signal handlers call this)."""
        if self._stop is not None:
            self._stop.set()

    async def run(self, *, install_signals: bool = False) -> None:
        """Run until stop() or a task failure; always shuts down cleanly. Raises PipelineFailed."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._settle_evt = asyncio.Event()
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
        self.previous_run = previous_run(self.status_path)    # before this run's first status write
        for s in self.slots:
            try:
                await s.sink.start()
            except Exception as e:  # noqa: BLE001 — a sink that cannot start is reported (one line) and dead
                self._failure = (f"sink {s.name}", e)
                s.dead = True
                msg = str(e) if s.name in str(e) else f"sink {s.name}: {e}"
                raise StartFailed(msg) from None
            if s.acknowledges:
                s.sink.on_settle = self._settle_evt.set
        if self.metrics is not None:
            try:
                self.metrics.start()
            except Exception as e:  # noqa: BLE001 — reported with its cause, then the pipeline fails
                self._failure = ("metrics", e)
                raise StartFailed(f"metrics: {e}") from None
        self.clock = self._clock_factory(self.source.monotonic_to_wall())
        self._clock_at = time.monotonic()
        share = self.cfg.event_source_share                 # flow events/s of one source (default: a tenth)
        await self._k(self.source.set_event_budget, self.cfg.event_budget, self.cfg.event_budget // 10 if share is None
                      else share)
        await self._k(self.source.set_drop_prefixes, self.cfg.drop_prefix_v4, self.cfg.drop_prefix_v6)
        self.ring = self.source.ring()
        await self._recover()
        self._spawn("commit", self._commit_loop())
        self._spawn("ring", self._read_ring())
        self._spawn("events", self._build_events())
        self._spawn("drops", self._every(self.cfg.drop_interval_s, self._export_drops))
        self._spawn("ct", self._every(self.cfg.ct_scan_interval_s, self._scan_ct))
        # the anomaly detector evaluates at its bucket boundaries: tick at least that often, so an
        # anomaly is reported within about one bucket of the flood that opens it
        bucket = self.anomaly.bucket_s if self.anomaly is not None else 1.0
        self._spawn("tick", self._every(min(1.0, bucket or 1.0), self._tick))
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
        abandons a run half-way (a drop read or conntrack scan has already touched the kernel);
        shutdown waits for the run in progress instead."""
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
            b = ring.read(batch, commit=False)
            self._account_read(b)
            if b.consumed_bytes:
                self._carry = (b.records, b.end_pos)
                await self._events_q.put(self._carry)
                self._carry = None
            else:
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
            b = self.ring.read(self.cfg.queues.batch, commit=False)
            self._account_read(b)
            if not b.consumed_bytes:
                break
            self._carry = (b.records, b.end_pos)        # held while waiting for room: cut by the deadline,
            await self._events_q.put(self._carry)       # it is counted requeued (Shutdown._count_abandoned)
            self._carry = None
        await self._events_q.put(None)

    async def _build_events(self) -> None:
        while True:
            item = await self._events_q.get()
            if item is None:
                return
            batch, end_pos = item
            self._building = len(batch)                 # until built: counted requeued if cancelled here
            recs = self._build("events", len(batch), self.builder.on_events, batch, self.clock) if len(batch) else []
            self._building = 0
            ticket = await self._emit(recs, "events")
            self._commit_ring(ticket, end_pos, self.seq["events"], len(batch))

    def _commit_ring(self, ticket: Ticket | None, end_pos: int, seq_after: int, events: int) -> None:
        ring, ck = self.ring, self.checkpoint

        def before() -> None:
            ck.commit_ring(end_pos, seq_after, events, ring.producer_pos)

        async def after() -> None:
            ring.commit(end_pos)
            ck.ring_applied(end_pos)
        self.commits.add(CommitEntry(ticket, before, after))

    def _build(self, source: str, n_inputs: int, fn, *args) -> list[dict]:
        """Call a builder method; if it raises, its inputs (already taken from the kernel) are
        counted lost ("build", "error") before the failure stops the service."""
        try:
            return fn(*args)
        except Exception:
            self.ledger.lose("build", "error", n_inputs, produced=source)
            self._building = 0
            raise

    # ---- records → sinks -------------------------------------------------------------------------
    async def _emit(self, records: list[dict], source: str, *, outbox: bool = False, assign_seq: bool = True,
                    enrich: bool = True, observe: bool = True, kept=None) -> Ticket | None:
        """Count, number (hostwall.seq of `source`'s stream), enrich, observe and fan out one batch of
        records — the only way records leave. outbox: make them durable in the outbox first (records the
        kernel cannot give again); kept: called right after a successful outbox append, with no await between.
        Returns the batch's ticket (None for no records)."""
        if not records:
            return None
        self.ledger.produce(source, len(records))
        if assign_seq:
            self._number(records, source)
        abandons = self._abandons
        self._pending += len(records)           # until fanned out; a failure leaves them for shutdown to count
        if outbox:
            try:
                self.outbox.append(records)
            except OSError as e:                # not crash-safe now, but delivered: counted, never silent
                self.counters["outbox_errors"] += 1
                if self.counters["outbox_errors"] in (1, 10, 100):
                    log.warning("cannot write the outbox %s: %s", self.outbox.path, e)
            else:
                if kept is not None:            # only what is in the outbox is kept
                    kept()
        if enrich and self.enricher is not None:
            await self._enrich(records)
        if observe and self.anomaly is not None:
            self.anomaly.observe(records)
        ticket = await self._fan_out(records)
        if ticket.index < 0 and abandons != self._abandons:
            return ticket                       # never fanned out, counted requeued by _count_abandoned
        if ticket.index < 0:                    # never fanned out, produced after _count_abandoned
            self.ledger.lose("pipeline", "requeued", len(records))
        self._pending -= len(records)
        return ticket

    def _number(self, records: list[dict], stream: str) -> None:
        """hostwall.seq and hostwall.stream: the next seqs of `stream`. Cost: two stores per record."""
        n = self.seq.setdefault(stream, 0)
        for i, r in enumerate(records, n):
            h = r.get("hostwall")
            if h is None:
                h = r["hostwall"] = {}
            h["seq"] = i
            h["stream"] = stream
        self.seq[stream] = n + len(records)

    async def _enrich(self, records: list[dict]) -> None:
        enrich = self.enricher.enrich
        batch = getattr(self.enricher, "enrich_batch", None)    # collector.enrich.Enricher: lookups once per key
        for i in range(0, len(records), ENRICH_CHUNK):
            chunk = records[i:i + ENRICH_CHUNK]
            if batch is not None:
                self.counters["enrich_errors"] += batch(chunk)
            else:
                for r in chunk:
                    try:
                        enrich(r)
                    except Exception:  # noqa: BLE001 — best effort: the record ships un-enriched (counted)
                        self.counters["enrich_errors"] += 1
            if i + ENRICH_CHUNK < len(records):
                await asyncio.sleep(0)

    async def _fan_out(self, records: list[dict]) -> Ticket:
        n = len(records)
        for s in self.slots:
            if s.policy is FullQueuePolicy.BLOCK and not s.dead:
                await s.queue.wait_room(n)
        if self._stopping and any(s.queue.closed for s in self.slots):
            return self.acks.dead()             # a straggler the shutdown deadline cut (it closed the queues)
        if self.metrics is not None:            # dashboard series from records (top sources, anomalies)
            self.metrics.observe_records(records)
        for s in self.slots:                    # no await from here on: all sinks or none
            if s.dead:
                self.ledger.sink_lose(s.name, "sink_failed", n)
                continue
            if not s.queue.has_room(n):
                if s.policy is FullQueuePolicy.DROP_NEWEST:
                    self.ledger.sink_lose(s.name, "queue_full", n)
                    s.queue_dropped += n
                    s.shed("queue_full", records)
                    continue
                if s.policy is FullQueuePolicy.DROP_OLDEST:
                    while s.queue.size and not s.queue.has_room(n):
                        old = s.queue.pop_oldest()
                        self.ledger.sink_lose(s.name, "queue_full", len(old))
                        s.queue_dropped += len(old)
                        s.shed("queue_full", old)
            s.queue.put_nowait(records)
        self.ledger.fan_out(n)
        ticket = self.acks.issue()
        if not any(s.acknowledges for s in self.slots):
            self._settle_evt.set()
        return ticket

    async def _sink_worker(self, s: SinkSlot) -> None:
        """Feeds one sink: what queued up while it was busy goes in one send_many() call (up to
        queues.batch records), so a sink whose calls cost a round trip each (Kafka: the broker's
        acknowledgement of the previous request) sends larger batches exactly when the input outpaces it,
        and each batch alone while it keeps up — it never waits for a batch to fill."""
        many = getattr(s.sink, "send_many", None)
        limit = self.cfg.queues.batch if many is not None else 0
        try:
            while True:
                batches = await s.queue.get_many(limit, timeout=1.0)
                if batches is None:
                    if s.queue.closed:
                        break
                    await s.sink.flush()                # idle for a second
                elif many is not None:
                    await many(batches)
                else:
                    await s.sink.send(batches[0])       # limit 0: always one batch
                self._sync_sink(s)
            await s.sink.flush()
            self._sync_sink(s)
        except asyncio.CancelledError:              # the shutdown deadline: the sink did not fail; what is
            self._sync_sink(s)                      # still queued is counted by the shutdown (requeued for an
            raise                                   # at_least_once sink: its kernel data is kept)
        except BaseException:
            s.dead = True
            self._sync_sink(s)
            lost = s.queue.clear()
            self.ledger.sink_lose(s.name, "sink_failed", lost)
            raise

    def _sync_sink(self, s: SinkSlot) -> dict:
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

    # ---- acknowledgement -------------------------------------------------------------------------
    def frontier(self) -> int:
        """Fan-out batches below this are settled in every at_least_once sink (collector/acks.py)."""
        acking = [s for s in self.slots if s.acknowledges]
        if not acking:
            return self.acks.issued
        return min(s.sink.settled_calls for s in acking)

    async def _commit_loop(self) -> None:
        while True:
            await self._settle_evt.wait()
            self._settle_evt.clear()
            await self._commit_ready()
            await asyncio.sleep(COMMIT_INTERVAL_S)

    async def _commit_ready(self, *, last: bool = False) -> int:
        """Resolve durable tickets, then run the commits now due: checkpoint first, kernel side after.
        What at_least_once sinks counted lost up to the frontier gets its loss record into the outbox
        first: once the kernel side moves, that record is the only account of the lost seqs (a kill must
        not take it). Best_effort losses wait for the tick, or the shutdown's `last` commit."""
        frontier = self.frontier()
        if self._stopping:                       # the sinks may be closed: the next start sends them
            self._stash_sink_losses("all" if last else "acking")
        else:
            await self._report_sink_losses("acking")
        self.acks.advance(frontier)
        ready, _ = self.commits.take_ready()
        if not ready:
            return 0
        self.checkpoint.save()
        for e in ready:
            if e.after is not None:
                await e.after()
        self.counters["commits"] += len(ready)
        return len(ready)

    # ---- status ----------------------------------------------------------------------------------
    def observed_in_flight(self) -> dict[str, int]:
        out = {"upstream": self._pending}
        for s in self.slots:
            out[s.name] = s.queue.size + int(s.sink.stats().get("in_flight", 0)) - s.abandoned
        return out

    def status(self, *, final: bool = False) -> dict:
        return build_status(self, final=final)

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
            return
        self._keep_kernel_baseline(sync=final)      # what it shows is reported: the restart's baseline
