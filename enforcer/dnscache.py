"""The DNS proxy's answer cache (docs/policy.md "DNS proxy: upstream sockets and answer cache").

Keyed by the query's bytes as the client sent them, ID aside (question with its case, flags, EDNS), and
the transport (a TCP answer may be larger than a UDP one). The proxy looks a datagram up *before*
parsing it: bytes equal to a query answered under the current policy are that query (a response or a
malformed message never equals a key). A hit costs a dict lookup and the client's ID joined to the
answer's body, its TTLs aged once per second per entry (`_aged`), instead of parsing and an upstream
round trip.

What is cached (`cacheable`): answers that parse completely (every record framed, nothing trailing),
not truncated, with rcode NOERROR or NXDOMAIN:
- positive answers live for the smallest TTL of their records (OPT aside);
- negative answers (NXDOMAIN, or NOERROR with no answer record) only with the zone's SOA in the
  authority section, for min(SOA TTL, SOA MINIMUM) (RFC 2308 §5); without an SOA they are not cached;
- SERVFAIL, REFUSED and every other rcode are never cached (a failure must not outlive its cause).

Served answers have every TTL lowered by the seconds the entry has aged, rounded up. The caller bounds an
entry's life further: for a listed name, by the learnt dynamic-set entries' remaining life
(enforcer/dnslearn.py Learnt.held_ns) less the learner's renewal slack (Learnt.slack_ns), so a cached
answer never names an address the datapath has dropped or is about to drop. `clear()` on every policy change (the sets or the dns section). At most `size`
entries; an insert into a full cache drops the oldest entry (counted as an eviction by the caller);
expired entries go when looked up or met by the eviction.
"""
from __future__ import annotations

import struct

from .dnswire import Question, frame_record

__all__ = ["AnswerCache", "cacheable", "capped", "MAX_LIFE_S"]

MAX_LIFE_S = 86400                    # an answer is never cached for longer than a day
_TTL = struct.Struct("!I")
NOERROR, NXDOMAIN, SOA, OPT = 0, 3, 6, 41


def _walk(data: bytes, q: Question) -> tuple[list[int], int, int | None] | None:
    """(offsets of every TTL but OPT's, the smallest of them, the SOA's negative life or None) of an answer
    to `q`, or None when a record does not frame or bytes trail."""
    try:
        an, ns, ar = struct.unpack_from("!HHH", data, 6)
        pos, offs, life, neg = q.end, [], MAX_LIFE_S, None
        for i in range(an + ns + ar):
            _, rtype, _, ttl, rd, end = frame_record(data, pos)
            if rtype != OPT:
                offs.append(rd - 6)                      # the TTL: 6 bytes before the rdata
                life = min(life, ttl)
                if rtype == SOA and an <= i < an + ns and end - rd >= 22:
                    neg = min(ttl, _TTL.unpack_from(data, end - 4)[0])
            pos = end
    except (ValueError, struct.error, IndexError):
        return None
    return (offs, life, neg) if pos == len(data) else None


def cacheable(data: bytes, q: Question) -> tuple[int, tuple[int, ...]] | None:
    """(life in s, offsets of the TTLs to age) for an answer to `q`, or None when it must not be cached."""
    if len(data) < q.end or data[2] & 0x02:              # truncated: the client will ask over TCP
        return None
    rcode = data[3] & 0xF
    if rcode not in (NOERROR, NXDOMAIN):
        return None
    w = _walk(data, q)
    if w is None:
        return None
    offs, life, neg = w
    if rcode == NXDOMAIN or data[6:8] == b"\0\0":          # no answer record
        if neg is None:
            return None
        life = min(life, neg)
    return (life, tuple(offs)) if life > 0 else None


def capped(data: bytes, q: Question, cap_s: int) -> bytes:
    """`data` (an answer to `q`) with every TTL above `cap_s` lowered to it (OPT aside); unchanged when it
    does not frame. A client that honours the TTL then asks again before the learnt set entries of a
    listed name expire, instead of connecting to an address the datapath no longer allows
    (docs/policy.md "DNS proxy: upstream sockets and answer cache")."""
    if len(data) < q.end:
        return data
    w = _walk(data, q)
    if w is None or w[1] <= cap_s:
        return data
    out = bytearray(data)
    for off in w[0]:
        if _TTL.unpack_from(out, off)[0] > cap_s:
            _TTL.pack_into(out, off, cap_s)
    return bytes(out)


# an entry: [body, age, answer, TTL offsets, TTLs as stored, stored_ns, expires_ns, listed]
_BODY, _AGE, _ANSWER, _OFFS, _TTLS, _STORED, _EXPIRES, _LISTED = range(8)


class AnswerCache:
    """key -> entry (above); insertion order = age. Keys: a UDP query's bytes from its flags on, a TCP
    query's as ("t", those bytes) (a tuple never equals bytes). `body` is the answer from its flags on
    with every TTL aged by `age` whole seconds (rounded up), so a hit within the same second as the
    entry's last one costs a concatenation."""

    def __init__(self) -> None:
        self.entries: dict[bytes | tuple[str, bytes], list] = {}

    def get(self, key: bytes | tuple[str, bytes], qid: bytes, now: int) -> tuple[bytes, bool] | None:
        """(the cached answer with ID `qid` (2 bytes) and aged TTLs, whether a rule lists its name), or None
        (expired entries are dropped)."""
        e = self.entries.get(key)
        if e is None:
            return None
        if now >= e[_EXPIRES]:
            del self.entries[key]
            return None
        age = -((e[_STORED] - now) // 1_000_000_000)     # whole seconds, rounded up (see _aged)
        return qid + (e[_BODY] if age == e[_AGE] else _aged(e, age)), e[_LISTED]

    def put(self, key: bytes | tuple[str, bytes], answer: bytes, offs: tuple[int, ...], now: int, expires: int,
            size: int, listed: bool = False) -> int:
        """Store an answer until `expires`; returns how many live entries were evicted for room."""
        evicted = 0
        ents = self.entries
        ents.pop(key, None)
        while len(ents) >= size and ents:
            old = next(iter(ents))
            evicted += ents.pop(old)[_EXPIRES] > now
        ttls = tuple(_TTL.unpack_from(answer, o)[0] for o in offs)
        ents[key] = [answer[2:], 0, answer, offs, ttls, now, expires, listed]
        return evicted

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)


def _aged(e: list, age: int) -> bytes:
    """The entry's body with every TTL lowered by `age` s (at least 0), remembered for that age. The age is
    rounded up: a client served at any instant of a second then drops the answer no later than one served
    at its start, so no TTL outlives the entry's own life (which ends a renewal slack before the learnt
    set entries; rounding down let a client keep an address up to a second past them when that slack is
    below a second, i.e. a clamped TTL under 4 s)."""
    out = bytearray(e[_ANSWER])
    for off, ttl in zip(e[_OFFS], e[_TTLS]):
        _TTL.pack_into(out, off, max(0, ttl - age))
    body = e[_BODY] = bytes(out[2:])
    e[_AGE] = age
    return body
