"""`python -m hostwall.bench SUITE [--quick] [--json]` — the benchmark runner (docs/benchmarks.md).

Each suite is a module bench/<suite>.py with `run(quick: bool) -> dict[str, float]` (a suite whose run()
also takes `cpu` honours `--cpu N`: its timing loop is pinned to that CPU); it may also
expose TARGETS ({metric: (text, predicate(metrics) -> bool)}) and NOTES (printed under the table).
With --json exactly one JSON object goes to stdout: {"suite", "metrics", "machine"}; progress and
notes go to stderr. Without --json a table is printed, with PASS/FAIL next to metrics that have a
target (never in the JSON). Exit codes: 0 ok, 1 a suite failed, 2 bad usage or a suite that is not
implemented yet. `all` runs every implemented suite and merges their metrics (names are unique
across suites by design; a clash is prefixed with the suite name).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from .statedir import use_private_state_dir

SUITES = ("datapath", "lab", "swap", "dos", "collector", "kafka", "crash", "policy", "dns", "oncall")


class NotImplementedSuite(Exception):
    pass


def load_suite(name: str):
    """The suite's module; NotImplementedSuite if bench/<name>.py does not exist (yet)."""
    modname = f"{__package__ or 'bench'}.{name}"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise NotImplementedSuite(name) from None
        raise
    if not callable(getattr(mod, "run", None)):
        raise NotImplementedSuite(name)
    return mod


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        nproc = os.cpu_count() or 0
    return {
        "loadavg_1m": _load1(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpu_mhz": _cpu_mhz(),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or "unknown",
        "nproc": nproc,
        "nproc_online": os.cpu_count() or 0,
        "python": platform.python_version(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _load1() -> float:
    try:
        return float(os.getloadavg()[0])       # other work on the machine skews timings: record it
    except OSError:
        return -1.0


def _cpu_mhz() -> list[float]:
    """Current MHz per CPU as /proc/cpuinfo reports it (a VM often shows the nominal clock only)."""
    out = []
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("cpu MHz"):
            try:
                out.append(round(float(line.split(":", 1)[1]), 1))
            except ValueError:
                pass
    return out


def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v)}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.3f}" if abs(v) >= 0.001 else f"{v:.3g}"


def table(suite: str, metrics: dict[str, float], targets: dict[str, tuple[str, Callable]] | None,
          notes: str | None, machine: dict, elapsed: float) -> str:
    targets = targets or {}
    width = max([len(k) for k in metrics] + [6])
    lines = [f"suite {suite}: {len(metrics)} metrics in {elapsed:.1f} s "
             f"({machine['cpu']}, {machine['nproc']} CPUs, governor {machine['governor']}, kernel {machine['kernel']}, "
             f"load {machine['loadavg_1m']:.1f} at start, {machine.get('loadavg_1m_end', -1):.1f} at end, "
             f"{machine['timestamp']})",
             f"{'metric':<{width}}  {'value':>12}  target"]
    for k, v in metrics.items():
        t = ""
        if k in targets:
            text, pred = targets[k]
            try:
                t = f"{'PASS' if pred(metrics) else 'FAIL'} ({text})"
            except (KeyError, ZeroDivisionError, TypeError):
                t = f"n/a ({text})"
        lines.append(f"{k:<{width}}  {_fmt(v):>12}  {t}".rstrip())
    if notes:
        lines += ["", notes.rstrip()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hostwall.bench", description="hostwall benchmarks (docs/benchmarks.md)")
    ap.add_argument("suite", choices=SUITES + ("all",), help="which suite to run")
    ap.add_argument("--quick", action="store_true", help="smaller runs; each suite finishes in under a minute")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--cpu", type=int, default=None, metavar="N",
                    help="pin the timing loop to CPU N (suites whose run() takes `cpu`: datapath; `all` pins those only)")
    return ap.parse_args(argv)


def _takes_cpu(mod) -> bool:
    return "cpu" in inspect.signature(mod.run).parameters


def _run_one(name: str, quick: bool, cpu: int | None = None) -> tuple[dict[str, float], object]:
    mod = load_suite(name)
    metrics = mod.run(quick, cpu=cpu) if cpu is not None and _takes_cpu(mod) else mod.run(quick)
    if not isinstance(metrics, dict):
        raise TypeError(f"suite {name}: run() returned {type(metrics).__name__}, not a dict")
    out = {str(k): float(v) for k, v in metrics.items()}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite metric values: {', '.join(bad)}")
    return out, mod


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_private_state_dir()
    if args.cpu is not None and args.cpu not in os.sched_getaffinity(0):
        print(f"--cpu {args.cpu}: not one of the CPUs this process may run on "
              f"({sorted(os.sched_getaffinity(0))})", file=sys.stderr)
        return 2
    names = SUITES if args.suite == "all" else (args.suite,)
    machine = machine_info()
    merged: dict[str, float] = {}
    targets: dict[str, tuple[str, Callable]] = {}
    notes: list[str] = []
    ran = 0
    t0 = time.perf_counter()
    for name in names:
        try:
            if args.cpu is not None and args.suite != "all" and not _takes_cpu(load_suite(name)):
                print(f"suite {name} does not support --cpu", file=sys.stderr)
                return 2
            metrics, mod = _run_one(name, args.quick, args.cpu)
        except NotImplementedSuite:
            if args.suite != "all":
                print(f"suite {name} is not implemented yet", file=sys.stderr)
                return 2
            print(f"suite {name} is not implemented yet (skipped)", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print(f"suite {name}: interrupted", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 — one clear line per failed suite; its own log is above it
            msg = str(e).strip().splitlines()
            print(f"suite {name} failed: {type(e).__name__}: {msg[0] if msg else ''}"
                  + (f" (+{len(msg) - 1} more lines: {' | '.join(msg[1:4])})" if len(msg) > 1 else ""),
                  file=sys.stderr)
            return 1
        ran += 1
        for k, v in metrics.items():
            merged[k if k not in merged else f"{name}.{k}"] = v
        targets.update(getattr(mod, "TARGETS", None) or {})
        if getattr(mod, "NOTES", None):
            notes.append(f"[{name}] {mod.NOTES.rstrip()}" if args.suite == "all" else mod.NOTES)
    if not ran:
        print("no suite is implemented yet", file=sys.stderr)
        return 2
    machine["loadavg_1m_end"] = _load1()
    if args.cpu is not None:
        machine["pinned_cpu"] = args.cpu
    if args.json:
        print(json.dumps({"suite": args.suite, "metrics": merged, "machine": machine}, allow_nan=False))
    else:
        print(table(args.suite, merged, targets, "\n".join(notes) or None, machine, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
