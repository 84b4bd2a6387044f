"""Drop summaries: one record per drop-aggregation key per exported interval (packets and IP-layer
bytes per source prefix, reason, verdict, destination port, protocol, direction and interface), plus
one per (verdict, reason) for drops that did not fit the aggregation map.

A summary is keyed by a peer prefix, not a host: the CIDR goes to `hostwall.source.prefix` and to
`source.address` (ingress: the peer sent the packets; for an egress drop the peer is the addressee, so
`destination.address`); an `.ip` is set only when the prefix is one host (/32, /128). Its individual
peers, with exact integer counts, are in `hostwall.top_peers` (at most TOP_SOURCES_PER_SUMMARY, from
the kernel's per-interval source table hw_drop_srcs; bounds in docs/collector.md). Times: `@timestamp` and `event.end` are the interval's end, `event.start` its start
(both read by the collector when it flipped the aggregation generation).
"""
from __future__ import annotations

import struct

import numpy as np

from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock

from .base import DIR_NAMES
from .batch import as_dtype, ntop
from .timefmt import iso_ns, wall_ns

__all__ = ["DropRecords", "TOP_SOURCES_PER_SUMMARY", "mask_addresses"]

TOP_SOURCES_PER_SUMMARY = 8
_KEY_FIELDS = ("ifindex", "dport", "reason", "verdict", "proto", "family", "prefix_len", "direction")


