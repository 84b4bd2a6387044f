"""The per-port SYN signal and the SYN proxy's switches as anomaly records (docs/dos.md; schemas/anomaly.schema.json).

Every tick (about a second) the pipeline reads two kernel facts in its worker thread and hands them to
`SynWatch.tick` on the loop:
  - the cumulative ingress SYNs per destination port (hw_port_stats.syns): the increase of each port is
    fed to the anomaly detector as signal `syns`, dimension destination_port — a SYN flood spread over
    many sources is seen and named by its port, whatever became of its SYNs (answered by cookies, dropped,
    or passed);
  - what the `auto` SYN proxies answer for (hostwall.bpf.syn_proxy.ProxyState): each switch on opens an
    anomaly (signal `syn_proxy`; key the port, or reason `conntrack_pressure` for a profile switched on
    by table pressure) and each switch off closes it. The enforcer writes the matching audit records
    from the same kernel state (enforcer/syn_watch.py); this module never imports the enforcer.

Records have the detector's shape and severity bands (AnomalyDetector._emit). Cost per tick: O(ports
with new SYNs) detector updates; the kernel reads are the caller's (one ~2 MB per-CPU array read, one
mmap pass).
"""
from __future__ import annotations

import hashlib

import numpy as np

from hostwall.bpf.syn_proxy import ProxyState

from .anomaly import AnomalyDetector, _Key

__all__ = ["SynWatch"]


class SynWatch:
    def __init__(self, detector: AnomalyDetector, profiles=lambda: ()):
        self.detector = detector
        self.profiles = profiles                  # () -> profile names by id (instance state), for keys
        self._syns: np.ndarray | None = None
        self._t: float | None = None
        self._rate: dict[int, float] = {}
        self.open: dict[tuple[str, int], _Key] = {}

    @classmethod
    def of(cls, detector, builder) -> SynWatch | None:
        """The pipeline's watch: over `detector` if it is the anomaly detector (a stand-in, or none, has no
        per-port signal: None), with the DoS profile names of `builder`'s instance state for the keys."""
        if not isinstance(detector, AnomalyDetector):
            return None
        return cls(detector, lambda: tuple(getattr(getattr(getattr(builder, "instance", None), "state", None),
                                                   "dos_profiles", ())))

    def _key(self, key: tuple[str, int]) -> _Key:
        scope, k = key
        if scope == "port":
            return _Key("syn_proxy", "destination_port", f"tcp/{k}", {"transport": "tcp", "port": int(k)})
        names = self.profiles()
        return _Key("syn_proxy", "reason", "conntrack_pressure",
                    {"reason": "conntrack_pressure", **({"profile": names[k]} if k < len(names) else {})})

    def tick(self, syns: np.ndarray, state: ProxyState, now: float) -> list[dict]:
        """syns: cumulative SYNs per port now; state: the proxies' switches at the same moment; now: wall
        seconds. Returns anomaly records of switches (the `syns` signal goes into the detector)."""
        cur = np.array(syns, dtype=np.int64)          # a copy: the caller may reuse its array
        if self._syns is not None and self._t is not None and now > self._t:
            delta = cur - self._syns
            if (delta < 0).any():                 # the datapath was reloaded: start over
                delta = np.maximum(delta, 0)
            ports = np.flatnonzero(delta > 0)
            self._rate = {int(p): float(delta[p]) / (now - self._t) for p in ports}
            for p in ports:
                self.detector.observe_count("syns", "destination_port", f"tcp/{int(p)}",
                                            {"transport": "tcp", "port": int(p)}, float(delta[p]), self._t, now)
        self._syns, self._t = cur, now
        on = {("port", p): s for p, s in state.ports.items()} | {("pressure", i): s for i, s in state.pressure.items()}
        out = []
        score = self.detector.cfg.score_threshold
        for key in sorted(on.keys() - self.open.keys()):
            k = self._key(key)
            k.opened_at = now - max(0, state.now_ns - on[key]) / 1e9
            k.anomaly_id = hashlib.blake2b(f"syn_proxy|{k.dimension}|{k.value}|{on[key]}".encode(),
                                           digest_size=16).hexdigest()
            rate = self._rate.get(key[1], 0.0) if key[0] == "port" else 0.0
            k.peak_rate, k.peak_score = rate, score
            self.open[key] = k
            out.append(self.detector._emit(k, "open", now, rate, score))
        for key in sorted(self.open.keys() - on.keys()):
            k = self.open.pop(key)
            rate = self._rate.get(key[1], 0.0) if key[0] == "port" else 0.0
            out.append(self.detector._emit(k, "close", now, rate, score))
        return out
