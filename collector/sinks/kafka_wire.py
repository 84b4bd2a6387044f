"""The Kafka sink's wire format and batching (collector/sinks/kafka.py): topics and keys, headers, the
value encoders, the spool payload of a message, and filling aiokafka batches.

Messages
- Topics (KafkaOptions): flows (flow, log, deny, drop_summary, loss), anomalies, audit.
- Key: flows/log/deny `network.community_id` (falls back to source.ip when there is none, e.g. ICMP
  errors); drop summaries `hostwall.source.prefix` ("overflow:<reason>" for map-overflow summaries);
  anomalies the source prefix of their key (else "<dimension>=<value>"); audit `hostwall.pin_dir`;
  loss records `loss:<stream>`.
  Partition = CRC-32(key) mod partitions (the same key always lands on the same partition, so per-key
  order holds; not Java's murmur2: do not mix producers on one topic if partition affinity matters).
- Value: the record in the sink's encoding (ecs: the canonical JSON; ocsf: OCSF JSON).
- Headers: schema_version (the record's hostwall.schema_version), encoding (ecs|ocsf), kind (flow,
  drop_summary, anomaly, ...): one shared list per (schema, kind), no allocation per record. Dedup key: event.id in the value (ECS event.id, OCSF
  metadata.uid).
- Timestamp: produce time (CreateTime); the event time is in the value (@timestamp).

A message in flight is the tuple (topic, key, value, headers, seqref): seqref is the record's
(stream, hostwall.seq) — kept only in memory, so a loss can be reported with its seqs
(collector/loss_report.py); the spool stores the first four (`pack`).

Batches: the sink frames a partition's records with aiokafka's C record builder (append_records) and
its build thread compresses them (new_builder(...).build()); aiokafka gets the result as a ReadyBatch.
Cost per record (docs/benchmarks.md "`kafka` at the tuned producer's pace"): in the event loop orjson
(~half), the one-pass encode loop and framing; compression and the CRC in the build thread. Uses
aiokafka internals (BatchBuilder._builder/_relative_offset; the methods send_batch calls on a batch,
which ReadyBatch provides): pin aiokafka.
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c as crc32c

from hostwall.gcpause import GcPaused

from .base import SinkUnavailable

__all__ = ["ANOMALIES", "AUDIT", "CODECS", "FLOWS", "HEADER_NAMES", "ROUTED_KINDS", "ReadyBatch", "append_records", "fill",
           "make_encoder", "new_builder", "pack", "route", "spool_dir_for", "unpack"]

FLOWS, ANOMALIES, AUDIT = 0, 1, 2
CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}   # record batch attribute bits
# v2 record batch header (aiokafka DefaultRecordBatch.HEADER_STRUCT): byte offsets of the CRC, of the
# attributes (where the CRC's coverage starts) and of producer id (q), epoch (h), base sequence (i)
_CRC_OFFSET, _ATTRIBUTES_OFFSET, _PRODUCER_OFFSET = 17, 21, 43
_CRC = struct.Struct(">I")
_PRODUCER_STATE = struct.Struct(">qhi")
HEADER_NAMES = ("schema_version", "encoding", "kind")
ROUTED_KINDS = frozenset({"anomaly", "audit", "loss"})    # keyed by what route() says, not a Community ID


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
    if kind == "loss":
        return FLOWS, f"loss:{(hw.get('loss') or {}).get('stream') or ''}".encode()
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


_HDR_LEN = struct.Struct("<BH")
_MEMO_MAX = 1024
_topics: dict[bytes, str] = {}
_headers: dict[bytes, list] = {}


def unpack(p: bytes) -> tuple[float, str, bytes | None, bytes, list]:
    """The inverse of pack. Topic names and header lists repeat (a few per sink), so they are decoded once
    and shared (bounded memo): replay cost is mostly slicing. The returned header list is shared: never
    mutate it."""
    t_enq, tl, kl, nh = _PACK.unpack_from(p, 0)
    o = _PACK.size
    tb = p[o:o + tl]
    topic = _topics.get(tb)
    if topic is None:
        if len(_topics) > _MEMO_MAX:
            _topics.clear()
        topic = _topics[tb] = tb.decode()
    o += tl
    key = None
    if kl != 0xFFFF:
        key = p[o:o + kl]
        o += kl
    h0 = o
    for _ in range(nh):
        hl, vl = _HDR_LEN.unpack_from(p, o)
        o += 3 + hl + vl
    hb = p[h0:o]
    headers = _headers.get(hb)
    if headers is None:
        headers, q = [], h0
        for _ in range(nh):
            hl, vl = _HDR_LEN.unpack_from(p, q)
            q += 3
            headers.append((p[q:q + hl].decode(), p[q + hl:q + hl + vl]))
            q += hl + vl
        if len(_headers) > _MEMO_MAX:
            _headers.clear()
        _headers[hb] = headers
    return t_enq, topic, key, p[o:], headers


def enqueue_time(p: bytes) -> float:
    """The enqueue wall time of a spool payload (its first 8 bytes)."""
    return _PACK.unpack_from(p, 0)[0]


def append_records(cb, off: int, ms: list, i: int, ts_ms: int, k: int) -> tuple[int, int]:
    """Append ms[i:] (key at m[k], value m[k+1], headers m[k+2]) to a C DefaultRecordBatchBuilder from
    relative offset `off` until it is full; returns (next index, payload bytes). Calls the C record
    builder directly (BatchBuilder.append adds ~0.4 µs of Python per record)."""
    append = cb.append
    j, nbytes, n = i, 0, len(ms)
    with GcPaused():
        while j < n:
            m = ms[j]
            v = m[k + 1]
            if append(off, ts_ms, m[k], v, m[k + 2]) is None:
                break
            off += 1
            nbytes += len(v)
            j += 1
    return j, nbytes


def fill(batch, ms: list, i: int, ts_ms: int, k: int) -> tuple[int, int]:
    """append_records into an aiokafka BatchBuilder, then close it; keeps the builder's record count,
    which the idempotent producer's sequence numbers depend on."""
    j, nbytes = append_records(batch._builder, batch._relative_offset, ms, i, ts_ms, k)
    batch._relative_offset += j - i
    batch.close()
    return j, nbytes


