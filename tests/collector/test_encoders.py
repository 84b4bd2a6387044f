"""Encoders: ECS field names/types against ECS's own field definitions, OCSF against the OCSF schema (the
pydantic-ocsf library's models and its bundled OCSF 1.7.0 schema), OTel log-record shape.

ECS reference: the official definitions of the declared version vendored in tests/data/ecs/ (see
tests/data/README.md), checked by tests/conformance/ecs.py."""
from __future__ import annotations

import copy
import ipaddress
import json
from pathlib import Path

import orjson
import pytest

from hostwall.collector.encoders import EncodeError, encode, line_encoder, to_ocsf, to_otel
from hostwall.collector.enrich import Enricher
from hostwall.collector.enrich.cgroup import CgroupInfo
from hostwall.collector.enrich.host import Iface, InstanceStateView
from hostwall.collector.enrich.sockets import SocketOwner
from hostwall.collector.records import ECS_VERSION, parse_iso_ns
from tests.collector.test_anomaly import anomaly_records
from tests.collector.test_records import HOST, audit_record, builder, sample_records, state
from tests.conformance import ecs

# ------------------------------------------------------------------------------------- fixtures

class FakeCgroups:
    def __init__(self, info):
        self.info = info

    def resolve(self, cgid):
        return self.info if cgid == self.info.cgroup_id else None

    def stats(self):
        return {}


class FakeSockets:
    def __init__(self, owner):
        self.owner, self.calls = owner, []

    def lookup(self, netns, proto, ip, port):
        self.calls.append((netns, proto, ip, port))
        return self.owner if port == 22 else None

    def stats(self):
        return {}

    def close(self):
        pass


POD = CgroupInfo(cgroup_id=4242, path="/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0d0c3f29_"
                 "0000_4000_8000_000000000001.slice/cri-containerd-" + "a" * 64 + ".scope", container_id="a" * 64,
                 runtime="containerd", pod_uid="0d0c3f29-0000-4000-8000-000000000001", pod_qos="burstable",
                 container_name="sshd", image="registry.local/sshd:9", pod_name="bastion-0", pod_namespace="ops")


def enriched_records() -> list[dict]:
    """Sample records passed through an Enricher whose resolvers know one pod and one sshd socket."""
    recs = sample_records()
    enr = Enricher(HOST, InstanceStateView(HOST.pin_dir, state()), cgroups=FakeCgroups(POD),
                   sockets=FakeSockets(SocketOwner(inode=9, pid=321, process_name="sshd", executable="/usr/sbin/sshd",
                                                   cgroup_id=4242, cgroup_path=POD.path)))
    enr.interfaces.rebuild = lambda: None                        # ifindex 2 = eth0, without asking the kernel
    enr.interfaces._map = {2: Iface("eth0", None)}
    enr.interfaces._gen = enr.instance.generation
    for r in recs:
        enr.enrich(r)
    return recs


def all_records() -> list[dict]:
    return enriched_records() + anomaly_records() + flood_records()


def flood_records() -> list[dict]:
    """Tracking under attack: flow summaries, the per-port SYN signal, the proxy's switches (anomaly
    and audit records)."""
    from tests.collector.test_flood_records import summary_records, switch_audit_records, switch_records, syns_records
    return summary_records() + syns_records() + [r for rs in switch_records() for r in rs] + switch_audit_records()


# ------------------------------------------------------------------------------------------- ECS

def leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from leaves(v, path + ".")
        else:
            yield path, v


def test_ecs_definitions_are_the_official_ones_of_the_declared_version():
    assert ecs.version() == ECS_VERSION
    assert ecs.field("source.ip")["type"] == "ip" and ecs.field("event.type")["normalize"] == ["array"]
    assert ecs.field("network.community_id")["type"] == "keyword" and ecs.field("related.ip")["normalize"] == ["array"]


def assert_ecs_fields(records) -> set[str]:
    """Every record passes tests/conformance/ecs.py (fields of the declared version with their types and
    arrays, categorization allowed values and expected_event_types); returns the ECS paths seen."""
    seen = set()
    for r in records:
        assert ecs.validate(r) == [], (r["event"].get("action"), ecs.validate(r))
        seen |= {path for path, _ in leaves({k: v for k, v in r.items() if k != "hostwall"})}
    return seen


