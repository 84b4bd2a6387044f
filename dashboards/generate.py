"""Generate hostwall's Grafana dashboards and Grafana alerting provisioning; the committed files are its output.

    python dashboards/generate.py            # rewrite dashboards/*.json and provisioning/alerting/hostwall.yaml
    python dashboards/generate.py --check    # exit 1 if a committed file differs from what this would write
    python dashboards/generate.py --runbook-base https://wiki.example.org/hostwall/runbooks   # your docs' URL

Runbooks: every alert rule's `runbook_url` annotation is <base>/<AlertName>.md, written by this script into
dashboards/alerts/hostwall.rules.yml and the expected annotations of its unit tests (hostwall.rules.test.yml;
only those lines, added where one is missing) and carried into the Grafana copy. The base is --runbook-base, else $HOSTWALL_RUNBOOK_BASE_URL, else RUNBOOK_BASE: the Prometheus of
docker-compose.yml, which serves docs/runbooks/ at /user/ (--web.user-assets). Point it wherever your on-call
engineers read the repository's docs/runbooks/ (docs/alerting.md).

Dashboards (uid → file): hostwall-traffic (Traffic & verdicts), hostwall-dos (DoS & anomalies),
hostwall-pipeline (Pipeline health). Every query filters on the variables `job` (the scrape job: the collector's
own endpoint, or the OTel Collector's prometheus exporter), `host` (the `instance` label) and, where the
metric has one, `interface`. Metric names: docs/metrics.md. The Grafana alert rules are the Prometheus rules of
dashboards/alerts/hostwall.rules.yml, carried over one to one (same expression, `for`, labels, annotations),
so a Prometheus-only and a Grafana-only deployment page on the same conditions.

tests/dashboards/test_dashboards.py checks the structure (round trip through grafana-foundation-sdk), that every
referenced metric exists, and that these files are up to date; tests/dashboards/test_prometheus_live.py runs
every query against a real Prometheus scraping a live collector in a netns lab.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "alerts" / "hostwall.rules.yml"
RULE_TESTS = HERE / "alerts" / "hostwall.rules.test.yml"
ALERTING = HERE / "provisioning" / "alerting" / "hostwall.yaml"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$host"'                 # every query's base selector
IFSEL = SEL + ', interface=~"$interface"'
RI = "$__rate_interval"
# anomaly gauges stay at 0 for a while after the anomaly closed (collector/kernel_metrics.py): "open" is > 0
OPEN = f'and on (job, instance, signal, dimension, key) hostwall_anomaly_open{{{SEL}}} > 0'
DROP_REASONS_DOS = "rate_limit|syn_flood|udp_flood|icmp_flood|port_limit|banned"
SEVERITY_COLORS = [("1", "low", "blue"), ("2", "medium", "yellow"), ("3", "high", "orange"), ("4", "critical", "red")]
FOLDER = "hostwall"
RUNBOOKS = HERE.parent / "docs" / "runbooks"
RUNBOOK_BASE = "http://127.0.0.1:9090/user"           # docker-compose.yml's Prometheus: --web.user-assets
DATASOURCE_UID = "prometheus"                           # provisioning/datasources/prometheus.yaml


# ---- building blocks -------------------------------------------------------------------------------------

def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False, fmt: str | None = None) -> dict:
    t: dict[str, Any] = {"refId": ref, "datasource": DS, "editorMode": "code", "expr": expr,
                         "legendFormat": legend or "__auto", "range": not instant, "instant": instant}
    if fmt:
        t["format"] = fmt
    return t


def thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


GREEN = thresholds((None, "green"))


class Layout:
    """Panels placed left to right in rows of 24 grid units; ids in order."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = self.row_h = 0

    def _next_id(self) -> int:
        return len(self.panels) + 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
            self.x = self.row_h = 0
        self.panels.append({"type": "row", "id": self._next_id(), "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x = self.row_h = 0
        panel = {"id": self._next_id(), **panel, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def timeseries(title: str, desc: str, targets: list[dict], unit: str, *, stack: bool = False,
               bars: bool = False, thresholds_line: dict | None = None, minimum: float | None = 0,
               maximum: float | None = None, legend_calcs: tuple[str, ...] = ("mean", "max", "lastNotNull")) -> dict:
    custom: dict[str, Any] = {"drawStyle": "bars" if bars else "line", "lineWidth": 1,
                              "fillOpacity": 30 if stack or bars else 10, "showPoints": "never",
                              "spanNulls": False, "axisSoftMin": minimum,
                              "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                              "thresholdsStyle": {"mode": "line+area" if thresholds_line else "off"}}
    if minimum is None:
        del custom["axisSoftMin"]
    defaults: dict[str, Any] = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"},
                                "thresholds": thresholds_line or GREEN}
    if maximum is not None:
        defaults["max"] = maximum
    return {"type": "timeseries", "title": title, "description": desc, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"showLegend": True, "displayMode": "table", "placement": "right",
                                   "calcs": list(legend_calcs)},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, desc: str, targets: list[dict], unit: str, *, steps: dict | None = None,
         text_mode: str = "value", calc: str = "lastNotNull", color_mode: str = "value",
         mappings: list | None = None) -> dict:
    return {"type": "stat", "title": title, "description": desc, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": steps or GREEN, "color": {"mode": "thresholds"},
                                         "mappings": mappings or []}, "overrides": []},
            "options": {"reduceOptions": {"calcs": [calc], "fields": "", "values": False},
                        "textMode": text_mode, "colorMode": color_mode, "graphMode": "area",
                        "justifyMode": "auto", "orientation": "auto"}}


