"""Records from the collector's conntrack scan (collector/kernel.py scan_conntrack): flow ends of
connections closed by FINs once quiet for the close grace period, of idle-expired entries, of the
connections still tracked when the datapath detached, and periodic updates of long-lived ones (active
timeout).

Times: `created_ns` (first packet) and `end_ns` (last packet) are on the precise clock; `last_ns` (the
tick clock) only ages entries and identifies the kernel fact in `event.id`.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np

from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock

from ..enrich.host import NO_RULE_SLOT
from .base import DIR_NAMES, ECHO_TYPES
from .batch import as_dtype, pairs

__all__ = ["ConntrackRecords"]

_FLOW_END_EMITTED = L.C["HW_CT_F_END_EMITTED"]       # hw_ct_entry.fin_seen: the datapath emitted flow_end
_CLOSING, _CLOSED = L.C["HW_CT_CLOSING"], L.C["HW_CT_CLOSED"]
_ENTRY_COLS = ("created_ns", "last_ns", "end_ns", "cgroup_id", "rule_slot", "revision_id", "state", "initiator",
               "origin", "fin_seen", "reported")


class ConntrackRecords:
    """RecordBuilder's conntrack part (a mixin over records.base.BuilderBase)."""

    def on_conntrack(self, expired_keys: np.ndarray, expired_entries: np.ndarray,
                     updates: tuple[np.ndarray, np.ndarray] | None, clock: Clock,
                     closed: tuple[np.ndarray, np.ndarray] | None = None,
                     detached: tuple[np.ndarray, np.ndarray, int] | None = None) -> list[dict]:
        """Idle-expired entries → flow end records; `closed` (keys, entries) of connections closed by
        both FINs and quiet for the close grace period (the scan marked them reported) → flow end
        records with end_reason "fin"; `updates` (keys, entries) of long-lived entries due for an
        active-timeout report → flow ["info"] records with running totals; `detached` (keys, entries,
        detach time) of connections still tracked when the datapath detached → flow end records with
        end_reason "detach", ended at the detach (docs/records.md "Flows without an end").

        Keys are one family per call: hw_ct4_key or hw_ct6_key structured arrays (the family is told by
        the layout), aligned with hw_ct_entry arrays.
        An expired entry whose end was reported already (the datapath's flow_end: fin_seen bit 7; or
        this collector after the grace period: `reported`) yields a record only if that event never
        reached us (the flow is still open in the table): counted ct_end_event_lost. That depends on
        this builder's table, so `ct_expired_made` tells per expired entry whether it made a record (the
        conntrack journal keeps the decision: collector/ct_journal.py journal_view)."""
        self._batch_started()
        out = []
        if closed is not None:
            for key, ent in self._ct_rows(*closed):
                out.append(self._ct_closed(key, ent, clock))
        made = self.ct_expired_made = np.zeros(len(expired_keys) if expired_keys is not None else 0, bool)
        for i, (key, ent) in enumerate(self._ct_rows(expired_keys, expired_entries)):
            rec = self._ct_end(key, ent, clock)
            if rec is not None:
                out.append(rec)
                made[i] = True
        if detached is not None:
            for key, ent in self._ct_rows(detached[0], detached[1]):
                out.append(self._ct_detached(key, ent, clock, detached[2]))
        if updates is not None:
            for key, ent in self._ct_rows(*updates):
                out.append(self._ct_update(key, ent, clock))
        self.counters["records"] += len(out)
        return out

    def _ct_rows(self, keys: np.ndarray, entries: np.ndarray) -> Iterable[tuple[dict, dict]]:
        if keys is None or len(keys) == 0:
            return []
        if len(keys) != len(entries):
            self._lost("decode", "ct_length_mismatch", max(len(keys), len(entries)))
            return []
        n = len(keys)
        names = set(keys.dtype.names or ())
        fam = 4 if names == set(L.DTYPES["hw_ct4_key"].names) and keys.dtype["addr_a"].shape == () else 6
        keys = as_dtype(keys, L.DTYPES["hw_ct4_key" if fam == 4 else "hw_ct6_key"]) if names else None
        entries = as_dtype(entries, L.DTYPES["hw_ct_entry"])
        if keys is None or entries is None:
            self._lost("decode", "ct_bad_dtype", n)
            return []
        kraw = np.ascontiguousarray(keys).tobytes()
        ksz = keys.dtype.itemsize
        rows = []
        ecols = {f: entries[f].tolist() for f in _ENTRY_COLS}
        ecols["packets"], ecols["bytes"] = pairs(entries["packets"]), pairs(entries["bytes"])
        if fam == 4:
            a = [struct.pack("!I", x) for x in keys["addr_a"].tolist()]
            b = [struct.pack("!I", x) for x in keys["addr_b"].tolist()]
        else:
            a = [bytes(r) for r in keys["addr_a"]]
            b = [bytes(r) for r in keys["addr_b"]]
        pa, pb, proto = keys["port_a"].tolist(), keys["port_b"].tolist(), keys["proto"].tolist()
        for i in range(len(keys)):
            e = {k: v[i] for k, v in ecols.items()}
            e["end_ns"] = max(e["end_ns"], e["created_ns"])
            if e["initiator"] == 0:
                s, d, sp, dp = a[i], b[i], pa[i], pb[i]
            else:
                s, d, sp, dp = b[i], a[i], pb[i], pa[i]
            rows.append(({"family": fam, "proto": proto[i], "saddr": s, "daddr": d, "sport": sp, "dport": dp,
                          "raw": kraw[ksz * i:ksz * (i + 1)]}, e))
        return rows

    def _ct_record(self, k: dict, e: dict, clock: Clock, ts_ns: int) -> dict:
        fam, proto = k["family"], k["proto"]
        direction = DIR_NAMES.get(e["origin"])
        rec = self._base("flow", "hostwall.flow", clock.wall_ns(ts_ns))
        rec["network"] = self._network(fam, proto, direction)
        req = ECHO_TYPES[proto][0] if proto in ECHO_TYPES else None   # only echo is tracked for ICMP
        self._endpoints(rec, fam, proto, k["saddr"], k["daddr"], k["sport"], k["dport"], req)
        self._rule(rec, e["revision_id"], e["rule_slot"])
        if self.instance is not None and self.unresolved(rec.get("rule", {}), e["revision_id"], e["rule_slot"]):
            self.counters["rule_unresolved"] += 1
        hw = rec["hostwall"]
        hw.update(verdict="allow", cgroup_id=int(e["cgroup_id"]), sample_rate=1)
        hw["reason"] = "pass_rule" if e["rule_slot"] != NO_RULE_SLOT else "pass_default"
        if e["state"] in L.CT_STATE_NAMES:
            hw["ct_state"] = L.CT_STATE_NAMES[e["state"]]
        self._totals(rec, e["packets"], e["bytes"])
        return rec

    @staticmethod
    def _ct_key(k: dict, e: dict) -> tuple:
        return (k["family"], k["proto"], k["saddr"], k["daddr"], k["sport"], k["dport"], e["origin"])

    def _ct_finish(self, rec: dict, k: dict, e: dict, clock: Clock, reason: str, kind: str = "ct_end",
                   end_ns: int | None = None) -> dict:
        """The end record's interface (from the open flow), times (the last packet, or `end_ns`) and
        identity: `kind` "ct_end" (idle expiry: the entry no longer changes, so its created/last times
        identify it), "ct_close" (see _ct_closed) or "ct_detach" (one detach per connection: key and
        first packet)."""
        open_flow = self.flows.close(self._ct_key(k, e))
        if open_flow is None:
            self.counters["end_without_start"] += 1
        else:
            self._interface(rec, open_flow.ifindex, rec["network"].get("direction"))
            rec["hostwall"]["hook"] = L.HOOK_NAMES.get(open_flow.hook, "")
        self._flow_times(rec, clock, e["created_ns"], e["end_ns"] if end_ns is None else end_ns, "closed", reason)
        ident = struct.pack("<Q", e["created_ns"]) if kind != "ct_end" else \
            struct.pack("<QQ", e["created_ns"], e["last_ns"])
        rec["event"].update(type=["end"], action="flow_end", outcome="success",
                            id=self._event_id(kind, k["raw"], ident))
        return rec

    def _ct_closed(self, k: dict, e: dict, clock: Clock) -> dict:
        """A connection closed by both FINs, quiet for the close grace period: its totals include the
        last ACK after the FINs (and any retransmission within the grace period).

        Its event.id is the key and the first packet's time only: the entry stays live after the claim
        (late packets still count in it), and a collector that crashed before this record was durable
        makes it again from the entry (docs/collector.md "Delivery and loss"), so the id must not depend
        on what changes after the claim. A connection has one close, so key + start identify it."""
        self.counters["flow_end_closed_after_grace"] += 1
        return self._ct_finish(self._ct_record(k, e, clock, e["end_ns"]), k, e, clock, "fin", "ct_close")

    def _ct_detached(self, k: dict, e: dict, clock: Clock, detached_ns: int) -> dict:
        """A connection still tracked when the datapath detached: its true end is unknown, no later than
        the detach, which stamps the record (its totals are final: no packet reaches the table since)."""
        self.counters["flow_end_detached"] += 1
        end = max(int(detached_ns), int(e["created_ns"]))
        rec = self._ct_record(k, e, clock, end)
        rec["event"]["reason"] = "datapath detached"
        return self._ct_finish(rec, k, e, clock, "detach", "ct_detach", end)

    def _ct_end(self, k: dict, e: dict, clock: Clock) -> dict | None:
        already = bool(e["fin_seen"] & _FLOW_END_EMITTED) or bool(e["reported"])
        if already and self._ct_key(k, e) not in self.flows.d:
            self.counters["ct_end_already_emitted"] += 1
            return None
        rec = self._ct_record(k, e, clock, e["end_ns"])
        if already:
            self.counters["ct_end_event_lost"] += 1
        if e["state"] == _CLOSED:
            reason = "rst"                      # its flow_end event never reached the ring (budget)
        elif e["state"] == _CLOSING:
            reason = "fin"                      # closed while no collector reported it in its grace period
        else:
            reason = "idle_timeout"
            rec["event"]["reason"] = "idle timeout"
        return self._ct_finish(rec, k, e, clock, reason)

    def _ct_update(self, k: dict, e: dict, clock: Clock) -> dict:
        rec = self._ct_record(k, e, clock, e["end_ns"])
        f = self.flows.touch(self._ct_key(k, e), e["end_ns"])
        if f is not None:
            self._interface(rec, f.ifindex, rec["network"].get("direction"))
            rec["hostwall"]["hook"] = L.HOOK_NAMES.get(f.hook, "")
        self._flow_times(rec, clock, e["created_ns"], e["end_ns"], "active", None)
        ident = struct.pack("<QQQQQQ", e["created_ns"], e["last_ns"], *e["packets"], *e["bytes"])
        rec["event"].update(type=["info"], action="flow_update", outcome="success",
                            id=self._event_id("ct_update", k["raw"], ident))
        return rec
