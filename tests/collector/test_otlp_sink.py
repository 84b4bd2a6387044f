"""The OTLP sink's accounting with a stand-in SDK exporter (no receiver): every record of a call is
delivered or counted lost exactly once, whatever the exports' outcomes and retries (docs/collector.md
"Delivery and loss")."""
from __future__ import annotations

import asyncio

from opentelemetry.sdk._logs.export import LogRecordExportResult

from hostwall.collector.backoff import Backoff
from hostwall.collector.config import OtlpOptions
from hostwall.collector.loss_report import LossReporter, SeqRanges
from hostwall.collector.sinks.otlp import OtlpSink


class Exporter:
    """Fails its first `fail` exports, then succeeds; keeps the sizes of the batches it was given."""

    def __init__(self, fail: int = 0):
        self.fail = fail
        self.batches: list[int] = []

    def export(self, batch) -> LogRecordExportResult:
        self.batches.append(len(batch))
        if len(self.batches) <= self.fail:
            return LogRecordExportResult.FAILURE
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def good(seq: int) -> dict:
    r = SeqRanges()
    r.add([0])
    rec = LossReporter("h", "/pin").sink_loss("s", "x", "events", r, now=1_700_000_000.0 + seq)
    rec["hostwall"].update(seq=seq, stream="collector")
    return rec


def bad(seq: int) -> dict:
    return {"hostwall": {"seq": seq, "stream": "events", "kind": "flow"}}     # the mapping rejects it


async def started_sink(exporter: Exporter, **opts) -> OtlpSink:
    s = OtlpSink("127.0.0.1:1", options=OtlpOptions(**opts))
    await s.start()
    await asyncio.to_thread(s._exporter.shutdown)
    s._exporter = exporter
    return s


def test_a_retried_export_counts_an_unencodable_record_once():
    """at_least_once retries a failed export: the record the mapping rejected is counted lost once, not
    once per attempt (which would count it three times here, and the call out more than in)."""
    async def go():
        s = await started_sink(Exporter(fail=2), delivery="at_least_once")
        s._backoff = Backoff(0.01, 0.01)                # the retry pauses: 10 ms
        await s.send([good(0), bad(1), good(2)])
        return s
    s = asyncio.run(go())
    st = s.stats()
    assert s._exporter.batches == [2, 2, 2]
    assert st["delivered"] == 2 and st["lost"] == {"encode_error": 1} and st["in_flight"] == 0, st
    assert {k: v.count for k, v in s.take_lost_seqs().items()} == {("events", "encode_error"): 1}
    assert s.settled_calls == 1


def test_a_failed_best_effort_export_counts_each_record_under_one_reason():
    """best_effort counts a failed export lost (export_failed): only the records it carried, not the one
    the mapping had rejected already (encode_error)."""
    async def go():
        s = await started_sink(Exporter(fail=1))
        s._backoff = Backoff(0.01, 0.01)
        await s.send([good(0), bad(1), good(2)])
        return s
    s = asyncio.run(go())
    st = s.stats()
    assert st["delivered"] == 0 and st["lost"] == {"encode_error": 1, "export_failed": 2} and st["in_flight"] == 0, st
    # (the good ones are loss records: a lost loss record is counted, not reported again)
    assert {k: v.ranges for k, v in s.take_lost_seqs().items()} == {("events", "encode_error"): [[1, 1]]}
