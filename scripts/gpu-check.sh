#!/usr/bin/env bash
# The GPU checks of compression (issue 4) and the torch CUDA checkpoint test, as one script for
# a session that is lent a GPU machine (docs/compression.md, "Checking on a GPU"):
#
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu-debs"], timeout_s=600)
#
# Stages, each under `timeout` and all under one deadline (9.5 minutes), each going on to the next
# when one fails: the environment (nvidia-smi, torch), the Debian deps of .gpu-debs, configure
# build-gpu (CUDA ON for sm_90, torch from python3's torch.utils.cmake_prefix_path; again with
# torch OFF if that configure fails), build what the checks need, `ctest -L cuda`, the GPU
# compression benchmarks (kernels against a device-to-device copy on 256 MiB; top-k of 1% of
# 64M elements against torch.topk), their summary against the targets, the torch glue and its
# CUDA checkpoint test, and last the loopback all-reduce against gloo on the host's 16 cores
# (issue 3). Everything lands in $OUT (8 files: the device tool returns at most 8): env.txt,
# stages.tsv (stage, exit code, seconds), build.log, ctest-cuda.log, bench-gpu.jsonl,
# torch-topk.jsonl, summary.txt, torch-cuda.log.
#
# Without a GPU (no working nvidia-smi), or with --dry-run, it runs the same stages with longer
# time limits and no deadline, so that configure, the CUDA build and `ctest -L cuda` (which
# then skips with the CUDA runtime's reason) are checked on a development machine:
#   BUILD_DIR=build-cuda bash scripts/gpu-check.sh --dry-run      (OUT defaults to BUILD_DIR/check-out)
set -u -o pipefail
cd "$(dirname "$0")/.."
root=$PWD

dry=0
quick=0  # --quick: the CUDA tests, kernel benchmarks and sanitizers only (no torch, no all-reduce), within 4 minutes
for arg in "$@"; do
  case $arg in
    --dry-run) dry=1 ;;
    --quick) quick=1 ;;
    *) echo "usage: bash scripts/gpu-check.sh [--dry-run] [--quick]   (env: BUILD_DIR, default build-gpu; OUT)" >&2; exit 2 ;;
  esac
done
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  [ $dry = 1 ] || echo "gpu-check: no working nvidia-smi: dry run (no GPU here)"
  dry=1
fi
build=${BUILD_DIR:-build-gpu}
out=${OUT:-$root/$build/check-out}
mkdir -p "$out"
for f in env.txt stages.tsv build.log ctest-cuda.log bench-gpu.jsonl torch-topk.jsonl summary.txt torch-cuda.log; do
  : > "$out/$f"  # this run's files only (a dry run's OUT is kept between runs)
done
jobs=$(nproc 2>/dev/null || echo 4)

start=$(date +%s)
if [ $dry = 1 ]; then deadline=$((start + 4 * 3600)); scale=12; else deadline=$((start + (quick ? 200 : 570))); scale=1; fi
printf 'stage\trc\tseconds\tnote\n' > "$out/stages.tsv"

# stage NAME MAX_SECONDS LOG COMMAND...: runs COMMAND under timeout (MAX_SECONDS x scale, at most
# what is left before the deadline), appending to LOG; records the exit code and duration.
# 124 = timed out; "skipped" = no time left.
stage() {
  local name=$1 max=$(($2 * scale)) log=$3; shift 3
  local now left rc t0
  now=$(date +%s); left=$((deadline - now))
  [ $left -lt $max ] && max=$left
  if [ $max -lt 10 ]; then
    printf '%s\tskipped\t0\tno time left before the deadline\n' "$name" >> "$out/stages.tsv"
    echo "== $name: skipped (deadline)"; return 1
  fi
  echo "== $name (limit ${max}s) $(date -u +%H:%M:%S)"
  case $log in *.log) echo "== $name (limit ${max}s) $(date -u +%H:%M:%S)" >> "$log" ;; esac  # not into data files
  t0=$(date +%s)
  timeout --kill-after=10 "$max" "$@" >> "$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$([ $rc = 124 ] && echo "timed out after ${max}s")" >> "$out/stages.tsv"
  echo "   $name: rc $rc, $(($(date +%s) - t0)) s"
  return $rc
}

# 1. The machine.
{
  echo "date: $(date -u +%FT%TZ)  dry run: $dry  build dir: $build  jobs: $jobs"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no .git)')"
  uname -a
  nvidia-smi 2>&1 || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm --format=csv 2>&1 || true
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2 || /usr/local/cuda/bin/nvcc --version 2>&1 | tail -2
  cmake --version | head -1; (ninja --version 2>/dev/null | sed 's/^/ninja /') || true
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "prefix", torch.utils.cmake_prefix_path)' 2>&1 || true
} > "$out/env.txt" 2>&1

# 2. Debian deps for the build (no package registry on the GPU host). Sourced: it exports paths.
t0=$(date +%s)
if [ -f .gpu-debs/use-debs.sh ]; then
  echo "== deps $(date -u +%H:%M:%S)" >> "$out/build.log"
  # shellcheck disable=SC1091
  source .gpu-debs/use-debs.sh .gpu-debs /tmp/deps >> "$out/build.log" 2>&1; rc=$?
