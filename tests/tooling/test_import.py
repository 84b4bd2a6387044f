"""`import`: the translation is exact. Random iptables-save rulesets (user chains, jumps, gotos, RETURN,
negations, multiport, LOG) are translated and the policy's verdict, by the reference model, must equal
a direct simulation of iptables' chain traversal on every sampled packet; the report accounts for every
source line; exit codes 0 / 3 / 2 and --partial. (tests/lab/test_import_kernel.py checks realistic
rulesets against the real kernel.)"""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.enforcer.importer.emit import translate
from hostwall.enforcer.importer.flatten import Context
from hostwall.enforcer.importer.iptables import parse_iptables_save
from hostwall.enforcer.policy import parse_policy
from hostwall.enforcer.reference import evaluate

from .strategies import V4, packets

ROOT = Path(__file__).resolve().parents[2]
NETS = [n for n in V4 if n != "0.0.0.0/0"]


@st.composite
def rule_line(draw, chain: str, direction: str, later: list[str], user: bool) -> str:
    parts = ["-A", chain]
    side = "-s" if direction == "ingress" else "-d"
    if draw(st.booleans()):
        parts += (["!"] if draw(st.integers(0, 3)) == 0 else []) + [side, draw(st.sampled_from(NETS))]
    proto = draw(st.sampled_from([None, "tcp", "udp", "icmp"]))
    if proto:
        parts += ["-p", proto]
        if proto in ("tcp", "udp") and draw(st.booleans()):
            if draw(st.booleans()):
                lo = draw(st.sampled_from([22, 53, 80, 443, 8000]))
                hi = draw(st.sampled_from([lo, lo + 1, 8100]))
                parts += ["-m", proto] + (["!"] if draw(st.integers(0, 4)) == 0 else []) + \
                    ["--dport", f"{min(lo, hi)}:{max(lo, hi)}" if hi != lo else str(lo)]
            else:
                ports = draw(st.lists(st.sampled_from(["22", "53", "80", "443", "8000:8100"]), min_size=1, max_size=3,
                                      unique=True))
                parts += ["-m", "multiport", "--dports", ",".join(ports)]
    targets = ["ACCEPT", "DROP", "REJECT", "LOG"] + (["RETURN"] if user else []) + \
        [f"J:{c}" for c in later] + [f"G:{c}" for c in later]
    t = draw(st.sampled_from(targets))
    parts += ["-g", t[2:]] if t.startswith("G:") else ["-j", t[2:] if t.startswith("J:") else t]
    return " ".join(parts)


@st.composite
def rulesets(draw) -> str:
    users = [f"U{i}" for i in range(draw(st.integers(0, 3)))]
    lines = ["*filter", f":INPUT {draw(st.sampled_from(['ACCEPT', 'DROP']))} [0:0]", ":FORWARD DROP [0:0]",
             f":OUTPUT {draw(st.sampled_from(['ACCEPT', 'DROP']))} [0:0]"] + [f":{u} - [0:0]" for u in users]
    for _ in range(draw(st.integers(0, 6))):
        lines.append(draw(rule_line("INPUT", "ingress", users, False)))
    for i, u in enumerate(users):
        for _ in range(draw(st.integers(0, 4))):
            lines.append(draw(rule_line(u, "ingress", users[i + 1:], True)))
    for _ in range(draw(st.integers(0, 4))):
        lines.append(draw(rule_line("OUTPUT", "egress", [], False)))
    return "\n".join(lines + ["COMMIT"]) + "\n"


