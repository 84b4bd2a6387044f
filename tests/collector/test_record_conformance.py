"""Every record kind the collector makes, validated against the official definitions of the versions
the records declare (tests/data/README.md): ECS on the canonical record, OCSF on to_ocsf(record).

The records come from the code paths the other collector tests use: RecordBuilder via
test_records.sample_records (flow start/end/update, deny, audit-mode deny, log, drop summary and
overflow summary), the same records through the Enricher (test_encoders.enriched_records),
AnomalyDetector open/update/close (test_anomaly.anomaly_records), RecordBuilder.on_audit, the DNS
proxy's decision records through RecordBuilder.on_dns (numbered in the `dns` stream as the pipeline
numbers them) and flows named by their fqdns rule's learnt destination.domain
(test_dns_records.dns_records, domain_flow_records), the records of tracking under attack
(test_flood_records): flow summaries (datapath kinds, overflow, conntrack scan), the per-port SYN
signal's anomalies, the SYN proxy's switches as anomalies and as audit records, and the collector's loss
records (collector/loss_report.py: records-lost, collector-restart, numbered in the `collector` stream as
the pipeline numbers them). They are
also checked against the published JSON Schemas (schemas/*.json) and the contract's invariants
(tests/conformance/records.py: one host per .ip, flow times and order). A failure lists each distinct
violation with the number of records that have it.

The second half shows the checks have teeth: a record the collector made, broken in exactly one way
the issue names (a non-ECS top-level field, a broken OCSF constraint, a prefix in source.ip, a flow
start sorting after its end), is caught."""
from __future__ import annotations

import collections
import copy
import json
from pathlib import Path

import jsonschema
import pytest

from hostwall.collector.encoders import to_ocsf
from hostwall.collector.encoders.ocsf import OCSF_VERSION
from hostwall.collector.loss_report import LossReporter, SeqRanges
from hostwall.collector.records import ECS_VERSION
from tests.collector.test_anomaly import anomaly_records
from tests.collector.test_dns_records import dns_records, domain_flow_records
from tests.collector.test_encoders import enriched_records
from tests.collector.test_flood_records import summary_records, switch_audit_records, switch_records, syns_records
from tests.collector.test_records import audit_record, builder, sample_records
from tests.conformance import ecs, ocsf
from tests.conformance import records as invariants

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
SCHEMA_OF = {"flow": "flow", "log": "flow", "deny": "flow", "drop_summary": "flow", "flow_summary": "flow",
             "anomaly": "anomaly", "audit": "audit", "dns": "dns", "loss": "loss"}


def schema_errors(rec: dict) -> list[str]:
    """Violations of the record against its published JSON Schema (schemas/<kind>.schema.json)."""
    name = SCHEMA_OF[rec["hostwall"]["kind"]]
    v = jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{name}.schema.json").read_text()),
                                        format_checker=jsonschema.FormatChecker())
    return [f"{'.'.join(map(str, e.absolute_path)) or '(record)'}: {e.message}" for e in v.iter_errors(rec)]

KINDS = ["flow:flow_start", "flow:flow_end", "flow:flow_update", "deny:deny", "deny:would_deny", "log:log",
         "drop_summary:drop_summary", "drop_summary:overflow", "flow_summary:flow_summary", "flow_summary:overflow",
         "anomaly:anomaly_open", "anomaly:anomaly_update", "anomaly:anomaly_close", "anomaly/syns:anomaly_open",
         "anomaly/syn_proxy:anomaly_open", "anomaly/syn_proxy:anomaly_close", "audit:policy-apply",
         "audit:syn-proxy-on", "audit:syn-proxy-off", "dns:dns-refused", "dns:dns-upstream-failure",
         "loss:records-lost", "loss:collector-restart"]


def label(rec: dict) -> str:
    hw = rec.get("hostwall", {})
    kind = hw.get("kind")
    signal = (hw.get("anomaly") or {}).get("key", {}).get("signal")
    if signal in ("syns", "syn_proxy"):                 # the signals of tracking under attack, apart
        kind = f"{kind}/{signal}"
    return f"{kind}:{'overflow' if hw.get('overflow') else rec.get('event', {}).get('action')}"


