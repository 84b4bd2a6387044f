"""`hostwall-lab demo`: the self-contained lab behind the README's first command.

Builds the namespace lab, runs the real enforcer on the protected host with the example policy, drives
allowed and denied traffic (both families) plus a short flood from the attacker, prints what passed and
what was dropped per rule and reason, and removes everything it made. Runtime ≈ 20-30 s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import traffic
from .enforcer_proc import EnforcerProcess, drops
from .netns import REPO_ROOT, Lab, cleanup_stale, lab_available

DEFAULT_POLICY = REPO_ROOT / "examples" / "policy.yaml"


@dataclass
class Step:
    what: str
    expect: str          # "pass" | "blocked"
    ok: int
    total: int

    @property
    def outcome(self) -> str:
        return "pass" if self.ok == self.total else "blocked" if self.ok == 0 else f"partial {self.ok}/{self.total}"

    @property
    def as_expected(self) -> bool:
        return self.outcome == self.expect


def _tcp(lab, src, dst, port, fam, expect, count=3) -> Step:
    r = traffic.tcp_client_in(lab, src, lab.addr(dst, fam), port, count=count, timeout=0.7)
    return Step(f"{src} → {dst} tcp/{port} (IPv{fam})", expect, r["ok"], r["count"])


def _udp(lab, src, dst, port, fam, expect, count=3) -> Step:
    r = traffic.udp_client_in(lab, src, lab.addr(dst, fam), port, count=count, timeout=0.7)
    return Step(f"{src} → {dst} udp/{port} (IPv{fam})", expect, r["ok"], r["count"])


def _ping(lab, src, dst, fam, expect, count=3) -> Step:
    r = traffic.ping_in(lab, src, lab.addr(dst, fam), count=count, timeout=1.0)
    return Step(f"{src} → {dst} ping (IPv{fam})", expect, r["received"], r["sent"] or count)


def _egress(lab, fam) -> Step:
    """The protected host opens a connection out; the reply passes `ingress: deny` by conntrack."""
    r = traffic.tcp_client_in(lab, "prot", lab.addr("cli", fam), 9000, count=3, timeout=0.7)
    return Step(f"prot → cli tcp/9000 (IPv{fam}, reply via conntrack)", "pass", r["ok"], r["count"])


def run_demo(policy: Path = DEFAULT_POLICY, flood_seconds: float = 3.0, console: Console | None = None) -> int:
    con = console or Console()
    ok, why = lab_available()
    if not ok:
        con.print(f"[red]cannot build the lab: {why}[/]")
        return 1
    cleanup_stale()
    t0 = time.monotonic()
    steps: list[Step] = []
    with Lab() as lab:
        con.print(f"[bold]lab[/] {lab.prefix}: protected host {lab.addr('prot')} / {lab.addr('prot', 6)}, "
                  f"client {lab.addr('cli')}, attacker {lab.addr('att')}")
        lab.warm()
        with EnforcerProcess(lab, policy) as enf, \
                traffic.echo_servers(lab, "prot", tcp=[22, 80, 3306], udp=[5353]), \
                traffic.echo_servers(lab, "cli", tcp=[9000]):
            con.print(f"[bold]enforcer[/] {enf.banner.strip()}")
            for fam in (4, 6):
                steps += [_tcp(lab, "cli", "prot", 22, fam, "pass"), _tcp(lab, "cli", "prot", 80, fam, "pass"),
                          _udp(lab, "cli", "prot", 5353, fam, "pass"), _ping(lab, "cli", "prot", fam, "pass"),
                          _tcp(lab, "cli", "prot", 3306, fam, "blocked"), _egress(lab, fam)]
            steps += [_tcp(lab, "att", "prot", 80, 4, "blocked"), _ping(lab, "att", "prot", 4, "blocked")]
            con.print(f"[bold]flood[/]: attacker sends UDP at full speed for {flood_seconds:g} s …")
            fl = traffic.trafgen_in(lab, "att", kind="udp", dport=5353, duration=flood_seconds)
            st = enf.status()
        elapsed = time.monotonic() - t0

    t = Table(title="traffic (what the hosts saw)")
    for c in ("traffic", "expected", "outcome", ""):
        t.add_column(c)
    for s in steps:
        t.add_row(s.what, s.expect, s.outcome, "[green]✓[/]" if s.as_expected else "[red]✗[/]")
    con.print(t)
    t = Table(title=f"hostwall: policy {st['policy']} revision {st['revision']}")
    for c in ("rule", "action", "packets", "bytes"):
        t.add_column(c, justify="right" if c in ("packets", "bytes") else "left")
    for r in st["rules"]:
        t.add_row(r["name"], r.get("action", ""), str(r["packets"]), str(r["bytes"]))
    con.print(t)
    t = Table(title="dropped by reason")
    t.add_column("reason")
    t.add_column("packets", justify="right")
    for reason, n in sorted(drops(st).items(), key=lambda kv: -kv[1]):
        t.add_row(reason, str(n))
    con.print(t)
    tot = st["totals"]
    con.print(f"flood: attacker sent {fl['packets']} packets ({fl['pps']:.0f} pps); "
              f"hostwall allowed {tot['allow']['packets']} and dropped {tot['drop']['packets']} packets in all")
    bad = [s for s in steps if not s.as_expected]
    con.print(f"[bold]{'all traffic behaved as the policy says' if not bad else f'{len(bad)} step(s) unexpected'}[/] "
              f"— lab removed, {elapsed:.1f} s")
    return 0 if not bad else 1
