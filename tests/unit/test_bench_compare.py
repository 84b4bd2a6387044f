"""`python -m hostwall.bench.compare`: medians, spreads and verdicts from given runs, and the whole
worktree → set-up → interleaved runs → clean-up cycle on a throw-away git repo whose "suite" is a fake
(no BPF, no root)."""
from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

import hostwall.bench.compare as cmp


def _run(metrics, load=1.0):
    return {"suite": "x", "metrics": metrics, "machine": {"loadavg_1m": load}}


def _rounds(*runs):
    return {n: r for n, r in enumerate(runs, 1) if r is not None}


def test_medians_spreads_and_verdicts():
    results = {"datapath": {
        "a": _rounds(_run({"ratio_v4_max_over_10_rules": 2.0, "ns_per_pkt_v4_10_rules": 90, "ns_empty_xdp": 9,
                    "ns_only_abs": 5, "ratio_old_only": 1.0}),
                     _run({"ratio_v4_max_over_10_rules": 2.2, "ns_per_pkt_v4_10_rules": 110, "ns_empty_xdp": 10,
                    "ns_only_abs": 5, "ratio_old_only": 1.0})),
        "b": _rounds(_run({"ratio_v4_max_over_10_rules": 2.3, "ns_per_pkt_v4_10_rules": 100, "ns_empty_xdp": 10}),
                     _run({"ratio_v4_max_over_10_rules": 2.5, "ns_per_pkt_v4_10_rules": 100, "ns_empty_xdp": 10}))}}
    rows, one_sided = cmp.compare(results, tolerance=5.0)
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"ratio_v4_max_over_10_rules", "ns_per_pkt_v4_10_rules/ns_empty_xdp"}
    r = by["ratio_v4_max_over_10_rules"]
    assert r["a"] == pytest.approx(2.1) and r["b"] == pytest.approx(2.4)
    assert r["spread_a"] == pytest.approx(100 * 0.2 / 2.1)
    assert r["diff_pct"] == pytest.approx(100 * 0.3 / 2.1) and not r["within"]
    assert r["pairs"] == pytest.approx([15.0, 100 * (2.5 / 2.2 - 1)])
    d = by["ns_per_pkt_v4_10_rules/ns_empty_xdp"]          # derived per run, then the median
    assert d["a"] == pytest.approx(10.5) and d["b"] == pytest.approx(10.0) and d["within"]
    assert one_sided == {"datapath": ["ratio_old_only"]}
    text = cmp.table(rows, ("old", "new"), 5.0)
    assert text.startswith("A = old, B = new;")
    assert ("| datapath | `ratio_v4_max_over_10_rules` | 2.1 | 9.5 % | 2.4 | 8.3 % | +14.3 % | **no** | +15 +14 |"
            in text)
    assert "| -4.8 % | yes |" in text


def test_outside_tolerance_but_inside_noise():
    results = {"kafka": {"a": _rounds(_run({"kafka_vs_java": 1.0}), _run({"kafka_vs_java": 1.4}), None),
                         "b": _rounds(_run({"kafka_vs_java": 1.3}), None, _run({"kafka_vs_java": 1.3}))}}
    rows, _ = cmp.compare(results)                         # failed runs: rounds without their JSON
    assert rows[0]["diff_pct"] == pytest.approx(100 * 0.1 / 1.2)
    assert (rows[0]["rounds_a"], rows[0]["rounds_b"]) == (2, 2)
    assert rows[0]["pairs"] == pytest.approx([30.0])   # only round 1 has both sides
    assert "no, < spread" in cmp.table(rows, ("A", "B"), 5.0)


def test_load_results_orders_rounds(tmp_path):
    for n in (1, 2, 10):
        for s in ("a", "b"):
            (tmp_path / f"kafka-{s}-r{n}.json").write_text(json.dumps(_run({"kafka_vs_java": n}, load=n)))
    (tmp_path / "notes.json").write_text("{}")
    res = cmp.load_results(tmp_path)
    assert [(n, r["metrics"]["kafka_vs_java"]) for n, r in res["kafka"]["a"].items()] == [(1, 1), (2, 2), (10, 10)]
    assert cmp.loads(res).splitlines()[0] == "kafka a: load1 1.00, 2.00, 10.00"


