#!/usr/bin/env python3
"""How fast an elastic cluster grows and shrinks under load (issue 23's
benchmark, not a test).

Starts an elastic API node with one rank of its own and keeps `--streams`
streamed completions running against it, then, `--rounds` times:

- join: starts a headless node with `--data-parallel-start-rank auto` and
  times, from its process start, the link's joining (the node's log says
  "connected", stamped by the node) and the first request its rank served
  (the API node's `vllm:request_success_total{engine=...}` moving, polled
  every 20 ms);
- leave: drains it, alternately with `POST /v1/admin/ranks/{rank}/drain` and
  with SIGTERM, and times from that request to its link closing (its rank
  leaving `/metrics`) and to the process exiting; every stream must end
  without an error.

Run (a release build, the default model):
    FERRY_BIN=target/release/ferry FERRY_TEST_MODEL=$(scripts/fetch/fetch-model.sh) \\
        python3 scripts/bench/bench_membership.py --rounds 4 --streams 16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "e2e"))

from e2e_cluster import new_cluster  # noqa: E402
from test_elastic import body, elastic_api, failed, joining, metric_ranks, stream  # noqa: E402

import httpx  # noqa: E402


class Load:
    """`n` streams kept running until stopped; every result is kept."""

    def __init__(self, url: str, n: int):
        self.url, self.stop, self.results = url, threading.Event(), []
        self.pool = concurrent.futures.ThreadPoolExecutor(n)
        self.futures = [self.pool.submit(self._one, i) for i in range(n)]

    def _one(self, i: int) -> None:
        while not self.stop.is_set():
            self.results.append(stream(self.url, body(f"Story {i}: once upon a time", 48, ignore_eos=True)))

    def end(self) -> list:
        self.stop.set()
        for f in self.futures:
            f.result(timeout=300)
        self.pool.shutdown()
        return self.results


def connected_at(log: str) -> float | None:
    """The node's own time stamp of its first "connected" line, as epoch seconds."""
    for line in log.splitlines():
        if "connected to the API node" in line:
            m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
            if m:
                return datetime.fromisoformat(m.group(1) + "+00:00").timestamp()
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--streams", type=int, default=16)
    a = ap.parse_args()
    c = new_cluster(1)
    rows = {"to link": [], "to first request": [], "drain to link closed": [], "drain to exit": [],
            "sigterm to link closed": [], "sigterm to exit": []}
    try:
        elastic_api(c).start()
        c.wait_healthy()
        load = Load(c.url, a.streams)
        for r in range(a.rounds):
            node = joining(c, f"node-{r}", "auto", [f"127.0.0.1:{c.rpc_port}"])
            before = metric_ranks(c.url, "vllm:request_success_total")
            wall0 = time.time()
            t0 = time.monotonic()
            node.start()
            rank = None
            while time.monotonic() - t0 < 120:
                done = metric_ranks(c.url, "vllm:request_success_total")
                moved = [k for k in done if k != 0 and done[k] > before.get(k, 0)]
                if moved:
                    rank = moved[0]
                    break
                time.sleep(0.02)
            if rank is None:
                print(node.text()[-3000:], file=sys.stderr)
                return 1
            rows["to first request"].append(time.monotonic() - t0)
            conn = connected_at(node.text())
            if conn is not None:
                rows["to link"].append(conn - wall0)
            time.sleep(2)  # it takes its share of the load
            how = "drain" if r % 2 == 0 else "sigterm"
            t1 = time.monotonic()
            if how == "drain":
                assert httpx.post(f"{c.url}/v1/admin/ranks/{rank}/drain", timeout=10).status_code == 202
            else:
                node.proc.send_signal(15)
            closed = exited = None
            while time.monotonic() - t1 < 120 and (closed is None or exited is None):
                if closed is None and rank not in metric_ranks(c.url):
                    closed = time.monotonic() - t1
                if exited is None and not node.alive():
                    exited = time.monotonic() - t1
                time.sleep(0.02)
            rows[f"{how} to link closed"].append(closed)
            rows[f"{how} to exit"].append(exited)
            print(f"round {r}: rank {rank} took its first request {rows['to first request'][-1]:.2f}s after its start; "
                  f"{how}: link closed after {closed:.2f}s, process exited after {exited:.2f}s", flush=True)
        results = load.end()
    finally:
        c.stop()
    bad = failed(results)
    print(f"\n{len(results)} streamed requests under {a.streams} streams, {len(bad)} failed")
    print(f"{'':28} {'median':>8} {'min':>8} {'max':>8}  (seconds, {a.rounds} rounds)")
    for k, v in rows.items():
        v = [x for x in v if x is not None]
        if v:
            print(f"{k:28} {statistics.median(v):8.2f} {min(v):8.2f} {max(v):8.2f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
