"""Direct alert push (docs/alerting.md "Direct push" and "One incident, one page"), without Alertmanager:

- correlation: the anomalies one flood opens (source prefix, port, drop reasons, new flows) are one incident
  with one alert naming the source and the targets; two attacks are two; an anomaly that names no source
  joins by its top talkers;
- fingerprint stability: the alert's labels are the same while the incident changes, after a restart that
  restored the state and after one that lost it; a restart resolves nothing while the attack's anomalies open
  again, and resolves after the grace when they do not;
- failure counting: a POST that is refused, times out or gets an HTTP error is counted by reason, retried with
  the newest state and never blocks the caller; a full table refuses and counts;
- baselines: a detector started from the last run's baselines opens on a flood at once, a fresh one only after
  its warm-up;
- the `alerting` config section and the self-metrics it feeds.
"""
from __future__ import annotations

import asyncio
import http.server
import inspect
import threading
import time

import pytest

from hostwall.collector.alert_push import AlertPusher, PushError, http_post
from hostwall.collector.alerting import AlertingDetector
from hostwall.collector.anomaly import AnomalyConfig, AnomalyDetector
from hostwall.collector.config import ConfigError, load_config
from hostwall.collector.incidents import ALERTNAME, Correlator, alert_of, fingerprint
from hostwall.collector.metrics import families_from_status
from hostwall.collector.records import iso_ns

T0 = float(int(time.time()) - 60)          # saved baselines are used up to a day old: keep the test's clock near now
BANDS = AnomalyConfig().severity_bands
CFG = AnomalyConfig(window_s=5, bucket_s=1, warmup_windows=1, quiet_s=3, update_interval_s=2)


def drops(prefix: str, packets: float, t: float, *, reason: str, port: int = 5353, peer: str | None = None) -> dict:
    """One second of a drop summary (collector/records/drops.py shape), with its top peer."""
    hw = {"kind": "drop_summary", "reason": reason, "source": {"prefix": prefix},
          "window": {"start": iso_ns(int(t * 1e9)), "end": iso_ns(int((t + 1) * 1e9))}}
    if peer:
        hw["top_peers"] = [{"ip": peer, "packets": int(packets), "bytes": 64 * int(packets)}]
    return {"@timestamp": iso_ns(int((t + 1) * 1e9)), "event": {"type": ["denied"]},
            "network": {"transport": "udp", "packets": packets}, "destination": {"port": port},
            "source": {"address": prefix}, "hostwall": hw}


def new_flow(src: str, port: int, t: float) -> dict:
    return {"@timestamp": iso_ns(int(t * 1e9)), "event": {"type": ["start"]}, "network": {"transport": "udp"},
            "source": {"ip": src}, "destination": {"port": port}, "hostwall": {"kind": "flow"}}


class Recorder(AlertPusher):
    """An AlertPusher that keeps every alert state put (nothing is posted: there is no loop)."""

    def __init__(self):
        super().__init__("http://127.0.0.1:9", post=lambda *a: None)
        self.puts: list[dict] = []

    def put(self, alert: dict) -> bool:
        self.puts.append(alert)
        return super().put(alert)


def alerting(det: AnomalyDetector, tmp_path=None, *, grace: float = 20.0) -> AlertingDetector:
    corr = Correlator("fw-1", BANDS, min_severity="high", restart_grace_s=grace)
    return AlertingDetector(det, Recorder(), corr, hold_s=60, refresh_interval_s=5, runbook_url="http://r/x.md",
                            labels=(("instance", "fw-1:9464"),),
                            state_path=(tmp_path / "alerts.json") if tmp_path else None)


def background(t: float) -> list[dict]:
    return [drops("10.1.2.0/24", 20, t, reason="default_deny", port=22, peer="10.1.2.9")]


def flood(t: float, prefix: str = "10.9.9.0/24", peer: str = "10.9.9.7", port: int = 5353) -> list[dict]:
    """What one second of a UDP flood from one /24 gives the detector: drops under two reasons, to one port,
    and the one-packet "flows" the budget let through."""
    return [drops(prefix, 40_000, t, reason="udp_flood", port=port, peer=peer),
            drops(prefix, 2_000, t, reason="default_deny", port=port, peer=peer),
            *[new_flow(peer, port, t + i / 200) for i in range(200)]]


