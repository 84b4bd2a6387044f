"""`hostwall-lab demo`: the self-contained lab behind the README's first command.

Builds the namespace lab, runs the real enforcer on the protected host with the example policy (its
DoS profile "lab" on the protected host's eth0) and the real collector next to it (JSONL flow log),
then drives:

  1. the attacker probing (blocked by the deny list),
  2. normal traffic from the client, both families (ssh, web, a longer web session, mDNS, ping, a
     blocked port) and a connection the protected host opens itself (replies pass by conntrack),
  3. a short UDP flood from the attacker while the client keeps using the web service,
  4. the quiet after it, until the anomaly the flood opened has closed.

Then it stops the collector (sinks flushed, last drop interval exported), removes the lab and prints
what the hosts saw, top flows and drops by reason from the flow log (next to the enforcer's own
counters), the anomalies, the collector's ledger (produced = delivered + lost), how many records the
official ECS and OCSF definitions and the published schemas accept (lab/conformance.py) and the path of
the flow log, which is kept under /var/tmp/hostwall-demo/<time>/. Exit 0 only when every check holds.
Runtime ≈ 40-60 s.
"""
from __future__ import annotations

import ipaddress
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from hostwall import resource_dir

from . import conformance, traffic
from .collector_proc import LAB_CONFIG, CollectorProcess, JsonlFollower, kind, read_jsonl
from .enforcer_proc import EnforcerProcess
from .netns import Lab, cleanup_stale, lab_available

DEFAULT_POLICY = resource_dir("examples") / "policy.yaml"
DEFAULT_OUT = Path("/var/tmp/hostwall-demo")
PEAK = "peak /s (window avg)"              # hostwall.anomaly.peak_rate: a window average, not a packet rate
ATTACKER_PREFIX = "10.66.3.0/24"           # the attacker host's /24 (anomaly keys are /24 by default)
OPEN_WITHIN_S = 2.0                        # flood start → anomaly open (the bound)


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


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class DemoRun:
    """Everything a lab run observed; the summary and the checks are computed from it."""
    out_dir: Path
    steps: list[Step] = field(default_factory=list)
    flood: dict = field(default_factory=dict)
    flood_start: float = 0.0            # wall clock, just before trafgen was started
    flood_end: float = 0.0
    arrivals: list[tuple[float, dict]] = field(default_factory=list)   # (wall time seen in the log, anomaly record)
    enforcer_status: dict = field(default_factory=dict)
    collector_status: dict | None = None
    collector_rc: int | None = None
    collector_exit: str = ""
    records: list[dict] = field(default_factory=list)
    jsonl: Path | None = None
    sinks: list = field(default_factory=list)
    collector_started: float = 0.0      # wall clock, once its banner was printed
    normal_end: float = 0.0             # wall clock, end of the normal traffic
    status_before_flood: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    _conformance: conformance.Conformance | None = None

    @property
    def conformance(self) -> conformance.Conformance:
        """The flow log against ECS, OCSF and schemas/*.json (computed once, on first use)."""
        if self._conformance is None or self._conformance.records != len(self.records):
            self._conformance = conformance.check(self.records)
        return self._conformance


def _tcp(lab, src, dst, port, fam, expect, count=3, **kw) -> Step:
    r = traffic.tcp_client_in(lab, src, lab.addr(dst, fam), port, count=count, timeout=0.7, **kw)
    extra = f", {count} round trips on one connection" if kw.get("reuse") else ""
    return Step(f"{src} → {dst} tcp/{port} (IPv{fam}{extra})", expect, r["ok"], r["count"])


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


# ---- the run -------------------------------------------------------------------------------------

