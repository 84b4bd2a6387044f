"""Policy validation toolkit: issue collection, YAML line tracking, JSON-Schema checks, value parsers.

Nothing here raises on bad input: every problem goes into an `Issues` collector, so one load reports
every error (policy.py raises a single PolicyError at the end). Invariants:
- every issue carries a path ("rules[3].ports[1]") and, when it is known, a 1-based line;
- at most one schema issue per exact path, and semantic checks skip a path the schema already
  flagged, so one problem is never reported twice;
- the peers-file parser never builds ipaddress objects per line (inet_pton + numpy, ~1 µs/line).
"""
from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hostwall import resource_dir
from hostwall.yamldoc import Issues, _short

from .rule_check import plain_rule_check

if TYPE_CHECKING:
    import jsonschema

SCHEMA_PATH = resource_dir("schemas") / "policy.schema.json"
MAX_BAD_PEER_LINES = 20          # per peers file; then one "... and N more" issue


# ---------------------------------------------------------------- JSON Schema

@functools.cache
def schema() -> dict:
    """The policy JSON Schema (schemas/policy.schema.json), parsed once."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    import jsonschema  # ~60 ms to import: only needed when the fast check finds a problem
    return jsonschema.Draft202012Validator(schema())


# Keywords whose meaning is the same in fastjsonschema's draft-07 code generator and in draft
# 2020-12 (as the policy schema uses them), plus pure annotations. A schema with any other keyword,
# or with a $ref that has siblings (ignored in draft 07, applied in 2020-12), gets no fast check.
_FAST_KEYWORDS = frozenset({
    "type", "enum", "const", "pattern", "minLength", "maxLength", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "items", "properties",
    "patternProperties", "additionalProperties", "required", "$ref", "$defs",
    "$schema", "$id", "title", "description", "default", "examples", "$comment"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs"})     # name -> subschema


def _fast_compatible(sch: Any, top: bool = True) -> bool:
    if isinstance(sch, bool):
        return True
    if not isinstance(sch, dict) or not set(sch) <= _FAST_KEYWORDS:
        return False
    if ("$schema" in sch or "$id" in sch) and not top:
        return False
    if "$ref" in sch and (set(sch) - {"$ref", "description", "title", "$comment"}
                          or not str(sch["$ref"]).startswith("#/")):
        return False
    for k, v in sch.items():
        if k in _SCHEMA_MAPS:
            if not isinstance(v, dict) or not all(_fast_compatible(x, False) for x in v.values()):
                return False
        elif k in ("items", "additionalProperties") and not _fast_compatible(v, False):
            return False
        elif k in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(v, bool):
            return False                          # draft-04 boolean form
    return True


@functools.cache
def _fast_validator() -> Callable[[Any], Any] | None:
    """The schema compiled to Python by fastjsonschema (~20 ms, once per process; ~15 ms to check
    the max policy against ~270 ms for jsonschema), or None when fastjsonschema is missing or the
    schema uses a keyword outside _FAST_KEYWORDS.

    Only ever used as a pre-check: when it accepts, jsonschema would report nothing (its checks are
    as strict or stricter, e.g. patterns end in \\Z instead of $); when it rejects or raises, the
    full jsonschema pass runs and reports every error as before.
    """
    sch = schema()
    if not _fast_compatible(sch):
        return None
    try:
        import fastjsonschema
        return fastjsonschema.compile(sch, use_default=False)    # never writes defaults into the data
    except Exception:  # noqa: BLE001 — ImportError, or a schema fastjsonschema rejects: full check only
        return None


_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "mapping"
    return type(v).__name__


def _hint(sch: Any) -> str:
    d = sch.get("description") if isinstance(sch, dict) else None
    return f" ({d})" if d else ""


def check_schema(data: Any, issues: Issues) -> None:
    """Validate `data` against the policy schema; one readable issue per failing path.

    Valid data (the common case) costs one call of the compiled fastjsonschema validator (without
    the rules when a typed check accepts them all: _rules_apart); only when that fails does
    jsonschema's iter_errors run, on all the data, to collect every error with its path."""
    fast = _fast_validator()
    if fast is not None:
        try:
            fast(_rules_apart(data))
            return
        except Exception:  # noqa: BLE001 — JsonSchemaValueException or e.g. TypeError: the full check reports
            pass
    for err in _validator().iter_errors(data):
        _report(err, issues)


@functools.cache
def _rule_check() -> Callable[[Any], bool] | None:
    return plain_rule_check(schema())


def _rules_apart(data: Any) -> Any:
    """`data` for the compiled check: with an empty rules list when the typed check accepts every rule
    (enforcer/rule_check.py: the schema accepts them, ~1 µs a rule instead of ~3.5) and there are at
    most the schema's 4096; else `data` itself."""
    check = _rule_check()
    rules = data.get("rules") if type(data) is dict else None
    if check is None or type(rules) is not list or len(rules) > 4096 or not all(map(check, rules)):
        return data
    return {**data, "rules": []}


