"""Self-metrics: one table of metric families, served two ways — a Prometheus scrape endpoint
(prometheus-client) and OTLP metrics pushed every `metrics.interval` (the SDK's OTLP metric exporter).

Source of truth: the pipeline's status snapshot (the same dict as the status file), handed over by
`update()` on every status write (status_interval, 1 s), plus the kernel maps read here on a worker thread
every interval (drops by verdict/reason from hw_stats, DoS drops from hw_dos_stats, DoS buckets = entries
of hw_dos_src, bans from hw_dos_banned and hw_config.manual_bans). Both outputs read the same immutable
snapshot, so a Prometheus scrape and an OTLP push of the same moment agree.

Names (Prometheus; OTLP names are the dotted form with the unit as metadata, which the OTel Collector's
prometheus exporter maps back to these): `hostwall_` prefix, base units (bytes, seconds), counters end in
`_total`. Labels are bounded: sink (configured sinks), stage/reason (fixed sets), queue (events + sinks),
cache (the enricher's caches), type/outcome (kernel event kinds), verdict/reason (bpf/hostwall.h names).

    hostwall_records_produced_total{source}         records made (events, drops, conntrack, anomaly, audit, kernel)
    hostwall_records_delivered_total{sink}
    hostwall_records_lost_total{stage,reason,sink,class}  stage kernel|decode|build|pipeline (sink="") or sink;
                                                    class shed (kernel budget, by design) | lost
    hostwall_records_in_flight{sink}
    hostwall_queue_depth{queue} / hostwall_queue_capacity{queue}   records (sink queues), batches (events)
    hostwall_queue_dropped_total{queue}
    hostwall_ring_backlog_bytes
    hostwall_kernel_events_total{type,outcome}      emitted | budget | ringbuf_full | aggregated (type dns: | write_error)
    hostwall_drop_summary_packets_total{kind}       summarized | overflow
    hostwall_drops_packets_total{verdict,reason}    every dropped / would-drop packet (hw_stats)
    hostwall_dos_drops_packets_total{reason}        DoS limits (hw_dos_stats, all profiles)
    hostwall_dos_buckets                            per-source DoS buckets tracked (hw_dos_src entries)
    hostwall_dos_bans{kind}                         auto (active, hw_dos_banned) | manual (prefixes)
    hostwall_spool_size_bytes{sink} / hostwall_spool_records{sink}
    hostwall_kafka_degraded{sink}                   1 while records go through the spool
    hostwall_sink_health{sink,state}                1 for the current state: ok | degraded | failing
    hostwall_sink_last_success_timestamp_seconds{sink}
    hostwall_spool_capacity_bytes{sink} / hostwall_spool_oldest_record_age_seconds{sink}
    hostwall_delivery_waiting / hostwall_ring_uncommitted_bytes   acknowledgement backlog
    hostwall_kafka_delivery_latency_seconds{sink}   histogram, records weighted, enqueue → broker ack
    hostwall_enrich_cache_lookups_total{cache,result}   hit | miss
    hostwall_enrich_cache_hit_ratio{cache}
    hostwall_metrics_export_failures_total          OTLP metric pushes that failed
    hostwall_alert_push_alerts_total / hostwall_alert_push_failures_total{reason} / hostwall_alert_push_waiting
    hostwall_incidents_open{paging} / hostwall_alert_push_healthy   direct alert push (collector/alert_push.py)
    hostwall_build_info{version}                    1

Cost: update() O(series) dict building (~100 µs) once per status write; kernel reads O(map entries /
8192) syscalls per interval (a full 1 M-entry DoS map ≈ 0.1 s of one core on the worker thread).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .metric_family import Family, _fam
from .resource import resource_attributes

log = logging.getLogger("hostwall.collector.metrics")

__all__ = ["SelfMetrics", "families_from_status", "MetricsUnavailable"]


class MetricsUnavailable(RuntimeError):
    """The metrics endpoint cannot be served (port in use, bad address); one line."""


def _walk_caches(d: Any, prefix: str = "") -> Iterable[tuple[str, dict]]:
    if isinstance(d, dict):
        if "hits" in d and "misses" in d:
            yield prefix or "cache", d
            return
        for k, v in d.items():
            yield from _walk_caches(v, f"{prefix}.{k}" if prefix else str(k))


HEALTH_STATES = ("ok", "degraded", "failing")


def _sink_health_families(st: dict) -> list[Family]:
    """Sink health (collector/sinks/base.py): the state as one 0/1 series per state, when the sink last
    succeeded, its spool's capacity and oldest record; and the end-to-end acknowledgement backlog."""
    health = _fam("hostwall.sink.health", "gauge", "{state}", "1 for the sink's current health state (ok, "
                  "degraded, failing), 0 for the others", ("sink", "state"))
    last = _fam("hostwall.sink.last_success.timestamp", "gauge", "s", "When the sink last delivered a record "
                "(Unix time; absent before the first)", ("sink",))
    cap = _fam("hostwall.spool.capacity", "gauge", "By", "Size limit of the Kafka spool (kafka.spool_size)",
               ("sink",))
    age = _fam("hostwall.spool.oldest_record.age", "gauge", "s", "Age of the oldest record in the Kafka spool "
               "(0 when empty)", ("sink",))
    for sink, s in (st.get("sinks") or {}).items():
        h = s.get("health") or {}
        if h.get("state") in HEALTH_STATES:
            for state in HEALTH_STATES:
                health.add((sink, state), 1 if h["state"] == state else 0)
        if h.get("last_success_at"):
            last.add((sink,), float(h["last_success_at"]))
        if "spool_max_bytes" in h:
            cap.add((sink,), h["spool_max_bytes"])
            age.add((sink,), h.get("spool_oldest_age_s") or 0.0)
    dl = st.get("delivery") or {}
    waiting = _fam("hostwall.delivery.waiting", "gauge", "{batch}", "Batches fanned out and not yet durable in "
                   "every at_least_once sink (their kernel data is held back)")
    unc = _fam("hostwall.ring.uncommitted", "gauge", "By", "Ring-buffer bytes read but not released: their "
               "records are not durable yet")
    if dl:
        waiting.add((), dl.get("waiting", 0))
    if st.get("ring"):
        unc.add((), st["ring"].get("uncommitted_bytes", 0))
    return [health, last, cap, age, waiting, unc]


