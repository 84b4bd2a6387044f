"""The fast schema pre-check (fastjsonschema) changes no reported issue, and parsing frees the YAML
node graph by reference counting.

check_schema runs the compiled validator first and jsonschema's iter_errors only when that fails,
so the issues equal those of a jsonschema-only run exactly when "fast accepts" implies "jsonschema
finds nothing". The property test draws policy-shaped data with the edge cases where the two could
differ (bool vs int, 1.0 vs 1, trailing newlines against '$', NaN/inf, non-string keys, unknown
keys, wrong containers) and compares the issues of both paths."""
from __future__ import annotations

import datetime
import gc
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.enforcer import validation as V
from hostwall.enforcer.policy import parse_policy


def issues_of(data, *, fast: bool, monkeypatch) -> list[str]:
    if not fast:
        monkeypatch.setattr(V, "_fast_validator", lambda: None)
    try:
        issues = V.Issues("p.yaml")
        V.check_schema(data, issues)
        return [str(i) for i in issues.sorted()]
    finally:
        monkeypatch.undo()


def test_fast_validator_is_active_for_the_shipped_schema():
    assert V._fast_compatible(V.schema())
    assert V._fast_validator() is not None, "fastjsonschema is missing (pip install 'fastjsonschema>=2.21,<3')"


def test_schema_outside_the_known_keywords_gets_no_fast_check():
    assert not V._fast_compatible({"type": "object", "properties": {"a": {"format": "ipv4"}}})
    assert not V._fast_compatible({"$defs": {"x": {"type": "string"}}, "items": {"$ref": "#/$defs/x", "minItems": 1}})
    assert not V._fast_compatible({"items": [{"type": "string"}]})
    assert not V._fast_compatible({"properties": {"a": {"unevaluatedProperties": False}}})
    assert V._fast_compatible({"type": "object", "properties": {"a": {"$ref": "#/$defs/x", "description": "d"}},
                               "$defs": {"x": {"type": "integer", "exclusiveMinimum": 0}}})


ODD = st.sampled_from([True, False, None, 0, 1, -1, 1.0, 1.5, 65535, 65536, 1_000_001, "", " ", "x\n", "a b",
                       "tcp", "ingress", "allow", "10.0.0.0/8", "8000-8100", " 22 ", "22-", "Web_1", "r1\n",
                       math.inf, -math.inf, math.nan, [], {}, ["x"], {"a": 1}, datetime.date(2024, 1, 1),
                       b"bytes", 10**30])


@st.composite
def mutated(draw, base):
    """`base` with a few values replaced by odd ones, keys dropped or added (some not strings)."""
    if isinstance(base, dict):
        out = {}
        for k, v in base.items():
            roll = draw(st.integers(0, 14))
            if roll == 0:
                continue                                   # drop the key
            out[k] = draw(ODD) if roll == 1 else draw(mutated(v))
        if draw(st.integers(0, 12)) == 0:
            out[draw(st.sampled_from(["extra", "nmae", 5, True, "peers_file", "protocol"]))] = draw(ODD)
        return out
    if isinstance(base, list):
        items = [draw(ODD) if draw(st.integers(0, 10)) == 0 else draw(mutated(v)) for v in base]
        if draw(st.integers(0, 10)) == 0:
            items.append(draw(ODD))
        return items
    return draw(ODD) if draw(st.integers(0, 12)) == 0 else base


BASE = {
    "version": 1, "name": "edge-web", "revision": "42",
    "defaults": {"ingress": "deny", "egress": "allow", "stateful": True, "audit": False},
    "rules": [
        {"name": "ssh", "priority": 10, "direction": "ingress", "action": "allow", "protocol": "tcp",
         "peers": ["10.20.0.0/16", "2001:db8::/32"], "ports": [22, "8000-8100"]},
        {"name": "intel", "priority": 0, "direction": "ingress", "action": "deny", "peers_file": "x.txt"},
        {"name": "dns", "priority": 5, "direction": "egress", "action": "log", "protocol": "udp", "ports": [53]},
    ],
    "dos": {"profiles": {"web": {
        "per_source": {"pps": 2000, "burst": 4000, "bps": "20Mbit"},
        "syn": {"per_source_pps": 200, "global_pps": 50000},
        "udp": {"per_source_pps": 1000}, "icmp": {"per_source_pps": 50},
        "ports": [{"port": 53, "protocol": "udp", "pps": 5000}],
        "ban": {"after": "3s", "duration": 60}, "source_prefix_v4": 24, "source_prefix_v6": 64}}},
    "interfaces": [{"name": "eth0", "xdp_mode": "auto", "dos_profile": "web"}, {"name": "lo", "dos_profile": None}],
}


def test_valid_base_passes_both_ways(monkeypatch):
    assert issues_of(BASE, fast=True, monkeypatch=monkeypatch) == []
    assert issues_of(BASE, fast=False, monkeypatch=monkeypatch) == []


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=mutated(BASE))
def test_fast_pre_check_reports_exactly_what_jsonschema_reports(data, monkeypatch):
    try:
        slow = issues_of(data, fast=False, monkeypatch=monkeypatch)
    except TypeError:
        return            # data jsonschema itself cannot handle (e.g. an int key under patternProperties)
    fast = issues_of(data, fast=True, monkeypatch=monkeypatch)
    assert fast == slow
    accepted = True
    try:
        V._fast_validator()(data)
    except Exception:  # noqa: BLE001 — any rejection counts
        accepted = False
    if accepted:
        assert slow == [], "fastjsonschema accepted what jsonschema rejects"


@pytest.mark.parametrize("doc, path", [
    ({"version": True, "name": "x"}, "version"),
    ({"version": 1, "name": "x\n"}, None),                       # '$' matches before a final newline
    ({"version": 1, "name": "x", "rules": [{"name": "a", "priority": 1.0, "direction": "ingress",
                                             "action": "allow", "ports": [1.0]}]}, None),
    ({"version": 1, "name": "x", "dos": {"profiles": {"p": {"ban": {"after": True, "duration": 1}}}}},
     "dos.profiles.p.ban.after"),
])
def test_edge_cases_agree(doc, path, monkeypatch):
    slow = issues_of(doc, fast=False, monkeypatch=monkeypatch)
    assert issues_of(doc, fast=True, monkeypatch=monkeypatch) == slow
    assert [s.split(": ")[1] for s in slow] == ([path] if path else [])


def test_parse_leaves_no_cyclic_garbage():
    """The YAML node graph (~60 objects per rule) must be freed when parsing ends, not by a later
    cyclic collection that would bill ~0.15 s of the max policy to whatever runs next."""
    rules = [{"name": f"r{i}", "priority": i, "direction": "ingress", "action": "allow", "protocol": "tcp",
              "peers": ["10.0.0.0/8"], "ports": [22, "8000-8100"]} for i in range(300)]
    text = "version: 1\nname: t\nrules:\n" + "".join(f"  - {json.dumps(r)}\n" for r in rules)
    parse_policy(text)                                           # warm caches (validators, regexes)
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        parse_policy(text)
        assert gc.collect() < 200
    finally:
        if was:
            gc.enable()