@pytest.mark.parametrize("argv", [["A", "B"], ["A", "B", "kafka", "--rounds", "0"]])
def test_bad_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cmp.parse_args(argv)
    assert e.value.code == 2


FAKE_SETUP = """#!/usr/bin/env bash
set -e
mkdir -p .venv/bin
cat > .venv/bin/python <<'EOF'
#!/usr/bin/env bash
# the fake interpreter: `-c import ...` fails (no hostwall namespace); `-m bench SUITE --json` prints a run
[ "$1" = -c ] && exit 1
echo "{\\"suite\\": \\"$3\\", \\"metrics\\": {\\"ratio_x\\": $(cat value), \\"ratio_p\\": $(cat patched)}, \\"machine\\": {\\"loadavg_1m\\": 0.5}}"
echo "$3 $(basename "$PWD")" >> "$RUNS_LOG"
EOF
chmod +x .venv/bin/python
"""


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_measure_interleaves_and_cleans_up(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts/setup.sh").write_text(FAKE_SETUP)
    (repo / "scripts/setup.sh").chmod(stat.S_IRWXU)
    _git(tmp_path, "init", "-q", str(repo))
    for v in ("1.0", "1.1"):
        (repo / "value").write_text(v)
        _git(repo, "add", "-A")
        _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", v)
    runs_log = tmp_path / "runs.log"
    monkeypatch.setenv("RUNS_LOG", str(runs_log))
    monkeypatch.setattr(cmp.tempfile, "tempdir", str(tmp_path))   # private temp dirs for the worktrees
    out = tmp_path / "out"
    out.mkdir()
    patch = tmp_path / "p.diff"                                      # applied to both worktrees
    patch.write_text("--- /dev/null\n+++ b/patched\n@@ -0,0 +1 @@\n+2\n")
    a = cmp.parse_args(["HEAD~1", "HEAD", "s1", "s2", "--rounds", "2", "--patch", str(patch)])
    assert cmp.measure(a, repo, out) == 0
    assert runs_log.read_text().splitlines() == ["s1 a", "s1 b", "s2 a", "s2 b"] * 2   # A,B back to back
    rows, _ = cmp.compare(cmp.load_results(out))
    assert [(r["suite"], r["metric"], r["a"], r["b"], round(r["diff_pct"], 1)) for r in rows] == [
        ("s1", "ratio_p", 2.0, 2.0, 0.0), ("s1", "ratio_x", 1.0, 1.1, 10.0),
        ("s2", "ratio_p", 2.0, 2.0, 0.0), ("s2", "ratio_x", 1.0, 1.1, 10.0)]
    worktrees = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True)
    assert len(worktrees.stdout.splitlines()) == 1                   # only the repo itself
    assert not [p for p in os.listdir(tmp_path) if p.startswith("hw-bench-compare-")]


def test_code_compare_lists_only_the_functions_whose_work_changed():
    from hostwall.bench.code_compare import differing_code
    before = ("from collector.config import Options\n\n"
              "class Sink:\n    def send(self, rs):\n        return len(rs) + 1\n\n"
              "    def make(self):\n        from collector.enc import e\n        return e\n")
    moved = before.replace("from collector.", "from hostwall.collector.").replace("rs):", "rs: list):")
    # import sites, and the class body that builds the annotations (both run once); never send()
    assert differing_code(before, moved) == ["<module>", "<module>.Sink", "<module>.Sink.make"]
    changed = differing_code(moved, moved.replace("+ 1", "+ 2"))
    assert "<module>.Sink.send" in changed and not {"<module>", "<module>.Sink", "<module>.Sink.make"} & set(changed)
