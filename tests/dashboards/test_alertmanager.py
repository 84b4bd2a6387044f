"""deploy/alertmanager/alertmanager.yml, checked by amtool and run by a real Alertmanager (docs/alerting.md):

- `amtool check-config` accepts it (and rejects a broken copy); the commented pager / chat examples are valid
  config once uncommented; `amtool config routes test` sends every rule of dashboards/alerts/hostwall.rules.yml
  to the receiver its severity calls for;
- a real Alertmanager on that file, its receivers pointed at a webhook receiver in the test, shows the
  grouping (one flood from one /24 on one host is one notification, whatever the keys it opens) and the
  inhibition (HostwallCollectorDown of host A holds back A's loss, spool, sink and anomaly alerts, not B's;
  HostwallEnforcerDetached holds back map pressure) with alerts posted to its API v2 as Prometheus posts them;
- end to end: a real Prometheus evaluating the project's rules on a scraped flood sends them to that
  Alertmanager, and the receiver gets one page with the runbook links, then one resolved notification.

Every wait is on what the receiver or the API shows, never a fixed sleep (tests.peers.alertmanager).
"""
from __future__ import annotations

import http.server
import re
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import yaml

from tests.peers import PeerNotInstalled, free_ports
from tests.peers.alertmanager import Alertmanager, Notification, WebhookReceiver, alert, amtool, rfc3339

from .test_runbooks import ROOT, RULES, rules

CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
PLACEHOLDER = "http://127.0.0.1:9099/"          # the receivers' URL in the deployed file (RECEIVER_URL)
EXAMPLE = re.compile(r"^(\s+)# ((?:[a-z_]+:|- |\s).*)$")   # an indented, commented-out YAML line
A, B = "host-a.example:9464", "host-b.example:9464"

pytestmark = pytest.mark.timeout(240)


def run_amtool(*args) -> tuple[int, str, str]:
    """(exit status, stdout, stdout + stderr) of amtool ARGS."""
    try:
        r = amtool(*args)
    except PeerNotInstalled as e:
        pytest.fail(str(e), pytrace=False)
    return r.returncode, r.stdout, r.stdout + r.stderr


def deployed() -> dict:
    return yaml.safe_load(CONFIG.read_text())


# ---- static checks ---------------------------------------------------------------------------------------

def test_amtool_check_config():
    rc, _, out = run_amtool("check-config", CONFIG)
    assert rc == 0 and "SUCCESS" in out, out
    doc = deployed()
    assert f" - {len(doc['receivers'])} receivers" in out and f" - {len(doc['inhibit_rules'])} inhibit rules" in out


def test_amtool_rejects_a_broken_copy(tmp_path):
    broken = tmp_path / "alertmanager.yml"
    broken.write_text(CONFIG.read_text().replace("receiver: hostwall-page", "receiver: no-such-receiver", 1))
    rc, _, out = run_amtool("check-config", broken)
    assert rc != 0 and "no-such-receiver" in out, out


def test_the_commented_examples_are_valid_config(tmp_path):
    text = "\n".join(EXAMPLE.sub(r"\1\2", line) for line in CONFIG.read_text().splitlines()) + "\n"
    copy = tmp_path / "alertmanager.yml"
    copy.write_text(text)
    rc, _, out = run_amtool("check-config", copy)
    assert rc == 0, out
    receivers = {r["name"]: r for r in yaml.safe_load(text)["receivers"]}
    assert {"pagerduty_configs", "opsgenie_configs"} <= set(receivers["hostwall-page"])
    assert {"slack_configs", "email_configs"} <= set(receivers["hostwall-ticket"])
    assert all(r["webhook_configs"][0]["url"].startswith(PLACEHOLDER) for r in receivers.values())


def expected_receiver(labels: dict) -> str:
    if labels.get("service") != "hostwall":
        return "default"
    return {"critical": "hostwall-page", "warning": "hostwall-ticket"}[labels["severity"]]


