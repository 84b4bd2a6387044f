"""`hostwall-collector`: run the collector, show its status, check a config.

    hostwall-collector run [--config FILE] [--sink URL]... [--pin-dir DIR] [--encoding ecs|ocsf]
                           [--event-budget N] [--hostname NAME] [--status-file PATH] [-v]
    hostwall-collector status [--json] [--config FILE] [--pin-dir DIR] [--status-file PATH]
    hostwall-collector check-config [--config FILE] [--sink URL]... [--pin-dir DIR] [--encoding E]

Exit codes: 0 ok; 2 bad input (every config error listed, one per line); 1 runtime failure (one
clear line: what, where, what to do). `run` stays in the foreground and prints one banner line
("collecting ...") once the sinks and the kernel maps are open; SIGTERM/SIGINT stop it cleanly
(sinks flushed). Entry point: collector.cli:main.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from .config import ENCODINGS, CollectorConfig, ConfigError, load_config

PROG = "hostwall-collector"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="hostwall collector: kernel events → SIEM records")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, sinks: bool = True) -> None:
        sp.add_argument("--config", metavar="FILE", help="YAML config file ($HOSTWALL_COLLECTOR_CONFIG)")
        sp.add_argument("--pin-dir", metavar="DIR", help="enforcer instance pin dir")
        sp.add_argument("--status-file", metavar="PATH", help="status JSON path")
        if sinks:
            sp.add_argument("--sink", action="append", metavar="URL",
                            help="jsonl:PATH | kafka://HOST:PORT | otlp://HOST:PORT | console (repeatable)")
            sp.add_argument("--encoding", choices=ENCODINGS, help="default record encoding of sinks")
            sp.add_argument("--event-budget", type=int, metavar="N", help="kernel events per second")
            sp.add_argument("--hostname", metavar="NAME", help="observer.hostname override")

    r = sub.add_parser("run", help="collect in the foreground until SIGTERM/SIGINT")
    common(r)
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    s = sub.add_parser("status", help="show the running collector's ledger, queues and sinks")
    common(s, sinks=False)
    s.add_argument("--json", action="store_true", help="print the status JSON")
    c = sub.add_parser("check-config", help="resolve and validate the configuration, print it")
    common(c)
    return p


def _config(a: argparse.Namespace) -> CollectorConfig:
    args = {"pin_dir": a.pin_dir, "status_file": a.status_file}
    for k in ("sink", "encoding", "event_budget", "hostname"):
        if hasattr(a, k):
            args["sinks" if k == "sink" else k] = getattr(a, k)
    return load_config(a.config, args=args)


def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        cfg = _config(a)
    except ConfigError as e:
        _err(f"invalid configuration ({len(e.issues)} error{'s' if len(e.issues) != 1 else ''}):")
        for issue in e.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    if a.cmd == "check-config":
        from .config import describe
        print(json.dumps(describe(cfg), indent=1, sort_keys=True))
        return 0
    if a.cmd == "status":
        return status(cfg, as_json=a.json)
    return run(cfg, verbose=a.verbose)


# ---- run ----------------------------------------------------------------------------------------

def run(cfg: CollectorConfig, *, verbose: bool = False) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .kernel import KernelSourceError
    from .pipeline import PipelineFailed, build_pipeline
    from .sinks import SinkUnavailable
    try:
        pipe = build_pipeline(cfg)
    except (KernelSourceError, SinkUnavailable) as e:
        _err(str(e))
        return 1
    except OSError as e:
        _err(f"cannot start: {e}")
        return 1

    async def go() -> None:
        task = asyncio.ensure_future(pipe.run(install_signals=True))
        while pipe.state == "starting" and not task.done():
            await asyncio.sleep(0.01)
        if pipe.state == "running":
            print(f"{PROG}: collecting from {cfg.pin_dir} → {', '.join(s.url for s in cfg.sinks)} "
                  f"(status: {pipe.status_path})", flush=True)
        await task

    import uvloop
    try:
        uvloop.run(go())
    except PipelineFailed as e:
        _err(f"stopped: {e}")
        return 1
    except (SinkUnavailable, OSError) as e:
        _err(f"cannot start: {e}")
        return 1
    except Exception as e:
        logging.getLogger("hostwall.collector").debug("unexpected failure", exc_info=True)
        _err(f"failed: {type(e).__name__}: {e} (run with -v for details)")
        return 1
    led = pipe.ledger.snapshot()
    led["quiescent_violations"] = pipe.ledger.check(quiescent=True)
    for line in _ledger_lines(led):
        print(f"{PROG}: {line}", flush=True)
    return 0


# ---- status -------------------------------------------------------------------------------------

def status(cfg: CollectorConfig, *, as_json: bool) -> int:
    path = cfg.status_path()
    try:
        st = json.loads(path.read_text())
    except FileNotFoundError:
        _err(f"no collector status at {path}; is `{PROG} run` running for pin dir {cfg.pin_dir}?")
        return 1
    except (OSError, ValueError) as e:
        _err(f"cannot read {path}: {e}")
        return 1
    st["alive"] = _alive(st.get("pid"))
    st["age_s"] = round(time.time() - float(st.get("updated_at", 0)), 3)
    if as_json:
        print(json.dumps(st, indent=1, sort_keys=True))
    else:
        print(render_status(st))
    return 0


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def _ledger_lines(led: dict) -> list[str]:
    lines = []
    for name, b in led.get("sinks", {}).items():
        ok = b["produced"] == b["delivered"] + b["lost"] + b["in_flight"]
        lines.append(f"{name}: produced {b['produced']} = delivered {b['delivered']} + lost {b['lost']} + "
                     f"in flight {b['in_flight']} {'ok' if ok else 'MISMATCH'}")
    for v in led.get("violations", []) + led.get("quiescent_violations", []):
        lines.append(f"ledger violation: {v}")
    return lines


def _mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


def render_status(st: dict) -> str:
    """Human-readable status (the --json form holds everything)."""
    state = st.get("state", "?")
    if state in ("running", "starting") and not st.get("alive"):
        state = f"dead (last update {st.get('age_s', 0):.0f} s ago)"
    out = [f"collector  {state}, pid {st.get('pid')}, up {st.get('uptime_s', 0):.0f} s, pin {st.get('pin_dir')}"]
    if st.get("error"):
        out.append(f"error      {st['error']}")
    led = st.get("ledger", {})
    for line in _ledger_lines(led):
        out.append(f"ledger     {line}")
    lost = [f"{stage}.{r} {n}" for stage, rs in led.get("lost_by_stage", {}).items() for r, n in rs.items()]
    lost += [f"{s}: {r} {n}" for s, b in led.get("sinks", {}).items() for r, n in b.get("lost_in_sink", {}).items()]
    out.append(f"lost       {', '.join(lost) if lost else 'none'}")
    kev = led.get("kernel_events", {})
    if kev:
        em = {t: o.get("emitted", 0) for t, o in kev.items()}
        out.append(f"kernel     events emitted {sum(em.values())} ({', '.join(f'{t} {n}' for t, n in em.items())}); "
                   f"aggregated {sum(o.get('aggregated', 0) for o in kev.values())}, "
                   f"over budget {sum(o.get('budget', 0) for o in kev.values())}, "
                   f"ring buffer full {sum(o.get('ringbuf_full', 0) for o in kev.values())} (cumulative)")
    ring = st.get("ring", {})
    if ring:
        out.append(f"ring       backlog {ring.get('backlog_bytes', 0)} B of {_mib(ring.get('size_bytes', 0))}; "
                   f"read {ring.get('records_read', 0)}, decode errors {ring.get('decode_errors', 0)}")
    q = st.get("queues", {})
    qs = [f"events {q.get('events', {}).get('depth', 0)}/{q.get('events', {}).get('capacity_batches', 0)} batches"]
    qs += [f"{n} {v['depth']}/{v['capacity']} ({v['policy']}{', DEAD' if v.get('dead') else ''})"
           for n, v in q.get("sinks", {}).items()]
    out.append(f"queues     {'; '.join(qs)}")
    for n, s in st.get("sinks", {}).items():
        extra = f", {_mib(s['bytes_written'])} written, {s.get('rotations', 0)} rotations" if "bytes_written" in s else ""
        out.append(f"sink       {n}: delivered {s.get('delivered', 0)}, lost {s.get('lost', {}) or 0}, "
                   f"in flight {s.get('in_flight', 0)}{extra}")
    d = st.get("drops", {})
    out.append(f"drops      {d.get('intervals', 0)} intervals, {d.get('packets', 0)} packets summarized "
               f"(+{d.get('overflow_packets', 0)} overflow), last barrier {d.get('last', {}).get('barrier_ms', '-')} ms")
    c = st.get("conntrack", {})
    out.append(f"conntrack  {c.get('scans', 0)} scans, {c.get('closed', 0)} closed (after the close grace), "
               f"{c.get('expired', 0)} expired, {c.get('updates', 0)} updates")
    en = st.get("enricher")
    if isinstance(en, dict):
        flat = ", ".join(f"{k} {v}" for k, v in en.items() if not isinstance(v, dict))
        rates = ", ".join(f"{path} {r:.0%}" for path, r in _hit_rates(en))
        out.append(f"enricher   {flat}" + (f"; cache hit rates: {rates}" if rates else ""))
    return "\n".join(out)


def _hit_rates(d: dict, prefix: str = ""):
    """(dotted path, hit_rate) of every nested cache the enricher reports."""
    for k, v in d.items():
        if isinstance(v, dict):
            if isinstance(v.get("hit_rate"), (int, float)):
                yield f"{prefix}{k}", float(v["hit_rate"])
            yield from _hit_rates(v, f"{prefix}{k}.")


if __name__ == "__main__":
    sys.exit(main())
