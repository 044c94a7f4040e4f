#!/usr/bin/env bash
# Creates (once) the virtualenv the peer benchmark runs in, and prints its path.
#
#   bench/peer_bench/setup_venv.sh            # install if missing; prints the venv path
#   bench/peer_bench/setup_venv.sh --print    # only print where it is (or would be)
#
# Made from /usr/bin/python3, the Python the kvstrata binding is built
# against, so `import kvstrata` works in it with PYTHONPATH set to the build
# tree. It lives outside the source tree, keyed by a hash of the pins, so a
# second run (CI's or a developer's) downloads nothing and a changed pin
# builds a new one:
#   ${KVSTRATA_PEER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata/peer-venv-<hash>}
# A complete venv is marked by .kvstrata-complete; an interrupted install is
# thrown away and redone.
#
# Exit codes: 0 ready; 77 the package index cannot be reached or a peer's
# package does not install here (callers skip the peer benchmark); anything
# else is a real failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
requirements="$here/requirements.txt"
python=/usr/bin/python3
hash="$(sha256sum "$requirements" | cut -c1-16)"
venv="${KVSTRATA_PEER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata/peer-venv-$hash}"

if [ "${1:-}" = "--print" ]; then
  echo "$venv"
  exit 0
fi
if [ -f "$venv/.kvstrata-complete" ]; then
  echo "$venv"
  exit 0
fi

# Whether the index answers at all (through pip's own configuration) before
# spending time on an install that cannot succeed.
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
if ! timeout 120 "$python" -m pip download --no-deps --dest "$probe" six >/dev/null 2>&1; then
  echo "peer_bench setup: the Python package index cannot be reached; the peer benchmark is skipped" >&2
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

rm -rf "$venv"
echo "peer_bench setup: installing the pinned peers into $venv (about 100 MB, once)" >&2
"$python" -m venv "$venv"
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
     -r "$requirements" >&2; then
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
touch "$venv/.kvstrata-complete"
echo "$venv"
