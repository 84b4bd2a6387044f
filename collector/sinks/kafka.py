"""Kafka sink (aiokafka): one record per message, acks=all, idempotent producer, compression, and a
bounded on-disk spool (collector.sinks.spool) that takes over while the broker is down or slow.

Messages
- Topics (KafkaOptions): flows (flow, log, deny, drop_summary), anomalies, audit.
- Key: flows/log/deny `network.community_id` (falls back to source.ip when there is none, e.g. ICMP
  errors); drop summaries `hostwall.source.prefix` ("overflow:<reason>" for map-overflow summaries);
  anomalies the source prefix of their key (else "<dimension>=<value>"); audit `hostwall.pin_dir`.
  Partition = CRC-32(key) mod partitions (the same key always lands on the same partition, so per-key
  order holds; not Java's murmur2: do not mix producers on one topic if partition affinity matters).
- Value: the record in the sink's encoding (ecs: the canonical JSON; ocsf: OCSF JSON).
- Headers: schema_version (the record's hostwall.schema_version), encoding (ecs|ocsf), kind (flow, drop_summary, anomaly, ...): one shared list
  per (schema, kind), no allocation per record. Dedup key: event.id in the value (ECS event.id, OCSF
  metadata.uid).
- Timestamp: produce time (CreateTime); the event time is in the value (@timestamp).

Delivery states
  healthy   records go straight to the producer (aiokafka batches per partition: at most one queued
            and one in flight per partition, so memory is bounded by ~2 x batch_size per partition).
  degraded  entered when a batch is not accepted or acknowledged within `spool_after`, or a delivery
            fails: the batches still in the producer are copied to the spool (crash safety; the
            producer keeps retrying them: with idempotence they are never expired, so they arrive
            once and in order), and every new record is appended to the spool. A replay task feeds the
            spool to the producer in order (bounded in-flight bytes); when the spool is fully
            acknowledged the sink is healthy again. A collector that starts with a non-empty spool
            (earlier crash or outage) starts degraded and replays first.
Failures: record-level rejections (too large, corrupt, invalid) are counted lost ("rejected"). Any other
failure (connection, authentication, OutOfOrderSequenceNumber after a leader change, a dead sender)
waits until every batch in flight settled, replaces the producer (a new producer id: its sequence numbers
cannot be trusted any more), rewinds the replay to the spool cursor and retries with jittered
exponential backoff (0.2 s .. 30 s): nothing is dropped for a transient error. Per-key order holds except
when one batch fails for good while a later one of the same partition succeeds (its records come later).

Guarantee: at-least-once for every record send() accepted; consumers dedup on event.id. Duplicates come
only from (a) batches the broker wrote but whose acknowledgement never arrived before the producer was
replaced (it failed, or the collector restarted), (b) a crash between an acknowledgement and the next
cursor write (<= 0.2 s of acknowledgements). A kill -9 while healthy loses the batches in the producer
that were not yet acknowledged (<= 2 x batch_size per partition, typically < 1 s of data); once degraded
(within spool_after of an outage) a kill -9 loses nothing the sink accepted, and a machine crash at most
one spool fsync interval. The spool is bounded: when full, new records are refused and counted
("spool_full"), or with spool_overflow: block, send() waits (back-pressure into the pipeline; the kernel
then counts ringbuf_full).

Accounting (BaseSink): delivered when the broker acknowledged; lost by reason: encode_error, too_large,
rejected, spool_full, spool_error (write failed, e.g. ENOSPC), spool_corrupt, carried_over (at close:
durable in the spool and replayed by the next start — not dropped, but no longer this run's to deliver).
Records of earlier runs replayed from the spool are counted under stats()["recovered"], not in this
run's ledger.

Background tasks (replay/watchdog) are watched like aiokafka's sender (add_done_callback): if one dies,
the next send() raises with its error and the pipeline stops the service.
Cost: ~6-8 µs per record in Python when healthy (orjson ~3.5 µs for a 0.9 KB record, routing and
partitioning ~1 µs, aiokafka's C record builder ~1 µs, zstd ~1 µs), with the cyclic GC paused while a
batch is encoded (records are acyclic; without the pause, generation scans of the records alive in the
queues quadruple the cost); +~3 µs per record to spool and again to replay. Uses aiokafka internals
(BatchBuilder._builder/_relative_offset, the producer's _sender and _message_accumulator): pin aiokafka.
"""
from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import os
import random
import re
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import aiokafka  # at import: a build without it fails in build_sink
import orjson