@pytest.mark.parametrize("labels", [{"alertname": n, **r["labels"]} for n, r in rules().items()]
                         + [{"alertname": "NodeDown", "severity": "critical", "service": "node"}],
                         ids=lambda labels: labels["alertname"])
def test_every_rule_is_routed_by_service_and_severity(labels):
    rc, receivers, out = run_amtool("config", "routes", "test", f"--config.file={CONFIG}",
                                    *[f"{k}={v}" for k, v in labels.items()])
    assert rc == 0, out
    assert receivers.split() == [expected_receiver(labels)], out


# ---- a real Alertmanager on the deployed file -----------------------------------------------------------

def as_tested(receiver_url: str) -> str:
    """The deployed file with two changes, by substitution so the rest is exactly what is deployed:
    - every receiver posts to this test's webhook receiver instead of the placeholder;
    - group_wait becomes 1s and group_interval 2s (deployed: 5-30 s and 5 min) so a test waits seconds.
    Routing, grouping and inhibition do not depend on those waits; repeat_interval stays as deployed, so a
    notification is never repeated within a test."""
    text = CONFIG.read_text()
    assert text.count(PLACEHOLDER) == len(deployed()["receivers"]), "every receiver uses the placeholder URL"
    text = text.replace(PLACEHOLDER, receiver_url.rstrip("/") + "/")
    text, waits = re.subn(r"(group_wait:\s*)\S+", r"\g<1>1s", text)
    text, intervals = re.subn(r"(group_interval:\s*)\S+", r"\g<1>2s", text)
    assert waits >= 3 and intervals >= 3
    return text


@pytest.fixture
def am(alertmanager_factory, webhook_receiver: WebhookReceiver) -> Alertmanager:
    return alertmanager_factory(as_tested(webhook_receiver.url))


def rule_alert(name: str, instance: str, **labels: str) -> dict:
    """An alert of rule `name` as Prometheus would send it: the rule's labels, job and instance, and the
    rule's runbook_url (the other annotations are templates Prometheus would fill in)."""
    r = rules()[name]
    return alert(name, job="hostwall", instance=instance, **r["labels"], **labels,
                 annotations={"runbook_url": r["annotations"]["runbook_url"]})


def anomaly(instance: str, signal: str, dimension: str, key: str, band: str = "high", **extra: str) -> dict:
    return rule_alert("HostwallAnomalyHighSeverity", instance, signal=signal, dimension=dimension, key=key,
                      anomaly_severity=band, **extra)


def quiesce(am: Alertmanager, hook: WebhookReceiver) -> None:
    """Post a sentinel alert in a group of its own and wait for its notification. Every group that existed
    before it was flushed at least one group_wait earlier, so whatever those groups were going to send has
    arrived by then: after this, "no other notification" is an observation, not a guess."""
    instance = f"sentinel-{uuid.uuid4().hex[:8]}"
    am.post_alerts([alert("HostwallTestSentinel", service="hostwall", severity="warning", instance=instance)])
    hook.wait_for(lambda ns: [n for n in ns if instance in n.alert_labels("instance")], what="the sentinel")


def notified(hook: WebhookReceiver, *, status: str = "firing") -> list[Notification]:
    return [n for n in hook.notifications
            if n.status == status and "HostwallTestSentinel" not in n.alert_labels("alertname")]


