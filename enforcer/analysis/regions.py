"""Sets of cells as traffic: peer ranges × protocol × ports (or ICMP types) × direction.

A set of cells of an `Axes` (table.py) becomes a list of `Region`s: each is one direction, family and
protocol, a set of keys (ports) and a set of peer addresses, and every packet in the product lies in
one of the given cells (and every packet of the cells in one region). Regions with the same peer
classes are merged across L4 classes, so "tcp 22 and 80 from 10.0.0.0/8" is one region.

Cost: O(cells) to group, then O(intervals) of the peer classes involved per region; rendering turns
intervals into CIDRs (`ipaddress.summarize_address_range`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hostwall.bpf import layout as L

from ..reference import Packet
from .intervals import Span, cidrs, peers_text, ranges_text
from .table import DIR_NAMES, ICMP_KEYED, PIDX_NAMES, Axes, family_sees, key_domain, sample_packet

__all__ = ["Region", "regions", "keys_text"]


_ORDER = {"tcp": 0, "udp": 1, "icmp": 2, "icmpv6": 3, "other": 4, "any": -1}


def keys_text(pidx_name: str, keys: Span) -> str:
    """The L4 part of a region: "port 22, 80", "non-first fragments", "type 8", "" (all of them)."""
    if pidx_name in L.PROTO_IDX and keys == key_domain(L.PROTO_IDX[pidx_name]):
        return ""
    if pidx_name in ("tcp", "udp"):
        parts = []
        ports = keys - Span.point(0)
        if ports:
            parts.append("any port" if ports == Span(((1, 65536),)) else f"port {ranges_text(ports)}")
        if 0 in keys:
            parts.append("non-first fragments")
        return " and ".join(parts)
    if pidx_name in ("icmp", "icmpv6"):
        if not ICMP_KEYED or keys.covers(65536):
            return ""
        out = []
        for s, e in keys:
            if s % 256 == 0 and e % 256 == 0:
                out.append(f"type {s >> 8}" if e - s == 256 else f"type {s >> 8}-{(e >> 8) - 1}")
            else:
                out.append(f"type/code {s >> 8}/{s & 255}" + (f"-{(e - 1) >> 8}/{(e - 1) & 255}" if e - s > 1 else ""))
        return ", ".join(out)
    return ""


@dataclass(frozen=True)
class Region:
    """Every packet of `direction`, IPv`family`, protocol `protocol` with a key in `keys` and a peer in
    `peers` (source for ingress, destination for egress). protocol "any": every protocol (keys: all)."""
    direction: str
    family: int
    protocol: str                # tcp | udp | icmp | icmpv6 | other
    keys: Span
    peers: Span

    def text(self, limit: int = 6) -> str:
        proto = {"other": "other protocols (not tcp/udp/icmp)", "any": "any protocol"}.get(self.protocol, self.protocol)
        k = keys_text(self.protocol, self.keys)
        side = "from" if self.direction == "ingress" else "to"
        return f"{self.direction} {proto}{' ' + k if k else ''} {side} {peers_text(self.family, self.peers, limit)}"

    def to_json(self) -> dict:
        out = {"direction": self.direction, "family": self.family, "protocol": self.protocol,
               "peers": cidrs(self.family, self.peers)}
        if self.protocol == "any":
            pass
        elif self.protocol in ("tcp", "udp"):
            ports = self.keys - Span.point(0)
            out["ports"] = [[s, e - 1] for s, e in ports]
            out["fragments"] = 0 in self.keys
        elif self.protocol in ("icmp", "icmpv6") and ICMP_KEYED:
            out["icmp_keys"] = [[s, e - 1] for s, e in self.keys]
        return out

    def sample(self, local: dict[int, str]) -> Packet:
        """A packet inside the region (a port, not a fragment, when the region has one)."""
        proto = "tcp" if self.protocol == "any" else self.protocol
        keys = key_domain(L.PROTO_IDX["tcp"]) if self.protocol == "any" else self.keys
        key = (keys - Span.point(0)).sample() if proto in ("tcp", "udp") else None
        if key is None:
            key = keys.first()
        return sample_packet(L.DIR[self.direction], self.family, L.PROTO_IDX[proto], self.peers.sample(), key, local)


def regions(ax: Axes, rows: np.ndarray, cols: np.ndarray, tags: np.ndarray | None = None,
            ) -> list[tuple[object, Region]]:
    """Group cells (rows[i], cols[i]) — optionally with a tag each (e.g. old → new outcome) — into
    regions: [(tag, Region)], ordered by direction, family, protocol, first key, first peer."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if tags is None:
        tags = np.zeros(len(rows), dtype=np.int64)
    if not len(rows):
        return []
    fam = ax.peer_family[rows].astype(np.int64)
    # group cells by (tag, L4 class, family): the peer classes of each group
    o = np.lexsort((rows, fam, cols, tags))
    rows, cols, tags, fam = rows[o], cols[o], tags[o], fam[o]
    cut = np.flatnonzero((np.diff(cols) != 0) | (np.diff(tags) != 0) | (np.diff(fam) != 0)) + 1
    starts = np.concatenate([[0], cut])
    stops = np.append(cut, len(rows))
    merged: dict[tuple, list[int]] = {}
    for a, b in zip(starts.tolist(), stops.tolist()):
        c = int(cols[a])
        key = (tags[a].item() if hasattr(tags[a], "item") else tags[a], int(fam[a]), int(ax.l4_dir[c]),
               int(ax.l4_pidx[c]), rows[a:b].tobytes())
        merged.setdefault(key, []).append(c)
    out = []
    whole: dict[tuple, list[int]] = {}            # protocols present with all their keys, per peer set
    for (tag, f, d, pidx, peer_bytes), l4cls in merged.items():
        keys = ax.l4_spans(l4cls)[(d, pidx)]
        if keys == key_domain(pidx):
            whole.setdefault((tag, f, d, peer_bytes), []).append(pidx)
    done = set()
    for k, pidxs in whole.items():
        if set(pidxs) == {p for p in range(L.PROTO_IDX_MAX) if family_sees(k[1], p)}:
            peers = ax.peer_span(np.frombuffer(k[3], dtype=np.int64), k[1])
            out.append((k[0], Region(DIR_NAMES[k[2]], k[1], "any", Span.full(65536), peers)))
            done |= {(k[0], k[1], k[2], p, k[3]) for p in pidxs}
    for (tag, f, d, pidx, peer_bytes), l4cls in merged.items():
        if (tag, f, d, pidx, peer_bytes) in done:
            continue
        peers = ax.peer_span(np.frombuffer(peer_bytes, dtype=np.int64), f)
        keys = ax.l4_spans(l4cls)[(d, pidx)]
        out.append((tag, Region(DIR_NAMES[d], f, PIDX_NAMES[pidx], keys, peers)))
    out.sort(key=lambda t: (t[1].direction != "ingress", t[1].family, _ORDER[t[1].protocol], t[1].keys.first() or 0,
                            t[1].peers.first() or 0))
    return out