SHED = {("kernel", "budget")}      # by design: sampled events over the event budget (the drops stay exact)


def loss_class(stage: str, reason: str) -> str:
    """`shed` for what the kernel's event budget held back on purpose during a flood (counted, not paged:
    docs/runbooks/HostwallRecordsLost.md), `lost` for real losses (sinks, queues, crashes, ring full)."""
    return "shed" if (stage, reason) in SHED else "lost"


def _alerting_families(st: dict) -> list[Family]:
    """Direct alert push (collector/alert_push.py): alerts posted, failures by reason, what waits."""
    a = (st.get("anomaly") or {}).get("alerting")
    posted = _fam("hostwall.alert_push.alerts", "counter", "{alert}", "Alert states posted to Alertmanager and "
                  "accepted (opens, refreshes, resolves)")
    fail = _fam("hostwall.alert_push.failures", "counter", "{failure}", "Alert posts that failed, by reason "
                "(timeout, connect, http_<status>, error, queue_full, expired)", ("reason",))
    wait = _fam("hostwall.alert_push.waiting", "gauge", "{alert}", "Alert states waiting to be posted")
    inc = _fam("hostwall.incidents.open", "gauge", "{incident}", "Open incidents (correlated anomalies of one "
               "attack), by whether they page", ("paging",))
    ok = _fam("hostwall.alert_push.healthy", "gauge", "{state}", "1 while the collector's alert push gets through "
              "(its last post succeeded), 0 while it fails; absent when it is off")
    if a:
        ok.add((), 1 if a.get("state") == "ok" else 0)
        posted.add((), a.get("alerts_posted", 0))
        for reason, n in sorted((a.get("failures") or {}).items()):
            fail.add((reason,), n)
        wait.add((), a.get("waiting", 0))
        inc.add(("true",), a.get("incidents_paging", 0))
        inc.add(("false",), a.get("incidents_open", 0) - a.get("incidents_paging", 0))
    return [posted, fail, wait, inc, ok]