def drive(ad: AlertingDetector, start: int, end: int, traffic) -> list[dict]:
    out = []
    for s in range(start, end):
        ad.observe(traffic(T0 + s))
        out += ad.tick(T0 + s + 1)
    return out


def pages(rec: Recorder) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for a in rec.puts:
        by.setdefault(fingerprint(a["labels"]), []).append(a)
    return by


# ---- correlation ---------------------------------------------------------------------------------------

def test_one_flood_opens_many_anomalies_and_one_incident_alert():
    ad = alerting(AnomalyDetector(CFG))
    drive(ad, 0, 12, background)
    recs = drive(ad, 12, 20, lambda t: background(t) + flood(t))
    opened = {(r["hostwall"]["anomaly"]["key"]["signal"], r["hostwall"]["anomaly"]["key"]["dimension"],
               r["hostwall"]["anomaly"]["key"]["value"]) for r in recs if r["hostwall"]["anomaly"]["state"] == "open"}
    assert {("drops", "source_prefix", "10.9.9.0/24"), ("drops", "destination_port", "udp/5353"),
            ("drops", "reason", "udp_flood"), ("flows", "source_prefix", "10.9.9.0/24")} <= opened, opened
    by = pages(ad.pusher)
    assert len(by) == 1, by.keys()                             # one alert, however many keys the flood opened
    [alerts] = by.values()
    first = alerts[0]
    assert first["labels"] == {"alertname": ALERTNAME, "service": "hostwall", "severity": "critical", "host": "fw-1",
                               "incident": "10.9.9.0/24", "dimension": "source_prefix", "key": "10.9.9.0/24",
                               "instance": "fw-1:9464"}
    last = alerts[-1]["annotations"]
    assert {"udp/5353", "reason udp_flood", "reason default_deny"} <= set(last["targets"].split(", "))
    assert last["top_talkers"].startswith("10.9.9.7 (") and last["runbook_url"] == "http://r/x.md"
    assert float(last["peak_rate"].rstrip("/s")) >= 40_000 and last["anomaly_severity"] in ("high", "critical")
    assert ad.stats()["alerting"]["incidents_open"] == 1

    # the flood ends: when the last of its anomalies closes, one resolve (endsAt = the close, not later)
    recs = drive(ad, 20, 40, background)
    closes = [r for r in recs if r["hostwall"]["anomaly"]["state"] == "close"]
    assert len(closes) >= 4
    resolved = [a for a in ad.pusher.puts if a["endsAt"] <= a["startsAt"] or _t(a["endsAt"]) <= T0 + 40]
    assert len(resolved) == 1 and resolved[0]["labels"] == first["labels"]
    assert _t(resolved[0]["endsAt"]) == pytest.approx(max(_iso(r["@timestamp"]) for r in closes))
    assert ad.stats()["alerting"]["incidents_open"] == 0


def test_two_attacks_are_two_incidents_and_a_reason_joins_by_its_top_talker():
    corr = Correlator("fw-1", BANDS)
    a = {"id": "a", "state": "open", "severity": "high", "key": {"signal": "drops", "dimension": "source_prefix",
                                                                  "value": "192.0.2.0/24"}}
    b = {"id": "b", "state": "open", "severity": "critical", "key": {"signal": "drops", "dimension": "source_prefix",
                                                                      "value": "198.51.100.0/24"}}
    reason = {"id": "c", "state": "open", "severity": "critical", "key": {"signal": "drops", "dimension": "reason",
                                                                          "value": "syn_flood"},
              "top_talkers": [{"source": "198.51.100.7", "count": 900}, {"source": "192.0.2.1", "count": 3}]}
    changed = corr.feed([_rec(a), _rec(b)], T0) + corr.feed([_rec(reason)], T0 + 0.5)
    assert sorted(i.key for i in changed) == ["192.0.2.0/24", "198.51.100.0/24", "198.51.100.0/24"]
    assert list(corr.incidents["198.51.100.0/24"].targets) == ["reason syn_flood"]
    assert not corr.incidents["192.0.2.0/24"].targets
    # no source and no talkers: the incident that changed last
    port = {"id": "d", "state": "open", "severity": "high", "key": {"signal": "flows", "dimension": "destination_port",
                                                                     "value": "tcp/443"}}
    corr.feed([_rec(port)], T0 + 1)
    assert "tcp/443" in corr.incidents["198.51.100.0/24"].targets
    # alone on a host, it is an incident of its own
    alone = Correlator("fw-2", BANDS)
    [inc] = alone.feed([_rec(port)], T0)
    assert inc.key == "destination_port:tcp/443" and inc.source is None
    assert alert_of(inc, now=T0, hold_s=60, runbook_url="u")["labels"]["dimension"] == "destination_port"


