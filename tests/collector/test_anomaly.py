"""AnomalyDetector: window math, open/update/close, no anomaly for steady traffic, config validation.

Synthetic drop summaries and flow starts at a known wall-clock time; tick() is driven explicitly."""
from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest

from hostwall.collector.anomaly import AnomalyConfig, AnomalyConfigError, AnomalyDetector
from hostwall.collector.enrich.host import HostInfo
from hostwall.collector.records import iso_ns

T0 = 1_700_000_000.0
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "anomaly.schema.json").read_text())


def summary(prefix: str, packets: float, t0: float, t1: float, reason="default_deny", port=22, transport="tcp",
            peers: list[tuple[str, int]] = ()) -> dict:
    """A drop summary as collector/records/drops.py makes it; peers: (ip, packets) of hostwall.top_peers."""
    rec = {"@timestamp": iso_ns(int(t1 * 1e9)), "event": {"type": ["denied"]},
           "network": {"transport": transport, "packets": packets},
           "destination": {"port": port}, "source": {"address": prefix},
           "hostwall": {"kind": "drop_summary", "reason": reason, "source": {"prefix": prefix},
                        "window": {"start": iso_ns(int(t0 * 1e9)), "end": iso_ns(int(t1 * 1e9))}}}
    if peers:
        rec["hostwall"]["top_peers"] = [{"ip": ip, "packets": n, "bytes": 60 * n} for ip, n in peers]
    return rec


def flow_start(src: str, port: int, t: float) -> dict:
    return {"@timestamp": iso_ns(int(t * 1e9)), "event": {"type": ["start"]},
            "network": {"transport": "tcp"}, "source": {"ip": src}, "destination": {"port": port},
            "hostwall": {"kind": "flow"}}


def run(det: AnomalyDetector, seconds: int, per_second) -> list[dict]:
    """Feed per_second(s) -> records for each second s, ticking at the end of each second."""
    out = []
    for s in range(seconds):
        det.observe(per_second(s))
        out += det.tick(T0 + s + 1)
    return out


_STEADY_RNG = random.Random(7)


def steady(s, rng=_STEADY_RNG):
    return [summary("10.1.2.0/24", max(0, round(rng.gauss(200, 20))), T0 + s, T0 + s + 1),
            summary("10.1.3.0/24", max(0, round(rng.gauss(60, 8))), T0 + s, T0 + s + 1, reason="policy_deny", port=80)]


def anomaly_records() -> list[dict]:
    """A steady background plus a 60 s SYN flood from a new /24: open, updates, close."""
    det = AnomalyDetector(AnomalyConfig(), host=HostInfo("fw-1", version="0.1.0"))
    rng = random.Random(3)

    def traffic(s):
        recs = steady(s, rng)
        if 120 <= s < 180:
            recs.append(summary("10.9.9.0/24", 5000, T0 + s, T0 + s + 1, reason="syn_flood", port=443,
                                peers=[("10.9.9.7", 4000), ("10.9.9.8", 900), ("10.9.9.9", 100)]))
        return recs
    return run(det, 300, traffic)


# --------------------------------------------------------------------------------------------- tests

def test_window_rate_spreads_intervals_over_buckets():
    det = AnomalyDetector(AnomalyConfig(window_s=4, bucket_s=1, min_rate=1))
    det.observe([summary("10.0.0.0/24", 400, T0 + 0.5, T0 + 2.5)])     # 100 per 0.5 s .. 2.5 s
    det.tick(T0 + 0.9)
    k = det._keys[("drops", "source_prefix")]["10.0.0.0/24"]
    assert k.buckets == {int(T0): 100.0, int(T0) + 1: 200.0, int(T0) + 2: 100.0}
    assert det._window_rate(k, int(T0) + 3) == pytest.approx(400 / 4)
    assert det._window_rate(k, int(T0) + 5) == pytest.approx(300 / 4)    # [T0+1, T0+5)
    assert det._window_rate(k, int(T0) + 6) == pytest.approx(100 / 4)    # only the last bucket remains


def test_prefixes_are_remasked_to_the_configured_length():
    det = AnomalyDetector(AnomalyConfig())
    det.observe([summary("10.0.7.9/32", 1, T0, T0 + 1), flow_start("2001:db8:1:2:3::9", 80, T0)])
    assert "10.0.7.0/24" in det._keys[("drops", "source_prefix")]
    assert "2001:db8:1:2::/64" in det._keys[("flows", "source_prefix")]
    assert "tcp/80" in det._keys[("flows", "destination_port")]


def test_steady_normal_traffic_opens_nothing():
    det = AnomalyDetector(AnomalyConfig())
    assert run(det, 900, steady) == []
    assert det.stats()["opened"] == 0 and det.stats()["keys"] >= 6


