#!/usr/bin/env bash
# ferry's GPU check, for a machine with an NVIDIA GPU, CUDA 13 and nvcc but no
# Rust. It checks what exists of ferry's CUDA side, within 8 minutes, and
# prints a table last:
#
#   reference  the float64 references judge correctly (g++, no GPU needed)
#   kernels    each kernel in kernels/*.cu alone against those references on
#              fresh random inputs (nvcc harness, scripts/gpu/gpu-check/), sizes that
#              are no multiple of the block, contexts of 4096 tokens and more
#   nvrtc      this machine's NVRTC compiles every kernel (ferry-kernels' tests)
#   probe      the engine's device probe describes the GPU (ferry-engine's tests)
#   model      a random SmolLM2-135M-shaped Llama made with transformers on the
#              GPU (bf16 safetensors + the carried tokenizer), and the prompts
#   engine     the CUDA backend driven directly (ferry-engine's ignored GPU
#              test: prefill, then greedy decode sampled on the device, with
#              CUDA graphs and with --enforce-eager; both must agree)
#   logits     its first-step logits against transformers' forward pass
#   greedy     its greedy tokens against transformers' (near-ties excepted)
#   serve-cuda `ferry serve --device cuda` on that model: greedy completions
#              over HTTP against transformers
#   bench-serve `ferry bench serve` at 64 concurrent streams for 60 s: no error
#   bench-engine `ferry bench engine --device cuda` on a Llama-3-8B-shaped
#              `--load-format dummy` model (bf16) at 1, 16, 64 and 256 sequences
#   bench-hf   the yardsticks: the batch-1 HBM floor (weight bytes over
#              measured copy bandwidth) and transformers' static-cache
#              `generate` on the same shape at the same batch sizes
#
# The serve and bench rows need `--device cuda` wired into the CLI (main's
# backend factory); until then they fail with what the binary said.
#
# The Rust binaries come from here: scripts/gpu/gpu-check-prepare.sh builds them
# into gpu-bin/ (ignored by git); copy it to the GPU machine with the tree and
# run `bash scripts/gpu/gpu-check.sh` from the repository root.
# Logs go to $OUT (at most 8 files: the set-up logs are folded into one at the
# end), else a temporary folder.
# Exit status: 0 when every row passed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
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
step reference 60 bash -c "g++ -O2 -std=c++17 -o '$WORK/reference_selftest' scripts/gpu/gpu-check/reference_selftest.cpp && '$WORK/reference_selftest'"
if ((rc == 0)); then row reference PASS "$(summary_of reference 'self-test')"; else row reference FAIL "rc $rc: $(tail -1 "$OUT/reference.log" | cut -c1-120)"; fi

# 2. Every kernel against its reference (compile, then run).
step kernels-build 200 nvcc -O2 -std=c++17 -gencode=arch=compute_90,code=sm_90 -lineinfo \
    -o "$WORK/kernels_check" scripts/gpu/gpu-check/kernels_check.cu
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
    row nvrtc FAIL "no $BIN/ferry-kernels-tests (run scripts/gpu/gpu-check-prepare.sh and carry $BIN)"
fi

# 4. The engine's device probe.
if [ -x "$BIN/ferry-engine-tests" ]; then
    step probe 60 env FERRY_REQUIRE_GPU=1 "$BIN/ferry-engine-tests" --test-threads 1 --nocapture cuda::probe device::
    if ((rc == 0)); then row probe PASS "$(summary_of probe '^found:' | cut -c8-)"
    else row probe FAIL "rc $rc: $(grep -m1 -E 'panicked|skipped|error' "$OUT/probe.log" | cut -c1-120)"; fi
else
    row probe FAIL "no $BIN/ferry-engine-tests"
fi

# 5. A random model of the default model's shape, made with transformers here.
SMOL=$WORK/smollm2
step model 90 bash -c "python3 scripts/gpu/gpu-check/make_model.py '$SMOL' '$BIN/tokenizer' --shape smollm2 && python3 scripts/gpu/gpu-check/compare_transformers.py prompts '$SMOL' '$WORK/prompts.json'"
if ((rc == 0)); then row model PASS "$(summary_of model '^random' | cut -c1-110)"; else row model FAIL "rc $rc: $(tail -1 "$OUT/model.log" | cut -c1-120)"; fi

# 6. The CUDA backend itself (no CLI): greedy decode and first-step logits,
# judged against transformers on the same weights.
if ((rc == 0)) && [ -x "$BIN/ferry-engine-tests" ]; then
    step engine 120 env FERRY_GPU_MODEL="$SMOL" FERRY_GPU_PROMPTS="$WORK/prompts.json" FERRY_GPU_OUT="$WORK/ferry-engine.json" \
        "$BIN/ferry-engine-tests" --ignored --test-threads 1 --nocapture cuda::gpu_tests
    if ((rc == 0)); then
        row engine PASS "$(summary_of engine '^found:' | cut -c8-)"
        step compare 90 python3 scripts/gpu/gpu-check/compare_transformers.py engine "$SMOL" "$WORK/prompts.json" "$WORK/ferry-engine.json"
        for r in logits greedy; do
            line=$(grep "^RESULT $r " "$OUT/compare.log" | tail -1)
            if [ -n "$line" ]; then row "$r" "$(awk '{print $3}' <<<"$line")" "$(cut -d' ' -f4- <<<"$line" | cut -c1-150)"
            else row "$r" FAIL "rc $rc: $(tail -1 "$OUT/compare.log" | cut -c1-120)"; fi
        done
    else
        row engine FAIL "rc $rc: $(grep -m1 -E 'panicked|error' "$OUT/engine.log" | cut -c1-130)"
    fi
