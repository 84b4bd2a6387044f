"""Flow summary records (`hostwall.kind` flow_summary): connections reported in aggregate under a flood,
and the SYN proxy's cookie answers (docs/collector.md, "Flows under a flood"; the contract: docs/records.md).

Two origins, one record shape, counted separately so each adds up to its own reference:
  datapath        one record per flow-aggregation key per export interval (hostwall.bpf.flow_agg, drained
                  with the drop summaries): summed over kinds, flows/ended/packets/bytes of these records
                  plus the overflow records equal the increase of hw_flow_stats exactly;
  conntrack_scan  connections in aggregate whose end the collector's conntrack scan found (idle expiry, or
                  closed by FINs and quiet for the close grace period; the datapath never counted their
                  end), grouped here per (peer prefix, port, protocol, direction, kind) per scan.

Record contract, as drop summaries (collector/records/drops.py): keyed by a peer prefix, never a host —
the CIDR goes to `hostwall.source.prefix` and to `source.address` (the initiator of an ingress-opened
connection) or `destination.address` (the responder of an egress-opened one); an `.ip` only when the
prefix is one host (/32, /128). Times: `@timestamp` and `event.end` are the interval's end, `event.start`
its start (the collector's reads around the generation flip or the scan; the datapath's tick clock,
which ages the aggregates, never stamps a record). `event.id` is BLAKE2b of the key, the counts and the
interval. Cost: ~10 µs per record; the scan groups entries with one pass of dict updates.
"""
from __future__ import annotations

import ipaddress
import struct

import numpy as np

from hostwall.bpf import flow_agg
from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock

from .records import iso_ns

__all__ = ["from_drain", "from_scan"]

_DIRS = {L.DIR["ingress"]: "ingress", L.DIR["egress"]: "egress"}
_REPORT_KIND = {L.C["HW_REP_PENDING"]: "unconfirmed", L.C["HW_REP_AGG_SHARE"]: "over_share",
                L.C["HW_REP_AGG_BUDGET"]: "over_budget"}
_PORTED = (6, 17, 132)


def _record(b, *, kind: str, family: int, proto: int, direction: int, peer: str | None, dport: int,
            counts, t0: int, t1: int, origin: str, ident: bytes) -> dict:
    rec = b._base("flow_summary", "hostwall.flow_summary", t1)
    d = _DIRS.get(direction, "ingress")
    window = {"start": iso_ns(t0), "end": iso_ns(t1)}
    rec["event"].update(kind="metric", type=["connection", "allowed"], action="flow_summary", outcome="success",
                        start=window["start"], end=window["end"],
                        id=b._event_id("flow_summary", ident, struct.pack("<qq", t0, t1), origin.encode()))
    rec["network"] = {**b._network(family, proto, d), "packets": int(counts["packets"]), "bytes": int(counts["bytes"])}
    hw = rec["hostwall"]
    side = "source" if d == "ingress" else "destination"
    if peer:
        net = ipaddress.ip_network(peer)
        rec[side] = {"address": peer}
        if net.num_addresses == 1:                      # a host prefix: one host, so an IP too
            rec[side]["ip"] = str(net.network_address)
        hw["source"] = {"prefix": peer}
    if proto in _PORTED and dport:
        rec.setdefault("destination", {})["port"] = int(dport)
    hw.update(verdict="allow", sample_rate=1, window=window,
              summary={"kind": kind, "flows": int(counts["flows"]), "ended": int(counts["ended"]), "origin": origin})
    return rec


def _prefix(family: int, raw16: bytes, plen: int) -> str:
    addr = ipaddress.ip_address(raw16[:4] if family == 4 else raw16)
    return str(ipaddress.ip_network(f"{addr}/{plen}", strict=False))


def _done(b, out: list[dict]) -> list[dict]:
    b.counters["flow_summaries"] = b.counters.get("flow_summaries", 0) + len(out)
    b.counters["records"] += len(out)
    return out