def run_lab(policy: Path, out_dir: Path, flood_seconds: float, flood_pps: int | None, con: Console,
            close_wait_s: float | None = None, sinks: list | None = None) -> DemoRun:
    """The lab run behind the demo (and tests/lab/test_collector_lab.py). sinks: the collector's
    sinks (default: one JSONL file out_dir/flows.jsonl); the first must be that JSONL file. A Kafka
    sink spools into out_dir/kafka-spool (not the system spool) if its broker is unreachable."""
    run = DemoRun(out_dir)
    t0 = time.monotonic()
    an = LAB_CONFIG["anomaly"]
    close_wait = close_wait_s if close_wait_s is not None else an["window_s"] + an["quiet_s"] + 10.0
    with Lab() as lab:
        con.print(f"[bold]lab[/] {lab.prefix}: protected host {lab.addr('prot')} / {lab.addr('prot', 6)}, "
                  f"client {lab.addr('cli')}, attacker {lab.addr('att')}")
        lab.warm()
        with EnforcerProcess(lab, policy) as enf, \
                CollectorProcess(enf, out_dir, sinks=sinks,
                                 config={"kafka": {"spool_dir": str(out_dir / "kafka-spool")}}) as col, \
                traffic.echo_servers(lab, "prot", tcp=[22, 80, 3306], udp=[5353]), \
                traffic.echo_servers(lab, "cli", tcp=[9000]), JsonlFollower(col.jsonl) as follow:
            run.jsonl, run.sinks, run.collector_started = col.jsonl, col.sinks, time.time()
            con.print(f"[bold]enforcer[/] {enf.banner.strip()}")
            con.print(f"[bold]collector[/] {col.banner.strip()}")
            steps = run.steps
            # 1. the attacker probes first: its drop history is old news by the time it floods
            steps += [_tcp(lab, "att", "prot", 80, 4, "blocked"), _ping(lab, "att", "prot", 4, "blocked")]
            # 2. normal traffic
            for fam in (4, 6):
                steps += [_tcp(lab, "cli", "prot", 22, fam, "pass"), _tcp(lab, "cli", "prot", 80, fam, "pass"),
                          _udp(lab, "cli", "prot", 5353, fam, "pass"), _ping(lab, "cli", "prot", fam, "pass"),
                          _tcp(lab, "cli", "prot", 3306, fam, "blocked"), _egress(lab, fam)]
            steps.append(_tcp(lab, "cli", "prot", 80, 4, "pass", count=40, reuse=True, size=1400))
            run.normal_end = time.time()
            run.status_before_flood = col.status()
            # 3. the flood, while the client keeps using the web service
            rate = f"{flood_pps} pps" if flood_pps else "full speed"
            con.print(f"[bold]flood[/]: attacker sends UDP to port 5353 at {rate} for {flood_seconds:g} s, "
                      "while the client keeps using the web service …")
            legit = traffic.start_in(lab, "cli", "tcp-client", host=lab.addr("prot"), port=80,
                                     count=max(5, int(flood_seconds / 0.1)), interval=0.1, op_timeout=1.0)
            run.flood_start = time.time()
            run.flood = traffic.trafgen_in(lab, "att", kind="udp", dport=5353, duration=flood_seconds,
                                           rate_pps=flood_pps)
            run.flood_end = time.time()
            r = legit.result(timeout=60)
            steps.append(Step("cli → prot tcp/80 (IPv4) during the flood", "pass", r["ok"], r["count"]))
            # 4. quiet: wait (bounded) until the attacker's anomaly has closed
            con.print("[bold]quiet[/]: waiting for the flood's anomaly to close …")
            deadline = time.monotonic() + close_wait
            while time.monotonic() < deadline and not any(
                    _akey(rec) == ("source_prefix", ATTACKER_PREFIX) and _astate(rec) == "close"
                    for _, rec in list(follow.arrivals)):
                time.sleep(0.2)
            time.sleep(0.3)
            run.collector_rc = col.stop()
            run.collector_exit = col.exit_output
            run.collector_status = col.final_status
            if col.final_status:
                (out_dir / "collector-status.json").write_text(json.dumps(col.final_status, indent=1, sort_keys=True))
            run.enforcer_status = enf.status()
            follow.stop()
            run.arrivals = list(follow.arrivals)
    run.records = read_jsonl(run.jsonl)
    run.elapsed_s = time.monotonic() - t0
    return run


# ---- what the log says ---------------------------------------------------------------------------

def _anomaly(rec: dict) -> dict:
    return rec.get("hostwall", {}).get("anomaly", {})


def _akey(rec: dict) -> tuple[str, str]:
    k = _anomaly(rec).get("key", {})
    return k.get("dimension", ""), str(k.get("value", ""))


def _astate(rec: dict) -> str:
    return _anomaly(rec).get("state", "")


