"""The typed rule check (enforcer/rule_check.py) only ever accepts what the schema accepts.

check_schema leaves the rules out of the compiled schema pass when plain_rule accepts every one, so a
rule it accepts that the schema rejects would lose an error report. Property: on rules drawn from valid
ones with values replaced by odd ones (bool for int, floats, bounds, spaces, newlines, unknown keys), an
accepted rule has no schema error (jsonschema, the reporting pass). The check is active only for the
schema it was written for (sha256), which this test pins."""
from __future__ import annotations

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.enforcer import validation as V
from hostwall.enforcer.rule_check import RULE_SCHEMA_SHA256, plain_rule, plain_rule_check, rule_schema_sha256

from .test_validation_fast import issues_of, mutated

RULES = [
    {"name": "ssh", "priority": 10, "direction": "ingress", "action": "allow", "protocol": "tcp",
     "peers": ["10.20.0.0/16", "2001:db8::/32"], "ports": [22, "8000-8100"]},
    {"name": "intel", "priority": 0, "direction": "ingress", "action": "deny", "peers_file": "x.txt"},
    {"name": "ping_1", "priority": 1_000_000, "direction": "egress", "action": "log", "protocol": "icmp",
     "icmp_types": [0, "echo-request", "3/4"]},
    {"name": "mirror", "priority": 5, "direction": "egress", "action": "allow", "fqdns": ["*.example.com"]},
]
EDGE_VALUES = [True, False, None, 0, 1, -1, 1.0, 255, 256, 65535, 65536, 1_000_000, 1_000_001, "",
               " 22", "22 ", "22-", "1-2-3", "x" * 65, "A", "a\n", "\u0662", "tcp", [], ["x"], [""],
               [1], {}, "ingress"]


def _doc(rule) -> dict:
    return {"version": 1, "name": "x", "rules": [rule]}


def _check(rule) -> None:
    """An accepted rule has no schema error."""
    if plain_rule(rule):
        errors = [e.message for e in jsonschema.Draft202012Validator(V.schema()).iter_errors(_doc(rule))]
        assert errors == [], (rule, errors)


def test_the_check_is_active_for_the_shipped_schema():
    assert rule_schema_sha256(V.schema()) == RULE_SCHEMA_SHA256, \
        "schemas/policy.schema.json's rule changed: review enforcer/rule_check.py against it, then update the hash"
    assert plain_rule_check(V.schema()) is plain_rule
    assert all(plain_rule(r) for r in RULES)


def test_a_changed_rule_schema_turns_it_off():
    sch = V.schema()
    changed = {**sch, "$defs": {**sch["$defs"], "rule": {**sch["$defs"]["rule"], "maxProperties": 3}}}
    assert plain_rule_check(changed) is None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(RULES).flatmap(mutated), st.sampled_from(list(RULES[0]) + ["icmp_types", "fqdns", "x"]),
       st.sampled_from(EDGE_VALUES), st.booleans())
def test_accepted_rules_have_no_schema_error(rule, key, value, put):
    _check({**rule, key: value} if put and isinstance(rule, dict) else rule)


def test_every_edge_value_in_every_field():
    """Each base rule with each field set to each edge value (and [edge] for the lists' items)."""
    keys = [*RULES[0], "peers_file", "icmp_types", "fqdns", "x"]
    for base in RULES:
        for key in keys:
            for value in [*EDGE_VALUES, *([v] for v in EDGE_VALUES)]:
                _check({**base, key: value})


@pytest.mark.parametrize("rule", [
    {**RULES[0], "priority": True}, {**RULES[0], "ports": [0]}, {**RULES[0], "ports": [" 22"]},
    {**RULES[0], "name": "a\n"}, {**RULES[0], "peers": []}, {**RULES[2], "icmp_types": [256]},
])
def test_reports_are_the_schemas(rule, monkeypatch):
    """Rules the check leaves to the schema (some valid: ' 22'), with the same issues both ways."""
    assert not plain_rule(rule)
    with_check = issues_of(_doc(rule), fast=True, monkeypatch=monkeypatch)
    assert with_check == issues_of(_doc(rule), fast=False, monkeypatch=monkeypatch)
