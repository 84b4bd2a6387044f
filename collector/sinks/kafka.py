"""Kafka sink (aiokafka): one record per message, acks=all, idempotent producer, compression, and a
bounded on-disk spool (collector.sinks.spool) that takes over while the broker is down or slow.

Split by concept: the wire format and batching (kafka_wire.py), how it connects (kafka_client.py) and
probes a broker (kafka_probe.py), degraded mode — spooling and replay (kafka_replay.py) — and health
(kafka_health.py). This module is the sink itself: start, the healthy send path, close, stats.

Delivery states
  healthy   records go straight to the producer as ready-made batches (_frame: framed in the loop, a
            full one compressed in the build thread, a partition's last one in the loop;
            kafka_wire.ReadyBatch): at most one queued and one in flight per partition, so memory is
            bounded by ~2 x batch_size per partition plus the call's batches.
  degraded  the spool takes over (kafka_replay.py) until the broker acknowledged everything it holds.

Start (fail fast, docs/collector.md "Kafka, OTLP and self-metrics"): TLS files, SASL password and the
codec are checked, the spool is recovered, then the broker is probed (kafka_probe.probe_kafka, within
kafka.connect_timeout). A problem retrying cannot fix (tls, auth, authz, unknown_topic) is a
SinkUnavailable — `hostwall-collector run` exits 1 with that one line. A broker that cannot be reached
or resolved fails the start the same way, unless this sink has delivered to it before (its spool
directory says so) or has records to replay: then the collector starts degraded and spools, so a
restart during a broker outage loses nothing.

Guarantee: at-least-once for every record send() accepted; consumers dedup on event.id. Duplicates come
only from (a) batches the broker wrote but whose acknowledgement never arrived before the producer was
replaced (it failed, or the collector restarted), (b) a crash between an acknowledgement and the next
cursor write (<= 0.2 s of acknowledgements), (c) batches the pipeline sends again after a crash because
they were not yet durable here (the ring buffer still held them). Durability (at_least_once): a batch is
settled once the broker acknowledged it or the spool synced it (collector/sinks/base.py); a kill -9 at
any instant therefore loses nothing the pipeline had released from the kernel.

Accounting (BaseSink): delivered when the broker acknowledged; lost by reason: encode_error, too_large,
rejected, spool_full, disk_full, spool_error, spool_corrupt, carried_over (at close: durable in the spool
and replayed by the next start — not dropped, but no longer this run's to deliver). Records of earlier
runs replayed from the spool are counted under stats()["recovered"], not in this run's ledger (a torn
spool tail after a machine crash: recovered.lost.spool_torn).

Background tasks (replay/watchdog) are watched like aiokafka's sender (add_done_callback): if one dies,
the next send() raises with its error and the pipeline stops the service.
Uses aiokafka internals (the producer's _sender and _message_accumulator): pin aiokafka.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import aiokafka  # at import: a build without it fails in build_sink

from hostwall.gcpause import GcPaused

from ..backoff import Backoff
from .base import BaseSink, Call, FullQueuePolicy, Health, SinkUnavailable
from .kafka_client import client_kwargs, sasl_password, ssl_context
from .kafka_health import LATENCY_BUCKETS_S, LatencyHistogram, SpoolAge, err_name, is_fatal, is_rejected
from .kafka_probe import probe_kafka
from .kafka_replay import Flight, SpoolReplay, seq_runs
from .kafka_wire import (
    CODECS,
    FLOWS,
    ROUTED_KINDS,
    ReadyBatch,
    append_records,
    enqueue_time,
    make_encoder,
    new_builder,
    route,
    spool_dir_for,
)
from .spool import Spool, SpoolError

log = logging.getLogger("hostwall.collector.kafka")

__all__ = ["KafkaSink", "route", "LATENCY_BUCKETS_S"]

CLOSE_GRACE_S = 5.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 30.0
_EMPTY: dict = {}                   # read-only stand-in for a record without "hostwall"
CONNECTED_MARKER = "connected"      # in the spool dir: this sink has delivered to this broker before


class KafkaSink(SpoolReplay, BaseSink):
    full_queue_policy = FullQueuePolicy.BLOCK     # send() never waits on the broker: it spools instead
    tracks_durability = True

    def __init__(self, bootstrap: str, *, encoding: str = "ecs", options=None, spool_dir: str | os.PathLike |
                 None = None, name: str | None = None, hostname: str | None = None):
        from hostwall.collector.config import KafkaOptions
        super().__init__(name or f"kafka://{bootstrap}")
        self.bootstrap = bootstrap
        self.encoding = encoding
        self.o = options or KafkaOptions()
        self.topics = (self.o.flows_topic, self.o.anomalies_topic, self.o.audit_topic)
        self.client_id = self.o.client_id or f"hostwall-{hostname or os.uname().nodename}"
        self.spool = Spool(spool_dir or spool_dir_for(self.o.spool_dir, bootstrap), max_bytes=self.o.spool_max_bytes,
                           segment_bytes=self.o.spool_segment_bytes, fsync=self.o.spool_fsync,
                           fsync_interval_s=self.o.spool_fsync_interval_s,
                           max_record_bytes=max(self.o.batch_bytes, 1 << 20) + 4096)
        self.spool.on_synced = self._on_spool_synced
        self._enc = None
        self._enc_b = encoding.encode()
        self._codec = CODECS[self.o.compression]
        self._builder_pool: ThreadPoolExecutor | None = None    # compresses ready-made batches (_frame)
        self._hdrs: dict = {}                        # (schema_version, kind) -> shared header tuple
        self._producer = None
        self._partitions: dict[str, list[int]] = {}
        self._rr = 0
        self.degraded = False
        self.connected = False
        self._fatal = False                          # the last problem is one retrying cannot fix
        self._fatal_why: str | None = None           # health causes (kafka_replay.SpoolReplay._health_now)
        self._full_why: str | None = None
        self._probing: asyncio.Future | None = None   # a background broker probe while degraded
        self._probed_at = 0.0
        self._window: dict[int, Flight] = {}         # direct flights not yet acknowledged, in creation order
        self._replay: dict[int, Flight] = {}         # replay flights in flight
        self._replay_bytes = 0
        self._owned: list[tuple[int, int]] = []      # spool seqs [a, b) of mirrored flights still in flight
        self._spool_waits: deque = deque()           # (end seq, call, n, flight) settling at spool sync
        self._need_rewind = False
        self._recycle = False                        # a delivery failed: new producer (new producer id) first
        self._mirroring: asyncio.Future | None = None
        self._spool_lock = asyncio.Lock()
        self._appenders = 0                          # send() calls on their way into the spool
        self._untaken = 0                            # of the send under way: not counted, in no flight or spool
        self._cut: Call | None = None                # a send cancelled with records untaken (_cancelled)
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._task_error: BaseException | None = None
        self._run_first_seq = 0
        self._backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S)
        self._ssl = None
        self._sasl_password = None
        self._age = SpoolAge()
        self.counters: Counter = Counter()
        self.recovered_delivered = 0
        self.recovered_lost: Counter = Counter()
        self.latency = LatencyHistogram()
        self.probe = None                            # the start-up probe's result

    @classmethod
    def from_spec(cls, spec, config) -> KafkaSink:
        return cls(spec.target, encoding=spec.encoding, options=config.kafka, name=spec.name,
                   hostname=config.hostname)

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Check what this build and config need, recover the spool, probe the broker, connect (see the
        module docstring). Raises SinkUnavailable with one line when the sink cannot work."""
        self._enc = make_encoder(self.encoding)
        self._check_codec()
        if self._codec:
            self._builder_pool = ThreadPoolExecutor(1, thread_name_prefix="hw-kafka-build")
        quiet = logging.getLogger("aiokafka")
        if quiet.level == logging.NOTSET:            # it logs every failed reconnect at ERROR; we report
            quiet.setLevel(logging.CRITICAL)         # outages ourselves (state, last_error, one warning)
        self._ssl = ssl_context(self.o, self.name)
        self._sasl_password = sasl_password(self.o, self.name)
        try:
            rec = self.spool.open()
        except (SpoolError, OSError) as e:
            raise SinkUnavailable(f"sink {self.name}: {e}") from None
        self._run_first_seq = self.spool.next_seq
        if rec.pending:
            self._age_of_recovered()
            log.warning("%s: %d records from an earlier run are in the spool %s; replaying them first",
                        self.name, rec.pending, self.spool.dir)
            self.degraded = True
        if rec.truncated_bytes or rec.corrupt_segments:
            self.recovered_lost["spool_torn"] += rec.torn_records
            log.warning("%s: spool recovery cut %d bytes of a torn write (%d settled records lost), %d damaged segments "
                        "set aside", self.name, rec.truncated_bytes, rec.torn_records, len(rec.corrupt_segments))
        self.probe = r = await probe_kafka(self.bootstrap, self.o, self.o.connect_timeout_s, name=self.name,
                                           client_id=self.client_id)
        known = (self.spool.dir / CONNECTED_MARKER).exists() or rec.pending > 0
        if not r.ok and (not r.retryable or not known):
            await self.spool.close()
            hint = "" if not r.retryable else " (a sink that never delivered to this broker does not start degraded)"
            raise SinkUnavailable(f"{r}{hint}")
        problem = None if r.ok else str(r)
        if problem is None:
            try:
                await self._connect()
            except Exception as e:                   # noqa: BLE001 — reachable but not usable yet
                if is_fatal(e):
                    await self.spool.close()
                    raise SinkUnavailable(f"sink {self.name}: {err_name(e)}: {e}") from None
                problem = f"{err_name(e)}: {e}"
        if problem is not None:
            log.warning("%s: broker not reachable at start (%s); spooling to %s until it is",
                        self.name, problem, self.spool.dir)
            self.last_error = problem
            self.degraded = True
            self.counters["degradations"] += 1
        if self.degraded:
            self._health_now(why=problem or "replaying the spool of an earlier run")
        self._task = asyncio.create_task(self._run(), name=f"{self.name} replay")
        self._task.add_done_callback(self._task_done)

    def _age_of_recovered(self) -> None:
        got = self.spool.read(1, 1 << 20)
        if got:
            self._age.mark(self.spool.cursor, self.spool.next_seq, enqueue_time(got[0][1]))
        self.spool.rewind()

    def _check_codec(self) -> None:
        c = self.o.compression
        if c in ("none", "gzip"):
            return
        from aiokafka import codec
        if not {"zstd": codec.has_zstd, "lz4": codec.has_lz4, "snappy": codec.has_snappy}[c]():
            raise SinkUnavailable(f"sink {self.name}: kafka compression {c} needs the cramjam package "
                                  f"(pip install 'aiokafka[{c}]', cramjam>=2.8); or set kafka.compression: gzip|none")

    async def _connect(self) -> None:
        """(Re)create the producer and learn the partitions of our topics."""
        await self._drop_producer()
        p = aiokafka.AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all", enable_idempotence=True,
            compression_type=None if self.o.compression == "none" else self.o.compression,
            max_batch_size=self.o.batch_bytes, max_request_size=max(self.o.batch_bytes, 1 << 20) + 65536,
            linger_ms=int(self.o.linger_s * 1000), request_timeout_ms=int(self.o.request_timeout_s * 1000),
            retry_backoff_ms=100, metadata_max_age_ms=60_000,
            **client_kwargs(self.o, self._ssl, self._sasl_password))
        try:
            await asyncio.wait_for(p.start(), self.o.connect_timeout_s + 5)
            parts = {}
            for t in self.topics:
                ps = await asyncio.wait_for(p.partitions_for(t), self.o.request_timeout_s)
                if not ps:
                    raise SinkUnavailable(f"topic {t} has no partitions")
                parts[t] = sorted(ps)
        except BaseException:
            await _stop_producer(p)
            raise
        self._producer = p
        self._partitions = parts
        self.connected = True
        self.counters["connects"] += 1
        try:
            (self.spool.dir / CONNECTED_MARKER).write_text(f"{self.bootstrap}\n")
        except OSError:
            pass

    async def _drop_producer(self) -> None:
        p, self._producer = self._producer, None
        self.connected = False
        if p is not None:
            await _stop_producer(p)

    def _producer_dead(self) -> bool:
        p = self._producer
        if p is None:
            return True
        task = getattr(getattr(p, "_sender", None), "sender_task", None)   # aiokafka's sender task (internal)
        return task is not None and task.done()

    def _task_done(self, task: asyncio.Task) -> None:
        """Done-callback of the replay task: an error ends the sink (next send() raises)."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not self._closing:
            log.error("%s: replay task failed: %s: %s", self.name, err_name(exc), exc)
            self._task_error = exc
            self.last_error = f"replay task: {err_name(exc)}: {exc}"
        elif task is self._task and not self._closing:
            self._task_error = RuntimeError("replay task ended unexpectedly")

    async def flush(self) -> None:
        """Make spooled records durable (per the fsync policy); never waits for the broker."""
        if self.spool.opened and self.o.spool_fsync != "none":
            await self.spool.sync()

    async def close(self) -> None:
        """Give in-flight batches a short grace (CLOSE_GRACE_S) to be acknowledged, copy what is left to
        the spool (the next start replays it), stop the producer. Records of this run left in the spool
        are counted "carried_over"; every batch is settled when close() returns."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_GRACE_S
        while (self._window or self._replay) and loop.time() < deadline and not self._producer_dead():
            await asyncio.sleep(0.02)
        for t in (self._task, self._probing):
            if t is not None and not t.done():
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):    # noqa: BLE001 — reported by _task_done
                    pass
        if self._mirroring is not None:
            await asyncio.shield(self._mirroring)
        left = [f for f in self._window.values() if not f.done and f.seqs is None]
        if left and self.spool.opened:
            await self._mirror(left)
        if self._producer is not None and (self._window or self._replay):
            await _abort_producer(self._producer)    # stop() would wait for the broker forever
        await asyncio.sleep(0)                       # let the failed batches' callbacks run
        await self._drop_producer()
        # whatever of this run is not acknowledged: in the spool (carried over) or never made it there
        unspooled = [f for f in self._window.values() if f.seqs is None and not f.final]
        self._window.clear()
        for f in unspooled:
            self._lose("spool_full", f.mine)
            self._note_msgs("spool_full", f.msgs or ())
            self._settle_flight(f)
        if self.spool.opened:
            await self.spool.close()
        self._on_spool_synced()
        self._lose("carried_over", self.in_flight - (self._untaken if self._cut else 0))
        for c in list(self._calls):                  # counted (delivered, lost or carried over): settled
            if c is not self._cut:                   # (its untaken records: the pipeline's `requeued`)
                self._settle(c, c.remaining)
        self.degraded = True if self.spool.pending else self.degraded
        if self._builder_pool is not None:
            self._builder_pool.shutdown(wait=False)      # its last builds finish on their own (ms)

    # ---- send --------------------------------------------------------------------------------------
    async def _send(self, records: list[dict]) -> None:
        if self._task_error is not None:
            raise RuntimeError(f"kafka sink background task failed: {self._task_error}")
        if self._closing:
            raise RuntimeError("kafka sink is closed")
        call = self._call
        direct = not self.degraded and self._producer is not None
        with GcPaused():
            groups = self._encode(records, direct)
        self._untaken = sum(map(len, groups.values()))    # the others were counted (encode_error, too_large)
        if not groups:
            return
        if direct:
            await self._send_direct(groups)
        else:
            await self._spool_msgs([m for g in groups.values() for m in g], call)

    def _encode(self, records: list[dict], partitioned: bool) -> dict[tuple[str, int | None], list[tuple]]:
        """Records → {(topic, partition or None): [(topic, key, value, headers, hostwall)]}, order kept
        within a group (per-key order is all Kafka keeps, and all the spool needs). One pass: encode, route,
        share the header list, partition. Encoder failures and oversized records are counted lost here.
        Flow records with a Community ID (nearly all) take a short path: key and partition inline,
        grouped by partition index (kafka_wire.route decides the rest)."""
        enc, topics, limit, call = self._enc, self.topics, self.o.batch_bytes, self._call
        hdrs: dict = self._hdrs
        groups: dict = {}
        flows = topics[FLOWS]
        fparts = self._partitions[flows] if partitioned else (None,)
        nf = len(fparts)
        by_part: list[list] = [[] for _ in range(nf)]
        crc32 = zlib.crc32
        for r in records:
            hw = r.get("hostwall") or _EMPTY
            try:
                v = enc(r)
            except Exception as e:                   # noqa: BLE001 — counted, never silent
                self._lose_records("encode_error", [r])
                self._settle(call, 1)
                self.last_error = f"encode: {err_name(e)}: {e}"
                continue
            if len(v) > limit:
                self._lose_records("too_large", [r])
                self._settle(call, 1)
                self.last_error = f"record of {len(v)} bytes exceeds kafka.batch_size ({limit})"
                continue
            kind = hw.get("kind")
            h = hdrs.get((hw.get("schema_version"), kind)) or self._headers(hw.get("schema_version"), kind)
            net = r.get("network") if kind not in ROUTED_KINDS else None
            cid = net.get("community_id") if net else None
            if cid:
                key = cid.encode()
                by_part[crc32(key) % nf if partitioned else 0].append((flows, key, v, h, hw))
                continue
            t, key = route(r)
            topic = topics[t]
            p = self._partition(topic, key) if partitioned else None
            g = groups.get((topic, p))
            if g is None:
                groups[(topic, p)] = [(topic, key, v, h, hw)]
            else:
                g.append((topic, key, v, h, hw))
        for i, ms in enumerate(by_part):             # a key takes one path: per-key order holds
            if ms:
                k = (flows, fparts[i])
                g = groups.get(k)
                groups[k] = ms if g is None else ms + g
        return groups

    def _headers(self, schema_version, kind) -> list:
        """The shared header list of a (schema_version, kind): a list (aiokafka's C builder wants one),
        never mutated."""
        hdrs = self._hdrs
        if len(hdrs) > 256:                          # unexpected variety: do not grow without bound
            hdrs.clear()
        h = hdrs[(schema_version, kind)] = [("schema_version", str(schema_version or "").encode()),
                                            ("encoding", self._enc_b), ("kind", str(kind or "").encode())]
        return h

    def _partition(self, topic: str, key: bytes | None) -> int:
        """Partition of a key: CRC-32 mod partitions; keyless records round-robin."""
        parts = self._partitions[topic]
        if len(parts) == 1:
            return parts[0]
        if key is None:
            self._rr += 1
            return parts[self._rr % len(parts)]
        return parts[zlib.crc32(key) % len(parts)]

    async def _send_direct(self, by_tp: dict) -> None:
        """Healthy path: ready-made batches (_frame) straight to the producer, partitions interleaved so
        that while one partition's batch waits for its predecessor (one in flight per partition with
        idempotence) the others' are on the wire. A batch not accepted within spool_after (each batch
        from when it is its turn: a call of several pipeline batches hands over several per partition,
        one round trip apart) degrades the sink and the rest of this call goes to the spool (after the
        batches in flight, so per-partition order holds)."""
        t0 = time.time()
        call = self._call
        framed = self._frame(by_tp, int(t0 * 1000), call)
        for bi, (tp, msgs, nbytes, built) in enumerate(framed):
            if self.degraded:
                await self._spool_rest(framed, bi, call)
                return
            n = len(msgs)
            try:
                batch = ReadyBatch(await built, n)
            except Exception as e:                   # noqa: BLE001 — the codec failed: counted, never silent
                self._lose("encode_error", n)
                self._note_msgs("encode_error", msgs)
                self._settle(call, n)
                self._untaken -= n
                self.last_error = f"building a batch: {err_name(e)}: {e}"
                continue
            try:
                async with asyncio.timeout(self.o.spool_after_s):
                    fut = await self._producer.send_batch(batch, tp[0], partition=tp[1])
            except Exception as e:                   # noqa: BLE001 — timeout or producer trouble: spool
                self._degrade(f"batch for {tp[0]}[{tp[1]}] not accepted: "
                              f"{err_name(e) if not isinstance(e, TimeoutError) else 'stalled'}"
                              f"{': ' + str(e) if str(e) else ''}")
                await self._spool_rest(framed, bi, call)
                return
            f = Flight(msgs, n, n, t0, nbytes, tp, call=call)
            f.sent = time.time()                     # the watchdog's "no acknowledgement for spool_after"
            self._window[id(f)] = f
            self._untaken -= n                       # the flight counts them (delivered, rejected, spooled)
            fut.add_done_callback(functools.partial(self._direct_done, f))
            self.counters["producer_batches"] += 1
            if self.degraded:                        # degraded while we waited: spool a copy of it too
                await self._mirror([f])

    def _frame(self, by_tp: dict, ts_ms: int, call) -> list[tuple]:
        """Fill record batches in the loop (aiokafka's C record builder), each handed to the build thread
        (compression and CRC, kafka_wire.ReadyBatch) as soon as it is full, so the thread compresses
        batch k while the loop fills k+1; a partition's last (partial) batch is built in the loop — at low
        rates every batch is one, and on a busy machine the thread's two wake-ups and the GIL hand-off
        cost more latency than compressing a small batch (docs/benchmarks.md "`kafka` latency: where the
        seconds went"). Returns [(tp, msgs, payload bytes, future of the built batch)], per-partition
        order kept, partitions interleaved."""
        rows = []
        for tp, ms in by_tp.items():
            row, i = [], 0
            while i < len(ms):
                cb = new_builder(self._codec, self.o.batch_bytes)
                j, nbytes = append_records(cb, 0, ms, i, ts_ms, 1)
                if j == i:                           # cannot happen (size checked at encode); never spin
                    self._lose("too_large", 1)
                    self._note_msgs("too_large", ms[i:i + 1])
                    self._settle(call, 1)
                    self._untaken -= 1
                    i += 1
                    continue
                row.append((tp, ms[i:j], nbytes, self._build(cb, full=j < len(ms))))
                i = j
            rows.append(row)
        return [b for bs in itertools.zip_longest(*rows) for b in bs if b is not None]

    def _build(self, cb, full: bool) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._builder_pool is None or not full:   # no compression, or nothing to frame meanwhile: inline
            fut = loop.create_future()
            fut.set_result(cb.build())
            return fut
        return loop.run_in_executor(self._builder_pool, cb.build)

    async def _spool_rest(self, framed: list, bi: int, call) -> None:
        """Batches framed[bi:] go to the spool instead (in order); their builds are not needed."""
        for b in framed[bi:]:
            b[3].cancel()
        await self._spool_msgs([m for b in framed[bi:] for m in b[1]], call)

    def _direct_done(self, f: Flight, fut: asyncio.Future) -> None:
        f.done = True
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError("cancelled")
        if exc is None:
            f.ok = f.final = True
            self._window.pop(id(f), None)
            self._deliver(f.mine)
            self._settle_flight(f)
            self.latency.add(time.time() - f.t0, f.n)
            if self._health is not Health.OK and not self.degraded:
                self._health_now(fatal=None, full=None)
            if f.seqs is not None:
                self._release(f.seqs)
                for a, b in seq_runs(f.seqs):
                    self.spool.ack(a, b)
        elif is_rejected(exc):
            f.final = True
            self._window.pop(id(f), None)
            self._lose("rejected", f.mine)
            if f.msgs:
                self._note_msgs("rejected", f.msgs)
            self._settle_flight(f)
            self.last_error = f"broker rejected a batch: {err_name(exc)}: {exc}"
            if f.seqs is not None:
                self._release(f.seqs)
                for a, b in seq_runs(f.seqs):
                    self.spool.ack(a, b)
        else:
            self.last_error = f"delivery failed: {err_name(exc)}: {exc}"
            self.counters["failed_batches"] += 1
            self._recycle = True
            if is_fatal(exc):
                self._health_now(fatal=self.last_error)
            if f.seqs is not None:                   # in the spool: replay it after a rewind
                self._window.pop(id(f), None)
                self._release(f.seqs)
                self._need_rewind = True
            elif self.degraded and not self._closing:    # not mirrored (spool was full): try again now
                self._bg(self._mirror([f]))
            self._degrade(self.last_error)           # unmirrored: _mirror_window spools it, then drops it
        self._wake.set()

    def _bg(self, coro) -> None:
        """A short helper task, watched: its failure is reported like the replay task's."""
        t = asyncio.ensure_future(coro)
        t.add_done_callback(self._task_done)

    # ---- stats -------------------------------------------------------------------------------------
    def latency_quantile(self, q: float) -> float | None:
        return self.latency.quantile(q)

    def health(self) -> dict:
        """BaseSink.health + spool size, fill ratio and the age of its oldest record."""
        sp = self.spool
        return {**super().health(), "delivering": "spool" if self.degraded else "direct",
                "spool_bytes": sp.size_bytes, "spool_max_bytes": sp.max_bytes,
                "spool_fill_ratio": round(sp.size_bytes / sp.max_bytes, 6) if sp.max_bytes else 0.0,
                "spool_records": sp.pending,
                "spool_oldest_age_s": _round(self._age.age_s(sp.cursor, sp.pending))}

    def stats(self) -> dict:
        return {**super().stats(), "bootstrap": self.bootstrap, "encoding": self.encoding,
                "state": "degraded" if self.degraded else "healthy", "connected": self.connected and
                not self._producer_dead(), "topics": list(self.topics), "compression": self.o.compression,
                "window": {"batches": len(self._window), "records": sum(f.n for f in self._window.values())},
                "replay": {"batches": len(self._replay), "bytes": self._replay_bytes},
                "spool": self.spool.stats(),
                "recovered": {"delivered": self.recovered_delivered, "lost": dict(self.recovered_lost)},
                "latency": self.latency.stats(),
                "probe": None if self.probe is None else {"status": self.probe.status, "message": str(self.probe)},
                **{k: v for k, v in sorted(self.counters.items())}}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


async def _abort_producer(p) -> None:
    """Stop aiokafka's sender, then fail every batch it still holds (their futures resolve; nothing is
    left for stop() to wait on). Uses aiokafka internals (_sender, _message_accumulator), guarded."""
    from aiokafka.errors import ProducerClosed
    sender = getattr(p, "_sender", None)
    acc = getattr(p, "_message_accumulator", None)
    if sender is None or acc is None:
        return
    try:
        await asyncio.wait_for(sender.close(), 5)
    except Exception as e:                          # noqa: BLE001 — best effort at shutdown
        log.debug("closing the sender: %r", e)
    batches = [b for q in list(acc._batches.values()) for b in q] + list(acc._pending_batches)
    acc.fail_all(ProducerClosed())
    for b in batches:                               # nobody waits on these: mark their errors seen
        w = getattr(b, "_drain_waiter", None)
        if w is not None and w.done() and not w.cancelled():
            w.exception()


async def _stop_producer(p) -> None:
    try:
        await asyncio.wait_for(p.stop(), 10)
    except Exception as e:                          # noqa: BLE001 — best effort at shutdown
        log.debug("stopping the producer: %r", e)
