"""OCSF conformance of an event against the vendored, resolved schema
(tests/data/ocsf/<version>/schema.json; see tests/data/README.md).

The rules are those of the OCSF server's event validator (ocsf/ocsf-server lib/schema/validator2.ex)
applied to the resolved classes and objects:
- `class_uid` picks the class (missing or unknown: nothing else can be checked); `metadata.version`
  is the vendored version; every name in `metadata.profiles` is a profile of the schema.
- An attribute that profiles contribute counts only when `metadata.profiles` lists one of them.
  Required attributes are present, recursively in objects; every key is an attribute of its class or
  object, except in an object without attributes (`object`, the type of `unmapped`: data without an
  OCSF attribute goes there).
- Values: `is_array` attributes are lists; object types are objects, checked recursively; dictionary
  types by their base type (string_t str, integer_t / long_t int in the 64 / 128-bit range and not a
  boolean, float_t a float, boolean_t bool, json_t anything), then the type's `values`, `range`
  (port_t 0-65535), `max_len` and `regex` (ip_t, mac_t, uuid_t, ...), the subtype's own or else its
  base type's.
- Enums: the value (as a string, like the schema's keys) is defined. Siblings (e.g. `activity_id` ->
  `activity_name`), as the schema's metaschema states them (metaschema/dictionary-attribute.schema.json,
  "sibling"): "If the source attribute maps to a defined enumeration value, the sibling attribute
  should be populated with the label of the enum. In the case that the source attribute is `Other`,
  the sibling attribute is populated with a custom label." So a present sibling equals the caption of
  the value, and 99 (Other) comes with its sibling.
- `type_uid` = class_uid * 100 + activity_id; `category_uid` is the class's category.
- `constraints`: `at_least_one` / `just_one` of the listed attributes, on the class and every object.

Stricter than the OCSF server, which only warns about these: a regex or sibling mismatch is a
violation; an ip_t must also parse as one IPv4/IPv6 address; a timestamp_t (ms since the epoch) must
lie in 1973..5138, which no value in seconds or nanoseconds does.
"""
from __future__ import annotations

import ipaddress
import re
from functools import cache

from . import join, load

__all__ = ["schema", "validate", "version"]

_TS_MS = (10**11, 10**14)            # 1973-03-03 .. 5138-11-16 in ms since the epoch


@cache
def schema(ver: str | None = None) -> dict:
    """The vendored resolved schema (newest version unless `ver`), with `by_uid`: class_uid -> class."""
    doc = dict(load("ocsf", "schema.json", ver))
    doc["by_uid"] = {c["uid"]: c for c in doc["classes"].values()}
    return doc


def version(ver: str | None = None) -> str:
    return schema(ver)["version"]


def validate(event: dict, ver: str | None = None) -> list[str]:
    """Violations of `event` against its class (picked by class_uid); empty list: conforms."""
    doc = schema(ver)
    if not isinstance(event, dict):
        return ["event: not a JSON object"]
    uid = event.get("class_uid")
    if not _is_int(uid):
        return [f"class_uid: {uid!r} is missing or not an integer; no class to validate against"]
    cls = doc["by_uid"].get(uid)
    if cls is None:
        return [f"class_uid: {uid} is not one of the vendored OCSF {doc['version']} classes {sorted(doc['by_uid'])}"]
    meta = event.get("metadata") if isinstance(event.get("metadata"), dict) else {}
    profiles = meta.get("profiles") if isinstance(meta.get("profiles"), list) else []
    out = [f"metadata.profiles[{i}]: {p!r} is not an OCSF {doc['version']} profile"
           for i, p in enumerate(profiles) if p not in doc["profiles"]]
    _item(event, "", cls, {p for p in profiles if isinstance(p, str)}, doc, out)
    if isinstance(meta.get("version"), str) and meta["version"] != doc["version"]:
        out.append(f"metadata.version: {meta['version']!r} is not the vendored OCSF version {doc['version']!r}")
    if all(_is_int(event.get(k)) for k in ("activity_id", "type_uid")):
        want = uid * 100 + event["activity_id"]
        if event["type_uid"] != want:
            out.append(f"type_uid: {event['type_uid']} != class_uid * 100 + activity_id = {want}")
    if event.get("category_uid") is not None and event.get("category_uid") != cls["category_uid"]:
        out.append(f"category_uid: {event['category_uid']!r} is not the category {cls['category_uid']} "
                   f"of class {cls['name']}")
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _active(item: dict, profiles: set) -> dict:
    """Attributes of `item` in effect: those of no profile, or of a profile the event applies."""
    return {n: a for n, a in item["attributes"].items() if a.get("profiles") is None or profiles & set(a["profiles"])}


def _item(d: dict, path: str, item: dict, profiles: set, doc: dict, out: list) -> None:
    """Check object/event `d` (at `path`) against class or object definition `item`."""
    what = f"class {item['name']}" if "uid" in item else f"object {item['name']}"
    attrs = _active(item, profiles)
    for name, a in attrs.items():
        p = join(path, name)
        if d.get(name) is None:
            if a["requirement"] == "required":
                out.append(f"{p}: required by {what}, missing")
        else:
            _attribute(p, d[name], a, profiles, doc, out)
            if "enum" in a:
                _enum(path, name, d, a, out)
    if attrs:
        for key in d:
            if key not in attrs:
                out.append(f"{join(path, key)}: {_unknown(key, item, what)}")
    _constraints(d, path, item, what, out)


