"""Records from ring-buffer events (struct hw_event): flow start, flow end (RST, or a connection the
datapath displaced from its conntrack slot), sampled deny, log.

Times: every event carries the precise clock (bpf/env.h hw_precise). A flow start's `@timestamp` and
`event.start` are its first packet (the conntrack entry's created_ns, the same instant the flow's end
and update records start from); a flow end's `@timestamp` is its last packet; deny and log records
are stamped with the packet that made them.

Batch-shaped (docs/collector.md "Records at line rate"): a decoded batch is checked and turned into
columns at once with NumPy — the instants as RFC 3339 text (timefmt.iso_column), names by table
lookup over the column, the raw 120 bytes of each event and a 40-byte flow tuple per event — and the
per-record Python is one dict literal per kind plus the optional keys, in the order the schema
documents (docs/records.md) and the conformance tests pin. What repeats across records is computed
once: addresses as text, the Community ID and the `related`, `source` and `destination` objects per
distinct flow tuple (`EndpointCache`, bounded; the latter two shared by the records that add no
counters to them: flow starts, and a deny's or log's destination), the network object per (family,
protocol, direction), rule names per (revision, slot), the observer per host, the BLAKE2b state of
each kind's `event.id` prefix (copied, then fed the raw event). Cost: ~3-5 µs per record on an idle
core (dict building + one BLAKE2b for `event.id`), plus
~2 µs per distinct flow tuple not seen recently (inet_ntop + SHA-1). Invariant: the records are
byte-for-byte those of the per-record builder this replaced (tests/collector/test_records_batch.py
checks it against that builder, kept as the test oracle).
"""
from __future__ import annotations

import hashlib

import numpy as np

from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock
from hostwall.gcpause import GcPaused

from .base import DIR_NAMES, ECS_VERSION, SCHEMA_VERSION
from .batch import as_dtype, column_names, endpoint_keys
from .endpoints import EndpointCache
from .flowtable import OpenFlow
from .timefmt import iso_column

__all__ = ["EventRecords", "END_REASON"]

END_REASON = {"closed": "rst", "closing": "fin", "fin_wait": "fin"}
# flow_end events of connections the datapath displaced from its table (hw_event.end_cause)
_END_CAUSE_REASON = {L.C["HW_END_IDLE"]: ("idle_timeout", "idle timeout"),
                     L.C["HW_END_EVICTED_ESTABLISHED"]: ("evicted_established",
                                                         "conntrack bucket full of established connections: evicted"),
                     L.C["HW_END_EVICTED_UNCONFIRMED"]: ("evicted_unconfirmed",
                                                         "conntrack bucket full: unconfirmed connection evicted"),
                     L.C["HW_END_REUSED"]: ("reused", "tuple reused by a new connection")}
_FLOW_START, _FLOW_END, _DENY = L.C["HW_EV_FLOW_START"], L.C["HW_EV_FLOW_END"], L.C["HW_EV_DENY"]
_DROP, _WOULD_DROP = L.C["HW_V_DROP"], L.C["HW_V_WOULD_DROP"]
_KNOWN_TYPES = np.array(sorted(L.EVENT_TYPE_NAMES), dtype=np.uint8)
_VERDICT = column_names(L.VERDICT_NAMES)
_REASON = column_names(L.REASON_NAMES)
_HOOK = column_names(L.HOOK_NAMES)
_KIND_TAG = {t: (name.encode(), "flow" if t in (_FLOW_START, _FLOW_END) else name)
             for t, name in L.EVENT_TYPE_NAMES.items()}
# Constant parts every record of a kind shares (one object each; read-only, docs/collector.md
# "Records at line rate": code that changes a record replaces such an object, never mutates it); so are
# the host's `observer` of a record without an interface and EndpointCache's per-tuple objects
_ECS = {"version": ECS_VERSION}
_CATEGORY = ["network"]
_T_START, _T_END, _T_ALLOWED, _T_DENIED = ["start"], ["end"], ["allowed"], ["denied"]
_T_CONN_ALLOWED, _T_CONN_DENIED = ["connection", "allowed"], ["connection", "denied"]


