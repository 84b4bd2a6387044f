"""`syn.proxy: auto` end to end (docs/dos.md): the real enforcer and collector, a many-source SYN flood.

The proxy switches on for the attacked port when its SYN rate crosses `per_port_pps`, a client's new
connections keep working, and it switches off `proxy_quiet` after the flood. Each switch is an audit
record (written by `hostwall-enforcer run`, shipped by the collector) and an anomaly record (made by the
collector from the same kernel state); the flood is also named by its port in the `syns` signal."""
from __future__ import annotations

import time

import pytest

from hostwall.lab import synflood, traffic
from hostwall.lab.collector_proc import CollectorProcess, read_jsonl
from hostwall.lab.enforcer_proc import EnforcerProcess
from tests.collector.test_records import validator

pytestmark = pytest.mark.lab

POLICY = """
version: 1
name: synproxy-auto
defaults: {ingress: deny, egress: allow, stateful: true}
rules:
  - {name: web, priority: 10, direction: ingress, action: allow, protocol: tcp, peers: [10.66.0.0/16], ports: [8080]}
dos:
  profiles:
    edge:
      syn: {per_source_pps: 200, per_port_pps: 2000, proxy: auto, proxy_quiet: 3s, proxy_ports: [8080]}
interfaces:
  - {name: eth0, dos_profile: edge}
"""


def _records(path, pred, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in read_jsonl(path) if pred(r)] if path.exists() else []
        if recs or time.monotonic() > deadline:
            return recs
        time.sleep(0.5)


def test_auto_switches_with_audit_and_anomaly_records(lab, tmp_path):
    synflood.route_spoofed(lab)
    synflood.protect_sysctls(lab)
    pol = tmp_path / "policy.yaml"
    pol.write_text(POLICY)
    prot = lab.addr("prot")
    with traffic.echo_servers(lab, "prot", tcp=[8080]), EnforcerProcess(lab, pol) as enf, \
            CollectorProcess(enf, tmp_path / "out") as col:
        time.sleep(3.0)                                      # the detector's warm-up window of normal quiet
        legit = traffic.start_in(lab, "cli", "tcp-client", host=prot, port=8080, count=300, interval=0.01,
                                 op_timeout=2.0)
        traffic.trafgen_in(lab, "att", kind="syn", src=synflood.SPOOF_V4, sport=(1024, 65000), dport=8080,
                           duration=4.0)
        res = legit.result(timeout=120)
        on_status = enf.status()["syn_proxy"]
        closed = _records(col.jsonl, lambda r: r["hostwall"]["kind"] == "anomaly"
                          and r["hostwall"]["anomaly"]["key"]["signal"] == "syn_proxy"
                          and r["hostwall"]["anomaly"]["state"] == "close", timeout=30)
        audits = _records(col.jsonl, lambda r: r["hostwall"]["kind"] == "audit"
                          and r["event"]["action"] == "syn-proxy-off", timeout=15)
        assert col.stop() == 0
    recs = read_jsonl(col.jsonl)
    assert res["ok"] >= 0.99 * res["count"], res
    assert on_status["stats"]["answered"] > 10_000, on_status
    sw = [r for r in recs if r["hostwall"]["kind"] == "anomaly" and r["hostwall"]["anomaly"]["key"]["signal"] == "syn_proxy"]
    assert [(r["hostwall"]["anomaly"]["state"], r["hostwall"]["anomaly"]["key"]["value"]) for r in sw] == \
        [("open", "tcp/8080"), ("close", "tcp/8080")], sw
    au = [r for r in recs if r["hostwall"]["kind"] == "audit" and r["event"]["action"].startswith("syn-proxy")]
    assert [(r["event"]["action"], r["hostwall"]["syn_proxy"]["port"]) for r in au] == \
        [("syn-proxy-on", 8080), ("syn-proxy-off", 8080)], au
    assert closed and audits
    syns = {r["hostwall"]["anomaly"]["key"]["value"] for r in recs if r["hostwall"]["kind"] == "anomaly"
            and r["hostwall"]["anomaly"]["key"]["signal"] == "syns"}
    assert "tcp/8080" in syns, syns                           # the flood named by its port
    for r in sw:
        assert not list(validator("anomaly.schema.json").iter_errors(r))
    for r in au:
        assert not list(validator("audit.schema.json").iter_errors(r))
