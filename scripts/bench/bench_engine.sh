#!/usr/bin/env bash
# Engine speed, ferry beside llama.cpp, in one run, on the same GGUF and threads:
# prompt tokens/s and aggregate decode tokens/s at 1, 4, 16 and 64 sequences.
#   scripts/bench/bench_engine.sh [MODEL.gguf] [THREADS]
# Needs a release build (cargo build --release) and llama-cpp-python in
# $LLAMA_VENV (default .venv-llama-cpp, which scripts/bench/llama_cpp_server.sh makes),
# else in python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-$(scripts/fetch/fetch-model.sh)}
threads=${2:-2}
venv=${LLAMA_VENV:-.venv-llama-cpp}
py="$venv/bin/python"
[ -x "$py" ] || py=python3  # llama-cpp-python installed for this python instead
ours=$(target/release/ferry bench engine "$model" --threads "$threads")
theirs=$("$py" scripts/bench/bench_llama_cpp_engine.py "$model" --threads "$threads" 2>/dev/null)
python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"| figure | {a['engine']} | {b['engine']} | ratio |")
print("|---|---:|---:|---:|")
def row(name, x, y):
    print(f"| {name} | {x:.1f} | {y:.1f} | {x / y:.2f} |")
row("prompt tokens/s", a["prompt_tokens_per_s"], b["prompt_tokens_per_s"])
for n in sorted(a["decode_tokens_per_s"], key=int):
    row(f"decode tokens/s, {n} seq", a["decode_tokens_per_s"][n], b["decode_tokens_per_s"][n])
PY
