"""The production wiring of the collector: real parts for a configuration (collector/parts.py says what
each part must offer). Kept apart from the pipeline so that tests wire fakes the same way."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hostwall.bpf.retired import state_copy

from .accounting import Ledger
from .config import CollectorConfig
from .pipeline import Pipeline

__all__ = ["build_pipeline"]


def build_pipeline(cfg: CollectorConfig, retired: Path | None = None) -> Pipeline:
    """Real components for `cfg`: KernelSource on the pin dir, RecordBuilder, Enricher, the anomaly
    detector, and the configured sinks. Raises KernelSourceError / SinkUnavailable with a one-line
    message. Sinks are built (not started) before the kernel is touched. `retired`: a retired instance of
    the pin dir instead (bpf/retired.py; collector/retired_drain.py), its rule names from the enforcer's
    state at its detach, no metrics endpoint (the live run that follows has it)."""
    from .anomaly import AnomalyConfig, AnomalyDetector
    from .enrich import Enricher
    from .enrich.host import HostInfo, InstanceStateView
    from .kernel import KernelSource
    from .metrics import SelfMetrics
    from .records import RecordBuilder
    from .sinks import build_sink

    sinks = [build_sink(spec, cfg) for spec in cfg.sinks]     # unavailable sinks fail before the kernel is touched
    source = KernelSource(retired or cfg.pin_dir)
    host = HostInfo.detect(cfg.pin_dir)
    if cfg.hostname:
        host = replace(host, hostname=cfg.hostname)
    instance = InstanceStateView(cfg.pin_dir, state_file=state_copy(cfg.pin_dir, int(retired.name)) if retired else None)
    ledger = Ledger([s.name for s in sinks])
    builder = RecordBuilder(host, instance, ledger)
    enricher = Enricher(host, instance)
    anomaly = AnomalyDetector(cfg.anomaly if isinstance(cfg.anomaly, AnomalyConfig) else None, host,
                              state_path=cfg.side_path("baselines.json"))
    if cfg.alerting.alertmanager:                               # direct alert push (docs/alerting.md)
        from .alerting import AlertingDetector
        anomaly = AlertingDetector.from_config(cfg, anomaly, host.hostname, cfg.side_path("alerts.json"))
    return Pipeline(cfg, source, builder, sinks, enricher=enricher, anomaly=anomaly, ledger=ledger,
                    audit_log=instance.audit_log, metrics=None if retired else SelfMetrics.from_config(cfg), hostname=host.hostname,
                    dns_log=instance.dns_log)
