"""Dashboard metrics derived from the canonical records the pipeline builds (drops per interface, top
source prefixes, flow starts, anomalies), with bounded label sets (docs/metrics.md)."""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .metric_family import Family
from .metric_spec import TRANSPORTS
from .metric_spec import spec_family as _family

DEFAULT_TOP_PORTS = 20
DEFAULT_TOP_SOURCES = 10
DEFAULT_MAX_ANOMALIES = 100
DEFAULT_GONE_KEEP_S = 900.0          # > the OTel Collector prometheus exporter's metric_expiration (5-10 min)


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
