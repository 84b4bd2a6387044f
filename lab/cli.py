"""hostwall-lab: the self-contained namespace lab (`hostwall-lab demo`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hostwall-lab", description="hostwall namespace lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="lab + enforcer + collector + traffic + summary; cleans up after itself "
                                    "(the flow log stays)")
    d.add_argument("--policy", type=Path, help="policy to enforce (default: examples/policy.yaml)")
    d.add_argument("--flood-seconds", type=float, default=3.0, help="length of the attacker's flood (default 3)")
    d.add_argument("--flood-pps", type=int, default=100_000,
                   help="flood rate in packets/s; 0 = as fast as trafgen can (default 100000)")
    d.add_argument("--out-dir", type=Path, default=Path("/var/tmp/hostwall-demo"),
                   help="where each run's flow log, collector config and log are kept (default /var/tmp/hostwall-demo)")
    d.add_argument("--kafka", action="append", default=[], metavar="HOST:PORT",
                   help="also ship to this Kafka broker (topics hostwall.flows, hostwall.anomalies, hostwall.audit; "
                        "spool in the run's folder); repeatable")
    d.add_argument("--otlp", action="append", default=[], metavar="HOST:PORT",
                   help="also ship to this OTLP/gRPC receiver, e.g. an OpenTelemetry Collector on 4317; repeatable")
    sub.add_parser("cleanup", help="remove leftover lab namespaces (only idle ones)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("hostwall-lab: needs root (network namespaces and BPF)", file=sys.stderr)
        return 1
    if a.cmd == "cleanup":
        from .netns import cleanup_stale
        print(f"removed: {cleanup_stale() or 'nothing'}")
        return 0
    from hostwall.collector.config import parse_sink

    from .demo import DEFAULT_POLICY, run_demo
    if not 0 < a.flood_seconds <= 30:
        ap.error("--flood-seconds must be in (0, 30]")
    extra = [f"kafka://{x}" for x in a.kafka] + [f"otlp://{x}" for x in a.otlp]
    for url in extra:                            # one clear line for a bad address, before the lab is built
        try:
            parse_sink(url, "ecs")
        except ValueError as e:
            ap.error(str(e))
    return run_demo(a.policy or DEFAULT_POLICY, a.flood_seconds, out_root=a.out_dir, flood_pps=a.flood_pps or None,
                    extra_sinks=extra)


if __name__ == "__main__":
    sys.exit(main())
