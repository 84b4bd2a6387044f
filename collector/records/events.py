"""Records from ring-buffer events (struct hw_event): flow start, flow end (RST, or a connection the
datapath displaced from its conntrack slot), sampled deny, log.

Times: every event carries the precise clock (bpf/env.h hw_precise). A flow start's `@timestamp` and
`event.start` are its first packet (the conntrack entry's created_ns, the same instant the flow's end
and update records start from); a flow end's `@timestamp` is its last packet; deny and log records
are stamped with the packet that made them.

Batch-shaped (docs/benchmarks.md "Records at line rate"): a decoded batch is checked and turned into
columns at once with NumPy — the instants as RFC 3339 text (timefmt.iso_column), names by table
lookup over the column, the raw 120 bytes of each event and a 40-byte flow tuple per event — and the
per-record Python is one dict literal per kind plus the optional keys, in the order the schema
documents (docs/records.md) and the conformance tests pin. What repeats across records is computed
once: addresses as text and the Community ID per distinct flow tuple (`EndpointCache`, bounded),
the network object per (family, protocol, direction), rule names per (revision, slot), the observer
per host. Cost: ~3-5 µs per record on an idle core (dict building + one BLAKE2b for `event.id`), plus
~2 µs per distinct flow tuple not seen recently (inet_ntop + SHA-1). Invariant: the records are
byte-for-byte those of the per-record builder this replaced (tests/collector/test_records_batch.py
checks it against that builder, kept as the test oracle).
"""
from __future__ import annotations

import hashlib

import numpy as np

from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock

from .base import DIR_NAMES, ECS_VERSION, SCHEMA_VERSION
from .batch import GcPaused, as_dtype, column_names, endpoint_keys
from .endpoints import EndpointCache
from .flowtable import OpenFlow
from .timefmt import iso_column

__all__ = ["EventRecords", "END_REASON"]

END_REASON = {"closed": "rst", "closing": "fin", "fin_wait": "fin"}
# flow_end events of connections the datapath displaced from its table (hw_event.end_cause)
_END_CAUSE_REASON = {L.C["HW_END_IDLE"]: ("idle_timeout", "idle timeout"),
                     L.C["HW_END_EVICTED"]: ("evicted", "conntrack table full: evicted")}
