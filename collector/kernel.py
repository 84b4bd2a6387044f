"""The collector's view of one pinned enforcer instance: ring buffer, drop aggregation, conntrack,
loss counters. Pure bpf(2) syscalls (enforcer/_internal/bpfsys.py), no BCC, no compiler.

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

from hostwall.bpf import bpfsys, conntrack, flow_agg, syn_proxy
from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock
from hostwall.bpf.ringbuf import RingBuffer

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
CT_ENTRY_DT = L.DTYPES["hw_ct_entry"]
EV_TYPES = L.C["HW_EV_TYPES"]
EV_OUTCOMES = L.C["HW_EV_OUTCOMES"]
OVERFLOW_SLOTS_PER_GEN = L.VERDICTS * L.REASONS
CT_END_EMITTED = L.C["HW_CT_F_END_EMITTED"]   # hw_ct_entry.fin_seen: the datapath already emitted flow_end
REP_EVENTS = L.C["HW_REP_EVENTS"]             # hw_ct_entry.report: reported by events (else in aggregate)
POLICY_HDR_DT = L.DTYPES["hw_policy_hdr"]
CT_CLOSING = L.C["HW_CT_CLOSING"]

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


@dataclass
class CtFamilyScan:
    """Conntrack scan result of one family; keys in hw_ct4_key / hw_ct6_key, entries hw_ct_entry.

    expired_*: entries idle past their timeout, now deleted, that are reported one record each
    (including those whose end was reported already: fin_seen bit 7 or `reported`; the record builder
    decides what they still need).
    update_*: live entries that crossed a multiple of the active timeout since the previous scan
    and saw a packet since the previous multiple (a periodic flow update is due).
    closed_*: connections closed by both FINs whose last packet is older than the close grace
    period, now marked `reported` in the kernel (their flow end record is due; the entry stays until
    its timeout so late packets still pass as part of the connection), reported one record each.
    agg_*: connections reported in aggregate (hw_ct_entry.report is not EVENTS) whose end the datapath
    has not counted: expired ones (deleted) and, the last `agg_closed` of them, ones closed by FINs and
    quiet for the close grace period (marked `reported`): flow summaries of the scan."""
    family: int
    expired_keys: np.ndarray
    expired_entries: np.ndarray
    update_keys: np.ndarray
    update_entries: np.ndarray
    closed_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    closed_entries: np.ndarray = field(default_factory=lambda: np.zeros(0, CT_ENTRY_DT))
    agg_keys: np.ndarray | None = None
    agg_entries: np.ndarray | None = None
    agg_closed: int = 0


@dataclass
class CtScan:
    """Outcome of one scan_conntrack over both families (one CtFamilyScan each)."""
    families: list[CtFamilyScan]
    scanned: int          # entries read
    raced: int            # expired candidates a packet touched between read and delete (kept)
    ended: int            # expired entries whose flow_end event had already been emitted

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

class KernelSource:
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

    def set_event_budget(self, events_per_s: int) -> None:
        self.set_knobs(event_budget=int(events_per_s))

    def set_drop_prefixes(self, v4: int, v6: int) -> None:
        """Source prefix lengths of drop aggregation keys (keys carry their prefix_len, so a change
        mid-interval keeps the summaries exact)."""
        self.set_knobs(agg_prefix_v4=int(v4), agg_prefix_v6=int(v6))

    def now_ns(self) -> int:
        """The datapath's clock: hw_config.test_now_ns when set, else CLOCK_MONOTONIC."""
        t = int(self._read1("hw_config", CFG_DT)["test_now_ns"])
        return t if t else time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    def unconfirmed_ns(self) -> int:
        """Idle timeout of unconfirmed conntrack entries in the active policy (ns; two lookups)."""
        gen = int(self._read1("hw_config", CFG_DT)["gen"]) & 1
        raw = bpfsys.map_lookup(self.fds["hw_policy"], gen.to_bytes(4, "little"), POLICY_HDR_DT.itemsize)
        s = int(np.frombuffer(raw, dtype=POLICY_HDR_DT)[0]["ct_unconfirmed_s"])
        return (s or L.C["HW_CT_TO_UNCONFIRMED"]) * _S

    @staticmethod
    def monotonic_to_wall() -> int:
        """CLOCK_REALTIME - CLOCK_MONOTONIC in ns (hostwall.bpf.clock.Clock.calibrate, ±~1 µs)."""
        return Clock.calibrate().offset_ns

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
        """Cumulative event outcomes per event type: {type: {emitted, budget, ringbuf_full}}.
        Cost: one batch syscall."""
        c = self._percpu_array("hw_ev_stats", COUNTER_DT)["packets"].reshape(EV_TYPES, EV_OUTCOMES)
        out = {}
        for t, tname in sorted(L.EVENT_TYPE_NAMES.items()):
            out[tname] = {L.EV_OUTCOME_NAMES[o]: int(c[t, o]) for o in range(EV_OUTCOMES)}
        return out

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
        """Export one drop-aggregation interval (see docs/collector.md).

        Flip hw_collect.agg_gen, wait one RCU grace period (no program still writes the old
        generation), then read + delete every key of the old per-CPU hash and read + zero its
        overflow slots. Cost: 1 flip + grace period (~1-20 ms) + ceil(keys / 8192) batch syscalls
        + 2 for the overflow slots. Exact: no packet is counted twice or lost between intervals."""
        old = int(self.knobs()["agg_gen"]) & 1
        self.set_knobs(agg_gen=old ^ 1)
        t1 = self.now_ns()
        b0 = time.perf_counter()
        self._barrier.wait()
        barrier_s = time.perf_counter() - b0
        ksz = DROP_KEY_DT.itemsize
        raw_k, raw_v, n = map_batch(self.fds[f"hw_drops{old}"], ksz,
                                    percpu_stride(DROP_VAL_DT.itemsize) * self.ncpus, delete=True)
        keys = np.frombuffer(raw_k, dtype=DROP_KEY_DT, count=n).copy()
        vals = sum_percpu(raw_v, n, DROP_VAL_DT, self.ncpus)
        overflow = self._drain_overflow(old)
        flows = flow_agg.drain(self.fds, old, self.ncpus)
        sources = self._drain_sources(old)
        t0 = self._last_flip_ns
        if t0 is None:
            seen = vals["first_ns"][vals["first_ns"] > 0]
            t0 = int(seen.min()) if len(seen) else t1
        self._last_flip_ns = t1
        return DropDrain(keys, vals, overflow, t0, t1, barrier_s, sources, flows)

    def _drain_sources(self, gen: int) -> np.ndarray:
        """Read and zero the old generation's peer slots (hw_drop_srcs); one entry per distinct key,
        packets and bytes summed over CPUs (a key may hold the same slot on several CPUs). Cost: one
        LOOKUP_BATCH of HW_DROP_SRC_SLOTS × ncpus values (~200 KB per CPU), one UPDATE_BATCH of the used
        slots, O(slots × ncpus) vectorised."""
        fd = self.fds["hw_drop_srcs"]
        stride = percpu_stride(DROP_SRC_DT.itemsize)
        first = gen * DROP_SRC_SLOTS
        raw = bpfsys.array_slots(fd, first, DROP_SRC_SLOTS, stride * self.ncpus)
        per = np.frombuffer(raw, dtype=DROP_SRC_DT, count=DROP_SRC_SLOTS * self.ncpus).reshape(DROP_SRC_SLOTS,
                                                                                              self.ncpus)
        used = np.flatnonzero((per["packets"] > 0).any(axis=1))
        if len(used) == 0:
            return np.zeros(0, DROP_SRC_DT)
        idx = (used + first).astype(np.uint32)
        bpfsys.map_update_batch(fd, idx.tobytes(), bytes(stride * self.ncpus * len(used)), len(used))
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

    def _drain_overflow(self, gen: int) -> dict[tuple[int, int], tuple[int, int]]:
        """Read and zero hw_drop_overflow[gen][verdict][reason] (2 syscalls; 1 more if non-zero)."""
        fd = self.fds["hw_drop_overflow"]
        stride = percpu_stride(COUNTER_DT.itemsize) * self.ncpus
        idx = np.arange(gen * OVERFLOW_SLOTS_PER_GEN, (gen + 1) * OVERFLOW_SLOTS_PER_GEN, dtype=np.uint32)
        c = sum_percpu(self._lookup_slots(fd, idx, stride), len(idx), COUNTER_DT, self.ncpus)
        hit = np.flatnonzero(c["packets"])
        if len(hit):
            bpfsys.map_update_batch(fd, idx[hit].tobytes(), bytes(stride * len(hit)), len(hit))
        return {tuple(int(x) for x in divmod(int(i), L.REASONS)): (int(c["packets"][i]), int(c["bytes"][i]))
                for i in hit}

    @staticmethod
    def _lookup_slots(fd: int, idx: np.ndarray, stride: int) -> bytes:
        """Values of array slots idx[0]..idx[-1] (contiguous), one LOOKUP_BATCH."""
        return bpfsys.array_slots(fd, int(idx[0]), len(idx), stride)

    # ---- conntrack ---------------------------------------------------------------------------------
    def scan_conntrack(self, now_ns: int, active_timeout_ns: int, close_grace_ns: int = 2 * _S) -> CtScan:
        """Free entries idle past their timeout (returned), find long-lived ones due for an
        active-timeout update, and mark connections closed by both FINs and quiet for `close_grace_ns`
        as reported (returned: their end record is due). `now_ns` is on the datapath's clock
        (`now_ns()`).

        The close grace period is conntrack's TIME_WAIT idea applied to reporting: the last ACK after
        the FINs (and a retransmitted FIN) arrives after the close, so a closed connection is reported
        only once it has been quiet that long, with every packet counted. Its entry stays until its
        timeout (late packets still pass as part of it; they are not reported). Marking races with a
        packet as freeing does: a packet between the check and the one-byte store is counted in the
        kernel but not in the record (conntrack.CtTable.mark_reported_if_unchanged).

        Connections reported in aggregate (hw_ct_entry.report: their start went to the flow aggregation,
        or waited and never came) get no record of their own: their expiry or FIN close is returned in
        CtFamilyScan.agg_* for flow summaries (collector/flow_summary.py), and they get no updates. The
        timeout of unconfirmed entries is the active policy's (one map lookup per scan).

        Cost: the tables are read in place (mmap'ed, no syscalls): one vectorised pass over every slot
        (~25-30 MB per family). An expired entry is freed only if its times are unchanged since the
        read (else a packet touched it: counted as raced, kept); conntrack.CtTable.free_if_unchanged
        states the remaining µs window. The datapath itself ignores expired entries (and reports the
        flow of any it displaces), so freeing them changes no verdict. No updates on the first scan
        (there is no previous scan to compare)."""
        fams, scanned, raced, ended = [], 0, 0, 0
        unc_ns = self.unconfirmed_ns()
        for fam in (4, 6):
            f, n, r, e = self._scan_family(fam, now_ns, active_timeout_ns, close_grace_ns, unc_ns)
            fams.append(f)
            scanned, raced, ended = scanned + n, raced + r, ended + e
        self._last_scan_ns = now_ns
        return CtScan(fams, scanned, raced, ended)

    def _table(self, fam: int) -> conntrack.CtTable:
        if fam not in self._ct:
            self._ct[fam] = conntrack.CtTable(self.fds[conntrack.MAPS[fam]], fam)
        return self._ct[fam]

    def _scan_family(self, fam: int, now_ns: int, at_ns: int, grace_ns: int,
                     unc_ns: int) -> tuple[CtFamilyScan, int, int, int]:
        table = self._table(fam)
        idx = table.live()
        snap = table.slots[idx]                     # a copy: the datapath keeps writing the table
        keys, ents = snap["k"], snap["e"]
        n = len(idx)
        last = ents["last_ns"].astype(np.int64)
        created = ents["created_ns"].astype(np.int64)
        expired = (np.int64(now_ns) - last) > ct_timeout_ns(keys["proto"], ents["state"], unc_ns)
        ended = ((ents["fin_seen"] & CT_END_EMITTED) != 0) | (ents["reported"] != 0)
        cand = np.flatnonzero(expired)
        gone = table.free_if_unchanged(idx[cand], ents[cand])
        raced = int((~gone).sum())
        exp_idx = cand[gone]
        quiet = (np.int64(now_ns) - last) > np.int64(grace_ns)
        closing = np.flatnonzero((ents["state"] == CT_CLOSING) & ~ended & ~expired & quiet)
        marked = table.mark_reported_if_unchanged(idx[closing], ents[closing])
        raced += int((~marked).sum())
        cls_idx = closing[marked]
        # connections reported in aggregate (hw_ct_entry.report) end in flow summaries, not records
        exp_agg = (ents["report"][exp_idx] != REP_EVENTS) & ~ended[exp_idx]
        cls_agg = ents["report"][cls_idx] != REP_EVENTS
        agg_idx = np.concatenate([exp_idx[exp_agg], cls_idx[cls_agg]])
        exp_idx, cls_idx = exp_idx[~exp_agg], cls_idx[~cls_agg]
        upd_idx = self._due_updates(created, last, ~expired & ~ended & (ents["report"] == REP_EVENTS), now_ns, at_ns)
        upd_idx = np.setdiff1d(upd_idx, cls_idx)
        scan = CtFamilyScan(fam, keys[exp_idx].copy(), ents[exp_idx].copy(), keys[upd_idx].copy(),
                            ents[upd_idx].copy(), keys[cls_idx].copy(), ents[cls_idx].copy(), keys[agg_idx].copy(),
                            ents[agg_idx].copy(), int(cls_agg.sum()))
        return scan, n, raced, int(ended[exp_idx].sum())

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


def ct_timeout_ns(proto: np.ndarray, state: np.ndarray, unconfirmed_ns: int = L.C["HW_CT_TO_UNCONFIRMED"] * _S
                  ) -> np.ndarray:
    """Idle timeout per entry, as the datapath's ct_expired_u() computes it: unconfirmed entries (NEW,
    SYN_SENT, SYN_RECV) the policy's unconfirmed timeout, the others HW_CT_TO_* seconds by state."""
    C = L.C
    tcp = np.select([state == C["HW_CT_ESTABLISHED"], (state == C["HW_CT_FIN_WAIT"]) | (state == C["HW_CT_CLOSING"])],
                    [C["HW_CT_TO_ESTABLISHED"], C["HW_CT_TO_FIN"]], C["HW_CT_TO_CLOSE"])
    s = np.where(proto == 6, tcp, np.where(proto == 17, C["HW_CT_TO_UDP_REPLIED"], C["HW_CT_TO_ICMP"]))
    unconfirmed = np.isin(state, list(L.UNCONFIRMED_STATES))
    return np.where(unconfirmed, np.int64(unconfirmed_ns), s.astype(np.int64) * _S)