def _unknown(key: str, item: dict, what: str) -> str:
    a = item["attributes"].get(key)
    if a is not None:
        return f"attribute of profile(s) {', '.join(a['profiles'])} of {what}, not listed in metadata.profiles"
    return f"not an attribute of {what} (data without an OCSF attribute goes in unmapped)"


def _attribute(p: str, v, a: dict, profiles, doc, out) -> None:
    if a.get("is_array"):
        if not isinstance(v, list):
            out.append(f"{p}: must be an array of {a.get('object_type', a['type'])}, got {type(v).__name__}")
            return
        for i, x in enumerate(v):
            _single(join(p, i), x, a, profiles, doc, out)
    else:
        _single(p, v, a, profiles, doc, out)


def _single(p: str, x, a: dict, profiles, doc, out) -> None:
    if a["type"] == "object_t":
        if isinstance(x, dict):
            _item(x, p, doc["objects"][a["object_type"]], profiles, doc, out)
        else:
            out.append(f"{p}: must be a {a['object_type']} object, got {type(x).__name__}")
        return
    err = type_error(a["type"], x, doc["types"])
    if err:
        out.append(f"{p}: {err}")


def type_error(t: str, x, types: dict) -> str | None:
    """Why `x` is not a value of dictionary type `t` (None: it is)."""
    td = types[t]
    base = td.get("type", t)
    sup = types.get(base, {}) if base != t else {}
    ok = {"boolean_t": lambda: isinstance(x, bool), "float_t": lambda: isinstance(x, float),
          "integer_t": lambda: _is_int(x) and -(1 << 63) <= x < 1 << 63,
          "long_t": lambda: _is_int(x) and -(1 << 127) <= x < 1 << 127,
          "string_t": lambda: isinstance(x, str), "json_t": lambda: True}[base]()
    if not ok:
        return f"{x!r} is not a {t}" + (f" ({base})" if base != t else "")

    def rule(k: str):
        return td.get(k, sup.get(k))
    if rule("values") is not None and x not in rule("values"):
        return f"{x!r} is not one of the values {rule('values')} of {t}"
    if rule("range") is not None and not rule("range")[0] <= x <= rule("range")[1]:
        return f"{x!r} is outside the range {rule('range')} of {t}"
    if rule("max_len") is not None and len(x) > rule("max_len"):
        return f"{x!r} is longer than the max_len {rule('max_len')} of {t}"
    if rule("regex") is not None and not re.search(rule("regex"), x):
        return f"{x!r} does not match the regex of {t}"
    return _extra_error(t, x)


def _extra_error(t: str, x) -> str | None:
    if t == "ip_t":
        try:
            ipaddress.ip_address(x)
        except ValueError:
            return f"{x!r} is not one IPv4/IPv6 address (ip_t)" + ("; it is a prefix" if "/" in x else "")
    if t == "timestamp_t" and not _TS_MS[0] <= x < _TS_MS[1]:
        return f"{x} is not milliseconds since the epoch (timestamp_t); seconds or nanoseconds?"
    return None


def _enum(path: str, name: str, d: dict, a: dict, out: list) -> None:
    """Enum values defined; the sibling caption consistent (see the module docstring)."""
    values = d[name] if a.get("is_array") and isinstance(d[name], list) else [d[name]]
    sib = a.get("sibling")
    for i, v in enumerate(values):
        p = join(join(path, name), i) if a.get("is_array") else join(path, name)
        entry = a["enum"].get(str(v).lower() if isinstance(v, bool) else str(v))
        if entry is None:
            out.append(f"{p}: {v!r} is not a value of the enum {name} ({', '.join(sorted(a['enum'], key=_num))})")
            continue
        if not sib:
            continue
        s = d.get(sib)
        s = (s[i] if isinstance(s, list) and i < len(s) else None) if a.get("is_array") else s
        sp = join(join(path, sib), i) if a.get("is_array") else join(path, sib)
        if v == 99 and s is None:
            out.append(f"{sp}: missing; {name} 99 (Other) needs its sibling populated with the source's label")
        elif s is not None and v != 99 and s != entry["caption"]:
            out.append(f"{sp}: {s!r} is not the caption {entry['caption']!r} of {name} {v}")


def _num(k: str):
    return (0, int(k)) if k.lstrip("-").isdigit() else (1, k)


def _constraints(d: dict, path: str, item: dict, what: str, out: list) -> None:
    for kind, names in item.get("constraints", {}).items():
        n = sum(d.get(k) is not None for k in names)
        where = path or "event"
        if kind == "at_least_one" and n < 1:
            out.append(f"{where}: constraint at_least_one of {what} failed: none of {', '.join(names)}")
        elif kind == "just_one" and n != 1:
            out.append(f"{where}: constraint just_one of {what} failed: {n} of {', '.join(names)}")
        elif kind not in ("at_least_one", "just_one"):
            out.append(f"{where}: unknown constraint {kind} of {what} (vendored data newer than this validator?)")
