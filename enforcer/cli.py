"""hostwall-enforcer: validate | run | apply | status | detach | ban, and the policy tooling test |
explain | lint | diff | import (cli_tooling.py) (docs/cli.md).

Exit codes: 0 ok, 2 bad input (every error listed, one per line: file:line: path: message), 1 runtime
failure (one line: what failed and what to do).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from hostwall.bpf.state import DEFAULT_PIN_DIR
from hostwall.yamldoc import PolicyError

from .policy import InterfaceConf, Policy, load_policy

EXIT_OK, EXIT_RUNTIME, EXIT_INPUT = 0, 1, 2


def _err(msg: str) -> None:
    print(f"hostwall-enforcer: {msg}", file=sys.stderr, flush=True)


class _Progress:
    """Progress of reading big peers files: a bar on a terminal, a few lines otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = -1
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if total < 10000:
            return
        if self.tty:
            if self.bar is None:
                from rich.progress import Progress
                self.bar = Progress(transient=True)
                self.bar.start()
                self.task = self.bar.add_task("reading peers files", total=total)
            self.bar.update(self.task, completed=done, total=total)
            if done >= total:
                self.bar.stop()
                self.bar = None
        else:
            pct = 100 * done // max(total, 1)
            if pct // 25 != self.last // 25 or done >= total:
                self.last = pct
                print(f"reading peers files: {done}/{total} lines ({pct}%)", file=sys.stderr, flush=True)


def _load(path: str) -> Policy:
    t = time.perf_counter()
    p = load_policy(path, progress=_Progress())
    if p.prefix_count >= 10000:
        print(f"loaded {p.prefix_count} prefixes in {time.perf_counter() - t:.2f} s", file=sys.stderr, flush=True)
    return p


def _policy_errors(e: PolicyError, changes: bool = True) -> int:
    """Every issue, then the count; `changes`: the command would have changed the kernel (run, apply),
    so the operator is told it did not."""
    for issue in e.issues:
        print(str(issue), file=sys.stderr)
    _err(f"{len(e.issues)} error(s)" + ("; nothing was changed" if changes else ""))
    return EXIT_INPUT


def _snapshot_without_cases(a) -> bool:
    """--fqdn-addresses and --reference-only shape how the cases are judged (docs/policy.md "fqdns
    rules"): without --cases they are an input error, never silently ignored (apply would change the
    policy as if they did something)."""
    for given, opt in ((a.fqdn_addresses, "--fqdn-addresses"), (getattr(a, "reference_only", False), "--reference-only")):
        if given and not a.cases:
            _err(f"{opt} judges the --cases file; give --cases FILE too")
            return True
    return False


def cmd_validate(a) -> int:
    if _snapshot_without_cases(a):
        return EXIT_INPUT
    p = _load(a.policy)
    print(f"{a.policy}: OK — policy {p.name!r} revision {p.revision}: {len(p.rules)} rules, "
          f"{p.prefix_count} prefixes, {len(p.dos_profiles)} DoS profiles, {len(p.interfaces)} interfaces")
    if a.cases:          # by the reference model: validate needs no root and no BPF (docs/cli.md)
        from .cli_tooling import run_cases
        try:
            if run_cases(p, a.cases, reference_only=True, fqdn_addresses=a.fqdn_addresses).failed:
                return EXIT_RUNTIME
        except ValueError as e:          # the fqdn snapshot file
            _err(str(e))
            return EXIT_INPUT
    return EXIT_OK


def _interfaces(a, p: Policy) -> list[InterfaceConf]:
    if a.interface:
        by_name = {i.name: i for i in p.interfaces}
        return [InterfaceConf(n, a.xdp_mode or (by_name[n].xdp_mode if n in by_name else "auto"),
                              by_name[n].dos_profile if n in by_name else None) for n in a.interface]
    return [InterfaceConf(i.name, a.xdp_mode or i.xdp_mode, i.dos_profile) for i in p.interfaces]


def cmd_run(a) -> int:
    from . import runner
    p = _load(a.policy)
    ifaces = _interfaces(a, p)
    if not ifaces:
        _err("no interface to protect: pass --interface IF or list `interfaces:` in the policy")
        return EXIT_INPUT
    return runner.run(a, p, ifaces, _load, _policy_errors)