from ..records.batch import GcPaused as _GcPaused
from .base import BaseSink, FullQueuePolicy, SinkUnavailable
from .kafka_client import client_kwargs, sasl_password, split_bootstrap, ssl_context
from .spool import Spool, SpoolError

log = logging.getLogger("hostwall.collector.kafka")

__all__ = ["KafkaSink", "route", "pack", "unpack", "LATENCY_BUCKETS_S", "HEADER_NAMES"]

FLOWS, ANOMALIES, AUDIT = 0, 1, 2
HEADER_NAMES = ("schema_version", "encoding", "kind")
LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0)
REPLAY_RECORDS = 4096               # records per spool read while replaying
REPLAY_INFLIGHT_BYTES = 16 << 20    # payload bytes handed to the producer and not yet acknowledged
CONNECT_TIMEOUT_S = 10.0
CLOSE_GRACE_S = 5.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 30.0
_REJECTED = ("MessageSizeTooLargeError", "RecordTooLargeError", "RecordListTooLargeError", "CorruptRecordException",
             "InvalidRecordException", "InvalidTimestampError", "UnsupportedForMessageFormatError")
_AUTH = ("SaslAuthenticationFailed", "AuthenticationFailedError", "AuthenticationMethodNotSupported",
         "UnsupportedSaslMechanismError", "TopicAuthorizationFailedError", "ClusterAuthorizationFailedError",
         "SSLError", "SSLCertVerificationError")


# ---- message form --------------------------------------------------------------------------------

def route(rec: dict) -> tuple[int, bytes | None]:
    """(topic index FLOWS|ANOMALIES|AUDIT, key) of a canonical record (see the module docstring)."""
    hw = rec.get("hostwall") or {}
    kind = hw.get("kind")
    if kind == "anomaly":
        k = (hw.get("anomaly") or {}).get("key") or {}
        key = k.get("source_prefix") or (k.get("value") if k.get("dimension") == "source_prefix" else None) \
            or f"{k.get('dimension', '')}={k.get('value', '')}"
        return ANOMALIES, str(key).encode()
    if kind == "audit":
        pin = hw.get("pin_dir")
        return AUDIT, pin.encode() if pin else None
    net = rec.get("network")
    key = net.get("community_id") if net else None
    if not key:
        key = (hw.get("source") or {}).get("prefix")
        if not key:
            key = (rec.get("source") or {}).get("ip")
            if not key and hw.get("overflow"):
                key = f"overflow:{hw.get('reason', '')}"
    return FLOWS, key.encode() if key else None


_PACK = struct.Struct("<dBHB")      # enqueue wall time, topic len, key len (0xFFFF = None), header count


def pack(t_enq: float, topic: str, key: bytes | None, value: bytes, headers: list) -> bytes:
    """A message as spool payload: what is needed to produce it again, plus its enqueue time."""
    tb = topic.encode()
    parts = [_PACK.pack(t_enq, len(tb), 0xFFFF if key is None else len(key), len(headers)), tb]
    if key is not None:
        parts.append(key)
    for hk, hv in headers:
        hkb = hk.encode()
        parts.append(struct.pack("<BH", len(hkb), len(hv)))
        parts.append(hkb)
        parts.append(hv)
    parts.append(value)
    return b"".join(parts)


def unpack(p: bytes) -> tuple[float, str, bytes | None, bytes, list]:
    t_enq, tl, kl, nh = _PACK.unpack_from(p, 0)
    o = _PACK.size
    topic = p[o:o + tl].decode()
    o += tl
    key = None
    if kl != 0xFFFF:
        key = p[o:o + kl]
        o += kl
    headers = []
    for _ in range(nh):
        hl, vl = struct.unpack_from("<BH", p, o)
        o += 3
        headers.append((p[o:o + hl].decode(), p[o + hl:o + hl + vl]))
        o += hl + vl
    return t_enq, topic, key, p[o:], headers


class _Flight:
    """One batch handed to aiokafka. msgs are kept until acknowledged (to spool them on an outage)."""
    __slots__ = ("msgs", "n", "mine", "t0", "nbytes", "seqs", "done", "ok", "final", "tp")

    def __init__(self, msgs, n, mine, t0, nbytes, tp, seqs=None):
        self.msgs, self.n, self.mine, self.t0, self.nbytes, self.tp = msgs, n, mine, t0, nbytes, tp
        self.seqs = seqs            # spool seqs (mirrored or replayed), acknowledged per batch; None: memory only
        self.done = False
        self.ok = False
        self.final = False          # acknowledged or rejected: nothing left to do for it


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


