"""Metrics the dashboards need beyond collector/metrics.py: the enforcer's own counters per rule, port,
hook and DoS profile, map pressure, interface attachment, and what the collector's records say (drops
per interface, top source prefixes, anomalies). docs/metrics.md lists every metric.

Two sources, one table of `collector.metric_family.Family` objects (so they can ride both outputs of
SelfMetrics, the Prometheus endpoint and the OTLP push, exactly like its own families):

    KernelCollector   reads the pinned maps through enforcer.datapath.Datapath.open(pin_dir) and the
                      instance state ($HOSTWALL_STATE_DIR), at most every `refresh_s` (default 5 s:
                      scrapes in between get the cached families), and counts the hash maps' entries
                      at most every `pressure_refresh_s` (default 30 s).
    RecordMetrics     fed by the pipeline with every batch of records (`observe(records)`): drop
                      summaries (exact: summaries + overflow = the kernel's drop counters), flow starts,
                      anomaly open / update / close.

Wiring (collector/metrics.py and pipeline.py own it; both outputs then carry these families):
    SelfMetrics.__init__:  self.kernel_metrics = KernelCollector(pin_dir, refresh_s=min(5.0, options.interval_s))
                           if self._want_kernel else None
    SelfMetrics.families(): families_from_status(...) + self.kernel_metrics.families()   (when not None)
    Pipeline._fan_out (or _emit right before it, after enrichment and the anomaly extras):
                           self.metrics.kernel_metrics.observe(records)                   (when present)
Standalone: register(registry, pin_dir) adds a KernelCollector to any prometheus_client registry.

Names follow Prometheus conventions: `hostwall_` prefix, base units (bytes, seconds), counters end in
`_total` (the Family name is without it, as prometheus_client wants), units in the OTel form so the OTel
Collector's prometheus exporter maps them back to the same names (never "1" on a gauge: it would add
`_ratio`). Label sets are bounded: hook/verdict/reason/map (bpf/hostwall.h), rule (the active policy),
port (the first `top_ports` destination ports seen + "other"), profile (the policy's DoS profiles),
interface (attached interfaces), source / source_prefix (the current top `top_sources`), anomaly key
(at most `max_anomalies` open anomalies).

Cost per kernel read (one scrape every >= refresh_s): ~40 obj_get + 5 batched array reads (the 64k-slot
port counters are one syscall, ~1.5 MB per CPU), one netlink round trip per attached interface (~10 ms in
another netns, on a short-lived thread: no fork). Key counting is BPF_MAP_LOOKUP_BATCH of 8192 entries per
syscall: a full 1 M-entry DoS map takes ~0.3 s (2 s with one GET_NEXT_KEY per key), hence its own, slower
refresh. observe(): O(records), ~1-1.5 µs per record on the loop thread (a full drop-aggregation interval
of 65536 new source prefixes ~0.1 s).
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from . import attack_metrics
from .metric_family import Family

log = logging.getLogger("hostwall.collector.kernel_metrics")

__all__ = ["KernelCollector", "RecordMetrics", "PortTopN", "TopTalkers", "register", "to_prometheus", "SPEC",
           "PRESSURE_MAPS", "HANDOFF_REASONS"]

DEFAULT_REFRESH_S = 5.0
DEFAULT_PRESSURE_REFRESH_S = 30.0
DEFAULT_TOP_PORTS = 20
DEFAULT_TOP_SOURCES = 10
DEFAULT_MAX_ANOMALIES = 100
DEFAULT_GONE_KEEP_S = 900.0          # > the OTel Collector prometheus exporter's metric_expiration (5-10 min)
BATCH_CHUNK = 8192

# Kernel tables whose fill is reported (Datapath.map_pressure).
PRESSURE_MAPS = ("hw_ct4", "hw_ct6", "hw_frag4", "hw_frag6", "hw_dos_src", "hw_dos_banned", "hw_drops0", "hw_drops1")
# Packets handed from one hook to another: counted where they were judged, so not a verdict of their own.
HANDOFF_REASONS = ("pass_judged", "pass_deferred")
HOOK_DIRECTION = {"xdp_ingress": "ingress", "tc_ingress": "ingress", "tc_egress": "egress"}
TRANSPORTS = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "ipv6-icmp": "icmpv6"}


_IF = ("interface", "netns")
_AN = ("signal", "dimension", "key")
_DROP = ("interface", "profile", "verdict", "reason", "protocol")
_DP = ("hook", "direction", "verdict", "reason")
_RULE = ("rule", "direction", "action")

# Every family this module exports: name (without _total) -> (kind, unit (OTel form), labels, help, source).
# docs/metrics.md documents each one; tests check both against this table.
SPEC: dict[str, tuple[str, str, tuple[str, ...], str, str]] = {
    # kernel: enforcer instance and policy
    "hostwall_enforcer_pinned": ("gauge", "{instance}", (), "1 while the enforcer instance is pinned (programs, "
                                 "maps and state present at the pin dir), else 0", "pin dir + instance state"),
    "hostwall_enforcer_process_up": ("gauge", "{process}", (), "1 while the `hostwall-enforcer run` process of the "
                                     "instance is alive (the programs keep enforcing without it)", "instance state pid"),
    "hostwall_policy_info": ("gauge", "{policy}", ("policy", "revision"), "1 for the active policy (name, revision)",
                             "hw_policy header of the active generation + instance state"),
    "hostwall_policy_rules": ("gauge", "{rule}", (), "Rules of the active policy", "hw_policy header"),
    "hostwall_policy_audit_mode": ("gauge", "{state}", (), "1 while the active policy is in audit mode (would_drop "
                                   "instead of drop)", "hw_policy header"),
    "hostwall_policy_applied_timestamp_seconds": ("gauge", "s", (), "When the active policy was applied (Unix time)",
                                                  "instance state"),
    # kernel: counters
    "hostwall_datapath_packets": ("counter", "{packet}", _DP, "Packets judged by the datapath, by hook, verdict and "
                                  "reason (each packet counted once)", "hw_stats"),
    "hostwall_datapath_bytes": ("counter", "By", _DP, "Bytes of the packets judged by the datapath (labels as "
                                "hostwall_datapath_packets_total)", "hw_stats"),
    "hostwall_datapath_handoff_packets": ("counter", "{packet}", ("hook", "reason"), "Packets a hook passed on "
                                          "because another hook judges them (pass_judged: XDP already did; "
                                          "pass_deferred: TC ingress will)", "hw_stats"),
    "hostwall_rule_packets": ("counter", "{packet}", _RULE, "Packets that matched a rule of the active policy",
                              "hw_rule_stats (slot per rule name, instance state)"),
    "hostwall_rule_bytes": ("counter", "By", _RULE, "Bytes of the packets that matched a rule of the active policy",
                            "hw_rule_stats"),
    "hostwall_port_packets": ("counter", "{packet}", ("port", "verdict"), "TCP/UDP packets per destination port and "
                              "verdict (the first ports seen get a label, the rest is port=\"other\")",
                              "hw_port_stats"),
    "hostwall_dos_profile_dropped_packets": ("counter", "{packet}", ("profile", "reason"), "Packets dropped by the "
                                             "limits of a DoS profile, by reason", "hw_dos_stats"),
    "hostwall_dos_profile_dropped_bytes": ("counter", "By", ("profile", "reason"), "Bytes dropped by the limits of "
                                           "a DoS profile, by reason", "hw_dos_stats"),
    "hostwall_map_entries": ("gauge", "{entry}", ("map",), "Entries in a kernel hash map or policy table",
                             "BPF_MAP_LOOKUP_BATCH count (hash maps), instance state (policy tables)"),
    "hostwall_map_capacity": ("gauge", "{entry}", ("map",), "Capacity (max entries) of a kernel hash map or "
                              "policy table", "map info, enforcer.layout"),
    "hostwall_map_evicted": ("counter", "{entry}", ("map",), "Entries a full kernel table pushed out to make room "
                             "(conntrack: live connections, reported as flow ends; fragmented datagrams; DoS "
                             "sources)", "hw_ct_stats (conntrack), hw_frag_stats (fragments), hw_dos_src_stats (DoS sources)"),
    # kernel: interfaces
    "hostwall_interface_info": ("gauge", "{interface}", _IF + ("xdp_mode", "dos_profile"), "1 per interface of the "
                                "instance, with the XDP mode that took and its DoS profile", "instance state"),
    "hostwall_interface_attached": ("gauge", "{state}", _IF + ("hook",), "1 if hostwall's program of `hook` (xdp, "
                                    "tc_ingress, tc_egress) is attached to the interface, else 0 (also for "
                                    "interfaces of an instance that went away)", "rtnetlink (link XDP, tc filters)"),
    "hostwall_interface_packets": ("counter", "{packet}", _IF + ("direction",), "Packets the interface received / "
                                   "sent (kernel link counters)", "rtnetlink IFLA_STATS64"),
    "hostwall_interface_bytes": ("counter", "By", _IF + ("direction",), "Bytes the interface received / sent "
                                 "(kernel link counters)", "rtnetlink IFLA_STATS64"),
    # records
    "hostwall_dropped_packets": ("counter", "{packet}", _DROP, "Dropped and would-drop packets by interface, DoS "
                                 "profile, verdict, reason and protocol", "drop_summary records (exact)"),
    "hostwall_dropped_bytes": ("counter", "By", _DROP, "Bytes of dropped and would-drop packets (labels as "
                               "hostwall_dropped_packets_total)", "drop_summary records"),
    "hostwall_source_prefix_dropped_packets": ("counter", "{packet}", ("source_prefix",), "Dropped packets of the "
                                               "current top source prefixes", "drop_summary records"),
    "hostwall_source_flows": ("counter", "{flow}", ("source",), "Connections opened by the current top source "
                              "addresses", "flow start records"),
    "hostwall_anomaly_transitions": ("counter", "{record}", ("signal", "dimension", "state", "severity"),
                                     "Anomaly records by state (open, update, close) and severity", "anomaly records"),
    "hostwall_anomaly_open": ("gauge", "{anomaly}", _AN + ("severity",), "1 per open anomaly (key: source prefix, "
                              "transport/port or reason) with its current severity; 0 for 15 min once it closed "
                              "or changed severity", "anomaly records"),
    "hostwall_anomaly_score": ("gauge", "{score}", _AN, "Current score of an open anomaly (rate above the learned "
                               "baseline, in deviations); 0 for 15 min once it closed", "anomaly records"),
    "hostwall_anomaly_rate_per_second": ("gauge", "{event}/s", _AN, "Current rate of an open anomaly's key (drops "
                                         "or new flows per second); 0 for 15 min once it closed", "anomaly records"),
    "hostwall_anomaly_severity_level": ("gauge", "{level}", _AN, "Severity rank of an open anomaly (1 = lowest band; "
                                        "default low 1, medium 2, high 3, critical 4); 0 for 15 min once it closed",
                                        "anomaly records"),
    "hostwall_anomaly_top_talker_count": ("gauge", "{event}", _AN + ("source",), "Top talkers of an open anomaly: "
                                          "decayed count per source over the anomaly window; 0 for 15 min once gone",
                                          "anomaly records"),
    # this module
    "hostwall_kernel_metrics_read_errors": ("counter", "{error}", (), "Kernel reads for these metrics that failed "
                                            "(the previous values are served)", "this module"),
    "hostwall_kernel_metrics_read_duration_seconds": ("gauge", "s", (), "Duration of the last kernel read for these "
                                                      "metrics", "this module"),
}


SPEC.update(attack_metrics.SPEC)         # conntrack evictions by kind, SYN proxy, flows in aggregate


def _family(prom: str) -> Family:
    """An empty Family of SPEC[prom]; the OTel name is derived as collector/metrics.py does (dots, the unit's
    suffix dropped: the OTel Collector's prometheus exporter appends it again)."""
    kind, unit, labels, help_, _ = SPEC[prom]
    base = prom[len("hostwall_"):]
    for suffix in ("_bytes", "_seconds", "_per_second"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return Family(prom, "hostwall." + base.replace("_", "."), kind, unit, help_, labels)


def to_prometheus(families: Iterable[Family]) -> Iterator[Any]:
    """prometheus_client metric families of `families` (counters/gauges; Family names lack `_total`)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    for f in families:
        cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
        m = cls(f.prom, f.help, labels=f.labels, unit="")
        for lv, v in f.samples:
            m.add_metric(lv, v)
        yield m


# ---- bounded label sets ------------------------------------------------------------------------------

class PortTopN:
    """Per-port counters with at most `n` port labels plus "other", every series monotonic.

    The first `n` ports that carry traffic (ranked by packets at the read that finds them) get a label for
    the life of this object. A port's series counts from the moment it got its label (its earlier packets
    stay in "other"), so "other" never decreases and the sum over all labels equals the kernel total.
    A counter reset (new map: enforcer reloaded with a new build) starts over."""

    def __init__(self, n: int = DEFAULT_TOP_PORTS):
        self.n = n
        self.base: dict[int, np.ndarray] = {}      # port -> counts (per verdict) when it got its label
        self.map_id: int | None = None

    def update(self, counts: np.ndarray, map_id: int | None = None) -> dict[str, np.ndarray]:
        """counts: (65536, V) per port and verdict → {"<port>" | "other": (V,) counts}."""
        if map_id != self.map_id:
            self.base.clear()
            self.map_id = map_id
        for p, b in list(self.base.items()):
            if (counts[p] < b).any():               # the counters went back: a fresh map under the same id
                self.base.clear()
                break
        if len(self.base) < self.n:
            tot = counts.sum(axis=1)
            for p in np.argsort(tot, kind="stable")[::-1][: self.n + len(self.base)]:
                if len(self.base) >= self.n or tot[p] == 0:
                    break
                if int(p) not in self.base:
                    self.base[int(p)] = counts[p].copy()
        out = {}
        chosen = np.zeros(counts.shape[1], dtype=np.int64)
        for p, b in sorted(self.base.items()):
            v = counts[p].astype(np.int64) - b.astype(np.int64)
            out[str(p)] = v
            chosen += v
        out["other"] = counts.sum(axis=0).astype(np.int64) - chosen
        return out


class TopTalkers:
    """Cumulative counts per key, exported for the current top `n` by an exponentially decayed rate.

    At most `tracked` keys are kept: when full, the weaker half (by decayed rate) is forgotten at once, so a
    flood of new keys (spoofed sources) costs O(log tracked) per key. A key that leaves the top `n` stops
    being exported and continues its count if it comes back before it is forgotten.
    Label churn: at most `n` series per scrape; over time every key that reached the top has a series."""

    def __init__(self, n: int = DEFAULT_TOP_SOURCES, *, tracked: int = 1000, tau_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.n, self.tracked, self.tau, self.clock = n, tracked, tau_s, clock
        self.rows: dict[str, list[float]] = {}      # key -> [cumulative, decayed weight, at]

    def _decayed(self, row: list[float], now: float) -> float:
        return row[1] * math.exp(-(now - row[2]) / self.tau)

    def add(self, key: str, n: float) -> None:
        now = self.clock()
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= self.tracked:          # keep the stronger half: amortized O(log tracked)
                keep = sorted(self.rows, key=lambda k: -self._decayed(self.rows[k], now))[: self.tracked // 2]
                self.rows = {k: self.rows[k] for k in keep}
            self.rows[key] = [float(n), float(n), now]
            return
        row[0] += n
        row[1] = self._decayed(row, now) + n
        row[2] = now

    def top(self) -> list[tuple[str, float]]:
        now = self.clock()
        ranked = sorted(self.rows.items(), key=lambda kv: -self._decayed(kv[1], now))[: self.n]
        return [(k, row[0]) for k, row in ranked if self._decayed(row, now) > 1e-9]


# ---- records ------------------------------------------------------------------------------------------

class RecordMetrics:
    """Metrics from the canonical records the pipeline builds (called on the loop thread; families() may
    run on a scrape thread: both take the lock, held O(batch) and O(series) respectively)."""

    def __init__(self, *, profile_of: Callable[[str], str] | None = None, top_sources: int = DEFAULT_TOP_SOURCES,
                 max_anomalies: int = DEFAULT_MAX_ANOMALIES, gone_keep_s: float = DEFAULT_GONE_KEEP_S,
                 clock: Callable[[], float] = time.monotonic):
        self.profile_of = profile_of or (lambda iface: "")
        self.max_anomalies = max_anomalies
        self.gone_keep_s = gone_keep_s
        self.clock = clock
        self._lock = threading.Lock()
        self.dropped: Counter = Counter()           # (interface, profile, verdict, reason, protocol) -> packets
        self.dropped_bytes: Counter = Counter()
        self.prefixes = TopTalkers(top_sources, clock=clock)
        self.flow_sources = TopTalkers(top_sources, clock=clock)
        self.transitions: Counter = Counter()       # (signal, dimension, state, severity) -> records
        self.open: dict[str, dict] = {}             # anomaly id -> latest {labels, score, rate, level, talkers}
        self.severity_levels: dict[str, int] = {}   # band name -> rank (1 = lowest), from event.severity
        # anomaly series shown before, by label values -> when last shown: once gone they are shown as 0 for
        # gone_keep_s, because a push-based path (OTLP -> the OTel Collector's prometheus exporter) keeps a
        # series that stops coming at its last value (until its metric_expiration), which would keep a
        # closed anomaly "open" there
        self._shown: dict[str, dict[tuple, float]] = {"open": {}, "key": {}, "talker": {}}
        self.records = 0
        self.bad = 0

    def observe(self, records: Iterable[dict]) -> None:
        with self._lock:
            for r in records:
                try:
                    hw = r.get("hostwall") or {}
                    kind = hw.get("kind")
                    if kind == "drop_summary":
                        self._drop(r, hw)
                    elif kind == "flow":
                        if "start" in (r.get("event") or {}).get("type", ()):
                            src = (r.get("source") or {}).get("ip")
                            if src:
                                self.flow_sources.add(str(src), 1)
                    elif kind == "anomaly":
                        self._anomaly(r, hw.get("anomaly") or {})
                    self.records += 1
                except (AttributeError, TypeError, ValueError, KeyError):
                    self.bad += 1

    def _drop(self, r: dict, hw: dict) -> None:
        net = r.get("network") or {}
        iface = (hw.get("interface") or {})
        name = iface.get("name") or (f"ifindex{iface['id']}" if iface.get("id") else "unknown")
        proto = TRANSPORTS.get(net.get("transport", ""), "other" if net.get("iana_number") else "unknown")
        key = (name, self.profile_of(name) if name != "unknown" else "", hw.get("verdict", "drop"),
               hw.get("reason", "unknown"), proto)
        pk, by = int(net.get("packets", 0)), int(net.get("bytes", 0))
        self.dropped[key] += pk
        self.dropped_bytes[key] += by
        prefix = (hw.get("source") or {}).get("prefix")
        if prefix and pk:
            self.prefixes.add(str(prefix), pk)

    def _anomaly(self, r: dict, a: dict) -> None:
        key = a.get("key") or {}
        signal, dim, value = str(key.get("signal", "")), str(key.get("dimension", "")), str(key.get("value", ""))
        state, sev = a.get("state", ""), str(a.get("severity", ""))
        level = int((r.get("event") or {}).get("severity") or 0)
        if sev and level:
            self.severity_levels[sev] = level
        self.transitions[(signal, dim, state, sev)] += 1
        aid = str(a.get("id", ""))
        if state == "close":
            self.open.pop(aid, None)
        elif state in ("open", "update"):
            self.open[aid] = {"labels": (signal, dim, value), "severity": sev, "level": level,
                              "score": float(a.get("score", 0.0)), "rate": float(a.get("rate", 0.0)),
                              "talkers": [(str(t.get("source", "")), float(t.get("count", 0.0)))
                                          for t in a.get("top_talkers") or []]}

    def families(self) -> list[Family]:
        with self._lock:
            pk = _family("hostwall_dropped_packets")
            by = _family("hostwall_dropped_bytes")
            for k in sorted(self.dropped):
                pk.add(k, self.dropped[k])
                by.add(k, self.dropped_bytes[k])
            pre = _family("hostwall_source_prefix_dropped_packets")
            for k, v in self.prefixes.top():
                pre.add((k,), v)
            fl = _family("hostwall_source_flows")
            for k, v in self.flow_sources.top():
                fl.add((k,), v)
            tr = _family("hostwall_anomaly_transitions")
            for k in sorted(self.transitions):
                tr.add(k, self.transitions[k])
            return [pk, by, pre, fl, tr, *self._anomaly_families()]

    def _anomaly_families(self) -> list[Family]:
        now = self.clock()
        cur: dict[str, dict[tuple, Any]] = {"open": {}, "key": {}, "talker": {}}
        shown = sorted(self.open.values(), key=lambda o: -o["score"])[: self.max_anomalies]
        for o in shown:
            cur["open"][o["labels"] + (o["severity"],)] = 1
            cur["key"][o["labels"]] = (o["score"], o["rate"], o["level"] or self.severity_levels.get(o["severity"], 0))
            for src, c in o["talkers"]:
                cur["talker"][o["labels"] + (src,)] = c
        zero = {"open": 0, "key": (0.0, 0.0, 0), "talker": 0}
        for kind, seen in self._shown.items():
            live = set(cur[kind])
            for lv in live:
                seen[lv] = now
            gone = sorted((t, lv) for lv, t in seen.items() if lv not in live)
            excess = len(seen) - 4 * self.max_anomalies        # bounded even under heavy churn
            for i, (t, lv) in enumerate(gone):
                if i < excess or now - t > self.gone_keep_s:
                    del seen[lv]
                else:                                   # gone: shown as 0 for a while (see __init__)
                    cur[kind][lv] = zero[kind]
        op = _family("hostwall_anomaly_open")
        sc = _family("hostwall_anomaly_score")
        rt = _family("hostwall_anomaly_rate_per_second")
        lv = _family("hostwall_anomaly_severity_level")
        tk = _family("hostwall_anomaly_top_talker_count")
        for k in sorted(cur["open"]):
            op.add(k, cur["open"][k])
        for k in sorted(cur["key"]):
            score, rate, level = cur["key"][k]
            sc.add(k, score)
            rt.add(k, rate)
            lv.add(k, level)
        for k in sorted(cur["talker"]):
            tk.add(k, cur["talker"][k])
        return [op, sc, rt, lv, tk]


# ---- kernel -------------------------------------------------------------------------------------------

def count_entries(fd: int, key_size: int, value_bytes: int, chunk: int = BATCH_CHUNK) -> int:
    """Entries of a hash map: one batched walk (enforcer._internal.bpfsys.count_entries)."""
    from hostwall.bpf import bpfsys
    return bpfsys.count_entries(fd, key_size, value_bytes, chunk=chunk)


class KernelCollector:
    """prometheus_client custom collector (and Family source) over one enforcer instance's pinned maps.

    Thread-safe: scrapes and OTLP pushes may call collect()/families() at once; one read at a time, the
    others get its result. A missing instance (no pins, no state) is not an error: the families then
    say so (hostwall_enforcer_pinned 0, interfaces seen before reported detached)."""

    def __init__(self, pin_dir: str | os.PathLike, *, records: RecordMetrics | None = None,
                 refresh_s: float = DEFAULT_REFRESH_S, pressure_refresh_s: float = DEFAULT_PRESSURE_REFRESH_S,
                 top_ports: int = DEFAULT_TOP_PORTS, links: bool = True, clock: Callable[[], float] = time.monotonic):
        self.pin_dir = str(pin_dir)
        self.refresh_s = refresh_s
        self.pressure_refresh_s = pressure_refresh_s
        self.links = links
        self.clock = clock
        self.records = records if records is not None else RecordMetrics(profile_of=self.profile_of)
        self.ports = PortTopN(top_ports)
        self._lock = threading.Lock()
        self._cache: list[Family] = []
        self._cache_at = -math.inf
        self._pressure: dict[str, dict] = {}
        self._pressure_at = -math.inf
        self._pressure_ids: dict[str, int] = {}
        self._seen_ifaces: dict[tuple[str, str], dict] = {}     # (name, netns) -> last info
        self._profiles: dict[str, str] = {}
        self._profiles_at = -math.inf
        self._profiles_lock = threading.Lock()
        self.reads = 0
        self.read_errors = 0
        self.last_read_s = 0.0

    # ---- public -----------------------------------------------------------------------------------
    def observe(self, records: Iterable[dict]) -> None:
        """Feed a batch of canonical records (the pipeline, before the fan-out)."""
        self.records.observe(records)

    def families(self) -> list[Family]:
        """Kernel families (cached for refresh_s) + record families (live)."""
        with self._lock:
            now = self.clock()
            if now - self._cache_at >= self.refresh_s:
                t0 = time.perf_counter()
                try:
                    self._cache = self._read(now)
                except Exception as e:                 # noqa: BLE001 — a scrape must never fail on this
                    self.read_errors += 1
                    if self.read_errors in (1, 10, 100) or self.read_errors % 1000 == 0:
                        log.warning("kernel metrics: reading %s failed: %s: %s", self.pin_dir, type(e).__name__, e)
                self.reads += 1
                self.last_read_s = time.perf_counter() - t0
                self._cache_at = now
            own = _family("hostwall_kernel_metrics_read_errors")
            own.add((), self.read_errors)
            dur = _family("hostwall_kernel_metrics_read_duration_seconds")
            dur.add((), round(self.last_read_s, 6))
            fams = self._cache + [own, dur]
        return fams + self.records.families()

    def collect(self) -> Iterator[Any]:
        yield from to_prometheus(self.families())

    def describe(self) -> list:
        return []                                   # families vary with the instance: no fixed description

    def profile_of(self, interface: str) -> str:
        """DoS profile bound to `interface` by the active policy ("" if none); state re-read every refresh_s."""
        now = self.clock()
        if now - self._profiles_at >= self.refresh_s:
            with self._profiles_lock:
                if now - self._profiles_at >= self.refresh_s:
                    st = self._state()
                    if st is not None:
                        self._profiles = {i.name: i.dos_profile or "" for i in st.interfaces}
                    self._profiles_at = now
        return self._profiles.get(interface, "")

    # ---- reading ----------------------------------------------------------------------------------
    def _state(self):
        from hostwall.bpf.state import InstanceState
        try:
            return InstanceState.load(self.pin_dir)
        except (OSError, ValueError, TypeError):
            return None

    def _read(self, now: float) -> list[Family]:
        from hostwall.bpf.instance import Instance
        st = self._state()
        try:
            dp = Instance.open(self.pin_dir)
        except OSError:
            dp = None
        fams: list[Family] = []
        f = _family("hostwall_enforcer_pinned")
        f.add((), 1 if dp is not None and st is not None else 0)
        fams.append(f)
        f = _family("hostwall_enforcer_process_up")
        f.add((), 1 if st is not None and st.pid and os.path.exists(f"/proc/{st.pid}") else 0)
        fams.append(f)
        if st is not None:
            self._profiles = {i.name: i.dos_profile or "" for i in st.interfaces}
            self._profiles_at = now
        fams += self._interfaces(st)
        if dp is not None:
            try:
                fams += self._datapath(dp, st, now)
            finally:
                dp.close()
        return fams

    def _interfaces(self, st) -> list[Family]:
        info = _family("hostwall_interface_info")
        att = _family("hostwall_interface_attached")
        pk = _family("hostwall_interface_packets")
        by = _family("hostwall_interface_bytes")
        current = {(i.name, i.netns or ""): i for i in (st.interfaces if st is not None else [])}
        for key, i in current.items():
            self._seen_ifaces[key] = {"xdp_mode": i.xdp_mode, "dos_profile": i.dos_profile or ""}
        for key in sorted(self._seen_ifaces):
            name, netns = key
            seen = self._seen_ifaces[key]
            link = _link(name, netns or None) if self.links and key in current else None
            if key in current:
                info.add(key + (seen["xdp_mode"], seen["dos_profile"]), 1)
            for hook in ("xdp", "tc_ingress", "tc_egress"):
                att.add(key + (hook,), 1 if link and link["attached"][hook] else 0)
            if link and link["stats"]:
                s = link["stats"]
                pk.add(key + ("receive",), s["rx_packets"])
                pk.add(key + ("transmit",), s["tx_packets"])
                by.add(key + ("receive",), s["rx_bytes"])
                by.add(key + ("transmit",), s["tx_bytes"])
        return [info, att, pk, by]

    def _datapath(self, dp, st, now: float) -> list[Family]:
        from hostwall.bpf import bpfsys
        from hostwall.bpf import layout as L
        fams: list[Family] = []
        hdr = dp.active_header()
        revs = st.revisions if st is not None else {}
        revision = revs.get(str(int(hdr["revision_id"])), st.revision if st is not None else "")
        f = _family("hostwall_policy_info")
        f.add((st.policy_name if st is not None else "", revision), 1)
        fams.append(f)
        f = _family("hostwall_policy_rules")
        f.add((), int(hdr["nrules"]))
        fams.append(f)
        f = _family("hostwall_policy_audit_mode")
        f.add((), int(bool(hdr["audit"])))
        fams.append(f)
        if st is not None and st.applied_at:
            f = _family("hostwall_policy_applied_timestamp_seconds")
            f.add((), float(st.applied_at))
            fams.append(f)

        # verdict counters: (hook, verdict, reason)
        stats = dp.stats()
        pk = _family("hostwall_datapath_packets")
        by = _family("hostwall_datapath_bytes")
        ho = _family("hostwall_datapath_handoff_packets")
        for hook, hname in L.HOOK_NAMES.items():
            for v, vname in L.VERDICT_NAMES.items():
                for r, rname in L.REASON_NAMES.items():
                    c = stats[L.stats_index(hook, v, r)]
                    if not c["packets"]:
                        continue
                    if rname in HANDOFF_REASONS:
                        ho.add((hname, rname), int(c["packets"]))
                    else:
                        pk.add((hname, HOOK_DIRECTION[hname], vname, rname), int(c["packets"]))
                        by.add((hname, HOOK_DIRECTION[hname], vname, rname), int(c["bytes"]))
        fams += [pk, by, ho]

        # rules of the active policy, by name (slots are stable per name across swaps)
        rs = dp.rule_stats()
        rp = _family("hostwall_rule_packets")
        rb = _family("hostwall_rule_bytes")
        if st is not None:
            for name, slot in sorted(st.slots.items(), key=lambda kv: st.rule_meta.get(kv[0], {}).get("order", 0)):
                if 0 <= slot < len(rs):
                    meta = st.rule_meta.get(name, {})
                    lv = (name, meta.get("direction", ""), meta.get("action", ""))
                    rp.add(lv, int(rs[slot]["packets"]))
                    rb.add(lv, int(rs[slot]["bytes"]))
        fams += [rp, rb]

        # destination ports (tcp/udp), bounded
        ps = dp.port_stats()
        counts = np.stack([ps["allowed"], ps["dropped"], ps["would_drop"], ps["syns"]], axis=1)
        mid = bpfsys.map_info(dp.map_fds["hw_port_stats"]).id
        f, fs = _family("hostwall_port_packets"), _family("hostwall_port_syn_packets")
        top = self.ports.update(counts, mid)
        for port in sorted(top, key=lambda p: (p == "other", int(p) if p != "other" else 0)):
            for i, vname in enumerate(("allow", "drop", "would_drop")):
                f.add((port, vname), int(top[port][i]))
            fs.add((port,), int(top[port][3]))
        fams += [f, fs]

        # DoS drops per profile
        names = tuple(st.dos_profiles) if st is not None else ()
        ds = dp.dos_stats()
        dp_ = _family("hostwall_dos_profile_dropped_packets")
        db = _family("hostwall_dos_profile_dropped_bytes")
        for p, pname in enumerate(names):
            for r, rname in L.DROP_REASONS.items():
                c = ds[p * L.REASONS + r]
                if c["packets"]:
                    dp_.add((pname, rname), int(c["packets"]))
                    db.add((pname, rname), int(c["bytes"]))
        fams += [dp_, db]

        # map pressure: hash maps (counted, slower refresh) + the active policy tables (from the state)
        if now - self._pressure_at >= self.pressure_refresh_s or self._pressure_ids != self._map_ids(dp):
            self._pressure = self._count_maps(dp)
            self._pressure_ids = self._map_ids(dp)
            self._pressure_at = now
        ent = _family("hostwall_map_entries")
        cap = _family("hostwall_map_capacity")
        evicted = _family("hostwall_map_evicted")
        rows = dict(self._pressure)
        if st is not None:
            from hostwall.bpf.instance import policy_pressure
            rows.update(policy_pressure(st.tables))
        for name in sorted(rows):
            ent.add((name,), rows[name]["entries"])
            cap.add((name,), rows[name]["capacity"])
            if "evicted" in rows[name]:
                evicted.add((name,), rows[name]["evicted"])
        fams += [ent, cap, evicted] + attack_metrics.families(dp, rows, names, _family)
        return fams

    @staticmethod
    def _map_ids(dp) -> dict[str, int]:
        from hostwall.bpf import bpfsys
        return {n: bpfsys.map_info(dp.map_fds[n]).id for n in ("hw_ct4", "hw_dos_src")}

    @staticmethod
    def _count_maps(dp) -> dict[str, dict]:
        return dp.map_pressure()


def _in_netns(netns: str | None, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
    """fn() with the network namespace `netns` (a name under /run/netns, or a path).

    Runs on a short-lived thread that setns(2)-es itself into the namespace: sockets it creates live
    there. No fork: pyroute2's own netns mode forks a helper, and a forked child of an asyncio process
    shares the loop's signal wake-up pipe, so the helper's termination reached the collector as SIGTERM."""
    if not netns:
        return fn()
    from .enrich.sockets import _NsSwitch, netns_path
    path = netns_path(netns)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _NsSwitch.setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:                 # noqa: BLE001 — handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="hw-netns", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"netlink query in netns {netns} took more than {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _link(name: str, netns: str | None) -> dict | None:
    """Attachment (XDP, our TC filters) and link counters of one interface; None if it is gone."""
    from pyroute2 import IPRoute

    from hostwall.bpf import links

    def query() -> dict:
        with IPRoute() as ipr:
            idx = links.ifindex(ipr, name)
            link = ipr.get_links(idx)[0]
            xdp = link.get_attr("IFLA_XDP")
            xdp_on = bool(xdp is not None and (xdp.get_attr("IFLA_XDP_PROG_ID") or 0))
            stats = link.get_attr("IFLA_STATS64") or {}
            return {"attached": {"xdp": xdp_on,
                                 "tc_ingress": bool(links.our_filters(ipr, idx, links.TC_INGRESS_PARENT)),
                                 "tc_egress": bool(links.our_filters(ipr, idx, links.TC_EGRESS_PARENT))},
                    "stats": {k: int(stats.get(k, 0)) for k in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}
                    if stats else {}}
    try:
        return _in_netns(netns, query)
    except Exception:                               # noqa: BLE001 — interface or netns gone: not attached
        return None


def register(registry, pin_dir: str | os.PathLike, **kwargs) -> KernelCollector:
    """Create a KernelCollector for `pin_dir`, register it with a prometheus_client registry, return it
    (feed it records with .observe(records))."""
    kc = KernelCollector(pin_dir, **kwargs)
    registry.register(kc)
    return kc
