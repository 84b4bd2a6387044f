"""Canonical record → bytes for a sink.

  ecs   the canonical ECS-shaped record itself (schemas/flow.schema.json, anomaly, audit), as JSON
  ocsf  OCSF 1.7.0: Network Activity 4001 (flow, log, deny, drop_summary), Detection Finding 2004
        (anomaly), Device Config State Change 5019 (audit) — collector/encoders/ocsf.py
  otel  the OTel log-record dict of collector/encoders/otel.py, as JSON (the OTLP sink maps the dict
        onto the SDK itself; this form is for files and debugging)

Encoding is pure and never mutates the record. A record an encoder cannot map raises EncodeError,
which sinks count as an encoder loss (never a silent drop). Cost: orjson is ~1 µs per record; the
OCSF/OTel mappings add a few µs of dict building.
"""
from __future__ import annotations

import orjson

from .ocsf import EncodeError, to_ocsf
from .otel import to_otel

__all__ = ["encode", "line_encoder", "EncodeError", "FORMATS", "to_ocsf", "to_otel"]

FORMATS = ("ecs", "ocsf", "otel")


def encode(record: dict, fmt: str = "ecs") -> bytes:
    """JSON bytes of `record` in format `fmt` (one of FORMATS), without a trailing newline."""
    try:
        if fmt == "ecs":
            return orjson.dumps(record)
        if fmt == "ocsf":
            return orjson.dumps(to_ocsf(record))
        if fmt == "otel":
            return orjson.dumps(to_otel(record))
    except orjson.JSONEncodeError as e:
        raise EncodeError(f"{fmt}: record is not JSON-serialisable: {e}") from None
    raise ValueError(f"unknown encoding {fmt!r}: use one of {', '.join(FORMATS)}")


def line_encoder(fmt: str):
    """record -> encode(record, fmt) + b"\n", for files of one record per line. ecs: orjson.dumps without
    encode()'s dispatch; it raises orjson.JSONEncodeError where encode raises EncodeError, so callers
    catch Exception and ask encode() for the error. Not OPT_APPEND_NEWLINE: orjson's own buffer is
    over-allocated and a sink holds a chunk of lines (+9 MiB peak RSS in `bench collector`); the
    concatenation makes an exact-size line."""
    if fmt == "ecs":
        dumps = orjson.dumps
        return lambda record: dumps(record) + b"\n"
    if fmt not in FORMATS:
        raise ValueError(f"unknown encoding {fmt!r}: use one of {', '.join(FORMATS)}")
    return lambda record: encode(record, fmt) + b"\n"
