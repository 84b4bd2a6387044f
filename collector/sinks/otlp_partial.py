"""OTLP partial success: how many log records the receiver said it rejected in a response the SDK
exporters discard (docs/collector.md "Delivery and loss").

The SDK exporters (1.45) drop the response, so PartialSuccess wraps the calls that return it: the gRPC
stub's Export (through the stub factory, which a reconnect calls again) and the HTTP client's _submit.
These are SDK internals, so the install is guarded: if it fails, nothing is replaced, `watching` is
False (in the sink's stats), a warning is logged once, and an accepted request counts delivered whole,
as without partial-success support. A response that cannot be parsed counts in `parse_failures` (and
nothing rejected). Cost: one protobuf parse per export. Use from one thread at a time (the sink's
exports are).
"""
from __future__ import annotations

import logging

log = logging.getLogger("hostwall.collector.otlp")

__all__ = ["PartialSuccess"]


class _Reading:
    """A callable standing in for the gRPC stub's Export: a call is passed to `on_response`; every other
    attribute (with_call, future, ...) is the original's."""

    def __init__(self, call, on_response) -> None:
        self._call = call
        self._on_response = on_response

    def __call__(self, *a, **kw):
        out = self._call(*a, **kw)
        try:
            self._on_response(out)
        except Exception:                           # noqa: BLE001 — reading must never fail the export
            pass                                    # (the readers count what they cannot parse)
        return out

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class PartialSuccess:
    """What the receiver said it rejected in the last response (`rejected`, `message`); `watching`: the
    responses are read at all; `parse_failures`: responses that could not be read (counted delivered)."""

    def __init__(self, exporter) -> None:
        self.rejected = 0
        self.message = ""
        self.watching = False
        self.parse_failures = 0
        why = "the exporter has no known response hook"
        try:
            self.watching = self._install(exporter)
        except Exception as e:                      # noqa: BLE001 — SDK internals moved: export as before
            why = f"{type(e).__name__}: {e}"
        if not self.watching:
            log.warning("OTLP partial success not watched (%s): log records a receiver rejects count delivered",
                        why)

    def _install(self, exporter) -> bool:
        """Wrap the call that returns the response; nothing is replaced unless every step worked."""
        client = getattr(exporter, "_client", None)
        stub = getattr(exporter, "_stub", None)
        if client is not None and hasattr(client, "Export") and callable(stub):          # gRPC
            def make(channel):
                c = stub(channel)
                c.Export = _Reading(c.Export, self._on_grpc)
                return c
            new_client = make(exporter._channel)
            exporter._stub, exporter._client = make, new_client
            return True
        if client is not None and callable(getattr(client, "_submit", None)):           # HTTP
            from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
            submit = client._submit

            def on_http(result) -> None:
                code = getattr(result, "status_code", None)
                if code is not None and 200 <= code < 300:
                    self._read(lambda: ExportLogsServiceResponse.FromString(result.content()))
                elif code is None:
                    self._read(lambda: None)        # not a response this hook knows: counted unreadable
            client._submit = _Reading(submit, on_http)
            return True
        return False

    def _on_grpc(self, resp) -> None:
        self._read(lambda: resp)

    def _read(self, response) -> None:
        try:
            resp = response()
            if resp.HasField("partial_success"):
                self.rejected = int(resp.partial_success.rejected_log_records)
                self.message = resp.partial_success.error_message
        except Exception as e:                      # noqa: BLE001 — unreadable: counted, nothing rejected
            self.parse_failures += 1
            if self.parse_failures == 1:
                log.warning("cannot read an OTLP export response (%s: %s); its log records count delivered",
                            type(e).__name__, e)

    def take(self) -> tuple[int, str]:
        out, self.rejected, self.message = (self.rejected, self.message), 0, ""
        return out
