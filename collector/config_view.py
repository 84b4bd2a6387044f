"""`hostwall-collector check-config`: the resolved configuration under the file's own key names
(docs/collector.md "Configuration"), a valid config file as printed: durations as exact seconds
("0.25s", "1080000s", "0.00005s": the float's shortest round-trip digits, never an exponent, which the
parser rejects), sizes as bytes, labels and headers as mappings, the anomaly section by its own keys;
unset (None) values left out; secrets (kafka.sasl_password, otlp.headers values) redacted. Where each
value came from is `origins` (check-config --origins), not part of the file. The status file keeps the
internal names (collector/config.py `describe`)."""
from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

from .config import FIELDS, CollectorConfig, _dur, shown
from .config_values import parse_headers, parse_labels

__all__ = ["as_file", "seconds_text"]

def seconds_text(v: float) -> str:
    """`v` seconds as a duration the parser reads back to the same float: positional digits of its
    shortest repr (Decimal keeps them exact), trailing zeros cut."""
    t = format(Decimal(repr(float(v))), "f")
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    return f"{t}s"


def as_file(cfg: CollectorConfig) -> dict:
    """Every set key of the file format with its resolved value, sinks and anomaly included."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        v: Any = cfg
        for a in f.attr:
            v = getattr(v, a)
        if v is None:
            continue
        v = shown(f.path[-1], v)                # secrets redacted, as in the status file
        if f.parse is _dur:
            v = seconds_text(v)
        elif f.parse in (parse_headers, parse_labels):
            v = dict(v)                         # the file's mapping form
        sec = out
        for k in f.path[:-1]:
            sec = sec.setdefault(k, {})
        sec[f.path[-1]] = v
    out["sinks"] = [{"url": s.url, "encoding": s.encoding} for s in cfg.sinks]
    if cfg.anomaly is not None:
        out["anomaly"] = _anomaly(cfg.anomaly)
    return out


def _anomaly(a: Any) -> dict:
    """AnomalyConfig by its own keys (collector/anomaly_config.py from_dict reads them back); a raw
    mapping (no anomaly module in this build) as it came."""
    if not dataclasses.is_dataclass(a):
        return dict(a)
    return {f.name: (list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(a) for v in [getattr(a, f.name)]}