def test_flood_opens_updates_and_closes_with_everything_the_record_needs():
    recs = anomaly_records()
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    v = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    for r in recs:
        assert not list(v.iter_errors(r)), [e.message for e in v.iter_errors(r)]
    by_key: dict = {}
    for r in recs:
        a = r["hostwall"]["anomaly"]
        by_key.setdefault((a["key"]["dimension"], a["key"]["value"]), []).append(a)
    assert set(by_key) == {("source_prefix", "10.9.9.0/24"), ("destination_port", "tcp/443"), ("reason", "syn_flood")}
    for seq in by_key.values():
        states = [a["state"] for a in seq]
        assert states[0] == "open" and states[-1] == "close" and set(states[1:-1]) == {"update"}
        assert len({a["id"] for a in seq}) == 1
        assert [a["sequence"] for a in seq] == list(range(1, len(seq) + 1))
        opened, closed = seq[0], seq[-1]
        assert opened["window"]["end"] == "2023-11-14T22:15:21.000000Z"          # first bucket of the flood
        assert opened["baseline"]["rate"] == 0 and opened["rate"] >= 50
        assert max(a["rate"] for a in seq) == pytest.approx(5000)
        assert closed["peak_rate"] == pytest.approx(5000) and closed["severity"] == "critical"
        # individual sources with integer counts over the whole anomaly: 60 s of the flood
        assert closed["top_talkers"] == [{"source": "10.9.9.7", "count": 240000, "packets": 240000, "bytes": 14400000},
                                         {"source": "10.9.9.8", "count": 54000, "packets": 54000, "bytes": 3240000},
                                         {"source": "10.9.9.9", "count": 6000, "packets": 6000, "bytes": 360000}]
        assert opened["top_talkers"][0] == {"source": "10.9.9.7", "count": 4000, "packets": 4000, "bytes": 240000}
        # flood ends at T0+180; the window drains by +190; quiet_s = 30 → close at +220
        assert closed["closed_at"] == iso_ns(int((T0 + 220) * 1e9))
    assert len({r["event"]["id"] for r in recs}) == len(recs)
    assert all(r["observer"]["hostname"] == "fw-1" for r in recs)
    # keyed by a prefix: the CIDR in source.address and hostwall.source.prefix, never in source.ip
    pre = [r for r in recs if r["hostwall"]["anomaly"]["key"]["dimension"] == "source_prefix"]
    assert pre and all(r["source"] == {"address": "10.9.9.0/24"} and r["hostwall"]["source"] == {"prefix": "10.9.9.0/24"}
                       for r in pre)
    assert all("source" not in r for r in recs if r not in pre)


def test_spike_over_a_learned_baseline_and_minimum_rate_gate():
    cfg = AnomalyConfig(min_rate=100)
    det = AnomalyDetector(cfg)

    def traffic(s):
        n = 30 if not 200 <= s < 230 else (90 if s < 215 else 3000)
        return [summary("10.5.5.0/24", n, T0 + s, T0 + s + 1)]
    recs = run(det, 300, traffic)
    opened = [r for r in recs if r["hostwall"]["anomaly"]["state"] == "open"]
    # 90/s (3x the baseline) stays under min_rate 100 (and is learned); 3000/s opens
    assert len(opened) == 3 and all(30 < r["hostwall"]["anomaly"]["baseline"]["rate"] < 90 for r in opened)
    assert {r["@timestamp"] for r in opened} == {iso_ns(int((T0 + 216) * 1e9))}


def test_flow_signal_connection_burst():
    det = AnomalyDetector(AnomalyConfig(dimensions=("destination_port",), signals=("flows",)))

    def traffic(s):
        n = 2 if not 100 <= s < 110 else 400
        return [flow_start(f"10.7.{i % 200}.{i % 250}", 8443, T0 + s + i / (n + 1)) for i in range(n)]
    recs = run(det, 200, traffic)
    assert [r["hostwall"]["anomaly"]["state"] for r in recs][0] == "open"
    assert recs[0]["hostwall"]["anomaly"]["key"] == {"signal": "flows", "dimension": "destination_port",
                                                     "value": "tcp/8443", "transport": "tcp", "port": 8443}
    talkers = recs[0]["hostwall"]["anomaly"]["top_talkers"]
    assert len(talkers) == 5 and all(isinstance(t["count"], int) and "/" not in t["source"] for t in talkers)


def test_keys_are_bounded_and_evictions_counted():
    det = AnomalyDetector(AnomalyConfig(max_keys=10, dimensions=("source_prefix",)))
    det.observe([summary(f"10.{i}.0.0/24", 1, T0, T0 + 1) for i in range(25)])
    assert det.stats()["keys"] == 10 and det.stats()["evicted_keys"] == 15


def test_late_and_too_late_data_are_counted():
    det = AnomalyDetector(AnomalyConfig(window_s=10))
    det.tick(T0 + 100)
    det.observe([summary("10.0.0.0/24", 5, T0 + 95, T0 + 96), summary("10.0.0.0/24", 5, T0 + 10, T0 + 11)])
    assert det.stats()["late"] == 1 and det.stats()["too_late"] == 1


def test_config_lists_every_error():
    with pytest.raises(AnomalyConfigError) as ei:
        AnomalyConfig.from_dict({"window_s": 0, "bucket_s": "1s", "ewma_alpha": 1.5, "score_treshold": 3,
                                 "max_keys": 2.5, "dimensions": ["source_prefix", "asn"],
                                 "severity_bands": {"low": 10, "high": 10}, "top_talkers": 99})
    errs = "\n".join(ei.value.errors)
    for needle in ("window_s: must be > 0", "bucket_s: must be a finite number", "ewma_alpha: must be in (0, 1]",
                   "score_treshold: unknown setting", "max_keys: must be an integer", "dimensions: unknown 'asn'",
                   "two bands share a minimum score", "top_talkers: must be 0..talkers_tracked",
                   "lowest band (10) is above score_threshold"):
        assert needle in errs, needle
    assert len(ei.value.errors) == 9


def test_config_from_dict_accepts_a_valid_mapping():
    cfg = AnomalyConfig.from_dict({"window_s": 30, "bucket_s": 5, "min_rate": 10, "dimensions": ["reason"],
                                   "severity_bands": {"warn": 4, "page": 20}, "score_threshold": 4})
    assert cfg.buckets == 6 and cfg.dimensions == ("reason",)
    assert cfg.severity(5) == "warn" and cfg.severity(25) == "page"
    with pytest.raises(AnomalyConfigError):
        AnomalyConfig.from_dict({"window_s": 10, "bucket_s": 3})             # not a whole multiple