def test_every_ecs_field_we_emit_exists_with_its_type():
    seen = assert_ecs_fields(all_records())
    must = {"@timestamp", "event.kind", "event.category", "event.type", "event.action", "event.outcome", "event.id",
            "event.dataset", "source.ip", "source.port", "source.bytes", "source.packets", "destination.ip",
            "destination.port", "destination.bytes", "destination.packets", "network.transport",
            "network.iana_number", "network.type", "network.direction", "network.community_id", "network.bytes",
            "network.packets", "rule.name", "rule.ruleset", "rule.version", "observer.hostname", "observer.type",
            "observer.product", "observer.version", "observer.ingress.interface.name", "container.id",
            "container.runtime", "container.name", "container.image.name", "orchestrator.namespace",
            "orchestrator.resource.name", "process.pid", "process.name"}
    assert must <= seen, sorted(must - seen)


def test_ecs_network_direction_uses_the_expected_values():
    """Categorization values are checked by ecs.validate above; network.direction has ECS expected_values,
    a convention the validator does not enforce."""
    expected = ecs.field("network.direction")["expected_values"]
    dirs = {r["network"]["direction"] for r in all_records() if "direction" in r.get("network", {})}
    assert dirs and dirs <= set(expected), dirs


def test_enrichment_attributes_the_local_side():
    recs = enriched_records()
    ssh = [r for r in recs if r["event"]["action"] == "flow_start" and r.get("destination", {}).get("port") == 22][0]
    assert ssh["container"] == {"id": "a" * 64, "runtime": "containerd", "name": "sshd",
                                "image": {"name": "registry.local/sshd:9"}}
    assert ssh["orchestrator"] == {"type": "kubernetes", "namespace": "ops",
                                   "resource": {"type": "pod", "id": POD.pod_uid, "name": "bastion-0"}}
    assert ssh["process"] == {"pid": 321, "name": "sshd", "executable": "/usr/sbin/sshd"}
    assert ssh["hostwall"]["attribution"] == "socket" and ssh["hostwall"]["pod_qos"] == "burstable"
    assert ssh["observer"]["ingress"]["interface"]["name"] == "eth0"
    egress = [r for r in recs if r["network"].get("direction") == "egress"][0]
    assert "container" not in egress and egress["hostwall"]["cgroup_id"] == 1234   # unknown cgroup: nothing set
    summary = [r for r in recs if r["hostwall"]["kind"] == "drop_summary"][0]
    assert summary["hostwall"]["interface"]["name"] == "eth0" and "process" not in summary


# ------------------------------------------------------------------------------------------ OCSF

def ocsf_schema() -> dict:
    import ocsf
    return json.loads((Path(ocsf.__file__).parent / "schemas" / "v1_7_0.json").read_text())


def ocsf_model(class_uid: int):
    from ocsf.v1_7_0.events import DetectionFinding, DeviceConfigStateChange, NetworkActivity
    return {4001: NetworkActivity, 2004: DetectionFinding, 5019: DeviceConfigStateChange}[class_uid]


def test_ocsf_events_validate_against_the_ocsf_schema(tmp_path, monkeypatch):
    audit = builder().on_audit(audit_record(tmp_path, monkeypatch))
    schema = ocsf_schema()
    dictionary = schema["dictionary"]["attributes"]
    classes = set()
    for r in all_records() + [audit]:
        o = to_ocsf(r)
        model = ocsf_model(o["class_uid"])
        model.model_validate(copy.deepcopy(o))                  # raises pydantic.ValidationError on a mismatch
        classes.add(o["class_uid"])
        # attributes the model leaves untyped (profiles): must be OCSF dictionary attributes, with valid enums
        for name in o:
            assert name in model.model_fields or name in dictionary, f"{name} is not an OCSF attribute"
        for name in ("action_id", "disposition_id"):
            if name in o:
                assert str(o[name]) in dictionary[name]["enum"], (name, o[name])
        for side in ("src_endpoint", "dst_endpoint"):
            for name in o.get(side, {}):
                assert name in dictionary, f"{side}.{name}"
        assert o["metadata"]["uid"] == r["event"]["id"]
    assert classes == {4001, 2004, 5019}


