"""collector/kernel_metrics.py: bounded label sets, record metrics, naming conventions, and the kernel
collector against a real enforcer instance in a netns lab (its numbers == `hostwall-enforcer status`)."""
from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hostwall.collector import kernel_metrics as km
from hostwall.collector import record_metrics
from hostwall.collector.metric_family import Family

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def samples(fams: list[Family], name: str) -> dict[tuple, float]:
    [f] = [f for f in fams if f.prom == name]
    return {lv: v for lv, v in f.samples}


# ---- bounded label sets ---------------------------------------------------------------------------

def test_port_top_n_is_bounded_monotonic_and_exact():
    rng = np.random.default_rng(7)
    top = km.PortTopN(3)
    counts = np.zeros((65536, 3), dtype=np.uint64)
    prev: dict[str, np.ndarray] = {}
    for step in range(30):
        for _ in range(20):                          # traffic to random ports, a few hot ones
            p = int(rng.choice([22, 80, 443, 53, int(rng.integers(1, 65536))]))
            counts[p, int(rng.integers(0, 3))] += int(rng.integers(1, 50))
        out = top.update(counts, map_id=1)
        assert len(out) <= 4 and "other" in out
        total = sum(v for v in out.values())
        assert (total == counts.sum(axis=0).astype(np.int64)).all()            # nothing lost or doubled
        for k, v in out.items():
            assert (v >= 0).all()
            if k in prev:
                assert (v >= prev[k]).all(), (step, k, prev[k], v)             # counters never go back
        prev = out
    assert set(out) - {"other"} <= {"22", "80", "443", "53"} | {k for k in out}


def test_port_top_n_restarts_on_a_new_map():
    top = km.PortTopN(2)
    c = np.zeros((65536, 3), dtype=np.uint64)
    c[80, 0] = 100
    assert top.update(c, map_id=1)["80"][0] == 0            # counted from the moment it got its label
    c[80, 0] = 150
    assert top.update(c, map_id=1)["80"][0] == 50
    c2 = np.zeros((65536, 3), dtype=np.uint64)
    c2[22, 1] = 5
    out = top.update(c2, map_id=2)                          # enforcer reloaded: fresh counters
    assert "80" not in out and out["22"][1] == 0 and out["other"][1] == 5


def test_top_talkers_bounded_and_decaying():
    clk = Clock()
    t = km.TopTalkers(2, tracked=3, tau_s=10, clock=clk)
    for i, n in enumerate([100, 50, 10, 5]):
        t.add(f"10.0.{i}.0/24", n)
    assert set(t.rows) == {"10.0.0.0/24", "10.0.3.0/24"}     # full: the weaker half made room for the new one
    t.add("10.0.1.0/24", 50)
    assert [k for k, _ in t.top()] == ["10.0.0.0/24", "10.0.1.0/24"]
    clk.t += 100                                             # ten time constants later ...
    t.add("10.0.1.0/24", 60)
    assert t.top()[0] == ("10.0.1.0/24", 110.0)              # ... the recent talker leads, count cumulative


def test_record_metrics_stay_bounded_under_a_spoofed_flood():
    """One drop-aggregation interval at its maximum (65536 keys, every one a new source prefix): the
    per-prefix table stays bounded and the totals stay exact (its speed is the benchmarks' business)."""
    rm = km.RecordMetrics()
    batch = [drop_summary(f"10.{i >> 8 & 255}.{i & 255}.0/24", "udp_flood", 1 + i % 7) for i in range(65536)]
    rm.observe(batch)
    fams = rm.families()
    assert len(rm.prefixes.rows) <= 1000 and len(samples(fams, "hostwall_source_prefix_dropped_packets")) == 10
    assert sum(samples(fams, "hostwall_dropped_packets").values()) == sum(1 + i % 7 for i in range(65536))


# ---- records ------------------------------------------------------------------------------------------

def drop_summary(prefix, reason, packets, iface="eth0", transport="udp", verdict="drop"):
    return {"hostwall": {"kind": "drop_summary", "reason": reason, "verdict": verdict, "source": {"prefix": prefix},
                         "interface": {"id": 2, "name": iface}},
            "network": {"packets": packets, "bytes": packets * 60, "iana_number": "17", "transport": transport}}


