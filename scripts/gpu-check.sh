#!/usr/bin/env bash
# The GPU check (issue 19, item 6): on a bare GPU machine (CMake, nvcc, a
# driver; none of the project's Debian libraries) it builds what can be built
# there and runs every CUDA test, then prints one summary.
#
#   scripts/gpu-check.sh                 # on the GPU machine
#   scripts/gpu-check.sh --bundle DIR    # on a machine with the full build:
#                                        # pack the CUDA test binaries that need
#                                        # Debian's libraries for the GPU machine
#
# What runs on the GPU machine (about a minute of builds and tests):
#   1. the standalone kernels/ build (CMake + nvcc only) and its tests:
#      quant_bench (GPU bytes against the CPU's for every format), and the
#      GoogleTest suites when GoogleTest is found there;
#   2. device memory and staging on CUDA (tests/device_memory_test.cc) and
#      the HBM tier through the real kvstrata-node (tests/integration/hbm_test.cc), from
#      the bundle when one was carried along (build-gpu-bundle/, see
#      --bundle): those binaries need abseil, which a bare machine lacks, so
#      they are built on the development machine and run here with the
#      libraries (and the dynamic loader) they were linked against, plus the
#      machine's own CUDA driver.
# Environment: KVSTRATA_CUDA_ARCH (default 90: H100/H200), KVSTRATA_GPU_BUNDLE
# (default build-gpu-bundle).
set -uo pipefail
cd "$(dirname "$0")/.."

bundle_dir="${KVSTRATA_GPU_BUNDLE:-build-gpu-bundle}"

if [[ "${1:-}" == "--bundle" ]]; then
  out="${2:-$bundle_dir}"
  binaries=(build/tests/device_memory_tests build/tests/hbm_tests build/cachenode/kvstrata-node)
  for binary in "${binaries[@]}"; do
    [[ -x "$binary" ]] || { echo "gpu-check: build $binary first (cmake --build --preset default --target device_memory_tests hbm_tests kvstrata-node)"; exit 1; }
  done
  rm -rf "$out" && mkdir -p "$out/lib" "$out/glibc"
  for binary in "${binaries[@]}"; do
    strip -o "$out/$(basename "$binary")" "$binary"
    # Every shared library it loads except the CUDA driver (the GPU
    # machine's own must be used); glibc apart, for machines whose own is older.
    ldd "$binary" | awk '/=> \// {print $3} /^[ \t]*\// {print $1}' | sort -u | while read -r lib; do
      case "$(basename "$lib")" in
        libcuda.so*|libnvidia*) ;;
        libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*) cp -L "$lib" "$out/glibc/" ;;
        *) cp -L "$lib" "$out/lib/" ;;
      esac
    done
  done
  # UCX loads its transports as modules.
  ucx_modules=$(dirname "$(ldd build/cachenode/kvstrata-node | awk '/libucp.so/ {print $3}')")/ucx
  [[ -d "$ucx_modules" ]] && cp -rL "$ucx_modules" "$out/lib/ucx"
  ldd --version | head -1 | awk '{print $NF}' > "$out/glibc/version"
  du -sh "$out"
  exit 0
fi

arch="${KVSTRATA_CUDA_ARCH:-90}"
jobs=$(nproc)
summary=()
failed=0
step() {  # step NAME COMMAND...: runs it, logs to build-gpu/NAME.log, records the result
  local name="$1"; shift
  local start=$SECONDS
  if "$@" >"build-gpu/$name.log" 2>&1; then
    summary+=("PASS  $name ($((SECONDS - start)) s)")
  else
    summary+=("FAIL  $name ($((SECONDS - start)) s): see build-gpu/$name.log")
    tail -20 "build-gpu/$name.log"
    failed=1
  fi
}
mkdir -p build-gpu

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "gpu-check: ${gpu:-no GPU visible (nvidia-smi)}; nvcc $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

step kernels_configure cmake -S kernels -B build-gpu/kernels -DKVSTRATA_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DKVSTRATA_KERNELS_CUDA_ARCHITECTURES="$arch"
step kernels_build cmake --build build-gpu/kernels -j "$jobs"
step kernels_tests ctest --test-dir build-gpu/kernels --output-on-failure --timeout 300
if [[ -x build-gpu/kernels/quant_bench ]]; then
  step kernels_bench build-gpu/kernels/quant_bench
  summary+=("      kernels_bench: $(grep -m1 -E '^GPU' build-gpu/kernels_bench.log || echo 'no GPU line')")
fi

if [[ -x "$bundle_dir/device_memory_tests" ]]; then
  driver_dirs=$(ldconfig -p 2>/dev/null | awk '/libcuda.so.1/ {print $NF}' | xargs -r -n1 dirname | sort -u | paste -sd:)
  driver_dirs="${driver_dirs:-/usr/lib/x86_64-linux-gnu}"
  built_with=$(cat "$bundle_dir/glibc/version")
  here=$(ldd --version | head -1 | awk '{print $NF}')
  if [[ "$(printf '%s\n%s\n' "$built_with" "$here" | sort -V | head -1)" == "$built_with" ]]; then
    # This glibc is as new as the build's: the machine's loader will do.
    step device_memory_cuda env LD_LIBRARY_PATH="$bundle_dir/lib:$driver_dirs" \
      "$bundle_dir/device_memory_tests" --gtest_filter='*cuda*'
    # The HBM tier on the GPU through the real kvstrata-node, over TCP and
    # shared memory (the same tests CI runs on the double).
    for tls in tcp sm; do
      step "hbm_tier_$tls" env LD_LIBRARY_PATH="$bundle_dir/lib:$driver_dirs" \
        UCX_MODULE_DIR="$bundle_dir/lib/ucx" UCX_TLS="$tls" \
        KVSTRATA_HBM_NODE="$(realpath "$bundle_dir/kvstrata-node")" "$bundle_dir/hbm_tests"
    done
  else
    # An older glibc: the build's own loader and glibc. The IPC test re-runs
    # /proc/self/exe (the loader, then), so it is left out.
    step device_memory_cuda "$bundle_dir/glibc/$(ls "$bundle_dir/glibc" | grep ld-linux)" \
      --library-path "$bundle_dir/glibc:$bundle_dir/lib:$driver_dirs" \
      "$bundle_dir/device_memory_tests" --gtest_filter='*cuda*:-*AnotherProcess*'
    summary+=("NOTE  glibc $here < $built_with: ran with the build's loader, without the IPC test")
  fi
  if grep -q "SKIPPED \]" "build-gpu/device_memory_cuda.log"; then
    summary+=("WARN  device_memory_cuda tests skipped: $(grep -m1 -A1 ': Skipped' build-gpu/device_memory_cuda.log | tail -1)")
  fi
else
  summary+=("SKIP  device_memory_cuda: no $bundle_dir (make it with scripts/gpu-check.sh --bundle on the build machine)")
fi

[[ -n "$gpu" ]] || summary+=("WARN  no GPU visible: every CUDA test above skipped; this run checked builds only")
echo "==== gpu-check summary (${SECONDS} s) ===="
printf '%s\n' "${summary[@]}"
exit $failed
