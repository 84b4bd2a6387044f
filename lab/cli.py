"""hostwall-lab: the self-contained namespace lab (`hostwall-lab demo`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hostwall-lab", description="hostwall namespace lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="lab + enforcer + traffic + summary; cleans up after itself")
    d.add_argument("--policy", type=Path, help="policy to enforce (default: examples/policy.yaml)")
    d.add_argument("--flood-seconds", type=float, default=3.0)
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
    return run_demo(a.policy or DEFAULT_POLICY, a.flood_seconds)


if __name__ == "__main__":
    sys.exit(main())
