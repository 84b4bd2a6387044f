"""`hostwall-collector`: run the collector, show its status, check a config.

    hostwall-collector run [--config FILE] [--sink URL]... [--pin-dir DIR] [--encoding ecs|ocsf]
                           [--event-budget N] [--hostname NAME] [--status-file PATH] [-v]
    hostwall-collector status [--json] [--config FILE] [--pin-dir DIR] [--status-file PATH]
    hostwall-collector check-config [--config FILE] [--sink URL]... [--pin-dir DIR] [--encoding E] [--connect]
                                    [--origins]
    hostwall-collector verify (FILE.jsonl | kafka://HOST:PORT/TOPIC)... [--sink NAME]... [--json] [--config FILE]
                              [--timeout S]

Exit codes: 0 ok; 2 bad input (every config error listed, one per line); 1 runtime failure (one
clear line: what, where, what to do). `run` stays in the foreground and prints one banner line
("collecting ...") once the sinks and the kernel maps are open; SIGTERM/SIGINT stop it cleanly
(sinks flushed). A sink that cannot work with its destination (credentials, TLS, permissions, a missing
topic, an unreachable broker it never delivered to) stops `run` within kafka.connect_timeout with exit 1
and one line. `check-config --connect` probes every sink the same way and prints one line each (exit 1
if any cannot deliver). `verify` reads what a sink wrote and checks it is complete (collector/verify.py):
exit 1 on any gap no loss record of the sink that wrote it (--sink, else inferred) explains. Entry point: collector.cli:main.
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
from .status_view import ledger_lines, render_status

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
    c.add_argument("--connect", action="store_true",
                   help="also connect to every sink (name, TCP, TLS, login, topics) and print one line each")
    c.add_argument("--origins", action="store_true",
                   help="print where each value came from (argument, environment, file) instead of the config")
    v = sub.add_parser("verify", help="check that what a sink wrote is complete (hostwall.seq, loss records)")
    v.add_argument("targets", nargs="+", metavar="TARGET", help="FILE.jsonl or kafka://HOST:PORT/TOPIC")
    v.add_argument("--config", metavar="FILE", help="collector config: kafka TLS/SASL settings for the reader")
    v.add_argument("--sink", action="append", default=[], metavar="NAME",
                   help="the sink that wrote the targets, as loss records name it (hostwall.loss.sink); "
                        "default: inferred from the targets (jsonl:PATH of the same file, kafka://HOST:PORT); "
                        "repeatable: give each name whose loss records count")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--timeout", type=float, default=120.0, metavar="S", help="bound for reading a topic")
    return p


def _config(a: argparse.Namespace) -> CollectorConfig:
    args = {"pin_dir": a.pin_dir, "status_file": a.status_file}
    for k in ("sink", "encoding", "event_budget", "hostname"):
        if hasattr(a, k):
            args["sinks" if k == "sink" else k] = getattr(a, k)
    return load_config(a.config, args=args)


def _piped(fn, arg) -> int:
    """Run a printing command whose reader may leave early (`status | head`, `verify | grep -m1`): a closed
    pipe ends it with exit 1 and no traceback (docs/cli.md: errors are one line, or none for this)."""
    try:
        rc = fn(arg)
        sys.stdout.flush()              # inside the try: a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit's own flush goes nowhere
        return 1


def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.cmd == "verify":
        return _piped(verify, a)
    try:
        cfg = _config(a)
    except ConfigError as e:
        _err(f"invalid configuration ({len(e.issues)} error{'s' if len(e.issues) != 1 else ''}):")
        for issue in e.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    if a.cmd == "check-config":
        if a.connect:
            return check_connect(cfg)
        from .config_checks import config_warnings
        from .config_view import as_file
        for w in config_warnings(cfg):
            print(f"{PROG}: warning: {w}", file=sys.stderr)
        doc = dict(cfg.origins) if a.origins else as_file(cfg)
        print(json.dumps(doc, indent=1, sort_keys=True))
        return 0
    if a.cmd == "status":
        return _piped(lambda c: status(c, as_json=a.json), cfg)
    return run(cfg, verbose=a.verbose)


# ---- run ----------------------------------------------------------------------------------------

def check_connect(cfg: CollectorConfig) -> int:
    """Probe every sink as it would start (kafka: kafka_probe.probe_kafka; jsonl: the file can be opened
    for appending; otlp and console: nothing to check before records flow). One line each on stdout;
    exit 1 if any sink cannot deliver."""
    bad = 0
    for spec in cfg.sinks:
        if spec.scheme == "kafka":
            from .sinks.kafka_probe import probe_kafka
            r = asyncio.run(probe_kafka(spec.target, cfg.kafka, cfg.kafka.connect_timeout_s, name=spec.name))
            print(str(r), flush=True)
            bad += not r.ok
        elif spec.scheme == "jsonl":
            try:
                os.makedirs(os.path.dirname(spec.target) or ".", exist_ok=True)
                with open(spec.target, "ab"):
                    pass
                print(f"{spec.name}: ok: {spec.target} can be appended to", flush=True)
            except OSError as e:
                print(f"{spec.name}: failing: cannot open {spec.target} for appending: {e.strerror}; "
                      "fix the path or its permissions", flush=True)
                bad += 1
        else:
            print(f"{spec.name}: ok: nothing to check before records flow", flush=True)
    return 1 if bad else 0


def verify(a: argparse.Namespace) -> int:
    from .verify import verify as check
    options = None
    if a.config:
        try:
            options = load_config(a.config, args={}).kafka
        except ConfigError as e:
            _err(f"invalid configuration ({len(e.issues)} errors): {e.issues[0]}")
            return 2
    try:
        reports, v = check(a.targets, options, a.timeout, a.sink)
    except (OSError, LookupError, ValueError, TimeoutError) as e:
        _err(f"verify: {e}")
        return 2 if isinstance(e, (ValueError, FileNotFoundError, LookupError)) else 1
    ok = all(r.ok for r in reports)
    if a.json:
        print(json.dumps({"ok": ok, "records": v.records, "unsequenced": v.unsequenced, "sinks": sorted(v.sinks),
                          "undecodable": v.undecodable, "streams": [r.as_dict() for r in reports]},
                         indent=1, sort_keys=True))
    else:
        for r in reports:
            print(r.line())
        print(f"{v.records} records read, {v.unsequenced} without hostwall.seq, {v.undecodable} undecodable: "
              f"{'complete' if ok else 'INCOMPLETE'}")
    _other_sink_hint(reports, v.sinks)
    return 0 if ok else 1


def _other_sink_hint(reports: list, sinks: set[str]) -> None:
    """Gaps only other sinks' loss records cover: say whose reports were taken, and how to name the sink."""
    n = sum(len(r.other_sink) for r in reports)
    if n:
        others = sorted({s for r in reports if r.other_sink for s in r.other_sinks})
        _err(f"verify: {n} gap range(s) are covered only by loss records of other sinks ({', '.join(others)}); "
             f"they explain nothing here, as the targets' sink is {', '.join(sorted(sinks)) or 'not known'}. "
             "If one of those sinks wrote the targets, pass --sink NAME")


