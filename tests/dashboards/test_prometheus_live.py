"""Every dashboard query and alert expression against a real Prometheus that scrapes a live collector.

One lab run (module fixture `run`) is shared by the tests below:

    real Prometheus (rule file dashboards/alerts/hostwall.rules.yml loaded), scraping every second
        job "hostwall": the collector's own endpoint (metrics.prometheus)
        job "otelcol":  the OTel Collector's prometheus exporter (the collector pushes OTLP metrics to it)
    netns lab: the real enforcer (examples/policy.yaml, DoS profile "lab" on the protected host's eth0) and the
    real `hostwall-collector run` with sinks jsonl, kafka (real broker), otlp (real OTel Collector), a
    second otlp sink whose endpoint is down (it loses records: the loss alert's provocation) and a second
    kafka sink whose broker is down (it delivered there before: it starts degraded and spools; a burst of
    connections fills its 1 MiB spool: the spool alert fires and the sink goes failing)
    traffic: attacker probes, client traffic in both families, a 3 s UDP flood (anomaly), an audit-mode
    policy swap with blocked traffic (would_drop), then XDP removed from eth0 behind the enforcer's back.

Then every target of every panel, every annotation and every template variable of dashboards/*.json runs
through Prometheus' HTTP API with the Grafana variables and $__rate_interval / $__range / $__interval
substituted, for the run's time range: each must parse and return data (at least one finite value), through
both scrape paths. The alert rules: each expression parses and its left-hand side returns data; the anomaly
and loss alerts fire, the detached alert goes pending.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.peers import free_ports
from tests.peers.fixtures import start_peer
from tests.peers.prometheus import PrometheusServer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
RULES = ROOT / "dashboards" / "alerts" / "hostwall.rules.yml"
EXAMPLE = ROOT / "examples" / "policy.yaml"
DIRECT_JOB, OTEL_JOB_SCRAPE = "hostwall", "otelcol"
OTEL_JOB = "hostwall/hostwall-collector"          # job label of OTLP metrics: service.namespace/service.name
SCRAPE_S = 1
RATE_INTERVAL = f"{4 * SCRAPE_S}s"                  # Grafana: max($__interval + scrape, 4 x scrape)
PROVOKED_FIRING = ("HostwallAnomalyHighSeverity", "HostwallRecordsLost", "HostwallSpoolNearlyFull")
PROVOKED_PENDING = ("HostwallEnforcerDetached", "HostwallSinkFailing")

pytestmark = [pytest.mark.lab, pytest.mark.peers, pytest.mark.timeout(600)]


@dataclass
class LabRun:
    prom: object
    t0: float
    t1: float = 0.0
    instances: dict = field(default_factory=dict)          # scrape job -> (job label, instance label)
    marks: dict = field(default_factory=dict)               # what happened when (wall clock)
    enforcer_status: dict = field(default_factory=dict)
    final_values: dict = field(default_factory=dict)


# ---- queries ----------------------------------------------------------------------------------------

def substitute(expr: str, *, job: str, host: str, interface: str, range_s: int) -> str:
    for k, v in (("$__rate_interval", RATE_INTERVAL), ("$__range", f"{range_s}s"), ("$__interval", f"{SCRAPE_S}s"),
                 ("${datasource}", "prometheus"), ("$job", job), ("$host", host), ("$interface", interface)):
        expr = expr.replace(k, v)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def dashboard_queries() -> list[tuple[str, str, str, bool]]:
    """(dashboard, where, expr, instant) of every panel target and annotation."""
    out = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((d["uid"], f"panel {p['title']!r} {t['refId']}", t["expr"], bool(t.get("instant"))))
        for a in d["annotations"]["list"]:
            if "target" in a and "expr" in a["target"]:
                out.append((d["uid"], f"annotation {a['name']!r}", a["target"]["expr"], False))
    return out


def variable_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard, variable, selector, label) of every label_values() variable."""
    out = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        for v in d["templating"]["list"]:
            if v["type"] != "query":
                continue
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
            assert m, f"{d['uid']} ${v['name']}: not label_values(selector, label): {q}"
            out.append((d["uid"], v["name"], m.group(1), m.group(2)))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def lhs(expr: str) -> list[str]:
    """The comparison-free parts of an alert expression (`a > 0 or b == 0` -> [a, b]). An `unless` clause is
    an exception (e.g. the anomaly rule's "unless the collector pushes its incidents itself"): it has data only
    when the exception applies, so it is not one of the parts that must have data."""
    parts = re.split(r"\s+(or|and|unless)\s+(?![^()]*\))", " ".join(expr.split()))
    kept = [parts[0]] + [p for op, p in zip(parts[1::2], parts[2::2]) if op != "unless"]
    kept = [re.sub(r"^(?:on|ignoring)\s*\([^)]*\)\s*", "", p) for p in kept]
    return [re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*$", "", p) for p in kept]


def finite(result: list[dict]) -> bool:
    for s in result:
        vals = s.get("values") or ([s["value"]] if "value" in s else [])
        if any(math.isfinite(float(v[1])) for v in vals):
            return True
    return False


def run_query(run: LabRun, expr: str) -> list[dict]:
    """The expression at every scrape step of the run: a range panel over the run's time range, and an
    instant panel ("now") for every dashboard end time within the run."""
    return run.prom.api("query_range", {"query": expr, "start": run.t0, "end": run.t1, "step": SCRAPE_S})["result"]


# ---- the lab run ------------------------------------------------------------------------------------

def _diag(prom, col=None) -> str:
    """What Prometheus has (targets, hostwall series per name) and the collector's log tail."""
    try:
        ts = [(t["labels"].get("job"), t["health"], t.get("lastError", "")) for t in prom.targets()]
        names = prom.query('count by (__name__, job) ({__name__=~"hostwall_.*"})')
        have = sorted(f"{s['metric']['__name__']}[{s['metric'].get('job')}]" for s in names)
    except Exception as e:                              # noqa: BLE001
        return f"(no diagnostics: {e})"
    tail = col.log_tail(3000) if col is not None else ""
    return f"targets {ts}\nseries: {', '.join(have)}\ncollector log: {tail}"


def _wait(pred, timeout: float, what: str, every: float = 0.5, diag=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{diag()}")


def _alert_seen(prom, name: str, state: str, since: float) -> bool:
    res = prom.api("query_range", {"query": f'ALERTS{{alertname="{name}", alertstate="{state}"}}',
                                   "start": since, "end": time.time(), "step": 1})["result"]
    return bool(res)


@pytest.fixture(scope="module")
def run(tmp_path_factory, otel_collector, kafka_broker):
    from hostwall.lab.netns import cleanup_stale, lab_available

    ok, why = lab_available()
    if not ok:
        pytest.skip(f"netns lab unavailable: {why}")
    cleanup_stale()
    out = tmp_path_factory.mktemp("dash-live")
    shutil.copytree(EXAMPLE.parent / "blocklists", out / "blocklists")
    audit_policy = out / "policy-audit.yaml"
    text = EXAMPLE.read_text()
    assert "audit: false" in text
    audit_policy.write_text(text.replace("audit: false", "audit: true"))

    metrics_port, dead_port, dead_kafka = free_ports(3)
    # a Prometheus of this module's own: its rule file, its two jobs
    with start_peer(PrometheusServer, {DIRECT_JOB: [f"127.0.0.1:{metrics_port}"]}, scrape_interval=f"{SCRAPE_S}s",
                    rule_files=[RULES],
                    scrape_configs=[{"job_name": OTEL_JOB_SCRAPE, "honor_labels": True,
                                     "scrape_interval": f"{SCRAPE_S}s",
                                     "static_configs": [{"targets": [otel_collector.prometheus_target]}]}]) as prom:
        yield _lab_run(prom, out, audit_policy, metrics_port, dead_port, dead_kafka, otel_collector, kafka_broker)


def _lab_run(prom, out, audit_policy, metrics_port, dead_port, dead_kafka, otel_collector, kafka_broker) -> LabRun:
    from hostwall.collector.sinks.kafka import CONNECTED_MARKER
    from hostwall.collector.sinks.kafka_wire import spool_dir_for
    from hostwall.lab import traffic
    from hostwall.lab.collector_proc import CollectorProcess
    from hostwall.lab.enforcer_proc import EnforcerProcess
    from hostwall.lab.netns import Lab
    sinks = [f"jsonl:{out / 'flows.jsonl'}", f"kafka://{kafka_broker.bootstrap_servers}",
             f"otlp://{otel_collector.grpc_endpoint}", f"otlp://127.0.0.1:{dead_port}", f"kafka://127.0.0.1:{dead_kafka}"]
    config = {"metrics": {"prometheus": f"127.0.0.1:{metrics_port}", "otlp": f"otlp://{otel_collector.grpc_endpoint}",
                          "interval": f"{SCRAPE_S}s"},
              "otlp": {"timeout": "1s"}, "kafka": {"spool_dir": str(out / "spool"), "spool_size": "1MiB",
                                                   "spool_segment_size": "64KiB"}}
    # the down broker is one this sink delivered to before: it starts degraded (spooling) instead of failing
    marker = spool_dir_for(out / "spool", f"127.0.0.1:{dead_kafka}")
    marker.mkdir(parents=True)
    (marker / CONNECTED_MARKER).write_text(f"127.0.0.1:{dead_kafka}\n")
    with Lab() as lab:
        lab.warm()
        with EnforcerProcess(lab, EXAMPLE) as enf, \
                traffic.echo_servers(lab, "prot", tcp=[22, 80, 3306], udp=[5353]), \
                traffic.echo_servers(lab, "cli", tcp=[9000]):
            with CollectorProcess(enf, out, sinks=sinks, config=config) as col:
                r = LabRun(prom, time.time())
                prom.wait_for_targets_up(DIRECT_JOB, timeout=30)
                _wait(lambda: prom.query(f'hostwall_enforcer_pinned{{job="{DIRECT_JOB}"}} == 1'), 15,
                      "the collector's endpoint to serve collector/kernel_metrics.py's families (SelfMetrics "
                      "must include KernelCollector.families(): see the wiring in that module's docstring)",
                      diag=lambda: _diag(prom, col))
                # 1. attacker probes, normal traffic in both families
                traffic.tcp_client_in(lab, "att", lab.addr("prot"), 80, count=2, timeout=0.3)
                traffic.ping_in(lab, "att", lab.addr("prot"), count=2, timeout=0.5)
                for fam in (4, 6):
                    for port in (22, 80):
                        traffic.tcp_client_in(lab, "cli", lab.addr("prot", fam), port, count=3, timeout=0.7)
                    traffic.udp_client_in(lab, "cli", lab.addr("prot", fam), 5353, count=3, timeout=0.7)
                    traffic.ping_in(lab, "cli", lab.addr("prot", fam), count=3)
                    traffic.tcp_client_in(lab, "cli", lab.addr("prot", fam), 3306, count=2, timeout=0.3)
                    traffic.tcp_client_in(lab, "prot", lab.addr("cli", fam), 9000, count=2, timeout=0.7)
                # the anomaly detector's warm-up (lab: 1 window of 5 s) must be over before the flood
                time.sleep(max(0.0, r.t0 + 8.0 - time.time()))
                # 2. the flood, while the client keeps working
                r.marks["flood_start"] = time.time()
                legit = traffic.start_in(lab, "cli", "tcp-client", host=lab.addr("prot"), port=80, count=30,
                                         interval=0.1, op_timeout=1.0)
                r.marks["flood"] = traffic.trafgen_in(lab, "att", kind="udp", dport=5353, duration=3.0,
                                                      rate_pps=100_000)
                r.marks["flood_end"] = time.time()
                r.marks["legit"] = legit.result(timeout=60)
                # a burst of connections (2 flow records each) fills the down broker's 1 MiB spool
                r.marks["burst_start"] = time.time()
                r.marks["burst"] = traffic.tcp_client_in(lab, "cli", lab.addr("prot"), 80, count=900, timeout=0.5)
                for name in PROVOKED_FIRING:
                    _wait(lambda name=name: _alert_seen(prom, name, "firing", r.t0), 40, f"alert {name} firing",
                          diag=lambda: _diag(prom, col))
                    r.marks[name] = time.time()
                _wait(lambda: _alert_seen(prom, "HostwallSinkFailing", "pending", r.t0), 30,
                      "alert HostwallSinkFailing pending", diag=lambda: _diag(prom, col))
                r.marks["dead_kafka"] = f"kafka://127.0.0.1:{dead_kafka}"
                r.marks["sink_failing"] = col.status()["sinks"][r.marks["dead_kafka"]]["health"]
                # 3. audit mode: the same policy, recording would_drop instead of dropping
                enf.apply(audit_policy)
                r.marks["audit_applied"] = time.time()
                traffic.tcp_client_in(lab, "att", lab.addr("prot"), 80, count=3, timeout=0.5)
                traffic.tcp_client_in(lab, "cli", lab.addr("prot"), 3306, count=3, timeout=0.5)
                time.sleep(3 * SCRAPE_S + 1)
                # 4. XDP removed from eth0 behind the enforcer's back
                st = enf.status()
                mode = {"generic": "xdpgeneric", "native": "xdpdrv"}.get(st["interfaces"][0]["xdp_mode"], "xdp")
                lab.run("prot", ["ip", "link", "set", "dev", "eth0", mode, "off"])
                r.marks["xdp_removed"] = time.time()
                _wait(lambda: _alert_seen(prom, "HostwallEnforcerDetached", "pending", r.marks["xdp_removed"]), 20,
                      "alert HostwallEnforcerDetached pending", diag=lambda: _diag(prom, col))
                time.sleep(2 * SCRAPE_S + 1)                 # quiet: kernel reads and scrapes settle
                r.enforcer_status = enf.status()
                r.t1 = time.time()
                for job, sel in ((DIRECT_JOB, f'job="{DIRECT_JOB}"'), (OTEL_JOB_SCRAPE, f'job="{OTEL_JOB}"')):
                    res = prom.query(f"hostwall_build_info{{{sel}}}")
                    pin_stem = Path(enf.pin_dir).name
                    res = [s for s in res if job == DIRECT_JOB or s["metric"]["instance"].endswith(pin_stem)]
                    assert len(res) == 1, (job, res)
                    r.instances[job] = (res[0]["metric"]["job"], res[0]["metric"]["instance"])
                direct = f'job="{DIRECT_JOB}"'
                finals = (("drops_summaries", f'sum(hostwall_dropped_packets_total{{{direct}}})'),
                          ("drops_datapath", f'sum(hostwall_datapath_packets_total{{{direct}, verdict!="allow"}})'))

                def agree() -> bool:         # the last interval's summaries and a scrape after them (a loaded
                    for key, q in finals:    # machine may need more than the quiet above); the test compares
                        r.final_values[key] = prom.query_value(q)
                    return r.final_values["drops_summaries"] == r.final_values["drops_datapath"]
                deadline = time.monotonic() + 30
                while not agree() and time.monotonic() < deadline:
                    time.sleep(SCRAPE_S)
                rc = col.stop()
                assert rc == 0, f"collector exit {rc}: {col.log_tail()}"
    return r


# ---- tests ----------------------------------------------------------------------------------------------

def test_the_lab_provoked_what_the_dashboards_show(run):
    assert run.marks["legit"]["ok"] >= 0.9 * run.marks["legit"]["count"], run.marks["legit"]
    h = run.marks["sink_failing"]                  # the down broker's sink: failing because its spool is full
    assert h["state"] == "failing" and "spool full" in h["reason"] and h["spool_fill_ratio"] > 0.8, h
    assert run.enforcer_status["defaults"]["audit"] is True
    # the drop panels' two sources agree: drop summaries (records) == the kernel's drop counters
    assert run.final_values["drops_summaries"] == run.final_values["drops_datapath"] > 10_000, run.final_values


@pytest.mark.parametrize("scrape_job", [DIRECT_JOB, OTEL_JOB_SCRAPE])
def test_every_dashboard_query_returns_data(run, scrape_job):
    job, host = run.instances[scrape_job]
    range_s = int(run.t1 - run.t0) + 1
    queries = dashboard_queries()
    assert len(queries) >= 60
    problems = []
    for uid, where, expr, _instant in queries:
        q = substitute(expr, job=job, host=host, interface="eth0", range_s=range_s)
        try:
            res = run_query(run, q)
        except Exception as e:                      # noqa: BLE001 — collected: every query is reported
            problems.append(f"{uid} {where}: ERROR {e}\n    {q}")
            continue
        if not finite(res):
            problems.append(f"{uid} {where}: no data\n    {q}")
    assert not problems, f"{len(problems)} of {len(queries)} queries failed:\n" + "\n".join(problems)


@pytest.mark.parametrize("scrape_job", [DIRECT_JOB, OTEL_JOB_SCRAPE])
def test_every_variable_has_values(run, scrape_job):
    job, host = run.instances[scrape_job]
    expect = {"job": job, "host": host, "interface": "eth0"}
    problems = []
    for uid, var, selector, label in variable_queries():
        sel = substitute(selector, job=job, host=host, interface="eth0", range_s=1)
        series = run.prom.api("series", {"match[]": sel, "start": run.t0, "end": run.t1})
        values = {s.get(label) for s in series}
        if expect[var] not in values:
            problems.append(f"{uid} ${var}: {sel} gave {label} values {sorted(v for v in values if v)}")
    assert not problems, "\n".join(problems)


def test_alert_expressions_parse_and_have_data(run):
    job, host = run.instances[DIRECT_JOB]
    problems = []
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {*PROVOKED_FIRING, *PROVOKED_PENDING, "HostwallMapPressureHigh",
                                           "HostwallSpoolGrowing"}
    for r in rules:
        try:
            run_query(run, r["expr"])                                # the whole expression parses
        except Exception as e:                                       # noqa: BLE001
            problems.append(f"{r['alert']}: {e}")
            continue
        for part in lhs(r["expr"]):
            if "offset" in part:                                     # "new series" clause: empty in steady state
                continue
            if not finite(run_query(run, part)):
                problems.append(f"{r['alert']}: no data for {part}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("alert", PROVOKED_FIRING)
def test_provoked_alerts_fire(run, alert):
    res = run.prom.api("query_range", {"query": f'ALERTS{{alertname="{alert}", alertstate="firing"}}',
                                       "start": run.t0, "end": run.t1, "step": 1})["result"]
    assert res, f"{alert} never fired"
    labels = res[0]["metric"]
    assert labels["job"] in (DIRECT_JOB, OTEL_JOB) and labels["instance"]
    if alert == "HostwallAnomalyHighSeverity":
        # the flood's keys, nothing else: its source, its port, the DoS drops (udp_flood) and, below the DoS
        # limit, the deny list's drops of the attacker (policy_deny). The client's burst of 900 connections
        # that follows is a surge of new flows in its own right (10.66.2.0/24, tcp/80: it pages when the
        # machine runs it fast enough to reach the high band), so alerts that began after it started are not
        # the flood's.
        keys = {(s["metric"]["dimension"], s["metric"]["key"]) for s in res
                if min(float(v[0]) for v in s["values"]) < run.marks["burst_start"]}
        flood = {("source_prefix", "10.66.3.0/24"), ("destination_port", "udp/5353"), ("reason", "udp_flood"),
                 ("reason", "policy_deny")}
        assert keys & {("reason", "udp_flood"), ("destination_port", "udp/5353")} and keys <= flood, keys
        first = min(float(v[0]) for s in res for v in s["values"])
        assert first - run.marks["flood_start"] < 15, "the anomaly alert came late"
    if alert == "HostwallRecordsLost":
        assert any(s["metric"].get("stage") == "sink" and s["metric"].get("sink", "").startswith("otlp://")
                   for s in res), [s["metric"] for s in res]


def test_detached_interface_alert_goes_pending(run):
    res = run.prom.api("query_range", {"query": 'ALERTS{alertname="HostwallEnforcerDetached"}',
                                       "start": run.marks["xdp_removed"], "end": run.t1, "step": 1})["result"]
    assert res and {s["metric"]["hook"] for s in res} == {"xdp"}, [s["metric"] for s in res]
    before = run.prom.api("query_range", {"query": 'ALERTS{alertname="HostwallEnforcerDetached"}',
                                          "start": run.t0, "end": run.marks["xdp_removed"] - 1, "step": 1})["result"]
    assert before == [], "detached alert while everything was attached"


def test_sink_failing_alert_names_the_failing_sink_only(run):
    res = run.prom.api("query_range", {"query": 'ALERTS{alertname="HostwallSinkFailing"}',
                                       "start": run.t0, "end": run.t1, "step": 1})["result"]
    assert res and {s["metric"]["sink"] for s in res} == {run.marks["dead_kafka"]}, [s["metric"] for s in res]
