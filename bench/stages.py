"""Where the established path's ns go: builds of xdp_ingress that return at a point, timed with the
`datapath` suite's own interleaved test-run loop (bench.datapath._measure) next to the empty XDP program.

    python -m hostwall.bench.stages [--src DIR[:LABEL]]... [--stops env,parse,...] [--runs N] [--max]

Each `--src` is a bpf/ directory (default: this tree's), so two trees (main and a branch) are compared
in the same rounds. Per source and stop a build is loaded; the established flow (SYN in, SYN-ACK out,
the ACK checked through the counted exit) is opened in the full build, and its conntrack tables copied
into the others (same seed), so every build times the same ACK of a tracked connection. Stops (each
cumulative, docs/benchmarks.md "Established path: where the ns go"): `env` (per-CPU scratch, env_init,
memset), `parse`, `dos` (dos_check), `find` (ct_find), `advance` (ct_advance), `full` (+ xdp_exit:
the counters). Measurement-only variants of the full build remove one piece: `noatomic`, `nolearn`,
`noexpired`, `nomemset`, `nocount`, `nodos`. Reported per case: the fastest batch of each run (`_min`
is what other work on the machine disturbs least) and their median over runs. Cost: ~8 s of compile
and load per build (more with `--max`), then runs x batches x repeat test-runs.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import hostwall.bpf.layout as L
from hostwall.bpf import conntrack as CT
from hostwall.enforcer.reference import Packet

from . import datapath as D
from . import policies as P

_FAST = "int xdp_ingress(struct xdp_md *ctx)"
# stop -> (anchor after _FAST, text inserted after it); the return value keeps the work before it
STOPS = {
    "env": ("__builtin_memset(p, 0, sizeof(*p));", "\n\treturn XDP_PASS;"),
    "parse": ("p->ifindex = ctx->ingress_ifindex;", "\n\treturn rc == PARSE_OK ? XDP_PASS : XDP_DROP;"),
    "dos": ("j.revision_id = h ? h->revision_id : 0;\n\t\treturn xdp_exit(ctx, &v, p, &j);\n\t}",
            "\n\treturn XDP_PASS;"),
    "find": ("p->proto, &r)) {", "\n\t\t\treturn XDP_PASS;"),
    "advance": ("int adv = ct_advance(&v, p, &r, 1);", "\n\t\t\tif (adv == 1) return XDP_PASS;"),
}
VARIANTS = {
    "noatomic": [("__sync_fetch_and_add(&e->packets[!from_init], 1);", "e->packets[!from_init] += 1;"),
                 ("__sync_fetch_and_add(&e->bytes[!from_init], p->len);", "e->bytes[!from_init] += p->len;")],
    "nolearn": [("\t\tct_seq_learn(e, p, !from_init, st, peer);\n\tif (ns != st)", "\t\t;\n\tif (ns != st)")],
    "noexpired": [("if (!e || ct_expired(v, e, proto))", "if (!e)")],
    "nomemset": [("__builtin_memset(p, 0, sizeof(*p));\n\tint rc = parse_pkt(", "int rc = parse_pkt(")],
    "nocount": [("struct judgement *j)\n{\n\tcount(v, p, j);",
                 "struct judgement *j)\n{\n\tif (j->reason != HW_R_PASS_CONNTRACK)\n\t\tcount(v, p, j);")],
    "nodos": [("__u32 dos = dos_check(&v, p);", "__u32 dos = 0;")],
}


def build_text(root: Path, stop: str) -> str:
    """The program text of the bpf/ directory `root` (headers inlined, as layout.program_text), cut at
    `stop` or with a variant's replacements; each anchor must occur exactly once."""
    src = L._LOCAL_INCLUDE.sub(lambda m: m.group(0) if m.group(1) == L.HEADER.name else
                               (root / m.group(1)).read_text(), (root / L.BPF_SOURCE.name).read_text())
    for old, new in VARIANTS.get(stop, []):
        if src.count(old) != 1:
            raise ValueError(f"{stop}: anchor {old!r} occurs {src.count(old)} times")
        src = src.replace(old, new)
    if stop in STOPS:
        anchor, ins = STOPS[stop]
        at = src.index(anchor, src.index(_FAST)) + len(anchor)
        src = src[:at] + ins + src[at:]
    return src


