"""The conntrack tables (hw_ct4, hw_ct6) from user space: mmap'ed NumPy views of their slots.

Each family's table is a set-associative table (enforcer/slot_table.py, bpf/hostwall.h): a connection
lives in one of the HW_CT_WAYS slots of the bucket its normalised key hashes to. The datapath inserts
and evicts; user space reads the slots in place (no syscalls), frees idle ones with one store, clears
and copies tables.

Writes from here race with the datapath only as documented where they happen (`free_if_unchanged`,
`claim_if_unchanged`, `claim_closed_if_unchanged`, `confirm_closed`).

Claims (docs/collector.md "Delivery and loss"): the collector reports an idle-expired connection's end
itself, and must not free its slot before that record is durable, or a crash in between would lose the
end. It *claims* the entry instead: fin_seen |= HW_CT_F_END_EMITTED | CT_F_CLAIMED. END_EMITTED makes
the datapath treat the end as reported (it never emits a flow_end for it, even when it reuses the
slot); CT_F_CLAIMED is the collector's own bit (the datapath never reads or writes bit 6 of fin_seen:
tests/collector/test_delivery.py checks the header's flags), so a collector that restarts after a crash
finds the ends that were claimed but never freed and reports them again (same event.id).

Connections closed by both FINs are reported by the collector after the close grace period (the entry
stays until its FIN timeout, so late packets still pass as part of it). Their claim is the entry's
`reported` byte, which only the collector writes while the slot is live (the datapath resets it at
reuse and treats any non-zero value as reported): REPORTED_CLAIMED when the scan builds the close
record, REPORTED_DURABLE once that record is durable in every at_least_once sink. A collector that
restarts after a crash finds REPORTED_CLAIMED entries it did not claim itself and reports them again.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import layout as L
from . import slot_table
from .slot_table import FREE, LIVE, SlotTable

MAPS = {4: "hw_ct4", 6: "hw_ct6"}
END_EMITTED = L.C["HW_CT_F_END_EMITTED"]
CT_F_CLAIMED = 0x40                 # collector-private bit of hw_ct_entry.fin_seen (see the module docstring)
CLAIM_BITS = END_EMITTED | CT_F_CLAIMED
REPORTED_DURABLE = 1                # hw_ct_entry.reported: the close record is durable
REPORTED_CLAIMED = 2                # hw_ct_entry.reported: the close record is built, not durable yet
SLOT_DT = {4: L.DTYPES["hw_ct4_slot"], 6: L.DTYPES["hw_ct6_slot"]}
KEY_DT = {4: L.DTYPES["hw_ct4_key"], 6: L.DTYPES["hw_ct6_key"]}
WAYS = L.CT_WAYS
# The entry as builds before the TCP sequence state laid it out (no seq_known / seq_end / seq_ack): a
# restart after the upgrade still carries its connections over, with nothing learnt (the datapath
# then accepts their RST/FIN as before and learns from their next packets: docs/datapath.md
# "Sequence checks").
_ENTRY_NO_SEQ = np.dtype([(n, L.DTYPES["hw_ct_entry"].fields[n][0]) for n in L.DTYPES["hw_ct_entry"].names
                          if n not in ("seq_known", "pad", "seq_end", "seq_ack", "slot_state")]
                         + [("pad", np.uint8, 2), ("slot_state", np.uint64)])
OLD_SLOT_DT = {f: np.dtype([("e", _ENTRY_NO_SEQ), ("k", KEY_DT[f])]) for f in (4, 6)}


class CtTable(SlotTable):
    """One family's table, mapped into this process: `slots` is a writable structured view (CT_MAX).

    Mapping costs one mmap (no copy); reading all slots touches ~25-30 MB. Close before the fd."""

    def __init__(self, fd: int, family: int, dtype: np.dtype | None = None):
        super().__init__(fd, dtype or SLOT_DT[family], L.CT_MAX, ("e", "slot_state"))
        self.family = family

    def free_if_unchanged(self, idx: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Free the slots at idx whose entry still has the created_ns/last_ns of `seen` (entries read
        earlier); mask of those freed. A packet or a new connection that touches a slot between this
        check and the store is lost to it (that connection's next packet is judged by policy again):
        a window of a few µs per slot, as with any delete-after-read."""
        e = self.slots["e"]
        cur = e[idx]
        ok = (cur["slot_state"] == LIVE) & (cur["created_ns"] == seen["created_ns"]) & \
             (cur["last_ns"] == seen["last_ns"])
        e["slot_state"][idx[ok]] = FREE     # one aligned 8-byte store per slot
        return ok

    def claim_if_unchanged(self, idx: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Claim the expired entries at idx whose created_ns/last_ns are still those of `seen`: set
        END_EMITTED | CT_F_CLAIMED in fin_seen (one byte store per slot); mask of those claimed. The
        datapath does not touch an expired entry except to reuse its slot (then it sees END_EMITTED and
        reports nothing), so the only race is the check-to-store window of free_if_unchanged."""
        e = self.slots["e"]
        cur = e[idx]
        ok = (cur["slot_state"] == LIVE) & (cur["created_ns"] == seen["created_ns"]) & \
             (cur["last_ns"] == seen["last_ns"])
        hit = idx[ok]
        e["fin_seen"][hit] = cur["fin_seen"][ok] | CLAIM_BITS
        return ok

    def claim_closed_if_unchanged(self, idx: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Claim the closed connections at idx whose entry is still the one of `seen` (same created_ns)
        and saw no packet since (same packet counts): set `reported` to REPORTED_CLAIMED (one byte store
        per slot); mask of those claimed. The datapath then reports the connection's end no more
        (bpf/conntrack.h ct_reported: any non-zero value) and resets the byte when the slot is reused. A
        packet or a reuse between this check and the store is the race `free_if_unchanged` states: a few
        µs per slot."""
        e = self.slots["e"]
        cur = e[idx]
        ok = (cur["slot_state"] == LIVE) & (cur["created_ns"] == seen["created_ns"]) & \
             (cur["packets"] == seen["packets"]).all(axis=1)
        e["reported"][idx[ok]] = REPORTED_CLAIMED   # the datapath writes this byte only at reuse
        return ok

    def confirm_closed(self, idx: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """The close records of the claims at idx are durable: set `reported` to REPORTED_DURABLE where
        the slot still holds the connection claimed (LIVE, same created_ns, still REPORTED_CLAIMED; a
        slot reused meanwhile holds another connection, whose byte ct_open reset). Mask of those set.
        Late packets may have touched the entry since the claim: they change neither created_ns nor
        `reported`, so they do not stop the confirmation."""
        e = self.slots["e"]
        cur = e[idx]
        ok = (cur["slot_state"] == LIVE) & (cur["created_ns"] == seen["created_ns"]) & \
             (cur["reported"] == REPORTED_CLAIMED)
        e["reported"][idx[ok]] = REPORTED_DURABLE
        return ok
        return ok


def tables(map_fds: dict[str, int]) -> list[CtTable]:
    return [CtTable(map_fds[MAPS[f]], f) for f in (4, 6)]


def live_count(map_fds: dict[str, int]) -> dict[int, int]:
    out = {}
    for t in tables(map_fds):
        with t:
            out[t.family] = len(t.live())
    return out


class EndMarks(NamedTuple):
    """Who reports the end of each entry, by its marks (masks over hw_ct_entry rows). claimed: a collector
    claimed its idle end (CT_F_CLAIMED); closed_claimed: a collector built its close record
    (REPORTED_CLAIMED); ended: reported already — the datapath emitted its flow_end (END_EMITTED without a
    claim) or its close record is durable (REPORTED_DURABLE). The rest (`unreported`) is what a scan must
    report: one rule for the collector's scans (collector/ct_scan.py) and a discard's note (bpf/retired.py)."""
    claimed: np.ndarray
    closed_claimed: np.ndarray
    ended: np.ndarray

    @classmethod
    def of(cls, ents: np.ndarray) -> EndMarks:
        fin, rep = ents["fin_seen"], ents["reported"]
        claimed = (fin & CT_F_CLAIMED) != 0
        ended = (((fin & END_EMITTED) != 0) & ~claimed) | (rep == REPORTED_DURABLE)
        return cls(claimed, rep == REPORTED_CLAIMED, ended)

    @property
    def unreported(self) -> np.ndarray:
        return ~(self.claimed | self.closed_claimed | self.ended)


def unreported_count(map_fds: dict[str, int]) -> int:
    """LIVE connections whose end no one has reported or claimed (EndMarks.unreported), both families.
    Cost: one vectorised pass over each table (mmap'ed, ~25-30 MB per family)."""
    n = 0
    for t in tables(map_fds):
        with t:
            n += int(EndMarks.of(t.slots["e"][t.live()]).unreported.sum())
    return n


def slot_dtype(value_size: int, family: int) -> np.dtype | None:
    """The slot layout of a table whose values are `value_size` bytes: this build's, the one before
    the sequence state (OLD_SLOT_DT), or None (unknown: nothing can be carried over)."""
    return next((dt for dt in (SLOT_DT[family], OLD_SLOT_DT[family]) if dt.itemsize == value_size), None)


def copy_tables(src_fds: dict[str, int], dst_fds: dict[str, int], src_dtypes: dict[int, np.dtype] | None = None) -> int:
    """Copy every LIVE slot of src into the same index of dst (same seed required: the caller copies
    hw_config.table_seed); returns how many. `src_dtypes`: src's slot layout per family when it is
    OLD_SLOT_DT (fields copied by name; the sequence state stays zero: nothing learnt). The old
    datapath may still run: only rows read LIVE twice with the same connection (_settled) are copied."""
    n = 0
    for f in (4, 6):
        sdt = (src_dtypes or {}).get(f, SLOT_DT[f])
        with CtTable(src_fds[MAPS[f]], f, sdt) as s, CtTable(dst_fds[MAPS[f]], f) as d:
            idx, rows = _settled(s)
            if sdt == SLOT_DT[f]:
                d.slots[idx] = rows
            else:
                d.slots["k"][idx] = rows["k"]
                for name in _ENTRY_NO_SEQ.names:
                    if name != "pad":
                        d.slots["e"][name][idx] = rows["e"][name]
            n += len(idx)
    return n


def mark_carried(old_fds: dict[str, int], new_fds: dict[str, int]) -> int:
    """After a build upgrade switched to the new instance: mark, in the replaced instance's tables, the
    connections the new one carries (_carried) as reported (REPORTED_DURABLE), so the scan that ends what
    the replaced instance still tracks ends only the others — opened after the copy, or left out of it
    (docs/collector.md "Replaced instances"). Nothing runs the old programs any more (the caller waited a
    grace period). Same layout in both required. Returns how many were marked. Cost: one pass over each
    table's live slots, both instances."""
    n = 0
    for f in (4, 6):
        with CtTable(old_fds[MAPS[f]], f) as o, CtTable(new_fds[MAPS[f]], f) as d:
            idx, unreported, carried = _carried(o, d)
            o.slots["e"]["reported"][idx[unreported & carried]] = REPORTED_DURABLE
            n += int((unreported & carried).sum())
    return n


def uncarried_count(old_fds: dict[str, int], new_fds: dict[str, int]) -> int:
    """The replaced instance's connections whose end no one reported or claimed and that the new one does
    not carry (_carried): ends lost when its tables are freed unread (docs/collector.md "Replaced
    instances"). Reads only; same layout in both required; cost as mark_carried."""
    n = 0
    for f in (4, 6):
        with CtTable(old_fds[MAPS[f]], f) as o, CtTable(new_fds[MAPS[f]], f) as d:
            _, unreported, carried = _carried(o, d)
            n += int((unreported & ~carried).sum())
    return n


def _carried(o: CtTable, d: CtTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(o's LIVE indexes, their unreported mask (EndMarks: no one reported or claimed the end), carried
    mask: d's slot at the same index holds the same key and created_ns — copy_tables copied it)."""
    idx = o.live()
    was, now = o.slots[idx], d.slots[idx]
    carried = (now["e"]["slot_state"] == LIVE) & (now["e"]["created_ns"] == was["e"]["created_ns"]) & \
        (_raw(now["k"]) == _raw(was["k"])).all(axis=1)
    return idx, EndMarks.of(was["e"]).unreported, carried


def _settled(s: CtTable) -> tuple[np.ndarray, np.ndarray]:
    """(indexes, row copies) of src's LIVE slots whose two reads agree on state (LIVE), key and
    created_ns: a slot the running datapath claimed between them (BUSY, or LIVE again with another
    connection: a row mixing two) is left out, its connection judged afresh. Counters moving between
    the reads do not matter (the second read is copied). Cost: two copies of the LIVE rows."""
    idx = s.live()
    first = s.slots[idx]                # fancy indexing: copies
    rows = s.slots[idx]
    same = (rows["e"]["slot_state"] == LIVE) & (first["e"]["slot_state"] == LIVE) & \
        (rows["e"]["created_ns"] == first["e"]["created_ns"]) & (_raw(rows["k"]) == _raw(first["k"])).all(axis=1)
    return idx[same], rows[same]


def _raw(a: np.ndarray) -> np.ndarray:
    """Each element's bytes, one row per element."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(len(a), a.dtype.itemsize)


def first_slot(keys: np.ndarray, family: int, seed: int) -> np.ndarray:
    """Index of the first slot of each key's bucket, as the datapath's ct_base4/ct_base6 compute it.
    keys: hw_ct4_key / hw_ct6_key structured array."""
    return slot_table.first_slot(np.asarray(keys, dtype=KEY_DT[family]), seed, L.CT_MAX, WAYS)


def key_of(family: int, src: bytes, dst: bytes, sport: int, dport: int, proto: int) -> tuple[np.void, int]:
    """(normalised key, side) of a packet's tuple as the datapath's ct_key4/ct_key6 build it: side a is
    the lower (address, port) pair — v4 addresses and all ports compared as the CPU loads them, v6
    addresses as big-endian words; side 1 means the sender is side b. Addresses are packed bytes."""
    def raw16(port: int) -> int:
        return int.from_bytes(port.to_bytes(2, "big"), "little")
    if family == 4:
        s, d = int.from_bytes(src, "little"), int.from_bytes(dst, "little")
    else:
        s, d = int.from_bytes(src, "big"), int.from_bytes(dst, "big")
    side = s > d or (s == d and raw16(sport) > raw16(dport))
    (aa, pa), (ab, pb) = ((dst, dport), (src, sport)) if side else ((src, sport), (dst, dport))
    raw = aa + ab + pa.to_bytes(2, "big") + pb.to_bytes(2, "big") + bytes([proto, 0, 0, 0])
    return np.frombuffer(raw, dtype=KEY_DT[family])[0], int(side)