else
  echo "== deps: no .gpu-debs folder (bash ../shared/gpu/fetch-debs.sh .gpu-debs, then carry it)" >> "$out/build.log"; rc=1
fi
printf 'deps\t%s\t%s\t%s\n' "$rc" "$(($(date +%s) - t0))" "source .gpu-debs/use-debs.sh .gpu-debs /tmp/deps" >> "$out/stages.tsv"
echo "   deps: rc $rc"

# 3. Configure: CUDA for the H100 (sm_90), torch from python3's torch if it has one.
nvcc_path=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
generator=Ninja; command -v ninja >/dev/null 2>&1 || generator="Unix Makefiles"
# A generator other than the one a reused build dir was made with is an error: keep its own.
if [ -f "$build/CMakeCache.txt" ]; then
  generator=$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$build/CMakeCache.txt")
fi
configure=(cmake -S . -B "$build" -G "$generator" -DCMAKE_BUILD_TYPE=RelWithDebInfo
  -DMESHTRAIN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$nvcc_path"
  -DCMAKE_PREFIX_PATH="${torch_prefix:+$torch_prefix;}${CMAKE_PREFIX_PATH:-}"
  -DPython3_EXECUTABLE="$(command -v python3)" -DMESHTRAIN_TESTS=ON -DMESHTRAIN_BENCHMARKS=ON)
