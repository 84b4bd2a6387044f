"""DNS names and the patterns of `fqdns` rules (docs/policy.md "FQDN rules"), shared by the policy
loader, the DNS proxy and the collector (which names a flow's destination).

A pattern is an exact name (`mirror.example.com`) or one leading wildcard label (`*.example.net`), which
matches exactly one more label (`api.example.net`; not `example.net`, not `a.b.example.net`), as a TLS
wildcard does (RFC 6125 §6.4.3) and Cilium's `*`. Names compare in lowercase without the trailing dot.
Pure Python, no I/O; matching a name against a PatternIndex costs two dict lookups.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["normalize_name", "parse_pattern", "matches", "PatternIndex", "MAX_NAME"]

MAX_NAME = 253                  # characters of a name without its trailing dot (RFC 1035 §2.3.4)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalize_name(name: str) -> str:
    """Lowercase, without the trailing dot; no validation (for names off the wire)."""
    n = name.lower()
    return n[:-1] if n.endswith(".") else n


def _check_name(name: str, what: str) -> None:
    if not name:
        raise ValueError(f"{what} is empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"{what} has {len(name)} characters; a DNS name has at most {MAX_NAME}")
    if not name.isascii():
        raise ValueError(f"{what} is not ASCII; write an internationalised name in its xn-- (punycode) form")
    for label in name.split("."):
        if not label:
            raise ValueError(f"{what} has an empty label (two dots in a row, or a leading dot)")
        if len(label) > 63:
            raise ValueError(f"{what}: label {label[:20]!r}... has {len(label)} characters; at most 63")
        if not _LABEL.fullmatch(label):
            raise ValueError(f"{what}: label {label!r} may hold only letters, digits, '-' and '_', and may not "
                             "start or end with '-'")


def parse_pattern(text: str) -> str:
    """Validate and normalise one `fqdns` entry; ValueError with a one-line message.

    'Mirror.Example.com.' -> 'mirror.example.com'; '*.payments.example.net' stays; a '*' anywhere but as
    the whole first label, an empty or over-long label or name, or a non-ASCII name is an error."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a name; write a DNS name like mirror.example.com")
    raw = text.strip()
    name = normalize_name(raw)
    if name == "*":
        raise ValueError(f"{raw!r}: a wildcard needs the name it stands under, like '*.example.com'")
    if name.startswith("*."):
        rest = name[2:]
        if "*" in rest:
            raise ValueError(f"{raw!r}: a wildcard is allowed only once, as the whole first label "
                             "(like '*.example.com')")
        _check_name(rest, f"{raw!r}")
        if len(rest) + 2 > MAX_NAME:
            raise ValueError(f"{raw!r} is longer than a DNS name may be ({MAX_NAME} characters)")
        return name
    if "*" in name:
        raise ValueError(f"{raw!r}: a wildcard is allowed only as the whole first label ('*.example.com' "
                         "matches one label under example.com)")
    _check_name(name, f"{raw!r}")
    return name


def matches(name: str, pattern: str) -> bool:
    """Does the (normalised) name match the (normalised) pattern? Exact, or '*.' + one label."""
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(dot) and bool(head) and rest == pattern[2:]
    return name == pattern


class PatternIndex:
    """Which patterns a name matches, in O(1): a dict of exact names and one of wildcard parents.

    keys: any hashable tag per pattern (e.g. the set ids that list it); lookup(name) returns the tags
    of every matching pattern (a set, possibly empty)."""

    def __init__(self, tagged: Iterable[tuple[str, object]] = ()):
        self.exact: dict[str, set] = {}
        self.parent: dict[str, set] = {}
        for pattern, tag in tagged:
            self.add(pattern, tag)

    def add(self, pattern: str, tag: object) -> None:
        if pattern.startswith("*."):
            self.parent.setdefault(pattern[2:], set()).add(tag)
        else:
            self.exact.setdefault(pattern, set()).add(tag)

    def lookup(self, name: str) -> set:
        out = set(self.exact.get(name, ()))
        head, dot, rest = name.partition(".")
        if dot and head:
            out |= self.parent.get(rest, set())
        return out

    def __bool__(self) -> bool:
        return bool(self.exact or self.parent)