def cmd_apply(a) -> int:
    from . import control
    from .cli_tooling import dry_run, run_cases
    if _snapshot_without_cases(a):
        return EXIT_INPUT
    p = _load(a.policy)
    if a.cases:
        try:
            if run_cases(p, a.cases, a.reference_only, quiet=True, fqdn_addresses=a.fqdn_addresses).failed:
                _err("the cases failed; nothing was changed")
                return EXIT_RUNTIME
        except ValueError as e:          # the fqdn snapshot file
            _err(f"{e}; nothing was changed")
            return EXIT_INPUT
        except RuntimeError as e:
            _err(f"{e}; nothing was changed")
            return EXIT_RUNTIME
        print(f"{a.cases}: every case and invariant passed")
    if a.dry_run:
        return dry_run(p, a.pin_dir)
    t = time.perf_counter()
    r = control.apply(p, a.pin_dir)
    total = time.perf_counter() - t
    print(f"revision {r.old_revision or '(none)'} → {r.new_revision}: {r.rules} rules, {r.prefixes} prefixes; "
          f"switch {r.switch_ms:.3f} ms, apply {total:.3f} s (compile {r.compile_s:.3f} s), "
          f"{r.written_records} records written")
    if r.fqdn_full:
        _err(f"warning: {control.fqdn_full_text(r.fqdn_full)}")
    return EXIT_OK


def cmd_detach(a) -> int:
    from hostwall.bpf import retired

    from . import control
    from .runner import detach_text
    print(detach_text(a.pin_dir))
    for held in control.discard_retired(a.pin_dir) if a.discard_retired else []:
        print(f"discarded retired instance {held['detached_ns']}: {held['events']} unread events, "
              f"{held['connections']} tracked connections, {held['drop_keys']} drop keys (noted as lost)")
    left = retired.listing(a.pin_dir)
    if left:
        print(f"{len(left)} retired instance(s) kept for the collector to drain: {left[0].parent}")
    return EXIT_OK


def _open(pin_dir: str):
    from .control import ControlError
    from .datapath import Datapath
    if not Datapath.is_pinned(pin_dir):
        raise ControlError(f"no running instance at {pin_dir}; start one with `hostwall-enforcer run`")
    return Datapath.open(pin_dir)


def _duration(text: str) -> float:
    from hostwall.units import parse_duration
    return parse_duration(text)


def cmd_ban(a) -> int:
    from hostwall.bpf.state import InstanceState, policy_writer

    from . import bans
    dp = _open(a.pin_dir)
    try:
        if a.ban_cmd == "add":
            try:
                with policy_writer(a.pin_dir):      # hw_config's read-modify-write: one writer (control.detach)
                    net = bans.add(dp, a.prefix, _duration(a.duration) if a.duration else None)
            except ValueError as e:
                _err(str(e))
                return EXIT_INPUT
            print(f"banned {net}" + (f" for {a.duration}" if a.duration else " until removed"))
        elif a.ban_cmd == "del":
            try:
                with policy_writer(a.pin_dir):
                    found = bans.delete(dp, a.prefix)
            except ValueError as e:
                _err(str(e))
                return EXIT_INPUT
            if not found:
                _err(f"no ban on {a.prefix}")
                return EXIT_RUNTIME
            print(f"lifted the ban on {a.prefix}")
        else:
            st = InstanceState.load(a.pin_dir)
            rows = bans.listing(dp, tuple(st.dos_profiles) if st else ())
            if a.json:
                print(json.dumps(rows, indent=1))
            else:
                _print_bans(rows)
        return EXIT_OK
    finally:
        dp.close()


def _console():
    """A terminal's width on a terminal (or COLUMNS); piped, wide enough that no table cuts a value."""
    from rich.console import Console
    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(width=10_000) if piped else Console()


def _onoff(v) -> str:
    return "?" if v is None else "on" if v else "off"


def _print_bans(rows: list[dict]) -> None:
    from rich.table import Table
    t = Table(title=f"bans ({len(rows)})")
    for c in ("prefix", "kind", "profile", "reason", "expires"):
        t.add_column(c)
    now = time.time()
    for b in rows:
        exp = "never" if b["until"] is None else f"in {max(0, b['until'] - now):.0f} s"
        t.add_row(b["prefix"], b["kind"], b.get("profile", "-"), b.get("reason", "-"), exp)
    _console().print(t)


