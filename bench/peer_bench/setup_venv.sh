#!/usr/bin/env bash
# Creates (once) the virtualenv the peer benchmark runs in, and prints its path.
#
#   bench/peer_bench/setup_venv.sh            # install if missing; prints the venv path
#   bench/peer_bench/setup_venv.sh --print    # only print where it is (or would be)
#
# Where it lives and how it is reused: scripts/lib/pinned_venv.sh;
#   ${KVSTRATA_PEER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata/peer-venv-<hash>}
#
# Exit codes: 0 ready; 77 the package index cannot be reached or a peer's
# package does not install here (callers skip the peer benchmark); anything
# else is a real failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../scripts/lib/pinned_venv.sh"
requirements="$here/requirements.txt"
venv="$(pinned_venv_path "${KVSTRATA_PEER_VENV:-}" peer-venv- "$requirements")"

if [ "${1:-}" = "--print" ]; then
  echo "$venv"
  exit 0
fi
pinned_venv_ready "$venv" && exit 0
if ! pinned_venv_index_reachable; then
  echo "peer_bench setup: the Python package index cannot be reached; the peer benchmark is skipped" >&2
  exit 77
fi
pinned_venv_lock "$venv" && exit 0

echo "peer_bench setup: installing the pinned peers into $venv (about 100 MB, once)" >&2
if ! pinned_venv_create "$venv" "$requirements"; then
  echo "peer_bench setup: the pinned peer packages did not install; the peer benchmark is skipped" >&2
  rm -rf "$venv"
  exit 77
fi
# The smallest proof that the install works: the Store client imports and the
# master runs here.
if ! "$venv/bin/python" -c "import mooncake.store, redis, hiredis" >&2 ||
   ! "$venv/bin/mooncake_master" --version >/dev/null 2>&1; then
  echo "peer_bench setup: Mooncake Store does not run on this machine; the peer benchmark is skipped" >&2
  rm -rf "$venv"
  exit 77
fi
pinned_venv_complete "$venv"
