# Shared steps of the scripts that make a pinned virtualenv once and reuse it
# (tests/engine/setup_venv.sh, bench/peer_bench/setup_venv.sh). Sourced, not run.
#
# A venv is made from /usr/bin/python3, the Python the kvstrata binding is
# built against, so `import kvstrata` works in it with PYTHONPATH set to the
# build tree. It lives outside the source tree, keyed by a hash of its
# requirements, so CI and developers reuse it and a changed pin builds a new
# one. Installed in place (a venv's scripts name their own path, so it cannot
# be built elsewhere and moved); .kvstrata-complete, written last, marks a
# complete one, and an interrupted install is thrown away and redone.

pinned_venv_python=/usr/bin/python3

# pinned_venv_path OVERRIDE PREFIX REQUIREMENTS: $OVERRIDE if set, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata/PREFIX<hash of REQUIREMENTS>.
pinned_venv_path() {
  local override="$1" prefix="$2" requirements="$3"
  local hash
  hash="$(sha256sum "$requirements" | cut -c1-16)"
  echo "${override:-${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata/$prefix$hash}"
}

# pinned_venv_ready VENV: prints VENV and succeeds if it is complete.
pinned_venv_ready() {
  if [ -f "$1/.kvstrata-complete" ]; then
    echo "$1"
    return 0
  fi
  return 1
}

# pinned_venv_index_reachable [PACKAGE]: whether the package index answers at
# all, through pip's own configuration (index URL, proxy, certificates),
# before time goes into an install that cannot succeed.
pinned_venv_index_reachable() {
  local probe
  probe="$(mktemp -d)"
  if timeout 120 "$pinned_venv_python" -m pip download --no-deps --dest "$probe" "${1:-six}" \
       >/dev/null 2>&1; then
    rm -rf "$probe"
    return 0
  fi
  rm -rf "$probe"
  return 1
}

# pinned_venv_lock VENV: serialises concurrent setups (two ctest runs, two
# worktrees) on one lock held until the calling script exits; succeeds (and
# prints VENV) if another setup completed it meanwhile.
pinned_venv_lock() {
  mkdir -p "$(dirname "$1")"
  exec 9>"$1.lock"
  flock 9
  pinned_venv_ready "$1"
}

# pinned_venv_create VENV REQUIREMENTS [--upgrade-pip]: a fresh venv with the
# pins installed (no dependencies resolved: the requirements pin every
# package). --upgrade-pip first, for wheels newer than Debian's pip knows.
pinned_venv_create() {
  rm -rf "$1"
  "$pinned_venv_python" -m venv "$1"
  if [ "${3:-}" = "--upgrade-pip" ]; then
    "$1/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  fi
  "$1/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$2" >&2
}

# pinned_venv_complete VENV: marks it complete and prints it.
pinned_venv_complete() {
  touch "$1/.kvstrata-complete"
  echo "$1"
}
