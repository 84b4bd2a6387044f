"""tests/conformance validators: for every rule, a minimal valid record passes and a record that
breaks exactly that rule fails with a message naming the path (the rules: the docstrings of
tests/conformance/ecs.py and ocsf.py; the data: tests/data/README.md)."""
from __future__ import annotations

import copy

import pytest

from tests.conformance import ecs, ocsf


def changed(base: dict, path: str, value=..., delete: bool = False) -> dict:
    """A deep copy of `base` with dotted `path` set to `value` (or deleted)."""
    rec = copy.deepcopy(base)
    *parents, last = path.split(".")
    cur = rec
    for p in parents:
        cur = cur.setdefault(p, {})
    if delete:
        del cur[last]
    else:
        cur[last] = value
    return rec


def assert_one_violation(violations: list[str], path: str, *words: str) -> None:
    assert len(violations) == 1, violations
    assert violations[0].startswith(f"{path}:"), violations
    for w in words:
        assert w in violations[0], violations


# ------------------------------------------------------------------------------------------- ECS

ECS_OK = {
    "@timestamp": "2024-05-01T12:00:00.123456Z",
    "ecs": {"version": "8.11.0"},
    "event": {"kind": "event", "category": ["network"], "type": ["connection", "allowed"], "outcome": "success",
              "duration": 5_000_000, "ingested": 1_714_564_800_000, "risk_score": 2, "start": "2024-05-01"},
    "source": {"ip": "10.0.0.1", "port": 40000, "bytes": 120, "mac": "00-1A-2B-3C-4D-5E"},
    "destination": {"ip": "fd00::2", "port": 22},
    "related": {"ip": ["10.0.0.1", "fd00::2"]},
    "observer": {"ingress": {"interface": {"name": "eth0"}}},
    "labels": {"env": "lab"},
    "host": {"geo": {"location": {"lat": 48.1, "lon": 11.6}}},
    "dns": {"answers": [{"data": "10.0.0.3", "ttl": 60}]},
    "tls": {"established": True},
    "dll": {"pe": {"imports": [{"anything": {"goes": 1}}]}},
    "hostwall": {"kind": "flow", "free": [{"form": None}]},
}

ECS_BROKEN = [
    # (path to change, new value, path named, words in the message)
    ("schema_version", "1.0.0", "schema_version", ["top-level", "hostwall"]),
    ("geo", {"city_name": "x"}, "geo", ["top-level"]),                        # reusable only, not top level
    ("hostwall", "flow", "hostwall", ["object"]),
    ("source.flavour", "x", "source.flavour", ["not an ECS"]),
    ("event.action", 5, "event.action", ["keyword"]),
    ("source.port", True, "source.port", ["long"]),
    ("source.port", 1.5, "source.port", ["long"]),
    ("source.port", 1 << 63, "source.port", ["long"]),
    ("event.risk_score", "high", "event.risk_score", ["float"]),
    ("tls.established", "true", "tls.established", ["boolean"]),
    ("source.ip", "10.0.0.0/24", "source.ip", ["prefix"]),
    ("source.ip", "10.0.0.256", "source.ip", ["address"]),
    ("source.ip", 167772161, "source.ip", ["ip"]),
    ("@timestamp", "yesterday", "@timestamp", ["date"]),
    ("@timestamp", "2024-13-01T00:00:00Z", "@timestamp", ["date"]),
    ("event.ingested", True, "event.ingested", ["date"]),
    ("host.geo.location", {"lat": 100, "lon": 0}, "host.geo.location", ["geo_point"]),
    ("event.category", "network", "event.category", ["normalize: array"]),
    ("source.port", [40000], "source.port", ["single-valued"]),
    ("related.ip", ["10.0.0.0/8"], "related.ip[0]", ["prefix"]),
    ("event.kind", "flow", "event.kind", ["allowed value"]),
    ("event.outcome", "ok", "event.outcome", ["allowed value"]),
    ("event.type", ["connection", "creation"], "event.type", ["expected event type", "network"]),
    ("source.mac", "00:1a:2b:3c:4d:5e", "source.mac", ["pattern"]),
    ("labels", {"env": 1}, "labels.env", ["keyword"]),
    ("observer.ingress", "eth0", "observer.ingress", ["object"]),
    ("dns.answers", [{"data": "x", "colour": "red"}], "dns.answers[0].colour", ["not an ECS"]),
    ("dll.pe.imports", [7], "dll.pe.imports[0]", ["flattened"]),
]


