"""Endpoints of ring-buffer records, computed once per distinct flow tuple: the addresses as text, the
Community ID v1 (collector/community_id.py), the ICMP details, and the packed addresses the flow table
keys on. Keyed by records/batch.py endpoint_keys (40 bytes per event), so a busy host's records —
many events of few tuples: a connection's start and end, repeated denies of one scanner — pay
inet_ntop and SHA-1 once per tuple instead of once per record.

Bounded: at `max_entries` the cache is cleared and refilled (O(1) amortised, memory ≤ ~max_entries ×
~400 B). Invariant: a hit returns exactly what a miss computes for the same key (the value is a pure
function of the key and the seed). Cost: ~0.1 µs a hit, ~2-3 µs a miss.
"""
from __future__ import annotations

from ..community_id import community_id
from .base import ECHO_TYPES
from .batch import ntop

__all__ = ["EndpointCache"]

_PORT_PROTOS = (6, 17, 132)


class EndpointCache:
    """get(key, family, proto, sport, dport, icmp_type) → (source ip, destination ip, community id or
    "", hostwall.icmp template or None, packed source, packed destination, `related` object, `source`
    object, `destination` object). The caller copies the ICMP template before putting it in a record
    (records are mutated downstream); `related` ({"ip": [...]}) and `source` / `destination` (ip, and
    port for TCP / UDP / SCTP) go into the tuple's records as they are where a record adds nothing to
    them: shared read-only, like the records' other constant parts (docs/collector.md "Records at line
    rate": code that changes a record replaces such an object, never mutates it).
    `entries` is the key → value dict itself: a caller may look a key up there first (a hit is the
    same tuple get returns) and call get on a miss."""

    def __init__(self, seed: int = 0, max_entries: int = 65536):
        self.seed = seed
        self.max_entries = max_entries
        self.entries: dict[bytes, tuple] = {}
        self.misses = self.clears = 0

    def get(self, key: bytes, fam: int, proto: int, sport: int, dport: int, icmp_type: int) -> tuple:
        got = self.entries.get(key)
        if got is not None:
            return got
        self.misses += 1
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
            self.clears += 1
        got = self.entries[key] = self._compute(key, fam, proto, sport, dport, icmp_type)
        return got

    def _compute(self, key: bytes, fam: int, proto: int, sport: int, dport: int, icmp_type: int) -> tuple:
        """As records/base.py BuilderBase._endpoints decides, for one tuple."""
        alen = 4 if fam == 4 else 16
        spk, dpk = key[0:alen], key[16:16 + alen]
        sip, dip = ntop(fam, key[0:16]), ntop(fam, key[16:32])
        icmp = None
        if proto in _PORT_PROTOS:
            cid = community_id(spk, dpk, proto, sport, dport, self.seed)
        elif proto in ECHO_TYPES:
            cid = ""
            icmp = {"type": icmp_type}
            if icmp_type in ECHO_TYPES[proto]:            # echo: the code is 0 by definition
                icmp["id"] = sport
                cid = community_id(spk, dpk, proto, icmp_type, 0, self.seed)
        else:
            cid = community_id(spk, dpk, proto, seed=self.seed)
        ported = proto in _PORT_PROTOS
        src, dst = ({"ip": sip, "port": sport}, {"ip": dip, "port": dport}) if ported else ({"ip": sip}, {"ip": dip})
        return sip, dip, cid, icmp, spk, dpk, {"ip": [sip] if sip == dip else [sip, dip]}, src, dst

    def stats(self) -> dict:
        return {"entries": len(self.entries), "misses": self.misses, "clears": self.clears}