def _fmt_n(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def cmd_status(a) -> int:
    from . import control
    s = control.status(a.pin_dir)
    if a.json:
        print(json.dumps(s, indent=1))
        return EXIT_OK
    from rich.table import Table
    con = _console()
    d = s["defaults"]
    con.print(f"[bold]{s['policy']}[/] revision [bold]{s['revision']}[/] (generation {s['generation']}, "
              f"{s['rules_count']} rules, {s['prefixes']} prefixes) — ingress {d['ingress']}, egress {d['egress']}, "
              f"stateful {_onoff(d['stateful'])}, audit {_onoff(d['audit'])}, "
              f"essential ICMP {_onoff(d.get('essential_icmp'))}; "
              f"pin dir {s['pin_dir']}; "
              f"run pid {s['pid']} {'alive' if s['pid_alive'] else 'not running (programs still attached)'}")
    _print_interfaces(con, s["interfaces"])
    t = Table(title="verdicts")
    for c in ("verdict", "packets", "bytes"):
        t.add_column(c, justify="right")
    for v, c in s["totals"].items():
        t.add_row(v, _fmt_n(c["packets"]), _fmt_n(c["bytes"]))
    con.print(t)
    if s["drops_by_reason"]:
        t = Table(title="drops by reason")
        for c in ("reason", "dropped", "would drop"):
            t.add_column(c, justify="right")
        for r, c in sorted(s["drops_by_reason"].items()):
            t.add_row(r, _fmt_n(c["drop"]), _fmt_n(c["would_drop"]))
        con.print(t)
    t = Table(title="rules (first match wins, in this order)")
    for c in ("rule", "prio", "dir", "action", "packets", "bytes"):
        t.add_column(c, justify="right" if c in ("prio", "packets", "bytes") else "left")
    for r in s["rules"]:
        t.add_row(r["name"], str(r.get("priority", "")), r.get("direction", ""), r.get("action", ""),
                  _fmt_n(r["packets"]), _fmt_n(r["bytes"]))
    con.print(t)
    if s["ports"]:
        t = Table(title="destination ports (top 20)")
        for c in ("port", "allowed", "dropped", "would drop"):
            t.add_column(c, justify="right")
        for p in s["ports"]:
            t.add_row(str(p["port"]), _fmt_n(p["allowed"]), _fmt_n(p["dropped"]), _fmt_n(p["would_drop"]))
        con.print(t)
    if s.get("dos"):
        t = Table(title="DoS drops per profile")
        for col in ("profile", "reason", "packets"):
            t.add_column(col, justify="right" if col == "packets" else "left")
        for prof, reasons in s["dos"].items():
            for r, n in sorted(reasons.items()):
                t.add_row(prof, r, _fmt_n(n))
        con.print(t)
    if s.get("bans"):
        _print_bans(s["bans"])
    _print_syn_proxy(con, s.get("syn_proxy") or {})
    if s.get("fragments"):
        t = Table(title="fragments (later fragments follow their first fragment)")
        for c in ("family", "first passed", "evicted", "claim lost", "followed", "unmatched"):
            t.add_column(c, justify="right")
        for fam, c in s["fragments"].items():
            t.add_row(fam, _fmt_n(c["inserted"]), _fmt_n(c["evicted"]), _fmt_n(c["claim_lost"]),
                      _fmt_n(c["followed"]), _fmt_n(c["unmatched"]))
        con.print(t)
    if s.get("fqdn"):
        _print_fqdn(con, s["fqdn"])
    t = Table(title="map pressure (conntrack evicts unconfirmed entries before established ones)")
    for c in ("map", "entries", "capacity", "%", "evicted", "unconfirmed", "established"):
        t.add_column(c, justify="right")
    for m, v in s["map_pressure"].items():
        t.add_row(m, str(v["entries"]), str(v["capacity"]), f"{v['percent']:.1f}", str(v.get("evicted", "")),
                  str(v.get("evicted_unconfirmed", "")), str(v.get("evicted_established", "")))
    con.print(t)
    mem = s.get("map_memory")
    if mem:
        top = sorted(mem["maps"].items(), key=lambda kv: -kv[1])[:5]
        con.print(f"map memory: {mem['total_bytes'] / 2**20:.1f} MiB in {len(mem['maps'])} maps (largest: "
                  + ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in top) + ")")
    return EXIT_OK


def _print_interfaces(con, interfaces: list[dict]) -> None:
    """The interfaces table: XDP judges ingress, TC egress; no TC ingress column, since none is attached
    (docs/datapath.md "Hooks") — only an older build's leftover filter is named."""
    from rich.table import Table
    t = Table(title="interfaces")
    for c in ("interface", "netns", "xdp", "tc egress"):
        t.add_column(c)
    for i in interfaces:
        t.add_row(i["name"], i.get("netns") or "-", i.get("xdp_mode", i.get("error", "?")), _onoff(i.get("tc_egress")))
    con.print(t)
    for i in interfaces:
        if i.get("tc_ingress"):
            con.print(f"{i['name']}: a TC ingress filter of an older build is still attached (the next start removes it)")


