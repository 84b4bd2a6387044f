"""The collector's view of one pinned enforcer instance: ring buffer, drop and flow aggregation,
conntrack (collector/ct_scan.py), loss counters, the SYN proxy's state. Pure bpf(2) syscalls (enforcer/_internal/bpfsys.py), no BCC, no compiler.

Every layout comes from enforcer.layout.DTYPES (the NumPy twins of bpf/hostwall.h); nothing here
restates a kernel struct. Costs are per call and stated on each method; all methods block (a few
syscalls, one RCU grace period for the drop drain), so the pipeline runs them in a worker thread
(ctypes releases the GIL during the syscalls).

Clocks (docs/datapath.md "Clock"): the datapath stamps events and a connection's first and last
packet (hw_ct_entry.created_ns, end_ns) with its precise clock (bpf_ktime_get_ns), and ages entries
(last_ns) and drop aggregates with its tick clock; both are CLOCK_MONOTONIC. `hw_config.test_now_ns`,
when non-zero, replaces both (tests), and `now_ns()` follows it so conntrack timeouts agree.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hostwall.bpf import bpfsys, conntrack, flow_agg, retired, syn_proxy
from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock
from hostwall.bpf.ringbuf import RingBuffer
from hostwall.bpf.state import boot_id

from .ct_scan import CT_ENTRY_DT, POLICY_HDR_DT, ConntrackScans, CtFamilyScan, CtScan, ct_timeout_ns

__all__ = ["CT_ENTRY_DT", "ConntrackScans", "CtFamilyScan", "CtScan", "DropDrain", "KernelSource",
           "KernelSourceError", "ct_timeout_ns"]

# The collector's knobs (agg_gen, event_budget, aggregation prefixes) live in hw_collect, whose only
# writer is the collector; hw_config (policy generation, test clock) belongs to the enforcer.
KNOBS = "hw_collect"
MAPS = ("hw_config", KNOBS, "hw_stats", "hw_events", "hw_ev_stats", "hw_drops0", "hw_drops1", "hw_drop_overflow",
        "hw_drop_srcs", "hw_ct4", "hw_ct6", "hw_policy", "hw_flows0", "hw_flows1", "hw_flow_overflow", "hw_flow_stats",
        "hw_syn_ports", "hw_syn_state", "hw_port_stats")
ENOENT = 2
BATCH_CHUNK = 8192

CFG_DT = L.DTYPES["hw_config"]
KNOBS_DT = L.DTYPES[KNOBS]
COUNTER_DT = L.DTYPES["hw_counter"]
DROP_KEY_DT = L.DTYPES["hw_drop_key"]
DROP_VAL_DT = L.DTYPES["hw_drop_val"]
DROP_SRC_DT = L.DTYPES["hw_drop_src"]
DROP_SRC_SLOTS = L.C["HW_DROP_SRC_SLOTS"]
_DROP_SRC_KEY_BYTES = 32                      # hw_drop_src.k + pad: what the datapath hashes and compares
EV_TYPES = L.C["HW_EV_TYPES"]
EV_OUTCOMES = L.C["HW_EV_OUTCOMES"]
OVERFLOW_SLOTS_PER_GEN = L.VERDICTS * L.REASONS

_S = 1_000_000_000


class KernelSourceError(RuntimeError):
    """The pin dir does not hold a (complete, compatible) hostwall instance."""


@dataclass
class DropDrain:
    """One exported drop-aggregation interval [t0_ns, t1_ns] (monotonic ns, the datapath's clock).

    keys/vals: hw_drop_key/hw_drop_val arrays summed over CPUs (first_ns = min over CPUs that saw a
    packet, last_ns = max). overflow: {(verdict, reason): (packets, bytes)} that did not fit the map.
    Per (verdict, reason), vals packets + overflow packets = the drop counters' increase over the
    interval (exactly; see drain_drops). sources: the interval's individual peers (hw_drop_src, one
    per distinct key, summed over CPUs; the top talkers of the summaries). `flows`: the flow
    aggregation of the same interval (the same generation flip; hostwall.bpf.flow_agg), None from
    sources that have none."""
    keys: np.ndarray
    vals: np.ndarray
    overflow: dict[tuple[int, int], tuple[int, int]]
    t0_ns: int
    t1_ns: int
    barrier_s: float
    gen: int = 0                # the aggregation generation read (its map is cleared by clear_drops)
    sources: np.ndarray = field(default_factory=lambda: np.zeros(0, DROP_SRC_DT))
    flows: flow_agg.FlowDrain | None = None

    @property
    def packets(self) -> int:
        return int(self.vals["packets"].sum())

    @property
    def overflow_packets(self) -> int:
        return sum(p for p, _ in self.overflow.values())

    def packets_by(self) -> np.ndarray:
        """[verdict, reason] packets, summaries + overflow (the exactness check's left side)."""
        out = np.zeros((L.VERDICTS, L.REASONS), dtype=np.int64)
        np.add.at(out, (self.keys["verdict"].astype(np.intp), self.keys["reason"].astype(np.intp)),
                  self.vals["packets"].astype(np.int64))
        for (v, r), (p, _) in self.overflow.items():
            out[v, r] += p
        return out


# ---- batch syscalls -----------------------------------------------------------------------------

def percpu_stride(value_size: int) -> int:
    return (value_size + 7) & ~7


map_batch = bpfsys.map_batch      # re-exported: callers here and in tests use kernel.map_batch


def sum_percpu(raw: bytes, n: int, dtype: np.dtype, ncpus: int) -> np.ndarray:
    """(n × ncpus) per-CPU values → n values: counters summed; *first_ns min over CPUs that saw a
    packet; *last_ns max. Cost: O(n × ncpus) vectorised."""
    stride = percpu_stride(dtype.itemsize)
    if stride != dtype.itemsize:
        padded = np.dtype({"names": dtype.names, "formats": [dtype.fields[f][0] for f in dtype.names],
                           "offsets": [dtype.fields[f][1] for f in dtype.names], "itemsize": stride})
    else:
        padded = dtype
    per = np.frombuffer(raw, dtype=padded, count=n * ncpus).reshape(n, ncpus)
    out = np.zeros(n, dtype=dtype)
    seen = per["packets"] > 0 if "packets" in dtype.names else np.ones(per.shape, bool)
    for f in dtype.names:
        col = per[f]
        if f.endswith("first_ns"):
            out[f] = np.where(seen, col, np.iinfo(col.dtype).max).min(axis=1) * seen.any(axis=1)
        elif f.endswith("last_ns"):
            out[f] = col.max(axis=1)
        else:
            out[f] = col.sum(axis=1)
    return out


# ---- the source ---------------------------------------------------------------------------------

class KernelSource(ConntrackScans):
    """Opened maps of one pinned instance. Not thread-safe: use from one thread at a time."""

    def __init__(self, pin_dir: str | os.PathLike):
        self.pin_dir = Path(pin_dir)
        self.fds: dict[str, int] = {}
        self._ct: dict[int, conntrack.CtTable] = {}     # mmap'ed conntrack tables, mapped on first scan
        missing = [n for n in MAPS if not (self.pin_dir / "maps" / n).exists()]
        if missing:
            what = "no hostwall instance is pinned there" if len(missing) == len(MAPS) else \
                f"missing maps {', '.join(missing)} (the enforcer runs an older datapath build?)"
            raise KernelSourceError(f"{self.pin_dir}: {what}; start `hostwall-enforcer run` first "
                                    "or pass --pin-dir")
        try:
            for n in MAPS:
                self.fds[n] = bpfsys.obj_get(str(self.pin_dir / "maps" / n))
        except OSError as e:
            self.close()
            raise KernelSourceError(f"{self.pin_dir}: cannot open pinned maps: {e}") from None
        self.ncpus = bpfsys.possible_cpus()
        self._check_layouts()
        self._barrier = bpfsys.RcuBarrier()
        self._last_flip_ns: int | None = None
        self._last_scan_ns: int | None = None
        self._claims: dict[int, set[tuple[int, int]]] = {4: set(), 6: set()}   # (slot, created_ns) not freed yet

    def _check_layouts(self) -> None:
        want = {"hw_config": CFG_DT.itemsize, KNOBS: KNOBS_DT.itemsize, "hw_drops0": DROP_VAL_DT.itemsize,
                "hw_drops1": DROP_VAL_DT.itemsize, "hw_flows0": flow_agg.VAL_DT.itemsize,
                "hw_policy": POLICY_HDR_DT.itemsize, "hw_ct4": conntrack.SLOT_DT[4].itemsize,
                "hw_ct6": conntrack.SLOT_DT[6].itemsize,
                "hw_ev_stats": COUNTER_DT.itemsize, "hw_drop_overflow": COUNTER_DT.itemsize}
        for name, size in want.items():
            got = bpfsys.map_info(self.fds[name]).value_size
            if got != size:
                raise KernelSourceError(f"{self.pin_dir}: map {name} has {got}-byte values, this collector "
                                        f"expects {size} (datapath and collector builds differ)")

    def reader_lock(self, pin_dir: str | os.PathLike):
        """Hold this instance's shared reader lock (bpf/retired.py reader_lock: no discard of it while held;
        the caller closes the returned file). Raises KernelSourceError when it is no longer pinned, at the
        pin dir or among its retired instances, once the lock is held: a discard took it meanwhile and
        noted what it held as lost, so reading it would deliver those records too."""
        ring = bpfsys.map_info(self.fds["hw_events"]).id
        f = retired.reader_lock(ring)
        if ring not in {retired.ring_id(p) for p in (self.pin_dir, pin_dir, *retired.listing(pin_dir))}:
            f.close()
            raise KernelSourceError(f"{self.pin_dir}: unpinned (discarded) while the collector started")
        return f

    def close(self) -> None:
        for t in self._ct.values():
            t.close()
        self._ct = {}
        if getattr(self, "_barrier", None):
            self._barrier.close()
            self._barrier = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> KernelSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- knobs -------------------------------------------------------------------------------------
    def knobs(self) -> np.void:
        """The collector's knobs (hw_collect[0]); one syscall."""
        return self._read1(KNOBS, KNOBS_DT)

    def _read1(self, name: str, dt: np.dtype) -> np.void:
        raw = bpfsys.map_lookup(self.fds[name], b"\0" * 4, dt.itemsize)
        return np.frombuffer(raw, dtype=dt)[0].copy()

    def set_knobs(self, **fields: int) -> None:
        """Write some knob fields, keeping the others. Read-modify-write (two syscalls) is safe
        because the collector is the map's only writer (one collector per instance)."""
        val = np.array([self.knobs()], dtype=KNOBS_DT)
        for k, v in fields.items():
            val[0][k] = v
        bpfsys.map_update(self.fds[KNOBS], b"\0" * 4, val.tobytes())

    def set_event_budget(self, events_per_s: int, source_share: int | None = None) -> None:
        """The ring's flow-event budget (events/s) and, unless None, one source's share of it
        (hw_collect.source_share; docs/collector.md "Flows under a flood")."""
        share = {} if source_share is None else {"source_share": int(source_share)}
        self.set_knobs(event_budget=int(events_per_s), **share)

    def set_drop_prefixes(self, v4: int, v6: int) -> None:
        """Source prefix lengths of drop aggregation keys (keys carry their prefix_len, so a change
        mid-interval keeps the summaries exact)."""
        self.set_knobs(agg_prefix_v4=int(v4), agg_prefix_v6=int(v6))

    def now_ns(self) -> int:
        """The datapath's clock: hw_config.test_now_ns when set, else CLOCK_MONOTONIC."""
        t = int(self._read1("hw_config", CFG_DT)["test_now_ns"])
        return t if t else time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    @staticmethod
    def monotonic_to_wall() -> int:
        """CLOCK_REALTIME - CLOCK_MONOTONIC in ns (hostwall.bpf.clock.Clock.calibrate, ±~1 µs)."""
        return Clock.calibrate().offset_ns

    def identity(self) -> dict:
        """What tells this kernel instance apart across collector restarts: the boot, and the ids of the
        ring buffer and event-counter maps (new ids: the datapath was reloaded, its ring is a new one)."""
        return {"boot_id": boot_id(), "ring_map_id": bpfsys.map_info(self.fds["hw_events"]).id,
                "ev_stats_map_id": bpfsys.map_info(self.fds["hw_ev_stats"]).id,
                "drops_map_ids": [bpfsys.map_info(self.fds[f"hw_drops{g}"]).id for g in (0, 1)]}

    def agg_gen(self) -> int:
        """The drop aggregation generation the datapath writes now."""
        return int(self.knobs()["agg_gen"]) & 1

    # ---- ring buffer -------------------------------------------------------------------------------
    def ring(self) -> RingBuffer:
        """A new consumer of hw_events (owns its own fd and mappings)."""
        return RingBuffer(os.dup(self.fds["hw_events"]))

    # ---- counters ----------------------------------------------------------------------------------
    def _percpu_array(self, name: str, dtype: np.dtype) -> np.ndarray:
        fd = self.fds[name]
        _, vals, got = map_batch(fd, 4, percpu_stride(dtype.itemsize) * self.ncpus)
        return sum_percpu(vals, got, dtype, self.ncpus)

    def hw_stats(self) -> np.ndarray:
        """hw_counter per [hook, verdict, reason] summed over CPUs, shape (HOOKS, VERDICTS, REASONS).
        Cost: one batch syscall."""
        return self._percpu_array("hw_stats", COUNTER_DT).reshape(L.HOOKS, L.VERDICTS, L.REASONS)

    def drop_counters(self) -> np.ndarray:
        """Dropped + would-drop packets per [verdict, reason], summed over hooks (the exactness
        reference for drop summaries)."""
        c = self.hw_stats()["packets"].sum(axis=0)
        c[L.C["HW_V_ALLOW"]] = 0
        return c

    def kernel_loss(self) -> dict[str, dict[str, int]]:
        """Cumulative event outcomes per event type: {type: {emitted, budget, ringbuf_full}}, and the DNS
        proxy's decision records, {"dns": {emitted (written to its log), budget (over its rate limit),
        write_error}} (pinned hw_dns_stats, enforcer/dnsrecords.py; when the instance has that map).
        Cost: one batch syscall, and one for the DNS counters."""
        c = self._percpu_array("hw_ev_stats", COUNTER_DT)["packets"].reshape(EV_TYPES, EV_OUTCOMES)
        out = {}
        for t, tname in sorted(L.EVENT_TYPE_NAMES.items()):
            out[tname] = {L.EV_OUTCOME_NAMES[o]: int(c[t, o]) for o in range(EV_OUTCOMES)}
        dns = self._dns_stats()
        if dns is not None:
            out["dns"] = {"emitted": int(dns[L.C["HW_DNS_RECORDS_WRITTEN"]]),
                          "budget": int(dns[L.C["HW_DNS_RECORDS_SUPPRESSED"]]),
                          "write_error": int(dns[L.C["HW_DNS_RECORDS_UNWRITTEN"]])}
        return out

    def _dns_stats(self) -> np.ndarray | None:
        """hw_dns_stats up to the record counters, or None for an instance without them (no FQDN maps, or
        an older build's shorter array)."""
        if "hw_dns_stats" not in self.fds:
            try:
                fd = bpfsys.obj_get(str(self.pin_dir / "maps" / "hw_dns_stats"))
            except OSError:
                return None
            if bpfsys.map_info(fd).max_entries <= L.C["HW_DNS_RECORDS_WRITTEN"]:
                os.close(fd)
                return None
            self.fds["hw_dns_stats"] = fd
        n = L.C["HW_DNS_RECORDS_WRITTEN"] + 1
        return np.frombuffer(bpfsys.array_slots(self.fds["hw_dns_stats"], 0, n, 8), dtype=np.uint64)

    # ---- the SYN proxy and the per-port SYN rate (docs/dos.md) ---------------------------------------
    def port_syns(self) -> np.ndarray:
        """Ingress TCP SYNs per destination port since load (hw_port_stats.syns summed over CPUs), 65536
        counters. Cost: one batch syscall over ~2 MB per CPU."""
        return self._percpu_array("hw_port_stats", L.DTYPES["hw_port_counter"])["syns"]

    def syn_proxy(self, now_ns: int) -> syn_proxy.ProxyState:
        """What the `auto` SYN proxies answer for at `now_ns` (the datapath's clock; mmap, no syscall)."""
        return syn_proxy.read(self.fds, now_ns)

    # ---- drop aggregation --------------------------------------------------------------------------
    def drain_drops(self) -> DropDrain:
        """Export one drop-aggregation interval and clear it at once: read_drops() + clear_drops()."""
        d = self.read_drops()
        self.clear_drops(d)
        return d

    def read_drops(self) -> DropDrain:
        """Flip to the other aggregation generation and read the old one without clearing it (see
        docs/collector.md). The collector clears it (clear_drops) only once the summaries made from it are
        durable, so a crash in between leaves the interval in the kernel for the next collector, which
        reads it again (read_drops_of). Until cleared, the next flip must not happen.

        Flip hw_collect.agg_gen, wait one RCU grace period (no program still writes the old
        generation), then read every key of the old per-CPU hash, its overflow slots and its peer slots,
        and the flow aggregation of the same generation (hostwall.bpf.flow_agg). Cost: 1 flip + grace
        period (~1-20 ms) + ceil(keys / 8192) batch syscalls + 1 for the overflow slots + 1 for the
        peers + the flow aggregation's (read_drops_of). Exact: no packet is counted twice or lost
        between intervals."""
        old = self.agg_gen()
        self.set_knobs(agg_gen=old ^ 1)
        t1 = self.now_ns()
        b0 = time.perf_counter()
        self._barrier.wait()
        barrier_s = time.perf_counter() - b0
        d = self.read_drops_of(old)
        d.barrier_s = barrier_s
        d.t1_ns = t1
        t0 = self._last_flip_ns
        if t0 is None:
            seen = d.vals["first_ns"][d.vals["first_ns"] > 0]
            t0 = int(seen.min()) if len(seen) else t1
        d.t0_ns = t0
        self._last_flip_ns = t1
        return d

    def _source_slots(self, gen: int) -> tuple[np.ndarray, np.ndarray]:
        """Generation `gen`'s peer slots (hw_drop_srcs) per CPU, shape (slots, ncpus), and the indexes of
        the slots some CPU used. Cost: one LOOKUP_BATCH of HW_DROP_SRC_SLOTS × ncpus values."""
        raw = bpfsys.array_slots(self.fds["hw_drop_srcs"], gen * DROP_SRC_SLOTS, DROP_SRC_SLOTS,
                                 percpu_stride(DROP_SRC_DT.itemsize) * self.ncpus)
        per = np.frombuffer(raw, dtype=DROP_SRC_DT, count=DROP_SRC_SLOTS * self.ncpus).reshape(DROP_SRC_SLOTS,
                                                                                              self.ncpus)
        return per, np.flatnonzero((per["packets"] > 0).any(axis=1))

    def _read_sources(self, gen: int) -> np.ndarray:
        """Read generation `gen`'s peer slots (hw_drop_srcs) without zeroing them (clear_drops does, with
        the interval); one entry per distinct key, packets and bytes summed over CPUs (a key may hold
        the same slot on several CPUs). Cost: one LOOKUP_BATCH of HW_DROP_SRC_SLOTS × ncpus values
        (~200 KB per CPU), O(slots × ncpus) vectorised."""
        per, used = self._source_slots(gen)
        if len(used) == 0:
            return np.zeros(0, DROP_SRC_DT)
        flat = per[used].reshape(-1)
        flat = flat[flat["packets"] > 0]
        keyb = np.ascontiguousarray(flat).view(np.uint8).reshape(len(flat), -1)[:, :_DROP_SRC_KEY_BYTES]
        uniq, first_of, inv = np.unique(np.ascontiguousarray(keyb).view(f"V{_DROP_SRC_KEY_BYTES}").ravel(),
                                        return_index=True, return_inverse=True)
        out = flat[first_of].copy()
        out["packets"], out["bytes"] = 0, 0
        np.add.at(out["packets"], inv, flat["packets"])
        np.add.at(out["bytes"], inv, flat["bytes"])
        return out

    def _clear_sources(self, gen: int) -> None:
        """Zero generation `gen`'s used peer slots. Cost: one LOOKUP_BATCH to find them, one UPDATE_BATCH."""
        _, used = self._source_slots(gen)
        fd, stride, first = self.fds["hw_drop_srcs"], percpu_stride(DROP_SRC_DT.itemsize), gen * DROP_SRC_SLOTS
        if len(used):
            idx = (used + first).astype(np.uint32)
            bpfsys.map_update_batch(fd, idx.tobytes(), bytes(stride * self.ncpus * len(used)), len(used))

    def read_drops_of(self, gen: int) -> DropDrain:
        """Read generation `gen`'s map and overflow slots as they are (no flip, no clear): the interval
        an earlier collector read but never cleared, when the datapath writes the other generation.
        Times are left 0 (the caller has them from its checkpoint)."""
        ksz = DROP_KEY_DT.itemsize
        raw_k, raw_v, n = map_batch(self.fds[f"hw_drops{gen}"], ksz, percpu_stride(DROP_VAL_DT.itemsize) * self.ncpus)
        keys = np.frombuffer(raw_k, dtype=DROP_KEY_DT, count=n).copy()
        vals = sum_percpu(raw_v, n, DROP_VAL_DT, self.ncpus)
        return DropDrain(keys, vals, self._read_overflow(gen), 0, 0, 0.0, gen, self._read_sources(gen),
                         flow_agg.read(self.fds, gen, self.ncpus))

    def clear_drops(self, d: DropDrain) -> None:
        """Delete the keys `d` read from its generation's map and zero the overflow slots it read. Nothing
        writes that generation until the next flip, so this removes exactly what `d` holds; its peer slots
        (hw_drop_srcs) are zeroed with it, and the flow aggregation it read (flow_agg.clear). Cost:
        ceil(keys / 8192) batch syscalls + 1, + 2 with peers, + the flow aggregation's."""
        if len(d.keys):
            bpfsys.map_delete_batch(self.fds[f"hw_drops{d.gen}"], np.ascontiguousarray(d.keys).tobytes(),
                                    DROP_KEY_DT.itemsize)
        if d.overflow:
            fd = self.fds["hw_drop_overflow"]
            stride = percpu_stride(COUNTER_DT.itemsize) * self.ncpus
            idx = np.array([d.gen * OVERFLOW_SLOTS_PER_GEN + v * L.REASONS + r for v, r in d.overflow], np.uint32)
            bpfsys.map_update_batch(fd, idx.tobytes(), bytes(stride * len(idx)), len(idx))
        if len(d.sources):
            self._clear_sources(d.gen)
        if d.flows is not None:
            flow_agg.clear(self.fds, d.flows, self.ncpus)

    def _read_overflow(self, gen: int) -> dict[tuple[int, int], tuple[int, int]]:
        """Read hw_drop_overflow[gen][verdict][reason] (1 syscall): the non-zero slots."""
        fd = self.fds["hw_drop_overflow"]
        stride = percpu_stride(COUNTER_DT.itemsize) * self.ncpus
        idx = np.arange(gen * OVERFLOW_SLOTS_PER_GEN, (gen + 1) * OVERFLOW_SLOTS_PER_GEN, dtype=np.uint32)
        c = sum_percpu(self._lookup_slots(fd, idx, stride), len(idx), COUNTER_DT, self.ncpus)
        hit = np.flatnonzero(c["packets"])
        return {tuple(int(x) for x in divmod(int(i), L.REASONS)): (int(c["packets"][i]), int(c["bytes"][i]))
                for i in hit}

    @staticmethod
    def _lookup_slots(fd: int, idx: np.ndarray, stride: int) -> bytes:
        """Values of array slots idx[0]..idx[-1] (contiguous), one LOOKUP_BATCH."""
        return bpfsys.array_slots(fd, int(idx[0]), len(idx), stride)