def test_ecs_valid_record_passes():
    assert ecs.version() == "8.11.0"
    assert ecs.validate(ECS_OK) == []


@pytest.mark.parametrize("path,value,named,words", ECS_BROKEN, ids=[f"{c[0]}={c[1]!r}" for c in ECS_BROKEN])
def test_ecs_each_rule_can_fail(path, value, named, words):
    assert_one_violation(ecs.validate(changed(ECS_OK, path, value)), named, *words)


@pytest.mark.parametrize("path", ["@timestamp", "ecs.version"])
def test_ecs_required_fields(path):
    assert_one_violation(ecs.validate(changed(ECS_OK, path, delete=True)), path, "required")


def test_ecs_version_must_be_the_vendored_one():
    assert_one_violation(ecs.validate(changed(ECS_OK, "ecs.version", "8.12.0")), "ecs.version", "8.11.0")


def test_ecs_expected_event_types_hold_for_every_category():
    rec = changed(ECS_OK, "event.category", ["network", "intrusion_detection"])
    assert_one_violation(ecs.validate(rec), "event.type", "connection", "intrusion_detection")


# ------------------------------------------------------------------------------------------ OCSF

OCSF_OK = {
    "class_uid": 4001, "class_name": "Network Activity", "category_uid": 4, "category_name": "Network Activity",
    "activity_id": 6, "activity_name": "Traffic", "type_uid": 400106, "type_name": "Network Activity: Traffic",
    "severity_id": 1, "time": 1_714_564_800_123, "duration": 12,
    "metadata": {"version": "1.7.0", "uid": "e1", "product": {"name": "hostwall", "vendor_name": "hostwall"},
                 "profiles": ["host", "security_control", "container"]},
    "device": {"hostname": "fw-1", "type_id": 0},
    "action_id": 1, "action": "Allowed", "disposition_id": 1,
    "src_endpoint": {"ip": "10.0.0.1", "port": 40000, "mac": "00:1a:2b:3c:4d:5e"},
    "dst_endpoint": {"ip": "fd00::2", "port": 22, "interface_name": "eth0",
                     "container": {"uid": "c1", "name": "sshd", "pod_uuid": "0d0c3f29-0000-4000-8000-000000000001",
                                   "image": {"uid": "sha256:00", "name": "sshd:9"}}},
    "connection_info": {"protocol_num": 6, "protocol_name": "tcp", "direction_id": 1, "community_uid": "1:x="},
    "traffic": {"bytes_out": 120, "packets_out": 2},
    "is_src_dst_assignment_known": True,
    "observables": [{"name": "src_endpoint.ip", "type_id": 2, "value": "10.0.0.1"}],
    "unmapped": {"hostwall": {"anything": [1, {"goes": None}]}},
}

OCSF_BROKEN = [
    ("metadata.version", "1.6.0", "metadata.version", ["1.7.0"]),
    ("metadata.profiles", ["host", "security_control", "container", "firewall"], "metadata.profiles[3]",
     ["profile"]),
    ("time", None, "time", ["required"]),
    ("metadata.product", None, "metadata.product", ["required", "metadata"]),
    ("device.type_id", None, "device.type_id", ["required", "device"]),
    ("hostwall", {"kind": "flow"}, "hostwall", ["unmapped"]),
    ("src_endpoint.flavour", "x", "src_endpoint.flavour", ["network_endpoint"]),
    ("metadata.profiles", ["security_control", "container"], "device", ["profile", "host"]),
    ("message", 6, "message", ["string_t"]),
    ("count", True, "count", ["integer_t"]),
    ("time", "2024-05-01T12:00:00Z", "time", ["timestamp_t"]),
    ("time", 1_714_564_800_123_000_000, "time", ["milliseconds"]),
    ("src_endpoint.location", {"city": "M", "lat": 48}, "src_endpoint.location.lat", ["float_t"]),
    ("is_src_dst_assignment_known", "yes", "is_src_dst_assignment_known", ["boolean_t"]),
    ("src_endpoint.ip", "10.0.0.0/24", "src_endpoint.ip", ["ip_t"]),
    ("src_endpoint.ip", "fe80::1%" + "a" * 40, "src_endpoint.ip", ["max_len"]),
    ("dst_endpoint.port", 70000, "dst_endpoint.port", ["range"]),
    ("src_endpoint.mac", "00:1a:2b", "src_endpoint.mac", ["regex", "mac_t"]),
    ("dst_endpoint.container.pod_uuid", "pod-1", "dst_endpoint.container.pod_uuid", ["regex", "uuid_t"]),
    ("observables", {"name": "src_endpoint.ip"}, "observables", ["array"]),
    ("observables", ["src_endpoint.ip"], "observables[0]", ["observable object"]),
    ("src_endpoint", "10.0.0.1", "src_endpoint", ["network_endpoint object"]),
    ("action_id", 42, "action_id", ["enum"]),
    ("activity_name", "Open", "activity_name", ["caption", "Traffic"]),
    ("dst_endpoint", {"port": 22}, "dst_endpoint", ["at_least_one", "network_endpoint"]),
    ("dst_endpoint.container.image", {"name": "sshd:9"}, "dst_endpoint.container.image.uid", ["required"]),
]