def test_an_incident_below_min_severity_is_never_posted():
    corr = Correlator("fw-1", BANDS, min_severity="high")
    low = {"id": "a", "state": "open", "severity": "medium",
           "key": {"signal": "drops", "dimension": "source_prefix", "value": "192.0.2.0/24"}}
    [inc] = corr.feed([_rec(low)], T0)
    assert not inc.paging
    [inc] = corr.feed([_rec({**low, "state": "update", "severity": "critical"})], T0 + 1)
    assert inc.paging


# ---- fingerprint stability -------------------------------------------------------------------------

def test_labels_do_not_change_while_the_incident_does_nor_across_restarts(tmp_path):
    corr = Correlator("fw-1", BANDS)
    first = {"id": "a", "state": "open", "severity": "high", "peak_rate": 100.0,
             "key": {"signal": "drops", "dimension": "source_prefix", "value": "203.0.113.0/24"},
             "top_talkers": [{"source": "203.0.113.5", "count": 10, "packets": 10}]}
    [inc] = corr.feed([_rec(first)], T0)
    before = alert_of(inc, now=T0, hold_s=60, runbook_url="u", labels=(("instance", "h:1"),))
    corr.feed([_rec({"id": "b", "state": "open", "severity": "critical", "peak_rate": 9e4,
                     "key": {"signal": "flows", "dimension": "destination_port", "value": "udp/53"},
                     "top_talkers": [{"source": "203.0.113.9", "count": 5000}]})], T0 + 3)
    after = alert_of(inc, now=T0 + 3, hold_s=60, runbook_url="u", labels=(("instance", "h:1"),))
    assert after["labels"] == before["labels"] and after["annotations"] != before["annotations"]
    assert after["startsAt"] == before["startsAt"] and _t(after["endsAt"]) == pytest.approx(T0 + 63)

    restored = Correlator("fw-1", BANDS, restart_grace_s=30)          # a restart that kept the state
    assert restored.restore(corr.state(), T0 + 10) == 1
    again = alert_of(restored.incidents["203.0.113.0/24"], now=T0 + 10, hold_s=60, runbook_url="u",
                     labels=(("instance", "h:1"),))
    assert again["labels"] == before["labels"] and again["startsAt"] == before["startsAt"]
    forgot = Correlator("fw-1", BANDS)                                # a restart that lost it
    [inc2] = forgot.feed([_rec({**first, "id": "z"})], T0 + 20)
    assert fingerprint(alert_of(inc2, now=T0 + 20, hold_s=60, runbook_url="u",
                                labels=(("instance", "h:1"),))["labels"]) == fingerprint(before["labels"])


def test_a_restart_refreshes_the_open_incident_and_resolves_it_only_if_the_attack_does_not_come_back(tmp_path):
    ad = alerting(AnomalyDetector(CFG, state_path=tmp_path / "baselines.json"), tmp_path)
    drive(ad, 0, 12, background)
    drive(ad, 12, 18, lambda t: background(t) + flood(t))
    [labels] = {fingerprint(a["labels"]) for a in ad.pusher.puts}
    assert (tmp_path / "alerts.json").exists() and (tmp_path / "baselines.json").exists()

    # restart during the flood: the new run refreshes the incident at once and its anomalies rejoin it
    ad2 = alerting(AnomalyDetector(CFG, state_path=tmp_path / "baselines.json"), tmp_path)
    assert ad2.inner.warm and ad2.inner.restored > 0
    drive(ad2, 19, 22, lambda t: background(t) + flood(t))
    assert ad2.pusher.puts and {fingerprint(a["labels"]) for a in ad2.pusher.puts} == {labels}
    assert all(_t(a["endsAt"]) > T0 + 22 for a in ad2.pusher.puts)        # never resolved by the restart
    assert ad2.correlator.counters["rejoined"] == 1

    # another restart, and the attack is over: resolved once the grace ran out, not before
    ad3 = alerting(AnomalyDetector(CFG, state_path=tmp_path / "baselines.json"), tmp_path, grace=10)
    drive(ad3, 30, 38, background)
    assert all(_t(a["endsAt"]) > T0 + 38 for a in ad3.pusher.puts)
    drive(ad3, 38, 45, background)
    ends = [_t(a["endsAt"]) for a in ad3.pusher.puts]
    assert min(ends) <= T0 + 45 and sum(e <= T0 + 45 for e in ends) == 1


