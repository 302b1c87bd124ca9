#!/usr/bin/env bash
# ferry's GPU check, for a machine with an NVIDIA GPU, CUDA 13 and nvcc but no
# Rust. It checks what exists of ferry's CUDA side, within 8 minutes, and
# prints a table last:
#
#   reference  the float64 references judge correctly (g++, no GPU needed)
#   kernels    each kernel in kernels/*.cu alone against those references on
#              fresh random inputs (nvcc harness, scripts/gpu-check/), sizes that
#              are no multiple of the block, contexts of 4096 tokens and more
#   nvrtc      this machine's NVRTC compiles every kernel (ferry-kernels' tests)
#   probe      the engine's device probe describes the GPU (ferry-engine's tests)
#   serve-cuda `ferry serve --device cuda` stops at start-up, names the GPU and
#              says the CUDA backend is not implemented yet (no panic)
#   serve-auto `ferry serve --device auto` says it found the GPU and runs on the CPU
#
# The Rust binaries come from here: scripts/gpu-check-prepare.sh builds them
# into gpu-bin/ (ignored by git). With the device tool:
#   run(command="bash scripts/gpu-check.sh", carry=["gpu-bin"], timeout_s=540)
# Logs go to $OUT (the device tool brings back its 7 files), else a temporary folder.
# Exit status: 0 when every row passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
BIN=${FERRY_GPU_BIN:-gpu-bin}
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
BUDGET=${FERRY_GPU_CHECK_SECONDS:-480}
start=$SECONDS
rows=()

row() {  # name status detail
    rows+=("$1|$2|$3")
    printf '== %-10s %-4s %s\n' "$1" "$2" "$3"
}

# Seconds a step may take: what it wants, or what is left of the budget (less
# a margin for the table); 0 when too little is left to start it.
allow() {
    local left=$((BUDGET - 20 - (SECONDS - start)))
    local t=$1
    ((left < t)) && t=$left
    ((t < 10)) && t=0
    echo "$t"
}

# Runs a step under its time allowance; its output goes to $OUT/$1.log.
# Sets $rc (124: out of time; 125: not started, the budget was spent).
step() {
    local name=$1 want=$2
    shift 2
    local t
    t=$(allow "$want")
    if ((t == 0)); then
        rc=125
        return
    fi
    timeout --kill-after=5 "$t" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
}

summary_of() { grep -E "$2" "$OUT/$1.log" 2>/dev/null | tail -1 | cut -c1-150; }
# A log's text without the terminal colours ferry's logger adds.
plain() { sed 's/\x1b\[[0-9;]*m//g' "$OUT/$1.log" >"$OUT/$1.log.tmp" && mv "$OUT/$1.log.tmp" "$OUT/$1.log"; }

# The machine.
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1
    nvcc --version 2>&1 | tail -2
    g++ --version 2>&1 | head -1
    ldd --version 2>&1 | head -1
} >"$OUT/machine.log" 2>&1
row machine info "$(head -1 "$OUT/machine.log" | cut -c1-100); $(grep -o 'release [0-9.]*' "$OUT/machine.log" | head -1)"

# NVRTC for the carried Rust binaries: the toolkit's, else the PyPI wheel's.
nvrtc_dir=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null); do
    if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then
        nvrtc_dir=$d
        break
    fi
done
# The driver's own folder too, where the image mounts it (libcuda.so.1).
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && nvrtc_dir="${nvrtc_dir:+$nvrtc_dir:}$d"
done
export LD_LIBRARY_PATH="${nvrtc_dir:+$nvrtc_dir:}${LD_LIBRARY_PATH:-}"

# 1. The references, checked on their own.
step reference 60 bash -c "g++ -O2 -std=c++17 -o '$WORK/reference_selftest' scripts/gpu-check/reference_selftest.cpp && '$WORK/reference_selftest'"
if ((rc == 0)); then row reference PASS "$(summary_of reference 'self-test')"; else row reference FAIL "rc $rc: $(tail -1 "$OUT/reference.log" | cut -c1-120)"; fi

# 2. Every kernel against its reference (compile, then run).
step kernels-build 200 nvcc -O2 -std=c++17 -gencode=arch=compute_90,code=sm_90 -lineinfo \
    -o "$WORK/kernels_check" scripts/gpu-check/kernels_check.cu
if ((rc != 0)); then
    row kernels FAIL "nvcc failed (rc $rc): $(grep -m1 -i error "$OUT/kernels-build.log" | cut -c1-120)"
