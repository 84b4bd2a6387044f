"""Sinks: where records go. Each sink encodes the canonical (ECS-shaped) dicts itself and states
its full-queue policy (collector.sinks.base). `build_sink(spec, config)` makes one from a SinkSpec.
"""
from __future__ import annotations

import importlib

from .base import FullQueuePolicy, Sink, SinkUnavailable

__all__ = ["FullQueuePolicy", "Sink", "SinkUnavailable", "build_sink"]

# scheme -> (module, class). kafka and otlp are parsed and validated by config already; their
# modules arrive in a later build, and until then starting with them fails with a clear message.
_IMPL = {"jsonl": ("collector.sinks.jsonl", "JsonlSink"), "console": ("collector.sinks.console", "ConsoleSink"),
         "kafka": ("collector.sinks.kafka", "KafkaSink"), "otlp": ("collector.sinks.otlp", "OtlpSink")}


def build_sink(spec, config) -> Sink:
    """The sink for `spec` (config.SinkSpec); SinkUnavailable if this build has no implementation."""
    modname, cls = _IMPL[spec.scheme]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name != modname:
            raise
        raise SinkUnavailable(f"sink {spec.url}: {spec.scheme} sinks are not available in this build yet; "
                              "use jsonl:PATH for now") from None
    return getattr(mod, cls).from_spec(spec, config)
