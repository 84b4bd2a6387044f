"""Suite `datapath`: ns per packet of the XDP ingress program (and TC egress) via BPF_PROG_TEST_RUN.

What is measured (every case is one frame run `repeat` times in the kernel; the metric is the median,
over several batches, of the kernel's mean ns per run; the batches of all cases are interleaved, so a
burst of interference from other work on the machine hits every case alike). Each policy size gets
its own freshly loaded instance (10 rules, 1000 rules (not with --quick), max = 4096 rules + 100k
IPv4 + 10k IPv6 prefixes), so all cases can be interleaved without swapping policies in between:

- allow    first packet of a flow that only the LAST rule allows ("probe-ingress", priority 1000000):
           a TCP ACK. A non-SYN creates no conntrack state, so every repeat takes the full path:
           parse, conntrack miss, peer lookup (top-16 bucket + binary search in a dense bucket),
           L4 lookup, bit-vector AND over all 64 words (each word has candidate rules, no match
           until the last), rule load, counters. This is the "first packet of a flow" metric.
           (A repeated SYN would measure the conntrack-hit path from its second run on: the first
           allowed SYN opens a tracked connection.)
- deny     a TCP ACK from a block-listed source (the deny rule is first in priority order, as a
           threat-intel list usually is): drop, reason policy_deny.
- default  a TCP ACK to a port no rule names: every word is scanned, no rule matches, default deny.
- established  the conntrack-hit path: SYN in (XDP, once) → SYN-ACK out (TC egress, once) → the
           flow is ESTABLISHED; then the initiator's ACK of that flow is measured (one conntrack
           lookup, state/counter update, no policy evaluation).
- egress_allow (TC egress) a TCP ACK to a destination only the last egress rule allows.
- ct_insert   many SYNs of distinct flows, each run once (repeat=1, so each inserts a conntrack
           entry), minus the same number of ACKs of distinct flows run once (same path, no insert).
- fqdn_allow (TC egress) the egress probe allowed by an fqdns rule placed just before probe-egress in
           the 10-rule policy, its destination in the rule's dynamic set (docs/datapath.md "FQDN
           rules"): the static scan finds probe-egress, then one dynamic-set lookup of the fqdns rule
           hits. Compared with the same packet allowed by probe-egress itself (`fqdn_static`, same
           instance: the fqdns rule's set holds another address, so the lookup misses) and with the
           10-rule policy without fqdns rules (`ns_tc_egress_v4_10_rules_allow`).

Baselines from the same run: an empty XDP program (`return XDP_PASS;`) and an empty TC program,
compiled with BCC, through the same test-run loop; and the peer, xdp-filter from xdp-tools (bench/xdpfilter.py),
loaded by its CLI on a veth in a namespace of our own with what it can hold of the max policy's block
lists (10 000 exact addresses per family: the deny probe's source, then the lists' host routes, then
one host per remaining prefix; bench.xdpfilter.host_entries) and the default probe's port as its
denied port, timed on the same frames: allow (no entry matches: both address lookups and both port
lookups miss, pass), deny (source entry hit, drop), default (port entry hit, drop). Its allow case is
the floor the max policy's first packet is compared with (`ratio_v4_max_over_xdp_filter`).

Every case is checked before it is timed: the probe's verdict and rule come from the reference model
(bench.policies.check_probes) and the datapath's counted exit (hook, verdict, reason, rule counter)
must agree; xdp-filter's paths are checked by its own counters.

Caveats: test-run repeats one frame, so caches and branch predictors are warm (a lower bound for
real traffic), and its per-run overhead (the empty program's figure) is included in every ns_* value.
The deny/default paths repeat one drop key, so after the first run (which emits the deny event) they
update an existing drop aggregate, as in a flood from one source.

Reproducibility: every case reports its median, `_min`, `_p90` and `_spread_pct` = (p90 − min) / median
over its batches; `spread_max_pct` is the widest, and above SPREAD_WARN_PCT a warning names the cases
(their figures are not to be trusted to that precision). `cpu=N` (`--cpu N`) pins the timing loop to
one CPU (os.sched_setaffinity; restored afterwards).
"""
from __future__ import annotations

