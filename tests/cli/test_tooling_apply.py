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
    assert ex["rule"] == "web" and [b["prefix"] for b in ex["bans"]] == ["203.0.113.0/24"]
    r = cli("explain", pol, "ingress tcp 198.51.100.1:5555 -> :443", "--pin-dir", inst["pin"], env=inst["env"])
    assert "none of the running instance's bans (1) covers 198.51.100.1" in r.stdout