_FLOW_START, _FLOW_END, _DENY = L.C["HW_EV_FLOW_START"], L.C["HW_EV_FLOW_END"], L.C["HW_EV_DENY"]
_DROP, _WOULD_DROP = L.C["HW_V_DROP"], L.C["HW_V_WOULD_DROP"]
_KNOWN_TYPES = np.array(sorted(L.EVENT_TYPE_NAMES), dtype=np.uint8)
_VERDICT = column_names(L.VERDICT_NAMES)
_REASON = column_names(L.REASON_NAMES)
_HOOK = column_names(L.HOOK_NAMES)
_KIND_TAG = {t: (name.encode(), "flow" if t in (_FLOW_START, _FLOW_END) else name)
             for t, name in L.EVENT_TYPE_NAMES.items()}


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

    def _network_of(self, key: int) -> dict:
        """network.{type,iana_number,transport,direction} per family << 16 | proto << 8 | direction."""
        memo = self.__dict__.setdefault("_network_memo", {})
        got = memo.get(key)
        if got is None:
            fam, proto, d = key >> 16, (key >> 8) & 0xFF, key & 0xFF
            got = memo[key] = self._network(fam, proto, DIR_NAMES.get(d))
        return got

    def _observer_of(self) -> dict:
        """observer.* of this host (pre-rendered once; copied per record)."""
        obs = self.__dict__.get("_observer_memo")
        if obs is None:
            obs = self._observer_memo = self._observer()
        return obs

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
        at_iso, start_iso = iso_column(at, clock), iso_column(start, clock)
        dur = (at - start).tolist()                                   # flow ends: end - start ≥ 0
        size = a.dtype.itemsize
        raw = np.ascontiguousarray(a).view(np.dtype((np.void, size))).ravel().tolist()
        fam, proto, direction = a["family"], a["proto"], a["direction"]
        netkey = ((fam.astype(np.uint32) << 16) | (proto.astype(np.uint32) << 8) | direction).tolist()
        ep_keys = endpoint_keys(a)
        verdict_col, reason_col, hook_col = a["verdict"], a["reason"], a["hook"]
        verdict, reason, hook = _VERDICT[verdict_col].tolist(), _REASON[reason_col].tolist(), _HOOK[hook_col].tolist()
        ruleid = ((a["revision_id"].astype(np.uint64) << np.uint64(32)) | a["rule_slot"]).tolist()
        pk0, pk1 = a["packets"][:, 0].tolist(), a["packets"][:, 1].tolist()
        by0, by1 = a["bytes"][:, 0].tolist(), a["bytes"][:, 1].tolist()
        cols = [a[f].tolist() for f in ("type", "family", "proto", "direction", "verdict", "sport", "ifindex",
                                         "cgroup_id", "tcp_flags", "ct_state", "icmp_type", "end_cause",
                                         "dport", "start_ns", "ts_ns", "hook")]
        eps = self._endpoint_cache()
        endpoint = eps.get
        network_of, rule_of = self._network_of, self._rule_of
        rules: dict[int, tuple] = {}
        obs = self._observer_of()
        created = self._created
        id_prefix = {t: self._id_prefix + tag + b"\x1f" for t, (tag, _) in _KIND_TAG.items()}
        blake2b = hashlib.blake2b
        ct_names, counters, flows = L.CT_STATE_NAMES, self.counters, self.flows
        out: list[dict] = []
        append = out.append
        with GcPaused():
            for i, (t, f, p, d, v, sport, ifindex, cgid, flags, ct, icmp_type, cause, dport, start_ns, ts_ns,
                    hook_id) in enumerate(zip(*cols)):
                sip, dip, cid, icmp, spk, dpk = endpoint(ep_keys[i], f, p, sport, dport, icmp_type)
                net = network_of(netkey[i]).copy()
                if cid:
                    net["community_id"] = cid
                src, dst = {"ip": sip}, {"ip": dip}
                if p in (6, 17, 132):
                    src["port"], dst["port"] = sport, dport
                hw = {"kind": _KIND_TAG[t][1], "schema_version": SCHEMA_VERSION}
                if icmp is not None:
                    hw["icmp"] = icmp.copy()
                observer = obs.copy()
                if ifindex:
                    hw["interface"] = {"id": ifindex}
                    dname = DIR_NAMES.get(d)
                    if dname is not None:
                        observer[dname] = {"interface": {"id": str(ifindex)}}
                hw["verdict"] = verdict[i]
                r = reason[i]
                if r:
                    hw["reason"] = r
                hw["hook"] = hook[i]
                hw["cgroup_id"] = cgid
                if p == 6 and flags:
                    hw["tcp_flags"] = flags
                ident = blake2b(id_prefix[t] + raw[i], digest_size=16).hexdigest()
                if t == _FLOW_START:
                    st = start_iso[i]
                    event = {"kind": "event", "category": ["network"], "dataset": "hostwall.flow", "created": created,
                             "type": ["start"], "action": "flow_start", "outcome": "success", "start": st, "id": ident}
                    hw["flow"] = {"start": st, "state": "open"}
                    hw["sample_rate"] = 1
                    state = ct_names.get(ct)
                    if state is not None:
                        hw["ct_state"] = state
                    flows.open((f, p, spk, dpk, sport, dport, d), OpenFlow(start_ns, ts_ns, ifindex, hook_id))
                elif t == _FLOW_END:
                    if flows.close((f, p, spk, dpk, sport, dport, d)) is None:
                        counters["end_without_start"] += 1
                    state = ct_names.get(ct, "")
                    p0, p1, b0, b1 = pk0[i], pk1[i], by0[i], by1[i]
                    src["packets"], src["bytes"] = p0, b0
                    dst["packets"], dst["bytes"] = p1, b1
                    net["packets"], net["bytes"] = p0 + p1, b0 + b1
                    event = {"kind": "event", "category": ["network"], "dataset": "hostwall.flow", "created": created}
                    why = END_REASON.get(state, "fin")
                    if cause in _END_CAUSE_REASON:
                        why, event["reason"] = _END_CAUSE_REASON[cause]
                        counters[f"flow_end_{why}"] += 1
                    st, en, du = start_iso[i], at_iso[i], dur[i]
                    event["start"], event["end"], event["duration"] = st, en, du
                    event["type"], event["action"], event["outcome"], event["id"] = ["end"], "flow_end", "success", ident
                    hw["flow"] = {"start": st, "end": en, "duration_ns": du, "state": "closed", "end_reason": why}
                    if state:
                        hw["ct_state"] = state
                    hw["sample_rate"] = 1
                else:
                    p0, b0 = pk0[i], by0[i]
                    src["packets"], src["bytes"] = p0, b0
                    net["packets"], net["bytes"] = p0, b0
                    if t == _DENY:
                        would = v == _WOULD_DROP
                        event = {"kind": "event", "category": ["network"], "dataset": "hostwall.deny",
                                 "created": created, "type": ["allowed"] if would else ["denied"],
                                 "action": "would_deny" if would else "deny",
                                 "outcome": "success" if would else "failure", "id": ident}
                    else:
                        dropped = v == _DROP
                        event = {"kind": "event", "category": ["network"], "dataset": "hostwall.flow",
                                 "created": created, "type": ["connection", "denied" if dropped else "allowed"],
                                 "action": "log", "outcome": "failure" if dropped else "success", "id": ident}
                        hw["sample_rate"] = 1
                rec = {"@timestamp": at_iso[i], "ecs": {"version": ECS_VERSION}, "event": event, "observer": observer,
                       "hostwall": hw, "network": net, "source": src, "destination": dst,
                       "related": {"ip": [sip] if sip == dip else [sip, dip]}}
                rk = ruleid[i]
                rule = rules.get(rk)
                if rule is None:
                    rule = rules[rk] = rule_of(rk >> 32, rk & 0xFFFFFFFF)
                if rule:
                    rec["rule"] = dict(rule)
                append(rec)
        return out
