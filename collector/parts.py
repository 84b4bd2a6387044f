"""The pipeline's parts, as small typing.Protocols: what collector/pipeline.py calls on each, and nothing
more. The production classes (collector.kernel.KernelSource, collector.records.RecordBuilder,
collector.enrich.Enricher, collector.anomaly.AnomalyDetector, collector.metrics.SelfMetrics, the sinks
of collector/sinks) and the tests' fakes (tests/collector/fakes.py) implement them; the pipeline calls
them directly, never probing with hasattr/getattr. Sinks: collector.sinks.base.Sink.

Costs and threading are each implementation's to state; the pipeline runs KernelSource calls on its one
kernel worker thread and everything else on the event loop.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .sinks.base import Sink

__all__ = ["Detector", "Enricher", "KernelSource", "MetricsSink", "RecordBuilder", "Ring", "Sink"]


@runtime_checkable
class Ring(Protocol):
    """A ring-buffer consumer with acknowledged consumption (hostwall.bpf.ringbuf.RingWalker)."""
    size: int
    record_size: int

    @property
    def consumer_pos(self) -> int: ...

    @property
    def producer_pos(self) -> int: ...

    @property
    def read_pos(self) -> int: ...

    def read(self, max_records: int = ..., *, commit: bool = True) -> Any: ...

    def commit(self, pos: int) -> None: ...

    def available_bytes(self) -> int: ...

    def unread_bytes(self) -> int: ...

    def uncommitted_bytes(self) -> int: ...

    async def wait(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class KernelSource(Protocol):
    """One pinned enforcer instance as the collector sees it (collector.kernel.KernelSource)."""

    def ring(self) -> Ring: ...

    def read_drops(self) -> Any: ...                      # DropDrain of the generation it flipped away from

    def read_drops_of(self, gen: int) -> Any: ...          # DropDrain of a generation, as it is

    def clear_drops(self, drain: Any) -> None: ...

    def agg_gen(self) -> int: ...

    def scan_conntrack(self, now_ns: int, active_timeout_ns: int, close_grace_ns: int = ...) -> Any: ...  # CtScan

    def free_claims(self, scan: Any) -> int: ...          # release a CtFamilyScan's claims once durable

    def detached_ns(self) -> int: ...                     # hw_config.detached_ns (docs/collector.md "Detach")

    def adopt_claims(self, scan: Any) -> None: ...        # claims of a journaled batch (collector/ct_journal.py)

    def set_last_scan(self, now_ns: int | None) -> None: ...

    @property
    def last_scan_ns(self) -> int | None: ...

    def kernel_loss(self) -> dict[str, dict[str, int]]: ...

    def identity(self) -> dict: ...

    def now_ns(self) -> int: ...

    def monotonic_to_wall(self) -> int: ...

    def set_event_budget(self, events_per_s: int, source_share: int | None = None) -> None: ...

    def set_drop_prefixes(self, v4: int, v6: int) -> None: ...

    def port_syns(self) -> Any: ...                       # cumulative ingress SYNs per destination port (65536)

    def syn_proxy(self, now_ns: int) -> Any: ...          # hostwall.bpf.syn_proxy.ProxyState at now_ns

    def close(self) -> None: ...


@runtime_checkable
class RecordBuilder(Protocol):
    """Kernel facts → canonical records (collector.records.RecordBuilder)."""

    def on_events(self, batch: np.ndarray, clock: Any) -> list[dict]: ...

    def on_drop_summaries(self, keys: np.ndarray, vals: np.ndarray, t0_wall: float | int, t1_wall: float | int,
                          clock: Any, sources: np.ndarray | None = None) -> list[dict]: ...

    def on_drop_overflow(self, counts: dict, t0_wall: float | int, t1_wall: float | int, clock: Any) -> list[dict]: ...

    def on_conntrack(self, expired_keys: np.ndarray, expired_entries: np.ndarray, updates: Any,
                     clock: Any, closed: Any = None) -> list[dict]: ...

    def on_audit(self, rec: dict) -> dict: ...

    def on_dns(self, rec: dict) -> dict: ...

    def tick(self, now: int | None = None) -> list[dict]: ...

    def stats(self) -> dict: ...


@runtime_checkable
class Enricher(Protocol):
    """Adds host, interface, container and pod to records in place (collector.enrich.Enricher). It may
    also offer enrich_batch(records) -> errors (the pipeline uses it when present)."""

    def enrich(self, record: dict) -> None: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


@runtime_checkable
class Detector(Protocol):
    """Anomaly windows over the records (collector.anomaly.AnomalyDetector)."""

    @property
    def bucket_s(self) -> float: ...                    # evaluation step: the pipeline ticks at least this often

    def observe(self, records: list[dict]) -> None: ...

    def tick(self, now: float | None = None) -> list[dict]: ...

    def stats(self) -> dict: ...

    def open_anomalies(self) -> list[dict]: ...


@runtime_checkable
class MetricsSink(Protocol):
    """Self-metrics fed from every status snapshot (collector.metrics.SelfMetrics)."""

    def start(self) -> None: ...

    def update(self, status: dict) -> None: ...

    def observe_records(self, records: list[dict]) -> None: ...    # record-derived dashboard series

    def close(self) -> None: ...
