"""Sinks: where records go. Each sink encodes the canonical (ECS-shaped) dicts itself and states
its full-queue policy (collector.sinks.base). `build_sink(spec, config)` makes one from a SinkSpec.
"""
from __future__ import annotations

import importlib

from .base import FullQueuePolicy, Sink, SinkUnavailable

__all__ = ["FullQueuePolicy", "Sink", "SinkUnavailable", "build_sink"]

# scheme -> (module, class).
_IMPL = {"jsonl": ("hostwall.collector.sinks.jsonl", "JsonlSink"), "console": ("hostwall.collector.sinks.console", "ConsoleSink"),
         "kafka": ("hostwall.collector.sinks.kafka", "KafkaSink"), "otlp": ("hostwall.collector.sinks.otlp", "OtlpSink")}


def build_sink(spec, config) -> Sink:
    """The sink for `spec` (config.SinkSpec); SinkUnavailable (one line) if a package it needs is missing."""
    modname, cls = _IMPL[spec.scheme]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise SinkUnavailable(f"sink {spec.url}: {spec.scheme} sinks are not in this build") from None
        raise SinkUnavailable(f"sink {spec.url}: needs the Python package {e.name!r}, which is not installed "
                              f"(pip install the hostwall requirements)") from None
    return getattr(mod, cls).from_spec(spec, config)
