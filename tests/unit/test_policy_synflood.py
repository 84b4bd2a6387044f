"""Policy keys of tracking under attack (docs/policy.md): syn.per_port_pps, syn.proxy and its knobs,
conntrack.unconfirmed_timeout — model, every error with path and line, and what the compiler writes."""
from __future__ import annotations

import textwrap

import pytest

from hostwall.bpf import layout as L
from hostwall.enforcer.compiler import DEFAULT_AUTO_PORT_PPS, DEFAULT_AUTO_PRESSURE, compile_policy
from hostwall.enforcer.policy import parse_policy

from .test_policy import HEAD, issues_of, one


def policy(syn: str, extra: str = "", stateful: str = "true") -> str:
    return HEAD + f"defaults: {{stateful: {stateful}}}\n" + textwrap.dedent(f"""\
        dos:
          profiles:
            web:
              syn: {syn}
        """) + extra


def test_proxy_modes_and_yaml_booleans():
    for text, mode in (("{proxy: on}", "on"), ("{proxy: 'on'}", "on"), ("{proxy: off}", "off"),
                       ("{proxy: auto}", "auto"), ("{per_source_pps: 5}", "off")):
        assert parse_policy(policy(text)).dos_profiles["web"].syn_proxy == mode, text


def test_full_syn_section_is_modelled_and_compiled():
    p = parse_policy(policy('{per_source_pps: 200, global_pps: 50000, per_port_pps: 3000, proxy: auto, '
                            'proxy_ports: [443, "8000-8100", 8050, 444], proxy_quiet: 20s, proxy_pressure: 500, '
                            'proxy_options: full, proxy_mss: 1400, proxy_wscale: 9}',
                            "conntrack: {unconfirmed_timeout: 5s}\n"))
    d = p.dos_profiles["web"]
    assert (d.syn_per_port_pps, d.syn_proxy, d.syn_proxy_quiet_s, d.syn_proxy_pressure) == (3000, "auto", 20.0, 500)
    assert d.syn_proxy_ports == ((443, 444), (8000, 8100))          # merged ranges
    assert (d.syn_proxy_options, d.syn_proxy_mss, d.syn_proxy_wscale) == ("full", 1400, 9)
    assert p.unconfirmed_timeout_s == 5.0
    cp = compile_policy(p, {}, 1)
    rec = cp.dos_profiles[0]
    assert int(rec["proxy"]) == L.SYN_PROXY_MODES["auto"] and int(rec["syn_port_pps"]) == 3000
    assert int(rec["proxy_quiet_ns"]) == 20 * 10**9 and int(rec["proxy_pressure"]) == 500
    assert (int(rec["proxy_full"]), int(rec["proxy_mss"]), int(rec["proxy_wscale"])) == (1, 1400, 9)
    assert int(rec["nproxy_ranges"]) == 2 and rec["proxy_ranges"][1].tolist() == (8000, 8100)
    assert int(cp.hdr["ct_unconfirmed_s"][0]) == 5


def test_auto_gets_both_triggers_by_default_and_off_none():
    rec = compile_policy(parse_policy(policy("{proxy: auto}")), {}, 1).dos_profiles[0]
    assert (int(rec["syn_port_pps"]), int(rec["proxy_pressure"])) == (DEFAULT_AUTO_PORT_PPS, DEFAULT_AUTO_PRESSURE)
    rec = compile_policy(parse_policy(policy("{per_source_pps: 5}")), {}, 1).dos_profiles[0]
    assert (int(rec["syn_port_pps"]), int(rec["proxy_pressure"]), int(rec["proxy"])) == (0, 0, 0)
    hdr = compile_policy(parse_policy(policy("{per_source_pps: 5}")), {}, 1).hdr
    assert int(hdr["ct_unconfirmed_s"][0]) == 0                      # the datapath's default


def test_errors_have_paths_and_lines():
    text = policy('{proxy: sometimes, per_port_pps: 0, proxy_ports: [0, "90-80", 70000], proxy_quiet: 3 weeks, '
                  'proxy_mss: 100, proxy_options: lots, proxy_wscale: 15, proxy_typo: 1}',
                  "conntrack: {unconfirmed_timeout: 2h, other: 1}\n")
    iss = issues_of(text)
    pre = "dos.profiles.web.syn."
    one(iss, pre + "proxy", 7, "is not one of")
    one(iss, pre + "per_port_pps", 7, "greater than 0")
    one(iss, pre + "proxy_ports[0]", 7, "between 1 and 65535")
    one(iss, pre + "proxy_ports[1]", 7, "reversed")
    one(iss, pre + "proxy_ports[2]", 7, "between 1 and 65535")
    one(iss, pre + "proxy_quiet", 7, "unknown duration unit")
    one(iss, pre + "proxy_mss", 7, "between 536 and 9000")
    one(iss, pre + "proxy_options", 7, "is not one of")
    one(iss, pre + "proxy_wscale", 7, "between 0 and 14")
    one(iss, pre + "proxy_typo", 7, "unknown key")
    one(iss, "conntrack.unconfirmed_timeout", 8, "out of range")
    one(iss, "conntrack.other", 8, "unknown key")
    assert len(iss) == 12, iss


def test_proxy_needs_stateful_tracking():
    iss = issues_of(policy("{proxy: on}", stateful="false"))
    one(iss, "dos.profiles.web.syn.proxy", 7, "needs defaults.stateful: true")
    assert len(iss) == 1
    parse_policy(policy("{proxy: off}", stateful="false"))          # off is fine without state


def test_more_than_eight_proxy_ranges_is_an_error():
    ports = ", ".join(str(p) for p in range(1000, 1020, 2))          # 10 separate ports
    iss = issues_of(policy(f"{{proxy: on, proxy_ports: [{ports}]}}"))
    one(iss, "dos.profiles.web.syn.proxy_ports", 7, "the proxy holds 8")
    # neighbours merge: 20 ports in 2 ranges are fine
    p = parse_policy(policy(f"{{proxy: on, proxy_ports: [{', '.join(str(x) for x in range(1000, 1020))}]}}"))
    assert p.dos_profiles["web"].syn_proxy_ports == ((1000, 1019),)


@pytest.mark.parametrize("t", ["1s", "3600", "10m"])
def test_unconfirmed_timeout_range_accepts(t):
    assert parse_policy(HEAD + f"conntrack: {{unconfirmed_timeout: {t}}}\n").unconfirmed_timeout_s is not None