def test_ocsf_valid_event_passes():
    assert ocsf.version() == "1.7.0"
    assert ocsf.validate(OCSF_OK) == []


@pytest.mark.parametrize("path,value,named,words", OCSF_BROKEN, ids=[f"{c[0]}={c[1]!r}"[:60] for c in OCSF_BROKEN])
def test_ocsf_each_rule_can_fail(path, value, named, words):
    rec = changed(OCSF_OK, path, delete=True) if value is None else changed(OCSF_OK, path, value)
    assert_one_violation(ocsf.validate(rec), named, *words)


@pytest.mark.parametrize("bad", [None, "4001", 9999])
def test_ocsf_class_uid_picks_the_class(bad):
    rec = changed(OCSF_OK, "class_uid", delete=True) if bad is None else changed(OCSF_OK, "class_uid", bad)
    assert_one_violation(ocsf.validate(rec), "class_uid")


def test_ocsf_type_uid_is_class_uid_times_100_plus_activity_id():
    rec = {**OCSF_OK, "type_uid": 400101, "type_name": "Network Activity: Open"}     # a valid enum value
    assert_one_violation(ocsf.validate(rec), "type_uid", "class_uid * 100 + activity_id")


def test_ocsf_category_uid_is_the_class_category():
    v = ocsf.validate(changed(OCSF_OK, "category_uid", 2))
    assert v and all(x.startswith("category_uid:") for x in v), v       # the enum and the class's category
    assert any("category 4" in x for x in v)


def test_ocsf_other_needs_its_sibling():
    rec = {**changed(OCSF_OK, "activity_name", delete=True), "activity_id": 99, "type_uid": 400199,
           "type_name": "Network Activity: Other"}
    assert_one_violation(ocsf.validate(rec), "activity_name", "99")
    assert ocsf.validate({**rec, "activity_name": "Sampled"}) == []


def test_ocsf_class_constraint():
    rec = changed(changed(OCSF_OK, "src_endpoint", delete=True), "dst_endpoint", delete=True)
    rec["observables"] = []
    assert_one_violation(ocsf.validate(rec), "event", "at_least_one", "network_activity")


DNS_OK = {
    "class_uid": 4003, "category_uid": 4, "activity_id": 2, "type_uid": 400302, "severity_id": 1,
    "time": 1_714_564_800_123, "metadata": {"version": "1.7.0", "product": {"name": "hostwall"}},
    "src_endpoint": {"ip": "10.0.0.1"},
    "answers": [{"rdata": "10.0.0.3", "flag_ids": [1, 3], "flags": ["Authoritative Answer", "Recursion Desired"]}],
}


def test_ocsf_array_enum_and_its_sibling_array():
    assert ocsf.validate(DNS_OK) == []
    bad = copy.deepcopy(DNS_OK)
    bad["answers"][0]["flags"][1] = "Truncated"
    assert_one_violation(ocsf.validate(bad), "answers[0].flags[1]", "Recursion Desired")
    bad["answers"][0]["flags"][1], bad["answers"][0]["flag_ids"][1] = "Recursion Desired", 77
    assert_one_violation(ocsf.validate(bad), "answers[0].flag_ids[1]", "enum")


def test_ocsf_just_one_constraint():
    event = {"class_uid": 2004, "category_uid": 2, "activity_id": 1, "type_uid": 200401, "severity_id": 1,
             "time": 1_714_564_800_123, "metadata": {"version": "1.7.0", "product": {"name": "hostwall"}},
             "finding_info": {"uid": "f1", "title": "t"},
             "vulnerabilities": [{"cve": {"uid": "CVE-2024-0001"}}]}
    assert ocsf.validate(event) == []
    event["vulnerabilities"][0]["cwe"] = {"uid": "CWE-79"}
    assert_one_violation(ocsf.validate(event), "vulnerabilities[0]", "just_one", "2 of")