class EventRecords:
    """RecordBuilder's ring-buffer part (a mixin over records.base.BuilderBase)."""

    def on_events(self, batch: np.ndarray, clock: Clock) -> list[dict]:
        """One record per event of a hw_event batch: a structured array (hw_event layout, or the same
        fields in another byte order) or the raw bytes of consecutive events. Events of an unknown type
        or family are counted lost ("decode", reason) and make no record; the others keep their order."""
        arr = as_dtype(batch, L.DTYPES["hw_event"])
        if arr is None:
            self._lost("decode", "bad_event_layout", 1)
            return []
        n = len(arr)
        self.counters["events"] += n
        if n == 0:
            return []
        self._batch_started()
        arr = self._checked(arr)
        out = self._build(arr, clock) if len(arr) else []
        self.counters["records"] += len(out)
        return out

    def _checked(self, arr: np.ndarray) -> np.ndarray:
        """The events of a known type and family; the rest counted by reason (first seen first)."""
        bad_type = ~np.isin(arr["type"], _KNOWN_TYPES)
        fam = arr["family"]
        bad_family = ~bad_type & (fam != 4) & (fam != 6)
        bad = bad_type | bad_family
        if not bad.any():
            return arr
        firsts = []
        for why, mask in (("unknown_event_type", bad_type), ("bad_family", bad_family)):
            k = int(mask.sum())
            if k:
                firsts.append((int(np.argmax(mask)), why, k))
        for _, why, k in sorted(firsts):
            self._lost("decode", why, k)
        return arr[~bad]

    def _endpoint_cache(self) -> EndpointCache:
        cache = getattr(self, "_endpoints_cache", None)
        if cache is None:
            cache = self._endpoints_cache = EndpointCache(seed=self.seed)
        return cache

    def _memos(self) -> tuple[dict, dict]:
        """(network objects by family << 16 | proto << 8 | direction, observer of this host), made
        once per builder; records get copies of the network object and share the observer unless they
        add an interface to it."""
        got = self.__dict__.get("_memos_")
        if got is None:
            got = self._memos_ = ({}, self._observer())
        return got

    def _network_for(self, memo: dict, key: int) -> dict:
        fam, proto, d = key >> 16, (key >> 8) & 0xFF, key & 0xFF
        got = memo[key] = self._network(fam, proto, DIR_NAMES.get(d))
        return got

    def _rule_of(self, revision_id: int, slot: int) -> tuple:
        """rule.* as (key, value) pairs (BuilderBase._rule's memo); () without an instance view."""
        if self.instance is None:
            return ()
        scratch: dict = {}
        self._rule(scratch, revision_id, slot)
        return tuple(scratch["rule"].items()) if "rule" in scratch else ()

    def _build(self, a: np.ndarray, clock: Clock) -> list[dict]:
        """The records of checked events `a`, in order (see the module docstring for the shape)."""
        types = a["type"]
        ts, start = a["ts_ns"], a["start_ns"]
        at = np.where(types == _FLOW_START, start, np.where(types == _FLOW_END, np.maximum(ts, start), ts))
        fam, proto, direction = a["family"], a["proto"], a["direction"]
        rule_keys = ((a["revision_id"].astype(np.uint64) << np.uint64(32)) | a["rule_slot"]).tolist()
        cols = (
            types.tolist(), fam.tolist(), proto.tolist(), direction.tolist(), a["verdict"].tolist(),
            a["sport"].tolist(), a["dport"].tolist(), a["ifindex"].tolist(), a["cgroup_id"].tolist(),
            a["tcp_flags"].tolist(), a["ct_state"].tolist(), a["icmp_type"].tolist(), a["end_cause"].tolist(),
            start.tolist(), ts.tolist(), a["hook"].tolist(),
            iso_column(at, clock), iso_column(start, clock), (at - start).tolist(),   # flow ends: end ≥ start
            np.ascontiguousarray(a).view(np.dtype((np.void, a.dtype.itemsize))).ravel().tolist(),
            ((fam.astype(np.uint32) << 16) | (proto.astype(np.uint32) << 8) | direction).tolist(),
            endpoint_keys(a), _VERDICT[a["verdict"]].tolist(), _REASON[a["reason"]].tolist(),
            _HOOK[a["hook"]].tolist(), rule_keys,
            a["packets"][:, 0].tolist(), a["packets"][:, 1].tolist(), a["bytes"][:, 0].tolist(),
            a["bytes"][:, 1].tolist())
        endpoints = self._endpoint_cache()
        endpoint, known = endpoints.get, endpoints.entries
        netmemo, obs = self._memos()
        network_for, rule_of = self._network_for, self._rule_of
        rules: dict[int, tuple] = {}
        created = self._created
        blake2b = hashlib.blake2b      # event.id: a copy of the kind's hash of its prefix, fed the raw event
        id_hash = {t: blake2b(self._id_prefix + tag + b"\x1f", digest_size=16) for t, (tag, _) in _KIND_TAG.items()}
        kinds = {t: kind for t, (_, kind) in _KIND_TAG.items()}
        ct_names, counters, flows, dir_names = L.CT_STATE_NAMES, self.counters, self.flows, DIR_NAMES
        out: list[dict] = []
        append = out.append
        with GcPaused():
            for (t, f, p, d, v, sport, dport, ifindex, cgid, flags, ct, icmp_type, cause, start_ns, ts_ns, hook_id,
                 at_s, start_s, dur, raw, netkey, epkey, verdict, reason, hook, rk, p0, p1, b0, b1) in zip(*cols):
                sip, dip, cid, icmp, spk, dpk, related, src, dst = (known.get(epkey)
                                                                    or endpoint(epkey, f, p, sport, dport, icmp_type))
                net = netmemo.get(netkey)
                net = (net or network_for(netmemo, netkey)).copy()
                if cid:
                    net["community_id"] = cid
                hw = {"kind": kinds[t], "schema_version": SCHEMA_VERSION}
                if icmp is not None:
                    hw["icmp"] = icmp.copy()
                observer = obs                  # shared read-only, unless the record names its interface
                if ifindex:
                    hw["interface"] = {"id": ifindex}
                    dname = dir_names.get(d)
                    if dname is not None:
                        observer = obs.copy()
                        observer[dname] = {"interface": {"id": str(ifindex)}}
                hw["verdict"] = verdict
                if reason:
                    hw["reason"] = reason
                hw["hook"] = hook
                hw["cgroup_id"] = cgid
                if p == 6 and flags:
                    hw["tcp_flags"] = flags
                h = id_hash[t].copy()
                h.update(raw)
                ident = h.hexdigest()
                if t == _FLOW_START:
                    event = {"kind": "event", "category": _CATEGORY, "dataset": "hostwall.flow", "created": created,
                             "type": _T_START, "action": "flow_start", "outcome": "success", "start": start_s,
                             "id": ident}
                    hw["flow"] = {"start": start_s, "state": "open"}
                    hw["sample_rate"] = 1
                    state = ct_names.get(ct)
                    if state is not None:
                        hw["ct_state"] = state
                    flows.open((f, p, spk, dpk, sport, dport, d), OpenFlow(start_ns, ts_ns, ifindex, hook_id))
                elif t == _FLOW_END:
                    if flows.close((f, p, spk, dpk, sport, dport, d)) is None:
                        counters["end_without_start"] += 1
                    state = ct_names.get(ct, "")
                    # counted: copies of the tuple's shared src / dst (ip, and port where the protocol has one)
                    src, dst = {**src, "packets": p0, "bytes": b0}, {**dst, "packets": p1, "bytes": b1}
                    net["packets"], net["bytes"] = p0 + p1, b0 + b1
                    event = {"kind": "event", "category": _CATEGORY, "dataset": "hostwall.flow", "created": created}
                    why = END_REASON.get(state, "fin")
                    if cause in _END_CAUSE_REASON:
                        why, event["reason"] = _END_CAUSE_REASON[cause]
                        counters[f"flow_end_{why}"] += 1
                    event["start"], event["end"], event["duration"] = start_s, at_s, dur
                    event["type"], event["action"], event["outcome"], event["id"] = _T_END, "flow_end", "success", ident
                    hw["flow"] = {"start": start_s, "end": at_s, "duration_ns": dur, "state": "closed", "end_reason": why}
                    if state:
                        hw["ct_state"] = state
                    hw["sample_rate"] = 1
                else:
                    src = {**src, "packets": p0, "bytes": b0}
                    net["packets"], net["bytes"] = p0, b0
                    if t == _DENY:
                        would = v == _WOULD_DROP
                        event = {"kind": "event", "category": _CATEGORY, "dataset": "hostwall.deny",
                                 "created": created, "type": _T_ALLOWED if would else _T_DENIED,
                                 "action": "would_deny" if would else "deny",
                                 "outcome": "success" if would else "failure", "id": ident}
                    else:
                        dropped = v == _DROP
                        event = {"kind": "event", "category": _CATEGORY, "dataset": "hostwall.flow",
                                 "created": created, "type": _T_CONN_DENIED if dropped else _T_CONN_ALLOWED,
                                 "action": "log", "outcome": "failure" if dropped else "success", "id": ident}
                        hw["sample_rate"] = 1
                rec = {"@timestamp": at_s, "ecs": _ECS, "event": event, "observer": observer, "hostwall": hw,
                       "network": net, "source": src, "destination": dst,
                       "related": related}
                rule = rules.get(rk)
                if rule is None:
                    rule = rules[rk] = rule_of(rk >> 32, rk & 0xFFFFFFFF)
                if rule:
                    rec["rule"] = dict(rule)
                append(rec)
        self._count_unresolved(rules, rule_keys)
        return out

    def _count_unresolved(self, rules: dict[int, tuple], keys: list[int]) -> None:
        """rule_unresolved += the records of this batch whose rule key did not resolve (no cost when all
        did: the check runs per distinct key)."""
        if self.instance is None:
            return
        bad = {rk for rk, got in rules.items() if self.unresolved(dict(got), rk >> 32, rk & 0xFFFFFFFF)}
        if bad:
            self.counters["rule_unresolved"] += sum(1 for rk in keys if rk in bad)
