"""`apply --dry-run` diffs against what the running instance enforces (its tables read back from the
pinned maps) and changes nothing; `apply --cases` runs the cases first and changes nothing when one
fails; `explain --pin-dir` shows the live bans that cover a source."""
from __future__ import annotations

import json

import pytest

from .test_enforcer_cli import cli, inst, start, status, write  # noqa: F401 — inst is a fixture

pytestmark = pytest.mark.bpf
OLD = """version: 1
name: web
revision: "r1"
defaults: {ingress: deny, egress: allow}
rules:
  - {name: ssh, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: [10.20.0.0/16]}
  - {name: web, priority: 20, direction: ingress, action: allow, protocol: tcp, ports: [80, 443]}
"""
NEW = OLD.replace('"r1"', '"r2"').replace("ports: [80, 443]", "ports: [443]").replace("10.20.0.0/16", "10.20.0.0/16, 10.30.0.0/16")
CASES = """cases:
  - name: http stays open
    packet: ingress tcp 203.0.113.9:5555 -> :80
    expect: allow
"""


def test_dry_run_and_cases_change_nothing(inst):  # noqa: F811
    tmp = inst["tmp"]
    old = write(tmp, "old.yaml", OLD)
    start(inst, old)
    gen = status(inst)["generation"]
    new = write(tmp, "new.yaml", NEW)
    r = cli("apply", new, "--dry-run", env=inst["env"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "--- running instance" in out and "web revision r1" in out
    assert "ingress tcp port 80 from any IPv4: allow (rule 'web') → drop (default)" in out
    assert "ingress tcp port 22 from 10.30.0.0/16: drop (default) → allow (rule 'ssh')" in out
    assert "~ web" in out and "ports [80, 443] → [443]" in out and "dry run: nothing was changed" in out
    assert (status(inst)["revision"], status(inst)["generation"]) == ("r1", gen)
    # the old side is the kernel's tables, not the file: edit the file, the diff stays the same
    write(tmp, "old.yaml", NEW)
    r2 = cli("apply", new, "--dry-run", env=inst["env"])
    assert "ingress tcp port 80 from any IPv4: allow (rule 'web') → drop (default)" in r2.stdout
    r = cli("apply", new, "--cases", write(tmp, "c.yaml", CASES), env=inst["env"])
    assert r.returncode == 1 and "case 'http stays open'" in r.stdout and "nothing was changed" in r.stderr
    assert status(inst)["revision"] == "r1"
    r = cli("apply", write(tmp, "r3.yaml", OLD.replace('"r1"', '"r3"')), "--cases", write(tmp, "c.yaml", CASES),
            env=inst["env"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert status(inst)["revision"] == "r3"


def test_explain_shows_live_bans(inst):  # noqa: F811
    tmp = inst["tmp"]
    pol = write(tmp, "p.yaml", OLD)
    start(inst, pol)
    assert cli("ban", "add", "203.0.113.0/24", env=inst["env"]).returncode == 0
    r = cli("explain", pol, "ingress tcp 203.0.113.9:5555 -> :443", "--pin-dir", inst["pin"], "--json", env=inst["env"])
    ex = json.loads(r.stdout)
    assert [b["prefix"] for b in ex["bans"]] == ["203.0.113.0/24"]
    assert (ex["verdict"], ex["reason"], ex["without_bans"]["rule"]) == ("drop", "banned", "web")
    r = cli("explain", pol, "ingress tcp 198.51.100.1:5555 -> :443", "--pin-dir", inst["pin"], env=inst["env"])
    assert "none of the running instance's bans (1) covers 198.51.100.1" in r.stdout


FQDN = """version: 1
name: fq
defaults: {ingress: deny, egress: deny}
rules:
  - {name: dns-out, priority: 1, direction: egress, action: allow, protocol: udp, peers: [192.0.2.53/32], ports: [53]}
  - {name: mirrors, priority: 10, direction: egress, action: allow, protocol: tcp, ports: [443], fqdns: ["*.mirrors.example.test"]}
dns: {listen: ["127.0.0.53:53"], upstreams: ["192.0.2.53:53"]}
"""


def test_explain_judges_fqdns_rules_by_the_live_learnt_names(inst):  # noqa: F811
    """`explain --pin-dir` reads the names → addresses the running instance learnt (hw_dns_names /
    hw_dns_name_ips, as the proxy writes them) and names the one that put the destination there."""
    from hostwall.bpf.fqdn import FqdnMaps, now_ns
    from hostwall.enforcer.datapath import Datapath
    pol = write(inst["tmp"], "fq.yaml", FQDN)
    start(inst, pol)
    pkt = "egress tcp :40000 -> 198.51.100.7:443"
    r = cli("explain", pol, pkt, "--pin-dir", inst["pin"], "--json", env=inst["env"])
    ex = json.loads(r.stdout)
    assert ex["verdict"] == "drop" and ex["fqdn"][0]["names"] == [], r.stdout + r.stderr
    dp = Datapath.open(inst["pin"])
    fm = FqdnMaps(dp.map_fds, inst["pin"])
    try:
        now = now_ns()
        with fm.writing():
            assert fm.name_put("a.mirrors.example.test", now)
            assert fm.name_ip_put("a.mirrors.example.test", "198.51.100.7", now + 600 * 10**9, now)
    finally:
        fm.close()
        dp.close()
    r = cli("explain", pol, pkt, "--pin-dir", inst["pin"], env=inst["env"])
    assert r.returncode == 0, r.stderr
    assert "decided by rule 'mirrors'" in r.stdout
    assert "198.51.100.7 is in its set: learnt for a.mirrors.example.test" in r.stdout
    assert f"snapshot: names learnt by the running instance at {inst['pin']}" in r.stdout
