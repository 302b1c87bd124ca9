#!/usr/bin/env bash
# Structured outputs' cost under load: output tokens/s at --max-concurrency 1
# and 16, the same random prompts unconstrained and under a JSON-schema
# constraint (an array of objects it cannot finish in 64 tokens, so every
# request runs its full length, as the unconstrained ones do with ignore_eos).
#   scripts/bench/bench_structured.sh [MODEL.gguf] [OUT_DIR]
# Needs a release build (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
out=${2:-bench-results/structured}
ferry=${FERRY_BIN:-target/release/ferry}
mkdir -p "$out"
# No prefix caching: the constrained run sends the unconstrained run's prompts
# again, and must not find them cached.
"$ferry" serve "$model" --host 127.0.0.1 --port 18100 --tls-port 18543 --threads 2 --served-model-name smollm2 \
  --no-enable-prefix-caching --cert-dir "$out/certs" >"$out/ferry.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf http://127.0.0.1:18100/v1/models >/dev/null && break
  sleep 1
done
schema='{"type":"array","minItems":50,"items":{"type":"object","properties":{"name":{"type":"string","maxLength":12},"age":{"type":"integer","minimum":0,"maximum":120},"tags":{"type":"array","items":{"enum":["red","green","blue"]},"maxItems":3}},"required":["name","age","tags"],"additionalProperties":false}}'
constrained="{\"structured_outputs\": {\"json\": $schema}}"
# Rounds alternate the two kinds, so a machine whose load moves slows both
# alike; each figure is the best round of its kind.
rounds=${ROUNDS:-3}
for c in 1 16; do
  n=$((c * 4 > 8 ? c * 4 : 8))
  for r in $(seq 1 "$rounds"); do
    for kind in free json; do
      extra=()
      [ "$kind" = json ] && extra=(--extra-body "$constrained")
      "$ferry" bench serve --base-url http://127.0.0.1:18100 --model smollm2 --http 1.1 \
        --num-prompts "$n" --max-concurrency "$c" --random-input-len 128 --random-output-len 64 \
        --ignore-eos --temperature 0.8 --seed 0 --num-warmups 2 --disable-tqdm "${extra[@]}" \
        --save-result "$out/$kind-c$c-r$r.json" >/dev/null
    done
  done
  best() { python3 -c 'import json,sys; print(max(sys.argv[1:], key=lambda f: json.load(open(f))["output_throughput"]))' "$@"; }
  "$ferry" bench compare "$(best "$out"/free-c$c-r*.json)" "$(best "$out"/json-c$c-r*.json)"
done