def test_one_flood_is_one_notification(am: Alertmanager, webhook_receiver: WebhookReceiver):
    """A flood from 203.0.113.0/24 opens anomalies on its prefix (drops and flows: the same key twice), the
    port it hits and the drop reasons it causes; all of them on host A are one page. Host B's anomaly is
    another page, and so are two incidents on one host when the alerts say which attack they belong to."""
    flood = [anomaly(A, "drops", "source_prefix", "203.0.113.0/24"),
             anomaly(A, "flows", "source_prefix", "203.0.113.0/24"),
             anomaly(A, "drops", "destination_port", "udp/5353", "critical"),
             anomaly(A, "drops", "reason", "udp_flood", "critical"),
             anomaly(A, "drops", "reason", "default_deny"),
             anomaly(A, "drops", "reason", "banned")]
    other_host = [anomaly(B, "drops", "source_prefix", "198.51.100.0/24")]
    c = "host-c.example:9464"
    incidents = [anomaly(c, "drops", "source_prefix", "192.0.2.0/24", incident="192.0.2.0/24"),
                 anomaly(c, "drops", "source_prefix", "198.18.0.0/24", incident="198.18.0.0/24")]
    am.post_alerts(flood + other_host + incidents)
    webhook_receiver.wait_for(lambda ns: len(notified(webhook_receiver)) >= 4, what="the anomaly pages")
    quiesce(am, webhook_receiver)

    pages = notified(webhook_receiver)
    by_host: dict[str, list[Notification]] = {}
    for n in pages:
        assert n.receiver == "hostwall-page", n.body
        by_host.setdefault(n.body["groupLabels"]["instance"], []).append(n)
    assert {h: len(ns) for h, ns in by_host.items()} == {A: 1, B: 1, c: 2}
    [page] = by_host[A]
    assert page.body["groupLabels"] == {"instance": A}                 # not per alertname, key or reason
    assert sorted(page.alert_labels("key")) == sorted(a["labels"]["key"] for a in flood)
    assert page.body["commonLabels"]["severity"] == "critical"
    assert {a["annotations"]["runbook_url"] for a in page.alerts} == {
        rules()["HostwallAnomalyHighSeverity"]["annotations"]["runbook_url"]}
    assert sorted(n.body["groupLabels"]["incident"] for n in by_host[c]) == ["192.0.2.0/24", "198.18.0.0/24"]


def test_inhibition_by_collector_down_and_enforcer_detached(am: Alertmanager, webhook_receiver: WebhookReceiver):
    sources = [rule_alert("HostwallCollectorDown", A),
               rule_alert("HostwallEnforcerDetached", A, interface="eth0", netns="", hook="xdp")]
    held_back = [rule_alert("HostwallRecordsLost", A, stage="kernel", reason="budget"),
                 rule_alert("HostwallSpoolGrowing", A, sink="kafka://127.0.0.1:9092"),
                 rule_alert("HostwallSinkFailing", A, sink="kafka://127.0.0.1:9092"),
                 rule_alert("HostwallSpoolNearlyFull", A, sink="kafka://127.0.0.1:9092"),
                 anomaly(A, "drops", "source_prefix", "203.0.113.0/24"),
                 rule_alert("HostwallMapPressureHigh", A, map="hw_ct4")]
    other_host = [rule_alert("HostwallRecordsLost", B, stage="kernel", reason="budget"),
                  rule_alert("HostwallMapPressureHigh", B, map="hw_ct4")]
    am.post_alerts(sources + held_back + other_host)

    def pairs() -> set[tuple[str, str]]:
        return {(a["labels"]["alertname"], a["labels"]["instance"]) for n in notified(webhook_receiver)
                for a in n.alerts}
    expected = {(a["labels"]["alertname"], a["labels"]["instance"]) for a in sources + other_host}
    webhook_receiver.wait_for(lambda ns: pairs() >= expected, what=f"notifications of {sorted(expected)}")

    # Alertmanager says why the others are quiet: inhibited by the source alert of the same host.
    fingerprint = {a["labels"]["alertname"]: a["fingerprint"] for a in am.alerts()
                   if a["labels"]["instance"] == A and a["status"]["state"] == "active"}
    by = {"HostwallRecordsLost": "HostwallCollectorDown", "HostwallSpoolGrowing": "HostwallCollectorDown",
          "HostwallSinkFailing": "HostwallCollectorDown", "HostwallSpoolNearlyFull": "HostwallCollectorDown",
          "HostwallAnomalyHighSeverity": "HostwallCollectorDown", "HostwallMapPressureHigh": "HostwallEnforcerDetached"}
    suppressed = am.wait_for_alerts(
        lambda alerts: [a for a in alerts if a["status"]["state"] == "suppressed"], what="the inhibited alerts")
    assert {(a["labels"]["alertname"], a["labels"]["instance"]) for a in suppressed} == \
        {(a["labels"]["alertname"], A) for a in held_back}
    for a in suppressed:
        assert a["status"]["inhibitedBy"] == [fingerprint[by[a["labels"]["alertname"]]]], a

    quiesce(am, webhook_receiver)
    assert pairs() == expected, f"notified {sorted(pairs())}, expected only {sorted(expected)}"

    # The collector is back: what it held back on host A is sent now.
    am.post_alerts([{**sources[0], "startsAt": rfc3339(time.time() - 60), "endsAt": rfc3339(time.time())}])
    webhook_receiver.wait_for(lambda ns: ("HostwallRecordsLost", A) in pairs(),
                              what="HostwallRecordsLost of host A once HostwallCollectorDown resolved")
    assert ("HostwallMapPressureHigh", A) not in pairs()          # still held back by the detached enforcer


