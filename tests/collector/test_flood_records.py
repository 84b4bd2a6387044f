"""Records of tracking under attack without a kernel: flow summaries from a drained flow aggregation,
the per-port SYN signal and the SYN proxy's switches as anomaly records (collector/flow_summary.py,
collector/syn_proxy.py), each checked against its schema and the OCSF mapping."""
from __future__ import annotations

import numpy as np

from hostwall.bpf import flow_agg
from hostwall.bpf import layout as L
from hostwall.bpf.syn_proxy import ProxyState
from hostwall.collector import flow_summary
from hostwall.collector.anomaly import AnomalyConfig, AnomalyDetector
from hostwall.collector.encoders.ocsf import to_ocsf
from hostwall.collector.records import SCHEMA_VERSION, RecordBuilder, iso_ns
from hostwall.collector.syn_proxy import SynWatch

from .test_records import CLOCK, HOST, ct4, validator

T = 5_000 * 10**9


def drain(rows: list[tuple], overflow: dict | None = None) -> flow_agg.FlowDrain:
    """rows: (peer bytes, plen, dport, proto, direction, kind name, flows, ended, packets, bytes)."""
    keys = np.zeros(len(rows), dtype=flow_agg.KEY_DT)
    vals = np.zeros(len(rows), dtype=flow_agg.VAL_DT)
    kinds = {v: k for k, v in flow_agg.KINDS.items()}
    for i, (peer, plen, dport, proto, d, kind, fl, en, pk, by) in enumerate(rows):
        keys[i]["peer"][:len(peer)] = np.frombuffer(peer, np.uint8)
        keys[i]["prefix_len"], keys[i]["dport"], keys[i]["proto"] = plen, dport, proto
        keys[i]["family"] = 4 if len(peer) == 4 else 6
        keys[i]["direction"], keys[i]["kind"] = d, kinds[kind]
        vals[i] = (fl, en, pk, by, T, T + 10**9)
    ov = {}
    for kind, (fl, en, pk, by) in (overflow or {}).items():
        v = np.zeros(1, dtype=flow_agg.VAL_DT)[0]
        v["flows"], v["ended"], v["packets"], v["bytes"] = fl, en, pk, by
        ov[kinds[kind]] = v
    return flow_agg.FlowDrain(keys, vals, ov)


def test_flow_summaries_of_a_drain_add_up_and_validate():
    b = RecordBuilder(HOST, None)
    d = drain([(bytes([10, 66, 128, 0]), 24, 8080, 6, 0, "unconfirmed", 900, 900, 1800, 108_000),
               (bytes([10, 66, 3, 0]), 24, 5353, 17, 0, "over_share", 5000, 4000, 4000, 240_000),
               (bytes.fromhex("fd660080") + bytes(12), 64, 8080, 6, 0, "syn_cookie", 300, 0, 300, 18_000),
               (bytes([192, 0, 2, 0]), 24, 443, 6, 1, "over_budget", 7, 7, 70, 7000)],
              overflow={"over_share": (12, 0, 0, 0)})
    recs = flow_summary.from_drain(b, d, CLOCK.wall_ns(T), CLOCK.wall_ns(T + 10**9), CLOCK)
    assert len(recs) == 5
    v = validator("flow.schema.json")
    for r in recs:
        assert not list(v.iter_errors(r)), (r, list(v.iter_errors(r)))
        assert "ip" not in r.get("source", {}) and "ip" not in r.get("destination", {})   # prefixes, not hosts
        o = to_ocsf(r)
        assert o["class_uid"] == 4001 and o["count"] == r["hostwall"]["summary"]["flows"]
    by_kind = {r["hostwall"]["summary"]["kind"]: r for r in recs if not r["hostwall"].get("overflow")}
    u = by_kind["unconfirmed"]
    assert u["source"]["address"] == "10.66.128.0/24" == u["hostwall"]["source"]["prefix"]
    assert (u["destination"]["port"], u["network"]["packets"], u["network"]["direction"]) == (8080, 1800, "ingress")
    assert by_kind["syn_cookie"]["source"]["address"] == "fd66:80::/64"
    eg = by_kind["over_budget"]                                       # an outgoing connection: the peer is its destination
    assert eg["destination"]["address"] == "192.0.2.0/24" == eg["hostwall"]["source"]["prefix"]
    assert eg["network"]["direction"] == "egress" and "address" not in eg.get("source", {})
    # the interval's bounds stamp the records (as drop summaries): never the datapath's tick clock
    assert {(r["@timestamp"], r["event"]["start"], r["event"]["end"]) for r in recs} == \
        {(iso_ns(CLOCK.wall_ns(T + 10**9)), iso_ns(CLOCK.wall_ns(T)), iso_ns(CLOCK.wall_ns(T + 10**9)))}
    assert all(r["hostwall"]["schema_version"] == SCHEMA_VERSION for r in recs)
    totals = {k: sum(r["hostwall"]["summary"]["flows"] for r in recs if r["hostwall"]["summary"]["kind"] == k)
              for k in flow_agg.KINDS.values()}
    assert totals == {k: c["flows"] for k, c in d.totals().items()}
    assert len({r["event"]["id"] for r in recs}) == 5                # unique, and the same fact the same id
    again = flow_summary.from_drain(b, d, CLOCK.wall_ns(T), CLOCK.wall_ns(T + 10**9), CLOCK)
    assert [r["event"]["id"] for r in again] == [r["event"]["id"] for r in recs]


