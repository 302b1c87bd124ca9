#!/usr/bin/env python3
"""Resident memory of `ferry serve` around a burst of large requests, for
comparing allocators side by side: each binary given is started in turn, its
RSS read idle, during a burst (16 /tokenize calls of 800k characters, 4 at a
time, then 16 completions with 2,000 stop strings and n=8), and 3 s after.
  scripts/bench/bench_allocator.py BINARY [BINARY ...]"""
import concurrent.futures
import json
import os
import subprocess
import sys
import time
import urllib.request

from ferry_server import start_ferry

# The default model: FERRY_TEST_MODEL, else wherever scripts/fetch/fetch-model.sh puts it (the model cache).
MODEL = os.environ.get("FERRY_TEST_MODEL") or subprocess.run(
    [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fetch", "fetch-model.sh")],
    check=True, capture_output=True, text=True).stdout.strip()


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def run(binary, port):
    p = start_ferry(binary, MODEL, port, "--max-model-len", "2048", wait_s=120)
    idle = rss(p.pid)
    peak = idle
    text = "the quick brown fox jumps " * 32_000
    stops = [f"stop-{i}" for i in range(2000)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        fs = [pool.submit(post, port, "/tokenize", {"prompt": text}) for _ in range(16)]
        fs += [pool.submit(post, port, "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "n": 8, "stop": stops[:128],
                                                          "temperature": 0.8}) for _ in range(16)]
        while not all(f.done() for f in fs):
            peak = max(peak, rss(p.pid))
            time.sleep(0.05)
        codes = sorted({f.result() for f in fs})
    time.sleep(3)
    after = rss(p.pid)
    p.terminate()
    p.wait(timeout=30)
    return idle, peak, after, codes


if __name__ == "__main__":
    print(f"{'binary':<40} {'idle MB':>8} {'peak MB':>8} {'after MB':>9}  statuses")
    for i, b in enumerate(sys.argv[1:]):
        idle, peak, after, codes = run(b, 18700 + 10 * i)
        print(f"{b:<40} {idle:8.0f} {peak:8.0f} {after:9.0f}  {codes}")
