"""Kernel metrics of tracking under attack (docs/metrics.md): conntrack evictions by kind, the SYN
proxy's work and which ports it answers for, and the flows counted in aggregate.

Read by collector/kernel_metrics.py's KernelCollector together with its other kernel families (the
same refresh, the same open instance); the families are catalogued in collector/metric_spec.py's SPEC.
Label sets are bounded: map (hw_ct4, hw_ct6) × kind (2); outcome (bpf/hostwall.h hw_syn_stat); scope × key: the ports an `auto` proxy
answers for now (at most MAX_ACTIVE_PORTS) and the profiles under conntrack pressure (≤ 16);
kind (hw_agg_kind) × count (flows, ended). Cost: two small per-CPU array reads and one vectorised pass
over the 65536 per-port SYN slots (mmap, ~3 MB).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from hostwall.bpf import conntrack, flow_agg, syn_proxy

from .metric_family import Family

MAX_ACTIVE_PORTS = 50


def datapath_now_ns(dp) -> int:
    """The datapath's clock as user space reads it (hw_config.test_now_ns when a test set it)."""
    t = int(dp.config()["test_now_ns"])
    return t or time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def families(dp, pressure_rows: dict[str, dict], profiles: tuple[str, ...],
             family: Callable[[str], Family]) -> list[Family]:
    ev = family("hostwall_conntrack_evicted")
    for fam in (4, 6):
        row = pressure_rows.get(conntrack.MAPS[fam], {})
        for kind in ("unconfirmed", "established"):
            if f"evicted_{kind}" in row:
                ev.add((conntrack.MAPS[fam], kind), row[f"evicted_{kind}"])
    out = family("hostwall_syn_proxy_outcomes")
    for name, n in syn_proxy.stats(dp.map_fds, dp.ncpus).items():
        out.add((name,), n)
    act = family("hostwall_syn_proxy_active")
    st = syn_proxy.read(dp.map_fds, datapath_now_ns(dp))
    for port in sorted(st.ports)[:MAX_ACTIVE_PORTS]:
        act.add(("port", str(port)), 1)
    for pid in sorted(st.pressure):
        act.add(("pressure", profiles[pid] if pid < len(profiles) else str(pid)), 1)
    agg = family("hostwall_flows_aggregated")
    for kind, c in flow_agg.stats(dp.map_fds, dp.ncpus).items():
        agg.add((kind, "flows"), c["flows"])
        agg.add((kind, "ended"), c["ended"])
    return [ev, out, act, agg]