def families_from_status(st: dict, kernel: dict | None = None, *, version: str = "", export_failures: int = 0
                         ) -> list[Family]:
    """The metric families of one status snapshot (+ kernel map readings). Pure; O(series)."""
    led = st.get("ledger") or {}
    fams: list[Family] = []

    f = _fam("hostwall.records.produced", "counter", "{record}", "Records made, by source", ("source",))
    for src, n in (led.get("produced_by_source") or {}).items():
        f.add((src,), n)
    fams.append(f)
    deliv = _fam("hostwall.records.delivered", "counter", "{record}", "Records a sink confirmed", ("sink",))
    lost = _fam("hostwall.records.lost", "counter", "{record}", "Records counted lost, by stage and reason; class "
                "shed = sampled events the kernel's event budget held back by design, lost = everything else",
                ("stage", "reason", "sink", "class"))
    for stage, reasons in (led.get("lost_by_stage") or {}).items():
        for reason, n in reasons.items():
            lost.add((stage, reason, "", loss_class(stage, reason)), n)
    infl = _fam("hostwall.records.in_flight", "gauge", "{record}", "Records neither delivered nor lost yet",
                ("sink",))
    for sink, b in (led.get("sinks") or {}).items():
        deliv.add((sink,), b.get("delivered", 0))
        for reason, n in (b.get("lost_in_sink") or {}).items():
            lost.add(("sink", reason, sink, "lost"), n)
        infl.add((sink,), b.get("in_flight", 0))
    fams += [deliv, lost, infl]

    q = st.get("queues") or {}
    depth = _fam("hostwall.queue.depth", "gauge", "{item}", "Queue depth (sink queues: records; events: batches)",
                 ("queue",))
    cap = _fam("hostwall.queue.capacity", "gauge", "{item}", "Queue capacity (same unit as the depth)", ("queue",))
    dropped = _fam("hostwall.queue.dropped", "counter", "{record}", "Records a full queue shed (drop policies)",
                   ("queue",))
    ev = q.get("events") or {}
    if ev:
        depth.add(("events",), ev.get("depth", 0))
        cap.add(("events",), ev.get("capacity_batches", 0))
    for sink, sq in (q.get("sinks") or {}).items():
        depth.add((sink,), sq.get("depth", 0))
        cap.add((sink,), sq.get("capacity", 0))
        dropped.add((sink,), sq.get("dropped", 0))
    fams += [depth, cap, dropped]

    ring = st.get("ring") or {}
    f = _fam("hostwall.ring.backlog", "gauge", "By", "Unread bytes in the kernel ring buffer")
    if ring:
        f.add((), ring.get("backlog_bytes", 0))
    fams.append(f)

    f = _fam("hostwall.kernel.events", "counter", "{event}", "Kernel event outcomes (emitted, over "
             "budget, ring buffer full, aggregated into flow summaries)", ("type", "outcome"))
    for typ, outs in (led.get("kernel_events") or {}).items():
        for outcome, n in outs.items():
            f.add((typ, outcome), n)
    fams.append(f)
    f = _fam("hostwall.drop_summary.packets", "counter", "{packet}", "Dropped packets reported in drop summaries",
             ("kind",))
    for kind, n in (led.get("drop_packets") or {}).items():
        f.add((kind,), n)
    fams.append(f)

    spool_b = _fam("hostwall.spool.size", "gauge", "By", "Bytes in the Kafka spool", ("sink",))
    spool_r = _fam("hostwall.spool.records", "gauge", "{record}", "Records in the Kafka spool not yet acknowledged",
                   ("sink",))
    degraded = _fam("hostwall.kafka.degraded", "gauge", "{state}", "1 while a Kafka sink delivers through its spool",
                    ("sink",))
    lat = _fam("hostwall.kafka.delivery.latency", "histogram", "s",
               "Enqueue to broker acknowledgement, per record", ("sink",))
    for sink, s in (st.get("sinks") or {}).items():
        if "spool" in s:
            spool_b.add((sink,), s["spool"].get("size_bytes", 0))
            spool_r.add((sink,), s["spool"].get("pending", 0))
            degraded.add((sink,), 1 if s.get("state") == "degraded" else 0)
        if "latency" in s:
            L = s["latency"]
            lat.add((sink,), {"bounds": L["buckets_s"], "counts": L["counts"], "sum": L["sum_s"],
                              "count": L["count"]})
    fams += [spool_b, spool_r, degraded, lat]
    fams += _sink_health_families(st)
    fams += _alerting_families(st)

    look = _fam("hostwall.enrich.cache.lookups", "counter", "{lookup}", "Enrichment cache lookups",
                ("cache", "result"))
    ratio = _fam("hostwall.enrich.cache.hit_ratio", "gauge", "1", "Enrichment cache hits / lookups", ("cache",))
    for name, c in _walk_caches(st.get("enricher") or {}):
        h, m = int(c.get("hits", 0)), int(c.get("misses", 0))
        look.add((name, "hit"), h)
        look.add((name, "miss"), m)
        ratio.add((name,), h / (h + m) if h + m else 0.0)
    fams += [look, ratio]

    k = kernel or {}
    f = _fam("hostwall.drops.packets", "counter", "{packet}", "Dropped and would-drop packets, by verdict and "
             "reason (kernel counters)", ("verdict", "reason"))
    for (verdict, reason), n in sorted((k.get("drops") or {}).items()):
        f.add((verdict, reason), n)
    fams.append(f)
    f = _fam("hostwall.dos.drops.packets", "counter", "{packet}", "Packets dropped by DoS limits, by reason",
             ("reason",))
    for reason, n in sorted((k.get("dos_drops") or {}).items()):
        f.add((reason,), n)
    fams.append(f)
    f = _fam("hostwall.dos.buckets", "gauge", "{bucket}", "Per-source DoS token buckets tracked")
    if "dos_buckets" in k:
        f.add((), k["dos_buckets"])
    fams.append(f)
    f = _fam("hostwall.dos.bans", "gauge", "{ban}", "Active bans: automatic (DoS) and manual prefixes", ("kind",))
    for kind in ("auto", "manual"):
        if f"bans_{kind}" in k:
            f.add((kind,), k[f"bans_{kind}"])
    fams.append(f)

    f = _fam("hostwall.metrics.export_failures", "counter", "{export}", "OTLP metric exports that failed")
    f.add((), export_failures)
    fams.append(f)
    f = _fam("hostwall.build_info", "gauge", "{build}", "Collector build", ("version",))
    f.add((version or "unknown",), 1)
    fams.append(f)
    return fams


