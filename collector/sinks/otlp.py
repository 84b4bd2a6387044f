"""OTLP sink: records as OpenTelemetry log records, exported with the SDK's OTLP log exporter over gRPC
or HTTP/protobuf (opentelemetry-exporter-otlp).

Mapping (collector/encoders/otel.py): timestamp = the record's @timestamp, observed timestamp = when this
sink first tried to export it, severity (flows/summaries INFO, denies WARN, anomalies WARN..FATAL by band, audit INFO),
body = a one-line summary, attributes = OpenTelemetry semantic conventions (network.*, source.*,
destination.*, client.*, server.*, security_rule.*, process.*, container.*, k8s.*, host.name,
log.record.uid = event.id) plus hostwall.*; event_name = event.dataset. Resource: service.*, host.*,
hostwall.pin_dir and hostwall.interfaces (collector/resource.py). Scope: "hostwall.collector". Scope and
resource carry the semantic conventions' schema URL (encoders.otel.SCHEMA_URL: the version the
attribute names follow).

Delivery (docs/collector.md "Delivery and loss"): the pipeline's bounded queue in front of this sink drops the OLDEST batch when
full (full_queue_policy drop_oldest, counted "queue_full" in the ledger): fresh data first. send() exports
in requests of `otlp.batch` records on a worker thread. The SDK exporter retries only retryable errors
(gRPC UNAVAILABLE, RESOURCE_EXHAUSTED, ...; HTTP 429/502/503/504 and connection errors) with jittered
exponential backoff within `otlp.timeout`; a request that still fails is counted lost ("export_failed"),
and the sink then waits a jittered, growing pause (0.5 s .. 30 s, reset on success) before the next
request, so an outage neither spins nor grows memory — the queue in front sheds and counts instead.
At-most-once: an export the collector received but did not acknowledge in time counts as lost.
Partial success (the receiver took a request but rejected some of its log records: `partial_success.
rejected_log_records`, not to be retried per the OTLP spec): those are counted lost ("rejected"), the rest
delivered — a count without seqs, since the response does not say which. The SDK exporters discard the
response, so the sink reads it where they get it (collector/sinks/otlp_partial.py: SDK internals, guarded;
`partial_success_watching` and `partial_success_parse_failures` in the stats say whether it works).

`otlp.delivery: at_least_once` makes the sink acknowledging (docs/collector.md "Delivery and loss"): its
queue blocks instead of shedding, a failed export is retried after the same jittered pause (Backoff)
instead of being counted lost, and a batch settles — the pipeline may release its kernel data — once
the receiver accepted it; one still unaccepted at the shutdown deadline is `requeued` (stays in the kernel). Default best_effort: the pipeline never waits for this sink.

Cost: ~30-60 µs per record (attribute dicts + protobuf encoding in the SDK), on the worker thread.
"""
from __future__ import annotations

import asyncio
import logging
import time

import opentelemetry.sdk._logs  # noqa: F401 — at import: a build without the SDK fails

# in build_sink, before the kernel is touched
from ..backoff import Backoff
from .base import BaseSink, Durability, FullQueuePolicy, Health, SinkUnavailable
from .otlp_partial import PartialSuccess

log = logging.getLogger("hostwall.collector.otlp")

__all__ = ["OtlpSink", "make_log_exporter", "SCOPE"]

