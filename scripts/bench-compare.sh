#!/usr/bin/env bash
# The same benchmark suites at two revisions, interleaved on this machine, and a table of their median
# ratios (bench/compare.py; docs/benchmarks.md "Before/after the house change (issue 18)"):
#   bash scripts/bench-compare.sh REV_A REV_B SUITE... [--rounds N] [--quick] [--out DIR]
# Builds a detached worktree per revision (its own scripts/setup.sh and .venv) in a temp dir and
# removes both at the end. Runs as root (BPF); stdlib Python only, so this checkout needs no set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/as-root.sh
exec /usr/bin/python3 bench/compare.py "$@"