# ---- kernel maps ---------------------------------------------------------------------------------

class _KernelGauges:
    """Own read-only fds on the pinned maps (not the pipeline's KernelSource: it is single-threaded)."""

    MAPS = ("hw_stats", "hw_dos_stats", "hw_dos_src", "hw_dos_banned", "hw_config")

    def __init__(self, pin_dir: str):
        from hostwall.bpf import bpfsys
        self.fds: dict[str, int] = {}
        self.missing: list[str] = []
        for n in self.MAPS:
            p = Path(pin_dir) / "maps" / n
            try:
                self.fds[n] = bpfsys.obj_get(str(p))
            except OSError:
                self.missing.append(n)
        self.ncpus = bpfsys.possible_cpus() if self.fds else 0

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def read(self) -> dict:
        from hostwall.bpf import bpfsys
        from hostwall.bpf import layout as L
        from hostwall.collector.kernel import COUNTER_DT, percpu_stride, sum_percpu
        out: dict[str, Any] = {}
        if "hw_stats" in self.fds:
            n = L.HOOKS * L.VERDICTS * L.REASONS
            raw = bpfsys.array_slots(self.fds["hw_stats"], 0, n, percpu_stride(COUNTER_DT.itemsize) * self.ncpus)
            c = sum_percpu(raw, n, COUNTER_DT, self.ncpus)["packets"].reshape(L.HOOKS, L.VERDICTS, L.REASONS).sum(0)
            drops = {}
            for v, vname in L.VERDICT_NAMES.items():
                if vname == "allow":
                    continue
                for r, rname in L.REASON_NAMES.items():
                    if r < L.REASONS and c[v, r]:
                        drops[(vname, rname)] = int(c[v, r])
            out["drops"] = drops
        if "hw_dos_stats" in self.fds:
            n = L.C["HW_DOS_PROFILES_MAX"] * L.REASONS
            raw = bpfsys.array_slots(self.fds["hw_dos_stats"], 0, n, percpu_stride(COUNTER_DT.itemsize) * self.ncpus)
            c = sum_percpu(raw, n, COUNTER_DT, self.ncpus)["packets"].reshape(-1, L.REASONS).sum(0)
            out["dos_drops"] = {L.REASON_NAMES[r]: int(c[r]) for r in range(L.REASONS)
                                if c[r] and r in L.REASON_NAMES}
        if "hw_dos_src" in self.fds:
            from hostwall.bpf import dos_sources
            with dos_sources.table(self.fds["hw_dos_src"]) as t:        # read in place (mmap)
                out["dos_buckets"] = len(t.live())
        if "hw_dos_banned" in self.fds:
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            out["bans_auto"] = _count(self.fds["hw_dos_banned"], L.DTYPES["hw_dos_key"].itemsize,
                                      L.DTYPES["hw_dos_ban"].itemsize, until_after=now)
        if "hw_config" in self.fds:
            import numpy as np
            raw = bpfsys.map_lookup(self.fds["hw_config"], b"\0\0\0\0", L.DTYPES["hw_config"].itemsize)
            if raw:
                out["bans_manual"] = int(np.frombuffer(raw, L.DTYPES["hw_config"])[0]["manual_bans"])
        return out