SCOPE = "hostwall.collector"
PAUSE_MIN_S, PAUSE_MAX_S = 0.5, 30.0


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def make_log_exporter(endpoint: str, options, *, signal: str = "logs"):
    """An SDK OTLP exporter for `signal` (logs | metrics) to HOST:PORT per OtlpOptions. Raises
    SinkUnavailable with a one-line reason (unreadable TLS files, missing package)."""
    o = options
    for name in ("opentelemetry.exporter.otlp.proto.grpc.exporter", "opentelemetry.exporter.otlp.proto.http"):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:              # it warns on every retry; we count and report failures
            lg.setLevel(logging.ERROR)
    try:
        if o.protocol == "grpc":
            import grpc
            from opentelemetry.exporter.otlp.proto.grpc import _log_exporter, metric_exporter
            from opentelemetry.exporter.otlp.proto.grpc.exporter import Compression
            creds = None
            if o.tls:
                creds = grpc.ssl_channel_credentials(root_certificates=_read(o.tls_ca_file),
                                                     private_key=_read(o.tls_key_file),
                                                     certificate_chain=_read(o.tls_cert_file))
            cls = _log_exporter.OTLPLogExporter if signal == "logs" else metric_exporter.OTLPMetricExporter
            return cls(endpoint=endpoint, insecure=not o.tls, credentials=creds, headers=dict(o.headers) or None,
                       timeout=o.timeout_s,
                       compression=Compression.Gzip if o.compression == "gzip" else Compression.NoCompression)
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        scheme = "https" if o.tls else "http"
        cls = OTLPLogExporter if signal == "logs" else OTLPMetricExporter
        return cls(endpoint=f"{scheme}://{endpoint}/v1/{signal}", certificate_file=o.tls_ca_file,
                   client_key_file=o.tls_key_file, client_certificate_file=o.tls_cert_file,
                   headers=dict(o.headers) or None, timeout=o.timeout_s,
                   compression=Compression.Gzip if o.compression == "gzip" else Compression.NoCompression)
    except ModuleNotFoundError as e:
        raise SinkUnavailable(f"OTLP over {o.protocol} needs the Python package {e.name!r} "
                              "(opentelemetry-exporter-otlp)") from None
    except OSError as e:
        raise SinkUnavailable(f"OTLP TLS: cannot read {e.filename}: {e.strerror}; check otlp.tls_*") from None


