"""DNS messages as the proxy needs them (docs/policy.md "FQDN rules"): the question of a query, the
checks an upstream answer must pass, the addresses an answer gives for its question, and the
responses the proxy makes itself.

Queries and answers for names no rule lists are relayed as bytes (the ID rewritten), so the common path
parses only the 12-byte header and the question (~3 µs) and EDNS0 options pass through untouched.
Answers for listed names: only the A/AAAA records that answer the question itself, after its CNAME
chain, are taken; records for other names in the answer (a poisoning attempt, or glue) are ignored. A
small parser of the answer section does it (~15 µs); anything it does not take for granted (a name it
cannot decode, a record running past the end, a chain longer than 16) goes to dnspython's full parser
(~100 µs), which decides, and an answer dnspython rejects is malformed. tests/unit/test_dns_proxy.py
checks the two agree.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

__all__ = ["Question", "parse_query", "answer_matches", "addresses", "make_error", "rcode_of", "QTYPE_NAMES",
           "MalformedAnswer", "frame_record"]

QTYPE_NAMES = {1: "A", 28: "AAAA", 5: "CNAME", 15: "MX", 16: "TXT", 2: "NS", 6: "SOA", 12: "PTR", 33: "SRV",
               65: "HTTPS", 64: "SVCB", 255: "ANY"}
_HDR = struct.Struct("!HHHHHH")
_QTC = struct.Struct("!HH")
A, AAAA = 1, 28


class MalformedAnswer(ValueError):
    """An upstream answer that does not parse or contradicts itself."""


class Question(NamedTuple):
    """A query's one question (a tuple: built once per relayed query, ~5x cheaper than a frozen
    dataclass)."""
    id: int
    flags: int
    name: str                   # lowercase, no trailing dot; "" for the root
    qtype: int
    qclass: int
    end: int                    # offset after the question section
    wire_q: bytes               # the question section as sent, lowercased (answers must echo it)

    @property
    def type_name(self) -> str:
        return QTYPE_NAMES.get(self.qtype, f"TYPE{self.qtype}")


def parse_query(data: bytes) -> Question:
    """The one question of a standard query; ValueError for anything else (a response, another
    opcode, not exactly one question, a compression pointer or a truncated name)."""
    if len(data) < 12:
        raise ValueError("shorter than a DNS header")
    qid, flags, qd, _an, _ns, _ar = _HDR.unpack_from(data)
    if flags & 0x8000:
        raise ValueError("a response, not a query")
    if (flags >> 11) & 0xF != 0:
        raise ValueError("not a standard query (opcode)")
    if qd != 1:
        raise ValueError(f"{qd} questions; exactly one is supported")
    pos, labels, n = 12, [], len(data)
    while True:
        if pos >= n:
            raise ValueError("question name runs past the end")
        ln = data[pos]
        if ln == 0:
            pos += 1
            break
        if ln & 0xC0:
            raise ValueError("compression pointer in the question")
        labels.append(data[pos + 1:pos + 1 + ln])
        pos += 1 + ln
        if pos > n or pos > 267:                         # the name over 255 bytes, or truncated
            raise ValueError("question name too long or truncated")
    if pos + 4 > n:
        raise ValueError("question type/class missing")
    qtype, qclass = _QTC.unpack_from(data, pos)
    end = pos + 4
    wire_q = data[12:end].lower()
    return Question(qid, flags, b".".join(labels).decode("latin-1").lower(), qtype, qclass, end, wire_q)


def answer_matches(data: bytes, qid: int, q: Question) -> bool:
    """Is `data` a response with our ID to our question (echoed byte for byte, case aside)?"""
    if len(data) < q.end:
        return False
    aid, flags, qd = struct.unpack_from("!HHH", data)
    return aid == qid and bool(flags & 0x8000) and qd == 1 and data[12:q.end].lower() == q.wire_q


def rcode_of(data: bytes) -> int:
    return data[3] & 0xF if len(data) >= 4 else -1


def truncated(data: bytes) -> bool:
    return len(data) >= 3 and bool(data[2] & 0x02)


def _name(data: bytes, pos: int) -> tuple[bytes, int]:
    """(lowercased wire name without compression, offset after it) of a name at `pos`; ValueError when
    it runs past the end, a pointer points forward (or loops) or it exceeds 255 bytes."""
    out = bytearray()
    end = -1
    jumps = 0
    limit = pos                                          # the name's start, then the last pointer's target
    while True:
        if pos >= len(data):
            raise ValueError("name runs past the end")
        ln = data[pos]
        if ln & 0xC0 == 0xC0:
            if pos + 1 >= len(data) or jumps > 32:
                raise ValueError("bad compression pointer")
            if end < 0:
                end = pos + 2
            target = ((ln & 0x3F) << 8) | data[pos + 1]
            if target >= limit:                          # as dnspython: each pointer before the last one
                raise ValueError("compression pointer points forward")
            pos = limit = target
            jumps += 1
            continue
        if ln & 0xC0:
            raise ValueError("unknown label type")
        out += data[pos:pos + 1 + ln]
        if len(out) > 255 or pos + 1 + ln > len(data):
            raise ValueError("name too long")
        if ln == 0:
            return bytes(out).lower(), (end if end >= 0 else pos + 1)
        pos += 1 + ln


_SIMPLE = frozenset({1, 5, 28, 41})                     # A, CNAME, AAAA, OPT: what the small parser vets
_RR = struct.Struct("!HHIH")


def frame_record(data: bytes, pos: int) -> tuple[bytes, int, int, int, int, int]:
    """(owner, type, class, ttl, rdata offset, rdata end) of the record at `pos`; ValueError (or
    struct.error) when it runs past the end. The one record framer of the small parser and the answer
    cache (enforcer/dnscache.py)."""
    owner, pos = _name(data, pos)
    rtype, rclass, ttl, rdlen = _RR.unpack_from(data, pos)
    end = pos + 10 + rdlen
    if end > len(data):
        raise ValueError("record past the end")
    return owner, rtype, rclass, ttl, pos + 10, end


def _rrs(data: bytes, pos: int, count: int, out: list) -> int:
    """Append (owner, type, class, ttl, rdata offset, rdlen) of `count` records from `pos`; ValueError on
    anything the small parser does not vet itself (dnspython then decides)."""
    for _ in range(count):
        owner, rtype, rclass, ttl, pos, end = frame_record(data, pos)
        rdlen = end - pos
        if rtype not in _SIMPLE:
            raise ValueError("a type left to dnspython")
        if (rtype == 1 and rdlen != 4) or (rtype == 28 and rdlen != 16):
            raise ValueError("address of the wrong length")
        if rtype == 5 and _name(data, pos)[1] != end:
            raise ValueError("CNAME target does not fill its rdata")
        if rtype == 41:                                  # OPT: the root, then TLV options filling the rdata
            if owner != b"\0":
                raise ValueError("OPT not at the root")
            p = pos
            while p < end:
                p += 4 + struct.unpack_from("!H", data, p + 2)[0]
            if p != end:
                raise ValueError("OPT options overrun")
        out.append((owner, rtype, rclass, ttl, pos, rdlen))
        pos = end
    return pos


def _fast(data: bytes, q: Question) -> tuple[list[str], int] | None:
    """The answer's addresses for the question by the small parser, or None to let dnspython decide.
    Every section is framed (names, record bounds, A/AAAA lengths, CNAME targets, OPT options) and the
    message must end where its last record does, as dnspython requires."""
    try:
        an, ns, ar = struct.unpack_from("!HHH", data, 6)
        rrs: list = []
        pos = _rrs(data, q.end, an, rrs)
        pos = _rrs(data, pos, ns + ar, [])
        if pos != len(data) or sum(1 for r in rrs if r[1] == 41):
            return None                                  # trailing bytes, or OPT in the answer section
        cur, _ = _name(data, 12)
    except (ValueError, struct.error, IndexError):
        return None
    min_ttl = 2**31
    for _ in range(16):
        addrs = [(data[p:p + ln], ttl) for owner, t, c, ttl, p, ln in rrs
                 if owner == cur and t == q.qtype and c == q.qclass]
        if addrs:
            ips = [_ntop(a) for a, _ in addrs]
            return list(dict.fromkeys(ips)), min(min_ttl, min(t for _, t in addrs))
        cname = [(p, ttl) for owner, t, c, ttl, p, ln in rrs if owner == cur and t == 5 and c == q.qclass]
        if len(cname) != 1:
            return ([], 0) if not cname else None
        cur, _ = _name(data, cname[0][0])
        min_ttl = min(min_ttl, cname[0][1])
    return None                                          # a chain this long: dnspython decides


def _ntop(a: bytes) -> str:
    """An address's text as dnspython gives it: IPv4 by inet_ntop (~10x cheaper than ipaddress),
    IPv6 by ipaddress (inet_ntop writes IPv4-mapped addresses differently)."""
    return socket.inet_ntop(socket.AF_INET, a) if len(a) == 4 else str(ipaddress.ip_address(a))


def addresses(data: bytes, q: Question | None = None) -> tuple[list[str], int]:
    """(addresses, ttl) that the answer gives for its question's name, after the CNAME chain; ttl is the
    smallest TTL along the chain. Only A/AAAA questions yield addresses. With the query's Question the
    small parser answers first; MalformedAnswer when dnspython cannot parse it or the chain is
    inconsistent (too long, an answer under NXDOMAIN)."""
    if q is not None and q.qtype in (A, AAAA):
        got = _fast(data, q)
        if got is not None and (got[0] or rcode_of(data) == 0):
            return got
    try:
        msg = dns.message.from_wire(data)
        if len(msg.question) != 1 or msg.question[0].rdtype not in (A, AAAA):
            return [], 0
        res = msg.resolve_chaining()
    except (dns.exception.DNSException, ValueError, struct.error, IndexError) as e:
        raise MalformedAnswer(f"{type(e).__name__}: {e}") from None
    if res.answer is None:
        return [], 0
    return list(dict.fromkeys(rd.address for rd in res.answer)), int(res.minimum_ttl)


def make_error(query: bytes, rcode: int) -> bytes | None:
    """A response to `query` with `rcode` (REFUSED, SERVFAIL), echoing its ID, question and EDNS (an
    OPT record when the query had one, RFC 6891 §7); None when dnspython cannot parse the query."""
    try:
        q = dns.message.from_wire(query)
    except (dns.exception.DNSException, ValueError, struct.error, IndexError):
        return None
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    r.flags |= dns.flags.RA
    return r.to_wire()


REFUSED, SERVFAIL = dns.rcode.REFUSED, dns.rcode.SERVFAIL
