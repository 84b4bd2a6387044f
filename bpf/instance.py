"""One pinned hostwall instance from user space: its programs and maps by name, the enforcer's and
the collector's knobs, the per-CPU counters summed, and map pressure.

Pure bpf(2) syscalls (hostwall.bpf.bpfsys), no BCC: any process adopts a pinned instance with
`Instance.open(pin_dir)`. The enforcer's `Datapath` extends it with loading and the policy swap.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from . import bpfsys, conntrack, dos_sources, frag
from . import layout as L
from .names import ALL_MAPS, POLICY_MAPS, PROGRAMS

POLICY_CAPACITY = {"rules": L.MAX_RULES, "peer_classes": L.PEER_CLASSES_MAX, "l4_classes": L.L4_CLASSES_MAX,
                   "v4_intervals": L.V4_INTERVALS_MAX, "v6_intervals": L.V6_INTERVALS_MAX,
                   "xmatch_cells": L.XM_CELLS_MAX}     # 0: no first-match table, the scan (docs/datapath.md)


def pressure_row(entries: int, capacity: int, **extra) -> dict:
    """One row of map pressure (`status`, metrics): fill and capacity, plus what the table counts."""
    return {"entries": entries, "capacity": capacity, "percent": round(100.0 * entries / capacity, 2), **extra}


def policy_pressure(tables: dict) -> dict[str, dict]:
    """Fill of the policy tables of the active generation, as map pressure rows."""
    return {f"policy.{k}": pressure_row(int(tables.get(k, 0)), cap) for k, cap in POLICY_CAPACITY.items()}


class Instance:
    """Open programs and maps of one instance (fds owned by this object)."""

    def __init__(self, prog_fds: dict[str, int], map_fds: dict[str, int], bpf=None):
        self.prog_fds = prog_fds
        self.map_fds = map_fds
        self._bpf = bpf                   # keeps BCC's module alive when we loaded it ourselves
        self._views: dict[str, np.ndarray] = {}
        self._mmaps = []
        self._barrier: bpfsys.RcuBarrier | None = None
        self.ncpus = bpfsys.possible_cpus()

    @classmethod
    def open(cls, pin_dir: str | os.PathLike) -> Instance:
        """Adopt a pinned instance. Raises FileNotFoundError if nothing is pinned there."""
        d = Path(pin_dir)
        progs = {n: bpfsys.obj_get(str(d / "progs" / n)) for n in PROGRAMS}
        maps = {n: bpfsys.obj_get(str(d / "maps" / n)) for n in ALL_MAPS}
        return cls(progs, maps)

    @classmethod
    def open_maps(cls, pin_dir: str | os.PathLike, names: tuple[str, ...]) -> Instance | None:
        """Only the named maps of a pinned instance, or None if one is missing: what an instance of
        another build (with other maps and programs) still shares with this one, e.g. conntrack."""
        d = Path(pin_dir) / "maps"
        if not all((d / n).exists() for n in names):
            return None
        return cls({}, {n: bpfsys.obj_get(str(d / n)) for n in names})

    @staticmethod
    def is_pinned(pin_dir: str | os.PathLike) -> bool:
        d = Path(pin_dir)
        return all((d / "progs" / n).exists() for n in PROGRAMS) and all((d / "maps" / n).exists() for n in ALL_MAPS)

    def pin(self, pin_dir: str | os.PathLike) -> None:
        d = Path(pin_dir)
        (d / "maps").mkdir(parents=True, exist_ok=True)
        (d / "progs").mkdir(parents=True, exist_ok=True)
        for n, fd in self.map_fds.items():
            if not (d / "maps" / n).exists():
                bpfsys.obj_pin(fd, str(d / "maps" / n))
        for n, fd in self.prog_fds.items():
            if not (d / "progs" / n).exists():
                bpfsys.obj_pin(fd, str(d / "progs" / n))

    @staticmethod
    def unpin(pin_dir: str | os.PathLike) -> None:
        d = Path(pin_dir)
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)   # unlink on bpffs drops the pin reference

    def close(self) -> None:
        self._views.clear()
        for m in self._mmaps:
            try:
                m.close()
            except BufferError:
                pass
        self._mmaps.clear()
        if self._barrier:
            self._barrier.close()
            self._barrier = None
        if self._bpf is None:
            for fd in list(self.prog_fds.values()) + list(self.map_fds.values()):
                os.close(fd)
        else:
            self._bpf.cleanup()
            self._bpf = None
        self.prog_fds, self.map_fds = {}, {}

    # ---- policy generations ----------------------------------------------------------------------
    def view(self, name: str) -> np.ndarray:
        """Structured NumPy view over an mmap'ed policy array (both generations)."""
        if name not in self._views:
            dtname, per_gen = POLICY_MAPS[name]
            dt = L.DTYPES[dtname]
            m = bpfsys.mmap_array(self.map_fds[name])
            self._mmaps.append(m)
            stride = (dt.itemsize + 7) & ~7
            assert stride == dt.itemsize or per_gen == 1, f"{name}: padded stride unsupported"
            self._views[name] = np.frombuffer(m, dtype=dt, count=2 * per_gen)
        return self._views[name]

    def config(self) -> np.void:
        raw = bpfsys.map_lookup(self.map_fds["hw_config"], b"\0" * 4, L.DTYPES["hw_config"].itemsize)
        return np.frombuffer(raw, dtype=L.DTYPES["hw_config"])[0].copy()

    def set_config(self, **fields) -> None:
        """Write the enforcer's knobs (hw_config: gen, ncpus, test_now_ns, detached_ns). A read-modify-write
        of the whole struct: the enforcer is this map's only writer, and its writers across processes (an
        apply's gen flip, a ban's count, the detach note) hold state.policy_writer. `gen` is changed only by
        install()."""
        cfg = np.zeros(1, dtype=L.DTYPES["hw_config"])
        cfg[0] = self.config()
        cfg["ncpus"] = self.ncpus
        for k, val in fields.items():
            cfg[k] = val
        bpfsys.map_update(self.map_fds["hw_config"], b"\0" * 4, cfg.tobytes())

    def init_collect_defaults(self) -> None:
        """Fresh instance: default event budget and drop-aggregation prefixes in hw_collect. The
        collector owns this map afterwards (it may change the budget or the prefixes)."""
        col = np.zeros(1, dtype=L.DTYPES["hw_collect"])
        col["event_budget"] = L.C["HW_EVENT_BUDGET"]
        col["source_share"] = L.C["HW_EVENT_BUDGET"] // 10     # flow events/s per source (docs/collector.md)
        col["agg_prefix_v4"], col["agg_prefix_v6"] = 24, 64
        bpfsys.map_update(self.map_fds["hw_collect"], b"\0" * 4, col.tobytes())

    def active_gen(self) -> int:
        raw = bpfsys.map_lookup(self.map_fds["hw_config"], b"\0" * 4, L.DTYPES["hw_config"].itemsize)
        return int(np.frombuffer(raw, dtype=L.DTYPES["hw_config"])["gen"][0]) & 1

    def active_header(self) -> np.void:
        return self.view("hw_policy")[self.active_gen()]

    # ---- counters ------------------------------------------------------------------------------
    def _percpu_array(self, name: str, dtname: str, n: int) -> np.ndarray:
        """Sum of a per-CPU array over CPUs (one syscall per key; use for small arrays)."""
        dt = L.DTYPES[dtname]
        stride = (dt.itemsize + 7) & ~7
        fd = self.map_fds[name]
        vals = bpfsys.array_slots(fd, 0, n, stride * self.ncpus)
        per_cpu = np.frombuffer(vals, dtype=dt).reshape(n, self.ncpus)
        out = np.zeros(n, dtype=dt)
        for f in dt.names:
            out[f] = per_cpu[f].sum(axis=1)
        return out

    def stats(self) -> np.ndarray:
        """hw_counter per (hook, verdict, reason), summed over CPUs."""
        return self._percpu_array("hw_stats", "hw_counter", L.HOOKS * L.VERDICTS * L.REASONS)

    def rule_stats(self, n: int = L.MAX_RULE_SLOTS) -> np.ndarray:
        """Per rule counter slot (the first n slots), summed over CPUs."""
        return self._percpu_array("hw_rule_stats", "hw_counter", n)

    def port_stats(self) -> np.ndarray:
        return self._percpu_array("hw_port_stats", "hw_port_counter", 65536)

    def dos_stats(self) -> np.ndarray:
        """DoS drops per (profile, reason), summed over CPUs."""
        return self._percpu_array("hw_dos_stats", "hw_counter", L.C["HW_DOS_PROFILES_MAX"] * L.REASONS)

    def dos_src_stats(self) -> dict[str, int]:
        """DoS sources the guards started tracking since load, and what those inserts evicted."""
        pk = self._percpu_array("hw_dos_src_stats", "hw_counter", L.C["HW_DSS_STATS"])["packets"]
        return {name: int(pk[i]) for i, name in dos_sources.STAT_NAMES.items()}

    def ct_stats(self) -> dict[int, dict[str, int]]:
        """Per family: conntrack inserts since load and what they displaced (hw_ct_stats, summed over CPUs)."""
        n = L.C["HW_CT_STATS"]
        pk = self._percpu_array("hw_ct_stats", "hw_counter", 2 * n)["packets"]
        return {fam: {name: int(pk[j * n + i]) for i, name in L.CT_STAT_NAMES.items()} for j, fam in enumerate((4, 6))}

    def frag_stats(self) -> dict[int, dict[str, int]]:
        """Per family: fragment-table inserts (passed first fragments) and what they evicted, claims lost,
        later fragments that followed their first fragment and those that found none (hw_frag_stats)."""
        n = L.C["HW_FRAG_STATS"]
        pk = self._percpu_array(frag.STATS_MAP, "hw_counter", 2 * n)["packets"]
        return {fam: {name: int(pk[j * n + i]) for i, name in L.FRAG_STAT_NAMES.items()} for j, fam in enumerate((4, 6))}

    def fqdn_stats(self) -> dict[str, int] | None:
        """Egress first packets since load that probed the dynamic set, by outcome: hit, expired, miss (one
        per packet). The counters head hw_tc_pkt's per-CPU value (hostwall.h "hw_fqdn_stats"). None for an
        instance of another build whose hw_tc_pkt is laid out otherwise (HW_PKT_MEM_BYTES): its bytes there
        are packet memory, not these counts."""
        fd = self.map_fds["hw_tc_pkt"]
        size = bpfsys.map_info(fd).value_size
        if size != L.C["HW_PKT_MEM_BYTES"]:
            return None
        stride = (size + 7) & ~7
        dt, n = L.DTYPES["hw_counter"], L.C["HW_FQDN_STATS"]
        raw = bpfsys.array_slots(fd, 0, 1, stride * self.ncpus)
        pk = sum(np.frombuffer(raw, dtype=dt, count=n, offset=c * stride)["packets"].astype(np.uint64)
                 for c in range(self.ncpus))
        return {name: int(pk[i]) for i, name in L.FQDN_STAT_NAMES.items()}

    # hash map -> (key dtype, value dtype, per-CPU); the conntrack and DoS source tables are counted in place
    PRESSURE_MAPS = {"hw_dos_banned": ("hw_dos_key", "hw_dos_ban", False),
                     "hw_drops0": ("hw_drop_key", "hw_drop_val", True), "hw_drops1": ("hw_drop_key", "hw_drop_val", True),
                     "hw_fqdn": ("hw_fqdn_key", "hw_fqdn_val", False), "hw_dns_names": (8, "hw_dns_name", False),
                     "hw_dns_name_ips": ("hw_dns_name_ip", "hw_fqdn_val", False)}

    def map_pressure(self) -> dict[str, dict]:
        """Fill of the conntrack, fragment and DoS source tables and the hash maps (entries / capacity, %).
        The tables are read in place (mmap) and evict when a bucket is full (counted: evicted); the hash
        maps are counted in batches, O(entries / 8192) syscalls, and refuse new keys when full (counted
        where the datapath uses them)."""
        out = {}
        # a full bucket evicts its least recently used entry, an unconfirmed one before any established
        # one (the datapath reports the flow's end); claim_lost: entries left untracked because another
        # CPU took the slot at that instant
        cts = self.ct_stats()
        for fam, n in conntrack.live_count(self.map_fds).items():
            c = cts[fam]
            out[conntrack.MAPS[fam]] = pressure_row(
                n, L.CT_MAX, evicted=c["evicted_unconfirmed"] + c["evicted_established"],
                evicted_unconfirmed=c["evicted_unconfirmed"], evicted_established=c["evicted_established"],
                claim_lost=c["claim_lost"])
        # fragment tables: entries still serving later fragments; a full bucket evicts the oldest (counted)
        fs = self.frag_stats()
        test_now = int(self.config()["test_now_ns"])
        for fam, n in frag.live_count(self.map_fds, test_now or None).items():
            out[frag.MAPS[fam]] = pressure_row(n, frag.SLOTS, evicted=fs[fam]["evicted"],
                                               claim_lost=fs[fam]["claim_lost"])
        with dos_sources.table(self.map_fds[dos_sources.MAP]) as t:
            n = len(t.live())
        ds = self.dos_src_stats()
        out[dos_sources.MAP] = pressure_row(n, dos_sources.SLOTS, evicted=ds["evicted"], claim_lost=ds["claim_lost"])
        for name, (kdt, vdt, percpu) in self.PRESSURE_MAPS.items():
            fd = self.map_fds[name]
            vbytes = (L.DTYPES[vdt].itemsize + 7) // 8 * 8 * (self.ncpus if percpu else 1)
            ksize = kdt if isinstance(kdt, int) else L.DTYPES[kdt].itemsize
            out[name] = pressure_row(bpfsys.count_entries(fd, ksize, vbytes), bpfsys.map_info(fd).max_entries)
        return out

    def map_memory(self) -> dict:
        """Kernel memory of the instance's maps as the kernel charges it (bpfsys.map_memlock), per map and
        in total: the price of every table, so a faster structure's cost is visible (docs/datapath.md
        "Limits"). Cost: one procfs read per map."""
        maps = {name: bpfsys.map_memlock(fd) for name, fd in sorted(self.map_fds.items())}
        return {"maps": maps, "total_bytes": sum(maps.values())}

    def clear_conntrack(self) -> None:
        """Forget every tracked connection and every noted fragmented datagram (tests, benchmarks);
        no flow ends are reported."""
        for t in conntrack.tables(self.map_fds):
            with t:
                t.clear()
        frag.clear(self.map_fds)