def new_builder(codec: int, batch_bytes: int) -> DefaultRecordBatchBuilder:
    """An empty v2 record batch builder (aiokafka's C one), producer state left for ReadyBatch."""
    return DefaultRecordBatchBuilder(2, codec, 0, -1, -1, 0, batch_bytes)


class ReadyBatch:
    """A record batch framed, compressed and checksummed before aiokafka sees it.

    producer.send_batch takes any object with BatchBuilder's methods; the sender then only calls
    _set_producer_state (when it drains the batch: the idempotent producer's id, epoch and base sequence)
    and _build. So the expensive part — DefaultRecordBatchBuilder.build: compression (cramjam releases
    the GIL) and the CRC — runs in the sink's build thread, off the event loop, while the loop encodes
    the next batch; _set_producer_state writes the 14 header bytes and the CRC-32C again, over the
    compressed bytes only (~35 KB for a 512 KiB batch of flow records). Byte for byte what aiokafka's
    BatchBuilder would send (tests/unit/test_kafka_ready_batch.py)."""
    __slots__ = ("_buf", "_n")

    def __init__(self, buf: bytearray, n: int):
        self._buf, self._n = buf, n

    def close(self) -> None:
        pass

    def closed(self) -> bool:
        return True

    def record_count(self) -> int:
        return self._n

    def size(self) -> int:
        return len(self._buf)

    def _build(self) -> bytearray:
        return self._buf

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        b = self._buf
        _PRODUCER_STATE.pack_into(b, _PRODUCER_OFFSET, producer_id, producer_epoch, base_sequence)
        _CRC.pack_into(b, _CRC_OFFSET, crc32c(memoryview(b)[_ATTRIBUTES_OFFSET:]))


def make_encoder(encoding: str):
    """record -> value bytes: ecs is the canonical JSON as is (orjson), ocsf the OCSF mapping."""
    if encoding == "ecs":
        return orjson.dumps
    if encoding == "ocsf":
        from hostwall.collector.encoders import to_ocsf
        return lambda r: orjson.dumps(to_ocsf(r))
    raise SinkUnavailable(f"kafka sinks encode ecs or ocsf, not {encoding!r}")


def spool_dir_for(base: str | os.PathLike, target: str) -> Path:
    """One spool folder per broker address: <base>/kafka-<host>-<port>."""
    return Path(base) / ("kafka-" + re.sub(r"[^A-Za-z0-9._-]+", "-", target).strip("-"))