else
    row engine FAIL "no model or no $BIN/ferry-engine-tests"
fi

# 7. `ferry serve --device cuda`: greedy completions against transformers,
# then `ferry bench serve` at 64 concurrent streams for one minute.
PORT=18431
wait_up() {  # seconds; 0 when the server answers /v1/models
    local i
    for ((i = 0; i < $1; i++)); do
        curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && return 0
        kill -0 "$server" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}
if [ -x "$BIN/ferry" ] && [ -d "$SMOL" ] && (($(allow 150) > 0)); then
    "$BIN/ferry" serve "$SMOL" --device cuda --port "$PORT" --max-num-seqs 64 >"$OUT/serve.log" 2>&1 &
    server=$!
    if wait_up 90; then
        step serve-cuda 60 python3 scripts/gpu/gpu-check/compare_transformers.py serve "$SMOL" "http://127.0.0.1:$PORT"
        line=$(grep '^RESULT serve ' "$OUT/serve-cuda.log" | tail -1)
        if [ -n "$line" ]; then row serve-cuda "$(awk '{print $3}' <<<"$line")" "$(cut -d' ' -f4- <<<"$line" | cut -c1-150)"
        else row serve-cuda FAIL "rc $rc: $(tail -1 "$OUT/serve-cuda.log" | cut -c1-120)"; fi
        step bench-serve 85 "$BIN/ferry" bench serve --base-url "http://127.0.0.1:$PORT" --max-concurrency 64 --num-prompts 100000 \
            --max-duration 60 --dataset-name random --random-input-len 128 --random-output-len 128 --ignore-eos --disable-tqdm
        plain bench-serve
        failed=$(grep -iE 'failed requests' "$OUT/bench-serve.log" | grep -oE '[0-9]+' | tail -1)
        ok=$(grep -iE 'successful requests' "$OUT/bench-serve.log" | grep -oE '[0-9]+' | tail -1)
        if ((rc == 0)) && [ "${failed:-0}" = 0 ] && [ "${ok:-0}" -gt 0 ]; then
            row bench-serve PASS "$ok requests, 0 failed; $(summary_of bench-serve '[Oo]utput token throughput' | tr -s ' ')"
        else
            row bench-serve FAIL "rc $rc; ${ok:-?} succeeded, ${failed:-?} failed: $(tail -1 "$OUT/bench-serve.log" | cut -c1-100)"
        fi
    else
        plain serve
        row serve-cuda FAIL "the server did not come up: $(grep -m1 -iE 'error|panicked' "$OUT/serve.log" | cut -c1-130)"
        row bench-serve FAIL "no server"
    fi
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
else
    row serve-cuda FAIL "not started (no $BIN/ferry, no model, or no time left)"
    row bench-serve FAIL "not started"
fi

# 8. Throughput on a Llama-3-8B-shaped model (dummy bf16 weights), and the
# yardsticks: the HBM floor and transformers' static-cache generate.
L8=$WORK/llama3-8b
python3 scripts/gpu/gpu-check/make_model.py "$L8" "$BIN/tokenizer" --shape llama3-8b --config-only >/dev/null 2>&1
if [ -x "$BIN/ferry" ]; then
    step bench-engine 150 "$BIN/ferry" bench engine "$L8" --device cuda --load-format dummy --dtype bfloat16 \
        --concurrency 1,16,64,256 --prompt-len 128 --decode-len 64 --repeats 1 --max-num-seqs 256
    plain bench-engine
    if ((rc == 0)); then row bench-engine PASS "$(grep -iE 'tok/s|decode' "$OUT/bench-engine.log" | tail -4 | tr -s ' ' | tr '\n' ';' | cut -c1-150)"
    else row bench-engine FAIL "rc $rc: $(grep -m1 -iE 'error|panicked' "$OUT/bench-engine.log" | cut -c1-130)"; fi
fi
step bench-hf 120 python3 scripts/gpu/gpu-check/bench_transformers.py "$L8" --batches 1,16,64,256 --prompt-len 128 --decode-len 64
line=$(grep '^RESULT bench-hf ' "$OUT/bench-hf.log" | tail -1)
if [ -n "$line" ]; then row bench-hf PASS "$(cut -d' ' -f4- <<<"$line" | cut -c1-150)"
else row bench-hf FAIL "rc $rc: $(tail -1 "$OUT/bench-hf.log" 2>/dev/null | cut -c1-120)"; fi

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
# Fewer files to bring back (a remote runner may take only 8): the set-up steps and
# the server's own log in one.
for f in machine reference kernels-build nvrtc probe model compare serve serve-cuda; do
    [ -f "$OUT/$f.log" ] && { echo "### $f"; cat "$OUT/$f.log"; rm -f "$OUT/$f.log"; }
done >"$OUT/setup.log"
rm -rf "$WORK"
exit $status