def _load(root: Path, stop: str):
    from hostwall.enforcer.datapath import Datapath
    orig = L.program_text
    L.program_text = lambda: build_text(root, stop)
    try:
        return Datapath.load()
    finally:
        L.program_text = orig


def _established(dp, slot_names: dict[int, str], bp: P.BenchPolicy) -> dict[int, bytes]:
    """Open the timed flow of each family in the full build (checked through the counted exit): its ACK."""
    run, frames = D.Runner(dp, slot_names), {}
    for fam in (4, 6):
        syn = bp.probes[(fam, "allow")].packet
        syn = Packet(syn.direction, fam, syn.src, syn.dst, 6, D.EST_SPORT, syn.dport)
        run.expect("xdp_ingress", D.tcp_frame(syn, D.TCP_SYN), "allow", "pass_rule", "probe-ingress", "SYN")
        run.expect("tc_egress", D.tcp_frame(D.reply(syn), D.TCP_SYN | D.TCP_ACK), "allow", "pass_conntrack", None,
                   "SYN-ACK")
        frames[fam] = D.tcp_frame(syn, D.TCP_ACK)
        run.expect("xdp_ingress", frames[fam], "allow", "pass_conntrack", None, "ACK")
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append", default=[], help="a bpf/ directory[:label] (repeatable)")
    ap.add_argument("--stops", default="env,parse,dos,find,advance,full")
    ap.add_argument("--repeat", type=int, default=100_000)
    ap.add_argument("--batches", type=int, default=25)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max", action="store_true", help="the max policy (default: 10 rules; the path is the same)")
    a = ap.parse_args()
    srcs = [(Path(s.split(":")[0]), s.split(":")[1] if ":" in s else s) for s in a.src] or [(L.HEADER.parent, "tree")]
    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.policy import load_policy
    dps = []
    with P.tempdir() as d:
        bp = P.max_policy(d, seed=1) if a.max else P.generate(d, 10, seed=1)
        pol = load_policy(bp.path)
        slots = {r.name: i for i, r in enumerate(pol.rules)}
        cp = compile_policy(pol, slots, revision_id=bp.n_rules)
        empty_mod, empty_xdp, _ = D._empty_programs()
        cases = [D.Case("empty", empty_xdp, D.tcp_frame(bp.probes[(4, "allow")].packet, D.TCP_ACK), D.XDP_PASS)]
        try:
            for root, label in srcs:
                full = _load(root, "full")
                dps.append(full)
                full.install(cp)
                full.clear_conntrack()
                frames = _established(full, {i: n for n, i in slots.items()}, bp)
                for stop in a.stops.split(","):
                    dp = full
                    if stop != "full":
                        dp = _load(root, stop)
                        dps.append(dp)
                        dp.install(cp)
                        dp.set_config(table_seed=int(full.config()["table_seed"]))
                        CT.copy_tables(full.map_fds, dp.map_fds)
                    cases += [D.Case(f"{label}/{stop}/v{fam}", dp.prog_fds["xdp_ingress"], frames[fam], D.XDP_PASS)
                              for fam in (4, 6)]
            mins: dict[str, list[float]] = {c.name: [] for c in cases}
            for _ in range(a.runs):
                for c in cases:
                    c.runs = []
                D._measure(cases, a.repeat, a.batches)
                for c in cases:
                    mins[c.name].append(min(c.runs))
        finally:
            for dp in dps:
                dp.close()
            empty_mod.cleanup()
    print(f"{'case':32s} {'median _min':>11s}   _min per run (ns)")
    for name, v in mins.items():
        print(f"{name:32s} {statistics.median(v):11.1f}   {v}")


if __name__ == "__main__":
    main()