import ipaddress
import os
import statistics
import struct
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L
from hostwall.enforcer.analysis.frames import inet_checksum
from hostwall.enforcer.reference import Packet

from . import policies as P
from . import xdpfilter as XF

XDP_DROP, XDP_PASS = 1, 2
TC_ACT_OK, TC_ACT_SHOT = 0, 2
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

SPREAD_WARN_PCT = 10.0                 # (p90 - min) / median of a case's batches above which it is not trusted

TARGETS = {
    "ns_per_pkt_v4_max_policy": ("<= 150 ns", lambda m: m["ns_per_pkt_v4_max_policy"] <= 150),
    "ns_per_pkt_v6_max_policy": ("<= 250 ns", lambda m: m["ns_per_pkt_v6_max_policy"] <= 250),
    "ratio_v4_max_over_10_rules": ("<= 2 (max policy vs 10 rules)", lambda m: m["ratio_v4_max_over_10_rules"] <= 2),
    "ratio_v6_max_over_10_rules": ("<= 2 (max policy vs 10 rules)", lambda m: m["ratio_v6_max_over_10_rules"] <= 2),
    "ns_per_pkt_v4_established": ("<= 60 ns", lambda m: m["ns_per_pkt_v4_established"] <= 60),
    "ratio_v4_max_over_xdp_filter": ("<= 1.0 (issue 13)", lambda m: m["ratio_v4_max_over_xdp_filter"] <= 1.0),
    "ratio_v6_max_over_xdp_filter": ("<= 1.0 (issue 13)", lambda m: m["ratio_v6_max_over_xdp_filter"] <= 1.0),
    "spread_max_pct": ("<= 10 % (batches agree)", lambda m: m["spread_max_pct"] <= SPREAD_WARN_PCT),
    **{f"ratio_{fam}_egress_fqdn_{case}_over_static_paired":
       ("<= 1.10 (the dynamic set's cost, issue 15)",
        lambda m, k=f"ratio_{fam}_egress_fqdn_{case}_over_static_paired": m[k] <= 1.10)
       for fam in ("v4", "v6") for case in ("hit", "miss")},
}

NOTES = """\
allow/first packet = TCP ACK matched only by the last rule (no conntrack state is created by non-SYN
packets, so every repeat evaluates the policy). A repeated SYN would be the conntrack-hit path after
its first run. established = ACK of a flow opened by SYN (XDP) + SYN-ACK (TC egress).
ns_* = median over batches of the kernel's mean ns/run (BPF_PROG_TEST_RUN); warm caches.
xdp_filter = xdp-filter (xdp-tools) on 10k exact addresses per family + 1 denied port, same frames."""

_MAC = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"


def _log(msg: str) -> None:
    print(f"[datapath] {msg}", file=sys.stderr, flush=True)


# ---- frames --------------------------------------------------------------------------------------


def tcp_frame(pkt: Packet, flags: int, sport: int | None = None, payload: int = 0) -> bytes:
    """Ethernet + IPv4/IPv6 + TCP (no options) frame for `pkt` with the given TCP flags: every segment at
    seq 1000, an ACK acknowledging the other side's SYN (1001: conntrack checks a SYN-ACK's ACK,
    docs/datapath.md "Sequence checks")."""
    sp = pkt.sport if sport is None else sport
    tcp = struct.pack("!HHIIBBHHH", sp, pkt.dport, 1000, 1001 if flags & TCP_ACK else 0, 5 << 4, flags,
                      65535, 0, 0) + b"\0" * payload
    src, dst = ipaddress.ip_address(pkt.src).packed, ipaddress.ip_address(pkt.dst).packed
    if pkt.family == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", inet_checksum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
        return _MAC + b"\x08\x00" + ip + tcp
    pseudo = src + dst + struct.pack("!IxxxB", len(tcp), 6)
    tcp = tcp[:16] + struct.pack("!H", inet_checksum(pseudo + tcp)) + tcp[18:]
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src, dst)
    return _MAC + b"\x86\xdd" + ip6 + tcp