else
    step kernels 150 "$WORK/kernels_check"
    pass=$(grep -c '^RESULT .* PASS' "$OUT/kernels.log")
    fail=$(grep -c '^RESULT .* FAIL' "$OUT/kernels.log")
    if ((rc == 0 && fail == 0 && pass > 0)); then
        row kernels PASS "$pass cases passed"
    else
        row kernels FAIL "rc $rc; $pass passed, $fail failed: $(grep -m3 '^RESULT .* FAIL' "$OUT/kernels.log" | awk '{print $2}' | tr '\n' ' ')"
    fi
fi

# 3. This machine's NVRTC compiles every kernel (the path the backend will take).
if [ -x "$BIN/ferry-kernels-tests" ]; then
    step nvrtc 60 env FERRY_REQUIRE_NVRTC=1 "$BIN/ferry-kernels-tests" --test-threads 1
    if ((rc == 0)); then row nvrtc PASS "$(summary_of nvrtc '^test result' | cut -d';' -f1-2)"
    else row nvrtc FAIL "rc $rc: $(grep -m1 -E 'panicked|error' "$OUT/nvrtc.log" | cut -c1-120)"; fi
else
    row nvrtc FAIL "no $BIN/ferry-kernels-tests (run scripts/gpu-check-prepare.sh and carry $BIN)"
fi

# 4. The engine's device probe.
if [ -x "$BIN/ferry-engine-tests" ]; then
    step probe 60 env FERRY_REQUIRE_GPU=1 "$BIN/ferry-engine-tests" --test-threads 1 --nocapture cuda::probe device::
    if ((rc == 0)); then row probe PASS "$(summary_of probe '^found:' | cut -c8-)"
    else row probe FAIL "rc $rc: $(grep -m1 -E 'panicked|skipped|error' "$OUT/probe.log" | cut -c1-120)"; fi
else
    row probe FAIL "no $BIN/ferry-engine-tests"
fi

# 5. and 6. What `ferry serve` says of the device. Neither gets as far as a
# model: --device cuda stops first; --device auto is given one that is not there.
if [ -x "$BIN/ferry" ]; then
    step serve-cuda 30 "$BIN/ferry" serve --device cuda
    plain serve-cuda
    if ((rc != 0 && rc < 124)) && ! grep -q panicked "$OUT/serve-cuda.log" && grep -q 'not implemented yet' "$OUT/serve-cuda.log" \
        && grep -q 'GPU 0: ' "$OUT/serve-cuda.log"; then
        row serve-cuda PASS "exit $rc: $(grep -o 'GPU 0: [^)]*)' "$OUT/serve-cuda.log" | head -1 | cut -c1-90), backend not implemented yet"
    else
        row serve-cuda FAIL "exit $rc: $(tail -1 "$OUT/serve-cuda.log" | cut -c1-130)"
    fi
    step serve-auto 30 "$BIN/ferry" serve --device auto "$WORK/no-such-model.gguf"
    plain serve-auto
    if grep -q 'device auto: found .*GPU 0: .*running on the CPU' "$OUT/serve-auto.log" && ! grep -q panicked "$OUT/serve-auto.log"; then
        row serve-auto PASS "found the GPU, ran on the CPU, said why"
    else
        row serve-auto FAIL "exit $rc: $(grep -m1 -- '--device' "$OUT/serve-auto.log" | cut -c1-130)"
    fi
else
    row serve-cuda FAIL "no $BIN/ferry"
    row serve-auto FAIL "no $BIN/ferry"
fi

# The kernel cases, one line each, then the table.
echo
grep '^RESULT' "$OUT/kernels.log" 2>/dev/null | awk '{ printf "  %-4s %s\n", $3, $2 }'
echo
status=0
{
    printf '%-10s | %-6s | %s\n' check result detail
    printf '%-10s-+-%-6s-+-%s\n' ---------- ------ ------
    for r in "${rows[@]}"; do
        IFS='|' read -r name st detail <<<"$r"
        printf '%-10s | %-6s | %s\n' "$name" "$st" "$detail"
    done
    printf 'took %ds of %ds; logs in %s\n' $((SECONDS - start)) "$BUDGET" "$OUT"
} | tee "$OUT/table.txt"
grep -q '| FAIL ' "$OUT/table.txt" && status=1
# Fewer files to bring back (the device tool takes 8): the set-up steps in one.
for f in machine reference kernels-build; do
    [ -f "$OUT/$f.log" ] && { echo "### $f"; cat "$OUT/$f.log"; rm -f "$OUT/$f.log"; }
done >"$OUT/setup.log"
rm -rf "$WORK"
exit $status
