"""Real floods from lab namespaces against the real enforcer with a DoS profile (issue: DoS profiles).

During each flood a legitimate client on another host keeps ≥ 99% of its TCP echo requests working,
the events admitted into the ring buffer stay within the budget, and afterwards the drained drop
summaries add up exactly to the kernel's drop counters."""
from __future__ import annotations

import time

import pytest

from hostwall.bpf import layout as L
from hostwall.enforcer.datapath import Datapath
from hostwall.lab import traffic
from hostwall.lab.enforcer_proc import EnforcerProcess, events_admitted
from tests.bpf.test_events import drain_drops

pytestmark = pytest.mark.lab

POLICY = """
version: 1
name: dos-lab
defaults: {ingress: deny, egress: allow, stateful: true}
rules:
  - {name: lab-web, priority: 10, direction: ingress, action: allow, protocol: tcp, peers: [10.66.0.0/16], ports: [80]}
  - {name: lab-mdns, priority: 10, direction: ingress, action: allow, protocol: udp, peers: [10.66.0.0/16], ports: [5353]}
  - {name: lab-ping, priority: 10, direction: ingress, action: allow, protocol: icmp, peers: [10.66.0.0/16]}
dos:
  profiles:
    edge:
      per_source: {pps: 2000, burst: 4000}
      syn: {per_source_pps: 200, global_pps: 100000}
      udp: {per_source_pps: 1000}
      icmp: {per_source_pps: 50}
      ban: {after: 3s, duration: 60s}
interfaces:
  - {name: eth0, dos_profile: edge}
"""
FLOOD_S = 3.0


def drop_counters(dp: Datapath) -> dict[int, int]:
    st = dp.stats()
    out: dict[int, int] = {}
    for hook in L.HOOK_NAMES:
        for v in (L.C["HW_V_DROP"], L.C["HW_V_WOULD_DROP"]):
            for r in L.DROP_REASONS:
                n = int(st["packets"][L.stats_index(hook, v, r)])
                if n:
                    out[r] = out.get(r, 0) + n
    return out


def summaries(dp: Datapath) -> dict[int, int]:
    keys, vals, ov = drain_drops(dp)
    out: dict[int, int] = {}
    for k, v in zip(keys, vals):
        out[int(k["reason"])] = out.get(int(k["reason"]), 0) + int(v[0])
    for (_, r), n in ov.items():
        out[r] = out.get(r, 0) + n
    return out


def flood(lab, kind: str):
    if kind == "syn":
        return traffic.trafgen_in(lab, "att", kind="syn", src="10.66.4.0/26", sport=(1024, 65000), dport=80,
                                 duration=None, rate_pps=150_000)
    if kind == "udp":
        return traffic.trafgen_in(lab, "att", kind="udp", dport=5353, duration=None)      # as fast as it goes
    p = lab.popen("att", ["timeout", str(FLOOD_S), "hping3", "--icmp", "--flood", "-q", lab.addr("prot")])
    return p


def stop(lab, f):
    if hasattr(f, "stop"):
        return f.stop()
    try:
        f.wait(timeout=FLOOD_S + 10)
    finally:
        lab.stop(f)
    return {}


@pytest.mark.parametrize("kind,reason", [("syn", "syn_flood"), ("udp", "udp_flood"), ("icmp", "icmp_flood")])
def test_flood_is_absorbed_legit_client_unharmed_and_fully_accounted(lab, tmp_path, kind, reason):
    pol = tmp_path / "dos.yaml"
    pol.write_text(POLICY)
    with traffic.echo_servers(lab, "prot", tcp=[80]), EnforcerProcess(lab, pol) as enf:
        dp = Datapath.open(enf.pin_dir)
        try:
            summaries(dp)                                  # start a clean interval
            drops0 = drop_counters(dp)
            ev0, t0 = events_admitted(dp), time.monotonic()
            legit = traffic.start_in(lab, "cli", "tcp-client", host=lab.addr("prot"), port=80, count=400,
                                     interval=0.01, op_timeout=1.0)
            time.sleep(0.3)
            f = flood(lab, kind)
            time.sleep(FLOOD_S)
            sent = stop(lab, f)
            res = legit.result(timeout=60)
            elapsed = time.monotonic() - t0
            admitted = events_admitted(dp) - ev0
            time.sleep(0.2)
            got = summaries(dp)
            drops1 = drop_counters(dp)
            status = enf.status()
        finally:
            dp.close()
    assert res["ok"] >= 0.99 * res["count"], res
    delta = {r: n - drops0.get(r, 0) for r, n in drops1.items() if n - drops0.get(r, 0)}
    r = L.C[f"HW_R_{reason.upper()}"]
    assert delta.get(r, 0) > 1000, (delta, sent)                    # the flood really was absorbed
    assert got == delta, (got, delta)                               # summaries == kernel counters, exactly
    budget = L.C["HW_EVENT_BUDGET"]
    assert admitted <= budget * elapsed * 1.05 + 2000, (admitted, elapsed)
    assert status["dos"]["edge"][reason] >= delta[r] - status["dos"]["edge"].get("banned", 0)