def anomaly(aid, state, severity, level, value="10.66.3.0/24", score=30.0, rate=900.0):
    return {"event": {"severity": level},
            "hostwall": {"kind": "anomaly", "anomaly": {
                "id": aid, "state": state, "severity": severity, "score": score, "rate": rate,
                "key": {"signal": "drops", "dimension": "source_prefix", "value": value},
                "top_talkers": [{"source": value, "count": 123.0}]}}}


def test_record_metrics_drops_anomalies_and_sources():
    clk = Clock()
    rm = km.RecordMetrics(profile_of=lambda i: {"eth0": "lab"}.get(i, ""), top_sources=2, clock=clk)
    rm.observe([drop_summary("10.66.3.0/24", "udp_flood", 1000), drop_summary("10.66.3.0/24", "udp_flood", 500),
                drop_summary("10.66.4.0/24", "policy_deny", 3, transport="tcp"),
                drop_summary("10.66.5.0/24", "default_deny", 1, iface="eth1", verdict="would_drop"),
                {"hostwall": {"kind": "drop_summary", "overflow": True, "reason": "udp_flood", "verdict": "drop"},
                 "network": {"packets": 7, "bytes": 420}},
                {"event": {"type": ["start"]}, "hostwall": {"kind": "flow"}, "source": {"ip": "10.66.2.2"}},
                {"event": {"type": ["end"]}, "hostwall": {"kind": "flow"}, "source": {"ip": "10.66.2.2"}},
                anomaly("a1", "open", "critical", 4), "not a record"])
    fams = rm.families()
    d = samples(fams, "hostwall_dropped_packets")
    assert d[("eth0", "lab", "drop", "udp_flood", "udp")] == 1500
    assert d[("eth0", "lab", "drop", "policy_deny", "tcp")] == 3
    assert d[("eth1", "", "would_drop", "default_deny", "udp")] == 1
    assert d[("unknown", "", "drop", "udp_flood", "unknown")] == 7          # overflow: no interface, no source
    assert sum(d.values()) == 1511 and rm.bad == 1
    assert samples(fams, "hostwall_source_prefix_dropped_packets") == {("10.66.3.0/24",): 1500,
                                                                       ("10.66.4.0/24",): 3}
    assert samples(fams, "hostwall_source_flows") == {("10.66.2.2",): 1}
    key = ("drops", "source_prefix", "10.66.3.0/24")
    assert samples(fams, "hostwall_anomaly_open") == {key + ("critical",): 1}
    assert samples(fams, "hostwall_anomaly_severity_level") == {key: 4}
    assert samples(fams, "hostwall_anomaly_top_talker_count") == {key + ("10.66.3.0/24",): 123.0}
    rm.observe([anomaly("a1", "update", "high", 3, score=-5.0, rate=0.0)])
    # a series that goes away is shown as 0 for a while: a push path (OTLP -> the OTel Collector's
    # prometheus exporter) would otherwise keep its last value, i.e. keep the anomaly "open" there
    assert samples(rm.families(), "hostwall_anomaly_open") == {key + ("high",): 1, key + ("critical",): 0}
    rm.observe([anomaly("a1", "close", "high", 3)])
    fams = rm.families()
    assert samples(fams, "hostwall_anomaly_open") == {key + ("high",): 0, key + ("critical",): 0}
    assert samples(fams, "hostwall_anomaly_score") == {key: 0} == samples(fams, "hostwall_anomaly_severity_level")
    assert samples(fams, "hostwall_anomaly_top_talker_count") == {key + ("10.66.3.0/24",): 0}
    clk.t += record_metrics.DEFAULT_GONE_KEEP_S + 1
    fams = rm.families()
    assert samples(fams, "hostwall_anomaly_open") == {} and samples(fams, "hostwall_anomaly_score") == {}
    assert samples(fams, "hostwall_anomaly_transitions") == {
        ("drops", "source_prefix", "open", "critical"): 1, ("drops", "source_prefix", "update", "high"): 1,
        ("drops", "source_prefix", "close", "high"): 1}


