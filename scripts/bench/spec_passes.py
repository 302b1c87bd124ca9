#!/usr/bin/env python3
"""Forward passes per output token under speculative decoding: a figure that
does not depend on how loaded the machine is (wall-clock speed-ups do; see
bench_speculative.sh for those).

Starts one `ferry serve` per --speculative-config given, sends each the
repeating workloads (benches/data/repeat-edit*.jsonl) one request at a time,
greedy, twice in a row (the second time, the suffix method's cache holds the
first time's outputs), and prints per server and workload: output tokens,
forward passes (a pass makes one token plus the accepted ones), drafts,
proposed and accepted tokens.

    scripts/bench/spec_passes.py [MODEL.gguf] [--spec JSON ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from ferry_server import spec_counters, start_ferry

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = [REPO / "benches/data/repeat-edit.jsonl", REPO / "benches/data/repeat-edit-long.jsonl"]
DEFAULT_SPECS = [
    '{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 5, "prompt_lookup_min": 2}',
    '{"method": "suffix", "suffix_decoding_max_cached_requests": 0}',
    '{"method": "suffix"}',
]


def run(port: int, path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    before, tokens = spec_counters(port), 0
    for r in rows:
        body = {"model": "m", "prompt": r["prompt"], "max_tokens": r["output_len"], "temperature": 0}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        tokens += json.load(urllib.request.urlopen(req, timeout=600))["usage"]["completion_tokens"]
    after = spec_counters(port)
    drafts, proposed, accepted = (after.get(k, 0) - before.get(k, 0) for k in ("drafts", "draft_tokens", "accepted_tokens"))
    passes = tokens - accepted
    return (f"{tokens} | {passes:.0f} | {tokens / passes:.2f} | {drafts:.0f} | {proposed:.0f} | "
            f"{accepted:.0f} ({accepted / max(proposed, 1):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--spec", action="append", help="a --speculative-config JSON (repeatable)")
    ap.add_argument("--threads", default="2")
    args = ap.parse_args()
    model = args.model or subprocess.check_output([str(REPO / "scripts/fetch/fetch-model.sh")], text=True).strip()
    ferry = REPO / "target/release/ferry"
    print("| config | workload | time asked | output tokens | passes | tokens a pass | drafts | proposed | accepted |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for i, spec in enumerate(args.spec or DEFAULT_SPECS):
        port = 18600 + i
        srv = start_ferry(str(ferry), model, port, "--served-model-name", "m", "--speculative-config", spec,
                          threads=args.threads)
        try:
            for w in WORKLOADS:
                for n in ("first", "again"):
                    print(f"| `{spec}` | {w.stem} | {n} | {run(port, w)} |")
                    sys.stdout.flush()
        finally:
            srv.terminate()
            srv.wait(timeout=30)


if __name__ == "__main__":
    main()