def reply(pkt: Packet) -> Packet:
    """The same flow seen from the other side (direction flipped)."""
    return Packet("egress" if pkt.direction == "ingress" else "ingress", pkt.family, pkt.dst, pkt.src,
                  pkt.protocol, pkt.dport, pkt.sport)


# ---- programs ------------------------------------------------------------------------------------

_EMPTY_SRC = b"""
int empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }
int empty_tc(struct __sk_buff *skb) { return 0; }
"""


def _empty_programs():
    """(bpf module, xdp fd, tc fd) of programs that only return pass: the test-run loop's own cost."""
    from bcc import BPF
    b = BPF(text=_EMPTY_SRC)
    return b, b.load_func(b"empty_xdp", BPF.XDP).fd, b.load_func(b"empty_tc", BPF.SCHED_CLS).fd


class Runner:
    """Checked single test-runs against one loaded Datapath: which counted exit did a frame take?"""

    def __init__(self, dp, slot_names: dict[int, str] | None = None):
        self.dp = dp
        self.slot_names: dict[int, str] = slot_names or {}   # rule counter slot -> rule name

    def judged(self, prog: str, frame: bytes) -> tuple[int, str, str, str | None, int]:
        """Run once; (hook, verdict, reason, rule name or None, retval) from the counters that moved."""
        dp = self.dp
        before, rb = dp.stats()["packets"], dp.rule_stats()["packets"]
        res = bpfsys.prog_test_run(dp.prog_fds[prog], frame)
        moved = np.nonzero(dp.stats()["packets"] - before)[0]
        if len(moved) != 1:
            raise RuntimeError(f"{prog}: expected one counted exit, counters moved at {moved.tolist()}")
        h, rest = divmod(int(moved[0]), L.VERDICTS * L.REASONS)
        v, r = divmod(rest, L.REASONS)
        rmoved = np.nonzero(dp.rule_stats()["packets"] - rb)[0]
        rule = self.slot_names.get(int(rmoved[0]), f"slot{int(rmoved[0])}") if len(rmoved) else None
        return h, L.VERDICT_NAMES[v], L.REASON_NAMES[r], rule, res.retval

    def expect(self, prog: str, frame: bytes, verdict: str, reason: str, rule: str | None, what: str) -> None:
        hook = {"xdp_ingress": L.C["HW_HOOK_XDP_INGRESS"], "tc_egress": L.C["HW_HOOK_TC_EGRESS"],
                "tc_ingress": L.C["HW_HOOK_TC_INGRESS"]}[prog]
        got = self.judged(prog, frame)
        if got[:4] != (hook, verdict, reason, rule):
            raise RuntimeError(f"{what}: datapath judged (hook {got[0]}, {got[1]}, {got[2]}, rule {got[3]}), "
                               f"expected (hook {hook}, {verdict}, {reason}, rule {rule}); the datapath "
                               "disagrees with the reference model")


# ---- the suite -----------------------------------------------------------------------------------

_EXPECT = {"allow": ("allow", "pass_rule"), "deny": ("drop", "policy_deny"), "default": ("drop", "default_deny"),
           "egress_allow": ("allow", "pass_rule")}
EST_SPORT = 30000          # the established flow's source port (the first-packet probes use another)


@dataclass
class Case:
    name: str                  # metric name
    fd: int
    frame: bytes
    retval: int
    runs: list = field(default_factory=list)


def _instance(bp: P.BenchPolicy):
    """A freshly loaded datapath with `bp` installed and its probes checked (reference + counters)."""
    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.datapath import Datapath
    from hostwall.enforcer.policy import load_policy
    t0 = time.perf_counter()
    pol = load_policy(bp.path)
    P.check_probes(pol, bp.probes)
    slots = {r.name: i for i, r in enumerate(pol.rules)}
    cp = compile_policy(pol, slots, revision_id=bp.n_rules)
    t1 = time.perf_counter()
    dp = Datapath.load()
    dp.install(cp)
    dp.clear_conntrack()
    _log(f"{bp.label}: {len(pol.rules)} rules, {bp.v4_prefixes} v4 / {bp.v6_prefixes} v6 prefixes, "
         f"{cp.describe()}; parse+compile {t1 - t0:.1f} s, load+install {time.perf_counter() - t1:.1f} s")
    return dp, {i: n for n, i in slots.items()}


