#!/usr/bin/env bash
# Runs a Python script in the engine virtualenv (tests/engine/setup_venv.sh),
# creating it first if needed. Exits 77 (ctest: skipped) when the venv cannot
# be made because the package index is unreachable.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$("$here/setup_venv.sh")"
rc=$?
if [ $rc -eq 77 ]; then
  echo "SKIP: no vLLM virtualenv (the package index cannot be reached)"
  exit 77
fi
[ $rc -eq 0 ] || { echo "setup_venv.sh failed (exit $rc)"; exit $rc; }
exec "$venv/bin/python" "$@"