def simulate(rs, p) -> bool:
    """iptables' traversal, written out: first matching terminal target; RETURN back to the caller;
    -g does not come back; a base chain's end is its policy. True = accepted."""
    peer = ipaddress.ip_address(p.src if p.direction == "ingress" else p.dst)

    def matches(rule) -> bool:
        for c in rule.conds:
            if c.kind in ("src", "dst"):
                ok = any(peer in ipaddress.ip_network(n) for n in _cidrs(c.value))
            elif c.kind == "proto":
                ok = {"tcp": 6, "udp": 17, "icmp": 1}[c.value] == p.protocol
            elif c.kind == "dport":
                if p.fragment:                  # xt_tcpudp/multiport: a later fragment never matches, even with !
                    return False
                ok = p.protocol in (6, 17) and p.dport in c.value
            else:
                raise AssertionError(c)
            if ok == c.neg:
                return False
        return True

    def run(chain: str):
        for rule in rs.chains[chain].rules:
            if not matches(rule):
                continue
            t = rule.target
            if t in ("ACCEPT", "DROP", "REJECT"):
                return t == "ACCEPT"
            if t == "RETURN":
                return None
            if t == "JUMP":
                r = run(rule.chain_target)
                if r is not None:
                    return r
            if t == "GOTO":
                return run(rule.chain_target)
        return None
    base = "INPUT" if p.direction == "ingress" else "OUTPUT"
    r = run(base)
    return rs.chains[base].policy == "ACCEPT" if r is None else r


def _cidrs(spans: dict) -> list[str]:
    from hostwall.enforcer.analysis.intervals import cidrs
    return [c for fam, sp in spans.items() for c in cidrs(fam, sp)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=rulesets(), pkts=st.lists(packets().filter(lambda p: p.family == 4), min_size=1, max_size=40))
def test_translation_equals_iptables_traversal(text, pkts):
    rs = parse_iptables_save(text, "r.v4", 4)
    assert not rs.problems, rs.problems
    tr = translate([rs], Context("eth0", {}))
    left = [(o.line, s.messages) for o, s in tr.left_out if s.kind == "untranslated"]
    logs = [o for o, s in tr.left_out if s.kind == "untranslated" and "-j LOG" in o.text]
    assert len(left) == len(logs), left            # everything but a bare LOG translates
    policy = parse_policy(tr.text)
    assert "essential_icmp false" in tr.report()       # no conntrack accept: nothing passes before the rules
    for p in pkts:
        # a later fragment is judged with its datagram's first fragment in both: hostwall's fragment
        # table, netfilter's defragmentation before the filter table (tests/lab/test_import_kernel.py)
        if p.protocol not in (6, 17, 1) or p.fragment:
            continue
        want = simulate(rs, p)
        got = evaluate(policy, p).verdict == "allow"
        assert got == want, f"{p}: iptables {'accepts' if want else 'drops'}, translation {'allows' if got else 'drops'}\n{text}\n{tr.text}"


RULES = """# Generated by iptables-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SVC - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -s 10.0.0.0/8 -p tcp -m tcp --dport 22 -m comment --comment "ssh from the LAN" -j ACCEPT
-A INPUT -p tcp -m tcp --dport 8443 -j LOG --log-prefix "app: "
-A INPUT -p tcp -m tcp --dport 8443 -j ACCEPT
-A INPUT -p tcp -m multiport --dports 80,443 -j SVC
-A INPUT -p udp -m udp --sport 53 -j ACCEPT
-A INPUT -d 10.1.2.3/32 -p tcp -m tcp --dport 9000 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 25 -j REJECT --reject-with tcp-reset
-A SVC -s 192.0.2.0/24 -j DROP
-A SVC -j ACCEPT
-A FORWARD -j DROP
COMMIT
"""


