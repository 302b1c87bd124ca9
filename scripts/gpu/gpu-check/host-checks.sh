#!/usr/bin/env bash
# What of the GPU check can be checked without a GPU, with g++ alone: the
# float64 references' self-test, the kernel harness type-checked against a
# stand-in for CUDA's names, the sampling kernel and the draw run emulated on
# the CPU (each block as 64 threads meeting at __syncthreads; see
# cuda_standin.h) against the same references, and gpu-check.sh's syntax.
# Run by scripts/test/all.sh (CI) and scripts/gpu-check-prepare.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
g++ -O2 -std=c++17 -Wall -o "$tmp/reference_selftest" scripts/gpu/gpu-check/reference_selftest.cpp
"$tmp/reference_selftest"
sed -e 's/<<<[^;]*>>>//' -e 's|#include <cuda_runtime.h>|#include "cuda_standin.h"|' scripts/gpu/gpu-check/kernels_check.cu >"$tmp/standin_check.cpp"
g++ -std=c++17 -fsyntax-only -Wall -Wno-unused-variable -Wno-unused-function -Wno-sign-compare -Iscripts/gpu/gpu-check "$tmp/standin_check.cpp"
g++ -O2 -std=c++17 -pthread -DFERRY_HOST_EMULATION -Wall -Wno-unused-variable -Wno-unused-function -Wno-sign-compare \
    -Iscripts/gpu/gpu-check -Ikernels -o "$tmp/sampling_emulated" "$tmp/standin_check.cpp"
"$tmp/sampling_emulated"
bash -n scripts/gpu/gpu-check.sh
echo "gpu-check host checks: references self-tested, kernels_check.cu type-checked (g++ stand-in), sampling and draw_bits run emulated on the CPU; gpu-check.sh parses"