def _cases(dp, slot_names: dict[int, str], bp: P.BenchPolicy) -> list[Case]:
    """Check every probe's path in the datapath, open the established flows, return the timed cases."""
    runner = Runner(dp, slot_names)
    xdp, egr = dp.prog_fds["xdp_ingress"], dp.prog_fds["tc_egress"]
    lab = bp.label
    out: list[Case] = []
    for fam in (4, 6):
        v = f"v{fam}"
        # established: SYN in (XDP), SYN-ACK out (TC egress), then the initiator's ACK is a conntrack hit
        syn = bp.probes[(fam, "allow")].packet
        syn = Packet(syn.direction, fam, syn.src, syn.dst, 6, EST_SPORT, syn.dport)
        runner.expect("xdp_ingress", tcp_frame(syn, TCP_SYN), "allow", "pass_rule", "probe-ingress",
                      f"{lab} {v} SYN opening a flow")
        runner.expect("tc_egress", tcp_frame(reply(syn), TCP_SYN | TCP_ACK), "allow", "pass_conntrack", None,
                      f"{lab} {v} SYN-ACK of a tracked flow")
        ack = tcp_frame(syn, TCP_ACK)
        runner.expect("xdp_ingress", ack, "allow", "pass_conntrack", None, f"{lab} {v} ACK of an established flow")
        for path in ("allow", "deny", "default"):
            pr = bp.probes[(fam, path)]
            f = tcp_frame(pr.packet, TCP_ACK)
            verdict, reason = _EXPECT[path]
            runner.expect("xdp_ingress", f, verdict, reason, pr.rule, f"{lab} {v} {path}")
            out.append(Case(f"ns_xdp_{v}_{lab}_{path}", xdp, f, XDP_PASS if verdict == "allow" else XDP_DROP))
        out.append(Case(f"ns_xdp_{v}_{lab}_established", xdp, ack, XDP_PASS))
        pr = bp.probes[(fam, "egress_allow")]
        f = tcp_frame(pr.packet, TCP_ACK)
        runner.expect("tc_egress", f, "allow", "pass_rule", pr.rule, f"{lab} {v} egress allow")
        out.append(Case(f"ns_tc_egress_{v}_{lab}_allow", egr, f, TC_ACT_OK))
    return out


FQDN_RULE = ("  - {name: probe-egress-fqdn, priority: 999999, direction: egress, action: allow, protocol: tcp, "
             f"ports: [{P.PROBE_PORT_OUT}], fqdns: [probe.bench.test]}}\n")