def from_drain(b, d: flow_agg.FlowDrain, t0: int, t1: int, clock: Clock) -> list[dict]:
    """One record per key of a drained flow aggregation, plus one per kind that overflowed (no peer).
    t0, t1: the interval's bounds, wall-clock ns (the drop summaries' interval)."""
    b._batch_started()
    out = []
    kraw = np.ascontiguousarray(d.keys).tobytes()
    ksz = d.keys.dtype.itemsize
    for i, (k, v) in enumerate(zip(d.keys, d.vals)):
        fam, kind = int(k["family"]), int(k["kind"])
        if fam not in (4, 6) or kind not in flow_agg.KINDS:
            b._lost("decode", "flow_agg_key", 1)
            continue
        out.append(_record(b, kind=flow_agg.KINDS[kind], family=fam, proto=int(k["proto"]),
                           direction=int(k["direction"]), peer=_prefix(fam, bytes(k["peer"]), int(k["prefix_len"])),
                           dport=int(k["dport"]), counts=v, t0=t0, t1=t1, origin="datapath",
                           ident=kraw[ksz * i:ksz * (i + 1)] + v.tobytes()))
    for kind, v in sorted(d.overflow.items()):
        rec = _record(b, kind=flow_agg.KINDS[kind], family=4, proto=0, direction=L.DIR["ingress"], peer=None,
                      dport=0, counts=v, t0=t0, t1=t1, origin="datapath",
                      ident=b"overflow" + bytes([kind]) + v.tobytes())
        for f in ("type", "iana_number", "direction"):         # the key did not fit: unknown
            rec["network"].pop(f, None)
        rec["hostwall"]["overflow"] = True
        out.append(rec)
    return _done(b, out)


def from_scan(b, keys: np.ndarray, entries: np.ndarray, prefix_v4: int, prefix_v6: int, t0: int, t1: int,
              clock: Clock) -> list[dict]:
    """Connections in aggregate whose end the scan found (one family per call, as RecordBuilder.on_conntrack),
    grouped per (peer prefix, destination port, protocol, direction, kind). t0, t1: the previous scan and
    this one, wall-clock ns."""
    if keys is None or len(keys) == 0:
        return []
    b._batch_started()
    groups: dict[tuple, dict] = {}
    rows = b._ct_rows(keys, entries)
    reports = entries["report"].tolist()
    for (k, e), rep in zip(rows, reports):
        kind = _REPORT_KIND.get(rep)
        if kind is None:
            continue
        ingress = e["origin"] == L.DIR["ingress"]
        peer = k["saddr"] if ingress else k["daddr"]
        fam = k["family"]
        key = (fam, k["proto"], e["origin"], _prefix(fam, peer.ljust(16, b"\0"), prefix_v4 if fam == 4 else prefix_v6),
               k["dport"], kind)
        g = groups.setdefault(key, {"flows": 0, "ended": 0, "packets": 0, "bytes": 0, "ids": []})
        g["flows"] += kind == "unconfirmed"        # its start was never counted: it started and ended here
        g["ended"] += 1
        g["packets"] += sum(e["packets"])
        g["bytes"] += sum(e["bytes"])
        g["ids"].append(k["raw"] + struct.pack("<Q", e["created_ns"]))
    out = []
    for (fam, proto, origin, prefix, dport, kind), g in sorted(groups.items()):
        ident = f"{fam}|{proto}|{origin}|{prefix}|{dport}|{kind}|{g['flows']}|{g['ended']}|{g['packets']}|" \
                f"{g['bytes']}|".encode() + b"".join(sorted(g["ids"]))
        out.append(_record(b, kind=kind, family=fam, proto=proto, direction=origin, peer=prefix, dport=dport,
                           counts=g, t0=t0, t1=t1, origin="conntrack_scan", ident=ident))
    return _done(b, out)
