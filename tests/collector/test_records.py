"""RecordBuilder: kernel batches (enforcer.layout dtypes) → canonical records, checked against
schemas/flow.schema.json and schemas/audit.schema.json and against the kernel facts they came from.

sample_records() (also used by test_encoders.py) builds one record of every kind and shape."""
from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock
from hostwall.bpf.state import AttachedInterface, InstanceState
from hostwall.collector.community_id import community_id
from hostwall.collector.enrich.host import NO_RULE_SLOT, HostInfo, InstanceStateView
from hostwall.collector.records import SCHEMA_VERSION, RecordBuilder, iso_ns, parse_iso_ns

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "schemas"
HOST = HostInfo("fw-1", "0e1d-boot", "/sys/fs/bpf/hostwall/test", "0.1.0", "6.1.0")
CLOCK = Clock(1_700_000_000 * 10**9)          # mono 0 = 2023-11-14T22:13:20Z
T = 5 * 10**9                                  # a monotonic instant
EV, CT4, CT6, CTE = (L.DTYPES[n] for n in ("hw_event", "hw_ct4_key", "hw_ct6_key", "hw_ct_entry"))
DK, DV = L.DTYPES["hw_drop_key"], L.DTYPES["hw_drop_val"]
TYPE = {n: v for v, n in L.EVENT_TYPE_NAMES.items()}
R = {n: v for v, n in L.REASON_NAMES.items()}
V = {n: v for v, n in L.VERDICT_NAMES.items()}


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def state(**kw) -> InstanceState:
    base = dict(pin_dir=HOST.pin_dir, build="b", revision="rev-7", revision_id=7, policy_name="edge-web",
                revisions={"6": "rev-6", "7": "rev-7"}, slots={"ssh-admin": 0, "web": 1, "threat-intel": 2},
                interfaces=[AttachedInterface("eth0", None, "auto", "generic")])
    base.update(kw)
    return InstanceState(**base)


def builder(**kw) -> RecordBuilder:
    return RecordBuilder(HOST, InstanceStateView(HOST.pin_dir, state()), **kw)


def addr16(ip: str) -> np.ndarray:
    a = ipaddress.ip_address(ip).packed
    return np.frombuffer(a + bytes(16 - len(a)), np.uint8)


def event(type_: str, src="10.66.2.2", dst="10.66.1.2", sport=40000, dport=22, proto=6, **kw) -> np.ndarray:
    e = np.zeros(1, EV)
    fam = 6 if ":" in src else 4
    e["saddr"][0], e["daddr"][0] = addr16(src), addr16(dst)
    defaults = dict(ts_ns=T, start_ns=T, type=TYPE[type_], family=fam, proto=proto, sport=sport, dport=dport,
                    ifindex=2, rule_slot=0, revision_id=7, verdict=V["allow"], reason=R["pass_rule"],
                    hook=0, direction=0, ct_state=2)
    defaults.update(kw)
    for k, v in defaults.items():
        if k in ("packets", "bytes"):
            e[k][0] = v
        else:
            e[k] = v
    return e


def batch(*events: np.ndarray) -> np.ndarray:
    return np.concatenate(events)


def ct4(src: str, dst: str, sport: int, dport: int, proto: int = 6, **entry):
    """One conntrack row as the kernel stores it: side a = the lower (address, port)."""
    s, d = int(ipaddress.ip_address(src)), int(ipaddress.ip_address(dst))
    swap = (d, dport) < (s, sport)
    k = np.zeros(1, CT4)
    k["addr_a"], k["addr_b"] = (d, s) if swap else (s, d)
    k["port_a"], k["port_b"] = (dport, sport) if swap else (sport, dport)
    k["proto"] = proto
    e = np.zeros(1, CTE)
    vals = dict(created_ns=T, last_ns=T + 3 * 10**9, end_ns=T + 3 * 10**9 + 1234567, packets=[6, 4], bytes=[600, 4000],
                rule_slot=1, revision_id=7, state=2, initiator=1 if swap else 0, origin=0)
    vals.update(entry)
    for kk, v in vals.items():
        e[kk][0] = v
    return k, e


def drop_rows(rows: list[dict]):
    keys, vals = np.zeros(len(rows), DK), np.zeros(len(rows), DV)
    for i, r in enumerate(rows):
        keys["src"][i] = addr16(r["src"])
        for f in ("ifindex", "dport", "reason", "verdict", "proto", "family", "prefix_len"):
            keys[f][i] = r[f]
        keys["direction"][i] = r.get("direction", 0)
        for f in ("packets", "bytes", "first_ns", "last_ns"):
            vals[f][i] = r[f]
    return keys, vals


