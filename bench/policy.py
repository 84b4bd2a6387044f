"""Suite `policy`: the policy tooling on the max policy (4096 rules, 100k IPv4 + 10k IPv6 prefixes;
bench/policies.py) — lint, diff, invariants, explain, and how many test cases per second the reference
model judges (docs/benchmarks.md, docs/policy.md "Tooling").

Pure Python and NumPy: no BPF, no root. Each figure is the median of a few runs on a freshly loaded
policy (parsing is reported apart as load_s). Baselines in the same run: compile_s (what `apply`
pays to compile the same policy into the datapath's tables; lint and diff work on those tables) and
the scalar reference model (enforcer/reference.evaluate, one packet at a time), against which the
batch form that `test` uses is measured.

- lint_s: decision table (compile + class membership + owner sweep) + every finding.
- diff_s: two max policies that differ in 32 edited, 8 removed and 8 added rules and one peers file
  line set; diff_s_unrelated: two max policies of different seeds (every rule differs).
- test_cases_per_s: cases judged by the reference model (batch + conntrack model for the 10 % with a
  state) and compared with their expectations, from parsed cases; test_e2e_cases_per_s adds reading
  and validating the YAML cases file.
"""
from __future__ import annotations

import ipaddress
import random
import statistics
import sys
import time
from pathlib import Path

from . import policies as P

TARGETS = {
    "lint_s": ("<= 5 s", lambda m: m["lint_s"] <= 5.0),
    "diff_s": ("<= 5 s", lambda m: m["diff_s"] <= 5.0),
    "diff_s_unrelated": ("<= 5 s", lambda m: m["diff_s_unrelated"] <= 5.0),
    "test_cases_per_s": (">= 100k/s", lambda m: m["test_cases_per_s"] >= 100_000),
}

NOTES = """\
max policy = 4096 rules + 100k IPv4 + 10k IPv6 prefixes. lint_s and diff_s include compiling the
policies into the datapath's tables (compile_s is that alone); test_cases_per_s judges parsed cases by
the reference model (10 % of them with a connection state), test_e2e_cases_per_s also reads the YAML;
reference_scalar_cases_per_s is the one-packet-at-a-time reference model on the same policy."""


def _log(msg: str) -> None:
    print(f"[policy] {msg}", file=sys.stderr, flush=True)


def _median(fn, n: int) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _edited(src: Path, dst: Path, seed: int) -> None:
    """A copy of a generated policy with 32 rules edited, 8 removed, 8 added (the peers files kept)."""
    rng = random.Random(seed)
    lines = src.read_text().splitlines()
    rule_idx = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("- {name: r")]
    for i in rng.sample(rule_idx, 32):
        lines[i] = lines[i].replace("action: allow", "action: TMP").replace("action: deny", "action: allow") \
            .replace("action: TMP", "action: deny")
    for i in sorted(rng.sample(rule_idx, 8), reverse=True):
        del lines[i]
    at = lines.index("rules:") + 3
    for k in range(8):
        lines.insert(at, f"  - {{name: added-{k}, priority: {20 + k}, direction: ingress, action: deny, protocol: tcp, "
                         f"peers: [10.{k}.0.0/16], ports: [{1000 + k}]}}")
    dst.write_text("\n".join(lines) + "\n")
    for f in src.parent.glob("*.txt"):
        if not (dst.parent / f.name).exists():
            (dst.parent / f.name).write_bytes(f.read_bytes())


def _cases(n: int, seed: int = 3):
    from hostwall.enforcer.analysis.cases import Case, Expect
    from hostwall.enforcer.analysis.packet import CasePacket
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fam = 4 if rng.random() < 0.8 else 6
        peer = str(ipaddress.IPv4Address(rng.randrange(1 << 32)) if fam == 4 else ipaddress.IPv6Address(rng.randrange(1 << 128)))
        local = P.LOCAL_V4 if fam == 4 else P.LOCAL_V6
        d = rng.choice(["ingress", "egress"])
        proto = rng.choice([6, 6, 17, 1 if fam == 4 else 58])
        src, dst = (peer, local) if d == "ingress" else (local, peer)
        state = "reply" if rng.random() < 0.1 and proto in (6, 17) else "new"
        ported = proto in (6, 17)
        p = CasePacket(d, proto, src, dst, 40000 if ported else 0, rng.randrange(1, 65536) if ported else 0,
                       ("SA" if state == "reply" else "S") if proto == 6 else "", state=state)
        out.append(Case(f"case {i}", i + 1, p, Expect(verdict=rng.choice(["allow", "drop"]))))
    return out


