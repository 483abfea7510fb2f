#!/usr/bin/env bash
# Builds meshtrain (configuring first if needed) and runs every test.
#
#   bash scripts/test.sh
#
# Environment:
#   BUILD_DIR   build directory (default: build)
#   CTEST_ARGS  extra ctest arguments, e.g. "-L core" or "-R Crypto -V"
#   CMAKE_ARGS  extra configure arguments, used when the build directory is configured here
#   JOBS        parallel build jobs (default: nproc)
#   SIM_DEVICE  1: also run the CUDA tests on a simulated device (preset sim-device, in
#               $BUILD_DIR-simdev: the CUDA paths' host side and kernels on the CPU); 0: not;
#               default: when no GPU is visible (nvidia-smi) and CTEST_ARGS is empty
# Exits non-zero when the build or any test fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD_DIR="${BUILD_DIR:-build}"
JOBS="${JOBS:-$(nproc)}"

say() { printf '==> %s\n' "$*"; }

if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  # shellcheck disable=SC2206
  EXTRA_ARGS=(${CMAKE_ARGS:-})
  say "configure: cmake --preset default -B $BUILD_DIR ${EXTRA_ARGS[*]}"
  cmake --preset default -B "$BUILD_DIR" "${EXTRA_ARGS[@]}"
fi
say "build: cmake --build $BUILD_DIR -j$JOBS"
cmake --build "$BUILD_DIR" -j"$JOBS"

# shellcheck disable=SC2206
CTEST_EXTRA=(${CTEST_ARGS:-})
say "test: ctest --test-dir $BUILD_DIR --output-on-failure -j2 ${CTEST_EXTRA[*]}"
status=0
ctest --test-dir "$BUILD_DIR" --output-on-failure -j2 "${CTEST_EXTRA[@]}" || status=$?

# Without a GPU the CUDA tests above skip; a second build runs them on a simulated device.
SIM_DEVICE="${SIM_DEVICE:-auto}"
if [[ $SIM_DEVICE == auto ]]; then
  SIM_DEVICE=1
  if [[ -n ${CTEST_ARGS:-} ]] || { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }; then
    SIM_DEVICE=0
  fi
fi
if [[ $SIM_DEVICE == 1 ]]; then
  SIM_BUILD_DIR="$BUILD_DIR-simdev"
  if [[ ! -f "$SIM_BUILD_DIR/CMakeCache.txt" ]]; then
    say "configure: cmake --preset sim-device -B $SIM_BUILD_DIR"
    cmake --preset sim-device -B "$SIM_BUILD_DIR"
  fi
  say "build (simulated device): cmake --build $SIM_BUILD_DIR -j$JOBS --target cuda_runtime_test compress_cuda_test collective_cuda_test"
  cmake --build "$SIM_BUILD_DIR" -j"$JOBS" --target cuda_runtime_test compress_cuda_test collective_cuda_test
  say "test (simulated device): ctest --test-dir $SIM_BUILD_DIR -L cuda --output-on-failure -j2"
  ctest --test-dir "$SIM_BUILD_DIR" -L cuda --output-on-failure -j2 || status=$?
else
  say "simulated device: skipped (SIM_DEVICE=0, a GPU is visible, or CTEST_ARGS selects tests)"
fi

# Python tests, once the bindings exist: run only when bindings/tests holds pytest files.
if compgen -G "bindings/tests/test_*.py" >/dev/null; then
  say "pytest: python3 -m pytest -q bindings/tests"
  PYTHONPATH="$PWD/$BUILD_DIR/bindings${PYTHONPATH:+:$PYTHONPATH}" \
    python3 -m pytest -q bindings/tests || status=$?
else
  say "pytest: skipped (no bindings/tests/test_*.py yet)"
fi

if [[ $status -ne 0 ]]; then
  say "FAILED (exit $status)"
else
  say "all tests passed"
fi
exit $status