def test_open_anomalies_are_capped():
    rm = km.RecordMetrics(max_anomalies=5)
    rm.observe([anomaly(f"a{i}", "open", "low", 1, value=f"10.0.{i}.0/24", score=float(i)) for i in range(50)])
    shown = samples(rm.families(), "hostwall_anomaly_score")
    assert len(shown) == 5 and min(shown.values()) == 45.0                 # the highest scores
    for i in range(50, 200):                                               # churn: open, shown, closed
        rm.observe([anomaly(f"a{i}", "open", "low", 1, value=f"10.1.{i}.0/24", score=1000.0 + i)])
        rm.families()
        rm.observe([anomaly(f"a{i}", "close", "low", 1, value=f"10.1.{i}.0/24")])
    fams = rm.families()
    assert len(samples(fams, "hostwall_anomaly_open")) <= 4 * 5 and len(samples(fams, "hostwall_anomaly_score")) <= 20


# ---- names and exposition --------------------------------------------------------------------------

NAME = re.compile(r"^hostwall_[a-z0-9_]+$")


def spec_families() -> list[Family]:
    """One Family per SPEC entry with one sample each (label values "x")."""
    out = []
    for name in km.SPEC:
        f = km._family(name)
        f.add(tuple("x" for _ in f.labels), 1)
        out.append(f)
    return out


def test_names_follow_prometheus_conventions():
    for f in spec_families():
        assert NAME.match(f.prom), f.prom
        assert not f.prom.endswith("_total"), "Family names are without _total (prometheus_client adds it)"
        assert f.kind in ("counter", "gauge")
        if f.unit == "By":
            assert f.prom.endswith("_bytes"), f.prom
        if f.unit == "s":
            assert f.prom.endswith("_seconds"), f.prom
        if f.unit.endswith("/s"):
            assert f.prom.endswith("_per_second"), f.prom
        assert f.unit != "1", f"{f.prom}: unit 1 on a gauge becomes _ratio through the OTel exporter"
        assert f.help and km.SPEC[f.prom][4] and len(set(f.labels)) == len(f.labels)
        assert f.otel.startswith("hostwall.") and "_" not in f.otel


def test_every_family_emitted_is_in_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    rm = km.RecordMetrics()
    rm.observe([drop_summary("10.66.3.0/24", "udp_flood", 1), anomaly("a", "open", "high", 3)])
    fams = km.KernelCollector(tmp_path / "no-such-pin-dir", records=rm).families()
    assert samples(fams, "hostwall_enforcer_pinned") == {(): 0}
    names = [f.prom for f in fams]
    assert len(names) == len(set(names))
    for f in fams:
        assert f.prom in km.SPEC and f.labels == km.SPEC[f.prom][2]
        for lv, _ in f.samples:
            assert len(lv) == len(f.labels)


@pytest.mark.peers
def test_names_survive_the_otel_collector(otel_collector):
    """Pushed over OTLP as SelfMetrics pushes its own families, every family comes out of the OTel
    Collector's prometheus exporter under the name a direct scrape shows."""
    from hostwall.collector.config import MetricsOptions, OtlpOptions
    from hostwall.collector.metrics import SelfMetrics

    fams = spec_families()
    marker = secrets.token_hex(4)

    class Push(SelfMetrics):
        def families(self):
            return fams

    m = Push(MetricsOptions(otlp=otel_collector.grpc_endpoint, interval_s=3600), otlp_options=OtlpOptions(),
             resource={"service.name": "km-test", "service.instance.id": marker}, kernel=False)
    m.start()
    try:
        assert m.push()
    finally:
        m.close()
    want = {f.prom + ("_total" if f.kind == "counter" else "") for f in fams}

    def names():
        return {line.split("{")[0] for line in otel_collector.scrape().splitlines()
                if not line.startswith("#") and f'instance="{marker}"' in line}
    deadline = time.monotonic() + 20
    while not want <= names() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert want <= names(), sorted(want - names())


