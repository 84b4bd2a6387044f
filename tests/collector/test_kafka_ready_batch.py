"""The Kafka sink's ready-made batches and its one-pass encoder (collector/sinks/kafka_wire.py, kafka.py;
docs/benchmarks.md "kafka": where the time goes).

- A ReadyBatch (framed and compressed before aiokafka sees it, producer state written when the sender
  drains it) is byte for byte what aiokafka's own BatchBuilder sends, for every codec, and the broker's
  reader (aiokafka's DefaultRecordBatch) reads back the records, headers and producer state.
- KafkaSink._encode's short path for flow records puts every record in the group route() and
  _partition() give it, in per-key order, for a mix of every routing case.
"""
from __future__ import annotations

import gzip
import os
import random
import types

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from hostwall.collector.config import KafkaOptions
from hostwall.collector.sinks.kafka import KafkaSink
from hostwall.collector.sinks.kafka_wire import (
    CODECS,
    ReadyBatch,
    append_records,
    fill,
    make_encoder,
    new_builder,
    route,
)

HEADERS = [("schema_version", b"1.1.0"), ("encoding", b"ecs"), ("kind", b"flow")]


def messages(n: int) -> list[tuple]:
    rnd = random.Random(7)
    return [("t", None if i % 11 == 0 else b"k%d" % (i % 13), os.urandom(rnd.randint(0, 64)) + b"v" * rnd.randint(0, 900),
             HEADERS) for i in range(n)]


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_a_ready_batch_is_what_aiokafka_would_send(codec, monkeypatch):
    # gzip writes the current second into its header: both builders must compress within the same one
    monkeypatch.setattr(gzip, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))
    ms = messages(900)
    c = CODECS[codec]
    i = k = 0
    while i < len(ms):                              # several full batches, then a partial one
        a = BatchBuilder(64 << 10, c)
        j, nbytes = fill(a, ms, i, 1_700_000_000_123 + k, 1)
        cb = new_builder(c, 64 << 10)
        j2, nbytes2 = append_records(cb, 0, ms, i, 1_700_000_000_123 + k, 1)
        assert (j, nbytes) == (j2, nbytes2) and j > i
        r = ReadyBatch(cb.build(), j2 - i)
        assert r.record_count() == a.record_count() == j - i and r.closed()
        state = (1000 + k, k % 5, 40_000 * k)
        a._set_producer_state(*state)
        r._set_producer_state(*state)
        buf = bytes(r._build())
        assert buf == bytes(a._build()) and r.size() == len(buf)
        b = DefaultRecordBatch(buf)
        assert b.validate_crc()
        assert (b.producer_id, b.producer_epoch, b.base_sequence) == state
        got = list(b)
        assert [(x.key, x.value, x.headers) for x in got] == [(m[1], m[2], m[3]) for m in ms[i:j]]
        i, k = j, k + 1
    assert k >= 3


def test_the_producer_state_can_be_written_again():
    """A batch the sender retries keeps its state; a second write (new producer) must leave a valid CRC."""
    ms = messages(50)
    cb = new_builder(CODECS["zstd"], 1 << 20)
    j, _ = append_records(cb, 0, ms, 0, 0, 1)
    r = ReadyBatch(cb.build(), j)
    r._set_producer_state(1, 0, 0)
    r._set_producer_state(2, 1, 77)
    b = DefaultRecordBatch(bytes(r._build()))
    assert b.validate_crc() and (b.producer_id, b.producer_epoch, b.base_sequence) == (2, 1, 77)


def mixed_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        hw = {"kind": "flow", "schema_version": "1.1.0", "seq": i}
        r: dict = {"event": {"id": f"e{i}"}, "hostwall": hw}
        case = i % 9
        if case < 4:
            r["network"] = {"community_id": f"1:c{i % 17}"}
        elif case == 4:                             # no Community ID: keyed by the source prefix
            hw["source"] = {"prefix": f"10.{i % 3}.0.0/24"}
            r["network"] = {"transport": "icmp"}
        elif case == 5:
            hw.update(kind="anomaly", anomaly={"key": {"dimension": "source_prefix", "value": f"10.{i % 4}.0.0/24"}})
        elif case == 6:
            hw.update(kind="audit", pin_dir="/sys/fs/bpf/hw")
        elif case == 7:
            hw.update(kind="loss", loss={"stream": "events"})
        else:                                       # drop summary of a map overflow: no address at all
            hw.update(kind="drop_summary", overflow=True, reason="flows_full")
            if i % 2:
                r["network"] = {"community_id": f"1:c{i % 17}"}
                hw["schema_version"] = "1.0.0"
        out.append(r)
    return out


@pytest.mark.parametrize("partitioned", [True, False])
def test_encode_groups_every_record_where_route_and_partition_say(tmp_path, partitioned):
    s = KafkaSink("127.0.0.1:1", options=KafkaOptions(spool_dir=str(tmp_path)))
    s._enc = make_encoder("ecs")
    s._partitions = {s.topics[0]: [0, 1, 2, 3, 4], s.topics[1]: [0, 1], s.topics[2]: [0]}
    recs = mixed_records(2000)
    groups = s._encode(recs, partitioned)
    assert sum(len(g) for g in groups.values()) == len(recs)
    s._rr = 0
    by_id = {}
    for (topic, p), ms in groups.items():
        for m in ms:
            by_id[m[4]["seq"]] = (topic, p, m)
    per_key: dict = {}
    for r in recs:
        t, key = route(r)
        topic, p, m = by_id[r["hostwall"]["seq"]]
        assert topic == s.topics[t] and m[0] == topic and m[1] == key and m[2] == make_encoder("ecs")(r)
        hw = r["hostwall"]
        assert m[3] == [("schema_version", hw["schema_version"].encode()), ("encoding", b"ecs"),
                        ("kind", hw["kind"].encode())]
        if partitioned and key is not None:
            assert p == s._partition(topic, key)
        if not partitioned:
            assert p is None
        per_key.setdefault((topic, key), []).append(hw["seq"])
    for (topic, key), seqs in per_key.items():       # per-key order within its group
        if key is None:
            continue
        _, p, _ = by_id[seqs[0]]
        in_group = [m[4]["seq"] for m in groups[(topic, p)] if m[1] == key]
        assert in_group == seqs
