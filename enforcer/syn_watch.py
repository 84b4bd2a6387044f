"""Audit records of the SYN proxy's automatic switches, and the host settings it needs (docs/dos.md).

The datapath switches an `auto` proxy by itself (bpf/dos.h): on for a port whose SYN rate went over
`per_port_pps`, or for every port of a profile while conntrack evicts more than `proxy_pressure`
entries per second; off once `proxy_quiet` passed without a trigger. `ProxyWatch.poll()`, called by
`hostwall-enforcer run` about once a second, compares what is switched on with its previous look and
appends one audit record per change to the instance's audit log (the collector ships them; it makes the
matching anomaly records itself from the same kernel state, collector/syn_proxy.py). A switch on and off
again between two polls is not seen; with `proxy_quiet` of seconds (default 30 s) that cannot happen.

Cost per poll: one vectorised pass over the 65536 per-port slots (mmap) and one map lookup.
"""
from __future__ import annotations

import time

from hostwall.bpf import syn_proxy
from hostwall.bpf.state import append_audit, audit_record

WHO = "hostwall-enforcer (syn proxy auto)"


def datapath_now_ns(dp) -> int:
    t = int(dp.config()["test_now_ns"])
    return t or time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class ProxyWatch:
    """Polls the proxy's switches of one instance; the first poll reports what is on already."""

    def __init__(self, dp, pin_dir: str, profiles: tuple[str, ...]):
        self.dp, self.pin_dir, self.profiles = dp, pin_dir, profiles
        self.prev: dict[tuple[str, int], int] = {}           # key → since (datapath ns)

    def _wall(self, t_ns: int, now_ns: int) -> float:
        return time.time() - (now_ns - t_ns) / 1e9

    def _body(self, key: tuple[str, int], state: str, since_ns: int, now_ns: int) -> dict:
        scope, k = key
        sp = {"state": state, "scope": "port" if scope == "port" else "profile",
              "trigger": "syn_rate" if scope == "port" else "conntrack_pressure",
              "since": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self._wall(since_ns, now_ns))) + "Z"}
        if scope == "port":
            sp["port"] = k
        else:
            sp["profile"] = self.profiles[k] if k < len(self.profiles) else str(k)
        return {"pin_dir": self.pin_dir, "syn_proxy": sp}

    def poll(self) -> list[dict]:
        now = datapath_now_ns(self.dp)
        st = syn_proxy.read(self.dp.map_fds, now)
        cur = {("port", p): s for p, s in st.ports.items()} | {("pressure", i): s for i, s in st.pressure.items()}
        out = []
        for key in sorted(cur.keys() - self.prev.keys()):
            out.append(audit_record("syn-proxy-on", self._body(key, "on", cur[key], now), WHO,
                                    self._wall(cur[key], now)))
        for key in sorted(self.prev.keys() - cur.keys()):
            out.append(audit_record("syn-proxy-off", self._body(key, "off", self.prev[key], now), WHO))
        self.prev = cur
        for rec in out:
            append_audit(self.pin_dir, rec)
        return out


def host_warnings(profiles, netns: str | None) -> list[str]:
    """One line per setting of the protected host (the interfaces' network namespace) that keeps a SYN
    proxy of these profiles (enforcer.policy.DosProfile) from completing handshakes (docs/dos.md)."""
    import subprocess
    on = [p for p in profiles if p.syn_proxy != "off"]
    if not on:
        return []

    def sysctl(name: str) -> str:
        path = "/proc/sys/net/ipv4/" + name
        argv = ["ip", "netns", "exec", netns, "cat", path] if netns else ["cat", path]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    out = []
    where = f" in netns {netns}" if netns else ""
    if sysctl("tcp_syncookies") != "2":
        out.append(f"SYN proxy of {', '.join(p.name for p in on)}: net.ipv4.tcp_syncookies is not 2{where}; "
                   f"the host's stack will refuse cookie ACKs: run `sysctl -w net.ipv4.tcp_syncookies=2`{where}")
    full = [p.name for p in on if p.syn_proxy_options == "full"]
    if full and sysctl("tcp_timestamps") != "2":
        out.append(f"SYN proxy of {', '.join(full)} (proxy_options: full): net.ipv4.tcp_timestamps is not 2{where}; "
                   "window scaling and SACK would be read wrong: set it to 2, or use proxy_options: mss")
    return out
