"""hostwall-enforcer test | explain | lint | diff | import, and the --cases / --dry-run checks of
validate and apply (docs/cli.md, docs/policy.md "Tooling").

Exit codes as for every command (0 ok, 2 bad input with every problem listed, 1 runtime failure),
plus: `test` exits 1 when a case or an invariant fails (every miss listed); `lint --strict` exits 1
when it finds anything; `diff --exit-code` exits 1 when some traffic changes verdict; `import` exits 3
when a rule was left out untranslated, unless --partial.
"""
from __future__ import annotations

import json
import os
import sys
import time

from .policy import Policy

EXIT_OK, EXIT_RUNTIME, EXIT_INPUT, EXIT_PARTIAL = 0, 1, 2, 3


def _err(msg: str) -> None:
    print(f"hostwall-enforcer: {msg}", file=sys.stderr, flush=True)


def _datapath_judge(policy: Policy, learnt=None):
    """(judge, close) through test-run, its fqdns sets filled from `learnt`, or raise RuntimeError saying
    why the datapath is unavailable."""
    if os.geteuid() != 0:
        raise RuntimeError("judging by the datapath (BPF_PROG_TEST_RUN) needs root (CAP_BPF, CAP_NET_ADMIN); "
                           "run as root, or pass --reference-only to judge by the reference model alone")
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"BCC is not importable ({e}); run scripts/setup.sh, or pass --reference-only") from None
    from .testrun import TestRun
    tr = TestRun(policy, learnt=learnt)
    return tr.judge, tr.close


def run_cases(policy: Policy, cases_path: str, reference_only: bool, junit: str | None = None,
              as_json: bool = False, quiet: bool = False, fqdn_addresses: str | None = None):
    """Load and run a cases file, fqdns rules judged by the names → addresses snapshot file
    `fqdn_addresses` on both sides (else empty sets); prints the report; returns it (PolicyError on a
    bad cases file, ValueError on a bad snapshot)."""
    from .analysis.cases import load_cases
    from .analysis.judge import run_tests
    from .analysis.junit import write_junit
    learnt = None
    if fqdn_addresses:
        from .analysis.fqdn import load_addresses
        learnt = load_addresses(fqdn_addresses)
    cf = load_cases(cases_path, policy)
    judge, close = (None, None) if reference_only else _datapath_judge(policy, learnt)
    try:
        rep = run_tests(policy, cf, judge, learnt, fqdn_addresses)
    finally:
        if close:
            close()
    if junit:
        write_junit(rep, junit)
    if as_json:
        print(json.dumps(rep.to_json(), indent=1))
    elif not quiet or rep.failed:
        print(rep.text(), flush=True)
    return rep


def cmd_test(a, load) -> int:
    policy = load(a.policy)
    try:
        rep = run_cases(policy, a.cases, a.reference_only, a.junit, a.json, fqdn_addresses=a.fqdn_addresses)
    except ValueError as e:                      # the snapshot file (PolicyError is handled by the caller)
        _err(str(e))
        return EXIT_INPUT
    except RuntimeError as e:
        _err(str(e))
        return EXIT_RUNTIME
    return EXIT_RUNTIME if rep.failed else EXIT_OK


def cmd_explain(a, load) -> int:
    from .analysis.explain import explain
    from .analysis.packet import parse_packet
    policy = load(a.policy)
    text = " ".join(a.packet)
    try:
        pkt = parse_packet(text)
    except ValueError as e:
        _err(f"{e}")
        return EXIT_INPUT
    if pkt.interface and pkt.interface not in {i.name for i in policy.interfaces}:
        print(f"note: the policy lists no interface {pkt.interface!r}: no DoS profile applies there", file=sys.stderr)
    learnt, snapshot = None, None
    if a.fqdn_addresses:
        from .analysis.fqdn import load_addresses
        try:
            learnt, snapshot = load_addresses(a.fqdn_addresses), a.fqdn_addresses
        except ValueError as e:
            _err(str(e))
            return EXIT_INPUT
    bans = None
    if a.pin_dir:
        from . import bans as bans_mod
        from .datapath import Datapath
        if not Datapath.is_pinned(a.pin_dir):
            _err(f"no running instance at {a.pin_dir}; start one with `hostwall-enforcer run`")
            return EXIT_RUNTIME
        dp = Datapath.open(a.pin_dir)
        try:
            from hostwall.bpf.state import InstanceState
            st = InstanceState.load(a.pin_dir)
            bans = bans_mod.listing(dp, tuple(st.dos_profiles) if st else ())
            if learnt is None and any(r.fqdns is not None for r in policy.rules):
                learnt, snapshot = _live_learnt(dp), f"names learnt by the running instance at {a.pin_dir}"
        finally:
            dp.close()
    ex = explain(policy, pkt, bans=bans, learnt=learnt, snapshot=snapshot)
    if a.json:
        print(json.dumps(ex.to_json(), indent=1))
    else:
        print(ex.text())
        if a.pin_dir and not ex.bans and pkt.direction == "ingress":
            print(f"bans     none of the running instance's bans ({len(bans or [])}) covers {pkt.src}")
    return EXIT_OK