def iso_s(s: str) -> float:
    from hostwall.collector.records import parse_iso_ns
    return parse_iso_ns(s) / 1e9


def top_flows(records: list[dict], n: int = 8) -> list[dict]:
    """Flows of the log, one row per connection (start + end/update records merged), by bytes."""
    return sorted(_flows(records), key=lambda f: -sum(f["bytes"]))[:n]


def open_flows(records: list[dict]) -> list[dict]:
    """Flows of the log without an end: still tracked by the datapath when the collector stopped
    (docs/records.md "Flows without an end")."""
    return [f for f in _flows(records) if f["state"] == "open"]


def _flows(records: list[dict]) -> list[dict]:
    flows: dict[tuple, dict] = {}
    for r in records:
        if kind(r) != "flow":
            continue
        net, src, dst = r.get("network", {}), r.get("source", {}), r.get("destination", {})
        key = (net.get("community_id") or "", net.get("transport", net.get("iana_number")), src.get("ip"),
               src.get("port"), dst.get("ip"), dst.get("port"))
        f = flows.setdefault(key, {"key": key, "rule": "", "state": "open", "packets": (0, 0), "bytes": (0, 0),
                                   "duration_s": None, "direction": net.get("direction", "")})
        f["rule"] = r.get("rule", {}).get("name", f["rule"])
        if "packets" in src:
            f["packets"] = (src.get("packets", 0), dst.get("packets", 0))
            f["bytes"] = (src.get("bytes", 0), dst.get("bytes", 0))
        fl = r.get("hostwall", {}).get("flow", {})
        if fl.get("state") == "closed":
            f["state"] = fl.get("end_reason", "closed")
            f["duration_s"] = fl.get("duration_ns", 0) / 1e9
    return list(flows.values())


def drops_from_log(records: list[dict]) -> Counter:
    """Packets per (reason, verdict) from the drop summaries."""
    out: Counter = Counter()
    for r in records:
        if kind(r) == "drop_summary":
            hw = r["hostwall"]
            out[(hw.get("reason", "?"), hw.get("verdict", "drop"))] += int(r["network"]["packets"])
    return out


def drops_from_enforcer(status: dict) -> Counter:
    out: Counter = Counter()
    for reason, v in status.get("drops_by_reason", {}).items():
        for verdict in ("drop", "would_drop"):
            if v.get(verdict):
                out[(reason, verdict)] += int(v[verdict])
    return out


def anomalies(records: list[dict], arrivals: list[tuple[float, dict]]) -> list[dict]:
    """One row per anomaly id: key, first/last state, severity, peak rate, open/close times."""
    seen_at = {_anomaly(r).get("id", "") + _astate(r): t for t, r in arrivals}
    rows: dict[str, dict] = {}
    for r in records:
        if kind(r) != "anomaly":
            continue
        a = _anomaly(r)
        key = a["key"]
        row = rows.setdefault(a["id"], {"id": a["id"], "signal": key.get("signal", ""),
                                        "dimension": key.get("dimension", ""), "value": str(key.get("value", "")),
                                        "states": [], "severity": "", "peak_rate": 0.0, "opened_at": None,
                                        "closed_at": None, "open_seen": None, "baseline": None})
        row["states"].append(a["state"])
        row["severity"] = a.get("severity", row["severity"])
        row["peak_rate"] = max(row["peak_rate"], float(a.get("peak_rate", 0.0)), float(a.get("rate", 0.0)))
        if a["state"] == "open":
            row["opened_at"] = iso_s(a["opened_at"])
            row["open_seen"] = seen_at.get(a["id"] + "open")
            row["baseline"] = a.get("baseline", {}).get("rate")
        if a["state"] == "close":
            row["closed_at"] = iso_s(a["closed_at"])
    return list(rows.values())


def ledger_of(status: dict | None, sink: str | None = None) -> dict:
    """One sink's balance (the first, or `sink`) from the collector's final status; {} if none."""
    if not status:
        return {}
    led = status.get("ledger", {})
    sinks = led.get("sinks", {})
    if not sinks or (sink is not None and sink not in sinks):
        return {}
    name = sink if sink is not None else next(iter(sinks))
    return {"sink": name, **sinks[name], "produced_by_source": led.get("produced_by_source", {}),
            "lost_by_stage": led.get("lost_by_stage", {}), "violations": led.get("violations", []) +
            led.get("quiescent_violations", []), "kernel_events": led.get("kernel_events", {}),
            "state": status.get("state")}