# ---- failure counting -------------------------------------------------------------------------------

def test_failures_are_counted_by_reason_and_retried_with_the_newest_state():
    outcomes = [PushError("connect", "refused"), PushError("http_500", "boom"), None]
    bodies: list[bytes] = []

    def post(url, body, timeout):
        bodies.append(body)
        err = outcomes.pop(0) if outcomes else None
        if err:
            raise err

    async def main():
        p = AlertPusher("http://am:9093", post=post, retry_cap_s=0.05)
        p.start()
        assert not inspect.iscoroutinefunction(p.put)                          # put never waits: it cannot
        assert p.put(_alert("x", ends=time.time() + 60))                       # yield, so nothing was posted
        assert p.put(_alert("x", ends=time.time() + 60, summary="newer"))      # between these (no wall-clock
        assert bodies == [] and p.waiting == 1                                 # bound: a loaded box preempts)
        await _until(lambda: p.waiting == 0 and p.stats()["posts"] == 1)
        await p.close()
        return p
    p = asyncio.run(main())
    st = p.stats()
    assert st["failures"] == {"connect": 1, "http_500": 1} and st["state"] == "ok" and st["alerts_posted"] == 1
    assert b"newer" in bodies[-1] and bodies[-1].count(b'"alertname"') == 1
    assert p.url == "http://am:9093/api/v2/alerts"


def test_a_slow_alertmanager_times_out_and_a_full_table_refuses():
    release = threading.Event()

    def hang(url, body, timeout):
        release.wait(5)

    async def main():
        p = AlertPusher("http://am:9093", post=hang, timeout_s=0.2, max_alerts=2, retry_cap_s=0.05)
        p.start()
        assert p.put(_alert("a")) and p.put(_alert("b"))
        assert not p.put(_alert("c"))                                         # refused, counted
        await _until(lambda: p.failures["timeout"] >= 1)
        release.set()
        await p.close()
        return p
    p = asyncio.run(main())
    assert p.stats()["failures"]["queue_full"] == 1 and p.stats()["failures"]["timeout"] >= 1
    assert "no answer within 0.2s" in p.stats()["last_error"]


def test_http_post_classifies_real_http_failures():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            code = 400 if self.path.startswith("/bad") else 200
            self.send_response(code)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"no!" if code == 400 else b"ok\n")

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    silent = __import__("socket").socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)                                                          # accepts, never answers
    try:
        port = srv.server_address[1]
        http_post(f"http://127.0.0.1:{port}/api/v2/alerts", b"[]", 2)
        with pytest.raises(PushError) as e:
            http_post(f"http://127.0.0.1:{port}/bad", b"[]", 2)
        assert e.value.reason == "http_400" and "no!" in str(e.value)
        free = __import__("socket").socket()
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
        free.close()
        with pytest.raises(PushError) as e:
            http_post(f"http://127.0.0.1:{closed}/", b"[]", 2)
        assert e.value.reason == "connect"
        with pytest.raises(PushError) as e:
            http_post(f"http://127.0.0.1:{silent.getsockname()[1]}/", b"[]", 0.3)
        assert e.value.reason == "timeout"
    finally:
        silent.close()
        srv.shutdown()
        srv.server_close()


# ---- baselines --------------------------------------------------------------------------------------

