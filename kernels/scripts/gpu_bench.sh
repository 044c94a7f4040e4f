#!/bin/sh
# On a machine with an NVIDIA GPU and only CMake + CUDA: build kernels/ on its
# own for that GPU, run its tests (CPU/GPU byte identity included) and the
# benchmark at 64 and 256 MiB.
#
#   kernels/scripts/gpu_bench.sh [ARCH]     ARCH: CUDA architecture, default 90 (H100)
set -eu
arch=${1:-90}
here=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$here/../build-kernels-sm$arch}
gen=""
command -v ninja >/dev/null 2>&1 && gen="-G Ninja"
cmake -S "$here" -B "$build" $gen -DCMAKE_BUILD_TYPE=Release -DKVSTRATA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch"
cmake --build "$build" -j "$(nproc)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
ctest --test-dir "$build" --output-on-failure
"$build/quant_bench" --mib 64 --reps 7
"$build/quant_bench" --mib 256 --reps 5
"$build/quant_bench" --mib 64 --reps 7 --dtype bf16
