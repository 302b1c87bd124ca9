#!/usr/bin/env bash
# Every test, on a fresh machine too: installs what the tests need (the Python
# clients of tests/requirements.txt, the default model), then runs the Rust unit
# and integration tests (release profile: the real model runs at speed and the
# binary is shared with the end-to-end tests), then the end-to-end suite that
# drives `ferry serve` with real clients over HTTP/1.1, HTTP/2 and HTTP/3, and
# the NVRTC compile check of the CUDA kernels. (The checks that need a GPU are
# scripts/gpu/gpu-check.sh's, run on a GPU machine: see docs/cuda.md.)
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
# The default model lives in the per-user cache (scripts/fetch/fetch-model.sh prints where).
export FERRY_TEST_MODEL=${FERRY_TEST_MODEL:-$(scripts/fetch/fetch-model.sh)}
# llama.cpp's vocab-only files and expected tokenizations (from the llama-cpp-python sdist).
export FERRY_LLAMA_CPP_VOCABS=${FERRY_LLAMA_CPP_VOCABS:-$(scripts/fetch/fetch-llama-cpp-vocabs.sh)}
scripts/test/check-import-cycles.py
scripts/test/check-lint-tables.py
scripts/test/check-k8s-manifests.sh
# The CUDA feature builds and its own tests pass with no CUDA here (cudarc
# loads the libraries at run time; the probe and --device tests say what they
# found). Then the default build, which the end-to-end tests run.
cargo build --release --locked --features cuda --bin ferry
cargo test --release --locked -p ferry-engine --features cuda --lib
cargo build --release --locked --bin ferry
# Lints: a clippy warning (the workspace's lints, Cargo.toml) fails the run,
# in the CUDA code too; so does a rustdoc warning.
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --release --locked --workspace --all-targets --features cuda -- -D warnings
else
  echo "skipped: clippy (not installed)"
fi
RUSTDOCFLAGS="-D warnings" cargo doc --locked --workspace --no-deps --features cuda
cargo test --release --locked --workspace
# What of the GPU check needs no GPU: its float64 references, and the
# sampling kernel with the counter-based draw run emulated on the CPU.
if command -v g++ >/dev/null; then
  scripts/gpu/gpu-check/host-checks.sh
else
  echo "skipped: the GPU check's host checks (no g++)"
fi
# Every CUDA kernel must compile with NVRTC for sm_90 (Hopper: H100 and H200): the PyPI
# wheel ships libnvrtc (pinned to CUDA 13.0, the H200 driver's own version).
nvrtc_lib=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
FERRY_REQUIRE_NVRTC=1 LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --release --locked -p ferry-kernels --features cuda
FERRY_BIN=$PWD/target/release/ferry python3 -m pytest tests/e2e -q
