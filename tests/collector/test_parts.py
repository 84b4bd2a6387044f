"""The pipeline's parts (collector/parts.py): the production classes and the tests' fakes offer what the
pipeline calls (runtime-checked Protocols: every member present), so neither side probes the other."""
from __future__ import annotations

import inspect

from hostwall.collector import parts
from hostwall.collector.anomaly import AnomalyDetector
from hostwall.collector.enrich import Enricher
from hostwall.collector.kernel import KernelSource
from hostwall.collector.metrics import SelfMetrics
from hostwall.collector.records import RecordBuilder
from hostwall.collector.sinks.console import ConsoleSink
from hostwall.collector.sinks.jsonl import JsonlSink
from hostwall.collector.sinks.kafka import KafkaSink
from hostwall.collector.sinks.otlp import OtlpSink
from tests.collector.fakes import FakeRingBuffer, FakeSource, MemorySink, StubBuilder


def members(proto) -> set[str]:
    return {n for n in dir(proto) if not n.startswith("_")} - {n for n in dir(object)}


def offers(cls, proto) -> set[str]:
    """Members of `proto` that `cls` lacks (class level: methods and properties; attributes set in
    __init__ are checked on instances by the isinstance tests below)."""
    annotations = set(inspect.get_annotations(proto))
    return {m for m in members(proto) - annotations if not hasattr(cls, m)}


def test_production_classes_offer_every_member():
    for cls, proto in ((KernelSource, parts.KernelSource), (RecordBuilder, parts.RecordBuilder),
                       (Enricher, parts.Enricher), (AnomalyDetector, parts.Detector),
                       (SelfMetrics, parts.MetricsSink), (JsonlSink, parts.Sink), (KafkaSink, parts.Sink),
                       (OtlpSink, parts.Sink), (ConsoleSink, parts.Sink)):
        assert offers(cls, proto) == set(), (cls.__name__, offers(cls, proto))


def test_fakes_are_the_same_parts(tmp_path):
    src = FakeSource()
    assert isinstance(src, parts.KernelSource) and isinstance(src.rb, parts.Ring)
    assert isinstance(FakeRingBuffer(src.fake), parts.Ring)
    assert isinstance(StubBuilder(), parts.RecordBuilder)
    assert isinstance(MemorySink(), parts.Sink)
    assert isinstance(JsonlSink(tmp_path / "f.jsonl"), parts.Sink)


def test_otlp_encode_errors_note_the_records_seqs():
    """A record the OTLP mapping rejects is counted lost (encode_error) with its hostwall.seq noted, so
    the pipeline's loss record explains the gap a consumer sees (docs/records.md "Completeness")."""
    s = OtlpSink("127.0.0.1:1")
    assert s.to_log_records([{"hostwall": {"seq": 5, "stream": "events", "kind": "flow"}}], 1) == []
    assert s.lost == {"encode_error": 1}
    assert {k: (v.count, v.ranges) for k, v in s.take_lost_seqs().items()} == {("events", "encode_error"): (1, [[5, 5]])}
