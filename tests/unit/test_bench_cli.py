"""`python -m hostwall.bench` argument parsing and output envelope, with fake suites (no BPF, no root)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

import hostwall.bench.__main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fake_suite(metrics, targets=None, notes=None, seen=None):
    mod = types.ModuleType("hostwall.bench.fake")

    def run(quick):
        if seen is not None:
            seen.append(quick)
        if isinstance(metrics, Exception):
            raise metrics
        return dict(metrics)

    mod.run = run
    if targets is not None:
        mod.TARGETS = targets
    if notes is not None:
        mod.NOTES = notes
    return mod


@pytest.fixture
def suites(monkeypatch):
    """Replace suite discovery: name -> fake module; names not in the dict are 'not implemented'."""
    table: dict[str, types.ModuleType] = {}

    def load(name):
        if name not in table:
            raise cli.NotImplementedSuite(name)
        return table[name]

    monkeypatch.setattr(cli, "load_suite", load)
    return table


def test_parse_args_flags():
    a = cli.parse_args(["datapath", "--quick", "--json"])
    assert (a.suite, a.quick, a.json) == ("datapath", True, True)
    a = cli.parse_args(["swap"])
    assert (a.suite, a.quick, a.json) == ("swap", False, False)
    for s in ("datapath", "lab", "swap", "dos", "collector", "kafka", "all"):
        assert cli.parse_args([s]).suite == s


@pytest.mark.parametrize("argv", [["nosuch"], [], ["datapath", "--bogus"]])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2


def test_json_envelope(suites, capsys):
    seen = []
    suites["datapath"] = _fake_suite({"ns_per_pkt_v4_10_rules": 42, "ratio": 1.5},
                                     targets={"ns_per_pkt_v4_10_rules": ("<= 150 ns", lambda m: True)},
                                     notes="a note", seen=seen)
    assert cli.main(["datapath", "--quick", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1                     # exactly one JSON object, one line
    doc = json.loads(out)
    assert set(doc) == {"suite", "metrics", "machine"}
    assert doc["suite"] == "datapath"
    assert doc["metrics"] == {"ns_per_pkt_v4_10_rules": 42.0, "ratio": 1.5}
    assert all(isinstance(v, float) for v in doc["metrics"].values())
    assert set(doc["machine"]) >= {"kernel", "cpu", "nproc", "python", "timestamp"}
    assert isinstance(doc["machine"]["nproc"], int) and doc["machine"]["nproc"] >= 1
    assert "PASS" not in out and "FAIL" not in out and "a note" not in out
    assert seen == [True]


def test_table_marks_targets(suites, capsys):
    suites["swap"] = _fake_suite({"apply_s": 2.0, "switch_ms": 0.1, "other": 3},
                                 targets={"apply_s": ("<= 1 s", lambda m: m["apply_s"] <= 1),
                                          "switch_ms": ("<= 1 ms", lambda m: m["switch_ms"] <= 1)},
                                 notes="what the metrics mean")
    assert cli.main(["swap"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "FAIL (<= 1 s)" in lines["apply_s"]
    assert "PASS (<= 1 ms)" in lines["switch_ms"]
    assert "PASS" not in lines["other"] and "FAIL" not in lines["other"]
    assert "what the metrics mean" in out


def test_not_implemented_suite_exits_2(suites, capsys):
    assert cli.main(["kafka", "--json"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.strip() == "suite kafka is not implemented yet"


def test_load_suite_missing_module_is_not_implemented(monkeypatch):
    def imp(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(cli.importlib, "import_module", imp)
    with pytest.raises(cli.NotImplementedSuite):
        cli.load_suite("dos")


def test_load_suite_missing_dependency_is_an_error(monkeypatch):
    """A suite that exists but lacks a dependency must fail loudly, not pass as 'not implemented'."""
    def imp(name):
        raise ModuleNotFoundError("No module named 'aiokafka'", name="aiokafka")

    monkeypatch.setattr(cli.importlib, "import_module", imp)
    with pytest.raises(ModuleNotFoundError):
        cli.load_suite("kafka")


def test_suite_failure_exits_1_with_one_line(suites, capsys):
    suites["datapath"] = _fake_suite(RuntimeError("programs failed to load\nverifier log line"))
    assert cli.main(["datapath", "--json"]) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.startswith("suite datapath failed: RuntimeError: programs failed to load")
    assert len(cap.err.strip().splitlines()) == 1


def test_all_merges_and_skips_unimplemented(suites, capsys):
    suites["datapath"] = _fake_suite({"a": 1, "same": 2})
    suites["swap"] = _fake_suite({"b": 3, "same": 4})
    assert cli.main(["all", "--json"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert doc["suite"] == "all"
    assert doc["metrics"] == {"a": 1.0, "same": 2.0, "b": 3.0, "swap.same": 4.0}
    assert "suite kafka is not implemented yet (skipped)" in cap.err


def test_all_with_nothing_implemented_exits_2(suites, capsys):
    assert cli.main(["all"]) == 2


def test_nan_metric_is_a_failure_not_invalid_json(suites, capsys):
    suites["datapath"] = _fake_suite({"x": float("nan")})
    assert cli.main(["datapath", "--json"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and "non-finite metric values: x" in cap.err


def test_module_entry_point_rejects_unknown_suite():
    r = subprocess.run([sys.executable, "-m", "bench", "nosuch", "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    assert "invalid choice" in r.stderr


@pytest.mark.parametrize("n", [10, 1000])
def test_benchmark_policies_probes_take_their_paths(tmp_path, n):
    """The generated policies validate, have exactly n rules, and every probe gets its stated verdict
    and rule from the reference model (the datapath suite re-checks this on the programs)."""
    from hostwall.bench import policies as P
    from hostwall.enforcer.policy import load_policy

    bp = P.generate(tmp_path, n, seed=7)
    pol = load_policy(bp.path)
    assert len(pol.rules) == n
    assert pol.rules[-2].name == "probe-ingress" and pol.rules[-1].name == "probe-egress"
    P.check_probes(pol, bp.probes)
    assert P.generate(tmp_path / "again", n, seed=7).path.read_text() == bp.path.read_text()   # seeded


def test_machine_facts_load_at_start_and_end(suites, capsys):
    suites["datapath"] = _fake_suite({"x": 1})
    assert cli.main(["datapath", "--json"]) == 0
    machine = json.loads(capsys.readouterr().out)["machine"]
    assert {"governor", "cpu_mhz", "loadavg_1m", "loadavg_1m_end", "nproc_online"} <= set(machine)
    assert isinstance(machine["loadavg_1m_end"], float) and "pinned_cpu" not in machine


def test_cpu_is_passed_only_to_suites_that_take_it(suites, capsys):
    got = []
    pinned = types.ModuleType("hostwall.bench.pinned")
    pinned.run = lambda quick, cpu=None: got.append(cpu) or {"x": 1}
    suites["datapath"] = pinned
    suites["swap"] = _fake_suite({"y": 2})
    assert cli.main(["datapath", "--cpu", "0", "--json"]) == 0
    assert got == [0] and json.loads(capsys.readouterr().out)["machine"]["pinned_cpu"] == 0
    assert cli.main(["swap", "--cpu", "0", "--json"]) == 2          # asked of a suite that cannot pin
    assert "does not support --cpu" in capsys.readouterr().err
    assert cli.main(["all", "--cpu", "1", "--json"]) == 0             # all: pins those that can, runs the rest
    assert got == [0, 1] and json.loads(capsys.readouterr().out)["metrics"] == {"x": 1.0, "y": 2.0}
    assert cli.main(["datapath", "--cpu", "4096"]) == 2 and got == [0, 1]     # no such CPU: refused up front
    assert "--cpu 4096" in capsys.readouterr().err


def test_xdp_filter_host_entries_hold_one_host_per_prefix():
    from hostwall.bench.xdpfilter import host_entries
    prefixes = ["# a comment", "10.0.0.0/24", "10.0.1.7/32", "10.0.2.0/26", "10.0.3.9/32", "10.66.3.0/24"]
    assert host_entries(prefixes, 100, first=["10.66.3.2"]) == \
        ["10.66.3.2", "10.0.1.7", "10.0.3.9", "10.0.0.1", "10.0.2.1"]     # probe, host routes, one per prefix
    assert host_entries(prefixes, 3, first=["10.66.3.2"]) == ["10.66.3.2", "10.0.1.7", "10.0.3.9"]
    assert host_entries(["2001:db8::/64", "2001:db8:1::5/128"], 10) == ["2001:db8:1::5", "2001:db8::1"]


def test_datapath_spread_per_case_and_warning(capsys):
    from hostwall.bench import datapath as D
    wide = D.Case("ns_wide", 0, b"", 2, runs=[100, 100, 200, 100, 110])
    tight = D.Case("ns_tight", 0, b"", 2, runs=[50, 51, 50, 50, 52])
    m: dict = {}
    D._summarise([wide, tight], m)
    assert (m["ns_wide"], m["ns_wide_min"], m["ns_tight"]) == (100.0, 100.0, 50.0)
    assert m["ns_wide_p90"] == pytest.approx(164.0) and m["ns_wide_spread_pct"] == pytest.approx(64.0)
    assert m["ns_tight_spread_pct"] == pytest.approx(3.2) and m["spread_max_pct"] == m["ns_wide_spread_pct"]
    err = capsys.readouterr().err
    assert "WARNING: 1 of 2 cases" in err and "ns_wide 64 %" in err and "ns_tight" not in err


def test_suites_keep_state_files_out_of_the_hosts_state_dir(suites, monkeypatch, capsys):
    """A suite's collectors register their checkpoints in HOSTWALL_STATE_DIR (bpf/state.py
    register_collector): the runner points it at a private directory unless the caller chose one."""
    seen = []

    def run(quick):
        seen.append(os.environ.get("HOSTWALL_STATE_DIR"))
        return {"x": 1.0}
    suites["collector"] = types.SimpleNamespace(run=run)
    monkeypatch.delenv("HOSTWALL_STATE_DIR", raising=False)
    assert cli.main(["collector", "--json"]) == 0
    assert seen[0] and os.path.isdir(seen[0]) and not seen[0].startswith("/run/hostwall")
    mine = os.path.join(ROOT, "own-state")
    monkeypatch.setenv("HOSTWALL_STATE_DIR", mine)
    assert cli.main(["collector", "--json"]) == 0
    assert seen[1] == mine
