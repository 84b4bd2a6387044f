"""Bounded reports under a flood, end to end: the real enforcer and the real `hostwall-collector` in a
netns lab (issue 20; docs/collector.md, "Flows under a flood").

During a many-source SYN flood (SYN proxy off: every SYN opens a tracked connection) and during a
one-source UDP flood with random source ports to an allowed port, a legitimate client opens and closes
connections to the protected host. Afterwards:
- every connection of the client has its own flow start and flow end record;
- the flood's connections arrive in flow summaries; the datapath's summaries add up exactly to the
  kernel's counters (hw_flow_stats), and every connection the table inserted is reported once: a
  flow_start record, or a summary's `flows`;
- no flow start was lost to the budget (kernel outcome aggregated, never budget), the ledger balances.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest

from hostwall.bpf import conntrack
from hostwall.enforcer.datapath import Datapath
from hostwall.lab import synflood, traffic
from hostwall.lab.collector_proc import CollectorProcess, read_jsonl
from hostwall.lab.enforcer_proc import EnforcerProcess

pytestmark = pytest.mark.lab

FLOOD_S = 5.0
POLICY = """
version: 1
name: flood-reports
defaults: {ingress: deny, egress: allow, stateful: true}
rules:
  - {name: web, priority: 10, direction: ingress, action: allow, protocol: tcp, peers: [10.66.0.0/16], ports: [8080]}
  - {name: mdns, priority: 10, direction: ingress, action: allow, protocol: udp, peers: [10.66.0.0/16], ports: [5353]}
"""


def _live(dp) -> tuple[int, int]:
    """(live entries, of which PENDING: start not reported yet), IPv4."""
    with conntrack.CtTable(dp.map_fds["hw_ct4"], 4) as t:
        e = t.slots[t.live()]["e"]
        from hostwall.bpf import layout as L
        return len(e), int((e["report"] == L.C["HW_REP_PENDING"]).sum())


def _unreported_closes(dp) -> int:
    """Connections closed by both FINs whose end record is not durable yet (the collector reports them
    after the close grace period and marks them REPORTED_DURABLE once the record is durable in its
    sinks, docs/collector.md), both families."""
    from hostwall.bpf import layout as L
    n = 0
    for fam in (4, 6):
        with conntrack.CtTable(dp.map_fds[conntrack.MAPS[fam]], fam) as t:
            e = t.slots[t.live()]["e"]
            n += int(((e["state"] == L.C["HW_CT_CLOSING"]) & (e["reported"] != conntrack.REPORTED_DURABLE) &
                      ((e["fin_seen"] & L.C["HW_CT_F_END_EMITTED"]) == 0)).sum())
    return n


def _run(lab, tmp_path, flood_kind: str):
    synflood.route_spoofed(lab)
    pol = tmp_path / "policy.yaml"
    pol.write_text(POLICY)
    prot, cli = lab.addr("prot", 4), lab.addr("cli", 4)
    with traffic.echo_servers(lab, "prot", tcp=[8080]), EnforcerProcess(lab, pol) as enf, \
            CollectorProcess(enf, tmp_path / "out") as col:
        dp = Datapath.open(enf.pin_dir)
        try:
            inserted0 = dp.ct_stats()[4]["inserted"]
            legit = traffic.start_in(lab, "cli", "tcp-client", host=prot, port=8080, count=200, interval=0.02,
                                     op_timeout=2.0)
            if flood_kind == "syn":
                sent = traffic.trafgen_in(lab, "att", kind="syn", src=synflood.SPOOF_V4, sport=(1024, 65000),
                                          dport=8080, duration=FLOOD_S)
            else:
                sent = traffic.trafgen_in(lab, "att", kind="udp", sport=(1024, 65000), dport=5353,
                                          duration=FLOOD_S)
            res = legit.result(timeout=120)
            # wait (bounded) until the flood's entries have ended: unconfirmed ones expire in 10 s
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _live(dp)[1]:
                time.sleep(0.5)
            live, pending = _live(dp)
            while time.monotonic() < deadline + 30 and _unreported_closes(dp):
                time.sleep(0.5)                     # the client's last FIN closes: durable after their grace
            assert not _unreported_closes(dp), "the collector did not report the client's closes in time"
            inserted = dp.ct_stats()[4]["inserted"] - inserted0
            kernel_agg = enf.status()["syn_proxy"]["flows_aggregated"]
            ev = enf.status()
        finally:
            dp.close()
        assert col.stop() == 0
        final = col.final_status
    return dict(res=res, sent=sent, records=read_jsonl(col.jsonl), inserted=inserted, live=live,
                pending=pending, kernel_agg=kernel_agg, final=final, cli=cli, status=ev)


@pytest.mark.parametrize("flood_kind", ["syn", "udp"])
def test_legit_flows_keep_their_records_and_the_flood_adds_up(lab, tmp_path, flood_kind):
    r = _run(lab, tmp_path, flood_kind)
    res, recs = r["res"], r["records"]
    assert r["sent"]["packets"] and r["sent"]["packets"] > 100_000, r["sent"]
    assert res["count"] == 200 and res["ok"] >= 0.99 * res["count"], res
    # every connection of the client: its own start and end records
    flows = [x for x in recs if x["hostwall"]["kind"] == "flow" and x.get("source", {}).get("ip") == r["cli"]
             and x.get("destination", {}).get("port") == 8080]
    by_id: dict[str, Counter] = defaultdict(Counter)
    for x in flows:
        by_id[x["network"]["community_id"]][x["event"]["action"]] += 1
    complete = [c for c in by_id.values() if c["flow_start"] == 1 and c["flow_end"] == 1]
    assert len(complete) >= res["ok"], (len(complete), res, Counter(tuple(sorted(c)) for c in by_id.values()))
    # the flood: summaries of the datapath == the kernel's counters, per kind
    sums: dict[tuple, Counter] = defaultdict(Counter)
    for x in recs:
        if x["hostwall"]["kind"] == "flow_summary":
            s = x["hostwall"]["summary"]
            for f in ("flows", "ended"):
                sums[(s["origin"], s["kind"])][f] += s[f]
            sums[(s["origin"], s["kind"])]["packets"] += x["network"]["packets"]
    for kind, c in r["kernel_agg"].items():
        got = sums.get(("datapath", kind), Counter())
        assert (got["flows"], got["ended"], got["packets"]) == (c["flows"], c["ended"], c["packets"]), (kind, got, c)
    assert sum(c["flows"] for c in sums.values()) > 1000                    # the flood came as aggregates
    # every inserted connection reported once: a flow_start record or a summary's flows
    starts = sum(1 for x in recs if x["hostwall"]["kind"] == "flow" and x["event"]["action"] == "flow_start")
    assert starts + sum(c["flows"] for k, c in sums.items() if k[1] != "syn_cookie") == r["inserted"] - r["pending"]
    # nothing lost on the way: flow starts are never over budget, and the ledger balances
    kev = r["final"]["ledger"]["kernel_events"]["flow_start"]
    assert kev["budget"] == 0 and kev["ringbuf_full"] == 0, kev
    assert r["final"]["ledger"]["ok"], r["final"]["ledger"]
