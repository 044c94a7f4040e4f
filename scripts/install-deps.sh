#!/usr/bin/env bash
# Installs every Debian 12 package kvstrata needs to build, test and benchmark.
# Idempotent: packages already present are skipped, so a second run is instant.
set -euo pipefail

PACKAGES=(
  # toolchain
  build-essential cmake ninja-build pkg-config ccache git
  # control plane
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  # data plane and checksums
  libucx-dev ucx-utils libxxhash-dev
  # NVMe tier
  librocksdb-dev liburing-dev fio
  # operations
  prometheus-cpp-dev
  # tests and benchmarks (clang and its runtimes build the libFuzzer harnesses, tests/fuzz)
  clang-14 libclang-rt-14-dev
  libgtest-dev libgmock-dev libbenchmark-dev redis-server libhiredis-dev prometheus
  python3 python3-yaml python3-pip python3-venv openssl golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev
  # Python binding, sidecar and kernel evaluation
  pybind11-dev python3-dev python3-numpy python3-torch
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
