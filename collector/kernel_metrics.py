"""Metrics the dashboards need beyond collector/metrics.py: the enforcer's own counters per rule, port,
hook and DoS profile, map pressure, interface attachment, and what the collector's records say (drops
per interface, top source prefixes, anomalies). docs/metrics.md lists every metric.

Two sources, one catalogue (collector/metric_spec.py SPEC) of `collector.metric_family.Family` objects (so they can ride both outputs of
SelfMetrics, the Prometheus endpoint and the OTLP push, exactly like its own families):

    KernelCollector   reads the pinned maps through hostwall.bpf.instance.Instance.open(pin_dir) and the
                      instance state ($HOSTWALL_STATE_DIR), at most every `refresh_s` (default 5 s:
                      scrapes in between get the cached families), and counts the hash maps' entries
                      at most every `pressure_refresh_s` (default 30 s).
    RecordMetrics     (collector/record_metrics.py) fed by the pipeline with every batch of records (`observe(records)`): drop
                      summaries (exact: summaries + overflow = the kernel's drop counters), flow starts,
                      anomaly open / update / close.

Wiring (collector/metrics.py and pipeline.py own it; both outputs then carry these families):
    SelfMetrics.__init__:  self.kernel_metrics = KernelCollector(pin_dir, refresh_s=min(5.0, options.interval_s))
                           if self._want_kernel else None
    SelfMetrics.families(): families_from_status(...) + self.kernel_metrics.families()   (when not None)
    Pipeline._fan_out (or _emit right before it, after enrichment and the anomaly extras):
                           self.metrics.kernel_metrics.observe(records)                   (when present)
Standalone: register(registry, pin_dir) adds a KernelCollector to any prometheus_client registry.

Names follow Prometheus conventions: `hostwall_` prefix, base units (bytes, seconds), counters end in
`_total` (the Family name is without it, as prometheus_client wants), units in the OTel form so the OTel
Collector's prometheus exporter maps them back to the same names (never "1" on a gauge: it would add
`_ratio`). Label sets are bounded: hook/verdict/reason/map (bpf/hostwall.h), rule (the active policy),
port (the first `top_ports` destination ports seen + "other"), profile (the policy's DoS profiles),
interface (attached interfaces), source / source_prefix (the current top `top_sources`), anomaly key
(at most `max_anomalies` open anomalies).

Cost per kernel read (one scrape every >= refresh_s): ~40 obj_get + 5 batched array reads (the 64k-slot
port counters are one syscall, ~1.5 MB per CPU), one netlink round trip per attached interface (~10 ms in
another netns, on a short-lived thread: no fork). Key counting is BPF_MAP_LOOKUP_BATCH of 8192 entries per
syscall: a full 1 M-entry DoS map takes ~0.3 s (2 s with one GET_NEXT_KEY per key), hence its own, slower
refresh. observe(): O(records), ~1-1.5 µs per record on the loop thread (a full drop-aggregation interval
of 65536 new source prefixes ~0.1 s).
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from . import attack_metrics
from .dns_metrics import dns_families
from .metric_family import Family
from .metric_spec import HOOK_DIRECTION, SPEC, to_prometheus
from .metric_spec import spec_family as _family
from .record_metrics import DEFAULT_TOP_PORTS, PortTopN, RecordMetrics, TopTalkers

log = logging.getLogger("hostwall.collector.kernel_metrics")

__all__ = ["KernelCollector", "RecordMetrics", "PortTopN", "TopTalkers", "register", "to_prometheus", "SPEC",
           "PRESSURE_MAPS"]

# the programs the enforcer attaches to every interface (no TC ingress behind XDP: docs/datapath.md "Hooks")
ATTACHED_HOOKS = ("xdp", "tc_egress")
DEFAULT_REFRESH_S = 5.0
DEFAULT_PRESSURE_REFRESH_S = 30.0
BATCH_CHUNK = 8192

# Kernel tables whose fill is reported (Datapath.map_pressure).
PRESSURE_MAPS = ("hw_ct4", "hw_ct6", "hw_frag4", "hw_frag6", "hw_dos_src", "hw_dos_banned", "hw_drops0", "hw_drops1")


# ---- kernel -------------------------------------------------------------------------------------------

def count_entries(fd: int, key_size: int, value_bytes: int, chunk: int = BATCH_CHUNK) -> int:
    """Entries of a hash map: one batched walk (enforcer._internal.bpfsys.count_entries)."""
    from hostwall.bpf import bpfsys
    return bpfsys.count_entries(fd, key_size, value_bytes, chunk=chunk)


class KernelCollector:
    """prometheus_client custom collector (and Family source) over one enforcer instance's pinned maps.

    Thread-safe: scrapes and OTLP pushes may call collect()/families() at once; one read at a time, the
    others get its result. A missing instance (no pins, no state) is not an error: the families then
    say so (hostwall_enforcer_pinned 0, interfaces seen before reported detached)."""

    def __init__(self, pin_dir: str | os.PathLike, *, records: RecordMetrics | None = None,
                 refresh_s: float = DEFAULT_REFRESH_S, pressure_refresh_s: float = DEFAULT_PRESSURE_REFRESH_S,
                 top_ports: int = DEFAULT_TOP_PORTS, links: bool = True, clock: Callable[[], float] = time.monotonic):
        self.pin_dir = str(pin_dir)
        self.refresh_s = refresh_s
        self.pressure_refresh_s = pressure_refresh_s
        self.links = links
        self.clock = clock
        self.records = records if records is not None else RecordMetrics(profile_of=self.profile_of)
        self.ports = PortTopN(top_ports)
        self._lock = threading.Lock()
        self._cache: list[Family] = []
        self._cache_at = -math.inf
        self._pressure: dict[str, dict] = {}
        self._pressure_at = -math.inf
        self._pressure_ids: dict[str, int] = {}
        self._seen_ifaces: dict[tuple[str, str], dict] = {}     # (name, netns) -> last info
        self._profiles: dict[str, str] = {}
        self._profiles_at = -math.inf
        self._profiles_lock = threading.Lock()
        self.reads = 0
        self.read_errors = 0
        self.last_read_s = 0.0

    # ---- public -----------------------------------------------------------------------------------
    def observe(self, records: Iterable[dict]) -> None:
        """Feed a batch of canonical records (the pipeline, before the fan-out)."""
        self.records.observe(records)

    def families(self) -> list[Family]:
        """Kernel families (cached for refresh_s) + record families (live)."""
        with self._lock:
            now = self.clock()
            if now - self._cache_at >= self.refresh_s:
                t0 = time.perf_counter()
                try:
                    self._cache = self._read(now)
                except Exception as e:                 # noqa: BLE001 — a scrape must never fail on this
                    self.read_errors += 1
                    if self.read_errors in (1, 10, 100) or self.read_errors % 1000 == 0:
                        log.warning("kernel metrics: reading %s failed: %s: %s", self.pin_dir, type(e).__name__, e)
                self.reads += 1
                self.last_read_s = time.perf_counter() - t0
                self._cache_at = now
            own = _family("hostwall_kernel_metrics_read_errors")
            own.add((), self.read_errors)
            dur = _family("hostwall_kernel_metrics_read_duration_seconds")
            dur.add((), round(self.last_read_s, 6))
            fams = self._cache + [own, dur]
        return fams + self.records.families()

    def collect(self) -> Iterator[Any]:
        yield from to_prometheus(self.families())

    def describe(self) -> list:
        return []                                   # families vary with the instance: no fixed description

    def profile_of(self, interface: str) -> str:
        """DoS profile bound to `interface` by the active policy ("" if none); state re-read every refresh_s."""
        now = self.clock()
        if now - self._profiles_at >= self.refresh_s:
            with self._profiles_lock:
                if now - self._profiles_at >= self.refresh_s:
                    st = self._state()
                    if st is not None:
                        self._profiles = {i.name: i.dos_profile or "" for i in st.interfaces}
                    self._profiles_at = now
        return self._profiles.get(interface, "")

    # ---- reading ----------------------------------------------------------------------------------
    def _state(self):
        from hostwall.bpf.state import InstanceState
        try:
            return InstanceState.load(self.pin_dir)
        except (OSError, ValueError, TypeError):
            return None

    def _read(self, now: float) -> list[Family]:
        from hostwall.bpf.instance import Instance
        st = self._state()
        try:
            dp = Instance.open(self.pin_dir)
        except OSError:
            dp = None
        fams: list[Family] = []
        f = _family("hostwall_enforcer_pinned")
        f.add((), 1 if dp is not None and st is not None else 0)
        fams.append(f)
        f = _family("hostwall_enforcer_process_up")
        f.add((), 1 if st is not None and st.pid and os.path.exists(f"/proc/{st.pid}") else 0)
        fams.append(f)
        if st is not None:
            self._profiles = {i.name: i.dos_profile or "" for i in st.interfaces}
            self._profiles_at = now
        fams += self._interfaces(st)
        if dp is not None:
            try:
                fams += self._datapath(dp, st, now)
            finally:
                dp.close()
        return fams

    def _interfaces(self, st) -> list[Family]:
        info = _family("hostwall_interface_info")
        att = _family("hostwall_interface_attached")
        pk = _family("hostwall_interface_packets")
        by = _family("hostwall_interface_bytes")
        current = {(i.name, i.netns or ""): i for i in (st.interfaces if st is not None else [])}
        for key, i in current.items():
            self._seen_ifaces[key] = {"xdp_mode": i.xdp_mode, "dos_profile": i.dos_profile or ""}
        for key in sorted(self._seen_ifaces):
            name, netns = key
            seen = self._seen_ifaces[key]
            link = _link(name, netns or None) if self.links and key in current else None
            if key in current:
                info.add(key + (seen["xdp_mode"], seen["dos_profile"]), 1)
            for hook in ATTACHED_HOOKS:
                att.add(key + (hook,), 1 if link and link["attached"][hook] else 0)
            if link and link["stats"]:
                s = link["stats"]
                pk.add(key + ("receive",), s["rx_packets"])
                pk.add(key + ("transmit",), s["tx_packets"])
                by.add(key + ("receive",), s["rx_bytes"])
                by.add(key + ("transmit",), s["tx_bytes"])
        return [info, att, pk, by]

    def _datapath(self, dp, st, now: float) -> list[Family]:
        from hostwall.bpf import bpfsys
        from hostwall.bpf import layout as L
        fams: list[Family] = []
        hdr = dp.active_header()
        revs = st.revisions if st is not None else {}
        revision = revs.get(str(int(hdr["revision_id"])), st.revision if st is not None else "")
        f = _family("hostwall_policy_info")
        f.add((st.policy_name if st is not None else "", revision), 1)
        fams.append(f)
        f = _family("hostwall_policy_rules")
        f.add((), int(hdr["nrules"]))
        fams.append(f)
        f = _family("hostwall_policy_audit_mode")
        f.add((), int(bool(hdr["audit"])))
        fams.append(f)
        if st is not None and st.applied_at:
            f = _family("hostwall_policy_applied_timestamp_seconds")
            f.add((), float(st.applied_at))
            fams.append(f)

        # verdict counters: (hook, verdict, reason)
        stats = dp.stats()
        pk = _family("hostwall_datapath_packets")
        by = _family("hostwall_datapath_bytes")
        for hook, hname in L.HOOK_NAMES.items():
            for v, vname in L.VERDICT_NAMES.items():
                for r, rname in L.REASON_NAMES.items():
                    c = stats[L.stats_index(hook, v, r)]
                    if not c["packets"]:
                        continue
                    pk.add((hname, HOOK_DIRECTION[hname], vname, rname), int(c["packets"]))
                    by.add((hname, HOOK_DIRECTION[hname], vname, rname), int(c["bytes"]))
        fams += [pk, by]

        # rules of the active policy, by name (slots are stable per name across swaps)
        rs = dp.rule_stats()
        rp = _family("hostwall_rule_packets")
        rb = _family("hostwall_rule_bytes")
        if st is not None:
            for name, slot in sorted(st.slots.items(), key=lambda kv: st.rule_meta.get(kv[0], {}).get("order", 0)):
                if 0 <= slot < len(rs):
                    meta = st.rule_meta.get(name, {})
                    lv = (name, meta.get("direction", ""), meta.get("action", ""))
                    rp.add(lv, int(rs[slot]["packets"]))
                    rb.add(lv, int(rs[slot]["bytes"]))
        fams += [rp, rb]

        # destination ports (tcp/udp), bounded
        ps = dp.port_stats()
        counts = np.stack([ps["allowed"], ps["dropped"], ps["would_drop"], ps["syns"]], axis=1)
        mid = bpfsys.map_info(dp.map_fds["hw_port_stats"]).id
        f, fs = _family("hostwall_port_packets"), _family("hostwall_port_syn_packets")
        top = self.ports.update(counts, mid)
        for port in sorted(top, key=lambda p: (p == "other", int(p) if p != "other" else 0)):
            for i, vname in enumerate(("allow", "drop", "would_drop")):
                f.add((port, vname), int(top[port][i]))
            fs.add((port,), int(top[port][3]))
        fams += [f, fs]

        # DoS drops per profile
        names = tuple(st.dos_profiles) if st is not None else ()
        ds = dp.dos_stats()
        dp_ = _family("hostwall_dos_profile_dropped_packets")
        db = _family("hostwall_dos_profile_dropped_bytes")
        for p, pname in enumerate(names):
            for r, rname in L.DROP_REASONS.items():
                c = ds[p * L.REASONS + r]
                if c["packets"]:
                    dp_.add((pname, rname), int(c["packets"]))
                    db.add((pname, rname), int(c["bytes"]))
        fams += [dp_, db]

        # map pressure: hash maps (counted, slower refresh) + the active policy tables (from the state)
        if now - self._pressure_at >= self.pressure_refresh_s or self._pressure_ids != self._map_ids(dp):
            self._pressure = self._count_maps(dp)
            self._pressure_ids = self._map_ids(dp)
            self._pressure_at = now
        ent = _family("hostwall_map_entries")
        cap = _family("hostwall_map_capacity")
        evicted = _family("hostwall_map_evicted")
        rows = dict(self._pressure)
        if st is not None:
            from hostwall.bpf.instance import policy_pressure
            rows.update(policy_pressure(st.tables))
        for name in sorted(rows):
            ent.add((name,), rows[name]["entries"])
            cap.add((name,), rows[name]["capacity"])
            if "evicted" in rows[name]:
                evicted.add((name,), rows[name]["evicted"])
        fams += [ent, cap, evicted] + attack_metrics.families(dp, rows, names, _family)
        fams += dns_families(dp, _family)
        return fams

    @staticmethod
    def _map_ids(dp) -> dict[str, int]:
        from hostwall.bpf import bpfsys
        return {n: bpfsys.map_info(dp.map_fds[n]).id for n in ("hw_ct4", "hw_dos_src")}

    @staticmethod
    def _count_maps(dp) -> dict[str, dict]:
        return dp.map_pressure()


def _in_netns(netns: str | None, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
    """fn() with the network namespace `netns` (a name under /run/netns, or a path).

    Runs on a short-lived thread that setns(2)-es itself into the namespace: sockets it creates live
    there. No fork: pyroute2's own netns mode forks a helper, and a forked child of an asyncio process
    shares the loop's signal wake-up pipe, so the helper's termination reached the collector as SIGTERM."""
    if not netns:
        return fn()
    from .enrich.sockets import _NsSwitch, netns_path
    path = netns_path(netns)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _NsSwitch.setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:                 # noqa: BLE001 — handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="hw-netns", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"netlink query in netns {netns} took more than {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _link(name: str, netns: str | None) -> dict | None:
    """Attachment (XDP, our TC filters) and link counters of one interface; None if it is gone."""
    from pyroute2 import IPRoute

    from hostwall.bpf import links

    def query() -> dict:
        with IPRoute() as ipr:
            idx = links.ifindex(ipr, name)
            link = ipr.get_links(idx)[0]
            xdp = link.get_attr("IFLA_XDP")
            xdp_on = bool(xdp is not None and (xdp.get_attr("IFLA_XDP_PROG_ID") or 0))
            stats = link.get_attr("IFLA_STATS64") or {}
            return {"attached": {"xdp": xdp_on,
                                 "tc_egress": bool(links.our_filters(ipr, idx, links.TC_EGRESS_PARENT))},
                    "stats": {k: int(stats.get(k, 0)) for k in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}
                    if stats else {}}
    try:
        return _in_netns(netns, query)
    except Exception:                               # noqa: BLE001 — interface or netns gone: not attached
        return None


def register(registry, pin_dir: str | os.PathLike, **kwargs) -> KernelCollector:
    """Create a KernelCollector for `pin_dir`, register it with a prometheus_client registry, return it
    (feed it records with .observe(records))."""
    kc = KernelCollector(pin_dir, **kwargs)
    registry.register(kc)
    return kc
