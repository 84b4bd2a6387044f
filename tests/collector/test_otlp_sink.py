"""The OTLP sink's accounting with a stand-in SDK exporter (no receiver): every record of a call is
delivered or counted lost exactly once, whatever the exports' outcomes and retries (docs/collector.md
"Delivery and loss")."""
from __future__ import annotations

import asyncio

import pytest
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


class PartialReceiver:
    """An OTLP logs receiver on 127.0.0.1 (gRPC or HTTP/protobuf) that accepts every request and says it
    rejected `rejected` log records of each (OTLP partial success); counts the log records it got."""

    def __init__(self, protocol: str, rejected: int, *, raw: bytes | None = None):
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as pb
        self.got = 0
        self.protocol = protocol

        def answer(req) -> pb.ExportLogsServiceResponse:
            self.got += sum(len(s.log_records) for r in req.resource_logs for s in r.scope_logs)
            resp = pb.ExportLogsServiceResponse()
            resp.partial_success.rejected_log_records = rejected
            resp.partial_success.error_message = "attribute too long"
            return resp
        if protocol == "grpc":
            from concurrent import futures

            import grpc
            from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as pbg

            class Servicer(pbg.LogsServiceServicer):
                def Export(self, request, context):
                    return answer(request)
            self.server = grpc.server(futures.ThreadPoolExecutor(2))
            pbg.add_LogsServiceServicer_to_server(Servicer(), self.server)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            self.server.start()
        else:
            import http.server
            import threading

            class Handler(http.server.BaseHTTPRequestHandler):
                def do_POST(self):
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                    out = answer(pb.ExportLogsServiceRequest.FromString(body)).SerializeToString()
                    out = out if raw is None else raw         # raw: a body that is no response
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)

                def log_message(self, *a):
                    pass
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.port = self.server.server_address[1]
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.protocol == "grpc":
            self.server.stop(None)
        else:
            self.server.shutdown()
            self.server.server_close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("delivery", ["best_effort", "at_least_once"])
def test_records_the_receiver_rejects_in_a_partial_success_are_counted_lost_not_delivered(protocol, delivery):
    """OTLP partial success: the receiver took the request but rejected some of its log records (not to be
    retried, says the OTLP spec). Those are lost (`rejected`), not delivered — the SDK exporters report the
    request as a plain success."""
    rx = PartialReceiver(protocol, rejected=2)
    try:
        async def go():
            s = OtlpSink(f"127.0.0.1:{rx.port}", options=OtlpOptions(protocol=protocol, delivery=delivery, batch=5,
                                                                     timeout_s=5.0))
            await s.start()
            await s.send([good(i) for i in range(7)])   # two requests: 5 + 2 records
            await s.close()
            return s
        s = asyncio.run(go())
    finally:
        rx.stop()
    st = s.stats()
    assert rx.got == 7
    assert st["delivered"] == 3 and st["lost"] == {"rejected": 4} and st["in_flight"] == 0, st
    assert s.exports == 2 and "attribute too long" in st["last_error"] and s.settled_calls == 1


def send_to(rx: PartialReceiver, protocol: str, n: int = 7) -> OtlpSink:
    async def go():
        s = OtlpSink(f"127.0.0.1:{rx.port}", options=OtlpOptions(protocol=protocol, batch=5, timeout_s=5.0))
        await s.start()
        await s.send([good(i) for i in range(n)])
        await s.close()
        return s
    try:
        return asyncio.run(go())
    finally:
        rx.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("count,lost", [(-5, {}), (100, {"rejected": 7})])
def test_a_rejected_count_out_of_range_is_bounded_to_the_request(protocol, count, lost):
    """rejected_log_records is an int64: a negative count must not count more delivered than sent, a count
    over the request's size not more lost — each record once (docs/collector.md "Kafka, OTLP ...")."""
    s = send_to(PartialReceiver(protocol, rejected=count), protocol)
    st = s.stats()
    assert st["delivered"] == 7 - sum(lost.values()) and st["lost"] == lost and st["in_flight"] == 0, st
    assert st["partial_success_watching"] is True