def test_ocsf_network_activity_mapping():
    recs: dict = {}
    for r in enriched_records():
        recs.setdefault((r["hostwall"]["kind"], r["event"]["action"]), r)     # the first of each: tcp/22
    start = to_ocsf(recs[("flow", "flow_start")])
    assert (start["activity_id"], start["action_id"], start["disposition_id"]) == (1, 1, 1)
    assert start["connection_info"]["community_uid"] == recs[("flow", "flow_start")]["network"]["community_id"]
    assert start["connection_info"]["direction_id"] == 1 and start["connection_info"]["protocol_ver_id"] == 4
    assert start["dst_endpoint"]["container"]["uid"] == "a" * 64                 # local side of an ingress flow
    end = to_ocsf(recs[("flow", "flow_end")])
    assert end["activity_id"] == 2 and end["traffic"] == {"bytes_out": 1000, "packets_out": 10, "bytes_in": 8000,
                                                          "packets_in": 8, "bytes": 9000, "packets": 18}
    assert end["duration"] == 2000 and end["end_time"] - end["start_time"] == 2000
    deny = to_ocsf(recs[("deny", "deny")])
    assert (deny["activity_id"], deny["action_id"], deny["disposition_id"]) == (6, 2, 2)
    assert deny["firewall_rule"] == {"name": "threat-intel", "version": "rev-7"}
    audit_mode = to_ocsf(recs[("deny", "would_deny")])
    assert (audit_mode["action_id"], audit_mode["disposition_id"]) == (1, 15)
    summary = to_ocsf(recs[("drop_summary", "drop_summary")])
    assert summary["count"] == summary["traffic"]["packets"]


def test_ocsf_refuses_unknown_kinds():
    with pytest.raises(EncodeError):
        to_ocsf({"hostwall": {"kind": "mystery"}, "event": {}})
    broken = sample_records()[0]
    del broken["@timestamp"]
    with pytest.raises(EncodeError):
        encode(broken, "ocsf")


# ------------------------------------------------------------------------------------------ OTel

def semconv_names() -> tuple[set[str], set[str]]:
    """(attribute names the installed opentelemetry-semantic-conventions package defines, those of them
    it marks deprecated — renamed or dropped, not merely moved to stable), from the package's source."""
    import importlib.util
    import pkgutil
    import re
    names, deprecated = set(), set()
    const = re.compile(r'^[A-Z0-9_]+: Final = "([a-z0-9_.]+)"\n"""\n(.*?)"""', re.M | re.S)
    for pkg in ("opentelemetry.semconv.attributes", "opentelemetry.semconv._incubating.attributes"):
        for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
            text = Path(importlib.util.find_spec(f"{pkg}.{m.name}").origin).read_text()
            for name, doc in const.findall(text):
                names.add(name)
                if doc.lstrip().startswith("Deprecated") and "in favor of stable" not in doc:
                    deprecated.add(name)
    return names, deprecated


def test_otel_attributes_follow_the_semantic_conventions_of_the_schema_url(tmp_path, monkeypatch):
    from opentelemetry.semconv.attributes.network_attributes import NetworkTransportValues, NetworkTypeValues
    from opentelemetry.semconv.schemas import Schemas

    from hostwall.collector.encoders.otel import SCHEMA_URL, SEMCONV_VERSION
    assert SCHEMA_URL == f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
    assert SCHEMA_URL in {s.value for s in Schemas}, "the package must know the version we name"
    names, deprecated = semconv_names()
    assert {"network.transport", "source.address", "server.address", "security_rule.name"} <= names
    assert "container.runtime" in deprecated and "event.name" in deprecated and "source.address" not in deprecated
    audit = builder().on_audit(audit_record(tmp_path, monkeypatch))
    seen = set()
    for r in all_records() + [audit]:
        o = to_otel(r)
        assert o["schema_url"] == SCHEMA_URL and o["event_name"] == r["event"]["dataset"]
        for k in o["attributes"]:
            if k.startswith("hostwall."):
                continue
            assert k in names, f"{k} is not an OpenTelemetry semantic-convention attribute"
            assert k not in deprecated, f"{k} is deprecated in semantic conventions {SEMCONV_VERSION}"
            seen.add(k)
        a = o["attributes"]
        assert a.get("network.transport", "tcp") in {v.value for v in NetworkTransportValues}
        assert a.get("network.type", "ipv4") in {v.value for v in NetworkTypeValues}
        assert a.get("network.io.direction", "receive") in ("receive", "transmit")
        for side in ("source", "destination", "client", "server"):      # one host, never a prefix
            if f"{side}.address" in a:
                ipaddress.ip_address(a[f"{side}.address"])
    assert {"client.address", "server.port", "network.io.direction", "security_rule.name",
            "container.runtime.name"} <= seen, seen