def _count(fd: int, key_size: int, value_size: int, *, until_after: int | None = None, chunk: int = 8192) -> int:
    """Entries of a hash map (one batched walk, memory O(chunk)); with until_after, only entries whose
    second u64 (hw_dos_ban.until_ns, after since_ns) is later."""
    import numpy as np

    from hostwall.bpf import bpfsys
    if until_after is None:
        return bpfsys.count_entries(fd, key_size, value_size, chunk=chunk)
    total = 0
    for _, vb, n in bpfsys.iter_batches(fd, key_size, value_size, chunk=chunk):
        vals = np.frombuffer(vb.raw[: n * value_size], dtype=np.uint64).reshape(n, value_size // 8)
        total += int((vals[:, 1] > until_after).sum())
    return total


# ---- the registry and its two outputs ------------------------------------------------------------

class SelfMetrics:
    """Holds the latest families; serves Prometheus and pushes OTLP. start()/close() from the loop thread;
    update() from the loop; scrapes and pushes read a snapshot on their own threads."""

    def __init__(self, options, *, otlp_options=None, resource: dict | None = None, pin_dir: str | None = None,
                 kernel: bool = True):
        from hostwall.collector.enrich.host import collector_version
        self.o = options
        self.otlp_o = otlp_options
        self.resource_attrs = dict(resource or {})
        self.pin_dir = pin_dir
        self.version = collector_version()
        self._status: dict = {}
        self._kernel: dict = {}
        self._kgauges: _KernelGauges | None = None
        self._want_kernel = kernel and pin_dir is not None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._exporter = None
        self._start_ns = time.time_ns()
        self.export_failures = 0
        self.exports = 0
        self.kernel_errors = 0
        self.prometheus_address: tuple[str, int] | None = None
        # per rule / port / interface / map-pressure series for the dashboards (collector/kernel_metrics.py)
        from hostwall.collector.kernel_metrics import KernelCollector
        self.kernel_metrics = (KernelCollector(pin_dir, refresh_s=min(5.0, float(getattr(options, "interval_s", 5.0))))
                               if self._want_kernel else None)

    @classmethod
    def from_config(cls, config) -> SelfMetrics | None:
        m = config.metrics
        if not m.prometheus and not m.otlp:
            return None
        return cls(m, otlp_options=config.otlp, resource=resource_attributes(config), pin_dir=config.pin_dir)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the scrape endpoint, create the OTLP exporter, start the worker thread. Raises
        MetricsUnavailable (one line) if the address cannot be bound."""
        if self._want_kernel:
            self._kgauges = _KernelGauges(self.pin_dir)
            if self._kgauges.missing:
                log.info("metrics: kernel maps not found: %s", ", ".join(self._kgauges.missing))
            self._read_kernel()
        if self.o.prometheus:
            self._start_prometheus(self.o.prometheus)
        if self.o.otlp:
            from hostwall.collector.config import OtlpOptions
            from hostwall.collector.sinks.base import SinkUnavailable
            from hostwall.collector.sinks.otlp import make_log_exporter
            try:
                self._exporter = make_log_exporter(self.o.otlp, self.otlp_o or OtlpOptions(), signal="metrics")
            except SinkUnavailable as e:
                raise MetricsUnavailable(f"metrics.otlp: {e}") from None
        t = threading.Thread(target=self._worker, name="hw-metrics", daemon=True)
        t.start()
        self._threads.append(t)

    def _start_prometheus(self, listen: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_PromCollector(self))
        try:
            server, thread = start_http_server(int(port), addr=host, registry=registry)
        except OSError as e:
            raise MetricsUnavailable(f"metrics.prometheus: cannot listen on {listen}: {e.strerror or e}") from None
        self._server = server
        self.prometheus_address = server.server_address[:2]
        self._threads.append(thread)

    def observe_records(self, records: list[dict]) -> None:
        """Record-derived dashboard series (top sources, anomalies): collector/kernel_metrics.py."""
        if self.kernel_metrics is not None:
            self.kernel_metrics.observe(records)

    def update(self, status: dict) -> None:
        """Take the pipeline's latest status snapshot (called on every status write)."""
        with self._lock:
            self._status = status

    def families(self) -> list[Family]:
        with self._lock:
            st, k = self._status, self._kernel
        fams = families_from_status(st, k, version=self.version, export_failures=self.export_failures)
        return fams + self.kernel_metrics.families() if self.kernel_metrics is not None else fams

    def _read_kernel(self) -> None:
        if self._kgauges is None or not self._kgauges.fds:
            return
        try:
            k = self._kgauges.read()
        except OSError as e:
            self.kernel_errors += 1
            if self.kernel_errors in (1, 10, 100):
                log.warning("metrics: reading kernel maps failed: %s", e)
            return
        with self._lock:
            self._kernel = k

    def _worker(self) -> None:
        while not self._stop.wait(self.o.interval_s):
            self._read_kernel()
            if self._exporter is not None:
                self.push()

    def push(self, timeout_ms: float = 10_000) -> bool:
        """Export the current families over OTLP once (worker thread, and at close)."""
        from opentelemetry.sdk.metrics.export import MetricExportResult
        try:
            res = self._exporter.export(self._metrics_data(), timeout_millis=timeout_ms)
        except Exception as e:                      # noqa: BLE001 — counted; metrics must not kill the service
            log.debug("metrics export: %r", e)
            res = None
        self.exports += 1
        if res != MetricExportResult.SUCCESS:
            self.export_failures += 1
            if self.export_failures in (1, 10, 100) or self.export_failures % 1000 == 0:
                log.warning("metrics: OTLP export to %s failed (%d so far)", self.o.otlp, self.export_failures)
            return False
        return True

    def close(self) -> None:
        """A last OTLP push (so the final counters arrive), stop the endpoint and the worker."""
        self._stop.set()
        if self._exporter is not None:
            self._read_kernel()
            self.push(timeout_ms=3000)
            try:
                self._exporter.shutdown()
            except Exception:                       # noqa: BLE001
                pass
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._kgauges is not None:
            self._kgauges.close()
        for t in self._threads:
            t.join(timeout=2)

    def stats(self) -> dict:
        return {"prometheus": f"{self.prometheus_address[0]}:{self.prometheus_address[1]}"
                if self.prometheus_address else None, "otlp": self.o.otlp, "exports": self.exports,
                "export_failures": self.export_failures, "kernel_errors": self.kernel_errors,
                "kernel_maps_missing": list(self._kgauges.missing) if self._kgauges else []}

    # ---- OTLP form ---------------------------------------------------------------------------------
    def _metrics_data(self):
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Gauge,
            Histogram,
            HistogramDataPoint,
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
            Sum,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        now = time.time_ns()
        metrics = []
        for f in self.families():
            if not f.samples:
                continue
            if f.kind == "histogram":
                pts = []
                for lv, h in f.samples:
                    pts.append(HistogramDataPoint(attributes=dict(zip(f.labels, lv)),
                                                  start_time_unix_nano=self._start_ns, time_unix_nano=now,
                                                  count=int(h["count"]), sum=float(h["sum"]),
                                                  bucket_counts=[int(c) for c in h["counts"]],
                                                  explicit_bounds=[float(b) for b in h["bounds"]],
                                                  min=float("nan"), max=float("nan")))
                data = Histogram(data_points=pts, aggregation_temporality=AggregationTemporality.CUMULATIVE)
            else:
                pts = [NumberDataPoint(attributes=dict(zip(f.labels, lv)), start_time_unix_nano=self._start_ns,
                                       time_unix_nano=now, value=v) for lv, v in f.samples]
                data = Sum(data_points=pts, aggregation_temporality=AggregationTemporality.CUMULATIVE,
                           is_monotonic=True) if f.kind == "counter" else Gauge(data_points=pts)
            metrics.append(Metric(name=f.otel, description=f.help, unit=f.unit, data=data))
        scope = ScopeMetrics(scope=InstrumentationScope("hostwall.collector", self.version), metrics=metrics,
                             schema_url="")
        return MetricsData(resource_metrics=[ResourceMetrics(resource=Resource.create(self.resource_attrs),
                                                             scope_metrics=[scope], schema_url="")])


class _PromCollector:
    """prometheus_client custom collector over SelfMetrics.families()."""

    def __init__(self, owner: SelfMetrics):
        self.owner = owner

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        for f in self.owner.families():
            if f.kind == "counter":
                m = CounterMetricFamily(f.prom, f.help, labels=f.labels)
                for lv, v in f.samples:
                    m.add_metric(lv, v)
            elif f.kind == "gauge":
                m = GaugeMetricFamily(f.prom, f.help, labels=f.labels)
                for lv, v in f.samples:
                    m.add_metric(lv, v)
            else:
                m = HistogramMetricFamily(f.prom, f.help, labels=f.labels)
                for lv, h in f.samples:
                    acc, buckets = 0, []
                    for b, c in zip(list(h["bounds"]) + [float("inf")], h["counts"]):
                        acc += c
                        buckets.append(("+Inf" if b == float("inf") else repr(float(b)), acc))
                    m.add_metric(lv, buckets, h["sum"])
            yield m