def test_a_response_that_cannot_be_parsed_is_counted_and_its_records_delivered():
    rx = PartialReceiver("http", rejected=0, raw=b"\xff\xff\xff not protobuf")
    s = send_to(rx, "http")
    st = s.stats()
    assert st["delivered"] == 7 and st["lost"] == {} and st["partial_success_parse_failures"] == 2, st


def test_the_watched_grpc_export_keeps_the_stubs_other_calling_styles():
    """The wrapper stands in for the stub's Export: with_call and future still reach the receiver."""
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as pb
    rx = PartialReceiver("grpc", rejected=0)
    try:
        async def go():
            s = OtlpSink(f"127.0.0.1:{rx.port}", options=OtlpOptions(protocol="grpc", timeout_s=5.0))
            await s.start()
            export = s._exporter._client.Export
            _, call = export.with_call(pb.ExportLogsServiceRequest(), timeout=5.0)
            export.future(pb.ExportLogsServiceRequest(), timeout=5.0).result()
            await s.close()
            return s, call
        s, call = asyncio.run(go())
    finally:
        rx.stop()
    assert call.code().name == "OK" and s.stats()["partial_success_watching"] is True


def test_sdk_internals_that_cannot_be_hooked_leave_the_exporter_as_it_was(monkeypatch, caplog):
    """An SDK whose exporter internals moved: the install fails, nothing is replaced, a warning says so,
    the stats show `partial_success_watching: false`, and exports count delivered whole."""
    import hostwall.collector.sinks.otlp as otlp

    class Moved(Exporter):
        _channel = None

        def __init__(self):
            super().__init__()
            self._client = type("Stub", (), {"Export": None})()

        def _stub(self, channel):
            raise TypeError("stub wants other arguments")
    ex = Moved()
    stub, client = ex._stub, ex._client
    monkeypatch.setattr(otlp, "make_log_exporter", lambda endpoint, o: ex)

    async def go():
        s = OtlpSink("127.0.0.1:1")
        await s.start()
        await s.send([good(i) for i in range(3)])
        return s
    s = asyncio.run(go())
    st = s.stats()
    assert ex._stub == stub and ex._client is client and ex.batches == [3]
    assert st["partial_success_watching"] is False and st["delivered"] == 3 and st["lost"] == {}, st
    assert "partial success not watched (TypeError: stub wants other arguments)" in caplog.text


def test_an_at_least_once_export_cut_by_the_shutdown_deadline_stays_in_the_kernel(tmp_path):
    """otlp.delivery: at_least_once and a receiver that keeps failing: at the shutdown deadline the batch
    the sink was retrying is `requeued` (docs/collector.md, the loss ledger: not a loss, it was never
    released in the kernel) — the ring does not move past it, and the next collector sends it again."""
    import uvloop

    from hostwall.collector.pipeline import Pipeline
    from tests.collector.fakes import FakeSource, StubBuilder, cfg, started, until

    class FailingOtlp(OtlpSink):
        async def start(self):
            await super().start()
            await asyncio.to_thread(self._exporter.shutdown)
            self._exporter = Exporter(fail=10**9)
            self._backoff = Backoff(0.01, 0.05)

    class Mappable(StubBuilder):                      # records the OTLP mapping takes
        def on_events(self, batch, clock):
            return [good(int(t)) for t in batch["start_ns"]]

    src = FakeSource()
    sink = FailingOtlp("127.0.0.1:1", options=OtlpOptions(delivery="at_least_once"))
    pipe = Pipeline(cfg(tmp_path), src, Mappable(), [sink], shutdown_timeout_s=0.5)

    async def go():
        task = await started(pipe)
        src.emit(20)
        await until(lambda: sink.export_failures >= 3)
        pipe.stop()
        await task
    uvloop.run(go())
    lane = pipe.ledger.lanes[sink.name]
    assert lane.delivered == 0 and dict(lane.lost) == {"requeued": 20}, dict(lane.lost)
    assert src.rb.consumer_pos == 0 and src.rb.uncommitted_bytes() == 20 * 128     # the kernel keeps them
    assert pipe.ledger.check(quiescent=True) == []
