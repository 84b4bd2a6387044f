"""Sets of cells as traffic: peer ranges × protocol × ports (or ICMP types and codes) × direction.

A set of cells of an `Axes` (table.py) becomes a list of `Region`s: each is one direction, family and
protocol, a set of keys (ports, or ICMP type << 8 | code) and a set of peer addresses, and every
packet in the product lies in one of the given cells (and every packet of the cells in one region).
Regions with the same peer classes are merged across L4 classes, so "tcp 22 and 80 from 10.0.0.0/8"
is one region. A region may carry a condition of the stages before the rules (stages.py): essential
ICMP met or not met, or a later fragment; "every packet of the region" then means those that meet it.

Cost: O(cells) to group, then O(intervals) of the peer classes involved per region; rendering turns
intervals into CIDRs (`ipaddress.summarize_address_range`).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hostwall.bpf import layout as L

from ..reference import Packet
from .intervals import Span, axis_end, cidrs, peers_text, ranges_text
from .stages import COND_FRAG, COND_NONE, ESS_MLD, LINK_LOCAL, cond_kind, cond_text
from .table import DIR_NAMES, ICMP_KEYED, PIDX_NAMES, Axes, family_sees, key_domain, sample_packet

__all__ = ["Region", "regions", "keys_text", "icmp_keys_text", "fragment_region"]


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
        return icmp_keys_text(keys)
    return ""


def icmp_keys_text(keys: Span, limit: int = 8) -> str:
    """ICMP keys (type << 8 | code) as "type 8", "type 130-137", "type 3 code 4", "type 3 code 0-3"."""
    out = []
    for s, e in keys:
        hi = e - 1
        if s >> 8 == hi >> 8:                              # within one type
            t = s >> 8
            out.append(f"type {t}" if (s & 255, hi & 255) == (0, 255) else
                       f"type {t} code {s & 255}" + (f"-{hi & 255}" if hi > s else ""))
            continue
        first_whole = s >> 8 if s & 255 == 0 else (s >> 8) + 1
        last_whole = hi >> 8 if hi & 255 == 255 else (hi >> 8) - 1
        if s & 255:
            out.append(f"type {s >> 8} code {s & 255}-255")
        if first_whole <= last_whole:
            out.append(f"type {first_whole}" + (f"-{last_whole}" if last_whole > first_whole else ""))
        if hi & 255 != 255:
            out.append(f"type {hi >> 8} code 0-{hi & 255}")
    return ", ".join(out[:limit]) + (f" (+{len(out) - limit} more)" if len(out) > limit else "")


class Region:
    """Every packet of `direction`, IPv`family`, protocol `protocol` with a key in `keys` and a peer in
    `peers` (source for ingress, destination for egress). protocol "any": every protocol (keys: all).

    `peers` may be given as a loader, computed on first use and shared by every region with the same
    peer classes (`peer_key`): a diff of two unrelated max policies has ~6·10^4 regions over a few
    thousand large peer sets, and most callers render only the first few. `cond` (stages.py): only the
    packets that meet it (essential ICMP met / not met, or later fragments: then protocol "any")."""
    __slots__ = ("direction", "family", "protocol", "keys", "_peers", "_load", "peer_key", "cond")

    def __init__(self, direction: str, family: int, protocol: str, keys: Span, peers: Span | None = None,
                 load: Callable[[], Span] | None = None, peer_key: tuple[int, int] | None = None,
                 cond: int = COND_NONE):
        self.direction, self.family, self.protocol, self.keys = direction, family, protocol, keys
        self._peers, self._load, self.peer_key, self.cond = peers, load, peer_key, cond

    @property
    def peers(self) -> Span:
        if self._peers is None:
            assert self._load is not None         # a region is made with its peers or their loader
            self._peers = self._load()
        return self._peers

    def __repr__(self) -> str:
        return f"Region({self.direction} {self.family} {self.protocol} {self.keys})"

    def text(self, limit: int = 6) -> str:
        side = "from" if self.direction == "ingress" else "to"
        if self.cond == COND_FRAG:
            return f"{self.direction} later fragments (any protocol) {side} {peers_text(self.family, self.peers, limit)}"
        proto = {"other": "other protocols (not tcp/udp/icmp)", "any": "any protocol"}.get(self.protocol, self.protocol)
        k = keys_text(self.protocol, self.keys)
        c = self.condition()
        return (f"{self.direction} {proto}{' ' + k if k else ''} {side} {peers_text(self.family, self.peers, limit)}"
                + (f" {c}" if c else ""))

    def condition(self) -> str:
        """The words of the region's condition ("" for none); later fragments: "later fragments"."""
        if self.cond == COND_FRAG:
            return "later fragments"
        return cond_text(self.cond, self.direction, self.protocol, self.keys)

    def to_json(self, peers: bool = True) -> dict:
        out = {"direction": self.direction, "family": self.family, "protocol": self.protocol}
        c = self.condition()
        if c:
            out["condition"] = c
        if peers:
            out["peers"] = cidrs(self.family, self.peers)
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
        """A packet inside the region (a port, not a fragment, when the region has one; meeting its
        condition)."""
        peer = self.peers.sample()
        assert peer is not None                   # regions are never empty
        if self.cond == COND_FRAG:
            return sample_packet(L.DIR[self.direction], self.family, L.PROTO_IDX["tcp"], peer, 0, local)
        proto = "tcp" if self.protocol == "any" else self.protocol
        keys = key_domain(L.PROTO_IDX["tcp"]) if self.protocol == "any" else self.keys
        key = (keys - Span.point(0)).sample() if proto in ("tcp", "udp") else None
        if key is None:
            key = keys.first()
        assert key is not None
        return sample_packet(L.DIR[self.direction], self.family, L.PROTO_IDX[proto], peer, key, local,
                             self.cond)


