"""The dynamic set of FQDN rules and the DNS proxy's learnt names, in the instance's pinned maps
(bpf/fqdn.h, hostwall.h "FQDN rules" and "What the proxy learnt"; docs/datapath.md "FQDN rules").

    hw_fqdn          (set, address) -> (expires_ns, learnt_ns): what the datapath reads
    hw_fqdn_index    its direct-mapped index (mmap, hostwall.h struct hw_fqdn_slot): per slot how many
                     entries fall there and a copy of the last one written, so that the datapath
                     skips the hash lookup of most packets; written with hw_fqdn, derived from it
    hw_dns_names     name_id -> (learnt_ns, name)
    hw_dns_name_ips  (name_id, address) -> (expires_ns, learnt_ns): the source the sets are derived from
    hw_dns_stats     the proxy's counters (mmap, enum hw_dns_stat)

User space only writes them (the proxy, and a policy swap filling a new set, possibly in two processes:
their writes to the dynamic set happen inside `writing()`, an exclusive flock on a lock file beside the
instance state, so a renewal never undoes a longer expiry another writer just set), one element per
syscall (~3 µs) or in batches; a full map refuses the element (`put` returns False, the caller counts it).
Times are CLOCK_MONOTONIC ns, the datapath's clock. Used by the enforcer (proxy, swap, status) and the
collector (metrics, destination.domain), so it lives here, below both.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import time
from dataclasses import dataclass

import numpy as np

from . import bpfsys
from . import layout as L
from .state import instance_stem, state_dir

__all__ = ["SET_MAP", "INDEX_MAP", "NAMES_MAP", "NAME_IPS_MAP", "STATS_MAP", "FqdnMaps", "Learnt", "name_id",
           "now_ns", "MAPS", "index_slot", "reindex"]

SET_MAP, NAMES_MAP, NAME_IPS_MAP, STATS_MAP = "hw_fqdn", "hw_dns_names", "hw_dns_name_ips", "hw_dns_stats"
MAPS = (SET_MAP, NAMES_MAP, NAME_IPS_MAP, STATS_MAP)
INDEX_MAP = "hw_fqdn_index"             # derived from SET_MAP: rebuilt, not copied, by copy_maps
_KEY, _VAL = L.DTYPES["hw_fqdn_key"], L.DTYPES["hw_fqdn_val"]
_SLOT = L.DTYPES["hw_fqdn_slot"]
_INDEX_BITS = L.C["HW_FQDN_INDEX_BITS"]
_MULT = np.array([L.C[f"HW_FQDN_K{i}"] for i in range(3)], dtype=np.uint64)
E2BIG = 7
EEXIST = 17
BPF_NOEXIST = 1
_NKEY, _NAME = L.DTYPES["hw_dns_name_ip"], L.DTYPES["hw_dns_name"]


def now_ns() -> int:
    """CLOCK_MONOTONIC ns: the clock of every expiry here (bpf_ktime_get_ns, the datapath's tick clock)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def name_id(name: str) -> int:
    """A name's id in hw_dns_names: the first 8 bytes of its BLAKE2b digest, little endian."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _addr(ip: str) -> tuple[int, bytes]:
    a = ipaddress.ip_address(ip)
    return a.version, a.packed.ljust(16, b"\0")


def _ntop(family: int, raw: bytes) -> str:
    return str(ipaddress.ip_address(raw[:4] if family == 4 else raw[:16]))


def _set_key(set_id: int, ip: str) -> bytes:
    fam, packed = _addr(ip)
    return set_id.to_bytes(4, "little") + bytes([fam, 0, 0, 0]) + packed


def _name_key(nid: int, ip: str) -> bytes:
    fam, packed = _addr(ip)
    return nid.to_bytes(8, "little") + bytes([fam, 0, 0, 0]) + packed + b"\0" * 4


def index_slot(keys: np.ndarray) -> np.ndarray:
    """hw_fqdn_index slots of hw_fqdn keys (fqdn.h fqdn_slot): the top bits of w0 * K0 + w1 * K1 + w2 * K2
    mod 2^64, w0..w2 the key's three 64-bit words as the datapath reads them (host order)."""
    words = np.ascontiguousarray(keys).view("<u8").reshape(-1, 3)
    with np.errstate(over="ignore"):
        x = (words * _MULT).sum(axis=1, dtype=np.uint64)
    return (x >> np.uint64(64 - _INDEX_BITS)).astype(np.int64)


def _val(expires_ns: int, learnt_ns: int) -> bytes:
    return int(expires_ns).to_bytes(8, "little") + int(learnt_ns).to_bytes(8, "little")


@dataclass(frozen=True, slots=True)
class Learnt:
    """One address learnt for one name."""
    name: str
    ip: str
    expires_ns: int
    learnt_ns: int


class FqdnMaps:
    """The four maps of one instance and the set's index, by fd (owned by the caller's Instance); a writer
    of the set needs the index, a reader does not. `pin_dir` names the lock file writers share (None: no
    lock, for a writer known to be alone, e.g. a test)."""

    def __init__(self, map_fds: dict[str, int], pin_dir: str | None = None):
        self.fds = {n: map_fds[n] for n in MAPS}
        if INDEX_MAP in map_fds:                # only writers need it: a reader (the collector's names) may lack it
            self.fds[INDEX_MAP] = map_fds[INDEX_MAP]
        self.pin_dir = pin_dir
        self._stats: np.ndarray | None = None
        self._mm = None
        self._index: np.ndarray | None = None
        self._index_mm = None
        self._lock_fd: int | None = None
        self._depth = 0
        self.evicted = 0                # the hash map never evicts (kept for the writers' interface)

    @contextlib.contextmanager
    def writing(self):
        """Hold the instance's writer lock (re-entrant within this object)."""
        if self.pin_dir is None:
            yield
            return
        if self._depth == 0:
            if self._lock_fd is None:            # kept open: each use costs the two flock calls only
                path = state_dir() / f"{instance_stem(self.pin_dir)}.fqdn.lock"
                path.parent.mkdir(parents=True, exist_ok=True)
                self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ---- the dynamic set ------------------------------------------------------------------------
    def _put(self, fd: int, key: bytes, value: bytes, flags: int = 0) -> bool:
        try:
            bpfsys.map_update(fd, key, value, flags)
        except bpfsys.BpfError as e:
            if e.errno == E2BIG:
                return False
            raise
        return True

    def index(self) -> np.ndarray:
        """hw_fqdn_index as a writable view (mmap; written under `writing()` with hw_fqdn)."""
        if self._index is None:
            self._index_mm = bpfsys.mmap_array(self.fds[INDEX_MAP])
            self._index = np.frombuffer(self._index_mm, _SLOT, 1 << _INDEX_BITS)
        return self._index

    def _slot_write(self, i: int, entries: int, key: bytes | None, expires_ns: int) -> None:
        """One slot changed as the datapath may read it at any moment: its sequence is odd meanwhile, so
        a packet that read the copy across the change asks hw_fqdn instead (fqdn.h fqdn_indexed)."""
        ix = self.index()
        seq = int(ix["seq"][i]) | 1             # odd, also after a writer killed while it was odd
        ix["seq"][i] = seq
        ix["entries"][i] = max(0, int(ix["entries"][i]) + entries)
        if key is not None:
            ix["key"][i] = np.frombuffer(key, _KEY)[0]
            ix["expires_ns"][i] = expires_ns
        ix["seq"][i] = (seq + 1) & 0xFFFFFFFF

    def _set_put(self, key: bytes, expires_ns: int, learnt_ns: int) -> bool:
        """hw_fqdn first (the set), its index after: a packet in between asks hw_fqdn, which has it."""
        self.index()                            # a reader's object (no index) fails here, before any write
        with self.writing():
            value = _val(expires_ns, learnt_ns)
            new = True
            try:
                if not self._put(self.fds[SET_MAP], key, value, BPF_NOEXIST):
                    return False
            except bpfsys.BpfError as e:
                if e.errno != EEXIST:
                    raise
                new = False                     # a renewal: the slot already counts it
                if not self._put(self.fds[SET_MAP], key, value):
                    return False
            self._slot_write(int(index_slot(np.frombuffer(key, _KEY))[0]), int(new), key, expires_ns)
            return True

    def _set_del(self, key: bytes) -> bool:
        """The index's copy of the key goes first (it must not outlive the entry), the entry, then the count."""
        with self.writing():
            i = int(index_slot(np.frombuffer(key, _KEY))[0])
            if self.index()["key"][i].tobytes() == key:
                self._slot_write(i, 0, bytes(_KEY.itemsize), 0)
            gone = bpfsys.map_delete(self.fds[SET_MAP], key)
            if gone:
                self._slot_write(i, -1, None, 0)
            return gone

    def rebuild_index(self) -> int:
        """Derive hw_fqdn_index from hw_fqdn again (an instance whose set was filled without it: copied
        from an older build; or taken over after a writer was killed between its hw_fqdn update and its
        slot's, which left the slot counting one entry too few, a learnt address denied while renewals
        keep it, or its sequence odd); returns the entries indexed. Safe while packets read the index: a
        slot's count goes from its old value to its new one, never through 0, and every copy changes
        under an odd sequence."""
        with self.writing():
            keys, vals, n = bpfsys.map_batch(self.fds[SET_MAP], _KEY.itemsize, _VAL.itemsize)
            k, v = np.frombuffer(keys, _KEY, n), np.frombuffer(vals, _VAL, n)
            slots = index_slot(k)
            ix = self.index()
            ix["seq"] |= 1                      # odd (even after it) whatever a killed writer left
            ix["entries"] = np.bincount(slots, minlength=len(ix)).astype(np.uint32)
            ix["key"] = np.zeros(1, _KEY)[0]
            ix["expires_ns"] = 0
            # one entry per slot (numpy does not promise which of repeated indices an assignment keeps:
            # two separate ones could pair one key with another's expiry)
            held, one = np.unique(slots, return_index=True)
            ix["key"][held] = k[one]
            ix["expires_ns"][held] = v["expires_ns"][one]
            ix["seq"] += 1
            return n

    def set_get(self, set_id: int, ip: str) -> tuple[int, int] | None:
        raw = bpfsys.map_lookup(self.fds[SET_MAP], _set_key(set_id, ip), _VAL.itemsize)
        if raw is None:
            return None
        v = np.frombuffer(raw, _VAL)[0]
        return int(v["expires_ns"]), int(v["learnt_ns"])

    def set_put(self, set_id: int, ip: str, expires_ns: int, learnt_ns: int) -> bool:
        """Enter or renew (set, ip); False when the map is full (nothing changed)."""
        return self._set_put(_set_key(set_id, ip), expires_ns, learnt_ns)

    def set_delete(self, set_id: int, ip: str) -> bool:
        return self._set_del(_set_key(set_id, ip))

    def set_entries(self) -> list[tuple[int, str, int, int]]:
        """Every (set, ip, expires_ns, learnt_ns); one batch syscall per 8192 entries."""
        keys, vals, n = bpfsys.map_batch(self.fds[SET_MAP], _KEY.itemsize, _VAL.itemsize)
        k, v = np.frombuffer(keys, _KEY, n), np.frombuffer(vals, _VAL, n)
        return [(int(k["set"][i]), _ntop(int(k["family"][i]), k["addr"][i].tobytes()), int(v["expires_ns"][i]),
                 int(v["learnt_ns"][i])) for i in range(n)]

    def delete_sets(self, set_ids: set[int]) -> int:
        """Remove every entry of these sets (retired by a policy swap); returns how many."""
        keys, _, n = bpfsys.map_batch(self.fds[SET_MAP], _KEY.itemsize, _VAL.itemsize)
        k = np.frombuffer(keys, _KEY, n)
        gone = 0
        for i in np.flatnonzero(np.isin(k["set"], np.array(sorted(set_ids), dtype=np.uint32))):
            gone += self._set_del(k[i].tobytes())
        return gone

    # ---- learnt names ---------------------------------------------------------------------------
    def name_put(self, name: str, learnt_ns: int) -> bool:
        rec = np.zeros(1, _NAME)
        rec["learnt_ns"], rec["name"] = learnt_ns, name.encode()
        return self._put(self.fds[NAMES_MAP], name_id(name).to_bytes(8, "little"), rec.tobytes())

    def name_ip_put(self, name: str, ip: str, expires_ns: int, learnt_ns: int) -> bool:
        return self._put(self.fds[NAME_IPS_MAP], _name_key(name_id(name), ip), _val(expires_ns, learnt_ns))

    def name_ip_delete(self, name: str, ip: str) -> bool:
        return bpfsys.map_delete(self.fds[NAME_IPS_MAP], _name_key(name_id(name), ip))

    def names(self) -> dict[int, tuple[str, int]]:
        """name_id -> (name, learnt_ns)."""
        keys, vals, n = bpfsys.map_batch(self.fds[NAMES_MAP], 8, _NAME.itemsize)
        ids, v = np.frombuffer(keys, "<u8", n), np.frombuffer(vals, _NAME, n)
        return {int(ids[i]): (v["name"][i].decode(errors="replace"), int(v["learnt_ns"][i])) for i in range(n)}

    def learnt(self, now: int | None = None) -> list[Learnt]:
        """Every (name, address) the proxy learnt (those expired before `now` left out when given).
        Cost: two batch dumps, O(entries)."""
        names = self.names()
        keys, vals, n = bpfsys.map_batch(self.fds[NAME_IPS_MAP], _NKEY.itemsize, _VAL.itemsize)
        k, v = np.frombuffer(keys, _NKEY, n), np.frombuffer(vals, _VAL, n)
        out = []
        for i in range(n):
            got = names.get(int(k["name_id"][i]))
            exp = int(v["expires_ns"][i])
            if got is None or (now is not None and exp <= now):
                continue
            out.append(Learnt(got[0], _ntop(int(k["family"][i]), k["addr"][i].tobytes()), exp,
                              int(v["learnt_ns"][i])))
        return out

    def set_live(self, now: int) -> int:
        """Unexpired entries of the dynamic set (a batch dump)."""
        _, vals, n = bpfsys.map_batch(self.fds[SET_MAP], _KEY.itemsize, _VAL.itemsize)
        return int((np.frombuffer(vals, _VAL, n)["expires_ns"] > np.uint64(now)).sum())

    def sweep(self, now: int) -> dict[str, int]:
        """Delete expired set entries, expired (name, address) pairs and names left without addresses.
        The datapath ignores expired entries anyway; this frees their room. O(entries) syscalls-light:
        batch dumps, one delete per expired entry."""
        out = {"set": 0, "name_ips": 0, "names": 0}
        with self.writing():
            keys, vals, n = bpfsys.map_batch(self.fds[SET_MAP], _KEY.itemsize, _VAL.itemsize)
            k, v = np.frombuffer(keys, _KEY, n), np.frombuffer(vals, _VAL, n)
            for i in np.flatnonzero(v["expires_ns"] <= np.uint64(now)):
                out["set"] += self._set_del(k[i].tobytes())
        for mp, kdt, field in ((NAME_IPS_MAP, _NKEY, "name_ips"),):
            keys, vals, n = bpfsys.map_batch(self.fds[mp], kdt.itemsize, _VAL.itemsize)
            k, v = np.frombuffer(keys, kdt, n), np.frombuffer(vals, _VAL, n)
            for i in np.flatnonzero(v["expires_ns"] <= np.uint64(now)):
                out[field] += bpfsys.map_delete(self.fds[mp], k[i].tobytes())
        keys, _, n = bpfsys.map_batch(self.fds[NAME_IPS_MAP], _NKEY.itemsize, _VAL.itemsize)
        live = set(np.frombuffer(keys, _NKEY, n)["name_id"].tolist())
        for nid in self.names():
            if nid not in live:
                out["names"] += bpfsys.map_delete(self.fds[NAMES_MAP], nid.to_bytes(8, "little"))
        return out

    def counts(self) -> dict[str, int]:
        """Entries of the three hash maps (status, metrics)."""
        return {SET_MAP: bpfsys.count_entries(self.fds[SET_MAP], _KEY.itemsize, _VAL.itemsize),
                NAMES_MAP: bpfsys.count_entries(self.fds[NAMES_MAP], 8, _NAME.itemsize),
                NAME_IPS_MAP: bpfsys.count_entries(self.fds[NAME_IPS_MAP], _NKEY.itemsize, _VAL.itemsize)}

    # ---- the proxy's counters -------------------------------------------------------------------
    def stats(self) -> np.ndarray:
        """hw_dns_stats as a writable uint64 view (mmap; the proxy is its only writer)."""
        if self._stats is None:
            self._mm = bpfsys.mmap_array(self.fds[STATS_MAP])
            self._stats = np.frombuffer(self._mm, dtype=np.uint64, count=L.C["HW_DNS_STATS"])
        return self._stats

    def stats_dict(self) -> dict[str, int]:
        s = self.stats()
        out = {name: int(s[i]) for i, name in L.DNS_STAT_NAMES.items() if name != "lat0"}
        out["latency_buckets"] = [int(x) for x in s[L.C["HW_DNS_LAT0"]:L.C["HW_DNS_LAT0"] + L.C["HW_DNS_LAT_BUCKETS"]]]
        return out

    def close(self) -> None:
        self._stats = self._index = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        for mm in (self._mm, self._index_mm):
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
        self._mm = self._index_mm = None


def copy_maps(old_fds: dict[str, int], new_fds: dict[str, int]) -> int | None:
    """Copy the dynamic set, the learnt names and the proxy's counters of one instance into another's
    (a new build of the datapath), when their layouts agree; returns the set entries copied, or None when
    the layouts differ (nothing copied, the counters neither)."""
    for n in MAPS:
        a, b = bpfsys.map_info(old_fds[n]), bpfsys.map_info(new_fds[n])
        if (a.type, a.key_size, a.value_size) != (b.type, b.key_size, b.value_size):
            return None
    copied = 0
    for n in (SET_MAP, NAMES_MAP, NAME_IPS_MAP):
        info = bpfsys.map_info(old_fds[n])
        for kb, vb, cnt in bpfsys.iter_batches(old_fds[n], info.key_size, info.value_size):
            keys, vals = kb.raw[: cnt * info.key_size], vb.raw[: cnt * info.value_size]
            for i in range(cnt):
                try:
                    bpfsys.map_update(new_fds[n], keys[i * info.key_size:(i + 1) * info.key_size],
                                      vals[i * info.value_size:(i + 1) * info.value_size])
                except bpfsys.BpfError:
                    break                       # the new map is full: the rest is learnt again
                copied += n == SET_MAP
    reindex(new_fds)
    n = min(bpfsys.map_info(old_fds[STATS_MAP]).max_entries, L.C["HW_DNS_STATS"])   # an older build: fewer
    raw = bpfsys.array_slots(old_fds[STATS_MAP], 0, n, 8)
    for i in range(n):
        bpfsys.map_update(new_fds[STATS_MAP], i.to_bytes(4, "little"), raw[8 * i:8 * i + 8])
    return copied


def reindex(map_fds: dict[str, int], pin_dir: str | None = None) -> int:
    """FqdnMaps.rebuild_index on an instance's maps, under the writers' lock of `pin_dir` (None: a new
    instance no other writer can reach yet); returns the entries indexed."""
    fm = FqdnMaps(map_fds, pin_dir)
    try:
        return fm.rebuild_index()
    finally:
        fm.close()


def record_counters(fds: dict[str, int]) -> dict[str, int]:
    """The proxy's decision-record counters as the collector folds them (collector/kernel.py kernel_loss
    "dns"): emitted, budget, write_error. {} for an older build's shorter array."""
    if bpfsys.map_info(fds[STATS_MAP]).max_entries <= L.C["HW_DNS_RECORDS_WRITTEN"]:
        return {}
    n = L.C["HW_DNS_RECORDS_WRITTEN"] + 1
    raw = bpfsys.array_slots(fds[STATS_MAP], 0, n, 8)
    v = [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(n)]
    return {"emitted": v[L.C["HW_DNS_RECORDS_WRITTEN"]], "budget": v[L.C["HW_DNS_RECORDS_SUPPRESSED"]],
            "write_error": v[L.C["HW_DNS_RECORDS_UNWRITTEN"]]}