def drop_sources(keys: np.ndarray, peers: dict[int, list[tuple[str, int, int]]]) -> np.ndarray:
    """hw_drop_src rows as the kernel drains them: key i's fields with each peer's full address."""
    out = []
    for i, lst in peers.items():
        for ip, packets, bytes_ in lst:
            s = np.zeros(1, L.DTYPES["hw_drop_src"])
            s["k"] = keys[i]
            s["k"]["src"][0] = addr16(ip)
            s["packets"], s["bytes"] = packets, bytes_
            out.append(s)
    return np.concatenate(out)


DROPS = [dict(src="10.66.3.0", ifindex=2, dport=22, reason=R["policy_deny"], verdict=V["drop"], proto=6, family=4,
              prefix_len=24, packets=1200, bytes=72000, first_ns=T, last_ns=T + 9 * 10**8),
         dict(src="fd66:3::", ifindex=2, dport=0, reason=R["icmp_flood"], verdict=V["would_drop"], proto=58, family=6,
              prefix_len=64, packets=50, bytes=5000, first_ns=T, last_ns=T + 10**8),
         dict(src="192.0.2.0", ifindex=2, dport=443, reason=R["policy_deny"], verdict=V["drop"], proto=6, family=4,
              prefix_len=24, packets=3, bytes=180, first_ns=T, last_ns=T + 10**8, direction=1)]     # egress
PEERS = {0: [("10.66.3.7", 1000, 60000), ("10.66.3.8", 150, 9000), ("10.66.3.9", 50, 3000)],
         1: [("fd66:3::9", 50, 5000)]}


def sample_records() -> list[dict]:
    """One record of each kind/shape the builder makes (v4+v6, tcp/udp/icmp, audit mode, conntrack)."""
    b = builder()
    evs = batch(
        event("flow_start"),
        event("flow_end", start_ns=T - 2 * 10**9, ts_ns=T, packets=[10, 8], bytes=[1000, 8000], ct_state=4),
        event("flow_start", "fd66:2::2", "fd66:1::2", 5353, 53, 17, direction=1, hook=2, cgroup_id=1234),
        event("flow_start", sport=77, dport=77, proto=1, icmp_type=8, rule_slot=NO_RULE_SLOT, reason=R["pass_default"]),
        event("deny", "10.66.3.9", sport=1234, dport=23, verdict=V["drop"], reason=R["policy_deny"], rule_slot=2,
              packets=[1, 0], bytes=[60, 0]),
        event("deny", "fd66:3::9", "fd66:1::2", 0, 0, 58, icmp_type=1, verdict=V["would_drop"],
              reason=R["default_deny"], rule_slot=NO_RULE_SLOT, packets=[1, 0], bytes=[80, 0]),
        event("log", dport=8080, packets=[1, 0], bytes=[74, 0], rule_slot=1),
        event("flow_end", sport=40003, start_ns=T - 10**9, ts_ns=T - 5 * 10**8, packets=[3, 0], bytes=[180, 0],
              ct_state=1, end_cause=L.C["HW_END_EVICTED_UNCONFIRMED"]),   # displaced from a full conntrack bucket
        event("flow_end", sport=40005, start_ns=T - 3 * 10**9, ts_ns=T - 10**9, packets=[6, 5], bytes=[400, 900],
              ct_state=2, end_cause=L.C["HW_END_REUSED"]),                # its tuple taken by a new connection
    )
    recs = b.on_events(evs, CLOCK)
    k, e = ct4("10.66.2.2", "10.66.1.2", 40001, 80)
    recs += b.on_conntrack(k, e, None, CLOCK)                         # idle expiry
    k, e = ct4("10.66.2.2", "10.66.1.2", 40002, 80)
    recs += b.on_conntrack(np.zeros(0, CT4), np.zeros(0, CTE), (k, e), CLOCK)   # active-timeout update
    k, e = ct4("10.66.2.2", "10.66.1.2", 40004, 80, state=4, fin_seen=3, reported=1)
    recs += b.on_conntrack(np.zeros(0, CT4), np.zeros(0, CTE), None, CLOCK, (k, e))    # closed, after the grace
    keys, vals = drop_rows(DROPS)
    recs += b.on_drop_summaries(keys, vals, 1_700_000_004.0, 1_700_000_006.0, CLOCK, drop_sources(keys, PEERS))
    recs += b.on_drop_overflow({(V["drop"], R["syn_flood"]): (900, 54000)}, 1_700_000_004.0, 1_700_000_006.0, CLOCK)
    return recs