def _fqdn_instance(d, bp: P.BenchPolicy):
    """The 10-rule policy plus an fqdns rule for the egress probe's port (just before probe-egress), and its
    timed cases: fqdn_allow (the probe's destination is in the rule's dynamic set: one lookup, a hit) and
    fqdn_static (another address of the probe network, not in the set: one lookup, a miss, then probe-egress
    allows). Each checked through the datapath's counted exit first."""
    from hostwall.bpf.fqdn import FqdnMaps, now_ns
    from hostwall.enforcer.compiler import compile_policy, fqdn_lists
    from hostwall.enforcer.datapath import Datapath
    from hostwall.enforcer.policy import load_policy
    path = d / "policy-fqdn.yaml"
    path.write_text(bp.path.read_text() + FQDN_RULE + "dns: {upstreams: [\"192.0.2.53\"]}\n")
    pol = load_policy(path)
    slots = {r.name: i for i, r in enumerate(pol.rules)}
    dp = Datapath.load()
    dp.install(compile_policy(pol, slots, revision_id=11))
    dp.clear_conntrack()
    assert fqdn_lists(pol) == [("probe.bench.test",)]           # set id 1 (compile_policy's default)
    fm = FqdnMaps(dp.map_fds)
    runner = Runner(dp, {i: n for n, i in slots.items()})
    egr = dp.prog_fds["tc_egress"]
    out = []
    for fam in (4, 6):
        hit = bp.probes[(fam, "egress_allow")].packet
        miss = Packet(hit.direction, fam, hit.src, "198.18.7.11" if fam == 4 else "2001:2:0:7::11", 6, hit.sport,
                      hit.dport)
        assert fm.set_put(1, hit.dst, now_ns() + 3600 * 10**9, 0)
        for name, pkt, rule in (("fqdn_allow", hit, "probe-egress-fqdn"), ("fqdn_static", miss, "probe-egress")):
            f = tcp_frame(pkt, TCP_ACK)
            runner.expect("tc_egress", f, "allow", "pass_rule", rule, f"fqdn v{fam} {name}")
            out.append(Case(f"ns_tc_egress_v{fam}_{name}", egr, f, TC_ACT_OK))
    fm.close()
    _log(f"fqdn: 10 rules + 1 fqdns rule, {dp.fqdn_stats()}")
    return dp, out


def _xdp_filter_cases(stack: ExitStack, bp: P.BenchPolicy, m: dict[str, float]) -> list[Case]:
    """xdp-filter loaded by its CLI with what it can hold of bp's block lists (module doc), each path
    checked by its own counters (the deny entry's hit counter, the port entry's, its pass count) before
    it is timed. Everything it made is removed by `stack` (detach, fds, the namespace)."""
    ok, why = XF.available()
    if not ok:
        raise RuntimeError(f"the xdp-filter baseline cannot run: {why}")
    ns, ifname = stack.enter_context(XF.scratch_netns())
    deny = {4: P.DENY_SRC_V4, 6: P.DENY_SRC_V6}
    xf = stack.enter_context(XF.XdpFilter(ns, ifname, deny_ports=[P.PROBE_PORT_DEFAULT],
                                          deny_src=[deny[4], deny[6]]))
    for fam in (4, 6):
        lst = P.blocklist(bp, fam)
        entries = XF.host_entries(lst, xf.capacity(fam), first=[deny[fam]])
        m[f"xdp_filter_v{fam}_entries"] = float(xf.add_src(entries))
        held = set(entries)
        m[f"xdp_filter_v{fam}_entries_host_routes"] = float(sum(1 for p in lst if p.endswith(("/32", "/128"))
                                                                and p.split("/")[0] in held))
        m[f"xdp_filter_v{fam}_list_prefixes"] = float(len(lst))
    out = []
    for fam in (4, 6):
        for path, want in (("allow", XF.XDP_PASS), ("deny", XF.XDP_DROP), ("default", XF.XDP_DROP)):
            f = tcp_frame(bp.probes[(fam, path)].packet, TCP_ACK)
            _check_xdp_filter(xf, f, deny[fam], path, want, f"xdp-filter v{fam} {path}")
            out.append(Case(f"ns_xdp_filter_v{fam}_{path}", xf.prog_fd, f, want))
    _log(f"xdp-filter ({xf.attached_mode} on {ifname} in {ns}): {xf.entries[4]} IPv4 / {xf.entries[6]} IPv6 "
         f"source entries (map capacity {xf.capacity(4)}), port {P.PROBE_PORT_DEFAULT} denied")
    return out


def _check_xdp_filter(xf: XF.XdpFilter, frame: bytes, deny_src: str, path: str, want: int, what: str) -> None:
    """One run: the return value and which of xdp-filter's counters moved (the deny entry's hits, the
    denied port's hits, the count of `want`) must be those of `path`."""
    def counters() -> tuple[int, int, int]:
        return xf.hits(deny_src), xf.port_hits(P.PROBE_PORT_DEFAULT), xf.action_packets(want)
    before = counters()
    r = bpfsys.prog_test_run(xf.prog_fd, frame)
    moved = tuple(a - b for a, b in zip(counters(), before))
    expect = {"allow": (0, 0, 1), "deny": (1, 0, 1), "default": (0, 1, 1)}[path]
    if r.retval != want or moved != expect:
        raise RuntimeError(f"{what}: returned {r.retval} (expected {want}), counters (deny entry, port entry, "
                           f"action) moved {moved}, expected {expect}")