def _cases_yaml(cases) -> str:
    lines = ["cases:"]
    for c in cases:
        lines += [f"  - name: {c.name}", f"    packet: \"{c.packet.text()}\"", f"    expect: {c.expect.verdict}"]
    return "\n".join(lines) + "\n"


def run(quick: bool) -> dict[str, float]:
    from hostwall.enforcer.analysis.cases import CaseFile, parse_cases
    from hostwall.enforcer.analysis.diff import diff
    from hostwall.enforcer.analysis.explain import explain
    from hostwall.enforcer.analysis.invariants import check_invariant
    from hostwall.enforcer.analysis.judge import run_tests
    from hostwall.enforcer.analysis.lint import lint
    from hostwall.enforcer.analysis.packet import parse_packet
    from hostwall.enforcer.analysis.table import decision_table
    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.policy import load_policy
    from hostwall.enforcer.reference import evaluate
    reps = 1 if quick else 3
    m: dict[str, float] = {}
    with P.tempdir() as d:
        _log("generating the max policies")
        a = P.max_policy(Path(d) / "a", seed=1)
        b = P.max_policy(Path(d) / "b", seed=2)
        edited = Path(d) / "a" / "edited.yaml"
        _edited(Path(a.path), edited, 7)
        t = time.perf_counter()
        pa = load_policy(a.path)
        m["load_s"] = time.perf_counter() - t
        pb, pe = load_policy(b.path), load_policy(edited)
        m["rules"], m["prefixes"] = len(pa.rules), pa.prefix_count
        m["compile_s"] = _median(lambda: compile_policy(pa, {r.name: i for i, r in enumerate(pa.rules)}, 1), reps)
        _log("lint")
        found = []
        m["lint_s"] = _median(lambda: found.append(lint(pa)), reps)
        m["lint_findings"] = len(found[-1])
        _log("diff")
        dd = []
        m["diff_s"] = _median(lambda: dd.append(diff(pa, pe)), reps)
        m["diff_regions"] = len(dd[-1].changes)
        m["diff_s_unrelated"] = _median(lambda: dd.append(diff(pa, pb)), 1)
        m["diff_regions_unrelated"] = len(dd[-1].changes)
        _log("invariants and explain")
        cf = parse_cases("invariants:\n"
                         "  - {name: a, never: {direction: ingress, protocol: tcp, ports: [22], from: 0.0.0.0/0}}\n"
                         "  - {name: b, always: {direction: ingress, protocol: tcp, ports: [50001], from: 198.18.7.0/24}}\n"
                         "  - {name: c, never: {direction: egress, protocol: udp, ports: [53], to: \"::/0\"}}\n", "inv.yaml", pa)
        dt = decision_table(pa)
        dt.owners()
        m["invariant_ms"] = 1e3 * _median(lambda: [check_invariant(pa, dt, i, cf.local) for i in cf.invariants], reps) \
            / len(cf.invariants)
        pkt = parse_packet(f"ingress tcp {P.PROBE_SRC_V4}:4000 -> {P.LOCAL_V4}:{P.PROBE_PORT_IN}")
        m["explain_s"] = _median(lambda: explain(pa, pkt, dt), reps)
        _log("test cases")
        n = 20_000 if quick else 100_000
        cases = _cases(n)
        cfile = CaseFile("bench.yaml", cases=cases)
        m["test_cases"] = n
        t = _median(lambda: run_tests(pa, cfile), 2 * reps - 1)
        m["test_cases_per_s"] = n / t
        text = _cases_yaml(cases[: n // 5])

        def e2e():
            run_tests(pa, parse_cases(text, "bench.yaml", pa))
        m["test_e2e_cases_per_s"] = (n // 5) / _median(e2e, 1)
        k = 50
        sample = [c.packet.reference() for c in cases[:k]]
        t = time.perf_counter()
        for p in sample:
            evaluate(pa, p)
        m["reference_scalar_cases_per_s"] = k / (time.perf_counter() - t)
        m["batch_over_scalar"] = m["test_cases_per_s"] / m["reference_scalar_cases_per_s"]
    return m