def test_a_restarted_detector_is_not_blind(tmp_path):
    path = tmp_path / "baselines.json"
    det = AnomalyDetector(CFG, state_path=path)
    for s in range(12):
        det.observe(background(T0 + s))
        det.tick(T0 + s + 1)
    assert det.warm and path.exists()

    def opens(d, start):
        out = []
        for s in range(start, start + 3):
            d.observe(background(T0 + s) + flood(T0 + s))
            out += [r for r in d.tick(T0 + s + 1) if r["hostwall"]["anomaly"]["state"] == "open"]
        return out
    restarted = AnomalyDetector(CFG, state_path=path)
    assert restarted.restored >= 1 and restarted.stats()["warm"]
    assert opens(restarted, 13), "a detector with saved baselines opens within its first windows"
    blind = AnomalyDetector(CFG)
    assert not opens(blind, 13) and not blind.warm                          # the warm-up the baselines avoid
    other = AnomalyDetector(AnomalyConfig(window_s=10, bucket_s=1), state_path=path)
    assert other.restored == 0 and "other window" in other.stats()["baselines_note"]
    young = tmp_path / "young.json"                     # saved during its own warm-up: the next run warms up too
    d = AnomalyDetector(CFG, state_path=young)
    d.observe(background(T0))
    d.tick(T0 + 1)
    assert not AnomalyDetector(CFG, state_path=young).warm


# ---- config and metrics ------------------------------------------------------------------------------

def test_alerting_config_is_typed_and_checked(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("metrics: {prometheus: '127.0.0.1:9464'}\n"
                 "alerting: {alertmanager: 'http://127.0.0.1:9093/', refresh_interval: 5s, hold: 1m,\n"
                 "           labels: {team: edge}}\n")
    cfg = load_config(f, env={})
    assert cfg.alerting.alertmanager == "http://127.0.0.1:9093" and cfg.alerting.hold_s == 60
    from hostwall.collector.alerting import default_labels
    assert default_labels(cfg) == (("instance", "127.0.0.1:9464"), ("team", "edge"))
    f.write_text("alerting: {alertmanager: 'am:9093', labels: {__x: y}, min_severity: severe, max_alerts: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={"HOSTWALL_COLLECTOR_ALERTING_TIMEOUT": "30s"})
    msg = str(e.value)
    for part in ("alerting.alertmanager: 'am:9093' is not http(s)://HOST:PORT", "alerting.labels: label name '__x'",
                 "alerting.min_severity: 'severe' is not a band", "alerting.max_alerts: 0 is out of range",
                 "environment HOSTWALL_COLLECTOR_ALERTING_TIMEOUT: alerting.timeout: 30s must be > 0 and shorter"):
        assert part in msg, msg


def test_self_metrics_of_the_push_and_the_loss_classes():
    st = {"anomaly": {"alerting": {"state": "failing", "alerts_posted": 7, "failures": {"timeout": 2, "http_500": 1}, "waiting": 1,
                                   "incidents_open": 3, "incidents_paging": 1}},
          "ledger": {"lost_by_stage": {"kernel": {"budget": 1211, "ringbuf_full": 4}}}}
    fams = {f.prom: f for f in families_from_status(st)}
    assert fams["hostwall_alert_push_alerts"].samples == [((), 7)]
    assert sorted(fams["hostwall_alert_push_failures"].samples) == [(("http_500",), 1), (("timeout",), 2)]
    assert fams["hostwall_alert_push_healthy"].samples == [((), 0)]        # the backstop rule fires again
    assert sorted(fams["hostwall_incidents_open"].samples) == [(("false",), 2), (("true",), 1)]
    assert sorted(fams["hostwall_records_lost"].samples) == [(("kernel", "budget", "", "shed"), 1211),
                                                              (("kernel", "ringbuf_full", "", "lost"), 4)]


# ---- helpers ------------------------------------------------------------------------------------------

def _rec(a: dict) -> dict:
    return {"hostwall": {"kind": "anomaly", "anomaly": a}}


def _alert(name: str, *, ends: float | None = None, summary: str = "") -> dict:
    return {"labels": {"alertname": name}, "annotations": {"summary": summary},
            "endsAt": iso_ns(int((ends or time.time() + 60) * 1e9))}


def _iso(s: str) -> float:
    from hostwall.collector.records import parse_iso_ns
    return parse_iso_ns(s) / 1e9


def _t(rfc: str) -> float:
    import datetime as dt
    return dt.datetime.fromisoformat(rfc.replace("Z", "+00:00")).timestamp()


async def _until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
