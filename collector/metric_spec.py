"""The dashboard metrics' catalogue: every family the kernel and record metrics export, with kind,
unit, labels and help (docs/metrics.md documents each one; tests check both against SPEC), and the
conversion of Family objects to prometheus_client families."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .dns_metrics import DNS_SPEC
from .metric_family import Family

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
                                    "tc_egress) is attached to the interface, else 0 (also for "
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
    # kernel: tracking under attack (collector/attack_metrics.py)
    "hostwall_port_syn_packets": ("counter", "{packet}", ("port",), "Ingress TCP SYNs per destination port, whatever "
                                  "became of them: the per-port SYN rate (ports labelled as hostwall_port_packets)",
                                  "hw_port_stats"),
    "hostwall_conntrack_evicted": ("counter", "{entry}", ("map", "kind"), "Connections a full conntrack bucket "
                                   "evicted, by kind: unconfirmed (handshake not complete, no reply yet: evicted "
                                   "first) or established (only from a bucket holding no unconfirmed one)",
                                   "hw_ct_stats"),
    "hostwall_syn_proxy_outcomes": ("counter", "{packet}", ("outcome",), "The SYN proxy's work: SYNs answered with "
                                    "a cookie, SYNs let through to refresh the host's cookie window, cookie ACKs "
                                    "valid / invalid, SYNs that could not be answered, SYNs the per-port guard "
                                    "dropped", "hw_syn_stats"),
    "hostwall_syn_proxy_active": ("gauge", "{state}", ("scope", "key"), "1 while an `auto` SYN proxy answers: for a "
                                  "port over its SYN rate (scope port, key the port) or for every port of a profile "
                                  "under conntrack pressure (scope pressure, key the profile)",
                                  "hw_syn_ports, hw_syn_state"),
    "hostwall_flows_aggregated": ("counter", "{flow}", ("kind", "count"), "Connections the datapath counted in "
                                  "flow summaries instead of one event each, by kind (unconfirmed, over_share, "
                                  "over_budget, syn_cookie) and count (flows started, ended)", "hw_flow_stats"),
    # this module
    "hostwall_kernel_metrics_read_errors": ("counter", "{error}", (), "Kernel reads for these metrics that failed "
                                            "(the previous values are served)", "this module"),
    "hostwall_kernel_metrics_read_duration_seconds": ("gauge", "s", (), "Duration of the last kernel read for these "
                                                      "metrics", "this module"),
}

SPEC.update(DNS_SPEC)                    # the DNS proxy and FQDN rules (collector/dns_metrics.py)


def spec_family(prom: str) -> Family:
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
