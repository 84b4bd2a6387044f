"""Suite `dns`: the enforcer's DNS proxy (docs/policy.md "FQDN rules") against the same upstream asked
directly, both with dnsperf (Debian), in one run.

Set-up: a direct lab (client and protected host joined by one veth, lab/netns.py); Debian's dnsmasq as
the upstream on the client side (10.66.3.2:53), serving two wildcard zones; the real `hostwall-enforcer
run` on the protected host with a policy that allows DNS to the upstream and has an fqdns rule for
`*.cdn.bench.test`, its proxy on 127.0.0.1:53 inside the protected host's namespace. dnsperf runs in
the protected host's namespace against the proxy (→ 127.0.0.1, then the proxy → the upstream) and against
the upstream directly (→ 10.66.3.2): both paths cross the veth and the datapath once.

Query mix: 2000 names, half listed (`hN.cdn.bench.test`: the proxy parses the answer and enters its
address into the dynamic set before relaying it) and half unlisted (`uN.other.bench.test`: relayed as
bytes), A records, shuffled; dnsperf loops over them.

Metrics (runs of the two targets interleaved; the median over rounds):
- qps_direct, qps_proxy: queries/s completed at full load (dnsperf -c 4 clients, -q 200 outstanding);
  qps_proxy is the proxy as deployed (answer cache on, dns.cache_size 10000), qps_proxy_uncached the same
  proxy with `cache_size: 0` (applied as a policy swap between its runs): every query goes upstream
- latency_p50/p99_{direct,proxy,proxy_uncached}_ms: per-query latencies (dnsperf -v) at 1000 queries/s
  offered (-Q 1000); added_latency_p50/p99_ms: proxy minus direct at 1000 q/s (cache on), and
  added_latency_p99_uncached_ms
- ratio_qps_proxy_over_direct (cache on), ratio_qps_proxy_uncached_over_direct; cache_hit_ratio (hits over
  cacheable queries, whole run); lost_* (queries dnsperf counted lost); proxy_cpu_us_per_query and
  proxy_uncached_cpu_us_per_query (the run process's CPU time over the queries it answered at full load).
"""
from __future__ import annotations

import random
import re
import statistics
import sys
from pathlib import Path

from . import policies as P

TARGETS = {
    "ratio_qps_proxy_over_direct": (">= 0.5 (qps_proxy >= 0.5 x qps_direct)",
                                    lambda m: m["ratio_qps_proxy_over_direct"] >= 0.5),
    "added_latency_p99_ms": ("<= 1 ms at 1000 q/s", lambda m: m["added_latency_p99_ms"] <= 1.0),
}
NOTES = """\
qps = dnsperf's completed queries/s at full load (4 clients, 200 outstanding), proxy vs the same upstream
asked directly; the goal is judged on the proxy as deployed (answer cache on; 2000 names looped, so mostly
hits: see cache_hit_ratio); qps_proxy_uncached is the same proxy with cache_size 0; latency = per-query latencies (dnsperf -v) at 1000 q/s offered. Half the names are listed by
an fqdns rule: their answers are parsed and their addresses entered into the dynamic set before relaying."""

UPSTREAM = "10.66.3.2"
LISTED_ADDR, OTHER_ADDR = "10.66.2.10", "10.66.2.11"
POLICY = f"""
version: 1
name: bench-dns
defaults: {{ingress: deny, egress: deny}}
rules:
  - {{name: dns-upstream, priority: 1, direction: egress, action: allow, protocol: udp, peers: [{UPSTREAM}/32],
     ports: [53]}}
  - {{name: cdn, priority: 10, direction: egress, action: allow, protocol: tcp, ports: [443],
     fqdns: ["*.cdn.bench.test"]}}
dns: {{listen: ["127.0.0.1:53"], upstreams: ["{UPSTREAM}:53"], min_ttl: 5s, max_ttl: 1h, cache_size: CACHE}}
"""
CACHE_SIZE = 10000                      # the default (enforcer/dnspolicy.py): holds all 2000 names
_QPS = re.compile(r"Queries per second:\s+([0-9.]+)")
_LOST = re.compile(r"Queries lost:\s+([0-9]+)")
_DONE = re.compile(r"Queries completed:\s+([0-9]+)")


def _log(msg: str) -> None:
    print(f"[dns] {msg}", file=sys.stderr, flush=True)