def jsonl_lines(url: str) -> int | None:
    """Lines in a jsonl: sink's file (None for other sinks)."""
    if not url.startswith("jsonl:"):
        return None
    with open(url[len("jsonl:"):], "rb") as f:
        return sum(1 for line in f if line.strip())


def in_prefix(ip: str, prefix: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("/")[0]) in ipaddress.ip_network(prefix)
    except ValueError:
        return False


def checks(run: DemoRun) -> list[Check]:
    out = []
    bad = [s for s in run.steps if not s.as_expected]
    out.append(Check("traffic behaved as the policy says (client unharmed by the flood)", not bad,
                     "; ".join(f"{s.what}: {s.outcome}" for s in bad)))
    rows = anomalies(run.records, run.arrivals)
    before = [r for r in rows if r["opened_at"] is not None and r["opened_at"] < run.flood_start - 1.0]
    out.append(Check("normal traffic opened no anomaly", not before,
                     "; ".join(f"{r['dimension']} {r['value']}" for r in before)))
    src = [r for r in rows if r["dimension"] == "source_prefix"]
    att = [r for r in src if r["value"] == ATTACKER_PREFIX]
    detail = f"source-prefix anomalies: {[(r['value'], r['states']) for r in src]}"
    ok = len(src) == 1 and len(att) == 1
    if ok:
        a = att[0]
        lat = (a["open_seen"] - run.flood_start) if a["open_seen"] else None
        ok = (a["opened_at"] is not None and a["open_seen"] is not None and lat <= OPEN_WITHIN_S
              and a["closed_at"] is not None and a["closed_at"] >= run.flood_end and a["states"][-1] == "close")
        closed = "never" if a["closed_at"] is None else f"{a['closed_at'] - run.flood_end:+.1f} s after it ended"
        seen = "never" if lat is None else f"{lat:.2f} s"
        detail = (f"opened {a['opened_at'] - run.flood_start:+.2f} s after the flood started (in the log after "
                  f"{seen}), closed {closed}")
    out.append(Check(f"the flood opened exactly one anomaly for the attacker's prefix ({ATTACKER_PREFIX}) "
                     f"within {OPEN_WITHIN_S:g} s, and it closed", ok, detail))
    log, enf = drops_from_log(run.records), drops_from_enforcer(run.enforcer_status)
    out.append(Check("drop summaries in the log add up to the enforcer's drop counters, per reason",
                     log == enf and sum(log.values()) > 0,
                     "" if log == enf else f"log {dict(log)} vs enforcer {dict(enf)}"))
    names = list((run.collector_status or {}).get("ledger", {}).get("sinks", {}))
    bad_sinks = []
    for name in names or ["(no final status)"]:
        led = ledger_of(run.collector_status, name)
        lines = jsonl_lines(name) if led else None
        ok = bool(led) and led["produced"] == led["delivered"] + led["lost"] and led["in_flight"] == 0 \
            and not led["violations"] and led.get("state") == "stopped" and lines in (None, led["delivered"])
        if not ok:
            got = {k: led.get(k) for k in ("produced", "delivered", "lost", "in_flight", "violations")}
            bad_sinks.append(f"{name}: {got}, {lines} lines")
    out.append(Check("collector ledger balanced: produced = delivered + lost, nothing in flight; "
                     "the log holds every delivered record", not bad_sinks, "; ".join(bad_sinks)))
    out.append(Check("collector stopped cleanly (exit 0)", run.collector_rc == 0,
                     "" if run.collector_rc == 0 else f"exit {run.collector_rc}"))
    c = run.conformance
    worst = "; ".join(f"{v} [{n}]" for v, n in c.problems.most_common(3))
    out.append(Check("every record is valid against the official ECS and OCSF definitions and schemas/*.json, "
                     "and every flow's start sorts before its end", c.ok,
                     "" if c.ok else "; ".join(x for x in (c.line(), worst, *c.invariant_violations[:3]) if x)))
    return out


# ---- printing ------------------------------------------------------------------------------------

