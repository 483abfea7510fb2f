#!/usr/bin/env bash
# Builds, on the development machine, the CUDA binaries that scripts/gpu-check.sh runs on a lent
# GPU machine, and trims the build folder to what must travel (binaries, shared library, CTest
# files), so the device's minutes go to the checks rather than to compiling:
#
#   bash scripts/gpu-prebuild.sh                       (makes build-gpucarry, ~14 MB)
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu-debs", "build-gpucarry"], timeout_s=600)
#
# The device machine checks out the repository at the same absolute path (/work/main), which the
# CTest files and the binaries' RUNPATH name. Its libraries come from .gpu-debs (the same Debian
# packages as here), libcudart from the device's CUDA 13 (gpu-check.sh adds its lib folders to
# LD_LIBRARY_PATH). Torch is left out: the torch glue is
# built on the device against its own torch (gpu-check.sh's torch stages).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${PREBUILT:-build-gpucarry}
generator=Ninja; command -v ninja >/dev/null 2>&1 || generator="Unix Makefiles"
[ -f "$dir/CMakeCache.txt" ] && generator=$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$dir/CMakeCache.txt")
cmake -S . -B "$dir" -G "$generator" -DCMAKE_BUILD_TYPE=Release -DMESHTRAIN_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" \
  -DMESHTRAIN_TORCH=OFF -DMESHTRAIN_TESTS=ON -DMESHTRAIN_BENCHMARKS=ON -DPython3_EXECUTABLE=/usr/bin/python3
cmake --build "$dir" -j"$(nproc)" --target compress_cuda_test cuda_runtime_test collective_cuda_test \
  meshtrain-bench-compress meshtrain-bench checkpoint_bench
# Object files and ninja's logs are not carried: deleted (a later run of this script rebuilds them).
find "$dir" -name '*.o' -delete
rm -f "$dir/.ninja_deps" "$dir/.ninja_log"
echo "gpu-prebuild: $(du -sh "$dir" | cut -f1) in $dir"
