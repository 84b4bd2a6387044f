"""ECS conformance of a canonical record against the vendored field definitions
(tests/data/ecs/<version>/fields.json, from elastic/ecs generated/ecs/ecs_flat.yml).

Rules:
- Top-level keys are roots of ECS fields of the version (field sets such as `event`, base fields such
  as `@timestamp`, `labels`, `message`, `tags`); our own fields sit under `hostwall`, an object that is
  exempt below its root.
- Every other leaf path is an ECS field. Fields of type `object` with an `object_type` (`labels`)
  hold a map of that type; `object` without one and `nested` hold objects whose keys are ECS fields
  below the field; `flattened` holds any object.
- Values match the ECS type: keyword-family -> string; long/integer/short/byte -> integer (not a
  boolean) in the type's range; float family -> number; boolean; ip -> one IPv4/IPv6 address (never
  a prefix); date -> an Elasticsearch `strict_date_optional_time` string or epoch milliseconds;
  geo_point -> {"lat", "lon"} or "lat,lon". `pattern` (e.g. *.mac) must match.
- Arrays: ECS marks multi-valued fields with `normalize: array`, defined in elastic/ecs
  schemas/README.md as "the content of the field should be an array (even when there's only one
  value)". Elasticsearch itself would take a list in any field, but ECS's RFC 0032 (definition of ECS
  compliance, rfcs/text/0032-definition-of-ecs-compliance.md) gives the reason for the marker:
  "Components adopting ECS are able to expect what fields do and don't use arrays". So a field with
  `normalize: array` must hold a list, and any other field must hold a single value, never a list.
- `allowed_values` (event.kind, event.category, event.type, event.outcome) are the only values; for
  each value of event.category, every event.type value is one of its `expected_event_types`.
- Required fields (`@timestamp`, `ecs.version`) are present and `ecs.version` is the vendored version.
`expected_values` (e.g. network.direction) are not enforced: elastic/ecs schemas/README.md calls them
"the recommended convention, but users may also use other values"; field() exposes them for tests.
"""
from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from functools import cache

from . import join, load

__all__ = ["field", "validate", "version"]

KEYWORDS = {"keyword", "constant_keyword", "wildcard", "match_only_text", "text"}
INT_BITS = {"long": 64, "integer": 32, "short": 16, "byte": 8}
FLOATS = {"float", "double", "half_float", "scaled_float"}
# Elasticsearch strict_date_optional_time: date, optional time, optional zone
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?)?(Z|[+-]\d{2}:?\d{2})?")


@cache
def _spec(ver: str | None) -> tuple[str, dict, frozenset, frozenset]:
    """(version, fields, top-level keys, every proper prefix of a field name)."""
    doc = load("ecs", "fields.json", ver)
    fields = doc["fields"]
    prefixes = {".".join(n.split(".")[:i]) for n in fields for i in range(1, n.count(".") + 1)}
    return doc["version"], fields, frozenset(n.split(".")[0] for n in fields), frozenset(prefixes)


def version(ver: str | None = None) -> str:
    """The vendored ECS version (the newest, unless `ver` names one)."""
    return _spec(ver)[0]


def field(name: str, ver: str | None = None) -> dict:
    """The vendored definition of ECS field `name` (KeyError if it is not one)."""
    return _spec(ver)[1][name]


def validate(record: dict, ver: str | None = None) -> list[str]:
    """Violations of `record` against the ECS definitions (empty list: conforms)."""
    v, fields, top, prefixes = _spec(ver)
    if not isinstance(record, dict):
        return ["record: not a JSON object"]
    out: list[str] = []
    for key, value in record.items():
        if key == "hostwall":
            if not isinstance(value, dict):
                out.append("hostwall: our namespace must be an object")
        elif key not in top:
            out.append(f"{key}: top-level key is not an ECS {v} field set or field (ours go under hostwall.*)")
        else:
            _walk(key, key, value, fields, prefixes, v, out)
    for name, f in fields.items():
        if f.get("required") and _get(record, name) is None:
            out.append(f"{name}: required by ECS, missing")
    got = _get(record, "ecs.version")
    if got is not None and got != v:
        out.append(f"ecs.version: {got!r} is not the vendored ECS version {v!r}")
    out += _categorization(record, fields)
    return out


def _get(record: dict, name: str):
    cur = record
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _walk(name: str, path: str, value, fields: dict, prefixes: frozenset, v: str, out: list) -> None:
    """`value` at ECS name `name` (shown as `path`, which has array indices)."""
    f = fields.get(name)
    if f is not None:
        _field(name, path, value, f, fields, prefixes, v, out)
    elif isinstance(value, dict) and name in prefixes:
        for k, x in value.items():
            _walk(f"{name}.{k}", join(path, k), x, fields, prefixes, v, out)
    else:
        out.append(f"{path}: not an ECS {v} field")


