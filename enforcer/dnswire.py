"""DNS messages as the proxy needs them (docs/policy.md "FQDN rules"): the question of a query, the
checks an upstream answer must pass, the addresses an answer gives for its question, and the
responses the proxy makes itself.

Queries and answers for names no rule lists are relayed as bytes (the ID rewritten), so the common path
parses only the 12-byte header and the question (~3 µs) and EDNS0 options pass through untouched.
Answers for listed names are parsed fully by dnspython (~50 µs), and only the A/AAAA records that answer
the question itself, after its CNAME chain, are taken: records for other names in the answer (a
poisoning attempt, or glue) are ignored.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

__all__ = ["Question", "parse_query", "answer_matches", "addresses", "make_error", "rcode_of", "QTYPE_NAMES",
           "MalformedAnswer"]

QTYPE_NAMES = {1: "A", 28: "AAAA", 5: "CNAME", 15: "MX", 16: "TXT", 2: "NS", 6: "SOA", 12: "PTR", 33: "SRV",
               65: "HTTPS", 64: "SVCB", 255: "ANY"}
_HDR = struct.Struct("!HHHHHH")
A, AAAA = 1, 28


class MalformedAnswer(ValueError):
    """An upstream answer that does not parse or contradicts itself."""


@dataclass(frozen=True, slots=True)
class Question:
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
    pos, labels = 12, []
    while True:
        if pos >= len(data):
            raise ValueError("question name runs past the end")
        ln = data[pos]
        if ln == 0:
            pos += 1
            break
        if ln & 0xC0:
            raise ValueError("compression pointer in the question")
        labels.append(data[pos + 1:pos + 1 + ln])
        pos += 1 + ln
        if pos > len(data) or pos - 12 > 255:
            raise ValueError("question name too long or truncated")
    if pos + 4 > len(data):
        raise ValueError("question type/class missing")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    end = pos + 4
    name = b".".join(labels).decode("latin-1").lower()
    return Question(qid, flags, name, qtype, qclass, end, data[12:end].lower())


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


def addresses(data: bytes) -> tuple[list[str], int]:
    """(addresses, ttl) that the answer gives for its question's name, after the CNAME chain; ttl is the
    smallest TTL along the chain. Only A/AAAA questions yield addresses. MalformedAnswer when dnspython
    cannot parse it or the chain is inconsistent (too long, an answer under NXDOMAIN)."""
    try:
        msg = dns.message.from_wire(data)
        if len(msg.question) != 1 or msg.question[0].rdtype not in (A, AAAA):
            return [], 0
        res = msg.resolve_chaining()
    except (dns.exception.DNSException, ValueError, struct.error, IndexError) as e:
        raise MalformedAnswer(f"{type(e).__name__}: {e}") from None
    if res.answer is None:
        return [], 0
    return [rd.address for rd in res.answer], int(res.minimum_ttl)


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
