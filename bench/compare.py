"""`python -m hostwall.bench.compare REV_A REV_B SUITE... [--rounds N] [--quick]` — the same suites at two
revisions, on one machine at one time (docs/benchmarks.md "Before/after the house change (issue 18)").

Each revision gets a detached git worktree in a private temporary directory, set up by its own
scripts/setup.sh (own .venv); the worktrees are removed at the end, also on failure or SIGTERM. The
suites then run interleaved: round by round, each suite at A then at B back to back, so both sides see
the same machine load. A revision from before the house change (no `hostwall` namespace) runs as
`python -m bench`, later ones as `python -m hostwall.bench`. `--results DIR` only tabulates the JSON of
an earlier run (files SUITE-a-rN.json / SUITE-b-rN.json).

The table holds the ratio metrics (against a baseline of the same run, the figures that count on a
shared machine) present on both sides, plus a few derived ratios (DERIVED): per side the median over
rounds and the spread ((max - min) / median over its rounds: the noise floor of the comparison), then
B against A in %. Stdlib only.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RATIO = re.compile(r"^ratio_|_over_|_vs_|speedup")
# name -> (numerator, denominator), computed where a suite reports both (older suites lack some ratios);
# the datapath's *_min (fastest batch) ratios move least with other work on the machine
_DP = ["ns_per_pkt_v4_10_rules", "ns_per_pkt_v6_10_rules", "ns_per_pkt_v4_established", "ns_per_pkt_v6_established"]
_DP_MIN = [("ns_xdp_v4_max_policy_allow_min", "ns_xdp_v4_10_rules_allow_min"),
           ("ns_xdp_v6_max_policy_allow_min", "ns_xdp_v6_10_rules_allow_min"),
           ("ns_tc_egress_v4_max_policy_allow_min", "ns_tc_egress_v4_10_rules_allow_min"),
           ("ns_xdp_v4_max_policy_allow_min", "ns_empty_xdp_min"),
           ("ns_xdp_v4_max_policy_established_min", "ns_empty_xdp_min")]
DERIVED: dict[str, dict[str, tuple[str, str]]] = {
    "datapath": {f"{m}/ns_empty_xdp": (m, "ns_empty_xdp") for m in _DP} | {f"{n}/{d}": (n, d) for n, d in _DP_MIN},
    "collector": {"e2e_jsonl_rps/decode_rps": ("e2e_jsonl_rps", "decode_rps")},
}
SIDES = ("a", "b")


def _log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def add_worktree(repo: Path, rev: str, path: Path, log: Path, patch: Path | None = None) -> None:
    """A detached worktree of `rev` at `path` (with `patch` applied, uncommitted), set up by its own
    scripts/setup.sh (log in `log`)."""
    _git(repo, "worktree", "add", "--detach", str(path), rev)
    if patch is not None:
        _git(path, "apply", str(patch.resolve()))
    _log(f"setting up {rev} in {path} (a few minutes; log {log})")
    with open(log, "w") as f:
        r = subprocess.run(["bash", "scripts/setup.sh"], cwd=path, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"setup of {rev} failed (exit {r.returncode}); see {log}")


def remove_worktree(repo: Path, path: Path) -> None:
    """`git worktree remove --force` (its .venv too), then prune; never raises."""
    r = subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)],
                       capture_output=True, text=True)
    if r.returncode and path.exists():
        _log(f"git worktree remove {path}: {r.stderr.strip()}; removing the directory")
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)


def bench_module(wt: Path) -> str:
    """`hostwall.bench` once the house change made the namespace, `bench` before it."""
    py = str(wt / ".venv/bin/python")
    r = subprocess.run([py, "-c", "import hostwall.bench"], cwd=wt, capture_output=True)
    return "hostwall.bench" if r.returncode == 0 else "bench"


def run_suite(wt: Path, module: str, suite: str, quick: bool, out: Path) -> dict | None:
    """One `--json` run; its JSON is kept in `out` (stderr beside it). None when the suite failed."""
    cmd = [str(wt / ".venv/bin/python"), "-m", module, suite, "--json"] + (["--quick"] if quick else [])
    with open(out.with_suffix(".err"), "w") as err:
        r = subprocess.run(cmd, cwd=wt, stdout=subprocess.PIPE, stderr=err, text=True)
    if r.returncode:
        _log(f"{out.stem}: exit {r.returncode}; see {out.with_suffix('.err')}")
        return None
    out.write_text(r.stdout)
    return json.loads(r.stdout)


Results = dict[str, dict[str, dict[int, dict]]]    # {suite: {side: {round: the run's JSON}}}


def load_results(d: Path) -> Results:
    """The runs kept as SUITE-SIDE-rN.json (a failed run has none), rounds in order."""
    res: Results = {}
    pat = re.compile(r"^(?P<suite>\w+)-(?P<side>[ab])-r(?P<n>\d+)\.json$")
    found = sorted((m["suite"], m["side"], int(m["n"]), f) for f in d.glob("*.json") if (m := pat.match(f.name)))
    for suite, side, n, f in found:
        res.setdefault(suite, {s: {} for s in SIDES})[side][n] = json.loads(f.read_text())
    return res


def ratios(suite: str, metrics: dict[str, float], match: re.Pattern) -> dict[str, float]:
    """The run's ratio metrics (names matching `match`) and the DERIVED ratios it has the parts of."""
    out = {k: float(v) for k, v in metrics.items() if match.search(k)}
    for name, (num, den) in DERIVED.get(suite, {}).items():
        if num in metrics and den in metrics and metrics[den]:
            out[name] = metrics[num] / metrics[den]
    return out


