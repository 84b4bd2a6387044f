"""Suite `oncall` (docs/benchmarks.md, docs/alerting.md): time from a flood's first packet to the page.

The lab's real enforcer and collector, a real Prometheus (the project's rules, 1 s scrape and evaluation) and
a real Alertmanager (deploy/alertmanager/alertmanager.yml, group_wait 1 s for Prometheus' alerts, the pushed
incidents' route as deployed: 0 s), a webhook receiver in this process (tests/peers/oncall.py). Each trial: a
fresh Alertmanager (no groups or notification log left from the trial before), a UDP flood from the lab's
attacker's namespace (each trial from a /24 of its own), the time from just before trafgen starts to the webhook receiving the firing notification, then the
flood stops and the trial waits until the anomalies closed and Prometheus has no anomaly alert left.

- time_to_page_direct_*: the collector pushes its incident itself (alerting.alertmanager);
- time_to_page_prometheus_*: the same collector without push — the page comes from the Prometheus rule;
- prometheus_budget_s: scrape + evaluation + group_wait of the run (1 + 1 + 1 s).
Goals: direct max ≤ 2 s; via Prometheus max ≤ prometheus_budget_s + 2 s (the collector's detection).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time

SCRAPE_S, EVAL_S, GROUP_WAIT_S = 1.0, 1.0, 1.0


def _trial(rig, incident: bool, n: int) -> float:
    """Trial n floods from its own /24 (10.66.100+n.0/24, spoofed, denied by default): a new attacker each
    time, so no trial meets the baselines an earlier one left."""
    from tests.peers import wait_until
    rig.restart_alertmanager()
    rig.hook.clear()
    t0 = time.monotonic()
    run = rig.flood(src=f"10.66.{100 + n}.0/24")
    try:
        def page(ns):
            return [n for n in rig.pages() if any(bool(a["labels"].get("incident")) == incident for a in n.alerts)]
        [n, *_] = rig.hook.wait_for(page, timeout=60, what="the page")
    finally:
        run.stop()
    # before the next trial: the anomalies closed, the pushed incident resolved, and Prometheus's alerts gone
    # (a fresh Alertmanager would otherwise get a still-firing alert of this trial and page at once)
    rig.col.wait_status(lambda st: (st.get("anomaly") or {}).get("open") == 0
                        and not (st["anomaly"].get("alerting") or {}).get("incidents_open"), timeout=90)
    wait_until(lambda: rig.prom.query('ALERTS{alertname="HostwallAnomalyHighSeverity"}') == [], 60,
               "Prometheus' anomaly alerts gone")
    return n.received - t0


def run(quick: bool) -> dict:
    from tests.peers.oncall import OncallRig

    trials = 1 if quick else 5
    out: dict[str, float] = {"trials": trials, "prometheus_budget_s": SCRAPE_S + EVAL_S + GROUP_WAIT_S}
    with tempfile.TemporaryDirectory(prefix="hostwall-bench-oncall-") as tmp, \
            OncallRig(tmp, push=True, group_wait=f"{GROUP_WAIT_S:g}s") as rig:
        for path, push in (("direct", True), ("prometheus", False)):
            if rig.push != push:
                rig.start_collector(push)
            rig.wait_warm()
            times = []
            for i in range(trials):
                times.append(_trial(rig, push, i + (trials if push is False else 0)))
                print(f"oncall: {path} trial {i + 1}/{trials}: {times[-1]:.2f} s", file=sys.stderr)
            out[f"time_to_page_{path}_p50_s"] = statistics.median(times)
            out[f"time_to_page_{path}_max_s"] = max(times)
            out[f"time_to_page_{path}_min_s"] = min(times)
    return out


TARGETS = {
    "time_to_page_direct_max_s": ("<= 2 s", lambda m: m["time_to_page_direct_max_s"] <= 2.0),
    "time_to_page_prometheus_max_s": ("<= prometheus_budget_s + 2 s",
                                      lambda m: m["time_to_page_prometheus_max_s"] <= m["prometheus_budget_s"] + 2.0),
}
NOTES = ("Times run from just before trafgen starts (its start-up included) to the webhook's arrival; the "
         "direct path's Alertmanager route has group_wait 0 s as deployed.")