def audit_record(tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    st = state()
    st.record_change("rev-6", "rev-7", 3, 4, "/etc/hostwall/policy.yaml", 0.123456)
    from hostwall.bpf.state import audit_log_path
    return json.loads(audit_log_path(st.pin_dir).read_text().splitlines()[-1])


# ------------------------------------------------------------------------------------------ tests

def test_every_sample_record_matches_the_flow_schema():
    v = validator("flow.schema.json")
    recs = sample_records()
    kinds = {(r["hostwall"]["kind"], r["event"]["action"]) for r in recs}
    assert kinds == {("flow", "flow_start"), ("flow", "flow_end"), ("flow", "flow_update"), ("deny", "deny"),
                     ("deny", "would_deny"), ("log", "log"), ("drop_summary", "drop_summary")}
    for r in recs:
        errs = sorted(v.iter_errors(r), key=str)
        assert not errs, f"{r['event']['action']}: {[e.message for e in errs]}"
        assert r["hostwall"]["schema_version"] == SCHEMA_VERSION and "schema_version" not in r


def test_schema_rejects_what_it_must():
    v = validator("flow.schema.json")
    good = sample_records()[1]                                     # a flow end
    bad_hw = json.loads(json.dumps(good))
    bad_hw["hostwall"]["surprise"] = 1                             # hostwall is closed
    no_totals = json.loads(json.dumps(good))
    del no_totals["destination"]["packets"]
    bad_reason = json.loads(json.dumps(good))
    bad_reason["hostwall"]["reason"] = "because"
    for r in (bad_hw, no_totals, bad_reason):
        assert list(v.iter_errors(r))


def test_flow_end_maps_directions_totals_and_duration():
    r = [x for x in sample_records() if x["event"]["action"] == "flow_end" and "reason" not in x["event"]][0]
    assert r["event"]["type"] == ["end"] and r["event"]["kind"] == "event"
    assert (r["source"]["ip"], r["source"]["port"], r["destination"]["port"]) == ("10.66.2.2", 40000, 22)
    assert (r["source"]["packets"], r["source"]["bytes"]) == (10, 1000)          # from the initiator
    assert (r["destination"]["packets"], r["destination"]["bytes"]) == (8, 8000)
    assert (r["network"]["packets"], r["network"]["bytes"]) == (18, 9000)
    assert r["hostwall"]["flow"]["duration_ns"] == r["event"]["duration"] == 2 * 10**9
    assert r["hostwall"]["flow"]["end_reason"] == "fin"
    assert parse_iso_ns(r["hostwall"]["flow"]["end"]) - parse_iso_ns(r["hostwall"]["flow"]["start"]) == 2 * 10**9
    assert r["@timestamp"] == iso_ns(CLOCK.wall_ns(T))


@pytest.mark.parametrize("cause, reason", [("HW_END_EVICTED_UNCONFIRMED", "evicted_unconfirmed"),
                                           ("HW_END_EVICTED_ESTABLISHED", "evicted_established"),
                                           ("HW_END_IDLE", "idle_timeout"), ("HW_END_REUSED", "reused"),
                                           ("HW_END_CLOSED", "rst")])
def test_flow_end_of_a_displaced_connection_says_why(cause, reason):
    b = builder()
    r = b.on_events(event("flow_end", start_ns=T - 10**9, ts_ns=T, packets=[3, 0], bytes=[180, 0], ct_state=5,
                          end_cause=L.C[cause]), CLOCK)[0]
    assert r["hostwall"]["flow"]["end_reason"] == reason and r["hostwall"]["flow"]["duration_ns"] == 10**9
    assert ("reason" in r["event"]) == (cause != "HW_END_CLOSED")
    if cause == "HW_END_CLOSED":
        assert b.stats()["flow_end_idle_timeout"] == b.stats()["flow_end_evicted_established"] == \
            b.stats()["flow_end_evicted_unconfirmed"] == b.stats()["flow_end_reused"] == 0
    else:
        assert b.stats()[f"flow_end_{reason}"] == 1
    assert not list(validator("flow.schema.json").iter_errors(r))


def test_conntrack_end_orients_by_initiator_and_matches_the_event_community_id():
    b = builder()
    # the responder (10.66.1.2:80) is the lower side a; initiator = side b
    k, e = ct4("10.66.2.9", "10.66.1.2", 50000, 80)
    assert e["initiator"][0] == 1
    [r] = b.on_conntrack(k, e, None, CLOCK)
    assert (r["source"]["ip"], r["source"]["port"]) == ("10.66.2.9", 50000)
    assert (r["destination"]["ip"], r["destination"]["port"]) == ("10.66.1.2", 80)
    assert (r["source"]["packets"], r["destination"]["bytes"]) == (6, 4000)
    assert r["hostwall"]["flow"]["end_reason"] == "idle_timeout" and r["event"]["reason"] == "idle timeout"
    assert r["rule"] == {"name": "web", "ruleset": "edge-web", "version": "rev-7"}
    expect = community_id("10.66.2.9", "10.66.1.2", 6, 50000, 80)
    [start] = b.on_events(event("flow_start", "10.66.2.9", "10.66.1.2", 50000, 80), CLOCK)
    assert r["network"]["community_id"] == start["network"]["community_id"] == expect


def test_icmp_community_id_only_when_exact():
    recs = sample_records()
    echo = [r for r in recs if r["network"].get("iana_number") == "1"][0]
    assert echo["network"]["community_id"] == community_id("10.66.2.2", "10.66.1.2", 1, 8, 0)
    assert echo["hostwall"]["icmp"] == {"type": 8, "id": 77} and "port" not in echo["source"]
    unreach = [r for r in recs if r["network"].get("iana_number") == "58"][0]
    assert "community_id" not in unreach["network"]            # ICMPv6 type 1: code unknown → absent
    assert unreach["hostwall"]["icmp"] == {"type": 1}


def test_rule_resolution_never_guesses():
    recs = sample_records()
    deny = [r for r in recs if r["event"]["action"] == "deny"][0]
    assert deny["rule"] == {"name": "threat-intel", "ruleset": "edge-web", "version": "rev-7"}
    default = [r for r in recs if r["event"]["action"] == "would_deny"][0]
    assert default["rule"] == {"ruleset": "edge-web", "version": "rev-7"}     # no rule: slot ~0
    b = builder()
    [old] = b.on_events(event("flow_start", revision_id=6, rule_slot=1), CLOCK)
    assert old["rule"] == {"version": "rev-6"}        # revision known from the table; its slots are not
    [gone] = b.on_events(event("flow_start", revision_id=99, rule_slot=1), CLOCK)
    assert "rule" not in gone
    nobody = RecordBuilder(HOST, None)
    assert "rule" not in nobody.on_events(event("flow_start"), CLOCK)[0]


def test_slot_reuse_across_swaps_resolves_per_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    st = state()
    st.save()
    view = InstanceStateView(HOST.pin_dir)
    b = RecordBuilder(HOST, view)
    st.slots = {"new-rule": 1}                      # slot 1 now belongs to another rule, revision 8
    st.revision_id, st.revision = 8, "rev-8"
    st.revisions["8"] = "rev-8"
    time.sleep(0.01)
    st.save()
    b.tick()                                        # reloads the state file
    [r7] = b.on_events(event("flow_start", revision_id=7, rule_slot=1), CLOCK)
    [r8] = b.on_events(event("flow_start", revision_id=8, rule_slot=1), CLOCK)
    assert r7["rule"]["name"] == "web" and r8["rule"]["name"] == "new-rule"


def test_event_ids_unique_deterministic_and_boot_scoped():
    a, b = sample_records(), sample_records()
    ids = [r["event"]["id"] for r in a]
    assert len(set(ids)) == len(ids)
    assert ids == [r["event"]["id"] for r in b]
    other = RecordBuilder(HostInfo("fw-1", "another-boot", HOST.pin_dir), None)
    assert other.on_events(event("deny"), CLOCK)[0]["event"]["id"] != \
        RecordBuilder(HOST, None).on_events(event("deny"), CLOCK)[0]["event"]["id"]


def test_flow_table_is_bounded_and_counts():
    b = builder(max_flows=2)
    b.on_events(batch(*[event("flow_start", sport=1000 + i) for i in range(5)]), CLOCK)
    assert b.stats()["open_flows"] == 2 and b.stats()["flow_table_evicted"] == 3
    b.on_events(event("flow_end", sport=1000), CLOCK)                 # evicted: end without start
    assert b.stats()["end_without_start"] == 1
    b.on_events(event("flow_end", sport=1004), CLOCK)                 # still open: no count
    assert b.stats()["end_without_start"] == 1 and b.stats()["open_flows"] == 1


def test_conntrack_expiry_after_kernel_flow_end_is_not_duplicated():
    b = builder()
    b.on_events(event("flow_start", sport=41000, dport=80), CLOCK)
    b.on_events(event("flow_end", sport=41000, dport=80), CLOCK)
    k, e = ct4("10.66.2.2", "10.66.1.2", 41000, 80, fin_seen=0x83, state=4)
    assert b.on_conntrack(k, e, None, CLOCK) == []
    assert b.stats()["ct_end_already_emitted"] == 1
    # the kernel emitted flow_end but it never arrived (ring buffer full): conntrack produces it
    b.on_events(event("flow_start", sport=41001, dport=80), CLOCK)
    k, e = ct4("10.66.2.2", "10.66.1.2", 41001, 80, fin_seen=0x83, state=5)
    [r] = b.on_conntrack(k, e, None, CLOCK)
    assert r["hostwall"]["flow"]["end_reason"] == "rst" and b.stats()["ct_end_event_lost"] == 1
    assert r["hostwall"]["interface"] == {"id": 2}                   # carried over from the start


def test_batches_in_any_byte_order_or_as_raw_bytes_decode_alike():
    one = event("flow_start", sport=40000, dport=22)
    native = np.concatenate([one, one])                      # numpy canonicalises '>u2' to native order
    assert native.dtype != EV
    for b in (native, one.tobytes() + one.tobytes(), np.frombuffer(one.tobytes() * 2, np.uint8)):
        recs = builder().on_events(b, CLOCK)
        assert [(r["source"]["port"], r["destination"]["port"]) for r in recs] == [(40000, 22)] * 2


def test_decode_errors_are_counted_not_silent():
    class Ledger:
        def __init__(self):
            self.lost_calls = []

        def lost(self, stage, reason, n):
            self.lost_calls.append((stage, reason, n))

    led = Ledger()
    b = RecordBuilder(HOST, None, led)
    bad = event("deny")
    bad["type"] = 42
    fam = event("deny")
    fam["family"] = 7
    recs = b.on_events(batch(event("deny"), bad, fam, bad), CLOCK)
    assert len(recs) == 1
    assert sorted(led.lost_calls) == [("decode", "bad_family", 1), ("decode", "unknown_event_type", 2)]
    assert b.stats()["decode_errors"] == 3


def test_drop_summaries():
    b = builder()
    keys, vals = drop_rows(DROPS)
    v4, v6, out = b.on_drop_summaries(keys, vals, 1_700_000_004.0, 1_700_000_006.0, CLOCK, drop_sources(keys, PEERS))
    # keyed by a prefix: the CIDR in source.address and hostwall.source.prefix, never in source.ip
    assert v4["hostwall"]["source"] == {"prefix": "10.66.3.0/24"} and v4["destination"] == {"port": 22}
    assert v4["source"] == {"address": "10.66.3.0/24", "packets": 1200, "bytes": 72000}
    assert v4["network"]["bytes"] == 72000 and v4["network"]["direction"] == "ingress"
    assert v4["hostwall"]["window"] == {"start": "2023-11-14T22:13:24.000000Z", "end": "2023-11-14T22:13:26.000000Z"}
    assert (v4["event"]["start"], v4["event"]["end"]) == ("2023-11-14T22:13:24.000000Z", "2023-11-14T22:13:26.000000Z")
    assert v4["@timestamp"] == v4["event"]["end"]
    assert v4["event"]["kind"] == "metric" and v4["event"]["type"] == ["denied"]
    # its individual peers, largest first, with integer counts
    assert v4["hostwall"]["top_peers"] == [{"ip": "10.66.3.7", "packets": 1000, "bytes": 60000},
                                           {"ip": "10.66.3.8", "packets": 150, "bytes": 9000},
                                           {"ip": "10.66.3.9", "packets": 50, "bytes": 3000}]
    assert v6["hostwall"]["source"] == {"prefix": "fd66:3::/64"} and "destination" not in v6 and "ip" not in v6["source"]
    assert v6["hostwall"]["top_peers"] == [{"ip": "fd66:3::9", "packets": 50, "bytes": 5000}]
    assert v6["hostwall"]["verdict"] == "would_drop" and v6["event"]["outcome"] == "success"
    # an egress drop's peer is the addressee
    assert out["destination"] == {"address": "192.0.2.0/24", "port": 443} and "address" not in out["source"]
    assert out["hostwall"]["source"] == {"prefix": "192.0.2.0/24"} and "top_peers" not in out
    again = b.on_drop_summaries(keys, vals, 1_700_000_004.0, 1_700_000_006.0, CLOCK)
    later = b.on_drop_summaries(keys, vals, 1_700_000_006.0, 1_700_000_008.0, CLOCK)
    assert again[0]["event"]["id"] == v4["event"]["id"] != later[0]["event"]["id"]


def test_clock_and_time_format():
    c = Clock.calibrate()
    assert abs(c.wall_ns(time.monotonic_ns()) - time.time_ns()) < 5_000_000
    assert iso_ns(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456Z"
    assert parse_iso_ns("2023-11-14T22:13:20.123456Z") == 1_700_000_000_123_456_000


def test_audit_records_match_the_audit_schema(tmp_path, monkeypatch):
    v = validator("audit.schema.json")
    raw = audit_record(tmp_path, monkeypatch)
    assert not list(v.iter_errors(raw)), "the enforcer's own audit line"
    full = builder().on_audit(raw)
    assert not list(v.iter_errors(full))
    assert full["event"]["id"] == builder().on_audit(raw)["event"]["id"] and "id" not in raw["event"]
    broken = json.loads(json.dumps(raw))
    broken["hostwall"]["policy"]["new_rules"] = "four"
    assert list(v.iter_errors(broken))


def test_tick_forgets_stale_flows():
    b = builder(flow_stale_s=10)
    b.on_events(event("flow_start", ts_ns=T), CLOCK)
    b.tick(now=T + 5 * 10**9)
    assert b.stats()["open_flows"] == 1
    b.tick(now=T + 11 * 10**9)
    assert b.stats()["open_flows"] == 0 and b.stats()["flows_stale_expired"] == 1


def test_flow_times_are_the_first_and_last_packet_on_the_precise_clock():
    b = builder()
    t1 = T + 123_456_789                               # not on any 4 ms tick: precise, to the µs in the text
    [start] = b.on_events(event("flow_start", ts_ns=t1, start_ns=t1), CLOCK)
    assert start["@timestamp"] == start["event"]["start"] == start["hostwall"]["flow"]["start"] == \
        iso_ns(CLOCK.wall_ns(t1)) == "2023-11-14T22:13:25.123456Z"
    [end] = b.on_events(event("flow_end", start_ns=t1, ts_ns=t1 + 10_000_500, packets=[2, 2], bytes=[100, 100],
                              ct_state=5), CLOCK)
    assert end["@timestamp"] == end["event"]["end"] and end["event"]["duration"] == 10_000_500
    assert end["event"]["start"] == start["event"]["start"] and start["@timestamp"] < end["@timestamp"]
    # another CPU stored an older reading last: the end is clamped to the start, never before it
    [odd] = b.on_events(event("flow_end", sport=40009, start_ns=t1, ts_ns=t1 - 1000, ct_state=5), CLOCK)
    assert odd["event"]["duration"] == 0 and odd["@timestamp"] == odd["event"]["start"]
    for r in (start, end, odd):
        assert parse_iso_ns(r["event"]["created"]) > parse_iso_ns(r["@timestamp"])   # made now, long after 2023


def test_conntrack_ends_and_updates_use_the_precise_first_and_last_packet():
    b = builder()
    k, e = ct4("10.66.2.2", "10.66.1.2", 40100, 80)                        # last_ns (tick) T+3 s, end_ns T+3.0012 s
    [idle] = b.on_conntrack(k, e, None, CLOCK)
    end_ns = int(e["end_ns"][0])
    assert idle["@timestamp"] == idle["event"]["end"] == iso_ns(CLOCK.wall_ns(end_ns))
    assert idle["event"]["duration"] == end_ns - T and idle["hostwall"]["flow"]["end_reason"] == "idle_timeout"
    k, e = ct4("10.66.2.2", "10.66.1.2", 40101, 80)
    [upd] = b.on_conntrack(np.zeros(0, CT4), np.zeros(0, CTE), (k, e), CLOCK)
    assert upd["event"]["type"] == ["info"] and upd["event"]["end"] == iso_ns(CLOCK.wall_ns(end_ns))
    # closed by FINs and reported after the grace period: end_reason fin; its later expiry adds nothing
    b.on_events(event("flow_start", sport=40102, dport=80), CLOCK)
    k, e = ct4("10.66.2.2", "10.66.1.2", 40102, 80, state=4, fin_seen=3, reported=1, packets=[5, 4])
    [closed] = b.on_conntrack(np.zeros(0, CT4), np.zeros(0, CTE), None, CLOCK, (k, e))
    assert closed["hostwall"]["flow"]["end_reason"] == "fin" and closed["source"]["packets"] == 5
    assert closed["hostwall"]["interface"] == {"id": 2} and b.stats()["flow_end_closed_after_grace"] == 1
    assert b.on_conntrack(k, e, None, CLOCK) == [] and b.stats()["ct_end_already_emitted"] == 1


def test_a_host_prefix_summary_names_its_host():
    rows = [dict(DROPS[0], src="10.66.3.7", prefix_len=32)]
    [r] = builder().on_drop_summaries(*drop_rows(rows), 1_700_000_004.0, 1_700_000_006.0, CLOCK)
    assert r["source"]["address"] == "10.66.3.7/32" and r["source"]["ip"] == "10.66.3.7"
    assert r["hostwall"]["source"] == {"prefix": "10.66.3.7/32"}
    assert not list(validator("flow.schema.json").iter_errors(r))


def test_older_revisions_resolve_from_the_state_revision_info(tmp_path, monkeypatch):
    """A collector (re)started after swaps names the rules of records stamped by revisions it never saw
    live, from the state's revision_info (docs/records.md "Rule fields"); a revision the state no longer
    keeps is counted, not guessed."""
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    st = state(revision_info={
        "6": {"revision": "rev-6", "policy": "edge-old", "slots": {"ping": 1, "ssh": 0}},
        "7": {"revision": "rev-7", "policy": "edge-web", "slots": {"ssh-admin": 0, "web": 1, "threat-intel": 2}}})
    st.save()
    b = RecordBuilder(HOST, InstanceStateView(HOST.pin_dir))       # started after revision 6 was retired
    [old, cur] = b.on_events(np.concatenate([event("flow_start", revision_id=6, rule_slot=1),
                                             event("flow_start", revision_id=7, rule_slot=1)]), CLOCK)
    assert old["rule"] == {"name": "ping", "ruleset": "edge-old", "version": "rev-6"}
    assert cur["rule"] == {"name": "web", "ruleset": "edge-web", "version": "rev-7"}
    assert b.stats()["rule_unresolved"] == 0
    gone = np.concatenate([event("flow_start", revision_id=3, rule_slot=1, sport=p) for p in (1, 2)])
    assert all("rule" not in r for r in b.on_events(gone, CLOCK))
    [default] = b.on_events(event("deny", revision_id=3, rule_slot=NO_RULE_SLOT), CLOCK)
    assert "rule" not in default                                      # its revision is unknown too
    assert b.stats()["rule_unresolved"] == 3
    b.on_events(event("deny", revision_id=6, rule_slot=NO_RULE_SLOT), CLOCK)
    assert b.stats()["rule_unresolved"] == 3                          # known revision, no rule: resolved
    k, e = ct4("10.66.2.9", "10.66.1.2", 50000, 80, revision_id=6)            # conntrack ends resolve the same way
    [r] = b.on_conntrack(k, e, None, CLOCK)
    assert r["rule"]["name"] == "ping" and b.stats()["rule_unresolved"] == 3
    k, e = ct4("10.66.2.9", "10.66.1.2", 50001, 80, revision_id=2)
    [r] = b.on_conntrack(k, e, None, CLOCK)
    assert "rule" not in r and b.stats()["rule_unresolved"] == 4


def test_status_says_how_many_records_lack_their_rule():
    from hostwall.collector.status_view import render_status
    assert "rules " not in render_status({"builder": {"rule_unresolved": 0}})
    assert "rules      3 records without their rule's name" in render_status({"builder": {"rule_unresolved": 3}})


def _names(b: RecordBuilder, revision_id: int, slot: int) -> dict:
    [r] = b.on_events(event("flow_start", revision_id=revision_id, rule_slot=slot), CLOCK)
    return r.get("rule", {})


def test_another_instance_never_names_the_first_instances_records(tmp_path, monkeypatch):
    """A detached enforcer started anew numbers its revisions from 1 again under a new instance id, while
    the collector still reads the first instance's maps: their records stay unnamed (counted), never
    named after the new instance's rules (docs/records.md "Rule fields")."""
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    state(instance_id="aaaa", revision_info={"1": {"revision": "rev-1", "policy": "old", "slots": {"ssh": 1}}}).save()
    view = InstanceStateView(HOST.pin_dir)
    b = RecordBuilder(HOST, view)
    assert _names(b, 1, 1) == {"name": "ssh", "ruleset": "old", "version": "rev-1"}
    assert _names(b, 7, 1)["name"] == "web"
    InstanceState.load(HOST.pin_dir).remove()                       # detach
    view.refresh()
    state(instance_id="bbbb", revision="new-1", revision_id=1, policy_name="new", revisions={"1": "new-1"},
          slots={"telnet": 1}).save()
    assert view.refresh()
    for rid in (1, 7):
        assert _names(b, rid, 1) == {}
    assert b.stats()["rule_unresolved"] == 2


def test_revision_ids_that_go_down_drop_the_table(tmp_path, monkeypatch):
    """A state without an instance id (written before they existed) whose revision ids went down is
    another instance too."""
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    state().save()
    view = InstanceStateView(HOST.pin_dir)
    b = RecordBuilder(HOST, view)
    assert _names(b, 6, 1) == {"version": "rev-6"}
    state(revision="new-2", revision_id=2, policy_name="new", revisions={"1": "new-1", "2": "new-2"},
          revision_info={"1": {"revision": "new-1", "policy": "new", "slots": {"telnet": 1}}},
          slots={"telnet": 1}).save()
    assert view.refresh()
    assert _names(b, 1, 1) == {} and _names(b, 2, 1) == {}
    assert view.foreign


def test_old_instance_ids_do_not_push_the_current_ones_out(tmp_path, monkeypatch):
    """_adopt keeps REVISIONS_KEPT ids: after an instance change, none of them are the old instance's."""
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    state(instance_id="aaaa", revision_id=500, revisions={str(i): f"r{i}" for i in range(480, 501)}).save()
    view = InstanceStateView(HOST.pin_dir)
    assert view.revision(490) == "r490"
    state(instance_id="bbbb", revision_id=3, revisions={"3": "n3"}).save()
    view.refresh()
    assert view.revision(490) == "" and view.revision(3) == ""


def test_revision_0_is_no_rule_and_not_counted(tmp_path, monkeypatch):
    """Malformed packets are denied before any policy judges them: revision 0 (bpf/hostwall.bpf.c)."""
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    state().save()
    b = RecordBuilder(HOST, InstanceStateView(HOST.pin_dir))
    [r] = b.on_events(event("deny", revision_id=0, rule_slot=NO_RULE_SLOT), CLOCK)
    assert "rule" not in r and b.stats()["rule_unresolved"] == 0
    k, e = ct4("10.66.2.9", "10.66.1.2", 50000, 80, revision_id=0)
    [r] = b.on_conntrack(k, e, None, CLOCK)
    assert "rule" not in r and b.stats()["rule_unresolved"] == 0


def test_a_revision_newer_than_known_rereads_the_state_once(tmp_path, monkeypatch):
    """A swap lands between two refreshes: the first record of the new revision re-reads the state
    (bounded: at most once per reload_interval_s), so it is named, not lost to the ≤1 s tick gap."""
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    state().save()
    view = InstanceStateView(HOST.pin_dir)
    b = RecordBuilder(HOST, view)
    state(revision="rev-8", revision_id=8, revisions={"7": "rev-7", "8": "rev-8"}, slots={"db": 1}).save()
    assert _names(b, 8, 1) == {"name": "db", "ruleset": "edge-web", "version": "rev-8"}   # no tick()
    assert b.stats()["rule_unresolved"] == 0
    view = InstanceStateView(HOST.pin_dir)
    b = RecordBuilder(HOST, view)
    reads = []
    monkeypatch.setattr(view, "refresh", lambda: reads.append(1) or False)
    view.reload_interval_s = 3600.0
    for _ in range(3):
        assert _names(b, 99, 1) == {}
    assert len(reads) == 1 and b.stats()["rule_unresolved"] == 3