def compare(results: Results, match: re.Pattern = RATIO,
            tolerance: float = 5.0) -> tuple[list[dict], dict[str, list[str]]]:
    """Rows {suite, metric, a, b, spread_a, spread_b, diff_pct, within, pairs} for ratios on both sides
    (median over rounds; spread in % of the median; pairs: B vs A in % within each round that has both),
    and {suite: metrics found on one side only}."""
    rows: list[dict] = []
    one_sided: dict[str, list[str]] = {}
    for suite, sides in results.items():
        per = {s: {n: ratios(suite, r["metrics"], match) for n, r in sides.get(s, {}).items()} for s in SIDES}
        names = {s: set().union(*per[s].values()) for s in SIDES}
        one_sided[suite] = sorted(names["a"] ^ names["b"])
        for name in sorted(names["a"] & names["b"]):
            row: dict = {"suite": suite, "metric": name}
            for s in SIDES:
                vals = [r[name] for r in per[s].values() if name in r]
                med = statistics.median(vals)
                row[s], row[f"rounds_{s}"] = med, len(vals)
                row[f"spread_{s}"] = 100.0 * (max(vals) - min(vals)) / med if med else float("nan")
            row["diff_pct"] = 100.0 * (row["b"] - row["a"]) / row["a"] if row["a"] else float("nan")
            row["within"] = abs(row["diff_pct"]) <= tolerance
            row["pairs"] = [100.0 * (per["b"][n][name] / per["a"][n][name] - 1) for n in sorted(per["a"])
                            if n in per["b"] and name in per["a"][n] and name in per["b"][n] and per["a"][n][name]]
            rows.append(row)
    return rows, one_sided


def _num(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3g}"


