#!/usr/bin/env bash
# Set up keymgr with the benchmark peers (Tink, AWS Encryption SDK, psutil: the `bench`
# extra), then run the envelope benchmark on a fresh SoftHSM token made for the run.
# Prints markdown tables (docs/performance.md records one run). Not part of CI: it
# takes about two minutes and its numbers depend on the machine.
#   bash scripts/bench.sh                 full run (64 MiB and 1 GiB streams)
#   bash scripts/bench.sh --quick         no 1 GiB stream, shorter process runs
#   bash scripts/bench.sh --token URI     on another token
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --bench
if [ "${1:-}" = "--rewrap" ]; then shift; exec .venv/bin/python bench/rewrap.py "$@"; fi  # bulk rewrap (bench/rewrap.py)
if [ "${1:-}" = "--fields" ]; then shift; exec .venv/bin/python bench/fields.py "$@"; fi  # database fields (bench/fields.py)
exec .venv/bin/python bench/envelope.py "$@"
