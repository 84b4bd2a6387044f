"""The flow aggregation from user space (bpf/report.h; docs/collector.md, "Flows under a flood").

Flows the datapath does not report one event each (a source over its event share, no room in the
budget or the ring, a connection that ended unconfirmed while its start waited) and the SYN proxy's
cookie SYN-ACKs are counted per (peer prefix, destination port, protocol, direction, kind) in the
per-CPU hashes hw_flows0/hw_flows1, one per aggregation generation (hw_collect.agg_gen, the same flip
as the drop aggregation), plus hw_flow_overflow[gen][kind] for keys that did not fit. Every count also
goes to hw_flow_stats[kind], so per kind: drained summaries + overflow = the counters' increase.

`read(fds, gen, ncpus)` reads the generation the caller has flipped away from (after an RCU grace
period, so no program still writes it) without clearing it; `clear(fds, drain, ncpus)` deletes exactly
what was read and zeroes the overflow slots read, once the summaries made from it are durable (the drop
interval's protocol, collector/sources.py); `drain` does both at once.
Cost: ceil(keys / 8192) batch syscalls + 1 for the overflow slots to read; as many + 1 to clear.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bpfsys
from . import layout as L

KEY_DT = L.DTYPES["hw_flow_key"]
VAL_DT = L.DTYPES["hw_flow_val"]
KINDS = L.AGG_KIND_NAMES                     # kind id → name
NKINDS = L.C["HW_AGG_KINDS"]
COUNTS = ("flows", "ended", "packets", "bytes")


def stride() -> int:
    return (VAL_DT.itemsize + 7) & ~7


def sum_cpus(raw: bytes, n: int, ncpus: int) -> np.ndarray:
    """n per-CPU hw_flow_val values → n values: counts summed, first_ns the earliest non-zero, last_ns
    the latest."""
    per = np.frombuffer(raw, dtype=VAL_DT, count=n * ncpus).reshape(n, ncpus)
    out = np.zeros(n, dtype=VAL_DT)
    for f in COUNTS:
        out[f] = per[f].sum(axis=1)
    first = np.where(per["first_ns"] > 0, per["first_ns"], np.iinfo(np.uint64).max).min(axis=1)
    out["first_ns"] = np.where(first == np.iinfo(np.uint64).max, 0, first)
    out["last_ns"] = per["last_ns"].max(axis=1)
    return out


@dataclass
class FlowDrain:
    """One exported interval of the flow aggregation: keys/vals (per-CPU values summed) and what did
    not fit the map, per kind (hw_flow_val totals)."""
    keys: np.ndarray
    vals: np.ndarray
    overflow: dict[int, np.void]
    gen: int = 0                  # the aggregation generation read (clear() deletes from its map)

    @property
    def records(self) -> int:
        """Summary records this drain makes: one per key, one per kind that overflowed."""
        return len(self.keys) + len(self.overflow)

    def totals(self) -> dict[str, dict[str, int]]:
        """Per kind name: flows, ended, packets, bytes (summaries + overflow): the exactness check's left
        side against `stats()`."""
        out = {name: dict.fromkeys(COUNTS, 0) for name in KINDS.values()}
        for k, v in zip(self.keys["kind"].tolist(), self.vals):
            if k in KINDS:
                for f in COUNTS:
                    out[KINDS[k]][f] += int(v[f])
        for k, v in self.overflow.items():
            for f in COUNTS:
                out[KINDS[k]][f] += int(v[f])
        return out


def read(map_fds: dict[str, int], gen: int, ncpus: int) -> FlowDrain:
    """Generation `gen` as it is (no clear)."""
    raw_k, raw_v, n = bpfsys.map_batch(map_fds[f"hw_flows{gen & 1}"], KEY_DT.itemsize, stride() * ncpus)
    keys = np.frombuffer(raw_k, dtype=KEY_DT, count=n).copy()
    vals = sum_cpus(raw_v, n, ncpus)
    first = (gen & 1) * NKINDS
    ov = sum_cpus(bpfsys.array_slots(map_fds["hw_flow_overflow"], first, NKINDS, stride() * ncpus), NKINDS, ncpus)
    hit = np.flatnonzero(ov["flows"] | ov["ended"] | ov["packets"])
    return FlowDrain(keys, vals, {int(i): ov[i].copy() for i in hit}, gen & 1)


def clear(map_fds: dict[str, int], d: FlowDrain, ncpus: int) -> None:
    """Delete the keys `d` read and zero the overflow slots it found used (nothing writes that
    generation until the next flip)."""
    if len(d.keys):
        bpfsys.map_delete_batch(map_fds[f"hw_flows{d.gen}"], np.ascontiguousarray(d.keys).tobytes(), KEY_DT.itemsize)
    if d.overflow:
        idx = np.array([d.gen * NKINDS + k for k in sorted(d.overflow)], np.uint32)
        bpfsys.map_update_batch(map_fds["hw_flow_overflow"], idx.tobytes(), bytes(stride() * ncpus * len(idx)),
                                len(idx))


def drain(map_fds: dict[str, int], gen: int, ncpus: int) -> FlowDrain:
    """read() and clear() at once."""
    d = read(map_fds, gen, ncpus)
    clear(map_fds, d, ncpus)
    return d


def stats(map_fds: dict[str, int], ncpus: int) -> dict[str, dict[str, int]]:
    """Everything aggregated since load, per kind name (hw_flow_stats summed over CPUs)."""
    c = sum_cpus(bpfsys.array_slots(map_fds["hw_flow_stats"], 0, NKINDS, stride() * ncpus), NKINDS, ncpus)
    return {name: {f: int(c[k][f]) for f in COUNTS} for k, name in KINDS.items()}