@pytest.fixture
def records(tmp_path, monkeypatch) -> dict[str, list[dict]]:
    """label -> records of that kind, raw and enriched."""
    recs = sample_records() + enriched_records() + anomaly_records() + domain_flow_records() + summary_records()
    recs += syns_records() + [r for rs in switch_records() for r in rs] + switch_audit_records()
    recs.append(builder().on_audit(audit_record(tmp_path, monkeypatch)))
    for i, r in enumerate(dns_records(tmp_path, monkeypatch)):
        r["hostwall"].update(seq=i, stream="dns")
        recs.append(r)
    recs += loss_records()
    out = collections.defaultdict(list)
    for r in recs:
        out[label(r)].append(r)
    return out


def loss_records() -> list[dict]:
    """Loss records as the pipeline ships them: a sink's counted loss (one range list, one coarsened to its
    span past MAX_RANGES) and a restart after a crash, after a reboot, after a reloaded datapath and after a drain that found a discarded
    retired instance, numbered in `collector`."""
    rep = LossReporter("fw-1", "/sys/fs/bpf/hostwall/lab")
    few, many = SeqRanges(), SeqRanges()
    few.add([1, 2, 3, 9])
    many.add(range(0, 2000, 2))
    recs = [rep.sink_loss("kafka://127.0.0.1:9092", "spool_full", "events", few),
            rep.sink_loss("jsonl:/var/log/hostwall/flows.jsonl", "disk_full", "conntrack", many),
            rep.restart({"previous": "crash", "lost": {"crash": 2}, "previous_pid": 7, "duplicates_possible": 40,
                         "notes": ["consumer position moved beyond the checkpoint"]},
                        kernel_while_down={"ringbuf_full": 3}, previous_run={"produced": 10, "ok": True},
                        seqs={"events": 10, "conntrack": 4}),
            rep.restart({"previous": "reboot", "lost": {"reboot": 5}}, kernel_while_down={}, previous_run=None,
                        seqs={"events": 0}),
            rep.restart({"previous": "reloaded", "lost": {"reloaded": 3}}, kernel_while_down={}, previous_run=None,
                        seqs={"events": 5}),
            # a start after a retired instance was drained, finding another one discarded (bpf/retired.py)
            rep.restart({"previous": "drained", "lost": {"retired_discarded": 6},
                         "notes": ["retired instance 12 was unpinned before a collector drained it"]},
                        kernel_while_down={}, previous_run=None, seqs={"events": 30})]
    for i, r in enumerate(recs):
        r["hostwall"].update(seq=i, stream="collector")
    return recs


def report(violations: list[str], n: int) -> str:
    counts = collections.Counter(violations)
    return f"{len(counts)} distinct violation(s) in {n} record(s):\n  " + "\n  ".join(
        f"{v}  [{c} of {n}]" for v, c in sorted(counts.items()))


def test_the_validators_check_the_declared_versions():
    assert ecs.version() == ECS_VERSION and ocsf.version() == OCSF_VERSION


def test_every_record_kind_is_covered(records):
    assert sorted(records) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_ecs(records, kind):
    recs = records[kind]
    found = [v for r in recs for v in ecs.validate(r)]
    assert not found, f"ECS {ECS_VERSION}, {kind}: " + report(found, len(recs))


@pytest.mark.parametrize("kind", KINDS)
def test_ocsf(records, kind):
    recs = records[kind]
    found = [v for r in recs for v in ocsf.validate(to_ocsf(r))]
    assert not found, f"OCSF {OCSF_VERSION}, {kind}: " + report(found, len(recs))


@pytest.mark.parametrize("kind", KINDS)
def test_published_json_schemas(records, kind):
    recs = records[kind]
    found = [v for r in recs for v in schema_errors(r)]
    assert not found, f"schemas/*.json, {kind}: " + report(found, len(recs))


def test_the_contracts_invariants(records):
    recs = [r for rs in records.values() for r in rs]
    found = invariants.validate(recs)
    assert not found, report(found, len(recs))


# ---- the checks catch what the issue names ---------------------------------------------------------

def _one(records, kind: str) -> dict:
    return copy.deepcopy(records[kind][0])