def _report(err: jsonschema.ValidationError, issues: Issues) -> None:
    path = tuple(err.absolute_path)
    v, sch, inst, val = err.validator, err.schema, err.instance, err.validator_value
    if v == "additionalProperties" and isinstance(inst, dict):
        props = list(sch.get("properties", {}))
        pats = list(sch.get("patternProperties", {}))
        for k in inst:
            if k in props or any(isinstance(k, str) and re.search(p, k) for p in pats):
                continue
            kp = path + (k,)
            if issues.bad(kp):
                continue
            if pats:
                msg = f"invalid name {k!r}{_hint(sch)}"
            else:
                close = difflib.get_close_matches(str(k), props, n=1)
                msg = (f"unknown key {k!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                       + f" (allowed here: {', '.join(props)})")
            issues.add(kp, msg)
        return
    if v == "required" and isinstance(inst, dict):
        for k in val:
            if k not in inst and not issues.bad(path + (k,)):
                issues.add(path + (k,), f"missing required key {k!r}")
        return
    if issues.bad(path):
        return                                    # one schema issue per exact path
    if v == "type":
        want = [val] if isinstance(val, str) else list(val)
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in want)
        where = "the policy" if not path else "value"
        msg = f"{where} must be {words}, got {_kind(inst)} {_short(inst)}{_hint(sch)}"
    elif v == "enum":
        msg = f"{_short(inst)} is not one of: {', '.join(map(str, val))}"
    elif v == "const":
        msg = f"{_short(inst)} is not supported; expected {val!r}{_hint(sch)}"
    elif v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        lo, hi = sch.get("minimum"), sch.get("maximum")
        if "exclusiveMinimum" in sch:
            bound = f"greater than {sch['exclusiveMinimum']}"
        elif lo is not None and hi is not None:
            bound = f"between {lo} and {hi}"
        elif lo is not None:
            bound = f"at least {lo}"
        else:
            bound = f"at most {hi}"
        msg = f"{_short(inst)} is out of range: must be {bound}"
    elif v == "minItems":
        msg = "list is empty; give at least one entry or remove the key" if val == 1 else \
              f"needs at least {val} entries"
    elif v == "maxItems":
        msg = f"{len(inst)} entries exceed the limit of {val}; split the policy or merge entries"
    elif v == "minLength":
        msg = "must not be empty"
    elif v == "maxLength":
        msg = f"is longer than {val} characters"
    elif v == "pattern":
        msg = f"invalid value {_short(inst)}{_hint(sch) or f' (must match {val})'}"
    else:
        msg = err.message
    issues.add(path, msg)


# ---------------------------------------------------------------- CIDR parsing

_pton = socket.inet_pton
_AF4, _AF6 = socket.AF_INET, socket.AF_INET6


