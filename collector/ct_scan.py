"""Conntrack scans of one pinned enforcer instance (part of collector/kernel.py's KernelSource): idle
ends and FIN closes claimed in the kernel's tables (hostwall.bpf.conntrack) and released once their
records are durable, active-timeout updates, and the ends of connections reported in aggregate (flow
summaries, collector/flow_summary.py). The tables are read in place (mmap); costs are stated per method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hostwall.bpf import bpfsys, conntrack
from hostwall.bpf import layout as L
from hostwall.bpf.conntrack import CLAIM_BITS

__all__ = ["CT_ENTRY_DT", "ConntrackScans", "CtFamilyScan", "CtScan", "ct_timeout_ns"]

CT_ENTRY_DT = L.DTYPES["hw_ct_entry"]
CFG_DT = L.DTYPES["hw_config"]
POLICY_HDR_DT = L.DTYPES["hw_policy_hdr"]
REP_EVENTS = L.C["HW_REP_EVENTS"]             # hw_ct_entry.report: reported by events (else in aggregate)
CT_CLOSING = L.C["HW_CT_CLOSING"]

_S = 1_000_000_000
COARSE_TICK_NS = 10_000_000     # hw_config.tick_ns 0 (the coarse clock helper): a jiffy at HZ=100, the coarsest


@dataclass
class CtFamilyScan:
    """Conntrack scan result of one family; keys in hw_ct4_key / hw_ct6_key, entries hw_ct_entry.

    expired_*: entries idle past their timeout whose end the collector reports: claimed now, or
    claimed by an earlier collector that never freed them (entries with fin_seen's claim bits cleared,
    as the builder must see them). Entries whose flow_end the datapath emitted, or whose close record
    is durable (`reported` REPORTED_DURABLE), are freed at once and not listed (their end is reported).
    update_*: live entries that crossed a multiple of the active timeout since the previous scan
    and saw a packet since the previous multiple (a periodic flow update is due).
    detached_*: a detach scan's (the enforcer detached the datapath: hw_config.detached_ns, `detached_ns`
    here) connections still tracked then, neither expired nor closed by FINs nor reported: claimed like
    the expired ones (their slots are in claimed_idx), their end record is due ("detach").
    closed_*: connections closed by both FINs whose last packet is older than the close grace
    period, now claimed in the kernel (`reported` = REPORTED_CLAIMED; their flow end record is due; the
    entry stays until its timeout so late packets still pass as part of the connection), or claimed so
    by an earlier collector whose records never became durable (reported again, same event.id).
    agg_*: connections reported in aggregate (hw_ct_entry.report is not EVENTS) whose end the datapath
    has not counted, claimed like the others: expired ones and, the last `agg_closed` of them, ones
    closed by FINs and quiet for the close grace period: the scan's flow summaries.
    claimed_idx / claimed_seen: the slots of expired_* and of the expired agg_* and their entries as
    read, for free_claims() once the records are durable; closed_idx / closed_seen: the same for
    closed_* and the closed agg_*."""
    family: int
    expired_keys: np.ndarray
    expired_entries: np.ndarray
    update_keys: np.ndarray
    update_entries: np.ndarray
    claimed_idx: np.ndarray = None          # type: ignore[assignment]
    claimed_seen: np.ndarray = None         # type: ignore[assignment]
    closed_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    closed_entries: np.ndarray = field(default_factory=lambda: np.zeros(0, CT_ENTRY_DT))
    closed_idx: np.ndarray = None           # type: ignore[assignment]
    closed_seen: np.ndarray = None          # type: ignore[assignment]
    agg_keys: np.ndarray | None = None
    agg_entries: np.ndarray | None = None
    agg_closed: int = 0
    detached_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    detached_entries: np.ndarray = field(default_factory=lambda: np.zeros(0, CT_ENTRY_DT))
    detached_ns: int = 0


@dataclass
class CtScan:
    """Outcome of one scan_conntrack over both families (one CtFamilyScan each)."""
    families: list[CtFamilyScan]
    scanned: int          # entries read
    raced: int            # expired candidates a packet touched between read and claim (kept)
    ended: int            # expired entries whose end was reported already (datapath flow_end, durable close): freed
    reclaimed: int = 0    # claims of an earlier collector (idle ends, closes) not journaled, reported again
    detached_ns: int = 0  # hw_config.detached_ns: the datapath detached then (0: attached, or a stale note)
    stale_detach: int = 0  # 1: a detach note was ignored, a tracked packet came after it (ConntrackScans.detach_note)

    @property
    def detached(self) -> int:
        return sum(len(f.detached_keys) for f in self.families)

    @property
    def expired(self) -> int:
        return sum(len(f.expired_keys) + (len(f.agg_keys) - f.agg_closed if f.agg_keys is not None else 0)
                   for f in self.families)

    @property
    def updates(self) -> int:
        return sum(len(f.update_keys) for f in self.families)

    @property
    def closed(self) -> int:
        return sum(len(f.closed_keys) + f.agg_closed for f in self.families)


class ConntrackScans:
    """Mixin of KernelSource (collector/kernel.py): the conntrack tables' scans, claims and releases.
    Uses its `fds`, `_ct`, `_claims`, `_last_scan_ns` and `_read1`."""

    def unconfirmed_ns(self) -> int:
        """Idle timeout of unconfirmed conntrack entries in the active policy (ns; two lookups)."""
        gen = int(self._read1("hw_config", CFG_DT)["gen"]) & 1
        raw = bpfsys.map_lookup(self.fds["hw_policy"], gen.to_bytes(4, "little"), POLICY_HDR_DT.itemsize)
        s = int(np.frombuffer(raw, dtype=POLICY_HDR_DT)[0]["ct_unconfirmed_s"])
        return (s or L.C["HW_CT_TO_UNCONFIRMED"]) * _S

    def detached_ns(self) -> int:
        """hw_config.detached_ns: when a clean enforcer stop detached the datapath (0: still attached, or
        an instance that is replaced instead). One map lookup."""
        return int(self._read1("hw_config", CFG_DT)["detached_ns"])

    def detach_note(self) -> tuple[int, bool]:
        """(detached_ns to act on, stale). A note is stale when a tracked connection saw a packet after it
        (later than detached_ns plus one tick of the datapath's clock): the datapath still runs (a note an
        adopting `run` inherited, one written while a program stayed attached), so ending its connections
        would end live ones (docs/collector.md "Detach"); it is then (0, True). Cost: one map lookup; with
        a note, one vectorised pass over the live slots' last_ns of both tables."""
        cfg = self._read1("hw_config", CFG_DT)
        det = int(cfg["detached_ns"])
        if not det:
            return 0, False
        after = det + (int(cfg["tick_ns"]) or COARSE_TICK_NS)
        for fam in (4, 6):
            table = self._table(fam)
            idx = table.live()
            if len(idx) and int(table.slots["e"]["last_ns"][idx].max()) > after:
                return 0, True
        return det, False

    def scan_conntrack(self, now_ns: int, active_timeout_ns: int, close_grace_ns: int = 2 * _S) -> CtScan:
        """Claim entries idle past their timeout (returned; free them with free_claims() once their end
        records are durable), find long-lived ones due for an active-timeout update, and claim
        connections closed by both FINs and quiet for `close_grace_ns` (returned: their end record is
        due; free_claims() marks them durably reported). `now_ns` is on the datapath's clock
        (`now_ns()`).

        The close grace period is conntrack's TIME_WAIT idea applied to reporting (docs/collector.md
        "Records"): the last ACK after the FINs (and a retransmitted FIN) arrives after the close, so a
        closed connection is reported only once it has been quiet that long, with every packet counted.
        Its entry stays until its timeout (late packets still pass as part of it; they are not
        reported). Claiming races with a packet as freeing does: a packet between the check and the
        one-byte store is counted in the kernel but not in the record
        (conntrack.CtTable.claim_closed_if_unchanged).

        Connections reported in aggregate (hw_ct_entry.report: their start went to the flow aggregation,
        or waited and never came) get no record of their own: their expiry or FIN close is returned in
        CtFamilyScan.agg_* for flow summaries (collector/flow_summary.py), and they get no updates. The
        timeout of unconfirmed entries is the active policy's (one map lookup per scan).

        Cost: the tables are read in place (mmap'ed, no syscalls): one vectorised pass over every slot
        (~25-30 MB per family). An expired entry is claimed only if its times are unchanged since the
        read (else a packet touched it: counted as raced, kept); conntrack.CtTable.claim_if_unchanged
        states the remaining µs window. The datapath itself ignores expired entries (and reports nothing
        for a claimed one it displaces), so claiming and freeing them changes no verdict. Entries claimed
        by an earlier collector and never freed are reported again (`reclaimed`). No updates on the first
        scan (there is no previous scan to compare).

        Detached (hw_config.detached_ns set: no packet reaches the tables since): expiry is judged at the
        detach, every FIN close is quiet, and every other connection still tracked and not reported is
        claimed and returned in CtFamilyScan.detached_* (or agg_* when reported in aggregate): the
        scan that first sees the detach reports every connection's end, the later ones find nothing.
        No updates then (the end carries the totals). A stale note (detach_note) is ignored: the scan
        runs as if attached and says so in CtScan.stale_detach."""
        fams, scanned, raced, ended, again = [], 0, 0, 0, 0
        unc_ns = self.unconfirmed_ns()
        det_ns, stale = self.detach_note()
        for fam in (4, 6):
            f, n, r, e, a = self._scan_family(fam, now_ns, active_timeout_ns, close_grace_ns, unc_ns, det_ns)
            fams.append(f)
            scanned, raced, ended, again = scanned + n, raced + r, ended + e, again + a
        self._last_scan_ns = now_ns
        return CtScan(fams, scanned, raced, ended, again, det_ns, int(stale))

    def free_claims(self, scan: CtFamilyScan) -> int:
        """Release what `scan` claimed, once its records are durable: free the idle-expired slots, and mark
        the closed connections durably reported (conntrack.CtTable.confirm_closed: the entry stays until
        its timeout, the next scan after that frees it). Only where the slot still holds the connection
        claimed (a slot the datapath reused meanwhile holds another connection now). Returns how many
        were released. Cost: two vectorised passes over the claimed slots."""
        table = self._table(scan.family)
        mine = self._claims[scan.family]
        done = 0
        for idx, seen, release in ((scan.claimed_idx, scan.claimed_seen, table.free_if_unchanged),
                                   (scan.closed_idx, scan.closed_seen, table.confirm_closed)):
            if idx is None or not len(idx):
                continue
            done += int(release(idx, seen).sum())
            for i, c in zip(idx.tolist(), seen["created_ns"].tolist()):
                mine.discard((i, c))
        return done

    def adopt_claims(self, scan: CtFamilyScan) -> None:
        """Take over the claims of `scan`, a batch an earlier collector made and journaled
        (collector/ct_journal.py): they are pending here from now on, so a scan does not report them
        again; free_claims(scan) releases them once the batch sent again is durable. O(claims)."""
        mine = self._claims[scan.family]
        for idx, seen in ((scan.claimed_idx, scan.claimed_seen), (scan.closed_idx, scan.closed_seen)):
            if idx is not None and len(idx):
                mine.update(zip(idx.tolist(), seen["created_ns"].tolist()))

    def set_last_scan(self, now_ns: int | None) -> None:
        """Where active-timeout updates continue from (a checkpoint of the previous collector's last
        durable scan), so a restart neither skips nor repeats due updates."""
        self._last_scan_ns = now_ns

    @property
    def last_scan_ns(self) -> int | None:
        return self._last_scan_ns

    def _table(self, fam: int) -> conntrack.CtTable:
        if fam not in self._ct:
            self._ct[fam] = conntrack.CtTable(self.fds[conntrack.MAPS[fam]], fam)
        return self._ct[fam]

    def _scan_family(self, fam: int, now_ns: int, at_ns: int, grace_ns: int,
                     unc_ns: int, det_ns: int = 0) -> tuple[CtFamilyScan, int, int, int, int]:
        table = self._table(fam)
        idx = table.live()
        snap = table.slots[idx]                     # a copy: the datapath keeps writing the table
        keys, ents = snap["k"], snap["e"]
        n = len(idx)
        last = ents["last_ns"].astype(np.int64)
        created = ents["created_ns"].astype(np.int64)
        at = min(now_ns, det_ns) if det_ns else now_ns      # detached: what had expired by then
        expired = (np.int64(at) - last) > ct_timeout_ns(keys["proto"], ents["state"], unc_ns, ents["packets"])
        claimed, closed_claimed, ended = conntrack.EndMarks.of(ents)
        mine = self._claims[fam]
        pending = np.zeros(n, bool)                 # this run's claims whose records are not durable yet
        if mine:
            maybe = np.flatnonzero(np.isin(idx, np.fromiter((i for i, _ in mine), np.int64, len(mine))))
            pending[maybe] = [(i, c) in mine for i, c in zip(idx[maybe].tolist(), created[maybe].tolist())]
        # the datapath reported these ends itself (the event is in the ring buffer), or this collector's
        # close record is durable: just free them
        done = np.flatnonzero(expired & ended)
        table.free_if_unchanged(idx[done], ents[done])
        # idle ends claimed by an earlier collector, never freed: report again; fresh ones: claim now
        again = np.flatnonzero(expired & claimed & ~pending)
        fresh = np.flatnonzero(expired & ~claimed & ~ended & ~closed_claimed)
        got = table.claim_if_unchanged(idx[fresh], ents[fresh])
        raced = int((~got).sum())
        rep = np.sort(np.concatenate([again, fresh[got]]))
        # closes: quiet for the grace period now (claim), or claimed by an earlier collector whose close
        # records never became durable (report again, expired or not; pending ones are this run's)
        quiet = (np.int64(now_ns) - last) > np.int64(grace_ns) if not det_ns else np.ones(n, bool)
        closing = np.flatnonzero((ents["state"] == CT_CLOSING) & ~ended & ~claimed & ~closed_claimed & ~expired
                                 & quiet)
        marked = table.claim_closed_if_unchanged(idx[closing], ents[closing])
        raced += int((~marked).sum())
        again_closed = np.flatnonzero(closed_claimed & ~pending)
        cls = np.sort(np.concatenate([again_closed, closing[marked]]))
        left = (~expired & ~ended & ~claimed & ~closed_claimed) if det_ns else None
        det = self._claim_detached(table, idx, ents, left, closing)
        for i, c in zip(idx[rep].tolist() + idx[cls].tolist() + idx[det].tolist(),
                        created[rep].tolist() + created[cls].tolist() + created[det].tolist()):
            mine.add((i, c))
        exp_ents = ents[rep].copy()
        exp_ents["fin_seen"] &= np.uint8(0xFF ^ CLAIM_BITS)     # as the builder must see them
        seen = ents[np.concatenate([rep, det])].copy()
        seen["fin_seen"] |= np.uint8(CLAIM_BITS)
        det_ents, det_agg = ents[det].copy(), ents["report"][det] != REP_EVENTS
        # connections reported in aggregate (hw_ct_entry.report) end in flow summaries, not records of their
        # own; they are claimed and released like the others, and get no updates
        exp_agg = exp_ents["report"] != REP_EVENTS
        cls_agg = ents["report"][cls] != REP_EVENTS
        agg_keys = np.concatenate([keys[rep][exp_agg], keys[det][det_agg], keys[cls][cls_agg]])
        agg_ents = np.concatenate([exp_ents[exp_agg], det_ents[det_agg], ents[cls][cls_agg]])
        live = ~expired & ~(ended | claimed | closed_claimed) & (ents["report"] == REP_EVENTS) & (det_ns == 0)
        upd_idx = np.setdiff1d(self._due_updates(created, last, live, now_ns, at_ns), cls)
        scan = CtFamilyScan(fam, keys[rep][~exp_agg].copy(), exp_ents[~exp_agg], keys[upd_idx].copy(),
                            ents[upd_idx].copy(), np.concatenate([idx[rep], idx[det]]), seen,
                            keys[cls][~cls_agg].copy(), ents[cls][~cls_agg].copy(), idx[cls].copy(),
                            ents[cls].copy(), agg_keys, agg_ents, int(cls_agg.sum()), keys[det][~det_agg].copy(),
                            det_ents[~det_agg], det_ns)
        return scan, n, raced, len(done), len(again) + len(again_closed)

    @staticmethod
    def _claim_detached(table: conntrack.CtTable, idx: np.ndarray, ents: np.ndarray, left: np.ndarray | None,
                        closing: np.ndarray) -> np.ndarray:
        """Detached: claim the connections `left` (mask; None when attached) that are no FIN close
        (`closing`: indexes, claimed as closes); sorted indexes into idx of those claimed. No packet
        reaches a detached table, so none races (claim_if_unchanged checks all the same)."""
        if left is None:
            return np.empty(0, np.int64)
        left = left.copy()
        left[closing] = False
        cand = np.flatnonzero(left)
        return cand[table.claim_if_unchanged(idx[cand], ents[cand])]

    def _due_updates(self, created: np.ndarray, last: np.ndarray, live: np.ndarray, now_ns: int,
                     at_ns: int) -> np.ndarray:
        """Indexes of live entries that crossed a multiple of the active timeout (from creation)
        since the previous scan and saw a packet since the previous multiple."""
        if self._last_scan_ns is None or at_ns <= 0:
            return np.empty(0, dtype=np.int64)
        age_now = np.int64(now_ns) - created
        age_prev = np.int64(self._last_scan_ns) - created
        k_now = np.where(age_now > 0, age_now // at_ns, 0)
        k_prev = np.where(age_prev > 0, age_prev // at_ns, 0)
        active = last > created + (k_now - 1) * at_ns
        return np.flatnonzero(live & (k_now >= 1) & (k_now > k_prev) & active)


def ct_timeout_ns(proto: np.ndarray, state: np.ndarray, unconfirmed_ns: int = L.C["HW_CT_TO_UNCONFIRMED"] * _S,
                  packets: np.ndarray | None = None) -> np.ndarray:
    """Idle timeout per entry, as the datapath's ct_expired_u() computes it: unconfirmed entries (NEW,
    SYN_SENT, SYN_RECV) the policy's unconfirmed timeout, the others HW_CT_TO_* seconds by state; a UDP
    flow by whether it is a stream (`packets`, per side (n, 2): either side sent twice, conntrack.h
    ct_udp_assured) — without `packets` every replied UDP flow counts as a stream (the
    longer timeout)."""
    C = L.C
    tcp = np.select([state == C["HW_CT_ESTABLISHED"], (state == C["HW_CT_FIN_WAIT"]) | (state == C["HW_CT_CLOSING"])],
                    [C["HW_CT_TO_ESTABLISHED"], C["HW_CT_TO_FIN"]], C["HW_CT_TO_CLOSE"])
    assured = (packets[:, 0] | packets[:, 1]) > 1 if packets is not None else True
    udp = np.where(assured, C["HW_CT_TO_UDP_REPLIED"], C["HW_CT_TO_UDP_UNASSURED"])
    s = np.where(proto == 6, tcp, np.where(proto == 17, udp, C["HW_CT_TO_ICMP"]))
    unconfirmed = np.isin(state, list(L.UNCONFIRMED_STATES))
    return np.where(unconfirmed, np.int64(unconfirmed_ns), s.astype(np.int64) * _S)