def table(rows: list[dict], labels: tuple[str, str], tolerance: float) -> str:
    """Markdown: per metric the two medians, their spreads, B vs A and whether that is within tolerance;
    outside it, whether the difference is smaller than a side's own spread (noise) or not."""
    lines = [f"A = {labels[0]}, B = {labels[1]}; median over rounds, spread = (max - min) / median of a side",
             "",
             f"| suite | metric | A | spread A | B | spread B | B vs A | within {tolerance:g} % | B vs A per round (%) |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        noise = max(r["spread_a"], r["spread_b"])
        verdict = "yes" if r["within"] else ("no, < spread" if abs(r["diff_pct"]) <= noise else "**no**")
        lines.append(f"| {r['suite']} | `{r['metric']}` | {_num(r['a'])} | {r['spread_a']:.1f} % | "
                     f"{_num(r['b'])} | {r['spread_b']:.1f} % | {r['diff_pct']:+.1f} % | {verdict} | "
                     + " ".join(f"{p:+.0f}" for p in r["pairs"]) + " |")
    return "\n".join(lines)


def loads(results: Results) -> str:
    """One line per suite and side: the 1-minute load average at the start of each round."""
    out = []
    for suite, sides in results.items():
        for s in SIDES:
            ld = [r.get("machine", {}).get("loadavg_1m", float("nan")) for r in sides.get(s, {}).values()]
            out.append(f"{suite} {s}: load1 " + ", ".join(f"{x:.2f}" for x in ld))
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hostwall.bench.compare", description=__doc__.split("\n")[0])
    ap.add_argument("rev_a", help="revision A (e.g. the parent of a change)")
    ap.add_argument("rev_b", help="revision B")
    ap.add_argument("suites", nargs="*", help="suites to run (not with --results)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of A,B per suite (default 2)")
    ap.add_argument("--quick", action="store_true", help="the suites' --quick")
    ap.add_argument("--out", type=Path, help="directory for the runs' JSON/stderr (default: a new temp dir)")
    ap.add_argument("--patch", type=Path, help="apply this patch to both worktrees (e.g. a bench setting)")
    ap.add_argument("--results", type=Path, help="only tabulate the JSON already in this directory")
    ap.add_argument("--match", type=re.compile, default=RATIO, help="regex of metric names to compare")
    ap.add_argument("--tolerance", type=float, default=5.0, help="within this many %% counts as the same")
    a = ap.parse_args(argv)
    if a.rounds < 1 or (not a.suites and a.results is None):
        ap.error("give at least one suite (or --results DIR) and --rounds >= 1")
    return a


def measure(a: argparse.Namespace, repo: Path, out: Path) -> int:
    """Worktrees, set-up, the interleaved runs; returns the number of failed runs."""
    work = Path(tempfile.mkdtemp(prefix="hw-bench-compare-"))
    wts = {s: work / s for s in SIDES}
    failed = 0
    try:
        for s, rev in zip(SIDES, (a.rev_a, a.rev_b)):
            add_worktree(repo, rev, wts[s], out / f"setup-{s}.log", a.patch)
        mods = {s: bench_module(wts[s]) for s in SIDES}
        for n in range(1, a.rounds + 1):
            for suite in a.suites:
                for s in SIDES:
                    _log(f"round {n}/{a.rounds}: {suite} at {s} (python -m {mods[s]})")
                    failed += run_suite(wts[s], mods[s], suite, a.quick, out / f"{suite}-{s}-r{n}.json") is None
    finally:
        for s in SIDES:
            if wts[s].exists():
                remove_worktree(repo, wts[s])
        shutil.rmtree(work, ignore_errors=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # run the worktrees' clean-up
    repo = Path(_git(Path.cwd(), "rev-parse", "--show-toplevel"))
    shas = [_git(repo, "rev-parse", "--short", rev + "^{commit}") for rev in (a.rev_a, a.rev_b)]
    labels = tuple(rev if sha.startswith(rev) else f"{rev} ({sha})" for rev, sha in zip((a.rev_a, a.rev_b), shas))
    failed = 0
    if a.results is None:
        out = a.out or Path(tempfile.mkdtemp(prefix="hw-bench-compare-out-"))
        out.mkdir(parents=True, exist_ok=True)
        failed = measure(a, repo, out)
        _log(f"runs kept in {out}")
    results = load_results(a.results or out)
    rows, one_sided = compare(results, a.match, a.tolerance)
    print(table(rows, labels, a.tolerance))
    print()
    print(loads(results))
    for suite, names in one_sided.items():
        if names:
            print(f"{suite}: on one side only (not compared): {', '.join(names)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