def _fqdn_datapath(d: dict | None) -> str:
    """status's datapath outcomes of the dynamic set (one per egress first packet that probed it)."""
    if d is None:
        return "datapath: not readable (an instance of another build)"
    return f"datapath (first packets that probed the set): hit {d['hit']}, expired {d['expired']}, miss {d['miss']}"


def _print_fqdn(con, fq: dict) -> None:
    """The fqdn section of `status`: proxy, dynamic sets, learnt names (docs/cli.md)."""
    from rich.table import Table
    p = fq["proxy"]
    d = p.get("dns") or {}
    if not (d or fq["sets"] or fq["names"]):
        return                                  # no dns section and nothing learnt: nothing to show
    c = p["counters"]
    con.print(f"DNS proxy {'running' if p['running'] else 'not running (learnt addresses still apply)'}"
              f" on {', '.join(d.get('listen', [])) or '-'} → {', '.join(d.get('upstreams', [])) or '-'}; "
              f"queries {c['queries_udp']} udp / {c['queries_tcp']} tcp, listed {c['listed']}, relayed {c['answered']}, "
              f"cache hits {c.get('cache_hits', 0)} / misses {c.get('cache_misses', 0)} / evictions "
              f"{c.get('cache_evictions', 0)}, "
              f"refused {c['refused']}, servfail {c['servfail']} (timeouts {c['upstream_timeout']}, errors "
              f"{c['upstream_error']}); dropped: malformed queries {c['malformed_query']}, answers "
              f"{c['malformed_answer']}, "
              f"mismatched {c['mismatched']}, overload {c['overload']}; addresses learnt {c['learnt']}, over the "
              f"per-name limit {c['overflow']}, full {c['set_full']}; {_fqdn_datapath(fq.get('datapath'))}")
    if fq["sets"]:
        t = Table(title="fqdn dynamic sets")
        for col in ("set", "rules", "fqdns", "addresses"):
            t.add_column(col, justify="right" if col in ("set", "addresses") else "left")
        for st in fq["sets"]:
            t.add_row(str(st["id"]), ", ".join(st["rules"]), ", ".join(st["fqdns"]), str(st["addresses"]))
        con.print(t)
    if fq["names"]:
        t = Table(title=f"learnt names ({fq['names_total']}; latest 20)")
        for col in ("name", "addresses", "expires in", "learnt", "sets"):
            t.add_column(col, justify="left" if col in ("name", "sets") else "right")
        for n in fq["names"][:20]:
            t.add_row(n["name"], str(n["addresses"]), f"{n['expires_in_s']:.0f} s", f"{n['learnt_s_ago']:.0f} s ago",
                      ", ".join(map(str, n.get("sets", []))))
        con.print(t)


def _print_syn_proxy(con, sp: dict) -> None:
    """SYN proxy modes and work, and the flows counted in aggregate (status without --json)."""
    from rich.table import Table
    profs = {n: p for n, p in sp.get("profiles", {}).items() if p["mode"] != "off" or p["per_port_pps"]}
    if profs:
        on = ", ".join(f"{p} ({s:.0f} s)" for p, s in sp.get("ports_on", {}).items()) or "none"
        con.print("SYN proxy: " + "; ".join(f"{n} {p['mode']}" + (" (conntrack pressure: on)" if p["pressure"] else "")
                                            for n, p in profs.items()) + f"; auto on for ports: {on}")
        st = sp.get("stats", {})
        con.print("  " + ", ".join(f"{k} {_fmt_n(v)}" for k, v in st.items()))
    agg = {k: v for k, v in sp.get("flows_aggregated", {}).items() if v["flows"] or v["ended"]}
    if agg:
        t = Table(title="flows counted in aggregate (flow summaries)")
        for c in ("kind", "started", "ended", "packets", "bytes"):
            t.add_column(c, justify="right")
        for k, v in agg.items():
            t.add_row(k, _fmt_n(v["flows"]), _fmt_n(v["ended"]), _fmt_n(v["packets"]), _fmt_n(v["bytes"]))
        con.print(t)


