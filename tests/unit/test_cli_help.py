"""Help texts and messages an operator reads (item 13 of the operator trial): every option of the
commands an operator starts with has a help text, each says only what applies to its command, and a
command that changes nothing does not say "nothing was changed"."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hostwall.collector.cli import _parser as collector_parser
from hostwall.enforcer.cli import build_parser as enforcer_parser
from hostwall.enforcer.importer.iptables import parse_iptables_save

ROOT = Path(__file__).resolve().parents[2]


def _sub(parser, name):
    return next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[name]


def _option(parser, opt):
    return next(a for a in parser._actions if opt in a.option_strings)


def test_every_option_of_run_and_status_has_help():
    p = enforcer_parser()
    for cmd in ("run", "status", "validate", "apply", "explain", "test"):
        for a in _sub(p, cmd)._actions:
            if a.option_strings and a.dest != "help":
                assert a.help, (cmd, a.option_strings)


def test_fqdn_addresses_mentions_test_run_only_where_test_run_happens():
    p = enforcer_parser()
    for cmd in ("validate", "explain"):
        assert "test-run" not in _option(_sub(p, cmd), "--fqdn-addresses").help, cmd
    for cmd in ("test", "apply"):
        assert "test-run" in _option(_sub(p, cmd), "--fqdn-addresses").help, cmd


def test_verify_says_sink_is_repeatable():
    assert "repeatable" in _option(_sub(collector_parser(), "verify"), "--sink").help


def test_a_bad_cases_file_in_test_does_not_claim_a_change(tmp_path):
    cases = tmp_path / "c.yaml"
    cases.write_text('cases:\n  - {name: x, packet: "ingress tcp 1.2.3.4 -> :22", expect: maybe}\n')
    r = subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", "test", str(ROOT / "examples/policy.yaml"),
                        str(cases), "--reference-only"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "cases[0].expect.verdict" in r.stderr, r.stderr
    assert "nothing was changed" not in r.stderr, r.stderr


def test_a_module_option_without_its_module_gets_a_hint():
    rs = parse_iptables_save("*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp --dport 25 -j ACCEPT\nCOMMIT\n", "r.v4", 4)
    msg = " ".join(str(p) for p in rs.problems)
    assert "--dport" in msg and "-m tcp" in msg, msg


def test_status_text_shows_the_dns_answer_cache_and_names_its_drops():
    """docs/cli.md: `status` text shows the proxy's counters, answer cache included; the malformed drops
    say which is which (it printed `malformed 0 + 0`)."""
    import io

    from rich.console import Console

    from hostwall.enforcer.cli import _print_fqdn
    names = ("queries_udp", "queries_tcp", "listed", "answered", "refused", "servfail", "upstream_timeout",
             "upstream_error", "malformed_query", "malformed_answer", "mismatched", "overload", "learnt",
             "overflow", "set_full")
    counters = {**{n: 0 for n in names}, "cache_hits": 7, "cache_misses": 3, "cache_evictions": 1,
                "malformed_query": 2, "malformed_answer": 5}
    out = io.StringIO()
    _print_fqdn(Console(file=out, width=400), {"proxy": {"running": True, "counters": counters, "dns": {
        "listen": ["127.0.0.1:53"], "upstreams": ["192.0.2.53:53"]}}, "sets": [], "names": []})
    text = out.getvalue()
    assert "cache hits 7 / misses 3 / evictions 1" in text, text
    assert "malformed queries 2, answers 5" in text, text


def test_status_text_has_no_tc_ingress_column_and_names_an_older_builds_filter():
    """docs/datapath.md "Hooks": no TC ingress filter is attached behind XDP, so `status` text shows no
    "tc ingress off" column that reads like a fault; an older build's leftover filter is named."""
    import io

    from rich.console import Console

    from hostwall.enforcer.cli import _print_interfaces
    out = io.StringIO()
    _print_interfaces(Console(file=out, width=200), [
        {"name": "eth0", "xdp_mode": "native", "tc_ingress": False, "tc_egress": True},
        {"name": "eth1", "netns": "ns1", "xdp_mode": "generic", "tc_ingress": True, "tc_egress": True}])
    text = out.getvalue()
    assert "tc ingress" not in text and "tc egress" in text, text
    assert "eth1: a TC ingress filter of an older build is still attached" in text, text
    assert "eth0: a TC ingress" not in text, text
