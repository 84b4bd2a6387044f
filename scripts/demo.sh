#!/usr/bin/env bash
# The README's first command: set up whatever a fresh machine lacks, then run the lab demo.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/as-root.sh
bash scripts/setup.sh
exec .venv/bin/hostwall-lab demo "$@"
