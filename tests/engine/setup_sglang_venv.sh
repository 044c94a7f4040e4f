#!/usr/bin/env bash
# Creates, once, the virtualenv the SGLang backend tests run in, and prints its
# path on stdout.
#
# From /usr/bin/python3 (Debian's 3.11), because the kvstrata binding is built
# against it; without Debian's site-packages, whose old typing_extensions and
# torch break SGLang's imports. Cached outside the source tree, under
# ${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata/sglang-venv-<hash>, the hash of the
# requirements and this script, so a pin change builds a new one and the old
# ones are removed. A venv is used only once its last step wrote .complete,
# so an interrupted install is redone, not trusted.
#
# Exit status: 0 and the path; 77 when the package index cannot be reached
# (the tests then skip: no network is not a failure of kvstrata); else failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
requirements="$here/sglang-requirements.txt"
python=/usr/bin/python3
hash=$(cat "$requirements" "$0" | sha256sum | cut -c1-16)
root="${XDG_CACHE_HOME:-$HOME/.cache}/kvstrata"
venv="$root/sglang-venv-$hash"

if [ -f "$venv/.complete" ]; then
  echo "$venv"
  exit 0
fi

mkdir -p "$root"
# Two test runs at once would install into the same directory.
exec 9>"$root/sglang-venv.lock"
flock 9
if [ -f "$venv/.complete" ]; then
  echo "$venv"
  exit 0
fi

if ! timeout 60 "$python" -m pip download --no-deps --only-binary=:all: --quiet \
     --dest "$(mktemp -d)" "packaging==26.4" >&2; then
  echo "setup_sglang_venv: the Python package index is unreachable; SGLang tests skip" >&2
  exit 77
fi

for old in "$root"/sglang-venv-*; do
  [ -d "$old" ] && [ "$old" != "$venv" ] && rm -rf "$old"
done
rm -rf "$venv"
echo "setup_sglang_venv: installing SGLang into $venv (a few GiB: torch and its CUDA libraries)" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: -r "$requirements" >&2
# The import the tests need, checked before the venv is declared usable.
(cd / && "$venv/bin/python" -c "import sglang.srt.mem_cache.hicache_storage, sglang.srt.mem_cache.pool_host.mha" >&2)
touch "$venv/.complete"
echo "$venv"