def bargauge(title: str, desc: str, targets: list[dict], unit: str) -> dict:
    return {"type": "bargauge", "title": title, "description": desc, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": GREEN, "color": {"mode": "continuous-BlYlRd"},
                                         "min": 0}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True}}


def table(title: str, desc: str, targets: list[dict], unit: str, *, hide: tuple[str, ...] = ("Time",),
          rename: dict[str, str] | None = None, sort_by: str | None = None) -> dict:
    transformations: list[dict] = [{"id": "merge", "options": {}},
                                   {"id": "organize", "options": {"excludeByName": {h: True for h in hide},
                                                                  "renameByName": rename or {}}}]
    options: dict[str, Any] = {"showHeader": True, "cellHeight": "sm",
                               "footer": {"show": False, "reducer": ["sum"], "fields": ""}}
    if sort_by:
        options["sortBy"] = [{"displayName": sort_by, "desc": True}]
    return {"type": "table", "title": title, "description": desc, "datasource": DS, "targets": targets,
            "transformations": transformations,
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": GREEN, "custom": {"align": "auto"}},
                            "overrides": []},
            "options": options}


def state_timeline(title: str, desc: str, targets: list[dict]) -> dict:
    mappings = [{"type": "value", "options": {v: {"text": name, "color": color, "index": i}
                                              for i, (v, name, color) in enumerate(SEVERITY_COLORS)}}]
    return {"type": "state-timeline", "title": title, "description": desc, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": {"unit": "none", "mappings": mappings, "color": {"mode": "thresholds"},
                                         "thresholds": thresholds((None, "blue"), (2, "yellow"), (3, "orange"),
                                                                  (4, "red")),
                                         "custom": {"fillOpacity": 80, "lineWidth": 0}}, "overrides": []},
            "options": {"showValue": "auto", "mergeValues": True, "alignValue": "left", "rowHeight": 0.8,
                        "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "single", "sort": "none"}}}


HEALTH_COLORS = (("0", "ok", "green"), ("1", "degraded", "orange"), ("2", "failing", "red"))


def health_timeline(title: str, desc: str, targets: list[dict]) -> dict:
    """One lane per sink: 0 ok (green), 1 degraded (orange), 2 failing (red)."""
    mappings = [{"type": "value", "options": {v: {"text": name, "color": color, "index": i}
                                              for i, (v, name, color) in enumerate(HEALTH_COLORS)}}]
    return {"type": "state-timeline", "title": title, "description": desc, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": {"unit": "none", "mappings": mappings, "color": {"mode": "thresholds"},
                                         "thresholds": thresholds((None, "green"), (1, "orange"), (2, "red")),
                                         "min": 0, "max": 2, "custom": {"fillOpacity": 80, "lineWidth": 0}},
                            "overrides": []},
            "options": {"showValue": "auto", "mergeValues": True, "alignValue": "left", "rowHeight": 0.8,
                        "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "single", "sort": "none"}}}


def variables(interface: bool = True) -> dict:
    def query_var(name: str, label: str, query: str, desc: str, *, multi: bool) -> dict:
        v: dict[str, Any] = {"type": "query", "name": name, "label": label, "description": desc, "datasource": DS,
                             "query": {"query": query, "refId": f"var-{name}", "qryType": 1}, "refresh": 2,
                             "sort": 1, "hide": 0, "multi": multi, "includeAll": multi, "regex": "",
                             "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {},
                             "options": []}
        if multi:
            v["allValue"] = ".*"
        return v

    out = [{"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
            "description": "The Prometheus that scrapes hostwall", "hide": 0, "refresh": 1, "regex": "",
            "current": {"selected": False, "text": "Prometheus", "value": DATASOURCE_UID}, "options": []},
           query_var("job", "Source", "label_values(hostwall_build_info, job)",
                     "Where the collector's metrics come from: its own Prometheus endpoint (job hostwall) or the "
                     "OpenTelemetry Collector's prometheus exporter (OTLP metrics). Pick one, not both: the "
                     "series are the same.", multi=False),
           query_var("host", "Host", 'label_values(hostwall_build_info{job=~"$job"}, instance)',
                     "The collector instance (one per protected host and enforcer instance)", multi=True)]
    if interface:
        out.append(query_var("interface", "Interface", f"label_values(hostwall_interface_info{{{SEL}}}, interface)",
                             "Interfaces hostwall is attached to (only panels with an interface dimension "
                             "follow this)", multi=True))
    return {"list": out}


def dashboard(uid: str, title: str, desc: str, layout: Layout, *, tags: list[str], annotations: list[dict],
              links: list[dict], interface: bool = True) -> dict:
    builtin = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
               "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}
    return {"uid": uid, "title": title, "description": desc, "tags": ["hostwall", *tags], "editable": True,
            "graphTooltip": 1, "timezone": "browser", "refresh": "30s", "schemaVersion": 39, "version": 1,
            "time": {"from": "now-1h", "to": "now"}, "fiscalYearStartMonth": 0, "liveNow": False,
            "timepicker": {"refresh_intervals": ["10s", "30s", "1m", "5m", "15m"]},
            "templating": variables(interface), "annotations": {"list": [builtin, *annotations]},
            "links": links, "panels": layout.panels}


def annotation(name: str, expr: str, title: str, text: str, color: str) -> dict:
    return {"name": name, "datasource": DS, "enable": True, "hide": False, "iconColor": color,
            "target": {"refId": "Anno", "expr": expr, "datasource": DS}, "titleFormat": title, "textFormat": text,
            "tagKeys": "instance", "useValueForTime": False, "step": "30s"}


LINKS = [{"title": "hostwall", "type": "dashboards", "tags": ["hostwall"], "asDropdown": True, "includeVars": True,
          "keepTime": True, "icon": "external link", "targetBlank": False, "tooltip": "", "url": ""}]


def eq(label: str, value: str) -> str:
    return f'{label}="{value}"'


def rx(label: str, value: str) -> str:
    return f'{label}=~"{value}"'


def rate(metric: str, sel: str = SEL, extra: str = "") -> str:
    inner = f"{sel}, {extra}" if extra else sel
    return f"rate({metric}{{{inner}}}[{RI}])"


# ---- dashboard 1: traffic & verdicts --------------------------------------------------------------------

def traffic() -> dict:
    L = Layout()
    L.row("Overview")
    L.add(stat("Allowed", "Packets per second the datapath allowed (all hooks, each packet once).",
               [target(f"sum({rate('hostwall_datapath_packets_total', extra=eq('verdict', 'allow'))})", "allowed")],
               "pps"), 3, 4)
    L.add(stat("Dropped", "Packets per second the datapath dropped (policy, DoS limits, bans, malformed).",
               [target(f"sum({rate('hostwall_datapath_packets_total', extra=eq('verdict', 'drop'))})", "dropped")],
               "pps", steps=thresholds((None, "green"), (1000, "orange"), (100000, "red"))), 3, 4)
    L.add(stat("Would drop (audit)", "Packets per second that audit mode let through but would have dropped. "
               "Non-zero only while the policy has `defaults.audit: true`.",
               [target(f"sum({rate('hostwall_datapath_packets_total', extra=eq('verdict', 'would_drop'))})",
                       "would drop")], "pps", steps=thresholds((None, "green"), (0.001, "yellow"))), 3, 4)
    L.add(stat("Drop ratio", "Dropped / (allowed + dropped) packets over the rate interval.",
               [target(f"sum({rate('hostwall_datapath_packets_total', extra=eq('verdict', 'drop'))}) / "
                       f"sum({rate('hostwall_datapath_packets_total', extra=rx('verdict', 'allow|drop'))})", "ratio")],
               "percentunit", steps=thresholds((None, "green"), (0.2, "orange"), (0.5, "red"))), 3, 4)
    L.add(stat("Policy", "Active policy name and revision (as `hostwall-enforcer status` shows them); a new "
               "revision appears as a \"policy applied\" annotation on the graphs.",
               [target(f"max by (policy, revision) (hostwall_policy_info{{{SEL}}})", "{{policy}} {{revision}}",
                       instant=True)], "none", text_mode="name", color_mode="none"), 6, 4)
    L.add(stat("Mode", "ENFORCING drops what the policy denies; AUDIT (defaults.audit: true) only records "
               "would_drop and lets everything pass.",
               [target(f"max(hostwall_policy_audit_mode{{{SEL}}})", "mode", instant=True)], "none",
               steps=thresholds((None, "green"), (1, "yellow")),
               mappings=[{"type": "value", "options": {"0": {"text": "ENFORCING", "color": "green", "index": 0},
                                                       "1": {"text": "AUDIT", "color": "yellow", "index": 1}}}]), 3, 4)
    L.add(stat("Attached", "Programs attached (xdp, tc_egress per interface) / expected. Fewer than "
               "expected: the enforcer is (partly) detached and the interface is not filtered.",
               [target(f"sum(hostwall_interface_attached{{{IFSEL}}}) / count(hostwall_interface_attached{{{IFSEL}}})",
                       "attached")], "percentunit",
               steps=thresholds((None, "red"), (0.999, "green"))), 3, 4)

    L.row("Verdicts")
    L.add(timeseries("Packets by verdict and reason", "Every judged packet once, by verdict (allow, drop, "
                     "would_drop) and reason (bpf/hostwall.h).",
                     [target(f"sum by (verdict, reason) ({rate('hostwall_datapath_packets_total')})",
                             "{{verdict}} · {{reason}}")], "pps", stack=True), 12, 8)
    L.add(timeseries("Bytes by verdict", "Bytes per second judged by the datapath, by verdict.",
                     [target(f"sum by (verdict) ({rate('hostwall_datapath_bytes_total')})", "{{verdict}}")],
                     "Bps", stack=True), 12, 8)
    L.add(timeseries("Drops by reason per interface", "Dropped packets per second by interface and reason, from the "
                     "collector's drop summaries (exact: they add up to the kernel counters). Follows $interface.",
                     [target(f"sum by (interface, reason) ({rate('hostwall_dropped_packets_total', IFSEL, eq('verdict', 'drop'))})",
                             "{{interface}} · {{reason}}")], "pps", stack=True), 12, 8)
    L.add(timeseries("Audit mode: would-drops", "Packets audit mode let through that the policy or a DoS limit "
                     "would have dropped, by reason (datapath counters) and per interface (drop summaries). "
                     "Use it to tune a policy before enforcing it.",
                     [target(f"sum by (reason) ({rate('hostwall_datapath_packets_total', extra=eq('verdict', 'would_drop'))})",
                             "{{reason}}"),
                      target(f"sum by (interface) ({rate('hostwall_dropped_packets_total', IFSEL, eq('verdict', 'would_drop'))})",
                             "{{interface}} (all reasons)", "B")], "pps"), 12, 8)
    L.add(timeseries("Interface traffic", "Packets per second the interfaces received and sent (kernel link "
                     "counters, before XDP). Follows $interface.",
                     [target(f"sum by (interface, direction) ({rate('hostwall_interface_packets_total', IFSEL)})",
                             "{{interface}} {{direction}}")], "pps"), 12, 8)

    L.row("Rules")
    L.add(timeseries("Packets per rule", "Packets per second that matched each rule of the active policy "
                     "(first match). Rules keep their counters across policy swaps.",
                     [target(f"sum by (rule, action) ({rate('hostwall_rule_packets_total')})",
                             "{{rule}} ({{action}})")], "pps"), 12, 9)
    L.add(table("Rules in the time range", "Packets and bytes per rule over the dashboard's time range.",
                [target(f"sum by (rule, direction, action) (increase(hostwall_rule_packets_total{{{SEL}}}[$__range]))",
                        "", instant=True, fmt="table"),
                 target(f"sum by (rule, direction, action) (increase(hostwall_rule_bytes_total{{{SEL}}}[$__range]))",
                        "", "B", instant=True, fmt="table")],
                "short", rename={"Value #A": "packets", "Value #B": "bytes"}, sort_by="packets"), 12, 9)

    L.row("Destination ports")
    L.add(timeseries("Packets per destination port", "TCP/UDP packets per second by destination port and verdict. "
                     "The first ports seen get their own series; the rest is port \"other\".",
                     [target(f"sum by (port, verdict) ({rate('hostwall_port_packets_total')})",
                             "{{port}} {{verdict}}")], "pps"), 12, 8)
    L.add(bargauge("Top dropped destination ports", "Dropped and would-drop packets per destination port over "
                   "the time range.",
                   [target(f"topk(10, sum by (port) (increase(hostwall_port_packets_total{{{SEL}, verdict=~\"drop|would_drop\"}}[$__range])))",
                           "{{port}}", instant=True)], "short"), 12, 8)

    L.row("Sources")
    L.add(bargauge("Top dropped source prefixes", "Dropped packets per source prefix (drop-summary aggregation, "
                   "default /24 and /64) over the time range; the collector tracks the current top 10.",
                   [target(f"topk(10, sum by (source_prefix) (increase(hostwall_source_prefix_dropped_packets_total{{{SEL}}}[$__range])))",
                           "{{source_prefix}}", instant=True)], "short"), 8, 9)
    L.add(timeseries("Dropped packets by source prefix", "Drops per second of the current top source prefixes.",
                     [target(f"topk(5, sum by (source_prefix) ({rate('hostwall_source_prefix_dropped_packets_total')}))",
                             "{{source_prefix}}")], "pps"), 8, 9)
    L.add(bargauge("Top sources by new connections", "Connections opened (flow start records) per source address "
                   "over the time range; the collector tracks the current top 10.",
                   [target(f"topk(10, sum by (source) (increase(hostwall_source_flows_total{{{SEL}}}[$__range])))",
                           "{{source}}", instant=True)], "short"), 8, 9)
    return dashboard("hostwall-traffic", "hostwall — Traffic & verdicts",
                     "What the firewall allowed and dropped, why, where (interface, rule, port) and from whom.", L,
                     tags=["firewall"], links=LINKS,
                     annotations=[annotation("Policy applied", f"changes(hostwall_policy_applied_timestamp_seconds{{{SEL}}}[{RI}]) > 0",
                                             "policy applied", "{{instance}}", "purple")])


# ---- dashboard 2: DoS & anomalies -----------------------------------------------------------------------

def dos() -> dict:
    L = Layout()
    L.row("Now")
    L.add(stat("Open anomalies", "Anomalies open now (all severities).",
               [target(f"sum(hostwall_anomaly_open{{{SEL}}}) or vector(0)", "open")], "none",
               steps=thresholds((None, "green"), (1, "orange"))), 4, 4)
    L.add(stat("Open ≥ high", "Open anomalies of severity high or critical: these page (HostwallAnomalyHighSeverity).",
               [target(f"sum(hostwall_anomaly_open{{{SEL}, severity=~\"high|critical\"}}) or vector(0)", "open")],
               "none", steps=thresholds((None, "green"), (1, "red"))), 4, 4)
    L.add(stat("Active bans", "Sources banned now: automatic (a DoS limit exceeded for ban.after) and manual "
               "(`hostwall-enforcer ban add`).",
               [target(f"sum by (kind) (hostwall_dos_bans{{{SEL}}})", "{{kind}}")], "none",
               steps=thresholds((None, "green"), (1, "orange"))), 4, 4)
    L.add(stat("DoS drops", "Packets per second dropped by DoS limits (all profiles).",
               [target(f"sum({rate('hostwall_dos_profile_dropped_packets_total')})", "dropped")], "pps",
               steps=thresholds((None, "green"), (100, "orange"), (10000, "red"))), 4, 4)
    L.add(stat("Buckets tracked", "Per-source DoS token buckets (hw_dos_src, 1,048,576 slots in 4-way buckets).",
               [target(f"sum(hostwall_dos_buckets{{{SEL}}})", "buckets")], "short"), 4, 4)
    L.add(stat("Anomalies opened", "Anomalies opened since the collector started, by severity.",
               [target(f"sum by (severity) (hostwall_anomaly_transitions_total{{{SEL}, state=\"open\"}})",
                       "{{severity}}")], "none", color_mode="none"), 4, 4)

    L.row("DoS limits")
    L.add(timeseries("DoS drops by profile and reason", "Packets per second dropped by each DoS profile's limits "
                     "(hw_dos_stats): rate_limit, syn_flood, udp_flood, icmp_flood, port_limit, banned.",
                     [target(f"sum by (profile, reason) ({rate('hostwall_dos_profile_dropped_packets_total')})",
                             "{{profile}} · {{reason}}")], "pps", stack=True), 12, 8)
    L.add(timeseries("DoS drops by profile and protocol", "Packets per second dropped by DoS limits per profile "
                     "and protocol (drop summaries; follows $interface).",
                     [target(f"sum by (profile, protocol) ({rate('hostwall_dropped_packets_total', IFSEL, rx('reason', DROP_REASONS_DOS))})",
                             "{{profile}} · {{protocol}}")], "pps", stack=True), 12, 8)
    L.add(timeseries("Active bans", "Banned sources over time (automatic and manual).",
                     [target(f"sum by (kind) (hostwall_dos_bans{{{SEL}}})", "{{kind}}")], "short"), 12, 7)
    L.add(timeseries("DoS bytes dropped", "Bytes per second dropped by DoS limits, per profile.",
                     [target(f"sum by (profile) ({rate('hostwall_dos_profile_dropped_bytes_total')})",
                             "{{profile}}")], "Bps"), 12, 7)

    L.row("Anomalies")
    L.add(state_timeline("Anomaly timeline", "One lane per anomaly key while it is open, colored by severity (blue "
                         "low, yellow medium, orange high, red critical). Keys: source prefix, transport/port, reason.",
                         [target(f"max by (signal, dimension, key) (hostwall_anomaly_severity_level{{{SEL}}} > 0)",
                                 "{{signal}} {{dimension}} {{key}}")]), 24, 8)
    L.add(timeseries("Anomaly score and rate", "Score (deviations above the learned baseline) and observed rate of "
                     "the open anomalies.",
                     [target(f"max by (dimension, key) (hostwall_anomaly_score{{{SEL}}})", "score {{dimension}} {{key}}"),
                      target(f"max by (dimension, key) (hostwall_anomaly_rate_per_second{{{SEL}}})",
                             "rate {{dimension}} {{key}}", "B")], "short", minimum=None), 12, 8)
    L.add(table("Open anomalies", "Anomalies open now with their severity, score and rate (per second).",
                [target(f"max by (signal, dimension, key, severity) (hostwall_anomaly_open{{{SEL}}} > 0)", "",
                        instant=True, fmt="table"),
                 target(f"max by (signal, dimension, key) (hostwall_anomaly_score{{{SEL}}} {OPEN})", "", "B",
                        instant=True, fmt="table"),
                 target(f"max by (signal, dimension, key) (hostwall_anomaly_rate_per_second{{{SEL}}} {OPEN})", "", "C",
                        instant=True, fmt="table")],
                "short", hide=("Time", "Value #A"), rename={"Value #B": "score", "Value #C": "rate /s"},
                sort_by="score"), 12, 8)

    L.row("Top talkers")
    L.add(bargauge("Top talkers of open anomalies", "The sources that contribute most to each open anomaly "
                   "(decayed count over the anomaly window).",
                   [target(f"topk(10, max by (source) (hostwall_anomaly_top_talker_count{{{SEL}}} > 0))", "{{source}}",
                           instant=True)], "short"), 12, 8)
    L.add(timeseries("Top talkers: dropped packets by source prefix", "Drops per second of the current top "
                     "source prefixes (drop summaries).",
                     [target(f"topk(5, sum by (source_prefix) ({rate('hostwall_source_prefix_dropped_packets_total')}))",
                             "{{source_prefix}}")], "pps"), 12, 8)
    return dashboard("hostwall-dos", "hostwall — DoS & anomalies",
                     "DoS limits (drops by profile, protocol and reason, bans) and the collector's rate anomalies.",
                     L, tags=["dos", "anomaly"], links=LINKS,
                     annotations=[annotation("Anomalies", f"max by (signal, dimension, key, severity) (hostwall_anomaly_open{{{SEL}}}) > 0",
                                             "{{signal}} anomaly", "{{dimension}} {{key}} ({{severity}})", "red")])


# ---- dashboard 3: pipeline health -----------------------------------------------------------------------

def pipeline() -> dict:
    L = Layout()
    L.row("Now")
    L.add(stat("Records lost", "Records counted lost in the time range (every stage; not the sampled events the "
               "kernel's event budget shed by design, class=\"shed\"). Anything above 0 alerts (HostwallRecordsLost).",
               [target(f"sum(increase(hostwall_records_lost_total{{{SEL},class!=\"shed\"}}[$__range])) or vector(0)",
                       "lost",
                       instant=True)], "short", steps=thresholds((None, "green"), (1, "red"))), 4, 4)
    L.add(stat("Ring backlog", "Unread bytes in the kernel ring buffer (8 MiB). Growing: the collector falls behind.",
               [target(f"max(hostwall_ring_backlog_bytes{{{SEL}}})", "backlog")], "bytes",
               steps=thresholds((None, "green"), (1 << 20, "orange"), (4 << 20, "red"))), 4, 4)
    L.add(stat("Kafka spool", "Bytes in the Kafka sinks' disk spool (non-zero while brokers are down or slow).",
               [target(f"sum(hostwall_spool_size_bytes{{{SEL}}})", "spool")], "bytes",
               steps=thresholds((None, "green"), (1, "orange"))), 4, 4)
    L.add(stat("Kafka degraded", "Kafka sinks delivering through the spool.",
               [target(f"sum(hostwall_kafka_degraded{{{SEL}}})", "degraded")], "none",
               steps=thresholds((None, "green"), (1, "orange"))), 4, 4)
    L.add(stat("Records in", "Records produced per second (all sources).",
               [target(f"sum({rate('hostwall_records_produced_total')})", "in")], "cps"), 4, 4)
    L.add(stat("Map pressure (max)", "Fullest kernel map or policy table. Alert at 80% (HostwallMapPressureHigh).",
               [target(f"max(hostwall_map_entries{{{SEL}}} / hostwall_map_capacity{{{SEL}}})", "max")],
               "percentunit", steps=thresholds((None, "green"), (0.6, "orange"), (0.8, "red"))), 4, 4)

    L.row("Records")
    L.add(timeseries("Records in / out", "In: records produced per second by source (events, drop summaries, "
                     "conntrack, anomaly, audit). Out: records each sink confirmed per second.",
                     [target(f"sum by (source) ({rate('hostwall_records_produced_total')})", "in · {{source}}"),
                      target(f"sum by (sink) ({rate('hostwall_records_delivered_total')})", "out · {{sink}}", "B")],
                     "cps"), 12, 8)
    L.add(timeseries("Records lost by stage and reason", "Records lost in the last 5 minutes by stage, reason and "
                     "sink: the expression of the HostwallRecordsLost alert, which fires above the red line (0) "
                     "for class lost; class shed (kernel budget during a flood, by design) is shown, never paged.",
                     [target(f"sum by (stage, reason, sink, class) (increase(hostwall_records_lost_total{{{SEL}}}[5m]))",
                             "{{class}} · {{stage}} · {{reason}} {{sink}}")], "short",
                     thresholds_line=thresholds((None, "transparent"), (0.000001, "red"))), 12, 8)
    L.add(timeseries("Ring buffer backlog", "Unread bytes in the kernel ring buffer, and kernel events that did not "
                     "get in (over the event budget, ring buffer full).",
                     [target(f"max(hostwall_ring_backlog_bytes{{{SEL}}})", "backlog bytes"),
                      target(f"sum by (type, outcome) ({rate('hostwall_kernel_events_total')})",
                             "{{type}} {{outcome}} /s", "B")], "bytes"), 12, 8)
    L.add(timeseries("Queue fill", "Depth / capacity of the events queue and each sink's queue. Full block queues "
                     "back-pressure to the kernel; drop queues shed (counted).",
                     [target(f"max by (queue) (hostwall_queue_depth{{{SEL}}} / hostwall_queue_capacity{{{SEL}}})",
                             "{{queue}}")], "percentunit", maximum=1), 12, 8)

    L.row("Sinks")
    L.add(health_timeline("Sink health", "Each sink's state: ok, degraded (delivering through its spool or "
                          "retrying: the destination is down or slow, retrying fixes it) or failing (it cannot "
                          "deliver: credentials, permissions, TLS, a missing topic, a full spool or disk). "
                          "HostwallSinkFailing fires after 1 minute of failing. `hostwall-collector status` "
                          "says why.",
                          [target(f"max by (sink) (hostwall_sink_health{{{SEL},state=\"degraded\"}}) + 2 * "
                                  f"max by (sink) (hostwall_sink_health{{{SEL},state=\"failing\"}})", "{{sink}}")]),
          12, 8)
    L.add(timeseries("Spool fill", "Each Kafka spool's size against its limit (kafka.spool_size). "
                     "HostwallSpoolNearlyFull fires above the red line (80 %); when full, new records are counted "
                     "lost (spool_full).",
                     [target(f"max by (sink) (hostwall_spool_size_bytes{{{SEL}}} / hostwall_spool_capacity_bytes{{{SEL}}})",
                             "{{sink}}")], "percentunit", maximum=1,
                     thresholds_line=thresholds((None, "transparent"), (0.8, "red"))), 12, 8)
    L.add(timeseries("Oldest spooled record", "Age of the oldest record still in each Kafka spool: how far "
                     "behind the broker delivery is (0 when the spool is empty).",
                     [target(f"max by (sink) (hostwall_spool_oldest_record_age_seconds{{{SEL}}})", "{{sink}}")],
                     "s"), 12, 8)
    L.add(timeseries("Kafka delivery latency", "Enqueue to broker acknowledgement per record: p50 and p99.",
                     [target(f"histogram_quantile(0.99, sum by (le, sink) ({rate('hostwall_kafka_delivery_latency_seconds_bucket')}))",
                             "p99 {{sink}}"),
                      target(f"histogram_quantile(0.5, sum by (le, sink) ({rate('hostwall_kafka_delivery_latency_seconds_bucket')}))",
                             "p50 {{sink}}", "B")], "s"), 12, 8)
    L.add(timeseries("Kafka spool", "Bytes and records in each Kafka sink's disk spool; HostwallSpoolGrowing fires "
                     "when it grows for 10 minutes.",
                     [target(f"sum by (sink) (hostwall_spool_size_bytes{{{SEL}}})", "{{sink}} bytes"),
                      target(f"sum by (sink) (hostwall_spool_records{{{SEL}}})", "{{sink}} records", "B")], "bytes"), 12, 8)
    L.add(timeseries("OTLP export errors", "Failed OTLP metric pushes, and records the OTLP sinks lost (export "
                     "failures after retries, records shed by their queue).",
                     [target(f"sum({rate('hostwall_metrics_export_failures_total')})", "metric pushes failed"),
                      target(f"sum by (sink, reason) ({rate('hostwall_records_lost_total', SEL, rx('sink', 'otlp://.*'))})",
                             "{{sink}} {{reason}}", "B")], "cps"), 12, 8)
    L.add(timeseries("Enrichment hit rate", "Share of enrichment lookups answered from the caches (container, "
                     "socket owner, interface, ...).",
                     [target(f"sum by (cache) ({rate('hostwall_enrich_cache_lookups_total', SEL, eq('result', 'hit'))}) / "
                             f"sum by (cache) ({rate('hostwall_enrich_cache_lookups_total')})", "{{cache}}")],
                     "percentunit", maximum=1), 12, 8)

    L.row("Kernel maps")
    L.add(timeseries("Map pressure", "Entries / capacity per kernel hash map and policy table; the alert "
                     "(HostwallMapPressureHigh) fires at the red line (80%) after 5 minutes.",
                     [target(f"max by (map) (hostwall_map_entries{{{SEL}}} / hostwall_map_capacity{{{SEL}}})", "{{map}}")],
                     "percentunit", maximum=1,
                     thresholds_line=thresholds((None, "transparent"), (0.8, "red"))), 12, 8)
    L.add(timeseries("Drop summaries", "Dropped packets reported by the drop summaries per second; overflow: drops "
                     "that did not fit the aggregation map (counted, no source).",
                     [target(f"sum by (kind) ({rate('hostwall_drop_summary_packets_total')})", "{{kind}}")], "pps"), 12, 8)
    return dashboard("hostwall-pipeline", "hostwall — Pipeline health",
                     "The collector: ring buffer, records in/out, loss by stage and reason, sinks, enrichment, maps.",
                     L, tags=["collector"], links=LINKS, interface=False, annotations=[])


# ---- Grafana alerting, from the Prometheus rules ---------------------------------------------------------

def grafana_alerting(rules_doc: dict) -> dict:
    """Grafana file provisioning (apiVersion 1) of the same rules: query A = the rule's PromQL (instant),
    condition C = A > 0 (the PromQL already compares; any returned series is an alert instance)."""
    groups = []
    for g in rules_doc["groups"]:
        rules = []
        for r in g["rules"]:
            uid = "hw-" + "".join(c for c in r["alert"].lower() if c.isalnum())[:30]
            data = [{"refId": "A", "relativeTimeRange": {"from": 600, "to": 0}, "datasourceUid": DATASOURCE_UID,
                     "model": {"refId": "A", "expr": r["expr"], "instant": True, "range": False,
                               "editorMode": "code", "intervalMs": 15000, "maxDataPoints": 43200}},
                    {"refId": "C", "datasourceUid": "__expr__",
                     "model": {"refId": "C", "type": "threshold", "expression": "A", "datasource": {
                         "type": "__expr__", "uid": "__expr__"},
                         "conditions": [{"evaluator": {"type": "gt", "params": [0]}}]}}]
            rules.append({"uid": uid, "title": r["alert"], "condition": "C", "data": data,
                          "noDataState": "OK", "execErrState": "Error", "for": r.get("for", "0s"),
                          "annotations": dict(r.get("annotations", {})), "labels": dict(r.get("labels", {})),
                          "isPaused": False})
        groups.append({"orgId": 1, "name": g["name"], "folder": FOLDER, "interval": "30s", "rules": rules})
    return {"apiVersion": 1, "groups": groups}


# ---- runbook links ---------------------------------------------------------------------------------------

def runbook_base(argv: list[str] | None = None) -> str:
    """--runbook-base URL, else $HOSTWALL_RUNBOOK_BASE_URL, else RUNBOOK_BASE (no trailing slash)."""
    argv = argv or []
    base = argv[argv.index("--runbook-base") + 1] if "--runbook-base" in argv[:-1] else None
    return (base or os.environ.get("HOSTWALL_RUNBOOK_BASE_URL") or RUNBOOK_BASE).rstrip("/")


def with_runbook_urls(text: str, base: str) -> str:
    """A rule file's (or its promtool unit tests') text with every alert's `runbook_url` annotation set to
    <base>/<alert>.md (the line replaced, or added first under `annotations:` / `exp_annotations:`); nothing
    else changes, comments included."""
    out: list[str] = []
    alert = None
    for line in text.splitlines(keepends=True):
        if m := re.match(r"\s*(?:- alert|alertname):\s*(\S+)", line):
            alert = m.group(1)
        elif alert and (m := re.match(r"(\s*)runbook_url:", line)):
            continue                                    # re-written right after `annotations:`
        out.append(line)
        if alert and (m := re.match(r"(\s*)(?:exp_)?annotations:\s*$", line)):
            out.append(f'{m.group(1)}  runbook_url: "{base}/{alert}.md"\n')
    return "".join(out)


# ---- output ---------------------------------------------------------------------------------------------

def outputs(base: str | None = None) -> dict[Path, str]:
    out = {}
    for name, fn in (("hostwall-traffic.json", traffic), ("hostwall-dos.json", dos),
                     ("hostwall-pipeline.json", pipeline)):
        out[HERE / name] = json.dumps(fn(), indent=2, ensure_ascii=False) + "\n"
    out[RULES] = with_runbook_urls(RULES.read_text(), base or runbook_base())
    out[RULE_TESTS] = with_runbook_urls(RULE_TESTS.read_text(), base or runbook_base())
    rules = yaml.safe_load(out[RULES])
    header = ("# Generated by dashboards/generate.py from dashboards/alerts/hostwall.rules.yml — do not edit;\n"
              "# edit the rule file and run `python dashboards/generate.py`.\n")
    out[ALERTING] = header + yaml.safe_dump(grafana_alerting(rules), sort_keys=False, allow_unicode=True, width=120)
    return out


def main(argv: list[str]) -> int:
    stale = []
    for path, text in outputs(runbook_base(argv)).items():
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for p in stale:
        print(f"{p.relative_to(HERE.parent)} is out of date: run python dashboards/generate.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