def _plain(*cells) -> list[Text]:
    """Cells as literal text (IPv6 brackets are not rich markup)."""
    return [Text(str(c)) for c in cells]


def _n(x: int | float) -> str:
    return f"{x:,}".replace(",", " ") if isinstance(x, int) else f"{x:,.1f}".replace(",", " ")


def _duration(s: float | None) -> str:
    """Flow durations are exact to the µs (first to last packet): short ones in ms."""
    return "-" if s is None else f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.2f} ms"


def _where(f: dict) -> str:
    _, proto, sip, sp, dip, dp = f["key"]
    a = f"[{sip}]" if ":" in str(sip) else str(sip)
    b = f"[{dip}]" if ":" in str(dip) else str(dip)
    return f"{proto} {a}{f':{sp}' if sp is not None else ''} → {b}{f':{dp}' if dp is not None else ''}"


def print_summary(run: DemoRun, con: Console) -> list[Check]:
    t = Table(title="traffic (what the hosts saw)")
    for c in ("traffic", "expected", "outcome", ""):
        t.add_column(c)
    for s in run.steps:
        t.add_row(s.what, s.expect, s.outcome, "[green]✓[/]" if s.as_expected else "[red]✗[/]")
    con.print(t)
    fl = run.flood
    con.print(f"flood: attacker sent {_n(fl.get('packets') or 0)} packets "
              f"({_n(float(fl.get('pps') or 0))} pps) in {fl.get('wall_s', 0):.1f} s")

    kinds = Counter(kind(r) for r in run.records)
    t = Table(title=f"top flows (flow log: {sum(kinds.values())} records — "
                    + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")")
    for c in ("flow", "rule", "packets →/←", "bytes →/←", "duration", "end"):
        t.add_column(c, justify="right" if c in ("packets →/←", "bytes →/←", "duration") else "left")
    for f in top_flows(run.records, 6):
        t.add_row(*_plain(_where(f), f["rule"] or "(conntrack)", f"{f['packets'][0]}/{f['packets'][1]}",
                          f"{_n(f['bytes'][0])}/{_n(f['bytes'][1])}",
                          _duration(f["duration_s"]), f["state"]))
    con.print(t)
    still = open_flows(run.records)
    if still:
        con.print(f"  {len(still)} flows still open when the collector stopped ({', '.join(_where(f) for f in still)}): "
                  "tracked by the datapath, their idle timeout (UDP 180 s, ICMP 30 s) is longer than the demo; "
                  'no end is invented (docs/records.md "Flows without an end")', highlight=False)

    log, enf = drops_from_log(run.records), drops_from_enforcer(run.enforcer_status)
    t = Table(title="drops by reason (packets)")
    for c in ("reason", "verdict", "flow log (drop summaries)", "enforcer counters", ""):
        t.add_column(c, justify="right" if "(" in c or "counters" in c else "left")
    for key in sorted(set(log) | set(enf), key=lambda k: -max(log.get(k, 0), enf.get(k, 0))):
        t.add_row(key[0], key[1], _n(log.get(key, 0)), _n(enf.get(key, 0)),
                  "[green]=[/]" if log.get(key, 0) == enf.get(key, 0) else "[red]≠[/]")
    t.add_row("[bold]total[/]", "", _n(sum(log.values())), _n(sum(enf.values())), "")
    con.print(t)

    rows = anomalies(run.records, run.arrivals)
    t = Table(title="anomalies")
    for c in ("signal", "key", "severity", PEAK, "opened", "closed", "records"):
        t.add_column(c, justify="right" if c == PEAK else "left")
    for r in sorted(rows, key=lambda r: (r["opened_at"] or 0)):
        opened = "-" if r["opened_at"] is None else f"{r['opened_at'] - run.flood_start:+.2f} s"
        if r["open_seen"]:
            opened += f" (log {r['open_seen'] - run.flood_start:+.2f} s)"
        closed = "still open" if r["closed_at"] is None else f"{r['closed_at'] - run.flood_end:+.1f} s"
        t.add_row(*_plain(r["signal"], f"{r['dimension']} {r['value']}", r["severity"], _n(round(r["peak_rate"], 1)),
                          opened, closed, " → ".join(Counter(r["states"]).keys())))
    if not rows:
        t.add_row("(none)", "", "", "", "", "", "")
    con.print(t)
    con.print("  opened: after the flood's start (the anomaly's own time; log: when a reader of the flow log saw it); "
              f"closed: after the flood's end; peak: the highest {LAB_CONFIG['anomaly']['window_s']:g} s window "
              "average while open (hostwall.anomaly.peak_rate, docs/records.md), below a flood's packet rate when "
              "the flood is shorter than the window", highlight=False)

    names = list((run.collector_status or {}).get("ledger", {}).get("sinks", {}))
    for name in names:
        led = ledger_of(run.collector_status, name)
        lost = ", ".join(f"{stage}.{r} {n}" for stage, rs in led["lost_by_stage"].items() for r, n in rs.items())
        lost += ", ".join(f"{r} {n}" for r, n in led.get("lost_in_sink", {}).items())
        src = ", ".join(f"{k} {v}" for k, v in led["produced_by_source"].items())
        balanced = led["produced"] == led["delivered"] + led["lost"] + led["in_flight"]
        con.print(f"[bold]collector ledger[/] {name}: produced {_n(led['produced'])} = delivered "
                  f"{_n(led['delivered'])} + lost {_n(led['lost'])} + in flight {led['in_flight']} "
                  f"({'balanced' if balanced else 'MISMATCH'}); produced by source: {src}; lost: {lost or 'none'}; "
                  f"lines in the file: {_n(jsonl_lines(name) or 0)}", highlight=False)
    if not names:
        con.print("[red]collector ledger: no final status[/]")
    con.print(f"[bold]conformance[/] {run.conformance.line()}", highlight=False)
    con.print(f"[bold]flow log[/] {run.jsonl}  (next to it: {kept_files(run.out_dir)})", highlight=False)

    cs = checks(run)
    for c in cs:
        con.print(f"  {'[green]✓[/]' if c.ok else '[red]✗[/]'} {c.what}" + (f" — {c.detail}" if c.detail else ""))
    return cs