def build_parser() -> argparse.ArgumentParser:
    from .cli_tooling import add_fqdn_addresses, add_parsers
    ap = argparse.ArgumentParser(prog="hostwall-enforcer", description="hostwall XDP/TC firewall enforcer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pin = {"default": os.environ.get("HOSTWALL_PIN_DIR", DEFAULT_PIN_DIR),
           "help": "bpffs directory of the instance (default %(default)s)"}
    v = sub.add_parser("validate", help="check a policy; exit 2 listing every error")
    v.add_argument("policy")
    v.add_argument("--cases", metavar="FILE", help="also run this test cases file (reference model); exit 1 on a miss")
    add_fqdn_addresses(v)
    v.set_defaults(fn=cmd_validate)
    r = sub.add_parser("run", help="load, attach and enforce; stays in the foreground")
    r.add_argument("--policy", required=True, metavar="FILE", help="the policy to enforce (validated first)")
    r.add_argument("--interface", action="append", help="interface to protect (repeatable; overrides the policy's list)")
    r.add_argument("--pin-dir", **pin)
    r.add_argument("--xdp-mode", choices=("native", "generic", "auto"),
                   help="XDP attach mode for every interface (overrides the policy's interfaces[].xdp_mode; "
                        "auto: native where the driver supports it)")
    r.add_argument("--netns", help="attach to interfaces inside this network namespace (ip netns name)")
    r.add_argument("--keep-attached", action="store_true", help="on SIGTERM/SIGINT leave programs attached and pinned")
    r.set_defaults(fn=cmd_run)
    p = sub.add_parser("apply", help="swap the policy of the running instance atomically")
    p.add_argument("policy")
    p.add_argument("--pin-dir", **pin)
    p.add_argument("--cases", metavar="FILE", help="run this test cases file first (reference model and "
                                                   "test-run); change nothing unless every case passes")
    p.add_argument("--reference-only", action="store_true", help="with --cases: judge by the reference model alone")
    add_fqdn_addresses(p, test_run=True)
    p.add_argument("--dry-run", action="store_true", help="print which traffic would change verdict against the "
                                                          "running policy; change nothing")
    p.set_defaults(fn=cmd_apply)
    s = sub.add_parser("status", help="interfaces, revision, counters, map pressure")
    s.add_argument("--json", action="store_true", help="print everything as JSON (the text form is a summary)")
    s.add_argument("--pin-dir", **pin)
    s.set_defaults(fn=cmd_status)
    d = sub.add_parser("detach", help="detach from every interface and unpin")
    d.add_argument("--pin-dir", **pin)
    d.add_argument("--discard-retired", action="store_true",
                   help="also unpin the retired instances no collector drained yet (what they held is noted as lost)")
    d.set_defaults(fn=cmd_detach)
    b = sub.add_parser("ban", help="operator bans: add | del | list (also lists automatic DoS bans)")
    bsub = b.add_subparsers(dest="ban_cmd", required=True)
    ba = bsub.add_parser("add", help="drop every packet from PREFIX (reason banned)")
    ba.add_argument("prefix")
    ba.add_argument("--for", dest="duration", help="expire after this long (e.g. 10m, 1h); default: until removed")
    ba.add_argument("--pin-dir", **pin)
    bd = bsub.add_parser("del", help="remove an operator ban or lift an automatic one")
    bd.add_argument("prefix")
    bd.add_argument("--pin-dir", **pin)
    bl = bsub.add_parser("list", help="current bans with expiry")
    bl.add_argument("--json", action="store_true", help="print the bans as JSON")
    bl.add_argument("--pin-dir", **pin)
    b.set_defaults(fn=cmd_ban)
    add_parsers(sub, pin)
    for name in ("test", "explain", "lint", "diff", "import"):
        sub.choices[name].set_defaults(fn=lambda a: a.tool(a, _load))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["explain"]:          # an unquoted packet: argparse would take "->" for an option
        argv = ["to" if t == "->" else t for t in argv]
    a = build_parser().parse_args(argv)
    from .attach import AttachError
    from .compiler import CompileError
    from .control import ControlError
    try:
        return a.fn(a)
    except PolicyError as e:
        return _policy_errors(e, changes=a.fn in CHANGING)
    except CompileError as e:
        _err(f"policy does not fit the datapath: {e}" + ("; nothing was changed" if a.fn in CHANGING else ""))
        return EXIT_INPUT
    except (ControlError, AttachError) as e:
        _err(str(e))
        return EXIT_RUNTIME
    except PermissionError as e:
        _err(f"{e}; run as root (CAP_BPF and CAP_NET_ADMIN are needed)")
        return EXIT_RUNTIME
    except OSError as e:
        _err(f"system call failed: {e}")
        return EXIT_RUNTIME


CHANGING = (cmd_run, cmd_apply)          # the commands that change the kernel; the others only read


if __name__ == "__main__":
    sys.exit(main())