def mask_addresses(src: np.ndarray, family: np.ndarray, prefix_len: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 addresses masked to their prefix lengths (v4 in the first 4 bytes), as the
    datapath's mask_addr does. Cost: O(n) vectorised."""
    bits = np.arange(128)
    plen = np.where(family == 4, np.minimum(prefix_len, 32), np.minimum(prefix_len, 128)).astype(np.int64)
    width = np.where(family == 4, 32, 128)[:, None]
    keep = (bits[None, :] < plen[:, None]) & (bits[None, :] < width)
    mask = np.packbits(keep, axis=1)                      # 16 bytes, network (big-endian) bit order
    return src & mask


class DropRecords:
    """RecordBuilder's drop-summary part (a mixin over records.base.BuilderBase)."""

    def on_drop_summaries(self, keys: np.ndarray, vals: np.ndarray, t0_wall: float | int, t1_wall: float | int,
                          clock: Clock, sources: np.ndarray | None = None) -> list[dict]:
        """One drop_summary per aggregation key of an exported interval [t0_wall, t1_wall] (wall clock:
        seconds as float, or ns as int). `vals` are per-key totals (per-CPU values already summed).
        `sources`: the interval's individual peers (hw_drop_src layout, summed over CPUs; the key's
        prefix_len is the aggregation prefix, its address the full one) for `hostwall.top_peers`."""
        if len(keys) != len(vals):
            self._lost("decode", "drop_length_mismatch", max(len(keys), len(vals)))
            return []
        n = len(keys)
        keys, vals = as_dtype(keys, L.DTYPES["hw_drop_key"]), as_dtype(vals, L.DTYPES["hw_drop_val"])
        if keys is None or vals is None:
            self._lost("decode", "drop_bad_dtype", n)
            return []
        self._batch_started()
        t0, t1 = wall_ns(t0_wall), wall_ns(t1_wall)
        kraw = np.ascontiguousarray(keys).tobytes()
        vraw = np.ascontiguousarray(vals).tobytes()
        ksz, vsz = keys.dtype.itemsize, vals.dtype.itemsize
        kc = {f: keys[f].tolist() for f in _KEY_FIELDS}
        vc = {f: vals[f].tolist() for f in ("packets", "bytes")}
        src = keys["src"].tobytes()
        tops = self._top_sources(sources)
        out, bad = [], 0
        window = struct.pack("<qq", t0, t1)
        for i in range(len(keys)):
            fam = kc["family"][i]
            if fam not in (4, 6):
                bad += 1
                continue
            k = kraw[ksz * i:ksz * (i + 1)]
            rec = self._summary(fam, src[16 * i:16 * i + 16], {f: v[i] for f, v in kc.items()},
                                {f: v[i] for f, v in vc.items()}, t0, t1, tops.get(k))
            rec["event"]["id"] = self._event_id("drop_summary", k, vraw[vsz * i:vsz * (i + 1)], window)
            out.append(rec)
        if bad:
            self._lost("decode", "bad_family", bad)
        self.counters["drop_summaries"] += len(out)
        self.counters["records"] += len(out)
        return out

    @staticmethod
    def _top_sources(sources: np.ndarray | None) -> dict[bytes, list[dict]]:
        """Aggregation key (raw hw_drop_key bytes) → its largest individual peers, by packets."""
        if sources is None or len(sources) == 0:
            return {}
        s = as_dtype(sources, L.DTYPES["hw_drop_src"])
        if s is None:
            return {}
        s = s[s["packets"] > 0]
        k = s["k"].copy()
        full = k["src"].copy()
        k["src"] = mask_addresses(full, k["family"], k["prefix_len"])
        order = np.lexsort((-s["packets"].astype(np.int64),))
        out: dict[bytes, list[dict]] = {}
        kb = np.ascontiguousarray(k).tobytes()
        ksz = k.dtype.itemsize
        fams, pk, by = k["family"].tolist(), s["packets"].tolist(), s["bytes"].tolist()
        for i in order.tolist():
            lst = out.setdefault(kb[ksz * i:ksz * (i + 1)], [])
            if len(lst) < TOP_SOURCES_PER_SUMMARY and fams[i] in (4, 6):
                lst.append({"ip": ntop(fams[i], full[i].tobytes()), "packets": int(pk[i]), "bytes": int(by[i])})
        return out

    def _summary_base(self, verdict: int, reason_id: int, packets: int, bytes_: int, t0: int, t1: int) -> dict:
        rec = self._base("drop_summary", "hostwall.drop_summary", t1)
        would = verdict == L.C["HW_V_WOULD_DROP"]
        reason = L.REASON_NAMES.get(reason_id, "")
        rec["event"].update(kind="metric", type=["allowed"] if would else ["denied"], action="drop_summary",
                            outcome="success" if would else "failure", start=iso_ns(t0), end=iso_ns(t1))
        if reason:
            rec["event"]["reason"] = reason
            rec["hostwall"]["reason"] = reason
        rec["hostwall"].update(verdict=L.VERDICT_NAMES.get(verdict, ""), sample_rate=1,
                               window={"start": iso_ns(t0), "end": iso_ns(t1)})
        rec["network"] = {"packets": int(packets), "bytes": int(bytes_)}
        return rec

    def _summary(self, fam: int, src: bytes, k: dict, v: dict, t0: int, t1: int, top: list[dict] | None) -> dict:
        rec = self._summary_base(k["verdict"], k["reason"], v["packets"], v["bytes"], t0, t1)
        direction = DIR_NAMES.get(k["direction"])
        rec["network"].update(self._network(fam, k["proto"], direction))
        plen = int(k["prefix_len"])
        cidr = f"{ntop(fam, src)}/{plen}"
        # the key's peer is the sender of an ingress drop and the addressee of an egress one
        peer = {"address": cidr}
        if plen == (32 if fam == 4 else 128):               # a host prefix: one host, so an IP too
            peer["ip"] = ntop(fam, src)
        rec["source"] = {"packets": int(v["packets"]), "bytes": int(v["bytes"])}
        rec["destination"] = {}
        (rec["destination"] if direction == "egress" else rec["source"]).update(peer)
        if k["proto"] in (6, 17, 132) and k["dport"]:
            rec["destination"]["port"] = int(k["dport"])
        if not rec["destination"]:
            del rec["destination"]
        rec["hostwall"]["source"] = {"prefix": cidr}
        if top:
            rec["hostwall"]["top_peers"] = top
        self._interface(rec, k["ifindex"], direction)
        return rec

    def on_drop_overflow(self, counts: dict[tuple[int, int], tuple[int, int]], t0_wall: float | int,
                         t1_wall: float | int, clock: Clock) -> list[dict]:
        """Drops that did not fit the aggregation map: {(verdict, reason): (packets, bytes)} for the
        interval. One drop_summary each with hostwall.overflow = true and no source (it is unknown)."""
        self._batch_started()
        t0, t1 = wall_ns(t0_wall), wall_ns(t1_wall)
        out = []
        for (verdict, reason), (packets, bytes_) in sorted(counts.items()):
            if not packets:
                continue
            rec = self._summary_base(verdict, reason, packets, bytes_, t0, t1)
            rec["hostwall"]["overflow"] = True
            rec["event"]["id"] = self._event_id("drop_overflow", struct.pack("<BBqqQQ", verdict, reason, t0, t1,
                                                                              packets, bytes_))
            out.append(rec)
        self.counters["overflow_summaries"] += len(out)
        self.counters["records"] += len(out)
        return out