# A CUDA build made on the development machine and carried along (scripts/gpu-prebuild.sh), so
# that the device's minutes go to the checks: used when it is there and its binaries load.
# The CUDA runtime of the toolkit that compiled the carried build (the same CUDA 13.0 as nvcc's here).
cuda_home=$(dirname "$(dirname "$nvcc_path")")
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$cuda_home/lib64:$cuda_home/lib"
prebuilt=${PREBUILT:-build-gpucarry}
cuda_build=$build
if [ -f "$prebuilt/CTestTestfile.cmake" ] && [ -x "$prebuilt/tests/compress/compress_cuda_test" ]; then
  prebuilt_loads() {  # every carried binary finds its libraries here (ldd), or the device builds
    local f missing=0
    for f in "$prebuilt"/tests/*/*_test "$prebuilt"/tests/*/*_peer "$prebuilt"/benchmarks/*/meshtrain-bench*; do
      [ -x "$f" ] || continue
      echo "$f"; ldd "$f" | grep -E 'not found|meshtrain|capnp|zmq|cudart'
      ldd "$f" | grep -q 'not found' && missing=1
    done
    return $missing
  }
  export prebuilt; export -f prebuilt_loads
  stage prebuilt_loads 20 "$out/build.log" bash -c prebuilt_loads && cuda_build=$prebuilt
fi

configure_here() {
torch=OFF
if [ -n "$torch_prefix" ]; then
  torch=ON
  stage configure 150 "$out/build.log" "${configure[@]}" -DMESHTRAIN_TORCH=ON || {
    torch=OFF
    stage configure_without_torch 120 "$out/build.log" "${configure[@]}" -DMESHTRAIN_TORCH=OFF
  }
else
  echo "== python3 has no torch: configuring without it" >> "$out/build.log"
  stage configure 150 "$out/build.log" "${configure[@]}" -DMESHTRAIN_TORCH=OFF
fi
}

# 4. Build what the GPU checks need, unless carried: the cuda-labelled tests (codec kernels
# against the CPU; collectives with members on CUDA buffers) and the benchmarks (torch later).
configured=0
if [ "$cuda_build" = "$build" ]; then
  configure_here; configured=1
  stage build 300 "$out/build.log" cmake --build "$build" -j"$jobs" \
    --target compress_cuda_test cuda_runtime_test collective_cuda_test meshtrain-bench-compress meshtrain-bench
fi

# 5. The CUDA tests (on a host without a GPU they skip with the runtime's reason).
stage ctest_cuda 150 "$out/ctest-cuda.log" \
  ctest --test-dir "$cuda_build" -L cuda --output-on-failure --timeout 120 -j8

# 6. Benchmarks: kernels alone against a device-to-device copy of the same 256 MiB, whole codec
# calls, and top-k of 1% of 64M elements (error feedback off: the selection alone).
stage bench_gpu 150 "$out/bench-gpu.jsonl" "$cuda_build/benchmarks/compress/meshtrain-bench-compress" \
  --device cuda --bytes 268435456 --repeats 9 --codec fp16 --codec bf16 --codec int8 \
  --codec int8:error_feedback=off --codec topk:fraction=0.01 --codec topk:fraction=0.01,error_feedback=off \
  --codec topk:fraction=0.01,selection=sampled --codec topk:fraction=0.01,error_feedback=off,selection=sampled \
  --codec powersgd:rank=4
stage torch_topk 90 "$out/torch-topk.jsonl" python3 benchmarks/compress/torch_topk.py \
  --count 67108864 --fraction 0.01 --repeats 9
stage summary 20 "$out/summary.txt" python3 benchmarks/compress/gpu_summary.py \
  "$out/bench-gpu.jsonl" "$out/torch-topk.jsonl"

# 7. The torch glue and its CUDA checkpoint test (snapshot to pinned memory, restore on GPU).
[ $quick = 1 ] || [ $configured = 1 ] || configure_here
if [ $quick = 1 ]; then
  printf 'torch_cuda\tskipped\t0\t--quick\n' >> "$out/stages.tsv"
elif [ $torch = ON ]; then
  stage build_torch 240 "$out/build.log" cmake --build "$build" -j"$jobs" --target torch_test
  stage torch_cuda 120 "$out/torch-cuda.log" "$build/tests/torch/torch_test" --gtest_filter='TorchCuda.*'
else
  echo "torch glue not configured (python3 has no torch, or configuring with it failed: build.log)" > "$out/torch-cuda.log"
  printf 'torch_cuda\tskipped\t0\tno torch\n' >> "$out/stages.tsv"
fi

# 8. Last: the loopback all-reduce against torch's gloo (issue 3's 1.2x target; not a GPU check)
# on more cores than workers, which the 2-core development VM cannot offer, then the compressed
# all-reduce of CUDA buffers. Progress goes to build.log; the JSON records (gloo's, meshtrain's)
# are appended to bench-gpu.jsonl.
[ $quick = 1 ] && allreduce_peers="" || allreduce_peers="4 8"
for peers in $allreduce_peers; do
  stage "allreduce_${peers}" 60 "$out/build.log" "$cuda_build/benchmarks/allreduce/meshtrain-bench" allreduce \
    --peers $peers --size 64MiB --repeats 5 --baseline gloo --python "$(command -v python3)"
done
# The compressed all-reduce with the gradients on the GPU (the codecs' kernels encode and
# decode; 4 workers share the one device) against the same command with CPU buffers, and the
# host copies in pageable instead of pinned memory (--pageable-staging; the plain all-reduce
# of CUDA buffers too, which stages the whole buffer through the host).
[ $quick = 1 ] && compressed_codecs="" || compressed_codecs="plain int8 fp16"
for codec in $compressed_codecs; do
  for device in cuda cuda-pageable cpu; do
    flags="--device ${device%-pageable}"
    [ "$device" = cuda-pageable ] && flags="$flags --pageable-staging"
    [ "$codec" = plain ] || flags="$flags --codec $codec"
    name="compressed_${codec}_${device}"
    [ "$codec" = plain ] && name="plain_${device}"
    stage "$name" 60 "$out/build.log" "$cuda_build/benchmarks/allreduce/meshtrain-bench" allreduce \
      --peers 4 --size 64MiB --repeats 5 $flags
  done
done

# The checkpoint benchmark on this host's disk (issue 5: save and load against a dd-style
# sequential write and a cold read of the same 1 GiB, as root so it can drop the page cache).
if [ -x "$cuda_build/benchmarks/checkpoint/checkpoint_bench" ]; then
  stage checkpoint_bench 90 "$out/build.log" env MESHTRAIN_LOG=warn \
    "$cuda_build/benchmarks/checkpoint/checkpoint_bench" --repeats 3
else
  printf 'checkpoint_bench\tskipped\t0\tnot built\n' >> "$out/stages.tsv"
fi
grep -E '^\{"(impl|bench)"' "$out/build.log" >> "$out/bench-gpu.jsonl"

# 9. With what time is left: compute-sanitizer over the codec kernels' test (memcheck: out-of-bounds
# and misaligned accesses, leaks; racecheck: shared-memory hazards of the int8 and top-k kernels).
# Its report goes to ctest-cuda.log.
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ $dry = 0 ] && [ -x "$sanitizer" ]; then
  stage memcheck 150 "$out/ctest-cuda.log" "$sanitizer" --tool memcheck --leak-check full --error-exitcode 3 \
    "$cuda_build/tests/compress/compress_cuda_test"
  stage racecheck 120 "$out/ctest-cuda.log" "$sanitizer" --tool racecheck --error-exitcode 3 \
    "$cuda_build/tests/compress/compress_cuda_test" --gtest_filter='*int8*:*Int8*:*topk*:*TopK*'
else
  printf 'sanitizer\tskipped\t0\t%s\n' "$([ $dry = 1 ] && echo 'dry run' || echo "no $sanitizer")" >> "$out/stages.tsv"
fi

echo
echo "== stages (total $(($(date +%s) - start)) s; dry run: $dry)"
column -t -s $'\t' "$out/stages.tsv" 2>/dev/null || cat "$out/stages.tsv"
echo "== ctest -L cuda ($(grep -c '(Skipped)' "$out/ctest-cuda.log" 2>/dev/null || echo 0) skipped)"
grep -E "tests passed|\((Failed|Timeout|SEGFAULT|Subprocess aborted)\)|Not Run" "$out/ctest-cuda.log" | head -12
grep -m1 -E "Skipped|skipped" "$out/ctest-cuda.log" | head -1
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY" "$out/ctest-cuda.log" | head -6
grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$out/torch-cuda.log" 2>/dev/null | head -5
echo "== summary"
cat "$out/summary.txt" 2>/dev/null
echo "(files in $out)"
