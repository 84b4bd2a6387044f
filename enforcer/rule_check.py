"""A typed check of one policy rule that implies the schema's `$defs/rule` accepts it (docs/policy.md
"Validation"), so the schema pass need not walk the rules of a policy whose rules all pass it.

Why: the compiled schema (fastjsonschema) costs ~3.5 µs a rule, ~15 ms of a 4096-rule apply; this
check ~1 µs (docs/benchmarks.md "`swap` — rule lines in one pass"). It is only ever sufficient, never
necessary: a rule it does not accept goes through the schema as before, and every error report comes
from the schema pass. It is written for one version of `$defs/rule` and of the `rules` list (at most
4096 items, nothing else): `plain_rule_check(schema)` returns it only while their sha256 is the one
below (an edit of either turns it off until this check is reviewed against it;
tests/unit/test_rule_check.py fails meanwhile).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

__all__ = ["RULE_SCHEMA_SHA256", "plain_rule", "plain_rule_check", "rule_schema_sha256"]

RULE_SCHEMA_SHA256 = "cba8bffdbb76a364533a76a70241172542bfa85f063d6077a7d532d241cf331a"

_KEYS = frozenset({"name", "priority", "direction", "action", "protocol", "peers", "peers_file", "ports",
                   "icmp_types", "fqdns"})
_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_PORT = re.compile(r"[0-9]+(?:-[0-9]+)?")        # stricter than the schema's (no spaces)
_DIRECTIONS = frozenset({"ingress", "egress"})
_ACTIONS = frozenset({"allow", "deny", "log"})
_PROTOCOLS = frozenset({"tcp", "udp", "icmp", "icmpv6", "any"})


def rule_schema_sha256(schema: dict) -> str:
    """sha256 of `$defs/rule` and of the `rules` list's schema in canonical JSON (sorted keys)."""
    text = json.dumps([schema["$defs"]["rule"], schema["properties"]["rules"]], sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def plain_rule_check(schema: dict) -> Callable[[Any], bool] | None:
    """plain_rule if `schema`'s rule subschema is the one it was written for, else None."""
    return plain_rule if rule_schema_sha256(schema) == RULE_SCHEMA_SHA256 else None


def plain_rule(r: Any) -> bool:
    """True only if `$defs/rule` accepts `r` (exact types: no bool for int, no float, no str subclass)."""
    if type(r) is not dict or not _KEYS.issuperset(r):
        return False
    name, prio = r.get("name"), r.get("priority")
    if (type(name) is not str or not _NAME.fullmatch(name) or type(prio) is not int or not 0 <= prio <= 1_000_000
            or type(r.get("direction")) is not str or r["direction"] not in _DIRECTIONS
            or type(r.get("action")) is not str or r["action"] not in _ACTIONS):
        return False
    if "protocol" in r and (type(r["protocol"]) is not str or r["protocol"] not in _PROTOCOLS):
        return False
    if "peers" in r and not _strings(r["peers"], 1, None):
        return False
    if "peers_file" in r and (type(r["peers_file"]) is not str or not r["peers_file"]):
        return False
    if "fqdns" in r and not _strings(r["fqdns"], 1, 1000):
        return False
    if "ports" in r and not _items(r["ports"], 1, 65535, _PORT.fullmatch):
        return False
    return "icmp_types" not in r or _items(r["icmp_types"], 0, 255, len)


def _strings(v: Any, least: int, most: int | None) -> bool:
    """A list of `least`..`most` non-empty strings."""
    return (type(v) is list and least <= len(v) <= (most or len(v))
            and all(type(x) is str and x for x in v))


def _items(v: Any, lo: int, hi: int, text_ok: Callable[[str], Any]) -> bool:
    """A non-empty list of ints in lo..hi and strings that text_ok accepts."""
    if type(v) is not list or not v:
        return False
    for x in v:
        t = type(x)
        if not ((t is int and lo <= x <= hi) or (t is str and text_ok(x))):
            return False
    return True
