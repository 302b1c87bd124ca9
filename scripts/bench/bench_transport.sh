#!/usr/bin/env bash
# The transport swapped under one load, in one run: the same two engine ranks
# (data-parallel size 2, one CPU thread each), first in the API node's process
# over flume, then on a headless node over QUIC with mutual TLS on loopback
# (the API node loads no weights). Same prompts (ferry bench serve, random
# dataset, fixed seed), streaming over HTTP/1.1, at --max-concurrency 1 and 16;
# `ferry bench compare` prints the QUIC run beside the flume run with ratios.
#   scripts/bench/bench_transport.sh [MODEL.gguf] [OUT_DIR]
# The per-message round trip of each link is `cargo bench --bench transport`.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-$(scripts/fetch/fetch-model.sh)}
out=${2:-bench-results/transport}
rm -rf "$out"; mkdir -p "$out"
ferry=target/release/ferry
"$ferry" certs ca --dir "$out/ca" >/dev/null
"$ferry" certs node --ca-dir "$out/ca" --dir "$out/api" --name api --san 127.0.0.1 >/dev/null
"$ferry" certs node --ca-dir "$out/ca" --dir "$out/node" --name node --san 127.0.0.1 >/dev/null
common=(--threads 1 --max-num-seqs 32 --seed 0)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
. scripts/bench/lib.sh
stop_all() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=(); }
load() { # name concurrency
  local n=$(( $2 * 4 > 8 ? $2 * 4 : 8 ))
  "$ferry" bench serve --base-url http://127.0.0.1:18100 --http 1.1 --num-prompts "$n" --max-concurrency "$2" \
    --random-input-len 128 --random-output-len 64 --ignore-eos --seed 0 --num-warmups 2 --disable-tqdm \
    --save-result "$out/$1-c$2.json" >/dev/null
}
for round in 1 2; do
  "$ferry" serve "$model" --host 127.0.0.1 --port 18100 --tls-port 18543 --cert-dir "$out/tls" \
    --data-parallel-size 2 "${common[@]}" >"$out/flume-$round.log" 2>&1 & pids+=($!)
  wait_up 18100
  for c in 1 16; do load "flume-r$round" "$c"; done
  stop_all
  "$ferry" serve "$model" --headless --data-parallel-size 2 --data-parallel-rpc-port 13399 \
    --cluster-cert-dir "$out/node" "${common[@]}" >"$out/headless-$round.log" 2>&1 & pids+=($!)
  "$ferry" serve "$model" --host 127.0.0.1 --port 18100 --tls-port 18543 --cert-dir "$out/tls" \
    --data-parallel-size 2 --data-parallel-size-local 0 --data-parallel-rpc-port 13399 \
    --cluster-cert-dir "$out/api" >"$out/api-$round.log" 2>&1 & pids+=($!)
  wait_up 18100
  for c in 1 16; do load "quic-r$round" "$c"; done
  stop_all
done
for round in 1 2; do
  for c in 1 16; do
    echo "== round $round, --max-concurrency $c: flume (first) vs QUIC"
    "$ferry" bench compare "$out/flume-r$round-c$c.json" "$out/quic-r$round-c$c.json"
  done
done
