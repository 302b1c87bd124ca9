#!/usr/bin/env bash
# Serving benchmark, ferry beside llama.cpp's own C++ server (llama-server,
# continuous batching over SLOTS slots, default 64), in one run: the same GGUF,
# the same two threads, the same prompts (ferry bench serve, random dataset,
# fixed seed), at --max-concurrency 1, 16 and 64 (CONCURRENCY), streaming over
# HTTP/1.1.
#   scripts/bench/bench_serve_vs_llama_cpp.sh [MODEL.gguf] [OUT_DIR]
# Needs a release build; scripts/bench/llama_server.sh builds llama-server.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-$(scripts/fetch/fetch-model.sh)}
out=${2:-bench-results}
mkdir -p "$out"
ferry=target/release/ferry
"$ferry" serve "$model" --host 127.0.0.1 --port 18000 --tls-port 18443 --threads 2 --served-model-name smollm2 \
  --cert-dir "$out/certs" >"$out/ferry.log" 2>&1 &
ferry_pid=$!
MODEL_ALIAS=smollm2 scripts/bench/llama_server.sh "$model" 18001 "${SLOTS:-64}" 127.0.0.1 >"$out/llama.log" 2>&1 &
llama_pid=$!
trap 'kill $ferry_pid $llama_pid 2>/dev/null || true' EXIT
. scripts/bench/lib.sh
# Both serve /v1/models once their model is loaded.
wait_up 18000 /v1/models
wait_up 18001 /v1/models
for c in ${CONCURRENCY:-1 16 64}; do
  n=$((c * 4 > 8 ? c * 4 : 8))
  for side in ferry:18000 llama:18001; do
    name=${side%%:*}; port=${side##*:}
    "$ferry" bench serve --base-url "http://127.0.0.1:$port" --model smollm2 --http 1.1 \
      --num-prompts "$n" --max-concurrency "$c" --random-input-len 128 --random-output-len 64 \
      --ignore-eos --seed 0 --num-warmups 2 --disable-tqdm --save-result "$out/$name-c$c.json" >/dev/null
  done
  "$ferry" bench compare "$out/ferry-c$c.json" "$out/llama-c$c.json"
done
