#!/usr/bin/env bash
# Speculative decoding's gain, side by side in one sitting: two `ferry serve`
# on the same file and threads, one with --speculative-config, driven in
# turn by `ferry bench serve` with the same requests:
#   - benches/data/repeat-edit.jsonl (texts, code and JSON to copy or
#     rewrite: output that repeats its input), greedy, at concurrency 1;
#   - benches/data/repeat-edit-long.jsonl (the same kinds of task, with
#     passages of 170-280 tokens and answers up to 256), at concurrency 1;
#   - random prompts (text that does not repeat), at concurrency 1 and 16;
# ROUNDS rounds, alternating the servers (with the suffix method, a round
# after the first meets prompts whose answers its cache already holds). Then checks that both servers give
# the same greedy and seeded texts on the repeating workload, and prints the
# speculative counters (acceptance rate, mean accepted length).
#
#   scripts/bench/bench_speculative.sh [MODEL.gguf] [OUT_DIR]
#
# Environment: SPEC (the config JSON), ROUNDS (default 2), THREADS (default 2),
# FERRY (the binary, default target/release/ferry).
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-$(scripts/fetch/fetch-model.sh)}
out=${2:-bench-results/speculative}
spec=${SPEC:-'{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'}
rounds=${ROUNDS:-2}
threads=${THREADS:-2}
ferry=${FERRY:-target/release/ferry}
mkdir -p "$out"
"$ferry" serve "$model" --host 127.0.0.1 --port 18200 --tls-port 18443 --threads "$threads" --served-model-name smollm2 \
  --cert-dir "$out/certs-plain" >"$out/plain.log" 2>&1 &
plain_pid=$!
"$ferry" serve "$model" --host 127.0.0.1 --port 18201 --tls-port 18444 --threads "$threads" --served-model-name smollm2 \
  --cert-dir "$out/certs-spec" --speculative-config "$spec" >"$out/spec.log" 2>&1 &
spec_pid=$!
trap 'kill $plain_pid $spec_pid 2>/dev/null || true' EXIT
. scripts/bench/lib.sh
wait_up 18200
wait_up 18201
run() { # name port extra-args...
  local name=$1 port=$2; shift 2
  "$ferry" bench serve --base-url "http://127.0.0.1:$port" --model smollm2 --num-warmups 1 --disable-tqdm \
    --save-result "$out/$name.json" "$@" | grep -E 'Output token throughput' | sed "s/^/$name /"
}
for r in $(seq 1 "$rounds"); do
  for side in plain:18200 spec:18201; do
    name=${side%%:*}; port=${side##*:}
    run "repeat-c1-$name-r$r" "$port" --dataset-name jsonl --dataset-path benches/data/repeat-edit.jsonl --num-prompts 12 --max-concurrency 1
    run "repeat-long-c1-$name-r$r" "$port" --dataset-name jsonl --dataset-path benches/data/repeat-edit-long.jsonl --num-prompts 8 --max-concurrency 1
    run "random-c1-$name-r$r" "$port" --random-input-len 128 --random-output-len 64 --ignore-eos --num-prompts 8 --max-concurrency 1 --seed $r
    run "random-c16-$name-r$r" "$port" --random-input-len 128 --random-output-len 64 --ignore-eos --num-prompts 48 --max-concurrency 16 --seed $r
  done
done
python3 - "$out" <<'PY'
import json, sys, urllib.request
out = sys.argv[1]
def ask(port, prompt, n, extra):
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": n, **extra}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))["choices"][0]["text"]
rows = [json.loads(l) for f in ("benches/data/repeat-edit.jsonl", "benches/data/repeat-edit-long.jsonl")
        for l in open(f) if l.strip()]
same = total = 0
for r in rows:
    for extra in ({"temperature": 0}, {"temperature": 0.8, "seed": 5}):
        total += 1
        same += ask(18200, r["prompt"], r["output_len"], extra) == ask(18201, r["prompt"], r["output_len"], extra)
print(f"identical texts: {same} of {total}")
sys.path.insert(0, "scripts/bench")
from ferry_server import spec_counters
m = spec_counters(18201)
d, t, a = (m.get(k, 0) for k in ("drafts", "draft_tokens", "accepted_tokens"))
if d:
    print(f"drafts {d:.0f}, draft tokens {t:.0f}, accepted {a:.0f}: acceptance {a / t:.2f}, mean accepted per draft {a / d:.2f}")
PY
