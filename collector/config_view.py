"""`hostwall-collector check-config`: the resolved configuration under the file's own key names
(docs/collector.md "Configuration"), so it reads like the file an operator writes and can be fed back
as one. Durations are written as seconds ("0.25s"), sizes as bytes, labels and headers as mappings;
secrets are redacted. The status
file keeps the internal names (collector/config.py `describe`)."""
from __future__ import annotations

from typing import Any

from .config import FIELDS, SECRET_KEYS, CollectorConfig, _dur
from .config_values import parse_headers, parse_labels

__all__ = ["as_file"]


def as_file(cfg: CollectorConfig) -> dict:
    """Every key of the file format with its resolved value, plus sinks and origins (where each value
    came from: argument, environment, file; keyed by file key)."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        v: Any = cfg
        for a in f.attr:
            v = getattr(v, a)
        if f.parse is _dur and v is not None:
            v = f"{v:g}s"
        elif f.parse in (parse_labels, parse_headers):
            v = dict(v)                         # the file's mapping form
        elif f.path[-1] in SECRET_KEYS and v:
            v = "<redacted>"
        sec = out
        for k in f.path[:-1]:
            sec = sec.setdefault(k, {})
        sec[f.path[-1]] = v
    out["sinks"] = [{"url": s.url, "encoding": s.encoding} for s in cfg.sinks]
    out["origins"] = dict(cfg.origins)
    return out