def test_otel_log_records():
    for r in all_records():
        o = to_otel(r)
        assert set(o) == {"time_unix_nano", "observed_time_unix_nano", "severity_number", "severity_text", "body",
                          "attributes", "event_name", "schema_url"}
        assert o["time_unix_nano"] == parse_iso_ns(r["@timestamp"])
        assert isinstance(o["body"], str) and o["body"]
        for k, v in o["attributes"].items():
            ok = isinstance(v, (str, int, float, bool)) or (
                isinstance(v, list) and v and len({type(x) for x in v}) == 1 and isinstance(v[0], (str, int, float, bool)))
            assert ok, (k, v)
        assert o["attributes"]["log.record.uid"] == r["event"]["id"]
    flow = to_otel([r for r in enriched_records() if r["event"]["action"] == "flow_end"][0])
    a = flow["attributes"]
    assert (a["network.transport"], a["network.type"], a["source.address"], a["source.port"],
            a["destination.address"], a["destination.port"]) == ("tcp", "ipv4", "10.66.2.2", 40000, "10.66.1.2", 22)
    assert (a["client.address"], a["client.port"], a["server.address"], a["server.port"]) == \
        ("10.66.2.2", 40000, "10.66.1.2", 22)                                    # initiator = client
    assert a["k8s.pod.name"] == "bastion-0" and a["k8s.namespace.name"] == "ops" and a["process.pid"] == 321
    assert a["security_rule.name"] == "ssh-admin" and a["security_rule.ruleset.name"] == "edge-web"
    assert a["hostwall.community_id"].startswith("1:") and a["network.io.direction"] == "receive"
    summary = to_otel([r for r in sample_records() if r["hostwall"]["kind"] == "drop_summary"][0])["attributes"]
    assert "source.address" not in summary and summary["hostwall.source.prefix"] == "10.66.3.0/24"
    assert (flow["severity_number"], flow["severity_text"]) == (9, "INFO")
    deny = to_otel([r for r in sample_records() if r["event"]["action"] == "deny"][0])
    assert (deny["severity_number"], deny["severity_text"]) == (13, "WARN")
    fs = to_otel([r for r in flood_records() if r["hostwall"]["kind"] == "flow_summary"][0])
    assert "source.address" not in fs["attributes"] and fs["attributes"]["hostwall.source.prefix"] == "10.66.128.0/24"
    assert fs["body"].startswith("flow_summary tcp 10.66.128.0/24 -> *:8080")
    assert to_otel(flood_records()[-1])["body"] == "SYN proxy off for port 8080 (syn_rate)"
    crit = [to_otel(r) for r in anomaly_records() if r["hostwall"]["anomaly"]["severity"] == "critical"]
    assert crit and all(o["severity_number"] == 21 for o in crit)


# ---------------------------------------------------------------------------------------- encode()

def test_encode_roundtrips_and_rejects_unknown_formats():
    r = enriched_records()[0]
    assert orjson.loads(encode(r)) == r and orjson.loads(encode(r, "ecs")) == r
    assert orjson.loads(encode(r, "ocsf"))["class_uid"] == 4001
    assert orjson.loads(encode(r, "otel"))["severity_text"] == "INFO"
    with pytest.raises(ValueError):
        encode(r, "cef")
    snapshot = json.dumps(r, sort_keys=True)
    encode(r, "ocsf"), encode(r, "otel")
    assert json.dumps(r, sort_keys=True) == snapshot                  # encoders never mutate the record


def test_line_encoder_is_encode_and_a_newline_and_fails_where_encode_fails():
    recs = enriched_records()
    for fmt in ("ecs", "ocsf", "otel"):
        line = line_encoder(fmt)
        assert [line(r) for r in recs] == [encode(r, fmt) + b"\n" for r in recs]
    bad = {**recs[0], "x": {1, 2}}                                     # a set: not JSON
    with pytest.raises(orjson.JSONEncodeError):              # the sink then asks encode() for the error
        line_encoder("ecs")(bad)
    with pytest.raises(EncodeError):
        encode(bad)
    with pytest.raises(ValueError):
        line_encoder("cef")

