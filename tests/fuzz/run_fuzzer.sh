#!/usr/bin/env bash
# Runs one libFuzzer harness for SECONDS over its checked-in seed corpus plus
# a scratch corpus (new inputs go there, never into the source tree), after
# replaying every input under regressions/<harness>/ (bugs found and fixed).
#   run_fuzzer.sh BINARY SEED_DIR WORK_DIR SECONDS [libFuzzer flags...]
# Exits nonzero when the harness finds a crash, a leak, a timeout or a broken
# invariant; the reproducer is written to WORK_DIR/<harness>-artifacts/.
set -euo pipefail
binary=$1 seeds=$2 work=$3 seconds=$4
shift 4
name=$(basename "$seeds")
regressions=$(dirname "$(dirname "$seeds")")/regressions/$name
mkdir -p "$work/$name" "$work/$name-artifacts"
if [ -d "$regressions" ] && [ -n "$(ls -A "$regressions")" ]; then
  "$binary" -runs=0 "$regressions"/*
fi
exec "$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=8192 \
  -print_final_stats=1 -artifact_prefix="$work/$name-artifacts/" "$@" "$work/$name" "$seeds"
