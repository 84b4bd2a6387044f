#!/usr/bin/env bash
# The README's second command: set up whatever a fresh machine lacks, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-peers.sh          # Kafka (Maven jars), OTel Collector (builder), Prometheus, Alertmanager; cached
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
