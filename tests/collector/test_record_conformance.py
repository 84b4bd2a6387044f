"""Every record kind the collector makes, validated against the official definitions of the versions
the records declare (tests/data/README.md): ECS on the canonical record, OCSF on to_ocsf(record).

The records come from the code paths the other collector tests use: RecordBuilder via
test_records.sample_records (flow start/end/update, deny, audit-mode deny, log, drop summary and
overflow summary), the same records through the Enricher (test_encoders.enriched_records),
AnomalyDetector open/update/close (test_anomaly.anomaly_records) and RecordBuilder.on_audit. A failure
lists each distinct violation with the number of records that have it."""
from __future__ import annotations

import collections

import pytest

from hostwall.collector.encoders import to_ocsf
from hostwall.collector.encoders.ocsf import OCSF_VERSION
from hostwall.collector.records import ECS_VERSION
from tests.collector.test_anomaly import anomaly_records
from tests.collector.test_encoders import enriched_records
from tests.collector.test_records import audit_record, builder, sample_records
from tests.conformance import ecs, ocsf

KINDS = ["flow:flow_start", "flow:flow_end", "flow:flow_update", "deny:deny", "deny:would_deny", "log:log",
         "drop_summary:drop_summary", "drop_summary:overflow", "anomaly:anomaly_open", "anomaly:anomaly_update",
         "anomaly:anomaly_close", "audit:policy-apply"]


def label(rec: dict) -> str:
    hw = rec.get("hostwall", {})
    return f"{hw.get('kind')}:{'overflow' if hw.get('overflow') else rec.get('event', {}).get('action')}"


@pytest.fixture
def records(tmp_path, monkeypatch) -> dict[str, list[dict]]:
    """label -> records of that kind, raw and enriched."""
    recs = sample_records() + enriched_records() + anomaly_records()
    recs.append(builder().on_audit(audit_record(tmp_path, monkeypatch)))
    out = collections.defaultdict(list)
    for r in recs:
        out[label(r)].append(r)
    return out


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