def test_report_statuses_and_policy():
    rs = parse_iptables_save(RULES, "r.v4", 4)
    tr = translate([rs], Context("eth0", {4: [int(ipaddress.ip_address("10.1.2.3"))]}))
    st_by_line = {o.line: s for o, s in tr.statuses}
    assert set(st_by_line) == {4, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22}      # every rule line
    assert st_by_line[4].kind == "out_of_scope" and "table nat" in st_by_line[4].messages[0]
    assert st_by_line[11].kind == "not_here" and "loopback" in st_by_line[11].messages[0]
    # the ESTABLISHED,RELATED accept: stateful, and essential ICMP (RELATED errors need it) noted
    assert st_by_line[12].kind == "noted" and "stateful" in st_by_line[12].messages[0]
    assert "essential_icmp" in st_by_line[12].messages[1]
    assert st_by_line[14].kind == "translated" and "action log" in st_by_line[14].messages[0]
    assert st_by_line[17].kind == "untranslated" and "destination ports only" in st_by_line[17].messages[0]
    assert st_by_line[18].kind == "noted" and "decided for this host's address" in st_by_line[18].messages[0]
    assert st_by_line[19].kind == "noted" and "REJECT becomes deny" in st_by_line[19].messages[0]
    assert st_by_line[22].kind == "out_of_scope" and "FORWARD" in st_by_line[22].messages[0]
    pol = parse_policy(tr.text)
    by_name = {r.name: r for r in pol.rules}
    assert by_name["ssh-from-the-lan"].peers.cidrs() == ["10.0.0.0/8"]
    assert {r.action for r in pol.rules if r.ports == ((8443, 8443),)} == {"log"}
    assert pol.defaults.stateful and pol.defaults.ingress == "deny"
    assert "r.v4:13: -A INPUT -s 10.0.0.0/8" in tr.text        # every rule names its source line


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", "import", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_cli_exit_codes(tmp_path):
    (tmp_path / "r.v4").write_text(RULES)
    r = _cli("--iptables-save", "r.v4", "-o", "p.yaml", cwd=tmp_path)
    assert r.returncode == 3 and "r.v4:17: -A INPUT -p udp -m udp --sport 53 -j ACCEPT" in r.stdout
    assert "nothing was written" in r.stderr and not (tmp_path / "p.yaml").exists()
    r = _cli("--iptables-save", "r.v4", "-o", "p.yaml", "--partial", "--local-address", "10.1.2.3", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "p.yaml").exists()
    v = subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", "validate", "p.yaml"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    clean = "*filter\n:INPUT DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    (tmp_path / "c.v4").write_text(clean)
    r = _cli("--iptables-save", "c.v4", cwd=tmp_path)
    assert r.returncode == 0 and "left out: nothing" in r.stderr and "ports: [22]" in r.stdout.replace('"', "")
    (tmp_path / "bad.v4").write_text("*filter\n:INPUT DROP [0:0]\n-A INPUT --bogus 1 -j ACCEPT\n-A NOPE -j DROP\nCOMMIT\n")
    r = _cli("--iptables-save", "bad.v4", cwd=tmp_path)
    assert r.returncode == 2 and "bad.v4:3:" in r.stderr and "bad.v4:4:" in r.stderr and "not declared" in r.stderr
    j = _cli("--iptables-save", "r.v4", "--json", "--partial", cwd=tmp_path)
    doc = json.loads(j.stdout)
    assert doc["policy"].startswith("# Imported") and {s["status"] for s in doc["source_rules"]} >= {"translated", "untranslated"}


ICMP_RULES = """*filter
:INPUT DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p icmp -m icmp ! --icmp-type 8 -j ACCEPT
-A INPUT -s 10.0.0.0/8 -p icmp -m icmp ! --icmp-type 3/4 -j ACCEPT
COMMIT
"""


def test_icmp_type_matches_translate_exactly_negations_too():
    """A negated --icmp-type spans many types: each one is written out (docs/policy.md "Import")."""
    from hostwall.enforcer.analysis.packet import parse_packet
    rs = parse_iptables_save(ICMP_RULES, "r.v4", 4)
    assert not rs.problems, rs.problems
    policy = parse_policy(translate([rs], Context("eth0", {})).text)
    for pkt, want in [("ingress icmp 192.0.2.1 -> 10.1.1.1 type 0", "allow"),
                      ("ingress icmp 192.0.2.1 -> 10.1.1.1 type 7/3", "allow"),
                      ("ingress icmp 192.0.2.1 -> 10.1.1.1 type 200", "allow"),
                      ("ingress icmp 192.0.2.1 -> 10.1.1.1 type 8", "drop"),
                      ("ingress icmp 10.1.2.3 -> 10.1.1.1 type 8", "allow"),
                      ("ingress icmp 10.1.2.3 -> 10.1.1.1 type 3/3", "allow")]:
        p = parse_packet(pkt).reference()
        assert evaluate(policy, p).verdict == want, (pkt, [r.name for r in policy.rules])
