"""On-call end to end (docs/alerting.md): the lab's real enforcer and collector, a real Prometheus with the
project's rules and a real Alertmanager with deploy/alertmanager/alertmanager.yml, a webhook receiver in the test
(tests/peers/oncall.py). The collector pushes its incidents itself (alerting.alertmanager).

- normal traffic pages nobody;
- a flood from the attacker's /24 is exactly one firing notification, for that /24, with the labels and runbook
  an on-call engineer needs — although it opens anomalies on several keys, and although the collector is
  restarted in the middle of it (no second page, no resolve-and-fire) — and one resolved notification after it;
- a flood to an allowed port makes the kernel shed sampled events over the event budget: counted
  (class="shed"), and no HostwallRecordsLost page;
- with the collector down (killed during that flood), HostwallCollectorDown fires and the pushed incident and the
  anomaly alerts of that host are held back: no notification for them.

Every wait is on what the receiver, Alertmanager or the collector's status shows, with a deadline.
"""
from __future__ import annotations

import time

import pytest

from tests.peers import PeerNotInstalled
from tests.peers.oncall import ATTACKER_PREFIX, PAGE, OncallRig

pytestmark = [pytest.mark.peers, pytest.mark.timeout(420)]
RUNBOOK = "http://127.0.0.1:9090/user/HostwallAnomalyHighSeverity.md"
ALLOWED_PREFIX = "10.66.2.0/24"                 # may send to udp/5353 (examples/policy.yaml)


@pytest.fixture
def rig(lab_ok, tmp_path):
    try:
        with OncallRig(tmp_path, push=True) as r:
            yield r
    except PeerNotInstalled as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def lab_ok():
    from hostwall.lab.netns import lab_available
    ok, why = lab_available()
    if not ok:
        pytest.skip(f"netns lab unavailable: {why}")


def alertnames(ns) -> list[str]:
    return sorted(a["labels"]["alertname"] for n in ns for a in n.alerts)


def test_one_flood_one_page_through_a_restart_and_quiet_while_the_collector_is_down(rig: OncallRig):
    rig.wait_warm()
    # ---- normal traffic: nothing
    r = rig.normal_traffic()
    assert r["ok"] == r["count"], r
    rig.quiesce()
    assert rig.notifications(receiver=None) == [], [n.body for n in rig.notifications(receiver=None)]

    # ---- the flood: one page for the attacker's /24
    run = rig.flood()
    try:
        t0 = time.monotonic()
        [page] = rig.hook.wait_for(lambda ns: rig.pages(), timeout=30, what="the page")
        took = page.received - t0
        [a] = page.alerts
        assert page.receiver == PAGE
        assert a["labels"]["alertname"] == "HostwallAnomalyHighSeverity" and a["labels"]["incident"] == ATTACKER_PREFIX
        assert {k: a["labels"][k] for k in ("dimension", "key", "severity", "service", "instance")} == {
            "dimension": "source_prefix", "key": ATTACKER_PREFIX, "severity": "critical", "service": "hostwall",
            "instance": rig.target}
        assert a["labels"]["host"] and a["annotations"]["runbook_url"] == RUNBOOK
        assert took < 10, f"{took:.1f}s from the flood's start to the page"

        # a restart in the middle of the flood: the new run posts the same alert again (no new page)
        before = rig.col.wait_status(lambda s: (s.get("anomaly") or {}).get("alerting", {}).get("alerts_posted", 0)
                                     >= 1, timeout=10)["anomaly"]["alerting"]        # the status file lags a little
        assert before["failures"] == {}, before
        rig.restart_collector()
        st = rig.col.wait_status(lambda s: (s.get("anomaly") or {}).get("alerting", {}).get("rejoined", 0) >= 1
                                 and s["anomaly"]["alerting"]["alerts_posted"] >= 1, timeout=30)
        assert st["anomaly"]["warm"], st["anomaly"].get("baselines_note")       # not blind after the restart
        # the refreshed alert names the targets and the top talkers (annotations: the labels stay as paged)
        [inc] = rig.am.wait_for_alerts(lambda al: [x for x in al if x["labels"].get("incident") == ATTACKER_PREFIX
                                                   and "udp/5353" in x["annotations"]["targets"]
                                                   and x["annotations"]["top_talkers"] != "-"], what="the incident")
        assert inc["annotations"]["top_talkers"].startswith("10.66.3.") and inc["labels"] == a["labels"]
    finally:
        run.stop()
    # ---- after the flood: one resolved notification
    [resolved] = rig.hook.wait_for(lambda ns: rig.pages("resolved"), timeout=90, what="the resolved notification")
    assert [x["labels"]["incident"] for x in resolved.alerts] == [ATTACKER_PREFIX]
    rig.quiesce()
    assert len(rig.pages()) == 1 and len(rig.pages("resolved")) == 1, alertnames(rig.pages() + rig.pages("resolved"))
    assert rig.notifications(receiver=None) == rig.pages() + rig.pages("resolved"), \
        alertnames(rig.notifications(receiver=None))

    # ---- a flood to an allowed port: the kernel sheds sampled events over the budget — counted, not paged;
    # then the collector dies: HostwallCollectorDown, and this host's anomaly alerts are held back
    seen = len(rig.hook.notifications)
    run = rig.flood(src=ALLOWED_PREFIX)
    try:
        [page] = rig.hook.wait_for(lambda ns: [n for n in rig.pages() if
                                               n.alerts[0]["labels"].get("incident") == ALLOWED_PREFIX],
                                   timeout=30, what="the allowed-port flood's page")
        rig.prom.wait_for_query('hostwall_records_lost_total{stage="kernel", reason="budget", class="shed"} > 0',
                                timeout=30)
        rig.quiesce()
        new = [n for n in rig.hook.notifications[seen:] if "HostwallTestSentinel" not in alertnames([n])]
        assert new == [page], [(n.status, alertnames([n])) for n in new]      # no HostwallRecordsLost
        seen = len(rig.hook.notifications)
        rig.col.proc.kill()
        down = rig.hook.wait_for(lambda ns: [n for n in ns[seen:] if "HostwallCollectorDown" in alertnames([n])],
                                 timeout=90, what="HostwallCollectorDown")
        assert down[0].status == "firing" and down[0].alerts[0]["labels"]["instance"] == rig.target
        down_fp = next(x["fingerprint"] for x in rig.am.alerts() if x["labels"]["alertname"] == "HostwallCollectorDown")
        held = rig.am.wait_for_alerts(lambda al: [x for x in al if x["labels"].get("incident") == ALLOWED_PREFIX
                                                  and x["status"]["state"] == "suppressed"], what="the held-back incident")
        assert held[0]["status"]["inhibitedBy"] == [down_fp]
    finally:
        run.stop()
    rig.quiesce()
    after = [n for n in rig.hook.notifications[seen:] if "HostwallTestSentinel" not in alertnames([n])]
    assert alertnames(after) == ["HostwallCollectorDown"], [(n.status, alertnames([n])) for n in after]
