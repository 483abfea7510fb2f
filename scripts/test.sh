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
