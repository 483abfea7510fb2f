#!/usr/bin/env bash
# Installs what meshtrain needs on Debian 12, builds it and runs the main job (the local demo).
#
#   bash scripts/setup.sh
#
# Environment:
#   BUILD_DIR           build directory (default: build, the `default` preset's)
#   MESHTRAIN_SKIP_APT  1: do not touch apt (packages are already there, or not root)
#   CMAKE_ARGS          extra arguments for the configure step, e.g. "-DMESHTRAIN_CUDA=OFF"
#   JOBS                parallel build jobs (default: nproc)
#   MESHTRAIN_SKIP_DEMO 1: build only, do not run the demo job afterwards
#
# CUDA is optional and not installed here: with nvcc on PATH (or CUDACXX set) the CUDA kernels
# are built (MESHTRAIN_CUDA=AUTO); MESHTRAIN_CUDA=OFF in CMAKE_ARGS disables them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD_DIR="${BUILD_DIR:-build}"
JOBS="${JOBS:-$(nproc)}"

say() { printf '==> %s\n' "$*"; }

PACKAGES=(
  build-essential cmake pkg-config git
  libssl-dev                        # OpenSSL 3: Ed25519, X25519, SHA-256, AEAD
  libzmq3-dev cppzmq-dev            # ZeroMQ control path
  capnproto libcapnp-dev            # Cap'n Proto schemas and runtime
  libfmt-dev
  libgtest-dev libgmock-dev         # unit tests
  libbenchmark-dev                  # Google Benchmark binaries
  libsqlite3-dev                    # market ledger
  libtorch-dev                      # libtorch 1.13 (CPU): the optional torch glue, meshtrain_torch
  iproute2                          # network namespaces, veth and tc for link tests
  python3 python3-pytest
)

if [[ "${MESHTRAIN_SKIP_APT:-0}" == "1" ]]; then
  say "MESHTRAIN_SKIP_APT=1: not installing packages"
else
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: apt-get not found; meshtrain supports Debian 12. Install these packages" \
         "yourself and rerun with MESHTRAIN_SKIP_APT=1: ${PACKAGES[*]}" >&2
    exit 1
  fi
  missing=()
  for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    say "all ${#PACKAGES[@]} Debian packages are already installed"
  else
    SUDO=()
    if [[ "$(id -u)" -ne 0 ]]; then
      if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
      else
        echo "setup.sh: installing packages needs root, and sudo is not available." \
             "Run as root, or install these packages and rerun with MESHTRAIN_SKIP_APT=1:" \
             "${missing[*]}" >&2
        exit 1
      fi
    fi
    say "installing ${#missing[@]} package(s): ${missing[*]}"
    say "apt-get update"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    say "apt-get install -y --no-install-recommends ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y --no-install-recommends "${missing[@]}"
  fi
fi

for tool in cmake c++ pkg-config; do
  command -v "$tool" >/dev/null 2>&1 || { echo "setup.sh: '$tool' not found on PATH" >&2; exit 1; }
done

# shellcheck disable=SC2206  # CMAKE_ARGS is split on whitespace on purpose
EXTRA_ARGS=(${CMAKE_ARGS:-})
say "configure: cmake --preset default -B $BUILD_DIR ${EXTRA_ARGS[*]}"
cmake --preset default -B "$BUILD_DIR" "${EXTRA_ARGS[@]}"
say "build: cmake --build $BUILD_DIR -j$JOBS"
cmake --build "$BUILD_DIR" -j"$JOBS"
say "built meshtrain in $BUILD_DIR"

# The main job: a local demo on the embedded defaults: a devnet market and provider daemons on
# loopback, 4 rented workers paid per step, one provider's host killed mid-step and replaced by
# a standby that joins the job (`meshtrain demo` without --market: the same job without the
# market). MESHTRAIN_SKIP_DEMO=1 only builds (CI runs both demos as tests too).
if [[ "${MESHTRAIN_SKIP_DEMO:-0}" == "1" ]]; then
  say "MESHTRAIN_SKIP_DEMO=1: not running the demo"
else
  say "demo: $BUILD_DIR/tools/meshtrain demo --market"
  "$BUILD_DIR/tools/meshtrain" demo --market
fi
say "run the tests with: bash scripts/test.sh"