def fragment_region(direction: str, family: int) -> Region:
    """Every later fragment of one direction and family (stages.py: judged before the rules)."""
    return Region(direction, family, "any", Span.full(65536), Span.full(axis_end(family)), cond=COND_FRAG)


def _group_small(ax: Axes, rows: np.ndarray, cols: np.ndarray, tags: np.ndarray):
    """Cells to merged groups {(tag, family, direction, pidx, set id): [L4 classes]}, plain Python (a
    lint finding has a handful of cells, where NumPy's per-call cost would dominate)."""
    fam = ax.peer_family[rows].tolist()
    groups: dict[tuple, set[int]] = {}
    for r, c, t, f in zip(rows.tolist(), cols.tolist(), tags.tolist(), fam):
        groups.setdefault((t, c, f), set()).add(r)
    ids: dict[frozenset, int] = {}
    members: list[np.ndarray] = []
    merged: dict[tuple, list[int]] = {}
    for (t, c, f), rs in groups.items():
        fs = frozenset(rs)
        si = ids.get(fs)
        if si is None:
            si = ids[fs] = len(members)
            members.append(np.array(sorted(fs), dtype=np.int64))
        merged.setdefault((t, f, int(ax.l4_dir[c]), int(ax.l4_pidx[c]), si), []).append(c)
    first_iv = ax.class_first_interval()
    return merged, members.__getitem__, [int(first_iv[m].min()) for m in members]


def _group_large(ax: Axes, rows: np.ndarray, cols: np.ndarray, tags: np.ndarray):
    """As _group_small, vectorised: millions of cells (a diff of unrelated policies)."""
    fam = ax.peer_family[rows].astype(np.int64)
    ncol = max(ax.n_l4, 1)
    if len(tags) and int(tags.max()) < (1 << 62) // (2 * ncol):
        # one int64 key (tag, L4 class, family) and one argsort instead of a 4-key lexsort; the order
        # of the rows within a group matters to nothing below (sums, minima, peer_span sorts)
        key = (tags * ncol + cols) * 2 + (fam == 6)
        o = np.argsort(key)
        rows, cols, tags, fam, key = rows[o], cols[o], tags[o], fam[o], key[o]
        cut = np.flatnonzero(key[1:] != key[:-1]) + 1
    else:
        o = np.lexsort((rows, fam, cols, tags))
        rows, cols, tags, fam = rows[o], cols[o], tags[o], fam[o]
        cut = np.flatnonzero((np.diff(cols) != 0) | (np.diff(tags) != 0) | (np.diff(fam) != 0)) + 1
    starts = np.concatenate([[0], cut]).astype(np.int64)
    stops = np.append(cut, len(rows)).astype(np.int64)
    # intern the peer class sets without a Python step per group: two independent 64-bit sums of
    # random per-class keys and the size identify a set (collisions 2**-128 per pair, as in
    # compiler.classify's class signatures)
    k = ax.class_keys()
    with np.errstate(over="ignore"):
        h1 = np.add.reduceat(k[0][rows], starts)
        h2 = np.add.reduceat(k[1][rows], starts)
    _, rep, sid = np.unique(np.stack([h1, h2, stops - starts, fam[starts]], axis=1), axis=0, return_index=True,
                            return_inverse=True)
    sid = sid.ravel()
    gcol = cols[starts]
    gkey = np.stack([tags[starts], fam[starts], ax.l4_dir[gcol], ax.l4_pidx[gcol], sid], axis=1)
    ukey, mid = np.unique(gkey, axis=0, return_inverse=True)
    mid = mid.ravel()
    order = np.argsort(mid, kind="stable")
    bounds = np.searchsorted(mid[order], np.arange(len(ukey) + 1))
    gcol_l = gcol.tolist()
    merged = {tuple(key): [gcol_l[g] for g in order[bounds[m]:bounds[m + 1]].tolist()]
              for m, key in enumerate(ukey.tolist())}
    first_iv = ax.class_first_interval()
    set_first = np.minimum.reduceat(first_iv[rows], starts)[rep].tolist()

    def classes(si: int) -> np.ndarray:
        g = rep[si]
        return rows[starts[g]:stops[g]]
    return merged, classes, set_first