def _plen(text: str, maxlen: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError
    n = int(text)
    if n > maxlen:
        raise ValueError
    return n


def parse_cidr(text: str) -> tuple[int, int, int]:
    """'10.0.0.0/8' -> (4, net, 8); a bare address means /32 or /128. ValueError with a readable
    one-line message (host bits set, bad address, bad length). ~1 µs, no ipaddress objects."""
    s = text.strip()
    addr, sep, plen = s.partition("/")
    v6 = ":" in addr
    fam, bits = (_AF6, 128) if v6 else (_AF4, 32)
    try:
        n = int.from_bytes(_pton(fam, addr), "big")
    except (OSError, ValueError):
        raise ValueError(f"{text!r} is not a valid IPv4/IPv6 address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)") \
            from None
    if sep:
        try:
            ln = _plen(plen, bits)
        except ValueError:
            raise ValueError(f"{text!r} has a bad prefix length {plen!r}; use 0-{bits} for "
                             f"IPv{6 if v6 else 4}") from None
    else:
        ln = bits
    if n & ((1 << (bits - ln)) - 1):
        raise ValueError(_host_bits_msg(text, 6 if v6 else 4, n, ln))
    return (6 if v6 else 4, n, ln)


def _host_bits_msg(text: str, fam: int, n: int, ln: int) -> str:
    bits = 32 if fam == 4 else 128
    net = n & ~((1 << (bits - ln)) - 1) & ((1 << bits) - 1)
    addr = ipaddress.IPv4Address(net) if fam == 4 else ipaddress.IPv6Address(net)
    return f"{text.strip()} has host bits set; did you mean {addr}/{ln}?"


_V4_LENS = {str(n): n for n in range(33)}


@dataclass(slots=True)
class PeerLines:
    """Parsed peers file: unique prefixes (sorted), and (line, message) of bad lines, sorted."""
    v4_net: np.ndarray
    v4_len: np.ndarray
    v6_net: list[int]
    v6_len: list[int]
    bad: list[tuple[int, str]]
    bad_total: int


def parse_peer_lines(lines: Sequence[str], progress: Callable[[int], None] | None = None,
                     keep_bad: int = MAX_BAD_PEER_LINES) -> PeerLines:
    """Parse peers-file lines: one CIDR (or bare address) per line, '#' comments, blanks ignored.

    Cost: ~1 µs per IPv4 line (inet_pton, packed bytes, then vectorised host-bit check and dedup
    with numpy); IPv6 lines use Python ints. Only the first `keep_bad` bad lines get a message;
    `bad_total` counts them all. progress(lines_done) is called every 16384 lines.
    """
    pton, af4, af6, len4 = _pton, _AF4, _AF6, _V4_LENS
    packed4 = bytearray()
    lens4 = bytearray()
    lines4: list[int] = []
    v6: list[tuple[int, int]] = []
    bad: list[tuple[int, str]] = []      # (line, raw text) for syntax errors; messages built later
    hostbits: list[tuple[int, str | None]] = []   # None: the text is read back when the message is built
    for i, raw in enumerate(lines):
        if progress is not None and not i & 0x3FFF and i:
            progress(i)
        if "#" in raw:
            raw = raw[: raw.index("#")]
        s = raw.strip()
        if not s:
            continue
        addr, sep, plen = s.partition("/")
        if ":" not in addr:
            try:
                b = pton(af4, addr)
                if sep:
                    ln = len4.get(plen)       # the usual '0'..'32'; anything else: _plen decides
                    if ln is None:
                        ln = _plen(plen, 32)
                else:
                    ln = 32
            except (OSError, ValueError):
                bad.append((i + 1, s))
                continue
            packed4 += b
            lens4.append(ln)
            lines4.append(i + 1)
        else:
            try:
                n = int.from_bytes(pton(af6, addr), "big")
                ln = _plen(plen, 128) if sep else 128
            except (OSError, ValueError):
                bad.append((i + 1, s))
                continue
            if n & ((1 << (128 - ln)) - 1):
                hostbits.append((i + 1, s))
                continue
            v6.append((n, ln))
    if progress is not None:
        progress(len(lines))

    nets = np.frombuffer(bytes(packed4), dtype=">u4").astype(np.uint32)
    lens = np.frombuffer(bytes(lens4), dtype=np.uint8)
    if len(nets):
        host = (np.uint64(1) << (32 - lens.astype(np.uint64))) - np.uint64(1)
        badmask = (nets.astype(np.uint64) & host) != 0
        if badmask.any():
            for k in np.flatnonzero(badmask):
                hostbits.append((lines4[k], None))
            nets, lens = nets[~badmask], lens[~badmask]
        key = np.sort((nets.astype(np.uint64) << np.uint64(8)) | lens.astype(np.uint64))
        if len(key) > 1:                      # unique (np.unique hashes: slower on distinct values)
            key = key[np.concatenate(([True], key[1:] != key[:-1]))]
        nets = (key >> np.uint64(8)).astype(np.uint32)
        lens = (key & np.uint64(0xFF)).astype(np.uint8)
    v6u = sorted(set(v6))

    everything = sorted([(ln, t, False) for ln, t in bad] + [(ln, t, True) for ln, t in hostbits])
    msgs: list[tuple[int, str]] = []
    for ln, text, hb in everything[:keep_bad]:
        s = text if text is not None else _strip_comment(lines[ln - 1])
        if hb:
            _, net, prefix = _split_any(s)
            msgs.append((ln, _host_bits_msg(s, 6 if ":" in s else 4, net, prefix)))
        else:
            try:
                parse_cidr(s)
                msgs.append((ln, f"{s!r} is not a valid CIDR"))   # unreachable in practice
            except ValueError as e:
                msgs.append((ln, str(e)))
    return PeerLines(nets, lens, [n for n, _ in v6u], [ln for _, ln in v6u], msgs, len(everything))


def _strip_comment(raw: str) -> str:
    return raw.split("#", 1)[0].strip()


def _split_any(s: str) -> tuple[int, int, int]:
    addr, sep, plen = s.partition("/")
    fam, bits = (_AF6, 128) if ":" in addr else (_AF4, 32)
    return fam, int.from_bytes(_pton(fam, addr), "big"), int(plen) if sep else bits


# ---------------------------------------------------------------- ports, rates, durations

_RANGE = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?$")


def parse_port(v: int | str) -> tuple[int, int]:
    """22 -> (22, 22); '8000-8100' -> (8000, 8100). ValueError with a readable message."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a port; use a number 1-65535 or 'LO-HI'")
    if isinstance(v, (int, float)):
        if v != int(v):
            raise ValueError(f"{v!r} is not a port; use a number 1-65535 or 'LO-HI'")
        lo = hi = int(v)
    else:
        m = _RANGE.match(v)
        if not m:
            raise ValueError(f"malformed port or range {v!r}; use a number 1-65535 or 'LO-HI' like '8000-8100'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} in {v!r} is out of range; ports are 1-65535")
    if lo > hi:
        raise ValueError(f"range {v!r} is reversed; write '{hi}-{lo}'")
    return lo, hi


def merge_ranges(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sort and merge overlapping/adjacent inclusive ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def get_in(d: Any, key: str, default: Any = None) -> Any:
    """d[key] if d is a mapping that has it, else `default` (a policy document may hold anything)."""
    return d.get(key, default) if isinstance(d, dict) else default