# what the collector leaves next to the flow log (lab/collector_proc.py), by file name
KEPT = (("hostwall.collector.yaml", "the settings it ran with"),
        ("hostwall.collector.log", "its output: banner, warnings, exit ledger"),
        ("collector-status.json", "its final status; read it with `hostwall-collector status --status-file {path}`"))


def kept_files(out_dir: Path) -> str:
    """The kept files that exist, each with what it is (README "Using the collector")."""
    return "; ".join(f"{name}: " + what.format(path=out_dir / name)
                     for name, what in KEPT if (out_dir / name).is_file()) or "nothing else"


def run_demo(policy: Path = DEFAULT_POLICY, flood_seconds: float = 3.0, console: Console | None = None,
             out_root: Path = DEFAULT_OUT, flood_pps: int | None = 100_000,
             extra_sinks: list[str] | None = None) -> int:
    """extra_sinks: kafka://HOST:PORT / otlp://HOST:PORT URLs shipped to besides the run's JSONL log."""
    con = console or (Console() if sys.stdout.isatty() else Console(width=120))
    ok, why = lab_available()
    if not ok:
        con.print(f"[red]cannot build the lab: {why}[/]")
        return 1
    cleanup_stale()
    out_dir = Path(out_root) / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while out_dir.exists():
        out_dir = out_dir.with_name(f"{out_dir.name.split('.')[0]}.{n}")
        n += 1
    try:
        sinks = [f"jsonl:{out_dir / 'flows.jsonl'}", *extra_sinks] if extra_sinks else None
        run = run_lab(Path(policy), out_dir, flood_seconds, flood_pps, con, sinks=sinks)
    except Exception as e:                      # noqa: BLE001 — one clear line; everything was cleaned up
        con.print(f"demo failed: {type(e).__name__}: {e}", style="red", markup=False, highlight=False)
        con.print(f"lab removed; the collector's files (if any) are in {out_dir}", highlight=False)
        return 1
    con.print(f"lab removed — {run.elapsed_s:.1f} s")
    cs = print_summary(run, con)
    bad = [c for c in cs if not c.ok]
    con.print(f"[bold]{'every check holds' if not bad else f'{len(bad)} check(s) failed'}[/] — flow log kept at "
              f"{run.jsonl}")
    return 0 if not bad else 1