def summary_records() -> list[dict]:
    """One flow_summary of each shape: datapath keys of every kind (v4, v6, egress), an overflow, and the
    conntrack scan's ends in aggregate (an idle expiry and a FIN close after the grace period)."""
    b = RecordBuilder(HOST, None)
    d = drain([(bytes([10, 66, 128, 0]), 24, 8080, 6, 0, "unconfirmed", 900, 900, 1800, 108_000),
               (bytes([10, 66, 3, 7]), 32, 5353, 17, 0, "over_share", 5000, 4000, 4000, 240_000),
               (bytes.fromhex("fd660080") + bytes(12), 64, 8080, 6, 0, "syn_cookie", 300, 0, 300, 18_000),
               (bytes([192, 0, 2, 0]), 24, 443, 6, 1, "over_budget", 7, 7, 70, 7000)],
              overflow={"over_share": (12, 0, 0, 0)})
    recs = flow_summary.from_drain(b, d, CLOCK.wall_ns(T), CLOCK.wall_ns(T + 10**9), CLOCK)
    rows = [ct4("10.66.9.1", "10.66.1.2", 40000 + i, 80, state=1, report=L.C["HW_REP_PENDING"]) for i in range(3)]
    rows.append(ct4("10.66.1.2", "192.0.2.9", 40100, 443, state=4, fin_seen=3, origin=1,
                    report=L.C["HW_REP_AGG_SHARE"]))
    keys, ents = np.concatenate([k for k, _ in rows]), np.concatenate([e for _, e in rows])
    recs += flow_summary.from_scan(b, keys, ents, 24, 64, CLOCK.wall_ns(T), CLOCK.wall_ns(T + 2 * 10**9), CLOCK)
    return recs


def test_conntrack_scan_summaries_group_by_peer_prefix_and_kind():
    scan = [r for r in summary_records() if r["hostwall"]["summary"]["origin"] == "conntrack_scan"]
    got = {(r["hostwall"]["source"]["prefix"], r["network"]["direction"], r["hostwall"]["summary"]["kind"],
            r["hostwall"]["summary"]["flows"], r["hostwall"]["summary"]["ended"], r["network"]["packets"]) for r in scan}
    assert got == {("10.66.9.0/24", "ingress", "unconfirmed", 3, 3, 30),          # never confirmed: started here
                   ("192.0.2.0/24", "egress", "over_share", 0, 1, 10)}           # started in an earlier summary
    eg = next(r for r in scan if r["network"]["direction"] == "egress")
    assert eg["destination"] == {"address": "192.0.2.0/24", "port": 443}


def _detector() -> AnomalyDetector:
    return AnomalyDetector(AnomalyConfig(window_s=2.0, bucket_s=1.0, warmup_windows=1, quiet_s=2.0, min_rate=50),
                           HOST)


