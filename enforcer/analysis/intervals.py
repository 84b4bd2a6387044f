"""Sets of integers as sorted, disjoint, half-open intervals; address and port rendering.

The exact answers of the policy tooling (docs/policy.md "Tooling") are unions of products of
intervals on three axes: peer address (per family), protocol, destination port (or ICMP type/code
key). `Span` is one such set on one axis: small (a handful to a few thousand intervals), Python ints
so that IPv6's 128-bit axis needs no special case. Cost: O(n + m) per set operation.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["Span", "V4_END", "V6_END", "PORT_END", "axis_end", "addr_text", "peers_text", "ranges_text",
           "cidrs"]

V4_END = 1 << 32
V6_END = 1 << 128
PORT_END = 1 << 16


def axis_end(family: int) -> int:
    return V4_END if family == 4 else V6_END


@dataclass(frozen=True, slots=True)
class Span:
    """A set of integers in [0, end): `iv` holds sorted, disjoint, non-adjacent [start, stop) pairs."""
    iv: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, pairs: Iterable[tuple[int, int]]) -> Span:
        """Normalise any [start, stop) pairs (overlapping, unsorted, empty ones dropped)."""
        out: list[list[int]] = []
        for s, e in sorted((int(s), int(e)) for s, e in pairs if e > s):
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        return cls(tuple((s, e) for s, e in out))

    @classmethod
    def full(cls, end: int) -> Span:
        return cls(((0, end),))

    @classmethod
    def point(cls, v: int) -> Span:
        return cls(((v, v + 1),))

    @classmethod
    def from_cidrs(cls, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Span:
        return cls.of((int(n.network_address), int(n.network_address) + n.num_addresses) for n in nets)

    def __bool__(self) -> bool:
        return bool(self.iv)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.iv)

    def __len__(self) -> int:
        return len(self.iv)

    def size(self) -> int:
        return sum(e - s for s, e in self.iv)

    def __contains__(self, v: int) -> bool:
        lo, hi = 0, len(self.iv)
        while lo < hi:
            mid = (lo + hi) // 2
            s, e = self.iv[mid]
            if v < s:
                hi = mid
            elif v >= e:
                lo = mid + 1
            else:
                return True
        return False

    def __or__(self, other: Span) -> Span:
        return Span.of(self.iv + other.iv)

    def __and__(self, other: Span) -> Span:
        out, i, j = [], 0, 0
        a, b = self.iv, other.iv
        while i < len(a) and j < len(b):
            s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if s < e:
                out.append((s, e))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return Span(tuple(out))

    def complement(self, end: int) -> Span:
        out, prev = [], 0
        for s, e in self.iv:
            if s > prev:
                out.append((prev, s))
            prev = e
        if prev < end:
            out.append((prev, end))
        return Span(tuple(out))

    def __sub__(self, other: Span) -> Span:
        if not other:
            return self
        end = max(self.iv[-1][1] if self.iv else 0, other.iv[-1][1])
        return self & other.complement(end)

    def covers(self, end: int) -> bool:
        return self.iv == ((0, end),)

    def first(self) -> int | None:
        return self.iv[0][0] if self.iv else None

    def sample(self) -> int | None:
        """A representative member: the second value of the first interval when it has more than two
        (a network's first address reads like a network, not a host), else its first value."""
        if not self.iv:
            return None
        s, e = self.iv[0]
        return s + 1 if e - s > 2 else s


# ---------------------------------------------------------------- rendering

def addr_text(family: int, v: int) -> str:
    return str(ipaddress.IPv4Address(v) if family == 4 else ipaddress.IPv6Address(v))


def cidrs(family: int, span: Span) -> list[str]:
    """The shortest list of CIDRs covering exactly `span` (per interval, summarize_address_range)."""
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    out: list[str] = []
    for s, e in span:
        out += [str(n) for n in ipaddress.summarize_address_range(cls(s), cls(e - 1))]
    return out


def _cidr_or_range(family: int, s: int, e: int) -> str:
    nets = cidrs(family, Span(((s, e),)))
    if len(nets) == 1:
        return nets[0]
    return f"{addr_text(family, s)}-{addr_text(family, e - 1)}"


def peers_text(family: int, span: Span, limit: int = 6) -> str:
    """Human form of a set of peer addresses of one family: "any IPv4", a list of CIDRs (or a-b
    ranges where a range is not one CIDR), or "any IPv4 except …" when the complement is shorter."""
    end = axis_end(family)
    fam = f"IPv{family}"
    if span.covers(end):
        return f"any {fam}"
    if not span:
        return f"no {fam} address"
    comp = span.complement(end)
    if len(comp) < len(span):
        parts = [_cidr_or_range(family, s, e) for s, e in comp]
        head = ", ".join(parts[:limit]) + (f" (+{len(parts) - limit} more)" if len(parts) > limit else "")
        return f"any {fam} except {head}"
    parts = [_cidr_or_range(family, s, e) for s, e in span]
    return ", ".join(parts[:limit]) + (f" (+{len(parts) - limit} more)" if len(parts) > limit else "")


def ranges_text(span: Span, limit: int = 8) -> str:
    """Ports (or other small integers) as "22, 80, 8000-8100"."""
    parts = [str(s) if e - s == 1 else f"{s}-{e - 1}" for s, e in span]
    return ", ".join(parts[:limit]) + (f" (+{len(parts) - limit} more)" if len(parts) > limit else "")