class OtlpSink(BaseSink):
    full_queue_policy = FullQueuePolicy.DROP_OLDEST
    durability = Durability.BEST_EFFORT

    def __init__(self, endpoint: str, *, options=None, resource: dict | None = None, name: str | None = None):
        from hostwall.collector.config import OtlpOptions
        super().__init__(name or f"otlp://{endpoint}")
        self.endpoint = endpoint
        self.o = options or OtlpOptions()
        self.resource_attrs = dict(resource or {})
        if self.o.delivery == "at_least_once":
            self.durability = Durability.AT_LEAST_ONCE
            self.full_queue_policy = FullQueuePolicy.BLOCK
        self._exporter = None
        self._partial: PartialSuccess | None = None
        self._resource = None
        self._scope = None
        self._pause = 0.0
        self._backoff = Backoff(PAUSE_MIN_S, PAUSE_MAX_S)
        self.exports = 0
        self.export_failures = 0
        self.paused_s = 0.0
        self._closed = False

    @classmethod
    def from_spec(cls, spec, config) -> OtlpSink:
        from hostwall.collector.resource import resource_attributes
        return cls(spec.target, options=config.otlp, resource=resource_attributes(config), name=spec.name)

    async def start(self) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from hostwall.collector.encoders.otel import SCHEMA_URL
        from hostwall.collector.enrich.host import collector_version
        self._exporter = make_log_exporter(self.endpoint, self.o)
        self._partial = PartialSuccess(self._exporter)
        self._resource = Resource.create(self.resource_attrs, schema_url=SCHEMA_URL)
        self._scope = InstrumentationScope(SCOPE, collector_version(), schema_url=SCHEMA_URL)

    async def close(self) -> None:
        if self._exporter is not None and not self._closed:
            self._closed = True
            await asyncio.to_thread(self._exporter.shutdown)

    def to_log_records(self, records: list[dict], observed_ns: int) -> list:
        """Canonical records → SDK ReadableLogRecords; records the mapping rejects are counted lost."""
        out, _, rejected = self._convert(records, observed_ns)
        self._count_rejected(rejected)
        return out

    def _convert(self, records: list[dict], observed_ns: int) -> tuple[list, list[dict], list[tuple[dict, str]]]:
        """(log records, the records they are, [(rejected record, why)]). Counts nothing: it runs on the
        worker thread, and the loop counts the rejections once per call, however often the export is tried."""
        from opentelemetry._logs import LogRecord, SeverityNumber
        from opentelemetry.sdk._logs import ReadableLogRecord

        from hostwall.collector.encoders.otel import to_otel
        out, ok, rejected = [], [], []
        for r in records:
            try:
                o = to_otel(r, observed_ns)
                attrs = o["attributes"]
                lr = LogRecord(timestamp=o["time_unix_nano"], observed_timestamp=observed_ns,
                               severity_text=o["severity_text"], severity_number=SeverityNumber(o["severity_number"]),
                               body=o["body"], attributes=attrs, event_name=o["event_name"])
            except Exception as e:                  # noqa: BLE001 — counted by the caller, never silent
                rejected.append((r, f"{type(e).__name__}: {e}"))
                continue
            out.append(ReadableLogRecord(log_record=lr, resource=self._resource, instrumentation_scope=self._scope))
            ok.append(r)
        return out, ok, rejected

    def _count_rejected(self, rejected: list[tuple[dict, str]]) -> None:
        if rejected:
            self._lose_records("encode_error", [r for r, _ in rejected])   # seqs noted: the loss record explains the gap
            self.last_error = f"encode: {rejected[-1][1]}"

    def _export(self, batch: list) -> tuple[bool, int, str]:
        """Worker thread: one export request of converted log records: (success, log records the receiver
        rejected in a partial success, its message)."""
        from opentelemetry.sdk._logs.export import LogRecordExportResult
        if self._partial is not None:
            self._partial.take()
        ok = self._exporter.export(batch) == LogRecordExportResult.SUCCESS
        rejected, why = self._partial.take() if ok and self._partial is not None else (0, "")
        return ok, max(0, min(rejected, len(batch))), why      # int64 on the wire: a bad count bounded

    async def _send(self, records: list[dict]) -> None:
        if self._closed:
            raise RuntimeError("otlp sink is closed")
        step = self.o.batch
        for i in range(0, len(records), step):
            if self._pause:
                await asyncio.sleep(self._pause)
                self.paused_s += self._pause
                self._pause = 0.0
            # converted once (observed time: the first attempt); a retry sends the same log records
            batch, sent, rejected = await asyncio.to_thread(self._convert, records[i:i + step], time.time_ns())
            self._count_rejected(rejected)
            if not batch:
                continue
            ok, rejected, why = await asyncio.to_thread(self._export, batch)
            self.exports += 1
            while not ok and self.durability is Durability.AT_LEAST_ONCE and not self._closed:
                self.export_failures += 1
                self._pause = self._backoff.next()
                self.last_error = f"export to {self.endpoint} ({self.o.protocol}) failed; retrying in {self._pause:.1f}s"
                self._set_health(Health.DEGRADED, f"exports to {self.endpoint} fail; retrying (back-pressure)")
                await asyncio.sleep(self._pause)
                self.paused_s += self._pause
                self._pause = 0.0
                ok, rejected, why = await asyncio.to_thread(self._export, batch)
                self.exports += 1
            if ok:
                self._deliver(len(batch) - rejected)
                self._backoff.reset()
                self._set_health(Health.OK)
                if rejected:                        # partial success: counted, never retried (OTLP spec)
                    self._lose("rejected", rejected)
                    self.last_error = f"{self.endpoint} rejected {rejected} of {len(batch)} log records: {why}"
            else:
                self.export_failures += 1
                self._lose_records("export_failed", sent)
                self._pause = self._backoff.next()
                self.last_error = (f"export to {self.endpoint} ({self.o.protocol}) failed after the exporter's "
                                   f"retries; pausing {self._pause:.1f}s")
                self._set_health(Health.DEGRADED, f"exports to {self.endpoint} fail; records are counted lost")

    def _cancelled(self, call, left: int) -> None:
        """at_least_once: an export cut by the shutdown deadline stays in flight, its call unsettled, so the
        pipeline counts it `requeued` and keeps its kernel data for the next collector (docs/collector.md "The
        loss ledger") instead of releasing records no receiver took. best_effort: lost (`cancelled`)."""
        if self.durability is not Durability.AT_LEAST_ONCE:
            super()._cancelled(call, left)

    def stats(self) -> dict:
        return {**super().stats(), "endpoint": self.endpoint, "protocol": self.o.protocol, "exports": self.exports,
                "export_failures": self.export_failures, "paused_s": round(self.paused_s, 3),
                "consecutive_failures": self._backoff.failures,
                "partial_success_watching": self._partial is not None and self._partial.watching,
                "partial_success_parse_failures": self._partial.parse_failures if self._partial is not None else 0}
