"""The loaded datapath: programs and maps, pinned under a bpffs directory, and the policy swap.

Lifecycle: `Datapath.load()` compiles bpf/hostwall.bpf.c with BCC and loads the three programs;
`pin()` pins every map and program under `<pin_dir>/{maps,progs}`; `Datapath.open(pin_dir)` adopts a
pinned instance from another process (apply, status, a restarted enforcer) without recompiling.

Swap: the policy arrays are mmap'ed; `install()` waits one RCU grace period (so no packet still reads
the standby half), writes the compiled policy into it, then flips hw_config.gen with one map update.
The flip is the switch: every packet reads gen once, so it sees wholly the old or wholly the new policy.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import conntrack, dos_sources, layout as L
from ._internal import bpfsys
from .compiler import CompiledPolicy

PROGRAMS = {"xdp_judge": "xdp", "xdp_ingress": "xdp", "tc_ingress": "sched_cls", "tc_egress": "sched_cls"}

# map name -> (value dtype name, entries per generation or None when not double-buffered)
POLICY_MAPS = {
    "hw_policy": ("hw_policy_hdr", 1),
    "hw_rules": ("hw_rule", L.MAX_RULES),
    "hw_peer_cls": ("hw_class", L.PEER_CLASSES_MAX),
    "hw_l4_cls": ("hw_class", L.L4_CLASSES_MAX),
    "hw_top4": ("hw_top", L.TOP_SIZE),
    "hw_top6": ("hw_top", L.TOP_SIZE),
    "hw_iv4": ("hw_iv4", L.V4_INTERVALS_MAX),
    "hw_iv6": ("hw_iv6", L.V6_INTERVALS_MAX),
    "hw_l4": ("hw_l4_elem", L.L4_ELEMS),
    "hw_dos_profiles": ("hw_dos_profile", L.C["HW_DOS_PROFILES_MAX"]),
    "hw_dos_ifs": ("hw_dos_if", L.C["HW_DOS_IF_SLOTS"]),
}
OTHER_MAPS = ("hw_config", "hw_collect", "hw_stats", "hw_rule_stats", "hw_port_stats", "hw_ct4", "hw_ct6", "hw_ct_stats",
              "hw_events",
              "hw_ev_stats", "hw_ev_budget", "hw_drops0", "hw_drops1", "hw_drop_overflow", "hw_jump",
              "hw_pkt_scratch", "hw_dos_src", "hw_dos_banned", "hw_dos_global", "hw_dos_stats", "hw_dos_src_stats", "hw_manual_ban4",
              "hw_manual_ban6")
ALL_MAPS = tuple(POLICY_MAPS) + OTHER_MAPS


def build_hash() -> str:
    """Identity of the datapath code: a pinned instance is adopted only if it runs the same build."""
    h = hashlib.sha256()
    for p in (L.HEADER, L.BPF_SOURCE):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


_KNOWN_HZ = (100, 250, 300, 1000)     # CONFIG_HZ choices (x86 and most arches)


def calibrate_clock(probe_fd: int, span_s: float = 0.1, timeout_s: float = 2.0) -> tuple[int, int]:
    """(tick_ns, base_ns) such that jiffies * tick_ns + base_ns follows CLOCK_MONOTONIC at tick
    resolution, never ahead of it (1-2 ticks behind, like the kernel's coarse clock).

    The datapath reads time as scaled jiffies because the verifier inlines bpf_jiffies64 (one load)
    where clock helpers cost 20-35 ns a packet. Probes over ≥ span_s and ≥ 20 ticks give the tick rate;
    jiffies may lag a tick at either end (a busy machine), so the estimate is snapped to the nearest
    CONFIG_HZ choice when within 10 % of one; tick_ns is the kernel's TICK_NSEC for that HZ. Jiffies
    never lead the clock, so every probe's ktime - jiffies * tick bounds the offset from above; the
    smallest, less one tick, is at or below it. base_ns is stored modulo 2^64. Cost: ≈ span_s."""
    def probe() -> tuple[int, int, int]:     # (jiffies, coarse ns, ktime ns), read together
        return tuple(np.frombuffer(bpfsys.prog_test_run(probe_fd, bytes(64)).data_out[:24], dtype="<u8").tolist())
    samples = [probe()]
    start = time.monotonic()
    while samples[-1][0] - samples[0][0] < 20 or time.monotonic() - start < span_s:
        if time.monotonic() - start > timeout_s:
            raise RuntimeError("clock calibration: jiffies did not advance (is the kernel tick running?)")
        time.sleep(0.002)
        samples.append(probe())
    return clock_fit(samples)


def clock_fit(samples: list[tuple[int, int, int]]) -> tuple[int, int]:
    """calibrate_clock's arithmetic on (jiffies, coarse ns, ktime ns) probes, first and last ≥ 20 ticks apart."""
    (j0, c0, _), (j1, c1, _) = samples[0], samples[-1]
    measured = 1e9 * (j1 - j0) / (c1 - c0)
    known = min(_KNOWN_HZ, key=lambda hz: abs(hz - measured))
    hz = known if abs(known - measured) <= 0.1 * known else round(measured)
    tick = (1_000_000_000 + hz // 2) // hz
    return tick, (min(k - j * tick for j, _, k in samples) - tick) % (1 << 64)


def pressure_row(entries: int, capacity: int, **extra) -> dict:
    """One row of map pressure (`status`, metrics): fill and capacity, plus what the table counts."""
    return {"entries": entries, "capacity": capacity, "percent": round(100.0 * entries / capacity, 2), **extra}


@dataclass(frozen=True)
class SwapTiming:
    barrier_s: float     # wait for packets still reading the standby half (one RCU grace period)
    write_s: float       # fill the standby half
    switch_s: float      # the generation flip: the moment the new policy takes effect
    old_gen: int
    new_gen: int


class Datapath:
    """Open programs and maps of one instance (fds owned by this object)."""

    def __init__(self, prog_fds: dict[str, int], map_fds: dict[str, int], bpf=None):
        self.prog_fds = prog_fds
        self.map_fds = map_fds
        self._bpf = bpf                   # keeps BCC's module alive when we loaded it ourselves
        self._views: dict[str, np.ndarray] = {}
        self._mmaps = []
        self._barrier: bpfsys.RcuBarrier | None = None
        self.ncpus = bpfsys.possible_cpus()

    # ---- loading and pinning -------------------------------------------------------------------
    @classmethod
    def load(cls) -> "Datapath":
        """Compile with BCC and load (≈1-3 s, CPU bound). Raises RuntimeError with the verifier's log."""
        from bcc import BPF, lib  # imported here: control commands never need the compiler

        bpf = BPF(src_file=str(L.BPF_SOURCE).encode(),
                  cflags=[f"-I{L.HEADER.parent}", "-Wno-unused-function", "-Wno-compare-distinct-pointer-types"])
        progs = {}
        for name, kind in PROGRAMS.items():
            ptype = BPF.XDP if kind == "xdp" else BPF.SCHED_CLS
            try:
                progs[name] = bpf.load_func(name.encode(), ptype).fd
            except Exception as e:
                start = lib.bpf_function_start(bpf.module, name.encode())
                size = lib.bpf_function_size(bpf.module, name.encode())
                _, log = bpfsys.prog_load_verbose(ptype, ctypes.string_at(start, size), name)
                raise RuntimeError(f"loading {name} failed: {e}\n{log[-3000:]}") from None
        maps = {name: bpf[name.encode()].map_fd for name in ALL_MAPS}
        # xdp_ingress tail-calls xdp_judge; a pinned prog array keeps this entry across restarts
        bpfsys.map_update(maps["hw_jump"], b"\0" * 4, progs["xdp_judge"].to_bytes(4, "little"))
        dp = cls(progs, maps, bpf)
        tick_ns, base_ns = calibrate_clock(bpf.load_func(b"clock_probe", BPF.XDP).fd)
        dp.set_config(tick_ns=tick_ns, tick_base_ns=base_ns, table_seed=secrets.randbits(64))
        dp.init_collect_defaults()
        return dp

    @classmethod
    def open(cls, pin_dir: str | os.PathLike) -> "Datapath":
        """Adopt a pinned instance. Raises FileNotFoundError if nothing is pinned there."""
        d = Path(pin_dir)
        progs = {n: bpfsys.obj_get(str(d / "progs" / n)) for n in PROGRAMS}
        maps = {n: bpfsys.obj_get(str(d / "maps" / n)) for n in ALL_MAPS}
        return cls(progs, maps)

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

    def attach(self, ifname: str, xdp_mode: str = "auto", netns: str | None = None) -> str:
        """Attach XDP ingress and TC ingress/egress on one interface; returns the XDP mode that took.

        Sets hw_config.xdp_ingress: from now on TC ingress leaves the judging of ingress packets to
        XDP (it judges only packets XDP marks as deferred), so no packet is judged twice."""
        from . import attach
        mode = attach.attach_xdp(ifname, self.prog_fds["xdp_ingress"], xdp_mode, netns)
        attach.attach_tc(ifname, self.prog_fds["tc_ingress"], self.prog_fds["tc_egress"], netns)
        self.set_config(xdp_ingress=1)
        return mode

    @staticmethod
    def detach(ifname: str, netns: str | None = None) -> None:
        from . import attach
        attach.detach_xdp(ifname, netns)
        attach.detach_tc(ifname, netns)

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
        """Write the enforcer's knobs (hw_config: gen, ncpus, test_now_ns). The enforcer is this map's
        only writer, so read-modify-write is safe. `gen` is changed only by install()."""
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
        col["agg_prefix_v4"], col["agg_prefix_v6"] = 24, 64
        bpfsys.map_update(self.map_fds["hw_collect"], b"\0" * 4, col.tobytes())

    def active_gen(self) -> int:
        raw = bpfsys.map_lookup(self.map_fds["hw_config"], b"\0" * 4, L.DTYPES["hw_config"].itemsize)
        return int(np.frombuffer(raw, dtype=L.DTYPES["hw_config"])["gen"][0]) & 1

    def active_header(self) -> np.void:
        return self.view("hw_policy")[self.active_gen()]

    def install(self, cp: CompiledPolicy) -> SwapTiming:
        """Write `cp` into the standby generation and switch to it atomically."""
        if self._barrier is None:
            self._barrier = bpfsys.RcuBarrier()
        old = self.active_gen()
        new = old ^ 1
        t0 = time.perf_counter()
        self._barrier.wait()             # a packet that read `new` before the last flip has finished
        t1 = time.perf_counter()
        parts = {"hw_policy": cp.hdr, "hw_rules": cp.rules, "hw_peer_cls": cp.peer_cls, "hw_l4_cls": cp.l4_cls,
                 "hw_top4": cp.top4, "hw_top6": cp.top6, "hw_iv4": cp.iv4, "hw_iv6": cp.iv6, "hw_l4": cp.l4,
                 "hw_dos_profiles": cp.dos_profiles, "hw_dos_ifs": cp.dos_ifs}
        for name, arr in parts.items():
            per_gen = POLICY_MAPS[name][1]
            v = self.view(name)
            v[new * per_gen: new * per_gen + len(arr)] = arr
        t2 = time.perf_counter()
        self.set_config(gen=new)           # the switch: one map update
        t3 = time.perf_counter()
        return SwapTiming(barrier_s=t1 - t0, write_s=t2 - t1, switch_s=t3 - t2, old_gen=old, new_gen=new)

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

    def rule_stats(self) -> np.ndarray:
        return self._percpu_array("hw_rule_stats", "hw_counter", L.MAX_RULE_SLOTS)

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

    # hash map -> (key dtype, value dtype, per-CPU); the conntrack and DoS source tables are counted in place
    PRESSURE_MAPS = {"hw_dos_banned": ("hw_dos_key", "hw_dos_ban", False),
                     "hw_drops0": ("hw_drop_key", "hw_drop_val", True), "hw_drops1": ("hw_drop_key", "hw_drop_val", True)}

    def map_pressure(self) -> dict[str, dict]:
        """Fill of the conntrack and DoS source tables and the hash maps (entries / capacity, %). The
        tables are read in place (mmap) and evict when a bucket is full (counted: evicted); the hash
        maps are counted in batches, O(entries / 8192) syscalls, and refuse new keys when full (counted
        where the datapath uses them)."""
        out = {}
        # a full bucket evicts its least recently used entry (for conntrack the datapath reports its flow
        # end); claim_lost: entries left untracked because another CPU took the slot at that instant
        cts = self.ct_stats()
        for fam, n in conntrack.live_count(self.map_fds).items():
            out[conntrack.MAPS[fam]] = pressure_row(n, L.CT_MAX, evicted=cts[fam]["evicted"],
                                                    claim_lost=cts[fam]["claim_lost"])
        with dos_sources.table(self.map_fds[dos_sources.MAP]) as t:
            n = len(t.live())
        ds = self.dos_src_stats()
        out[dos_sources.MAP] = pressure_row(n, dos_sources.SLOTS, evicted=ds["evicted"], claim_lost=ds["claim_lost"])
        for name, (kdt, vdt, percpu) in self.PRESSURE_MAPS.items():
            fd = self.map_fds[name]
            vbytes = (L.DTYPES[vdt].itemsize + 7) // 8 * 8 * (self.ncpus if percpu else 1)
            out[name] = pressure_row(bpfsys.count_entries(fd, L.DTYPES[kdt].itemsize, vbytes),
                                     bpfsys.map_info(fd).max_entries)
        return out

    def clear_conntrack(self) -> None:
        """Forget every tracked connection (tests, benchmarks); no flow ends are reported."""
        for t in conntrack.tables(self.map_fds):
            with t:
                t.clear()
