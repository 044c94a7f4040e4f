#!/usr/bin/env bash
# Builds kvstrata and runs the whole test suite on a fresh Debian 12 machine:
# installs the Debian packages it needs, configures, builds, runs ctest.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cmake --preset default
cmake --build --preset default
ctest --preset default "$@"