@dataclass
class _Pinned:
    """os.sched_setaffinity to one CPU for the timing loop (None: leave the affinity alone)."""
    cpu: int | None

    def __enter__(self):
        self.old = os.sched_getaffinity(0)
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})
        return self

    def __exit__(self, *exc) -> None:
        os.sched_setaffinity(0, self.old)


def _cpu_ticks() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _machine_share(before: list[int], after: list[int], m: dict[str, float]) -> None:
    """busy_pct: the share of all CPUs doing anything during the timing loop (other work competes for
    caches and, on SMT or an overcommitted host, for the core); steal_pct: time the hypervisor ran
    something else on our vCPUs — test-run's clock cannot exclude it (it does exclude our own preemption)."""
    d = [a - b for a, b in zip(after, before)]
    total = sum(d[:8]) or 1
    m["busy_pct"] = 100.0 * (total - d[3] - d[4]) / total
    m["steal_pct"] = 100.0 * d[7] / total


def _measure(cases: list[Case], repeat: int, batches: int, cpu: int | None = None,
             m: dict[str, float] | None = None) -> None:
    """Interleaved rounds: every case runs one batch per round, so a burst of interference from other
    work on the machine hits all cases alike instead of skewing one of them."""
    ticks = _cpu_ticks()
    with _Pinned(cpu):
        for c in cases:                                  # warm-up and return-value check
            r = bpfsys.prog_test_run(c.fd, c.frame, repeat=max(1, repeat // 10))
            if r.retval != c.retval:
                raise RuntimeError(f"{c.name}: program returned {r.retval}, expected {c.retval}")
        for i in range(batches):
            order = cases[i % len(cases):] + cases[:i % len(cases)]
            for c in order:
                c.runs.append(bpfsys.prog_test_run(c.fd, c.frame, repeat=repeat).duration_ns)
    if m is not None:
        _machine_share(ticks, _cpu_ticks(), m)


def _summarise(cases: list[Case], m: dict[str, float]) -> None:
    """median (the metric), _min, _p90 and _spread_pct per case; spread_max_pct and a warning when the
    batches of some case disagree by more than SPREAD_WARN_PCT."""
    spreads = {}
    for c in cases:
        med, lo, p90 = float(statistics.median(c.runs)), float(min(c.runs)), float(np.percentile(c.runs, 90))
        m[c.name], m[c.name + "_min"], m[c.name + "_p90"] = med, lo, p90
        spreads[c.name] = m[c.name + "_spread_pct"] = 100.0 * (p90 - lo) / med if med else 0.0
    by_name = {c.name: c for c in cases}
    for fam in ("v4", "v6"):                    # per-round ratios: both cases of a pair ran in the same round
        for label, a, b in ((f"ratio_{fam}_max_over_xdp_filter", f"ns_xdp_{fam}_max_policy_allow",
                             f"ns_xdp_filter_{fam}_allow"),
                            (f"ratio_{fam}_max_over_empty_xdp", f"ns_xdp_{fam}_max_policy_allow", "ns_empty_xdp"),
                            (f"ratio_{fam}_egress_fqdn_hit_over_static", f"ns_tc_egress_{fam}_fqdn_allow",
                             f"ns_tc_egress_{fam}_10_rules_allow"),
                            (f"ratio_{fam}_egress_fqdn_miss_over_static", f"ns_tc_egress_{fam}_fqdn_static",
                             f"ns_tc_egress_{fam}_10_rules_allow")):
            if a in by_name and b in by_name:
                r = [x / y for x, y in zip(by_name[a].runs, by_name[b].runs) if y]
                med = float(statistics.median(r))
                m[label + "_paired"] = med
                m[label + "_paired_spread_pct"] = 100.0 * (float(np.percentile(r, 90)) - min(r)) / med
    for name in ("ns_empty_xdp", "ns_xdp_v4_max_policy_allow", "ns_xdp_filter_v4_allow"):
        if name in by_name:                     # batch by batch, in round order: levels show up here
            _log(f"{name} batches (ns, round order): {by_name[name].runs}")
    m["spread_max_pct"] = max(spreads.values())
    m["spread_median_pct"] = float(statistics.median(spreads.values()))
    wide = sorted((v, k) for k, v in spreads.items() if v > SPREAD_WARN_PCT)
    if wide:
        print(f"[datapath] WARNING: {len(wide)} of {len(cases)} cases spread more than {SPREAD_WARN_PCT:g} % "
              f"between batches (p90 - min over median), widest: "
              + ", ".join(f"{k} {v:.0f} %" for v, k in wide[::-1][:5])
              + "; their medians are not reproducible to that precision (other work sharing the CPU; compare "
              "`_min` and the ratios, docs/benchmarks.md \"Noise\")", file=sys.stderr, flush=True)


def _ct_insert(dp, bp: P.BenchPolicy, flows: int, m: dict[str, float]) -> None:
    """Mean single-run cost of SYNs that each open a flow vs ACKs that open none (same policy path)."""
    xdp = dp.prog_fds["xdp_ingress"]
    dp.clear_conntrack()
    for fam in (4, 6):
        base = bp.probes[(fam, "allow")].packet
        syn_ns, ack_ns = [], []
        for i in range(flows):
            syn_ns.append(bpfsys.prog_test_run(xdp, tcp_frame(base, TCP_SYN, sport=1024 + i)).duration_ns)
            ack_ns.append(bpfsys.prog_test_run(xdp, tcp_frame(base, TCP_ACK, sport=1024 + flows + i)).duration_ns)
        entries = dp.map_pressure()[f"hw_ct{fam}"]["entries"]
        if entries != flows:
            raise RuntimeError(f"v{fam}: {flows} SYNs of distinct flows left {entries} conntrack entries")
        v = f"v{fam}"
        m[f"ns_syn_new_flow_{v}_repeat1"] = float(np.mean(syn_ns))
        m[f"ns_ack_new_flow_{v}_repeat1"] = float(np.mean(ack_ns))
        m[f"ct_insert_ns_{v}"] = m[f"ns_syn_new_flow_{v}_repeat1"] - m[f"ns_ack_new_flow_{v}_repeat1"]
        dp.clear_conntrack()
    m["ct_insert_ns"] = m["ct_insert_ns_v4"]
    _log(f"conntrack insert: v4 {m['ct_insert_ns_v4']:.0f} ns, v6 {m['ct_insert_ns_v6']:.0f} ns "
         f"({flows} flows each, single runs; max policy)")


def run(quick: bool, cpu: int | None = None) -> dict[str, float]:
    repeat, batches, flows = (20_000, 15, 2_000) if quick else (200_000, 25, 20_000)
    m: dict[str, float] = {}
    t0 = time.perf_counter()
    with ExitStack() as stack:
        empty_mod, empty_xdp, empty_tc = _empty_programs()
        stack.callback(empty_mod.cleanup)
        instances = []
        probe_frame = tcp_frame(P._probes(P.PROBE_PORT_IN)[(4, "allow")].packet, TCP_ACK)
        cases = [Case("ns_empty_xdp", empty_xdp, probe_frame, XDP_PASS),
                 Case("ns_empty_tc", empty_tc, probe_frame, TC_ACT_OK)]
        d = stack.enter_context(P.tempdir())
        for n in ((10, P.MAX_RULES) if quick else P.RULE_COUNTS):    # --quick skips 1000 rules
            bp = P.max_policy(d, seed=1) if n == P.MAX_RULES else P.generate(d, n, seed=1)
            dp, slot_names = _instance(bp)
            stack.callback(dp.close)
            instances.append(dp)
            cases += _cases(dp, slot_names, bp)
            if n == 10:
                fdp, fcases = _fqdn_instance(d, bp)
                stack.callback(fdp.close)
                cases += fcases
        cases += _xdp_filter_cases(stack, bp, m)           # bp: the max policy
        _log(f"set-up {time.perf_counter() - t0:.1f} s; timing {len(cases)} cases x {batches} interleaved "
             f"batches of {repeat} runs" + (f", pinned to CPU {cpu}" if cpu is not None else ""))
        _measure(cases, repeat, batches, cpu, m)
        _summarise(cases, m)
        _ct_insert(instances[-1], bp, flows, m)      # bp: the max policy (the last instance)
        mem = instances[-1].map_memory()            # what the max policy's instance costs in kernel memory
        m["map_memory_mb_max_policy"] = mem["total_bytes"] / 2**20
        for name, b in mem["maps"].items():
            if b >= 1 << 20:
                m[f"map_memory_mb_{name}"] = b / 2**20
    # contract names (docs/benchmarks.md)
    for fam in ("v4", "v6"):
        m[f"ns_per_pkt_{fam}_10_rules"] = m[f"ns_xdp_{fam}_10_rules_allow"]
        m[f"ns_per_pkt_{fam}_max_policy"] = m[f"ns_xdp_{fam}_max_policy_allow"]
        m[f"ns_per_pkt_{fam}_established"] = m[f"ns_xdp_{fam}_max_policy_established"]
        m[f"ratio_{fam}_max_over_10_rules"] = m[f"ns_per_pkt_{fam}_max_policy"] / m[f"ns_per_pkt_{fam}_10_rules"]
        m[f"ratio_{fam}_max_over_empty_xdp"] = m[f"ns_per_pkt_{fam}_max_policy"] / m["ns_empty_xdp"]
        m[f"ns_added_{fam}_max_policy"] = m[f"ns_per_pkt_{fam}_max_policy"] - m["ns_empty_xdp"]
        m[f"ns_added_{fam}_established"] = m[f"ns_per_pkt_{fam}_established"] - m["ns_empty_xdp"]
        xf = m[f"ns_xdp_filter_{fam}_allow"]
        m[f"ratio_{fam}_max_over_xdp_filter"] = m[f"ns_per_pkt_{fam}_max_policy"] / xf
        m[f"ratio_{fam}_max_over_xdp_filter_min"] = m[f"ns_xdp_{fam}_max_policy_allow_min"] / m[f"ns_xdp_filter_{fam}_allow_min"]
        m[f"ratio_{fam}_10_rules_over_xdp_filter"] = m[f"ns_per_pkt_{fam}_10_rules"] / xf
        m[f"ratio_{fam}_deny_over_xdp_filter_deny"] = m[f"ns_xdp_{fam}_max_policy_deny"] / m[f"ns_xdp_filter_{fam}_deny"]
        m[f"ratio_{fam}_established_over_xdp_filter"] = m[f"ns_per_pkt_{fam}_established"] / xf
        m[f"ratio_xdp_filter_{fam}_over_empty_xdp"] = xf / m["ns_empty_xdp"]
    for fam in ("v4", "v6"):
        base = m[f"ns_tc_egress_{fam}_10_rules_allow"]
        m[f"ratio_{fam}_egress_fqdn_hit_over_static"] = m[f"ns_tc_egress_{fam}_fqdn_allow"] / base
        m[f"ratio_{fam}_egress_fqdn_miss_over_static"] = m[f"ns_tc_egress_{fam}_fqdn_static"] / base
        m[f"ratio_{fam}_egress_max_over_empty_tc"] = m[f"ns_tc_egress_{fam}_max_policy_allow"] / m["ns_empty_tc"]
        m[f"ratio_{fam}_egress_10_rules_over_empty_tc"] = m[f"ns_tc_egress_{fam}_10_rules_allow"] / m["ns_empty_tc"]
    m["repeat"] = float(repeat)
    m["batches"] = float(batches)
    m["pinned_cpu"] = float(-1 if cpu is None else cpu)
    return dict(sorted(m.items()))
