#!/usr/bin/env bash
# The long fuzz run: every parser of untrusted bytes under atheris (coverage-guided),
# seeded with inputs keymgr's own writers make (tests/fuzz/seeds.py). One command:
#   bash scripts/fuzz.sh                      every target, 10 minutes each
#   bash scripts/fuzz.sh 3600 cms stream      one hour each for cms and stream
#   FUZZ_JOBS=2 bash scripts/fuzz.sh 600      two fuzzing processes per target
# Corpora grow in .fuzz/corpus/TARGET (kept between runs: a second run starts where the
# first stopped); a crash, hang or memory blow-up is written to .fuzz/artifacts/ and the
# script exits non-zero naming the target. docs/security.md, "Fuzzing".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev >/dev/null
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(.venv/bin/python -m tests.fuzz.fuzz_targets --list)
fi
mkdir -p .fuzz/artifacts
parallel=()
if [ -n "${FUZZ_JOBS:-}" ]; then parallel=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS"); fi
failed=()
for target in "${targets[@]}"; do
  echo "== fuzzing $target for ${seconds}s"
  mkdir -p ".fuzz/corpus/$target"
  if ! .venv/bin/python -m tests.fuzz.fuzz_targets "$target" ".fuzz/corpus/$target" \
      -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
      "${parallel[@]}" -print_final_stats=1 \
      -artifact_prefix=".fuzz/artifacts/$target-"; then
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found problems in: ${failed[*]} (inputs in .fuzz/artifacts/)" >&2
  exit 1
fi
echo "no crash, hang or memory blow-up in: ${targets[*]}"