def _live_learnt(dp) -> dict[str, list[str]]:
    """The running instance's unexpired learnt names → addresses (docs/datapath.md "FQDN rules")."""
    from hostwall.bpf.fqdn import FqdnMaps, now_ns
    fm = FqdnMaps(dp.map_fds)
    try:
        out: dict[str, list[str]] = {}
        for e in fm.learnt(now_ns()):
            out.setdefault(e.name, []).append(e.ip)
        return out
    finally:
        fm.close()


def cmd_lint(a, load) -> int:
    from .analysis.lint import KINDS, lint
    policy = load(a.policy)
    t = time.perf_counter()
    found = [f for f in lint(policy) if f.kind not in set(a.ignore or ())]
    took = time.perf_counter() - t
    if a.json:
        print(json.dumps({"policy": policy.source, "findings": [f.to_json() for f in found]}, indent=1))
    else:
        for f in found:
            print(f.text())
        counts = {k: sum(1 for f in found if f.kind == k) for k in KINDS}
        summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        print(f"{policy.source}: {len(policy.rules)} rules: {summary or 'no findings'} ({took:.2f} s)")
    return EXIT_RUNTIME if a.strict and found else EXIT_OK


def cmd_diff(a, load) -> int:
    from .analysis.diff import diff
    d = diff(load(a.old), load(a.new), by_rule=a.by_rule)
    print(json.dumps(d.to_json(), indent=1) if a.json else d.text(limit=a.limit))
    return EXIT_RUNTIME if a.exit_code and d.changes else EXIT_OK


def dry_run(policy: Policy, pin_dir: str, as_json: bool = False, by_rule: bool = False) -> int:
    """`apply --dry-run`: the diff against what the running instance enforces; nothing changes."""
    from .analysis.diff import PolicyDiff, diff_tables, fqdn_changes, rule_changes, setting_changes
    from .analysis.table import DecisionTable, decision_table
    from .running import running_policy
    run = running_policy(pin_dir)
    d = PolicyDiff(run.label, f"{policy.source} ({policy.name} revision {policy.revision})")
    d.changes = diff_tables(DecisionTable(run.tables), decision_table(policy), by_rule)
    d.rules = rule_changes(run.rules, policy.rules, run.policy.source if run.policy else "running", policy.source)
    if run.policy is not None:
        d.settings = setting_changes(run.policy, policy)
    d.has_fqdn = any(r.fqdns is not None for r in (*policy.rules, *(run.policy.rules if run.policy else ())))
    if d.has_fqdn and run.policy is not None:    # fqdns rules are in no table: they need the running file
        d.fqdn = fqdn_changes(run.policy, policy, by_rule)
    print(json.dumps(d.to_json(), indent=1) if as_json else d.text())
    if not as_json:
        print("dry run: nothing was changed")
    return EXIT_OK


def add_fqdn_addresses(p, test_run: bool = False) -> None:
    """--fqdn-addresses FILE (test, explain, and validate/apply with --cases); test_run: the command
    also judges in the kernel (test, apply --cases), whose sets are filled with the same snapshot."""
    p.add_argument("--fqdn-addresses", metavar="FILE",
                   help="judge fqdns rules by this snapshot of names → addresses (YAML/JSON mapping, e.g. "
                        "'deb.debian.org: [151.101.2.132]')"
                        + ("; the kernel's sets in test-run hold the same" if test_run else ""))


def add_parsers(sub, pin: dict) -> None:
    t = sub.add_parser("test", help="judge test cases by the reference model and the datapath (test-run); "
                                    "check invariants")
    t.add_argument("policy")
    t.add_argument("cases", help="cases file (docs/policy.md, Tooling)")
    t.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t.add_argument("--reference-only", action="store_true",
                   help="judge by the reference model alone (no root, no BPF): no datapath cross-check")
    add_fqdn_addresses(t, test_run=True)
    t.set_defaults(tool=cmd_test)
    e = sub.add_parser("explain", help="why a packet gets its verdict: deciding rule, shadowed rules, default, "
                                       "DoS limits and bans")
    e.add_argument("policy")
    e.add_argument("packet", nargs="+", help="e.g. ingress tcp 10.1.2.3:5555 -> 10.0.0.1:22 [flags S] [on eth0]")
    e.add_argument("--pin-dir", help="also show the live bans of the instance pinned here, and judge fqdns rules "
                                     "by the names → addresses it learnt")
    add_fqdn_addresses(e)
    e.add_argument("--json", action="store_true", help="print the explanation as JSON")
    e.set_defaults(tool=cmd_explain)
    ln = sub.add_parser("lint", help="shadowed, redundant, conflicting and never-matching rules, with file:line")
    ln.add_argument("policy")
    ln.add_argument("--strict", action="store_true", help="exit 1 when there is any finding")
    ln.add_argument("--ignore", action="append", metavar="KIND",
                    choices=("never_matches", "shadowed", "redundant", "conflict"), help="leave out a kind (repeatable)")
    ln.add_argument("--json", action="store_true")
    ln.set_defaults(tool=cmd_lint)
    d = sub.add_parser("diff", help="which traffic changes verdict between two policies (exact), and the rule changes")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("--by-rule", action="store_true", help="also traffic that keeps its verdict but changes its rule")
    d.add_argument("--exit-code", action="store_true", help="exit 1 when some traffic changes verdict")
    d.add_argument("--limit", type=int, default=200, help="regions to print (default %(default)s; --json: all)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(tool=cmd_diff)
    from .importer.command import add_parser as add_import
    add_import(sub)