def _field(name, path, value, f: dict, fields, prefixes, v, out) -> None:
    is_array = "array" in f.get("normalize", [])
    if isinstance(value, list):
        if not is_array:
            out.append(f"{path}: a list, but ECS {name} is single-valued (no normalize: array)")
            return
        items = [(join(path, i), x) for i, x in enumerate(value)]
    else:
        if is_array:
            out.append(f"{path}: ECS {name} has normalize: array, must be a list even for one value")
        items = [(path, value)]
    for p, x in items:
        _value(name, p, x, f, fields, prefixes, v, out)


def _value(name, path, x, f: dict, fields, prefixes, v, out) -> None:
    t = f["type"]
    if t in ("object", "nested", "flattened"):
        if not isinstance(x, dict):
            out.append(f"{path}: ECS type {t} needs an object, got {type(x).__name__}")
        elif "object_type" in f:
            for k, y in x.items():
                err = type_error(f["object_type"], y)
                if err:
                    out.append(f"{join(path, k)}: {err}")
        elif t != "flattened":
            for k, y in x.items():
                _walk(f"{name}.{k}", join(path, k), y, fields, prefixes, v, out)
        return
    err = type_error(t, x)
    if err:
        out.append(f"{path}: {err}")
        return
    if "pattern" in f and not re.search(f["pattern"], x):
        out.append(f"{path}: {x!r} does not match the ECS pattern {f['pattern']}")
    allowed = [a["name"] for a in f.get("allowed_values", [])]
    if allowed and x not in allowed:
        out.append(f"{path}: {x!r} is not an allowed value of {name} ({', '.join(allowed)})")


def type_error(t: str, x) -> str | None:
    """Why `x` is not a value of ECS type `t` (None: it is)."""
    if t in KEYWORDS:
        ok = isinstance(x, str)
    elif t in INT_BITS:
        bits = INT_BITS[t]
        ok = isinstance(x, int) and not isinstance(x, bool) and -(1 << bits - 1) <= x < (1 << bits - 1)
    elif t == "unsigned_long":
        ok = isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 64
    elif t in FLOATS:
        ok = isinstance(x, (int, float)) and not isinstance(x, bool)
    elif t == "boolean":
        ok = isinstance(x, bool)
    elif t == "ip":
        return _ip_error(x)
    elif t == "date":
        return _date_error(x)
    elif t == "geo_point":
        ok = _geo_point(x)
    else:
        return f"unknown ECS type {t} (vendored data newer than this validator?)"
    return None if ok else f"{x!r} is not a value of ECS type {t}"


def _ip_error(x) -> str | None:
    if not isinstance(x, str):
        return f"{x!r} is not a value of ECS type ip (a string address)"
    try:
        ipaddress.ip_address(x)
        return None
    except ValueError:
        if "/" in x:
            return f"{x!r} is a prefix; ECS type ip holds one address, never a CIDR"
        return f"{x!r} is not an IPv4/IPv6 address (ECS type ip)"


def _date_error(x) -> str | None:
    if isinstance(x, int) and not isinstance(x, bool):
        return None                                                      # epoch_millis
    m = _DATE.fullmatch(x) if isinstance(x, str) else None
    try:
        if m:
            y, mo, d, h, mi, s = (int(g) if g else 0 for g in m.groups()[:6])
            datetime(y, mo, d, h, mi, s)
            return None
    except ValueError:
        pass
    return f"{x!r} is not an ECS date (ISO 8601 strict_date_optional_time or epoch milliseconds)"


def _geo_point(x) -> bool:
    if isinstance(x, dict):
        lat, lon = x.get("lat"), x.get("lon")
        nums = all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in (lat, lon))
        return set(x) == {"lat", "lon"} and nums and -90 <= lat <= 90 and -180 <= lon <= 180
    if isinstance(x, str):
        parts = x.split(",")
        try:
            return len(parts) == 2 and -90 <= float(parts[0]) <= 90 and -180 <= float(parts[1]) <= 180
        except ValueError:
            return False
    return False


def _categorization(record: dict, fields: dict) -> list[str]:
    """Every event.type value is expected for each event.category value (expected_event_types)."""
    expected = {a["name"]: a.get("expected_event_types", [])
                for a in fields["event.category"].get("allowed_values", [])}
    cats, types = _get(record, "event.category"), _get(record, "event.type")
    cats = cats if isinstance(cats, list) else [cats]
    types = types if isinstance(types, list) else [types] if types is not None else []
    out = []
    for cat in (c for c in cats if isinstance(c, str)):
        for t in types:
            if cat in expected and t not in expected[cat]:
                out.append(f"event.type: {t!r} is not an expected event type of event.category {cat!r} "
                           f"({', '.join(expected[cat])})")
    return out
