#!/usr/bin/env bash
# The README's second command: set up whatever a fresh machine lacks, then run the whole test suite
# (docs/testing.md). pytest options pass through: bash scripts/test.sh tests/bpf -q
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/as-root.sh
bash scripts/setup.sh
bash scripts/setup-peers.sh          # Kafka (Maven jars), OTel Collector (builder), Prometheus, Alertmanager; cached
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
