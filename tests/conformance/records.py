"""The record contract's invariants that no field definition states (docs/collector.md "Records"):
`validate(records)` returns human-readable violations ("where: what is wrong"), empty when they hold.

- One host per address: `source.ip` / `destination.ip` (and every top talker or top peer) parse as
  one IPv4/IPv6 address, never a prefix. A record keyed by a prefix (`hostwall.source.prefix`) carries
  an `.ip` only when the prefix is one host (/32, /128), and then it is that host.
- Flow times: `event.duration` is an integer number of ns, ≥ 0, equal to end - start (to the µs of the
  text); a flow start's `@timestamp` is its `event.start`, a flow end's is its `event.end`.
- Order: across the records of one flow (5-tuple and first packet), the start record's `@timestamp`
  is not after any of its update or end records' (a SIEM sorting by time sees the start first).
- Loss records (docs/records.md "Loss records"): a records-lost record's `hostwall.loss.ranges` are
  [first, last] seq pairs, sorted and disjoint, and its `count` is the seqs they hold (or at most the
  span when they were coarsened to one range); a collector-restart record's `count` is what it lists
  as lost plus what the kernel counted while no collector ran; both sit in the `collector` stream.
"""
from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

__all__ = ["validate"]

_US = 1000


def _ns(s: str) -> int:
    dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def _one_host(v) -> bool:
    try:
        ipaddress.ip_address(v)
        return True
    except (TypeError, ValueError):
        return False


def _record(r: dict, where: str, out: list[str]) -> None:
    hw = r.get("hostwall", {}) if isinstance(r.get("hostwall"), dict) else {}
    prefix = (hw.get("source") or {}).get("prefix") if isinstance(hw.get("source"), dict) else None
    for side in ("source", "destination"):
        d = r.get(side) if isinstance(r.get(side), dict) else {}
        if "ip" in d:
            if not _one_host(d["ip"]):
                out.append(f"{where}: {side}.ip {d['ip']!r} is not one host's address")
            elif prefix:
                net = ipaddress.ip_network(prefix, strict=False)
                if net.num_addresses != 1 or ipaddress.ip_address(d["ip"]) != net.network_address:
                    out.append(f"{where}: {side}.ip {d['ip']!r} in a record keyed by the prefix {prefix} "
                               "(the prefix belongs in .address and hostwall.source.prefix)")
    for p in hw.get("top_peers", ()) or ():
        if not _one_host(p.get("ip")):
            out.append(f"{where}: hostwall.top_peers ip {p.get('ip')!r} is not one host's address")
    for t in ((hw.get("anomaly") or {}).get("top_talkers") or ()):
        if not _one_host(t.get("source")):
            out.append(f"{where}: top talker {t.get('source')!r} is not one host's address")
        for k in ("count", "packets", "bytes"):
            if k in t and (isinstance(t[k], bool) or not isinstance(t[k], int)):
                out.append(f"{where}: top talker {k} {t[k]!r} is not an integer")
    ev = r.get("event", {}) if isinstance(r.get("event"), dict) else {}
    if hw.get("kind") == "loss":
        _loss(r, hw, ev, where, out)
    if hw.get("kind") == "flow":
        types = ev.get("type", [])
        if "duration" in ev:
            d = ev["duration"]
            if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                out.append(f"{where}: event.duration {d!r} is not an integer number of ns >= 0")
            elif "start" in ev and "end" in ev and abs(_ns(ev["end"]) - _ns(ev["start"]) - d) >= _US:
                out.append(f"{where}: event.duration {d} is not event.end - event.start")
        if "start" in types and ev.get("start") != r.get("@timestamp"):
            out.append(f"{where}: a flow start's @timestamp is not its first packet (event.start)")
        if "end" in types and ev.get("end") != r.get("@timestamp"):
            out.append(f"{where}: a flow end's @timestamp is not its last packet (event.end)")


def _loss(r: dict, hw: dict, ev: dict, where: str, out: list[str]) -> None:
    loss = hw.get("loss") if isinstance(hw.get("loss"), dict) else {}
    if "stream" in hw and hw["stream"] != "collector":
        out.append(f"{where}: a loss record in the stream {hw['stream']!r} (loss records are the collector's)")
    count = loss.get("count")
    if ev.get("action") == "records-lost":
        ranges = loss.get("ranges") or []
        prev = -2
        for pair in ranges:
            if not (isinstance(pair, list) and len(pair) == 2 and 0 <= pair[0] <= pair[1]):
                out.append(f"{where}: seq range {pair!r} is not [first, last]")
                return
            if pair[0] <= prev + 1:
                out.append(f"{where}: seq ranges not sorted and disjoint at {pair!r}")
            prev = pair[1]
        held = sum(hi - lo + 1 for lo, hi in ranges)
        if count != held and not (len(ranges) == 1 and isinstance(count, int) and 0 < count <= held):
            out.append(f"{where}: count {count!r} is not the {held} seqs of its ranges")
    elif ev.get("action") == "collector-restart":
        listed = sum((loss.get("lost") or {}).values()) + sum((loss.get("kernel_while_down") or {}).values())
        if count != listed:
            out.append(f"{where}: count {count!r} is not lost + kernel_while_down ({listed})")


def _flow_key(r: dict) -> tuple | None:
    if r.get("hostwall", {}).get("kind") != "flow":
        return None
    s, d, f = r.get("source", {}), r.get("destination", {}), r.get("hostwall", {}).get("flow", {})
    return (r.get("network", {}).get("iana_number"), s.get("ip"), s.get("port"), d.get("ip"), d.get("port"),
            f.get("start"))


def validate(records: list[dict]) -> list[str]:
    out: list[str] = []
    starts: dict[tuple, str] = {}
    later: list[tuple[tuple, str, str]] = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            out.append(f"record {i}: not a JSON object")
            continue
        where = f"record {i} ({r.get('hostwall', {}).get('kind')} {r.get('event', {}).get('action')})"
        _record(r, where, out)
        k = _flow_key(r)
        if k is not None and "@timestamp" in r:
            if "start" in r.get("event", {}).get("type", []):
                starts[k] = r["@timestamp"]
            else:
                later.append((k, r["@timestamp"], where))
    for k, ts, where in later:
        if k in starts and _ns(starts[k]) > _ns(ts):
            out.append(f"{where}: its flow's start record ({starts[k]}) sorts after it ({ts})")
    return out
