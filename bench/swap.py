"""Suite `swap`: how long a policy change takes, and how long the switch itself is.

One apply = parse (enforcer.policy.load_policy: YAML, JSON Schema, semantic checks, peers files)
+ compile (enforcer.compiler.compile_policy: bit-vector classes and interval tables)
+ install (Datapath.install: RCU barrier, write the standby generation, flip hw_config.gen).

The suite loads the datapath once (not attached to any interface), then applies two different max
policies (4096 rules, one 100k-prefix IPv4 and one 10k-prefix IPv6 peers_file rule; different seeds
and a different allowed probe port) alternately and reports the median of several swaps. After
every switch a test-run checks that the new policy is the one in force (its probe passes by its last
rule; the other policy's probe falls to default deny), so a swap that did not take effect fails the
suite instead of producing a number.

Baseline in the same run: applies of a 10-rule policy (apply_10_rules_s), i.e. the fixed cost of an
apply without the size of the max policy. The first apply of the process is reported apart
(first_apply_s: it also maps the policy arrays and creates the RCU barrier); a `hostwall-enforcer
apply` command additionally pays interpreter start-up and imports, which this suite does not time.
"""
from __future__ import annotations

import statistics
import sys
import time

from hostwall.enforcer.reference import Packet

from . import policies as P
from .datapath import TCP_ACK, Runner, tcp_frame

TARGETS = {
    "apply_s": ("<= 1 s", lambda m: m["apply_s"] <= 1.0),
    "switch_ms": ("<= 1 ms", lambda m: m["switch_ms"] <= 1.0),
}

NOTES = """\
apply_s = parse + compile + install of the max policy (4096 rules + 100k IPv4 + 10k IPv6 prefixes),
median over alternating swaps between two different max policies; switch_ms = the generation flip
(the moment the new policy takes effect); barrier_ms = RCU grace period before writing the standby half."""

PORT_A, PORT_B = P.PROBE_PORT_IN, P.PROBE_PORT_IN + 10


def _log(msg: str) -> None:
    print(f"[swap] {msg}", file=sys.stderr, flush=True)


def _apply(dp, path, slots: dict[str, int], revision_id: int) -> dict[str, float]:
    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.policy import load_policy
    t0 = time.perf_counter()
    pol = load_policy(path)
    t1 = time.perf_counter()
    cp = compile_policy(pol, slots, revision_id)
    t2 = time.perf_counter()
    st = dp.install(cp)
    t3 = time.perf_counter()
    return {"apply_s": t3 - t0, "parse_s": t1 - t0, "compile_s": t2 - t1, "install_s": t3 - t2,
            "write_s": st.write_s, "barrier_ms": st.barrier_s * 1e3, "switch_ms": st.switch_s * 1e3}


def _check_active(runner: Runner, port_on: int, port_off: int, what: str) -> None:
    """The probe to port_on passes by probe-ingress, the one to port_off falls to default deny."""
    for fam, src, dst in ((4, P.PROBE_SRC_V4, P.LOCAL_V4), (6, P.PROBE_SRC_V6, P.LOCAL_V6)):
        on = Packet("ingress", fam, src, dst, 6, 40000, port_on)
        off = Packet("ingress", fam, src, dst, 6, 40000, port_off)
        runner.expect("xdp_ingress", tcp_frame(on, TCP_ACK), "allow", "pass_rule", "probe-ingress",
                      f"after {what}: v{fam} probe of the new policy")
        runner.expect("xdp_ingress", tcp_frame(off, TCP_ACK), "drop", "default_deny", None,
                      f"after {what}: v{fam} probe of the old policy")


def run(quick: bool) -> dict[str, float]:
    from hostwall.enforcer.datapath import Datapath
    from hostwall.enforcer.policy import load_policy

    swaps = 3 if quick else 7
    m: dict[str, float] = {}
    with P.tempdir() as d:
        t0 = time.perf_counter()
        a = P.max_policy(d, seed=1, probe_port_in=PORT_A)
        b = P.max_policy(d, seed=2, probe_port_in=PORT_B)
        small = P.generate(d, 10, seed=3, probe_port_in=PORT_A)
        names: list[str] = []
        for bp in (a, b, small):       # the probes must take their paths (reference model)
            pol = load_policy(bp.path)
            P.check_probes(pol, bp.probes)
            names += [r.name for r in pol.rules]
        # one stable counter slot per rule name, as the enforcer keeps them across real swaps (the two
        # max policies share their rule names)
        slots = {n: i for i, n in enumerate(dict.fromkeys(names))}
        _log(f"policies written and checked in {time.perf_counter() - t0:.1f} s; "
             f"{a.v4_prefixes} v4 / {a.v6_prefixes} v6 prefixes each")
        dp = Datapath.load()
        try:
            runner = Runner(dp, {i: n for n, i in slots.items()})
            first = _apply(dp, a.path, slots, 1)
            _check_active(runner, PORT_A, PORT_B, "first apply")
            m["first_apply_s"] = first["apply_s"]
            runs = []
            for i in range(swaps):
                bp, on, off = (b, PORT_B, PORT_A) if i % 2 == 0 else (a, PORT_A, PORT_B)
                r = _apply(dp, bp.path, slots, 2 + i)
                _check_active(runner, on, off, f"swap {i + 1}")
                runs.append(r)
                _log(f"swap {i + 1}/{swaps}: apply {r['apply_s']:.2f} s (parse {r['parse_s']:.2f}, "
                     f"compile {r['compile_s']:.2f}, install {r['install_s']:.3f}), switch {r['switch_ms']:.3f} ms")
            for k in runs[0]:
                m[k] = float(statistics.median(r[k] for r in runs))
            m["switch_ms_max"] = max(r["switch_ms"] for r in runs)
            m["apply_s_max"] = max(r["apply_s"] for r in runs)
            base = []
            for i in range(swaps):
                base.append(_apply(dp, small.path, slots, 100 + i))
                _check_active(runner, PORT_A, PORT_B, f"10-rule apply {i + 1}")
            m["apply_10_rules_s"] = float(statistics.median(r["apply_s"] for r in base))
            m["switch_10_rules_ms"] = float(statistics.median(r["switch_ms"] for r in base))
            m["swaps"] = float(swaps)
        finally:
            dp.close()
    return m
