"""Anomaly windows: rate spikes per source prefix, destination port and drop reason, against a learned
baseline; open / update / close records for on-call alerting (schemas/anomaly.schema.json).

Signals and keys (one independent detector per key):
  drops  packets of drop_summary records, by source prefix (/24 v4, /64 v6 — re-masked when the
         kernel aggregated finer), by "<transport>/<port>" and by drop reason. A summary's packets are
         spread evenly over the buckets its interval [window.start, window.end] overlaps.
  flows  new connections (flow start records), by source prefix and destination port.
  syns   ingress TCP SYNs per destination port, whatever became of them (the kernel's per-port counters,
         fed by collector/syn_proxy.py through observe_count): a SYN flood spread over many sources
         is seen and named by its port even when the SYN proxy answers every SYN (no drops, no flows).

Window math. Time is cut into buckets of `bucket_s`; at each bucket boundary e the window [e - window_s, e)
gives rate = count / window_s. The baseline is an EWMA of that rate (alpha) and of its absolute
deviation (alpha); score = (rate - mean) / max(dev, min_deviation, sqrt(mean / window_s)) — the last
term is the Poisson noise of a steady rate, so steady traffic scores near 0 whatever its level.
  open    score ≥ score_threshold AND rate ≥ min_rate (warm-up rules below)
  update  while open, every `update_interval_s`, with the current rate/score and peak values
  close   after score < score_threshold or rate < min_rate continuously for `quiet_s`
While open, the deviation is frozen and the mean learns `open_learning_factor` times slower (default:
time constant ~17 min at 1 s buckets), so an attack does not become normal in seconds but a lasting new
normal still closes eventually. Nothing opens during the first `warmup_windows` windows after the first
tick (every key is new then) — unless the detector started from the baselines a previous run saved
(`state_path`, collector/anomaly_state.py: a restart is not blind); later, a key with no baseline yet
(a new source) may open at once when its rate passes min_rate, and a key with history needs
`warmup_windows` windows of it.
Severity: the highest band in `severity_bands` (name → minimum score) the score reaches.
Top talkers: per anomaly, individual sources (one host each, never a prefix) with integer counts from
the start of the window that opened it to the current record's window end: for drops, the peers each
drop summary lists (`hostwall.top_peers`, from the kernel's per-interval peer table) with their
packets and bytes; for flows, the source of each new connection (count = connections). At most
`talkers_tracked` sources are tracked per key (per window, and per open anomaly); a new one replaces
the one with the smallest total, so a listed count is exact unless the source was replaced and came
back (then it is a lower bound); peers the kernel could not list (docs/collector.md "Top talkers")
are missing, never guessed.

Bounds: at most `max_keys` keys per signal+dimension; the least recently seen idle key is evicted
(counted; an open anomaly is never evicted — if all are open, the new key is refused, counted).
Late data (for buckets already evaluated) still counts into the window if it is inside it; older data
is counted and ignored.

Cost: observe() O(buckets touched) per record (~15 µs); tick() O(keys × buckets elapsed), ~3 µs per
key-step (10k keys ≈ 30 ms per second).
Time: records carry wall-clock ISO times; tick(now) takes wall-clock seconds (time.time()).
"""
from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .anomaly_config import DIMENSIONS, SIGNALS, AnomalyConfig, AnomalyConfigError
from .anomaly_state import load_baselines, save_baselines
from .records import ECS_VERSION, SCHEMA_VERSION, iso_ns, parse_iso_ns
from .records.timefmt import created_now

__all__ = ["AnomalyConfig", "AnomalyConfigError", "AnomalyDetector", "DIMENSIONS", "SIGNALS"]

# ------------------------------------------------------------------------------------- state

@dataclass
class _Key:
    signal: str
    dimension: str
    value: str
    extra: dict                                    # the key's record fields (transport, port, reason, ...)
    buckets: dict = field(default_factory=dict)    # bucket index -> count
    talkers: dict = field(default_factory=dict)    # source IP -> {bucket index: [count, packets, bytes]}
    open_talkers: dict = field(default_factory=dict)   # while open: source IP -> [count, packets, bytes]
    mean: float = 0.0
    dev: float = 0.0
    steps: int = 0                                 # full windows learned
    created_bucket: int = 0
    # open anomaly
    anomaly_id: str = ""
    opened_at: float = 0.0
    last_update: float = 0.0
    below_since: float | None = None
    peak_rate: float = 0.0
    peak_score: float = 0.0
    seq: int = 0