def test_a_non_ecs_top_level_field_is_caught(records):
    for kind in ("flow:flow_start", "drop_summary:drop_summary", "flow_summary:flow_summary", "anomaly:anomaly_open",
                 "audit:policy-apply", "loss:collector-restart"):
        r = _one(records, kind)
        r["schema_version"] = "1.0.0"
        assert any(v.startswith("schema_version: top-level key") for v in ecs.validate(r)), kind
        assert schema_errors(r), kind                           # the published schemas close the top level


def test_a_broken_ocsf_constraint_is_caught(records):
    o = to_ocsf(_one(records, "deny:deny"))
    assert ocsf.validate(o) == []
    o["firewall_rule"] = {"version": "rev-7"}                   # neither name nor uid
    assert ocsf.validate(o) == ["firewall_rule: constraint at_least_one of object firewall_rule failed: "
                                "none of name, uid"]
    o = to_ocsf(_one(records, "drop_summary:drop_summary"))
    o["dst_endpoint"] = {"port": 22}                            # a port is not an endpoint
    assert any("constraint at_least_one of object network_endpoint" in v for v in ocsf.validate(o))


def test_a_prefix_in_source_ip_is_caught(records):
    r = _one(records, "drop_summary:drop_summary")
    assert r["source"]["address"] == r["hostwall"]["source"]["prefix"] == "10.66.3.0/24" and "ip" not in r["source"]
    as_ip = copy.deepcopy(r)
    as_ip["source"]["ip"] = "10.66.3.0/24"                     # the CIDR itself
    assert any(v.startswith("source.ip:") for v in ecs.validate(as_ip))
    assert schema_errors(as_ip) and invariants.validate([as_ip])
    as_host = copy.deepcopy(r)
    as_host["source"]["ip"] = "10.66.3.0"                       # the prefix's network address, as if a host
    assert ecs.validate(as_host) == []                          # a valid IP to ECS: only the invariant sees it
    assert invariants.validate([as_host]) == ["record 0 (drop_summary drop_summary): source.ip '10.66.3.0' in a "
                                              "record keyed by the prefix 10.66.3.0/24 (the prefix belongs in "
                                              ".address and hostwall.source.prefix)"]
    f = _one(records, "flow_summary:flow_summary")
    assert f["source"]["address"] == f["hostwall"]["source"]["prefix"] == "10.66.128.0/24"
    f["source"]["ip"] = "10.66.128.0"                         # a flow summary's prefix as if a host
    assert invariants.validate([f]) and ecs.validate(f) == []
    a = _one(records, "anomaly:anomaly_open")
    a["hostwall"]["anomaly"]["top_talkers"][0]["source"] = "10.9.9.0/24"
    assert invariants.validate([a]) and schema_errors(a)


def test_a_loss_record_whose_count_disagrees_is_caught(records):
    lost = _one(records, "loss:records-lost")
    assert lost["hostwall"]["loss"]["ranges"] == [[1, 3], [9, 9]] and invariants.validate([lost]) == []
    lost["hostwall"]["loss"]["count"] = 5
    assert invariants.validate([lost]) == ["record 0 (loss records-lost): count 5 is not the 4 seqs of its ranges"]
    lost["hostwall"]["loss"].update(count=4, ranges=[[9, 9], [1, 3]])
    assert any("not sorted and disjoint" in v for v in invariants.validate([lost]))
    restart = _one(records, "loss:collector-restart")
    restart["hostwall"]["loss"]["count"] += 1
    assert any("is not lost + kernel_while_down" in v for v in invariants.validate([restart]))


def test_a_flow_start_sorting_after_its_end_is_caught():
    from tests.collector.test_records import CLOCK, T, builder, event
    b = builder()
    start, end = b.on_events(event("flow_start", ts_ns=T, start_ns=T), CLOCK) + \
        b.on_events(event("flow_end", ts_ns=T + 5 * 10**6, start_ns=T, packets=[3, 2], bytes=[180, 120], ct_state=5),
                    CLOCK)
    assert invariants.validate([start, end]) == []
    assert end["event"]["duration"] == 5 * 10**6 and start["@timestamp"] <= end["@timestamp"]
    late = copy.deepcopy(start)
    late["@timestamp"] = late["event"]["start"] = "2023-11-14T22:13:25.010000Z"     # after the end
    late["hostwall"]["flow"]["start"] = end["hostwall"]["flow"]["start"]
    found = invariants.validate([late, end])
    assert any("its flow's start record" in v and "sorts after it" in v for v in found), found