def switch_records() -> tuple[list[dict], list[dict]]:
    """The SYN proxy's switches as anomalies: (opened, closed), a port and a profile under pressure."""
    det = _detector()
    w = SynWatch(det, lambda: ("edge",))
    syns = np.zeros(65536, dtype=np.int64)
    now = 1_700_000_000.0
    assert w.tick(syns, ProxyState(T, {}, {}), now) == []
    syns[8080] += 30_000
    opened = w.tick(syns, ProxyState(T + 10**9, {8080: T + 5 * 10**8}, {0: T + 10**9}), now + 1)
    assert w.tick(syns, ProxyState(T + 2 * 10**9, {8080: T + 5 * 10**8}, {0: T + 10**9}), now + 2) == []
    closed = w.tick(syns, ProxyState(T + 3 * 10**9, {}, {}), now + 3)
    return opened, closed


def syns_records() -> list[dict]:
    """A flood spread over many sources: the port's SYN count rises (no drops, no flows: the proxy
    answers them) and the detector opens an anomaly keyed by the port (signal `syns`)."""
    det = _detector()
    w = SynWatch(det)
    syns = np.zeros(65536, dtype=np.int64)
    t = 1_700_000_100.0
    for i in range(8):                                 # quiet: a few SYNs a second to port 443
        syns[443] += 5
        w.tick(syns, ProxyState(T, {}, {}), t + i)
        det.tick(t + i)
    recs = []
    for i in range(8, 12):                             # then 20 000 SYNs a second
        syns[443] += 20_000
        w.tick(syns, ProxyState(T, {}, {}), t + i)
        recs += det.tick(t + i + 0.5)
    return recs


def switch_audit_records() -> list[dict]:
    """The enforcer's audit records of an automatic switch on and off, as the collector ships them."""
    from hostwall.bpf.state import audit_record
    b = RecordBuilder(HOST, None)
    body = {"scope": "port", "port": 8080, "trigger": "syn_rate", "since": "2026-01-01T00:00:00Z"}
    return [b.on_audit(audit_record(f"syn-proxy-{st}", {"pin_dir": "/sys/fs/bpf/x", "syn_proxy": {"state": st, **body}},
                                    "hostwall-enforcer (syn proxy auto)")) for st in ("on", "off")]


def test_syn_proxy_switches_open_and_close_anomalies():
    opened, closed = switch_records()
    assert [(r["hostwall"]["anomaly"]["state"], r["hostwall"]["anomaly"]["key"]["value"]) for r in opened] == \
        [("open", "tcp/8080"), ("open", "conntrack_pressure")]
    assert opened[0]["hostwall"]["anomaly"]["rate"] == 30_000.0
    assert opened[1]["hostwall"]["anomaly"]["key"]["profile"] == "edge"
    assert [r["hostwall"]["anomaly"]["state"] for r in closed] == ["close", "close"]
    assert closed[0]["hostwall"]["anomaly"]["id"] == opened[0]["hostwall"]["anomaly"]["id"]
    v = validator("anomaly.schema.json")
    for r in opened + closed:
        assert not list(v.iter_errors(r)), list(v.iter_errors(r))
        assert to_ocsf(r)["class_uid"] == 2004


def test_per_port_syns_are_an_anomaly_signal_by_port():
    recs = syns_records()
    keys = {(r["hostwall"]["anomaly"]["key"]["signal"], r["hostwall"]["anomaly"]["key"]["value"]) for r in recs}
    assert ("syns", "tcp/443") in keys, recs
    assert not list(validator("anomaly.schema.json").iter_errors(recs[0]))


def test_audit_record_of_a_switch_validates():
    on, off = switch_audit_records()
    v = validator("audit.schema.json")
    for out in (on, off):
        assert not list(v.iter_errors(out)), list(v.iter_errors(out))
    assert "SYN proxy on for port 8080" in to_ocsf(on)["message"]
    assert "SYN proxy off for port 8080" in to_ocsf(off)["message"]
    assert L.SYN_PROXY_MODES["auto"] == 2