class _Backoff:
    """Exponential backoff with jitter (50-100 % of the step), capped."""

    def __init__(self, lo: float = BACKOFF_MIN_S, hi: float = BACKOFF_MAX_S):
        self.lo, self.hi, self.n = lo, hi, 0

    def next(self) -> float:
        d = min(self.hi, self.lo * (2 ** self.n))
        self.n = min(self.n + 1, 30)
        return d * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.n = 0


def _err_name(e: BaseException) -> str:
    return type(e).__name__


def spool_dir_for(base: str | os.PathLike, target: str) -> Path:
    """One spool folder per broker address: <base>/kafka-<host>-<port>."""
    return Path(base) / ("kafka-" + re.sub(r"[^A-Za-z0-9._-]+", "-", target).strip("-"))


# ---- the sink ------------------------------------------------------------------------------------

class KafkaSink(BaseSink):
    full_queue_policy = FullQueuePolicy.BLOCK     # send() never waits on the broker: it spools instead

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
        self._enc = None
        self._enc_b = encoding.encode()
        self._hdrs: dict = {}                        # (schema_version, kind) -> shared header tuple
        self._producer = None
        self._partitions: dict[str, list[int]] = {}
        self._rr = 0
        self.degraded = False
        self.connected = False
        self._window: dict[int, _Flight] = {}        # direct flights not yet acknowledged, in creation order
        self._replay: dict[int, _Flight] = {}        # replay flights in flight
        self._replay_bytes = 0
        self._owned: list[tuple[int, int]] = []      # spool seqs [a, b) of mirrored flights still in flight
        self._need_rewind = False
        self._recycle = False                        # a delivery failed: new producer (new producer id) first
        self._mirroring: asyncio.Future | None = None
        self._spool_lock = asyncio.Lock()
        self._appenders = 0                          # send() calls on their way into the spool
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._task_error: BaseException | None = None
        self._run_first_seq = 0
        self._backoff = _Backoff()
        self._ssl = None
        self._sasl_password = None
        # counters
        self.counters: Counter = Counter()
        self.recovered_delivered = 0
        self.recovered_lost: Counter = Counter()
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        self.latency_n = 0

    @classmethod
    def from_spec(cls, spec, config) -> KafkaSink:
        return cls(spec.target, encoding=spec.encoding, options=config.kafka, name=spec.name,
                   hostname=config.hostname)

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Check what this build and config need (codec, TLS files, SASL password), recover the spool,
        connect. A broker that cannot be reached starts the sink degraded (records spool); a broker that
        refuses our credentials or certificate is a start failure (SinkUnavailable, one line)."""
        self._enc = _make_encoder(self.encoding)
        self._check_codec()
        quiet = logging.getLogger("aiokafka")
        if quiet.level == logging.NOTSET:            # it logs every failed reconnect at ERROR; we report
            quiet.setLevel(logging.CRITICAL)         # outages ourselves (state, last_error, one warning)
        self._ssl = self._ssl_context()
        self._sasl_password = self._password()
        try:
            rec = self.spool.open()
        except (SpoolError, OSError) as e:
            raise SinkUnavailable(f"sink {self.name}: {e}") from None
        self._run_first_seq = self.spool.next_seq
        if rec.pending:
            log.warning("%s: %d records from an earlier run are in the spool %s; replaying them first",
                        self.name, rec.pending, self.spool.dir)
            self.degraded = True
        if rec.truncated_bytes or rec.corrupt_segments:
            log.warning("%s: spool recovery cut %d bytes of a torn write, %d damaged segments set aside",
                        self.name, rec.truncated_bytes, len(rec.corrupt_segments))
        problem = await self._probe()
        if problem is None:
            try:
                await self._connect()
            except Exception as e:                   # noqa: BLE001 — reachable but not usable yet
                problem = f"{_err_name(e)}: {e}"
        if problem is not None:
            log.warning("%s: broker not reachable at start (%s); spooling to %s until it is",
                        self.name, problem, self.spool.dir)
            self.last_error = problem
            self.degraded = True
            self.counters["degradations"] += 1
        self._task = asyncio.create_task(self._run(), name=f"{self.name} replay")
        self._task.add_done_callback(self._task_done)

    def _check_codec(self) -> None:
        c = self.o.compression
        if c in ("none", "gzip"):
            return
        from aiokafka import codec
        if not {"zstd": codec.has_zstd, "lz4": codec.has_lz4, "snappy": codec.has_snappy}[c]():
            raise SinkUnavailable(f"sink {self.name}: kafka compression {c} needs the cramjam package "
                                  f"(pip install 'aiokafka[{c}]', cramjam>=2.8); or set kafka.compression: gzip|none")

    def _ssl_context(self):
        return ssl_context(self.o, self.name)

    def _password(self) -> str | None:
        return sasl_password(self.o, self.name)

    def _client_kwargs(self) -> dict:
        return client_kwargs(self.o, self._ssl, self._sasl_password)

    async def _probe(self) -> str | None:
        """Open one connection the way the producer will (TLS, SASL). None when it works; a message when
        the broker is unreachable; SinkUnavailable when it refuses us (credentials, certificate)."""
        from aiokafka.conn import create_conn
        try:
            host, port = split_bootstrap(self.bootstrap)
            conn = await asyncio.wait_for(create_conn(host, port, client_id=self.client_id,
                                                      request_timeout_ms=int(CONNECT_TIMEOUT_S * 1000),
                                                      **self._client_kwargs()), CONNECT_TIMEOUT_S)
        except Exception as e:                       # noqa: BLE001 — classified below
            name = _err_name(e)
            if name in _AUTH or "authentication" in str(e).lower() or "certificate" in str(e).lower():
                what = "certificate" if "SSL" in name or "certificate" in str(e).lower() else "credentials"
                raise SinkUnavailable(f"sink {self.name}: the broker refused our {what} "
                                      f"({self.o.security_protocol}"
                                      f"{' ' + self.o.sasl_mechanism if self.o.sasl_mechanism else ''}): "
                                      f"{name}: {e}; check kafka.tls_* / kafka.sasl_*") from None
            return f"{name}: {e}"
        conn.close()
        return None

    async def _connect(self) -> None:
        """(Re)create the producer and learn the partitions of our topics."""
        await self._drop_producer()
        p = aiokafka.AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all", enable_idempotence=True,
            compression_type=None if self.o.compression == "none" else self.o.compression,
            max_batch_size=self.o.batch_bytes, max_request_size=max(self.o.batch_bytes, 1 << 20) + 65536,
            linger_ms=int(self.o.linger_s * 1000), request_timeout_ms=int(self.o.request_timeout_s * 1000),
            retry_backoff_ms=100, metadata_max_age_ms=60_000, **self._client_kwargs())
        try:
            await asyncio.wait_for(p.start(), CONNECT_TIMEOUT_S + 5)
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

    async def _drop_producer(self) -> None:
        p, self._producer = self._producer, None
        self.connected = False
        if p is not None:
            await _stop_producer(p)

    def _producer_dead(self) -> bool:
        p = self._producer
        if p is None:
            return True
        task = getattr(getattr(p, "_sender", None), "sender_task", None)   # aiokafka's sender task
        return task is not None and task.done()

    def _task_done(self, task: asyncio.Task) -> None:
        """Done-callback of the replay task: an error ends the sink (next send() raises)."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not self._closing:
            log.error("%s: replay task failed: %s: %s", self.name, _err_name(exc), exc)
            self._task_error = exc
            self.last_error = f"replay task: {_err_name(exc)}: {exc}"
        elif task is self._task and not self._closing:
            self._task_error = RuntimeError("replay task ended unexpectedly")

    async def flush(self) -> None:
        """Make spooled records durable (per the fsync policy); never waits for the broker."""
        if self.spool.opened and self.o.spool_fsync != "none":
            await self.spool.sync()

    async def close(self) -> None:
        """Give in-flight batches a short grace (CLOSE_GRACE_S) to be acknowledged, copy what is left to
        the spool (the next start replays it), stop the producer. Records of this run left in the spool
        are counted "carried_over"."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_GRACE_S
        while (self._window or self._replay) and loop.time() < deadline and not self._producer_dead():
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
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
        unspooled = sum(f.mine for f in self._window.values() if f.seqs is None and not f.final)
        self._window.clear()
        self._lose("spool_full", unspooled)
        if self.spool.opened:
            await self.spool.close()
        self._lose("carried_over", self.in_flight)
        self.degraded = True if self.spool.pending else self.degraded

    # ---- send --------------------------------------------------------------------------------------
    async def _send(self, records: list[dict]) -> None:
        if self._task_error is not None:
            raise RuntimeError(f"kafka sink background task failed: {self._task_error}")
        if self._closing:
            raise RuntimeError("kafka sink is closed")
        direct = not self.degraded and self._producer is not None
        with _GcPaused():
            groups = self._encode(records, direct)
        if not groups:
            return
        if direct:
            await self._send_direct(groups)
        else:
            await self._spool_msgs([m for g in groups.values() for m in g])

    def _encode(self, records: list[dict], partitioned: bool) -> dict[tuple[str, int | None], list[tuple]]:
        """Records → {(topic, partition or None): [(topic, key, value, headers)]}, order kept within a
        group (per-key order is all Kafka keeps, and all the spool needs). One pass: encode, route, share
        the header list, partition. Encoder failures and oversized records are counted lost here."""
        enc, topics, enc_b = self._enc, self.topics, self._enc_b
        limit = self.o.batch_bytes
        hdrs: dict = self._hdrs
        groups: dict = {}
        for r in records:
            try:
                v = enc(r)
            except Exception as e:                   # noqa: BLE001 — counted, never silent
                self._lose("encode_error", 1)
                self.last_error = f"encode: {_err_name(e)}: {e}"
                continue
            if len(v) > limit:
                self._lose("too_large", 1)
                self.last_error = f"record of {len(v)} bytes exceeds kafka.batch_size ({limit})"
                continue
            t, key = route(r)
            topic = topics[t]
            hw = r.get("hostwall") or {}
            hk = (hw.get("schema_version") or "", hw.get("kind") or "")
            h = hdrs.get(hk)
            if h is None:
                if len(hdrs) > 256:                  # unexpected variety: do not grow without bound
                    hdrs.clear()
                h = hdrs[hk] = [("schema_version", str(hk[0]).encode()), ("encoding", enc_b),
                                ("kind", str(hk[1]).encode())]     # a list (aiokafka's C builder wants one);
                                                                      # shared, never mutated
            p = self._partition(topic, key) if partitioned else None
            g = groups.get((topic, p))
            if g is None:
                groups[(topic, p)] = [(topic, key, v, h)]
            else:
                g.append((topic, key, v, h))
        return groups

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
        """Healthy path: batches per partition straight to the producer; a batch not accepted within
        spool_after degrades the sink and the rest of this call goes to the spool (after the batches
        in flight, so per-partition order holds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.o.spool_after_s
        t0 = time.time()
        ts_ms = int(t0 * 1000)
        groups = list(by_tp.items())
        for gi, (tp, ms) in enumerate(groups):
            i = 0
            while i < len(ms):
                if self.degraded:
                    await self._spool_msgs(ms[i:] + [m for _, g in groups[gi + 1:] for m in g])
                    return
                batch = self._producer.create_batch()
                j, nbytes = _fill(batch, ms, i, ts_ms, 1)
                if j == i:                           # cannot happen (size checked at encode); never spin
                    self._lose("too_large", 1)
                    i += 1
                    continue
                try:
                    fut = await asyncio.wait_for(self._producer.send_batch(batch, tp[0], partition=tp[1]),
                                                 max(0.01, deadline - loop.time()))
                except Exception as e:               # noqa: BLE001 — timeout or producer trouble: spool
                    self._degrade(f"batch for {tp[0]}[{tp[1]}] not accepted: "
                                  f"{_err_name(e) if not isinstance(e, TimeoutError) else 'stalled'}"
                                  f"{': ' + str(e) if str(e) else ''}")
                    await self._spool_msgs(ms[i:] + [m for _, g in groups[gi + 1:] for m in g])
                    return
                f = _Flight(ms[i:j], j - i, j - i, t0, nbytes, tp)
                self._window[id(f)] = f
                fut.add_done_callback(functools.partial(self._direct_done, f))
                self.counters["producer_batches"] += 1
                if self.degraded:                    # degraded while we waited: spool a copy of it too
                    await self._mirror([f])
                i = j

    def _direct_done(self, f: _Flight, fut: asyncio.Future) -> None:
        f.done = True
        exc = _fut_exc(fut)
        if exc is None:
            f.ok = f.final = True
            self._window.pop(id(f), None)
            self._deliver(f.mine)
            self._latency(time.time() - f.t0, f.n)
            if f.seqs is not None:
                self._release(f.seqs)
                for a, b in _runs(f.seqs):
                    self.spool.ack(a, b)
        elif _err_name(exc) in _REJECTED:
            f.final = True
            self._window.pop(id(f), None)
            self._lose("rejected", f.mine)
            self.last_error = f"broker rejected a batch: {_err_name(exc)}: {exc}"
            if f.seqs is not None:
                self._release(f.seqs)
                for a, b in _runs(f.seqs):
                    self.spool.ack(a, b)
        else:
            self.last_error = f"delivery failed: {_err_name(exc)}: {exc}"
            self.counters["failed_batches"] += 1
            self._recycle = True
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

    # ---- degraded: spool + replay -----------------------------------------------------------------
    def _degrade(self, why: str) -> None:
        if self.degraded or self._closing:
            return
        log.warning("%s: %s; spooling to %s", self.name, why, self.spool.dir)
        self.degraded = True
        self.counters["degradations"] += 1
        self.last_error = why
        self._mirroring = asyncio.ensure_future(self._mirror_window())
        self._wake.set()

    async def _mirror_window(self) -> None:
        await self._mirror([f for f in self._window.values() if f.seqs is None])

    async def _mirror(self, flights: list[_Flight]) -> None:
        """Copy batches still in the producer into the spool (in creation order), so a crash cannot lose
        them; they stay owned by the producer (the replay skips their seqs) unless they failed."""
        async with self._spool_lock:
            for f in flights:
                if f.seqs is not None or f.final:
                    continue
                payloads = [pack(f.t0, *m) for m in f.msgs]
                first = self.spool.next_seq
                try:
                    n = await self.spool.append(payloads)
                except (SpoolError, OSError) as e:
                    n = 0
                    self.last_error = f"spool: {e}"
                if n < len(payloads):               # spool full: it stays in memory only
                    self.counters["mirror_refused"] += len(payloads) - n
                    if f.done:                       # failed and cannot be spooled: lost
                        self._window.pop(id(f), None)
                        self._lose("spool_full", f.mine)
                    continue
                f.seqs = list(range(first, first + n))
                f.msgs = None                        # the spool has them now
                if f.final:                          # settled while we wrote: nothing to replay
                    self.spool.ack(first, first + n)
                elif f.done:                         # failed before we got here: the replay sends it
                    self._window.pop(id(f), None)
                    self._need_rewind = True
                else:
                    self._owned.append((first, first + n))
                    self.counters["mirrored"] += n
        self._wake.set()

    def _release(self, seqs: list[int]) -> None:
        if self._owned and seqs:
            r = (seqs[0], seqs[-1] + 1)
            try:
                self._owned.remove(r)
            except ValueError:
                pass

    def _is_owned(self, seq: int) -> bool:
        for a, b in self._owned:
            if a <= seq < b:
                return True
        return False

    async def _spool_msgs(self, msgs: list) -> None:
        """Append to the spool in order (after any mirroring in progress). Full: drop_newest counts the
        refused records lost ("spool_full"); block waits for room."""
        self._appenders += 1
        try:
            await self._spool_append(msgs)
        finally:
            self._appenders -= 1
        self._wake.set()

    async def _spool_append(self, msgs: list) -> None:
        if self._mirroring is not None and not self._mirroring.done():
            await asyncio.shield(self._mirroring)
        now = time.time()
        with _GcPaused():
            payloads = [pack(now, *m) for m in msgs]
        async with self._spool_lock:
            done = 0
            while done < len(payloads):
                try:
                    n = await self.spool.append(payloads[done:])
                except SpoolError as e:              # one record over the spool's record limit
                    self._lose("too_large", 1)
                    self.last_error = str(e)
                    done += 1
                    continue
                except OSError as e:                 # disk full / failing: count, keep the service up
                    done += getattr(e, "written", 0)
                    self.counters["spooled"] += getattr(e, "written", 0)
                    self._lose("spool_error", len(payloads) - done)
                    self.last_error = f"spool write {self.spool.dir}: {e.strerror or e}"
                    self.counters["spool_errors"] += 1
                    break
                done += n
                self.counters["spooled"] += n
                if done < len(payloads):
                    if self.o.spool_overflow == "block" and not self._closing:
                        self.counters["spool_waits"] += 1
                        await self.spool.wait_room(len(payloads[done]), timeout=1.0)
                        continue
                    self._lose("spool_full", len(payloads) - done)
                    self.last_error = f"spool full ({self.spool.max_bytes} bytes): newest records dropped"
                    break

    async def _run(self) -> None:
        """Replay + watchdog: wakes on events or every 0.2 s."""
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), 0.2)
            except TimeoutError:
                pass
            self._wake.clear()
            self._account_corrupt()
            if not self.degraded:
                oldest = next(iter(self._window.values()), None)
                if oldest is not None and time.time() - oldest.t0 > self.o.spool_after_s:
                    self._degrade(f"no acknowledgement for {self.o.spool_after_s:g}s")
                elif self._producer_dead() and self._producer is not None:
                    self._degrade("producer stopped")
                continue
            if self._mirroring is not None and not self._mirroring.done():
                await asyncio.shield(self._mirroring)
            if self._need_rewind or self._recycle or self._producer_dead():
                if self._window or self._replay:
                    continue                         # let every batch in flight settle first (a poisoned
                                                     # producer fails them fast; a dead one already did)
                await self._sleep(self._backoff.next())
                if self._closing:
                    return
                if self._producer_dead() or self._recycle:
                    self.counters["producer_restarts"] += self._producer is not None
                    try:
                        if await self._probe() is None:
                            await self._connect()
                    except SinkUnavailable as e:     # credentials refused now: keep spooling, keep trying
                        self.last_error = str(e)
                        continue
                    except Exception as e:           # noqa: BLE001 — still down: back off and retry
                        self.last_error = f"reconnect: {_err_name(e)}: {e}"
                        continue
                    if self._producer is None:
                        continue
                    self._recycle = False
                self._need_rewind = False
                self.spool.rewind()
                self.counters["rewinds"] += 1
            try:
                await self._feed()
            except OSError as e:                     # the spool cannot be read: report, back off, retry
                self.counters["spool_read_errors"] += 1
                self.last_error = f"spool read {self.spool.dir}: {e.strerror or e}"
                if self.counters["spool_read_errors"] in (1, 10, 100):
                    log.error("%s: %s", self.name, self.last_error)
                await self._sleep(self._backoff.next())
                continue
            if (self.degraded and not self._need_rewind and not self._window and not self._replay
                    and self.spool.pending == 0 and self.spool.unread == 0 and not self._closing
                    and not self._appenders and not self._spool_lock.locked() and not self._producer_dead()):
                log.info("%s: spool replayed; back to direct delivery", self.name)
                self.degraded = False
                self._owned.clear()
                self._backoff.reset()
                self.counters["recoveries"] += 1

    async def _feed(self) -> None:
        """Hand spooled records to the producer in order while in-flight bytes allow."""
        while (not self._closing and not self._need_rewind and self._replay_bytes < REPLAY_INFLIGHT_BYTES
               and self.spool.unread and not self._producer_dead()):
            got = self.spool.read(REPLAY_RECORDS, max(1 << 20, REPLAY_INFLIGHT_BYTES - self._replay_bytes))
            self._account_corrupt()
            if self._owned:
                got = [(s, p) for s, p in got if not self._is_owned(s)]
            if not got:
                continue
            await self._send_chunk(got)

    async def _send_chunk(self, got: list[tuple[int, bytes]]) -> None:
        """Spooled records → batches per partition → producer; each batch is acknowledged in the spool
        on its own (no duplicates when another batch of the same read fails)."""
        groups: dict[tuple[str, int], list] = {}
        first_mine = self._run_first_seq
        with _GcPaused():
            decoded = [(s, unpack(p)) for s, p in got]
        for s, (t_enq, topic, key, value, headers) in decoded:
            if topic not in self._partitions:        # a topic renamed since the record was spooled
                topic = self._retopic(headers)
            tp = (topic, self._partition(topic, key))
            groups.setdefault(tp, []).append((s, t_enq, key, value, headers))
        for tp, ms in groups.items():
            i = 0
            while i < len(ms):
                batch = self._producer.create_batch()
                j, nbytes = _fill(batch, ms, i, int(time.time() * 1000), 2)
                if j == i:                           # spooled under a larger kafka.batch_size: cannot send
                    q = ms[i][0]
                    if q >= first_mine:
                        self._lose("too_large", 1)
                    else:
                        self.recovered_lost["too_large"] += 1
                    self.spool.ack(q, q + 1)
                    i += 1
                    continue
                seqs = [m[0] for m in ms[i:j]]
                mine = sum(1 for q in seqs if q >= first_mine)
                f = _Flight(None, j - i, mine, min(m[1] for m in ms[i:j]), nbytes, tp, seqs=seqs)
                while True:
                    try:
                        fut = await self._producer.send_batch(batch, tp[0], partition=tp[1])
                        break
                    except Exception as e:           # noqa: BLE001 — not queued: retry the same batch
                        self.last_error = f"replay: {_err_name(e)}: {e}"
                        if self._closing or self._producer_dead():
                            self._need_rewind = True     # the rest of this read is re-read later
                            return
                        await self._sleep(self._backoff.next())
                self._replay[id(f)] = f
                self._replay_bytes += nbytes
                fut.add_done_callback(functools.partial(self._replay_done, f))
                self.counters["replayed_batches"] += 1
                i = j

    def _retopic(self, headers: list) -> str:
        kind = dict(headers).get("kind", b"").decode()
        return self.topics[ANOMALIES if kind == "anomaly" else AUDIT if kind == "audit" else FLOWS]

    def _replay_done(self, f: _Flight, fut: asyncio.Future) -> None:
        self._replay.pop(id(f), None)
        self._replay_bytes -= f.nbytes
        exc = _fut_exc(fut)
        if exc is None:
            self._deliver(f.mine)
            self.recovered_delivered += f.n - f.mine
            self._latency(time.time() - f.t0, f.n)
        elif _err_name(exc) in _REJECTED:
            self._lose("rejected", f.mine)
            self.recovered_lost["rejected"] += f.n - f.mine
            self.last_error = f"broker rejected a batch: {_err_name(exc)}: {exc}"
        else:
            self._need_rewind = True                 # not acknowledged: re-read from the cursor
            self._recycle = True
            self.counters["failed_batches"] += 1
            self.last_error = f"replay delivery failed: {_err_name(exc)}: {exc}"
            self._wake.set()
            return
        for a, b in _runs(f.seqs):
            self.spool.ack(a, b)
        self._wake.set()

    def _account_corrupt(self) -> None:
        for a, b in self.spool.take_lost():
            mine = max(0, b - max(a, self._run_first_seq))
            self._lose("spool_corrupt", mine)
            self.recovered_lost["spool_corrupt"] += (b - a) - mine

    async def _sleep(self, s: float) -> None:
        """Sleep, but wake early when closing."""
        end = time.monotonic() + s
        while not self._closing and time.monotonic() < end:
            await asyncio.sleep(min(0.1, end - time.monotonic()))

    # ---- stats -------------------------------------------------------------------------------------
    def _latency(self, s: float, n: int) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, s)] += n
        self.latency_sum_s += s * n
        self.latency_n += n

    def latency_quantile(self, q: float) -> float | None:
        """Upper bucket bound holding quantile q of delivered records (s); None before any delivery."""
        if not self.latency_n:
            return None
        want, acc = q * self.latency_n, 0
        for i, c in enumerate(self.latency_counts):
            acc += c
            if acc >= want:
                return LATENCY_BUCKETS_S[i] if i < len(LATENCY_BUCKETS_S) else float("inf")
        return float("inf")

    def stats(self) -> dict:
        p99 = self.latency_quantile(0.99)
        return {**super().stats(), "bootstrap": self.bootstrap, "encoding": self.encoding,
                "state": "degraded" if self.degraded else "healthy", "connected": self.connected and
                not self._producer_dead(), "topics": list(self.topics), "compression": self.o.compression,
                "window": {"batches": len(self._window), "records": sum(f.n for f in self._window.values())},
                "replay": {"batches": len(self._replay), "bytes": self._replay_bytes},
                "spool": self.spool.stats(),
                "recovered": {"delivered": self.recovered_delivered, "lost": dict(self.recovered_lost)},
                "latency": {"buckets_s": list(LATENCY_BUCKETS_S), "counts": list(self.latency_counts),
                            "sum_s": round(self.latency_sum_s, 6), "count": self.latency_n,
                            "p99_s": p99 if p99 != float("inf") else None},
                **{k: v for k, v in sorted(self.counters.items())}}


