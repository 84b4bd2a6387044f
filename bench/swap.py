"""Suite `swap`: how long a policy change takes, and how long the switch itself is.

One apply = parse (enforcer.policy.load_policy: YAML, JSON Schema, semantic checks, peers files)
+ compile (enforcer.compiler.compile_policy: bit-vector classes and interval tables)
+ install (Datapath.install: RCU barrier, write the records of the standby generation that differ,
flip hw_config.gen).

The suite loads the datapath once (not attached to any interface) and rotates three max policies
(4096 rules, one 100k-prefix IPv4 and one 10k-prefix IPv6 peers_file rule; different seeds, the same
blocklist contents, a different allowed probe port), cold (every cache dropped) and warm, interleaved.
Then one rule of the policy in force changes again and again (incremental_apply_ms), first as a
changed Policy object, then as an edit of the policy file. After every switch a test-run checks that
the new policy is the one in force, so a swap that did not take effect fails the suite instead of
producing a number (docs/benchmarks.md "swap").

Baseline in the same run: applies of a 10-rule policy (apply_10_rules_s), i.e. the fixed cost of an
apply without the size of the max policy. The first apply of the process is reported apart
(first_apply_s: it also maps the policy arrays and creates the RCU barrier); a `hostwall-enforcer
apply` command additionally pays interpreter start-up and imports, which this suite does not time.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import statistics
import sys
import time

from hostwall.enforcer.reference import Packet

from . import policies as P
from .datapath import TCP_ACK, Runner, tcp_frame

TARGETS = {
    "apply_s": ("<= 0.3 s", lambda m: m["apply_s"] <= 0.3),
    "switch_ms": ("<= 1 ms", lambda m: m["switch_ms"] <= 1.0),
    "incremental_apply_ms": ("<= 20 ms", lambda m: m["incremental_apply_ms"] <= 20.0),
}

NOTES = """\
apply_s = parse + compile + install of a new max policy (4096 rules + 100k IPv4 + 10k IPv6 prefixes) whose
peers files were applied before (content-hash cache), median over swaps between three max policies;
apply_cold_s = the same with every cache dropped first; incremental_apply_ms = compile + install of the
policy in force with one rule's ports or action changed; switch_ms = the generation flip; barrier_ms =
what is left of the RCU grace period (it starts on a thread right after the previous flip)."""

PORT_A, PORT_B, PORT_C = P.PROBE_PORT_IN, P.PROBE_PORT_IN + 10, P.PROBE_PORT_IN + 20
NEW_PORT = P.PROBE_PORT_IN + 200     # no rule of the benchmark policies names it


def _log(msg: str) -> None:
    print(f"[swap] {msg}", file=sys.stderr, flush=True)


def _apply(dp, path, slots: dict[str, int], revision_id: int) -> dict[str, float]:
    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.policy import load_policy
    c0, t0 = time.process_time(), time.perf_counter()
    pol = load_policy(path)
    c1, t1 = time.process_time(), time.perf_counter()
    cp = compile_policy(pol, slots, revision_id)
    t2 = time.perf_counter()
    st = dp.install(cp)
    c3, t3 = time.process_time(), time.perf_counter()
    # CPU time of the process (on a shared machine, less inflated by other load than the wall time)
    return {"apply_s": t3 - t0, "parse_s": t1 - t0, "compile_s": t2 - t1, "install_s": t3 - t2,
            "apply_cpu_s": c3 - c0, "parse_cpu_s": c1 - c0,
            "write_s": st.write_s, "barrier_ms": st.barrier_s * 1e3, "switch_ms": st.switch_s * 1e3,
            "written_records": float(sum(st.written.values()))}


def _check_active(runner: Runner, port_on: int, ports_off: tuple[int, ...], what: str) -> None:
    """The probe to port_on passes by probe-ingress, those to ports_off fall to default deny."""
    for fam, src, dst in ((4, P.PROBE_SRC_V4, P.LOCAL_V4), (6, P.PROBE_SRC_V6, P.LOCAL_V6)):
        on = Packet("ingress", fam, src, dst, 6, 40000, port_on)
        runner.expect("xdp_ingress", tcp_frame(on, TCP_ACK), "allow", "pass_rule", "probe-ingress",
                      f"after {what}: v{fam} probe of the new policy")
        for port_off in ports_off:
            off = Packet("ingress", fam, src, dst, 6, 40000, port_off)
            runner.expect("xdp_ingress", tcp_frame(off, TCP_ACK), "drop", "default_deny", None,
                          f"after {what}: v{fam} probe of another policy")


def _share_blocklists(src, dst) -> None:
    """Give policy `dst` the peers files' contents of `src` (its own rules stay): a new rule set
    over unchanged blocklists, the common re-apply."""
    stem_s, stem_d = (str(p.path).rsplit(".", 1)[0] for p in (src, dst))
    for fam in ("v4", "v6"):
        with open(f"{stem_s}-block-{fam}.txt", "rb") as fi, open(f"{stem_d}-block-{fam}.txt", "wb") as fo:
            fo.write(fi.read())


def _swaps(dp, runner, pols, slots, swaps: int, rev0: int, cold: bool, what: str) -> list[dict[str, float]]:
    from hostwall.enforcer.compiler import clear_memo
    from hostwall.enforcer.policy import clear_peer_file_cache
    from hostwall.yamldoc import clear_tag_memo
    from hostwall.yamlplain import clear_flow_memo
    ports = [port for _, port in pols]
    runs = []
    for i in range(swaps):
        bp, on = pols[(i + 1) % len(pols)]
        if cold:
            clear_memo()
            clear_peer_file_cache()
            clear_tag_memo()
            clear_flow_memo()
        r = _apply(dp, bp.path, slots, rev0 + i)
        _check_active(runner, on, tuple(p for p in ports if p != on), f"{what} {i + 1}")
        runs.append(r)
        _log(f"{what} {i + 1}/{swaps}: apply {r['apply_s']:.3f} s (parse {r['parse_s']:.3f}, compile "
             f"{r['compile_s']:.3f}, install {r['install_s']:.3f}: barrier {r['barrier_ms']:.1f} ms, write "
             f"{r['write_s'] * 1e3:.1f} ms), switch {r['switch_ms']:.3f} ms")
    return runs


def run(quick: bool) -> dict[str, float]:
    from hostwall.enforcer.datapath import Datapath
    from hostwall.enforcer.policy import load_policy

    swaps = 3 if quick else 7
    m: dict[str, float] = {}
    with P.tempdir() as d:
        t0 = time.perf_counter()
        maxes = [P.max_policy(d, seed=s, probe_port_in=port) for s, port in ((1, PORT_A), (2, PORT_B), (3, PORT_C))]
        for bp in maxes[1:]:
            _share_blocklists(maxes[0], bp)
        small = P.generate(d, 10, seed=4, probe_port_in=PORT_A)
        names: list[str] = []
        for bp in (*maxes, small):       # the probes must take their paths (reference model)
            pol = load_policy(bp.path)
            P.check_probes(pol, bp.probes)
            names += [r.name for r in pol.rules]
        # one stable counter slot per rule name, as the enforcer keeps them across real swaps (the
        # max policies share their rule names)
        slots = {n: i for i, n in enumerate(dict.fromkeys(names))}
        _log(f"policies written and checked in {time.perf_counter() - t0:.1f} s; "
             f"{maxes[0].v4_prefixes} v4 / {maxes[0].v6_prefixes} v6 prefixes each")
        pols = list(zip(maxes, (PORT_A, PORT_B, PORT_C)))
        dp = Datapath.load()
        try:
            runner = Runner(dp, {i: n for n, i in slots.items()})
            first = _apply(dp, maxes[0].path, slots, 1)
            _check_active(runner, PORT_A, (PORT_B, PORT_C), "first apply")
            m["first_apply_s"] = first["apply_s"]
            # cold and warm interleaved, so both see the same load
            cold, warm = [], []
            for i in range(swaps):
                cold += _swaps(dp, runner, pols, slots, 1, 10 + 2 * i, True, "cold apply")
                pols = pols[1:] + pols[:1]
                warm += _swaps(dp, runner, pols, slots, 1, 11 + 2 * i, False, "apply")
                pols = pols[1:] + pols[:1]
            for k in warm[0]:
                m[k] = float(statistics.median(r[k] for r in warm))
            m["switch_ms_max"] = max(r["switch_ms"] for r in warm + cold)
            m["apply_s_max"] = max(r["apply_s"] for r in warm)
            for k in ("apply_s", "parse_s", "compile_s", "install_s", "write_s", "apply_cpu_s", "parse_cpu_s"):
                m[k.replace("_s", "_cold_s", 1)] = float(statistics.median(r[k] for r in cold))
            m.update(_incremental(dp, runner, maxes[0], slots, 3 * swaps))
            base = []
            for i in range(swaps):
                base.append(_apply(dp, small.path, slots, 100 + i))
                _check_active(runner, PORT_A, (PORT_B, PORT_C), f"10-rule apply {i + 1}")
            m["apply_10_rules_s"] = float(statistics.median(r["apply_s"] for r in base))
            m["switch_10_rules_ms"] = float(statistics.median(r["switch_ms"] for r in base))
            m["swaps"] = float(swaps)
        finally:
            dp.close()
    return m


def _nonzero(d: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in d.items() if v}


def _target_rule(pol):
    """A tcp ingress allow/deny rule with inline IPv4 peers and the packet that tests it on NEW_PORT."""
    for r in pol.rules:
        if (r.direction == "ingress" and r.protocol == "tcp" and r.action in ("allow", "deny") and not r.peers.any
                and len(r.peers.v4_net) and r.ports is not None and r.name.startswith("r")):
            src = str(ipaddress.IPv4Address(int(r.peers.v4_net[0]) + 1))
            return r, Packet("ingress", 4, src, P.LOCAL_V4, 6, 40000, NEW_PORT)
    raise RuntimeError("no rule to change incrementally in the max policy")


def _incremental(dp, runner, bp, slots, steps: int) -> dict[str, float]:
    """Apply the max policy, then change one rule at a time: its ports to NEW_PORT, its action, its ports
    back, its action back (a cycle of four). After each: the changed rule's packet gets the verdict the
    reference model gives for the new policy, and the probes are as before."""
    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.policy import load_policy
    from hostwall.enforcer.reference import evaluate

    base = load_policy(bp.path)
    dp.install(compile_policy(base, slots, 500))
    dp.install(compile_policy(base, slots, 501))        # both halves hold the base policy
    rule, pkt = _target_rule(base)
    k = base.rules.index(rule)
    flip = {"allow": "deny", "deny": "allow"}
    pol, runs = base, []
    for i in range(steps):
        r = pol.rules[k]
        step = i % 4
        changed = (dataclasses.replace(r, ports=((NEW_PORT, NEW_PORT),)) if step == 0 else
                   dataclasses.replace(r, ports=rule.ports) if step == 2 else
                   dataclasses.replace(r, action=flip[r.action]))
        t0 = time.perf_counter()
        pol = dataclasses.replace(pol, rules=pol.rules[:k] + (changed,) + pol.rules[k + 1:])
        cp = compile_policy(pol, slots, 502 + i)
        t1 = time.perf_counter()
        st = dp.install(cp)
        t2 = time.perf_counter()
        want = evaluate(pol, pkt)
        reason = "pass_rule" if want.verdict == "allow" else want.reason
        runner.expect("xdp_ingress", tcp_frame(pkt, TCP_ACK), want.verdict, reason, want.rule,
                      f"incremental change {i + 1} of rule {rule.name}")
        _check_active(runner, PORT_A, (PORT_B,), f"incremental change {i + 1}")
        runs.append({"incremental_apply_ms": (t2 - t0) * 1e3, "incremental_compile_ms": (t1 - t0) * 1e3,
                     "incremental_install_ms": (t2 - t1) * 1e3, "incremental_barrier_ms": st.barrier_s * 1e3,
                     "incremental_written_records": float(sum(st.written.values()))})
        _log(f"incremental {i + 1}/{steps} ({rule.name}: {('ports', 'action')[step % 2]}): "
             f"{runs[-1]['incremental_apply_ms']:.1f} ms (compile {runs[-1]['incremental_compile_ms']:.1f}, "
             f"install {runs[-1]['incremental_install_ms']:.1f}), records written {_nonzero(st.written)}")
    out = {k: float(statistics.median(r[k] for r in runs)) for k in runs[0]}
    out["incremental_apply_ms_max"] = max(r["incremental_apply_ms"] for r in runs)
    out["incremental_written_records_max"] = max(r["incremental_written_records"] for r in runs)
    out.update(_incremental_file(dp, runner, bp, slots, rule, pkt, max(2, steps // 4)))
    return out


def _incremental_file(dp, runner, bp, slots, rule, pkt, steps: int) -> dict[str, float]:
    """The same change made in the policy file, as an operator does before `apply` or SIGHUP: the file
    with rule's ports set to NEW_PORT, then the original, alternately; each step a whole apply (the
    YAML is parsed again; what is reused is what the caches hold)."""
    import os
    import re

    from hostwall.enforcer.policy import load_policy
    from hostwall.enforcer.reference import evaluate
    with open(bp.path) as f:
        text = f.read()
    pat = re.compile(r"^(  - \{name: " + re.escape(rule.name) + r",.*ports: )\[[^\]]*\]", re.M)
    edited, n = pat.subn(lambda m: f"{m.group(1)}[{NEW_PORT}]", text)
    if n != 1:
        raise RuntimeError(f"rule {rule.name} not found once in {bp.path}")
    path = os.path.join(os.path.dirname(bp.path), "incremental.yaml")
    runs = []
    for i in range(steps):
        with open(path, "w") as f:
            f.write(edited if i % 2 == 0 else text)
        r = _apply(dp, path, slots, 600 + i)
        want = evaluate(load_policy(path), pkt)
        runner.expect("xdp_ingress", tcp_frame(pkt, TCP_ACK), want.verdict,
                      "pass_rule" if want.verdict == "allow" else want.reason, want.rule,
                      f"file change {i + 1} of rule {rule.name}")
        runs.append(r)
        _log(f"incremental from the file {i + 1}/{steps}: {r['apply_s'] * 1e3:.1f} ms (parse "
             f"{r['parse_s'] * 1e3:.1f}, compile {r['compile_s'] * 1e3:.1f}, install {r['install_s'] * 1e3:.1f}), "
             f"{r['written_records']:.0f} records written")
    return {"incremental_file_apply_ms": statistics.median(r["apply_s"] for r in runs) * 1e3,
            "incremental_file_parse_ms": statistics.median(r["parse_s"] for r in runs) * 1e3,
            "incremental_file_written_records": statistics.median(r["written_records"] for r in runs)}
