"""Metrics of FQDN egress allowlists (docs/metrics.md "DNS proxy and FQDN rules"): the enforcer's DNS
proxy counters (hw_dns_stats, which the proxy keeps in a pinned map so they survive its restarts) and the
datapath's dynamic-set outcomes (hw_fqdn_stats: one per egress first packet that probed the set). The
dynamic set's and the learnt names' fill are map pressure rows (`hostwall_map_entries{map="hw_fqdn"}`,
`hw_dns_names`, `hw_dns_name_ips`).

Served by collector/kernel_metrics.py's KernelCollector with its other kernel families (same Family
table, same refresh). The answer latency is a histogram in counters: cumulative answers per upper bound
`le` (seconds, the proxy's buckets: 0.125 ms x 2^b) and the sum, so histogram_quantile() works on it.
Cost per read: one mmap read of 40 counters and one per-CPU array read.
"""
from __future__ import annotations

from collections.abc import Callable

from hostwall.bpf import layout as L

__all__ = ["DNS_SPEC", "dns_families"]

DNS_SPEC: dict[str, tuple[str, str, tuple[str, ...], str, str]] = {
    "hostwall_dns_queries": ("counter", "{query}", ("transport",), "Queries the DNS proxy received, by transport "
                             "(udp, tcp)", "hw_dns_stats"),
    "hostwall_dns_listed_queries": ("counter", "{query}", (), "Queries for a name some fqdns rule lists",
                                    "hw_dns_stats"),
    "hostwall_dns_answers": ("counter", "{answer}", ("result",), "Answers the DNS proxy gave: relayed (from an "
                             "upstream), cached (from its answer cache), refused (refuse_unlisted), servfail (no "
                             "upstream answered)", "hw_dns_stats"),
    "hostwall_dns_cache_lookups": ("counter", "{lookup}", ("result",), "Answer cache lookups of queries the proxy "
                                   "could cache: hit, miss (asked upstream)", "hw_dns_stats"),
    "hostwall_dns_cache_evictions": ("counter", "{entry}", (), "Live answer cache entries dropped for room",
                                     "hw_dns_stats"),
    "hostwall_dns_upstream_failures": ("counter", "{failure}", ("reason",), "Upstream queries that failed: timeout, "
                                       "error (refused, network error, closed connection)", "hw_dns_stats"),
    "hostwall_dns_dropped_messages": ("counter", "{message}", ("reason",), "Messages the proxy dropped: "
                                      "malformed_query, malformed_answer (a listed name's answer that does not "
                                      "parse), mismatched (wrong ID or question), overload (too many in flight)",
                                      "hw_dns_stats"),
    "hostwall_dns_learnt_addresses": ("counter", "{address}", ("result",), "Addresses of answers for listed names: "
                                      "learnt (entered or renewed), overflow (over max_ips_per_name), full (a full "
                                      "map refused them)", "hw_dns_stats"),
    "hostwall_dns_records_suppressed": ("counter", "{record}", (), "DNS decision records over the proxy's rate "
                                        "limit: counted, not written", "hw_dns_stats"),
    "hostwall_dns_records_unwritten": ("counter", "{record}", (), "DNS decision records the proxy could not "
                                       "write to its log (write error): counted", "hw_dns_stats"),
    "hostwall_dns_answers_by_latency": ("counter", "{answer}", ("le",), "Answers by latency, cumulative: answered "
                                        "within `le` seconds of the query's arrival (le=\"+Inf\": all)",
                                        "hw_dns_stats"),
    "hostwall_dns_answer_latency_seconds": ("counter", "s", (), "Sum of the answers' latencies", "hw_dns_stats"),
    "hostwall_fqdn_lookups": ("counter", "{lookup}", ("result",), "Egress first packets that probed the "
                              "datapath's dynamic set for fqdns rules, one per packet: hit (a rule matched), "
                              "else expired (an entry past its TTL), else miss", "hw_fqdn_stats"),
}


def dns_families(dp, family: Callable[[str], object]) -> list:
    """The families of DNS_SPEC from an open instance (`family(name)` makes an empty Family)."""
    from hostwall.bpf.fqdn import FqdnMaps
    fm = FqdnMaps(dp.map_fds)
    try:
        s = [int(x) for x in fm.stats()]
    finally:
        fm.close()
    i = {n: k for k, n in L.DNS_STAT_NAMES.items()}
    fams = {n: family(n) for n in DNS_SPEC}
    fams["hostwall_dns_queries"].add(("udp",), s[i["queries_udp"]])
    fams["hostwall_dns_queries"].add(("tcp",), s[i["queries_tcp"]])
    fams["hostwall_dns_listed_queries"].add((), s[i["listed"]])
    for lv, k in (("relayed", "answered"), ("cached", "cache_hits"), ("refused", "refused"), ("servfail", "servfail")):
        fams["hostwall_dns_answers"].add((lv,), s[i[k]])
    fams["hostwall_dns_cache_lookups"].add(("hit",), s[i["cache_hits"]])
    fams["hostwall_dns_cache_lookups"].add(("miss",), s[i["cache_misses"]])
    fams["hostwall_dns_cache_evictions"].add((), s[i["cache_evictions"]])
    fams["hostwall_dns_upstream_failures"].add(("timeout",), s[i["upstream_timeout"]])
    fams["hostwall_dns_upstream_failures"].add(("error",), s[i["upstream_error"]])
    for k in ("malformed_query", "malformed_answer", "mismatched", "overload"):
        fams["hostwall_dns_dropped_messages"].add((k,), s[i[k]])
    for lv, k in (("learnt", "learnt"), ("overflow", "overflow"), ("full", "set_full")):
        fams["hostwall_dns_learnt_addresses"].add((lv,), s[i[k]])
    fams["hostwall_dns_records_suppressed"].add((), s[i["records_suppressed"]])
    fams["hostwall_dns_records_unwritten"].add((), s[i["records_unwritten"]])
    lat0, n = L.C["HW_DNS_LAT0"], L.C["HW_DNS_LAT_BUCKETS"]
    total = 0
    for b in range(n):
        total += s[lat0 + b]
        le = "+Inf" if b == n - 1 else f"{0.000125 * 2 ** b:g}"
        fams["hostwall_dns_answers_by_latency"].add((le,), total)
    fams["hostwall_dns_answer_latency_seconds"].add((), round(s[i["latency_sum_us"]] / 1e6, 6))
    fq = dp.fqdn_stats()                # None: an instance of another build, its counts unreadable here
    if fq is not None:
        for result in ("hit", "expired", "miss"):
            fams["hostwall_fqdn_lookups"].add((result,), fq[result])
    return list(fams.values())
