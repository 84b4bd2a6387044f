"""The flow aggregation from user space (bpf/report.h; docs/collector.md, "Flows under a flood").

Flows the datapath does not report one event each (a source over its event share, no room in the
budget or the ring, a connection that ended unconfirmed while its start waited) and the SYN proxy's
cookie SYN-ACKs are counted per (peer prefix, destination port, protocol, direction, kind) in the
per-CPU hashes hw_flows0/hw_flows1, one per aggregation generation (hw_collect.agg_gen, the same flip
as the drop aggregation), plus hw_flow_overflow[gen][kind] for keys that did not fit. Every count also
goes to hw_flow_stats[kind], so per kind: drained summaries + overflow = the counters' increase.

`drain(fds, gen, ncpus)` reads and deletes the generation the caller has just flipped away from (after
an RCU grace period, so no program still writes it) and zeroes its overflow slots.
Cost: ceil(keys / 8192) batch syscalls + 2 for the overflow slots.
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


def drain(map_fds: dict[str, int], gen: int, ncpus: int) -> FlowDrain:
    raw_k, raw_v, n = bpfsys.map_batch(map_fds[f"hw_flows{gen & 1}"], KEY_DT.itemsize, stride() * ncpus,
                                       delete=True)
    keys = np.frombuffer(raw_k, dtype=KEY_DT, count=n).copy()
    vals = sum_cpus(raw_v, n, ncpus)
    fd = map_fds["hw_flow_overflow"]
    first = (gen & 1) * NKINDS
    ov = sum_cpus(bpfsys.array_slots(fd, first, NKINDS, stride() * ncpus), NKINDS, ncpus)
    hit = np.flatnonzero(ov["flows"] | ov["ended"] | ov["packets"])
    if len(hit):
        idx = (first + hit).astype(np.uint32)
        bpfsys.map_update_batch(fd, idx.tobytes(), bytes(stride() * ncpus * len(hit)), len(hit))
    return FlowDrain(keys, vals, {int(i): ov[i].copy() for i in hit})


def stats(map_fds: dict[str, int], ncpus: int) -> dict[str, dict[str, int]]:
    """Everything aggregated since load, per kind name (hw_flow_stats summed over CPUs)."""
    c = sum_cpus(bpfsys.array_slots(map_fds["hw_flow_stats"], 0, NKINDS, stride() * ncpus), NKINDS, ncpus)
    return {name: {f: int(c[k][f]) for f in COUNTS} for k, name in KINDS.items()}