def _queries(path: Path, n: int = 2000, seed: int = 1) -> None:
    rng = random.Random(seed)
    lines = [f"h{i}.cdn.bench.test A" for i in range(n // 2)] + [f"u{i}.other.bench.test A" for i in range(n // 2)]
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")


def _dnsperf(lab, server: str, data: Path, secs: float, *, qps: int | None = None, verbose: bool = False) -> dict:
    argv = ["dnsperf", "-s", server, "-d", str(data), "-l", f"{secs:g}", "-t", "2"]
    argv += ["-Q", str(qps), "-c", "1", "-q", "100"] if qps else ["-c", "4", "-q", "200"]
    if verbose:
        argv.append("-v")
    cp = lab.run("prot", argv, timeout=secs + 60, check=False)
    out = cp.stdout
    m = _QPS.search(out)
    if cp.returncode != 0 or not m:
        raise RuntimeError(f"dnsperf against {server} failed (exit {cp.returncode}): {cp.stderr[-1500:]} {out[-800:]}")
    res = {"qps": float(m.group(1)), "lost": int(_LOST.search(out).group(1)),
           "completed": int(_DONE.search(out).group(1))}
    if verbose:
        lat = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == ">":
                try:
                    lat.append(float(parts[-1]))
                except ValueError:
                    pass
        if len(lat) < 100:
            raise RuntimeError(f"dnsperf -v gave {len(lat)} latencies; output: {out[:500]}")
        lat.sort()
        res["p50_ms"] = lat[len(lat) // 2] * 1e3
        res["p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
    return res


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])            # utime + stime (clock ticks)


def run(quick: bool) -> dict[str, float]:
    import os

    from hostwall.lab.dns import DnsServer, Wildcard, query
    from hostwall.lab.enforcer_proc import EnforcerProcess
    from hostwall.lab.netns import Lab
    secs, rounds = (4.0, 1) if quick else (10.0, 3)
    kinds = ("direct", "proxy", "proxy_uncached")
    runs: dict[str, list[dict]] = {f"{k}_{m}": [] for k in kinds for m in ("max", "1k")}
    cpu_per_q: dict[str, list[float]] = {"proxy": [], "proxy_uncached": []}
    with P.tempdir("hostwall-bench-dns-") as d, Lab(direct=True) as lab:
        zone = [Wildcard("cdn.bench.test", LISTED_ADDR), Wildcard("other.bench.test", OTHER_ADDR)]
        data = d / "queries.txt"
        _queries(data)
        pol = {"proxy": d / "policy.yaml", "proxy_uncached": d / "policy-uncached.yaml"}
        pol["proxy"].write_text(POLICY.replace("CACHE", str(CACHE_SIZE)))
        pol["proxy_uncached"].write_text(POLICY.replace("CACHE", "0"))
        with DnsServer(lab, "att", zone, addr=UPSTREAM, local_ttl=300), \
                EnforcerProcess(lab, pol["proxy"]) as enf:
            for name in ("h0.cdn.bench.test", "u0.other.bench.test"):       # warm both paths once
                query(lab, "prot", "127.0.0.1", name, timeout=5)
            tick = os.sysconf("SC_CLK_TCK")
            for r in range(rounds):
                for mode in ("max", "1k"):
                    for target in kinds:
                        server = UPSTREAM if target == "direct" else "127.0.0.1"
                        if target != "direct":
                            enf.apply(pol[target])
                        c0 = _cpu_ticks(enf.proc.pid)
                        got = (_dnsperf(lab, server, data, secs) if mode == "max"
                               else _dnsperf(lab, server, data, secs, qps=1000, verbose=True))
                        runs[f"{target}_{mode}"].append(got)
                        if mode == "max" and target != "direct":
                            cpu_per_q[target].append((_cpu_ticks(enf.proc.pid) - c0) / tick * 1e6
                                                     / max(1, got["completed"]))
                        _log(f"round {r + 1}: {target} " + (f"full load {got['qps']:.0f} q/s, lost {got['lost']}"
                             if mode == "max" else f"at 1000 q/s: p50 {got['p50_ms']:.3f} ms, p99 {got['p99_ms']:.3f} ms"))
            st = enf.status()["fqdn"]
            counters = st["proxy"]["counters"]
            _log(f"proxy counters: {counters}; learnt names {st['names_total']}")

    def med(key: str, field: str) -> float:
        return float(statistics.median(x[field] for x in runs[key]))

    m = {f"qps_{k}": med(f"{k}_max", "qps") for k in kinds}
    for k in kinds:
        m[f"latency_p50_{k}_ms"] = med(f"{k}_1k", "p50_ms")
        m[f"latency_p99_{k}_ms"] = med(f"{k}_1k", "p99_ms")
        m[f"lost_{k}"] = float(sum(x["lost"] for mode in ("max", "1k") for x in runs[f"{k}_{mode}"]))
    for k in ("proxy", "proxy_uncached"):
        m[f"{k}_cpu_us_per_query"] = float(statistics.median(cpu_per_q[k]))
    m.update({"learnt_addresses": float(counters["learnt"]), "rounds": float(rounds), "seconds_per_run": secs,
              "cache_hit_ratio": counters["cache_hits"] / max(1, counters["cache_hits"] + counters["cache_misses"])})
    m["ratio_qps_proxy_over_direct"] = m["qps_proxy"] / m["qps_direct"]
    m["ratio_qps_proxy_uncached_over_direct"] = m["qps_proxy_uncached"] / m["qps_direct"]
    m["added_latency_p50_ms"] = m["latency_p50_proxy_ms"] - m["latency_p50_direct_ms"]
    m["added_latency_p99_ms"] = m["latency_p99_proxy_ms"] - m["latency_p99_direct_ms"]
    m["added_latency_p99_uncached_ms"] = m["latency_p99_proxy_uncached_ms"] - m["latency_p99_direct_ms"]
    return dict(sorted(m.items()))