class AnomalyDetector:
    """observe(records) feeds the windows; tick(now) evaluates every elapsed bucket boundary and returns
    anomaly records. Not thread-safe (one pipeline task owns it)."""

    def __init__(self, config: AnomalyConfig | None = None, host: Any = None, state_path: Any = None):
        """state_path: where baselines are kept across restarts (collector/anomaly_state.py); None: not kept."""
        self.cfg = config or AnomalyConfig()
        self.host = host
        self._keys: dict[tuple, OrderedDict] = {}
        self._evaluated_to: int | None = None           # bucket index of the last evaluated boundary
        self._started: int | None = None                # first evaluated boundary (global warm-up)
        self.counters = {"observed": 0, "ignored": 0, "late": 0, "too_late": 0, "evicted_keys": 0,
                         "refused_keys": 0, "opened": 0, "updated": 0, "closed": 0, "bad_records": 0,
                         "baseline_saves": 0, "baseline_save_errors": 0}
        self._pending: list[dict] = []
        self._iso_memo: dict[str, float] = {}
        self.state_path, self._saved_at, self.restored, self.restore_note = state_path, None, 0, ""
        self.restored_warm = False
        if state_path is not None:                      # a restart starts from the last run's baselines
            self.restored, self.restored_warm, self.restore_note = load_baselines(self, state_path)

    @property
    def bucket_s(self) -> float:
        """Evaluation step: tick() at least this often for timely anomalies."""
        return self.cfg.bucket_s

    # ---- input -------------------------------------------------------------------------------------
    def observe(self, records) -> None:
        for rec in records:
            try:
                self._observe(rec)
            except (KeyError, ValueError, TypeError):
                self.counters["bad_records"] += 1

    def _observe(self, rec: dict) -> None:
        hw = rec.get("hostwall", {})
        kind = hw.get("kind")
        if kind == "drop_summary" and "drops" in self.cfg.signals:
            packets = float(rec.get("network", {}).get("packets", 0))
            w = hw["window"]
            t0, t1 = self._iso_s(w["start"]), self._iso_s(w["end"])
            if not self._timely(t0, t1):
                return
            peers = [(p["ip"], int(p["packets"]), int(p["packets"]), int(p["bytes"]))
                     for p in hw.get("top_peers", ())]
            for dim, value, extra in self._drop_keys(rec, hw):
                self._add("drops", dim, value, extra, packets, t0, t1, peers)
            self.counters["observed"] += 1
        elif kind == "flow" and "start" in rec.get("event", {}).get("type", ()) and "flows" in self.cfg.signals:
            t = parse_iso_ns(rec["@timestamp"]) / 1e9
            if not self._timely(t, t):
                return
            src = rec.get("source", {}).get("ip", "")
            talker = [(src, 1, None, None)] if src else []
            for dim, value, extra in self._flow_keys(rec):
                self._add("flows", dim, value, extra, 1.0, t, t, talker)
            self.counters["observed"] += 1
        else:
            self.counters["ignored"] += 1

    def observe_count(self, signal: str, dimension: str, value: str, extra: dict, count: float, t0: float,
                      t1: float) -> None:
        """`count` events of a key that come as counters, not records, spread over [t0, t1] (wall-clock
        seconds): the per-port SYN signal."""
        if signal in self.cfg.signals and dimension in self.cfg.dimensions and count > 0 and self._timely(t0, t1):
            self._add(signal, dimension, value, extra, float(count), t0, t1, "")
            self.counters["observed"] += 1

    def _iso_s(self, iso: str) -> float:
        """Seconds of an ISO time; the summaries of one interval share their bounds, so memoise a few."""
        got = self._iso_memo.get(iso)
        if got is None:
            if len(self._iso_memo) > 64:
                self._iso_memo.clear()
            got = self._iso_memo[iso] = parse_iso_ns(iso) / 1e9
        return got

    def _prefix(self, ip_or_prefix: str) -> str:
        addr, _, plen = ip_or_prefix.partition("/")
        if plen and int(plen) == (self.cfg.prefix_v6 if ":" in addr else self.cfg.prefix_v4):
            return ip_or_prefix                     # the kernel aggregated at our length: no parsing
        net = ipaddress.ip_network(ip_or_prefix, strict=False)
        want = self.cfg.prefix_v4 if net.version == 4 else self.cfg.prefix_v6
        if net.prefixlen > want:
            net = net.supernet(new_prefix=want)
        return str(net)

    def _port_key(self, rec: dict):
        port = rec.get("destination", {}).get("port")
        transport = rec.get("network", {}).get("transport")
        if port is None or not transport:
            return None
        return f"{transport}/{port}", {"transport": transport, "port": int(port)}

    def _drop_keys(self, rec: dict, hw: dict):
        dims = self.cfg.dimensions
        prefix = hw.get("source", {}).get("prefix")
        if "source_prefix" in dims and prefix:
            p = self._prefix(prefix)
            yield "source_prefix", p, {"source_prefix": p}
        pk = self._port_key(rec)
        if "destination_port" in dims and pk:
            yield "destination_port", pk[0], pk[1]
        if "reason" in dims and hw.get("reason"):
            yield "reason", hw["reason"], {"reason": hw["reason"]}

    def _flow_keys(self, rec: dict):
        dims = self.cfg.dimensions
        ip = rec.get("source", {}).get("ip")
        if "source_prefix" in dims and ip:
            p = self._prefix(ip)
            yield "source_prefix", p, {"source_prefix": p}
        pk = self._port_key(rec)
        if "destination_port" in dims and pk:
            yield "destination_port", pk[0], pk[1]

    def _table(self, signal: str, dim: str) -> OrderedDict:
        return self._keys.setdefault((signal, dim), OrderedDict())

    def _get_key(self, signal, dim, value, extra, now_s: float) -> _Key | None:
        table = self._table(signal, dim)
        k = table.get(value)
        if k is not None:
            table.move_to_end(value)
            return k
        if len(table) >= self.cfg.max_keys:
            victim = next((v for v, kk in table.items() if not kk.anomaly_id), None)
            if victim is None:
                self.counters["refused_keys"] += 1
                return None
            del table[victim]
            self.counters["evicted_keys"] += 1
        k = table[value] = _Key(signal, dim, value, extra, created_bucket=math.floor(now_s / self.cfg.bucket_s))
        return k

    def _buckets_of(self, t0: float, t1: float) -> tuple[int, int]:
        b = self.cfg.bucket_s
        first = math.floor(t0 / b)
        return first, (max(first, math.ceil(t1 / b) - 1) if t1 > t0 else first)   # [t0, t1): t1 is outside

    def _timely(self, t0: float, t1: float) -> bool:
        """False (counted too_late) for data older than the last evaluated window; counts late data."""
        if self._evaluated_to is None:
            return True
        first, last = self._buckets_of(t0, t1)
        if last < self._evaluated_to - self.cfg.buckets:
            self.counters["too_late"] += 1
            return False
        if first < self._evaluated_to:
            self.counters["late"] += 1
        return True

    def _add(self, signal, dim, value, extra, count: float, t0: float, t1: float, talkers: list) -> None:
        first, last = self._buckets_of(t0, t1)
        k = self._get_key(signal, dim, value, extra, t1)
        if k is None:
            return
        self._spread(k, count, t0, t1, first, last)
        for source, n, packets, bytes_ in talkers:
            self._talk(k, source, last, n, packets, bytes_)

    def _spread(self, k: _Key, count: float, t0: float, t1: float, first: int, last: int) -> None:
        """Add `count` to the buckets [first, last], proportionally to each bucket's overlap with [t0, t1]."""
        if last == first or t1 <= t0:
            k.buckets[first] = k.buckets.get(first, 0.0) + count
            return
        b, span = self.cfg.bucket_s, t1 - t0
        for i in range(first, last + 1):
            lo, hi = max(t0, i * b), min(t1, (i + 1) * b)
            if hi > lo:
                k.buckets[i] = k.buckets.get(i, 0.0) + count * (hi - lo) / span

    def _talk(self, k: _Key, source: str, bucket: int, count: int, packets: int | None,
              bytes_: int | None) -> None:
        """Add one source's integer counts to its bucket (the bucket its record ends in). O(1), or
        O(talkers_tracked) when a new source replaces the smallest."""
        if not source or self.cfg.top_talkers == 0:
            return
        per = k.talkers.get(source)
        if per is None:
            if len(k.talkers) >= self.cfg.talkers_tracked:
                del k.talkers[min(k.talkers, key=lambda s: sum(c[0] for c in k.talkers[s].values()))]
            per = k.talkers[source] = {}
        add = (count, packets or 0, bytes_ or 0)
        c = per.setdefault(bucket, [0, 0, 0])
        for i in range(3):
            c[i] += add[i]
        if k.anomaly_id:
            self._talk_open(k.open_talkers, source, add)

    def _talk_open(self, tot: dict, source: str, add) -> None:
        c = tot.get(source)
        if c is None:
            if len(tot) >= self.cfg.talkers_tracked:
                del tot[min(tot, key=lambda s: tot[s][0])]
            c = tot[source] = [0, 0, 0]
        for i in range(3):
            c[i] += add[i]

    def _window_totals(self, k: _Key, e: int) -> dict:
        """Integer totals per source over the window ending at bucket boundary e."""
        n, out = self.cfg.buckets, {}
        for source, per in k.talkers.items():
            for b, c in per.items():
                if e - n <= b < e:
                    self._talk_open(out, source, c)
        return out

    def _top_talkers(self, k: _Key) -> list[dict]:
        rows = []
        for source, (count, packets, bytes_) in k.open_talkers.items():
            row = {"source": source, "count": count}
            if k.signal == "drops":
                row.update(packets=packets, bytes=bytes_)
            rows.append(row)
        rows.sort(key=lambda r: (-r["count"], r["source"]))
        return rows[:self.cfg.top_talkers]

    # ---- evaluation ----------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> list[dict]:
        """Evaluate every bucket boundary up to `now` (wall-clock seconds); return anomaly records."""
        now = time.time() if now is None else float(now)
        end = math.floor(now / self.cfg.bucket_s)
        if self._evaluated_to is None:
            first = self._first_bucket()
            self._evaluated_to = end - 1 if first is None else min(end - 1, first)
            self._started = self._evaluated_to + 1
        out = self._pending
        self._pending = []
        steps = end - self._evaluated_to
        if steps > self.cfg.buckets * 4:             # a long pause: the skipped boundaries see no data
            self._evaluated_to = end - self.cfg.buckets * 4
        while self._evaluated_to < end:
            self._evaluated_to += 1
            for table in self._keys.values():
                for k in list(table.values()):
                    rec = self._step(k, self._evaluated_to)
                    if rec is not None:
                        out.append(rec)
            self._forget_idle(self._evaluated_to)
        if self.state_path is not None and (self._saved_at is None or now - self._saved_at >= self.cfg.window_s):
            self._saved_at = now
            self.counters["baseline_saves" if save_baselines(self, self.state_path, now) else "baseline_save_errors"] += 1
        return out

    def _first_bucket(self) -> int | None:
        firsts = [min(k.buckets) for t in self._keys.values() for k in t.values() if k.buckets]
        return min(firsts) if firsts else None

    def _window_rate(self, k: _Key, e: int) -> float:
        n = self.cfg.buckets
        return sum(k.buckets.get(i, 0.0) for i in range(e - n, e)) / self.cfg.window_s

    def _score(self, k: _Key, rate: float) -> float:
        floor = max(k.dev, self.cfg.min_deviation, math.sqrt(max(k.mean, 0.0) / self.cfg.window_s))
        return (rate - k.mean) / floor

    def _learn(self, k: _Key, rate: float) -> None:
        a = self.cfg.ewma_alpha * (self.cfg.open_learning_factor if k.anomaly_id else 1.0)
        if k.steps == 0 and not k.anomaly_id:         # first whole window of a quiet key: start there
            k.mean, k.dev = rate, 0.0
        else:
            if not k.anomaly_id:                        # the attack's spread must not widen the band
                k.dev += a * (abs(rate - k.mean) - k.dev)
            k.mean += a * (rate - k.mean)
        k.steps += 1

    def _step(self, k: _Key, e: int) -> dict | None:
        """Evaluate the window ending at bucket boundary e for one key."""
        n = self.cfg.buckets
        rate = self._window_rate(k, e)
        score = self._score(k, rate)
        t = e * self.cfg.bucket_s
        hot = score >= self.cfg.score_threshold and rate >= self.cfg.min_rate
        full = e - k.created_bucket >= n                  # learn only from whole windows
        rec = None
        if not k.anomaly_id:
            warm = self.restored_warm or e - self._started >= self.cfg.warmup_windows * n
            trusted = k.steps >= self.cfg.warmup_windows * n or k.mean == 0.0
            if hot and warm and trusted:
                rec = self._open(k, t, rate, score)
            elif full:
                self._learn(k, rate)
        else:
            k.peak_rate, k.peak_score = max(k.peak_rate, rate), max(k.peak_score, score)
            if hot:
                k.below_since = None
            elif k.below_since is None:
                k.below_since = t
            if k.below_since is not None and t - k.below_since >= self.cfg.quiet_s:
                rec = self._emit(k, "close", t, rate, score)
                self._reset(k)
            elif t - k.last_update >= self.cfg.update_interval_s:
                rec = self._emit(k, "update", t, rate, score)
            if full:
                self._learn(k, rate)
        for i in [i for i in k.buckets if i < e - n]:
            del k.buckets[i]
        for s in list(k.talkers):
            per = k.talkers[s]
            for i in [i for i in per if i < e - n]:
                del per[i]
            if not per:
                del k.talkers[s]
        return rec

    def _open(self, k: _Key, t: float, rate: float, score: float) -> dict:
        k.anomaly_id = hashlib.blake2b(f"{k.signal}|{k.dimension}|{k.value}|{t}".encode(), digest_size=16).hexdigest()
        k.opened_at, k.below_since = t, None
        k.peak_rate, k.peak_score, k.seq = rate, score, 0
        k.open_talkers = self._window_totals(k, round(t / self.cfg.bucket_s))
        return self._emit(k, "open", t, rate, score)

    def _reset(self, k: _Key) -> None:
        k.anomaly_id, k.below_since, k.seq = "", None, 0
        k.peak_rate = k.peak_score = 0.0
        k.open_talkers = {}

    def _forget_idle(self, e: int) -> None:
        """Drop keys with no data in the window, no open anomaly and a baseline that decayed to ~0."""
        if e % self.cfg.buckets:
            return
        for table in self._keys.values():
            idle = [v for v, k in table.items()
                    if not k.anomaly_id and not k.buckets and k.mean < self.cfg.min_deviation * 1e-3]
            for v in idle:
                del table[v]

    # ---- output ----------------------------------------------------------------------------------------
    def _emit(self, k: _Key, state: str, t: float, rate: float, score: float) -> dict:
        k.last_update = t
        k.seq += 1
        self.counters[{"open": "opened", "update": "updated", "close": "closed"}[state]] += 1
        return self._record(k, state, t, rate, score)

    def _record(self, k: _Key, state: str, t: float, rate: float, score: float) -> dict:
        t_ns = int(round(t * 1e9))
        w0 = int(round((t - self.cfg.window_s) * 1e9))
        base = (k.mean, k.dev)
        sev = self.cfg.severity(max(score, k.peak_score) if state != "open" else score)
        talkers = self._top_talkers(k)
        anomaly = {
            "id": k.anomaly_id, "state": state, "sequence": k.seq,
            "key": {"signal": k.signal, "dimension": k.dimension, "value": k.value, **k.extra},
            "window": {"start": iso_ns(w0), "end": iso_ns(t_ns), "seconds": self.cfg.window_s},
            "rate": round(rate, 3), "baseline": {"rate": round(base[0], 3), "deviation": round(base[1], 3)},
            "score": round(score, 3), "severity": sev, "peak_rate": round(k.peak_rate, 3),
            "peak_score": round(k.peak_score, 3), "opened_at": iso_ns(int(round(k.opened_at * 1e9))),
            "top_talkers": talkers,
        }
        if state == "close":
            anomaly["closed_at"] = iso_ns(t_ns)
            anomaly["duration_s"] = round(t - k.opened_at, 3)
        ev_type = {"open": ["start"], "update": ["info"], "close": ["end"]}[state]
        rec = {"@timestamp": iso_ns(t_ns), "ecs": {"version": ECS_VERSION},
               "event": {"kind": "alert", "category": ["network"], "type": ev_type, "action": f"anomaly_{state}",
                         "dataset": "hostwall.anomaly", "start": anomaly["opened_at"], "created": created_now(),
                         "severity": list(self.cfg.severity_bands).index(sev) + 1 if sev in self.cfg.severity_bands else 0,
                         "id": hashlib.blake2b(f"{k.anomaly_id}|{state}|{k.seq}".encode(), digest_size=16).hexdigest()},
               "hostwall": {"kind": "anomaly", "schema_version": SCHEMA_VERSION, "anomaly": anomaly},
               "message": (f"{k.signal} anomaly {state}: {k.dimension} {k.value} at {rate:.1f}/s "
                           f"(baseline {base[0]:.1f}/s, score {score:.1f}, {sev})")}
        if state == "close":
            rec["event"]["end"] = anomaly["closed_at"]
        if self.host is not None:
            rec["observer"] = {"hostname": self.host.hostname, "type": "firewall", "product": "hostwall",
                               "vendor": "hostwall", **({"version": self.host.version} if self.host.version else {})}
        self._key_fields(rec, k)
        return rec

    @staticmethod
    def _key_fields(rec: dict, k: _Key) -> None:
        x = k.extra
        if "source_prefix" in x:                      # a prefix, not a host: never source.ip
            rec["source"] = {"address": x["source_prefix"]}
            rec["hostwall"]["source"] = {"prefix": x["source_prefix"]}
        if "port" in x:
            rec["destination"] = {"port": x["port"]}
            rec["network"] = {"transport": x["transport"]}
        if "reason" in x:
            rec["hostwall"]["reason"] = x["reason"]

    @staticmethod
    def close_after_restart(last: dict, now: float) -> dict:
        """A `close` record for an anomaly that was open when the collector that opened it crashed
        (docs/collector.md "Restarts"): made from the anomaly's last record, closed at `now` with
        event.reason "collector restarted". The detector learns its baselines again; if the condition
        persists, a new anomaly (a new id) opens after the warm-up. Pure: O(size of the record)."""
        a = dict(last["hostwall"]["anomaly"])
        seq = int(a.get("sequence", 0)) + 1
        t_ns = int(round(now * 1e9))
        opened = parse_iso_ns(a["opened_at"]) / 1e9
        a.update(state="close", sequence=seq, closed_at=iso_ns(t_ns), duration_s=round(now - opened, 3))
        ev = {**last["event"], "type": ["end"], "action": "anomaly_close", "end": a["closed_at"],
              "reason": "collector restarted", "created": created_now(),
              "id": hashlib.blake2b(f"{a['id']}|close|{seq}".encode(), digest_size=16).hexdigest()}
        rec = {**last, "@timestamp": a["closed_at"], "event": ev,
               "hostwall": {k: v for k, v in last["hostwall"].items() if k not in ("seq", "stream")} | {"anomaly": a},
               "message": f"{a['key'].get('signal')} anomaly close: {a['key'].get('dimension')} "
                          f"{a['key'].get('value')} (the collector restarted; its state is gone)"}
        return rec

    def open_anomalies(self) -> list[dict]:
        return [{"id": k.anomaly_id, "signal": k.signal, "dimension": k.dimension, "value": k.value,
                 "opened_at": k.opened_at} for t in self._keys.values() for k in t.values() if k.anomaly_id]

    @property
    def warm(self) -> bool:
        """Past the global warm-up (or started from saved baselines): anything may open."""
        return self.restored_warm or (self._started is not None and self._evaluated_to is not None and
                                     self._evaluated_to - self._started >= self.cfg.warmup_windows * self.cfg.buckets)

    def stats(self) -> dict:
        return {**self.counters, "keys": sum(len(t) for t in self._keys.values()),
                "open": len(self.open_anomalies()), "warm": self.warm, "baselines_restored": self.restored,
                **({"baselines_note": self.restore_note} if self.restore_note else {})}