_CONDS = 16            # conditions are folded into the tags: tag * _CONDS + cond


def regions(ax: Axes, rows: np.ndarray, cols: np.ndarray, tags: np.ndarray | None = None,
            conds: np.ndarray | None = None) -> list[tuple[int, Region]]:
    """Group cells (rows[i], cols[i]) — optionally with a tag each (e.g. old → new outcome) and a
    condition each (stages.COND_*: which of the cell's packets are meant) — into regions:
    [(tag, Region)], ordered by direction, family, protocol, first key, first peer. Cells with
    different conditions never share a region. An essential-MLD region of ingress keeps only its
    link-local peers (the condition asks for a link-local source); one left without any is dropped."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if tags is None:
        tags = np.zeros(len(rows), dtype=np.int64)
    tags = np.asarray(tags, dtype=np.int64) * _CONDS + (0 if conds is None else np.asarray(conds, dtype=np.int64))
    if not len(rows):
        return []
    if len(rows) <= 1024:
        merged, set_classes, set_first = _group_small(ax, rows, cols, tags)
    else:
        merged, set_classes, set_first = _group_large(ax, rows, cols, tags)
    class_keys: dict[int, Span] = {}
    merged_keys: dict[tuple[int, ...], Span] = {}   # regions of a diff share a few combinations of classes

    def keys_of(l4cls: list[int], d: int, pidx: int) -> Span:
        for c in l4cls:
            if c not in class_keys:
                class_keys[c] = ax.l4_spans([c])[(d, pidx)]
        if len(l4cls) == 1:
            return class_keys[l4cls[0]]
        k = tuple(l4cls)
        got = merged_keys.get(k)
        if got is None:
            got = merged_keys[k] = Span.of(iv for c in l4cls for iv in class_keys[c])
        return got
    spans: dict[int, Span] = {}                     # one Span per distinct peer class set (shared by regions)

    def loader(f: int, si: int) -> Callable[[], Span]:
        def load() -> Span:
            if si not in spans:
                spans[si] = ax.peer_span(set_classes(si), f)
            return spans[si]
        return load
    domains = {p: key_domain(p) for p in range(L.PROTO_IDX_MAX)}
    seen_by = {f: {p for p in range(L.PROTO_IDX_MAX) if family_sees(f, p)} for f in (4, 6)}
    whole: dict[tuple, list[int]] = {}            # protocols present with all their keys, per peer set
    keyed: dict[tuple, Span] = {}
    for (tag, f, d, pidx, si), l4cls in merged.items():
        keys = keyed[(tag, f, d, pidx, si)] = keys_of(l4cls, d, pidx)
        if keys == domains[pidx]:
            whole.setdefault((tag, f, d, si), []).append(pidx)
    out = []
    done = set()
    for kk, pidxs in whole.items():
        if set(pidxs) == seen_by[kk[1]]:
            t, c = divmod(kk[0], _CONDS)
            out.append((t, Region(DIR_NAMES[kk[2]], kk[1], "any", Span.full(65536), load=loader(kk[1], kk[3]),
                                  peer_key=(kk[1], kk[3]), cond=c)))
            done |= {(kk[0], kk[1], kk[2], p, kk[3]) for p in pidxs}
    for (tag, f, d, pidx, si), keys in keyed.items():
        if (tag, f, d, pidx, si) in done:
            continue
        t, c = divmod(tag, _CONDS)
        reg = Region(DIR_NAMES[d], f, PIDX_NAMES[pidx], keys, load=loader(f, si), peer_key=(f, si), cond=c)
        if cond_kind(c) == ESS_MLD and DIR_NAMES[d] == "ingress":
            reg = Region(reg.direction, f, reg.protocol, keys, reg.peers & LINK_LOCAL, cond=c)
            if not reg.peers:
                continue
        out.append((t, reg))
    out.sort(key=lambda t: (t[1].direction != "ingress", t[1].family, _ORDER[t[1].protocol], t[1].keys.first() or 0,
                            set_first[t[1].peer_key[1]] if t[1].peer_key else 0, t[1].cond))
    return out
