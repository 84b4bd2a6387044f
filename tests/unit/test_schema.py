"""schemas/policy.schema.json: a valid 2020-12 schema, closed everywhere, agreeing with the loader."""
from __future__ import annotations

import json
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

from hostwall.enforcer import policy as pol

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "schemas" / "policy.schema.json").read_text())
VALID = sorted((ROOT / "tests" / "data" / "policies").glob("*.yaml")) + [ROOT / "examples" / "policy.yaml"]


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(SCHEMA)


def error_paths(doc) -> list[str]:
    return sorted({".".join(map(str, e.absolute_path)) for e in validator().iter_errors(doc)})


def test_schema_is_valid_draft_2020_12():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def _objects(node, where="#"):
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield where, node
        for k, v in node.items():
            yield from _objects(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _objects(v, f"{where}/{i}")


def test_every_object_is_closed():
    objs = list(_objects(SCHEMA))
    assert len(objs) >= 12
    for where, node in objs:
        assert node.get("additionalProperties") is False, where


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_policies_pass_schema(path):
    assert error_paths(yaml.safe_load(path.read_text())) == []


def test_enums_match_the_typed_model():
    d = SCHEMA["$defs"]
    assert d["rule"]["properties"]["direction"]["enum"] == list(typing.get_args(pol.Direction))
    assert d["rule"]["properties"]["action"]["enum"] == list(typing.get_args(pol.Action))
    assert d["rule"]["properties"]["protocol"]["enum"] == list(typing.get_args(pol.Protocol))
    assert SCHEMA["properties"]["rules"]["maxItems"] == pol.MAX_RULES


@pytest.mark.parametrize("patch,path", [
    ({"version": 2}, "version"),
    ({"version": True}, "version"),
    ({"extra": 1}, ""),
    ({"name": ""}, "name"),
    ({"defaults": {"stateful": "yes"}}, "defaults.stateful"),
    ({"rules": [{"name": "a", "priority": "ten", "direction": "ingress", "action": "allow"}]}, "rules.0.priority"),
    ({"rules": [{"name": "a", "priority": 1, "direction": "ingress", "action": "allow", "ports": [0]}]},
     "rules.0.ports.0"),
    ({"rules": [{"name": "a", "priority": 1, "direction": "ingress", "action": "allow", "ports": ["1-2-3"]}]},
     "rules.0.ports.0"),
    ({"rules": [{"name": "a", "priority": 1, "direction": "ingress", "action": "allow", "peers": []}]},
     "rules.0.peers"),
    ({"rules": [{"name": "A", "priority": 1, "direction": "ingress", "action": "allow"}]}, "rules.0.name"),
    ({"rules": [{"name": "a", "priority": 1, "direction": "ingress"}]}, "rules.0"),
    ({"dos": {"profiles": {"p": {"per_source": {"pps": 0}}}}}, "dos.profiles.p.per_source.pps"),
    ({"dos": {"profiles": {"p": {"source_prefix_v6": 129}}}}, "dos.profiles.p.source_prefix_v6"),
    ({"dos": {"profiles": {"bad name": {}}}}, "dos.profiles"),
    ({"interfaces": [{"name": "eth0", "xdp_mode": "fast"}]}, "interfaces.0.xdp_mode"),
    ({"interfaces": [{"name": "x" * 16}]}, "interfaces.0.name"),
])
def test_invalid_documents_rejected(patch, path):
    doc = {"version": 1, "name": "t", **patch}
    assert error_paths(doc) == [path]


def test_too_many_rules_rejected():
    rules = [{"name": f"r{i}", "priority": 1, "direction": "ingress", "action": "allow"} for i in range(4097)]
    assert error_paths({"version": 1, "name": "t", "rules": rules}) == ["rules"]
    assert error_paths({"version": 1, "name": "t", "rules": rules[:4096]}) == []


def test_loader_uses_the_schema_file():
    from hostwall.enforcer import validation
    assert validation.SCHEMA_PATH == ROOT / "schemas" / "policy.schema.json"
    assert validation.schema() == SCHEMA