def _fill(batch, ms: list, i: int, ts_ms: int, k: int) -> tuple[int, int]:
    """Append ms[i:] (key at m[k], value m[k+1], headers m[k+2]) to an aiokafka BatchBuilder until it
    is full; returns (next index, payload bytes) and closes the batch. Calls the C record builder
    directly (BatchBuilder.append adds ~0.4 µs of Python per record) and keeps the builder's record
    count, which the idempotent producer's sequence numbers depend on."""
    cb = batch._builder
    append = cb.append
    j, off, nbytes, n = i, batch._relative_offset, 0, len(ms)
    with _GcPaused():
        while j < n:
            m = ms[j]
            v = m[k + 1]
            if append(off, ts_ms, m[k], v, m[k + 2]) is None:
                break
            off += 1
            nbytes += len(v)
            j += 1
    batch._relative_offset = off
    batch.close()
    return j, nbytes


def _fut_exc(fut: asyncio.Future) -> BaseException | None:
    if fut.cancelled():
        return asyncio.CancelledError("cancelled")
    return fut.exception()


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


def _make_encoder(encoding: str):
    """record -> value bytes: ecs is the canonical JSON as is (orjson), ocsf the OCSF mapping."""
    if encoding == "ecs":
        return orjson.dumps
    if encoding == "ocsf":
        from hostwall.collector.encoders import to_ocsf
        return lambda r: orjson.dumps(to_ocsf(r))
    raise SinkUnavailable(f"kafka sinks encode ecs or ocsf, not {encoding!r}")
