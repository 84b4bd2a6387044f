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
    sub.add_parser("cleanup", help="remove leftover lab namespaces (only idle ones)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("hostwall-lab: needs root (network namespaces and BPF)", file=sys.stderr)
        return 1
    if a.cmd == "cleanup":
        from .netns import cleanup_stale
        print(f"removed: {cleanup_stale() or 'nothing'}")
        return 0
    from .demo import DEFAULT_POLICY, run_demo
    if not 0 < a.flood_seconds <= 30:
        ap.error("--flood-seconds must be in (0, 30]")
    return run_demo(a.policy or DEFAULT_POLICY, a.flood_seconds, out_root=a.out_dir, flood_pps=a.flood_pps or None)


if __name__ == "__main__":
    sys.exit(main())