def run(cfg: CollectorConfig, *, verbose: bool = False) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .config_checks import config_warnings
    from .kernel import KernelSourceError
    from .pipeline import PipelineFailed, StartFailed
    from .retired_drain import RetiredNotDrained, drain_retired, follow, unpin_if_drained
    from .sinks import SinkUnavailable
    from .wiring import build_pipeline
    for w in config_warnings(cfg):
        logging.getLogger("hostwall.collector").warning("%s", w)
    pipe = None

    async def go() -> None:
        nonlocal pipe
        while True:                             # the retired instances, then the live one; again when it is replaced
            drained = await drain_retired(cfg, build_pipeline)      # docs/collector.md "Detach"
            if drained is None:
                return                          # stopped by a signal while draining
            pipe = build_pipeline(cfg)
            pipe.retired_drained = drained
            task = asyncio.ensure_future(pipe.run(install_signals=True))
            while pipe.state == "starting" and not task.done():
                await asyncio.sleep(0.01)
            if pipe.state == "running":
                print(f"{PROG}: collecting from {cfg.pin_dir} → {', '.join(s.url for s in cfg.sinks)} "
                      f"(status: {pipe.status_path})", flush=True)
            if not await follow(cfg, pipe, task):
                return
            unpin_if_drained(cfg, pipe)         # else the next drain_retired drains what is left of it
            pipe.release_reader()

    import uvloop

    from hostwall.gcpause import tune_for_batches
    tune_for_batches()                      # records are made in batches: hostwall/gcpause.py says why
    try:
        uvloop.run(go())
    except (KernelSourceError, SinkUnavailable, RetiredNotDrained) as e:
        _err(str(e))
        return 1
    except StartFailed as e:
        _err(f"cannot start: {e}")
        return 1
    except PipelineFailed as e:
        _err(f"stopped: {e}")
        return 1
    except OSError as e:
        _err(f"cannot start: {e}")
        return 1
    except Exception as e:
        logging.getLogger("hostwall.collector").debug("unexpected failure", exc_info=True)
        _err(f"failed: {type(e).__name__}: {e} (run with -v for details)")
        return 1
    if pipe is None:
        return 0
    unpin_if_drained(cfg, pipe)             # its instance was retired while it ran (docs/collector.md "Detach")
    pipe.release_reader()
    led = pipe.ledger.snapshot()
    led["quiescent_violations"] = pipe.ledger.check(quiescent=True)
    for line in ledger_lines(led):
        print(f"{PROG}: {line}", flush=True)
    return 0


# ---- status -------------------------------------------------------------------------------------

def status(cfg: CollectorConfig, *, as_json: bool) -> int:
    path = cfg.status_path()
    try:
        st = json.loads(path.read_text())
    except FileNotFoundError:
        _err(f"no collector status at {path}; is `{PROG} run` running for pin dir {cfg.pin_dir}? "
             "(if it was given --status-file or --config, give the same here)")
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


if __name__ == "__main__":
    sys.exit(main())