def test_exposition_and_register(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    reg = CollectorRegistry(auto_describe=False)
    kc = km.register(reg, tmp_path / "absent")
    kc.observe([drop_summary("10.66.3.0/24", "udp_flood", 42)])
    text = generate_latest(reg).decode()
    parsed = {m.name: m for m in text_string_to_metric_families(text)}
    assert parsed["hostwall_dropped_packets"].type == "counter"
    assert "hostwall_dropped_packets_total{" in text and "hostwall_enforcer_pinned 0.0" in text
    [s] = [s for s in parsed["hostwall_dropped_packets"].samples if s.name.endswith("_total")]
    assert s.value == 42 and s.labels["reason"] == "udp_flood"


def test_kernel_reads_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    clk = Clock()
    kc = km.KernelCollector(tmp_path / "absent", refresh_s=5, clock=clk)
    for _ in range(5):
        kc.families()
    assert kc.reads == 1
    clk.t += 5
    kc.families()
    assert kc.reads == 2


# ---- against a real instance ---------------------------------------------------------------------------

POLICY = """
version: 1
name: km-test
defaults: {ingress: deny, egress: allow, stateful: true}
rules:
  - {name: block-att, priority: 10, direction: ingress, action: deny, peers: [10.66.3.0/24]}
  - {name: web, priority: 100, direction: ingress, action: allow, protocol: tcp, peers: [10.66.2.0/24], ports: [80]}
  - {name: ping, priority: 100, direction: ingress, action: allow, protocol: icmp, peers: [10.66.2.0/24]}
dos:
  profiles:
    edge:
      per_source: {pps: 2000, burst: 4000}
      udp: {per_source_pps: 200}
interfaces:
  - {name: eth0, dos_profile: edge}
"""


@pytest.fixture(scope="module")
def instance():
    """The enforcer (control.start, in process) on a netns lab's protected host; state in a temp dir."""
    from tests.enforcer_instance import started_instance
    with started_instance(POLICY, "km") as (lab, dp, pin, _):
        dp.close()
        yield lab, pin


@pytest.mark.bpf
@pytest.mark.lab
def test_kernel_collector_matches_enforcer_status(instance, monkeypatch):
    from hostwall.enforcer import control
    from hostwall.enforcer.datapath import Datapath
    from hostwall.lab import traffic
    lab, pin = instance
    with traffic.echo_servers(lab, "prot", tcp=[80]):
        assert traffic.tcp_client_in(lab, "cli", lab.addr("prot"), 80, count=5, timeout=0.7)["ok"] == 5
        assert traffic.tcp_client_in(lab, "att", lab.addr("prot"), 80, count=2, timeout=0.3)["ok"] == 0
        traffic.udp_client_in(lab, "cli", lab.addr("prot"), 9999, count=3, timeout=0.2)
        traffic.trafgen_in(lab, "att", kind="udp", src="10.66.4.0/30", dport=5353, duration=1.0, rate_pps=5000)
    time.sleep(0.2)
    kc = km.KernelCollector(pin, refresh_s=0, pressure_refresh_s=0)
    dp = Datapath.open(pin)
    try:
        exact_before = dp.map_pressure()                # GET_NEXT_KEY walk: the reference count
    finally:
        dp.close()

    def no_fork():
        raise AssertionError("fork in the collector: a forked child shares asyncio's signal wake-up pipe")
    status_before = control.status(pin)             # lab hosts keep sending a little (ND, RS): the
    with monkeypatch.context() as m:                # read is bracketed by two status reads
        m.setattr(os, "fork", no_fork)              # netlink queries in another netns must not fork
        fams = kc.families()
    status = control.status(pin)
    assert kc.read_errors == 0
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):                                 # each read opens and closes the pins: nothing leaks
        kc.families()
    assert len(os.listdir("/proc/self/fd")) <= fds + 2 and kc.read_errors == 0
    assert samples(fams, "hostwall_enforcer_pinned") == {(): 1}
    assert samples(fams, "hostwall_policy_info") == {("km-test", status["revision"]): 1}
    assert samples(fams, "hostwall_policy_rules") == {(): 3}

    # verdict counters: the same numbers as status' counters
    dpk = samples(fams, "hostwall_datapath_packets")

    def verdicts(st: dict) -> dict:
        return {(hook, km.HOOK_DIRECTION[hook], verdict, reason): c["packets"]
                for hook, vs in st["counters"].items() for verdict, reasons in vs.items()
                for reason, c in reasons.items()}
    lo, hi = verdicts(status_before), verdicts(status)
    assert set(lo) <= set(dpk) <= set(hi)
    assert all(lo.get(k, 0) <= n <= hi[k] for k, n in dpk.items()), (lo, dpk, hi)
    assert sum(hi.values()) - sum(lo.values()) <= 10      # the bracket is tight: a few background packets
    assert dpk[("xdp_ingress", "ingress", "drop", "policy_deny")] >= 2
    assert dpk[("xdp_ingress", "ingress", "drop", "udp_flood")] > 1000
    assert dpk[("xdp_ingress", "ingress", "allow", "pass_rule")] >= 5

    rules = samples(fams, "hostwall_rule_packets")     # bracketed like the verdicts: background ND/RS
    rule_lo, rule_hi = ({(r["name"], r["direction"], r["action"]): r["packets"] for r in st["rules"]}
                        for st in (status_before, status))   # count under essential_icmp between the reads
    assert set(rules) == set(rule_hi) and all(rule_lo[k] <= n <= rule_hi[k] for k, n in rules.items()), \
        (rule_lo, rules, rule_hi)
    assert rules[("web", "ingress", "allow")] >= 5 and rules[("block-att", "ingress", "deny")] >= 2

    ports = samples(fams, "hostwall_port_packets")
    per_port = {p["port"]: p for p in status["ports"]}
    totals = {v: sum(n for (port, vv), n in ports.items() if vv == v) for v in ("allow", "drop", "would_drop")}
    assert totals == {"allow": sum(p["allowed"] for p in per_port.values()),
                      "drop": sum(p["dropped"] for p in per_port.values()),
                      "would_drop": sum(p["would_drop"] for p in per_port.values())}
    assert len({p for p, _ in ports}) <= km.DEFAULT_TOP_PORTS + 1

    dos = samples(fams, "hostwall_dos_profile_dropped_packets")
    assert dos == {("edge", r): n for r, n in status["dos"]["edge"].items()} and dos[("edge", "udp_flood")] > 1000

    ent, cap = samples(fams, "hostwall_map_entries"), samples(fams, "hostwall_map_capacity")
    press = status["map_pressure"]
    for name, row in press.items():                 # (lab hosts keep sending a little: counts only grow)
        assert cap[(name,)] == row["capacity"], name
        if name.startswith("policy."):
            assert ent[(name,)] == row["entries"], name
        elif name in ("hw_ct4", "hw_ct6", "hw_dos_src", "hw_dos_banned"):
            assert exact_before[name]["entries"] <= ent[(name,)] <= row["entries"], name
    assert ent[("hw_dos_src",)] >= 4 and ent[("policy.rules",)] == 3

    ns = lab.ns("prot")
    att = samples(fams, "hostwall_interface_attached")
    assert att == {("eth0", ns, "xdp"): 1, ("eth0", ns, "tc_egress"): 1}      # no TC ingress behind XDP
    assert samples(fams, "hostwall_interface_info") == {("eth0", ns, status["interfaces"][0]["xdp_mode"], "edge"): 1}
    assert samples(fams, "hostwall_interface_packets")[("eth0", ns, "receive")] > 5000

    # someone removes our XDP program behind the enforcer's back: reported at the next read
    mode = "xdpgeneric" if status["interfaces"][0]["xdp_mode"] == "generic" else "xdp"
    subprocess.run(["ip", "-n", ns, "link", "set", "dev", "eth0", mode, "off"], check=True)
    att = samples(kc.families(), "hostwall_interface_attached")
    assert att == {("eth0", ns, "xdp"): 0, ("eth0", ns, "tc_egress"): 1}
    assert kc.profile_of("eth0") == "edge"
