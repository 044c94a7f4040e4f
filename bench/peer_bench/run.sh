#!/usr/bin/env bash
# Runs a script of the peer benchmark in its virtualenv (default: peer_bench.py).
#
#   PYTHONPATH=build/client/python bench/peer_bench/run.sh --node_binary=build/cachenode/kvstrata-node [--quick]
#   PYTHONPATH=build/client/python bench/peer_bench/run.sh checks_test.py --node_binary=...
#
# Installs nothing (setup_venv.sh does, and scripts/test.sh runs it before
# ctest): without the virtualenv it says so and exits 77, which ctest reports
# as skipped.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$("$here/setup_venv.sh" --print)"
if [ ! -f "$venv/.kvstrata-complete" ]; then
  echo "peer_bench: skipped: no peer virtualenv at $venv (bench/peer_bench/setup_venv.sh makes it;" \
       "it needs the Python package index)" >&2
  exit 77
fi
script="$here/peer_bench.py"
if [ $# -gt 0 ] && [[ "$1" == *.py ]]; then
  script="$here/$1"
  shift
fi
exec "$venv/bin/python" "$script" "$@"