# ---- end to end: Prometheus with the project's rules -> Alertmanager -> receiver --------------------------

class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        body = type(self).body
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def collector_metrics() -> Iterator[type[_Metrics]]:
    """A stand-in for the collector's metrics endpoint: serves whatever `.body` holds (exposition format)."""
    handler = type("Metrics", (_Metrics,), {"body": b""})
    (port,) = free_ports(1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    handler.target = f"127.0.0.1:{port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


FLOOD_METRICS = """# TYPE hostwall_anomaly_open gauge
hostwall_anomaly_open{signal="drops",dimension="source_prefix",key="203.0.113.0/24",severity="critical"} 1
hostwall_anomaly_open{signal="drops",dimension="destination_port",key="udp/5353",severity="high"} 1
hostwall_anomaly_open{signal="drops",dimension="reason",key="udp_flood",severity="critical"} 1
hostwall_anomaly_open{signal="drops",dimension="reason",key="banned",severity="medium"} 1
"""


@pytest.mark.peers
def test_prometheus_rules_page_once_per_flood(prometheus_server_factory, am: Alertmanager,
                                              webhook_receiver: WebhookReceiver, collector_metrics):
    """The deployed path with the lab intervals (1 s scrape and evaluation, docs/alerting.md): the flood's
    high/critical anomalies become one page carrying the runbook link; when they close, one resolved."""
    collector_metrics.body = FLOOD_METRICS.encode()
    prom = prometheus_server_factory({"hostwall": [collector_metrics.target]}, rule_files=[RULES],
                                     alertmanagers=[am.url], scrape_interval="1s")
    t0 = time.monotonic()
    webhook_receiver.wait_for(lambda ns: notified(webhook_receiver), timeout=60, what="the page")
    took = time.monotonic() - t0
    quiesce(am, webhook_receiver)
    [page] = notified(webhook_receiver)
    assert page.receiver == "hostwall-page" and page.body["groupLabels"] == {"instance": collector_metrics.target}
    assert sorted(page.alert_labels("key")) == ["203.0.113.0/24", "udp/5353", "udp_flood"]   # medium: no page
    runbook = rules()["HostwallAnomalyHighSeverity"]["annotations"]["runbook_url"]
    for a in page.alerts:
        assert a["labels"]["alertname"] == "HostwallAnomalyHighSeverity" and a["labels"]["job"] == "hostwall"
        assert a["annotations"]["runbook_url"] == runbook and a["annotations"]["summary"].startswith("drops anomaly")
    assert took < 30, f"{took:.1f}s from Prometheus start to the page"   # scrape + eval + group_wait: ~3 s

    collector_metrics.body = b""                           # the anomalies closed: the series go away
    [resolved] = webhook_receiver.wait_for(lambda ns: notified(webhook_receiver, status="resolved"), timeout=60,
                                           what="the resolved notification")
    assert resolved.receiver == "hostwall-page" and sorted(resolved.alert_labels("key")) == sorted(
        page.alert_labels("key"))
    assert prom.query('ALERTS{alertname="HostwallAnomalyHighSeverity"}') == []
