"""Elastic membership and several API nodes, with real processes on loopback
(QUIC with mutual TLS between them): headless nodes that join a running
cluster (with a rank number beyond `--data-parallel-size`, or one the API node
assigns), nodes that leave it (SIGTERM, or an operator's drain of each rank)
without a failed request, ranks that disappear from `/metrics` once they are
no longer members, and two API nodes that share one set of ranks and count
each other's load."""

from __future__ import annotations

import concurrent.futures
import re
import time
from pathlib import Path

import pytest

from e2e_cluster import ENGINE_ARGS, Cluster, Node, new_cluster
from e2e_util import free_tcp_port, free_tcp_udp_port, need, sse_json_events, wait_until

httpx = need("httpx")


def body(prompt: str, max_tokens: int, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def metric_ranks(url: str, metric: str = "ferry:engine_up") -> dict[int, float]:
    """`metric` by engine label, for every rank the API node lists."""
    out: dict[int, float] = {}
    pat = re.compile(re.escape(metric) + r'\{[^}]*engine="(\d+)"[^}]*\} (\S+)$')
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = pat.match(line)
        if m:
            out[int(m.group(1))] = out.get(int(m.group(1)), 0.0) + float(m.group(2))
    return out


def stream(url: str, payload: dict, headers: dict | None = None) -> tuple[str, list[dict]]:
    """A streamed completion: its text and its events (an error event if it failed)."""
    try:
        with httpx.Client(timeout=180) as c:
            with c.stream("POST", url + "/v1/completions", json={**payload, "stream": True}, headers=headers or {}) as r:
                if r.status_code != 200:
                    return "", [{"error": f"HTTP {r.status_code}: {r.read()!r}"}]
                raw = "".join(r.iter_text())
    except httpx.HTTPError as e:
        return "", [{"error": f"transport: {e!r}"}]
    events = sse_json_events(raw)
    text = "".join(c.get("text") or "" for e in events for c in e.get("choices", []))
    return text, events


def health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def failed(results) -> list:
    return [ev for _, ev in results if any("error" in e for e in ev) or not ev]


def elastic_api(c: Cluster, name: str = "api", port: int | None = None, rpc: int | None = None, local: int = 1,
                extra: list[str] | None = None) -> Node:
    """An elastic API node waiting for one rank (its own, unless `local` is 0)."""
    port = port or c.port
    args = [str(c.model), "--host", "127.0.0.1", "--port", str(port), "--tls-port", str(free_tcp_udp_port()),
            "--data-parallel-size", "1", "--data-parallel-size-local", str(local), "--data-parallel-elastic",
            "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc or c.rpc_port),
            "--cluster-cert-dir", str(c.cert_dir("api")), "--cert-dir", str(c.dir / "tls"),
            "--shutdown-timeout", "5", *ENGINE_ARGS, *(extra or [])]
    n = Node(name, args, c.dir / f"{name}.log")
    c.nodes[name] = n
    return n


def joining(c: Cluster, name: str, rank: str, addresses: list[str], extra: list[str] | None = None) -> Node:
    """A headless node of one rank (`rank`: a number or `auto`) serving every API node in `addresses`."""
    args = [str(c.model), "--headless", "--data-parallel-size-local", "1", "--data-parallel-start-rank", rank,
            "--data-parallel-rpc-port", str(c.rpc_port), "--cluster-cert-dir", str(c.cert_dir(name)),
            "--shutdown-timeout", "20", *ENGINE_ARGS, *(extra or [])]
    for a in addresses:
        args += ["--data-parallel-address", a]
    n = Node(name, args, c.dir / f"{name}.log")
    c.nodes[name] = n
    return n


def assert_serves(c: Cluster, node: Node, rank: int) -> None:
    """`node`'s rank `rank` comes up on the API node and answers a request pinned to it."""
    assert wait_until(lambda: metric_ranks(c.url).get(rank) == 1.0, 60, what=f"rank {rank} up"), c.logs()
    r = httpx.post(c.url + "/v1/completions", json=body("Hello", 4), headers={"X-data-parallel-rank": str(rank)},
                   timeout=60)
    assert r.status_code == 200, r.text


def serving_at(c: Cluster, name: str, rank: int) -> Node:
    """A headless node started with rank `rank`, once it serves."""
    node = joining(c, name, str(rank), [f"127.0.0.1:{c.rpc_port}"]).start()
    assert_serves(c, node, rank)
    return node


@pytest.fixture(scope="module")
def cluster():
    c = new_cluster(1)
    try:
        elastic_api(c).start()
        c.wait_healthy()
        yield c
    finally:
        c.stop()


@pytest.mark.timeout(300)
def test_a_node_that_joins_mid_load_takes_work_and_one_that_leaves_fails_nothing(cluster):
    url = cluster.url
    assert metric_ranks(url) == {0: 1.0}, "an elastic cluster lists its members only"
    prompts = [f"Story {i}: once upon a time" for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        first = [pool.submit(stream, url, body(p, 48, ignore_eos=True)) for p in prompts[:12]]
        assert wait_until(lambda: metric_ranks(url, "vllm:num_requests_running").get(0, 0) >= 4, 60, what="load")
        # The node asks for a rank number: the lowest free one is 1. New
        # requests keep arriving while it starts.
        node = joining(cluster, "node-j", "auto", [f"127.0.0.1:{cluster.rpc_port}"])
        started = time.monotonic()
        node.start()
        second = []
        took = False
        while not took and time.monotonic() - started < 60:
            second.append(pool.submit(stream, url, body(prompts[len(second) % len(prompts)], 16)))
            time.sleep(0.2)
            took = metric_ranks(url, "vllm:request_success_total").get(1, 0) > 0 \
                or metric_ranks(url, "vllm:num_requests_running").get(1, 0) > 0
        joined_after = time.monotonic() - started
        assert took, cluster.logs()
        results = [f.result(timeout=240) for f in first + second]
    assert not failed(results), failed(results)[:2]
    assert "assigned rank 1" in node.text(), node.text()[-2000:]
    # Loading the model is part of the node's start; on a loaded 2-core CI
    # machine allow some room above the 5 s aim (the benchmark measures it).
    assert joined_after < 15, f"the joined rank took work {joined_after:.1f}s after its start"
    assert metric_ranks(url)[1] == 1.0

    # It leaves under load: SIGTERM drains it (nothing new, what runs
    # finishes), its link closes, and it is no longer a member.
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        load = [pool.submit(stream, url, body(p, 40, ignore_eos=True)) for p in prompts[:12]]
        assert wait_until(lambda: metric_ranks(url, "vllm:num_requests_running").get(1, 0) >= 1, 60,
                          what="rank 1 busy"), cluster.logs()
        assert node.term(timeout=60) == 0, node.text()[-2000:]
        more = [pool.submit(stream, url, body(p, 8)) for p in prompts[12:16]]
        results = [f.result(timeout=240) for f in load + more]
    assert not failed(results), failed(results)[:2]
    assert wait_until(lambda: 1 not in metric_ranks(url), 10, what="rank 1 gone from /metrics"), metric_ranks(url)
    assert metric_ranks(url) == {0: 1.0}
    assert cluster.health() == 200


@pytest.mark.timeout(300)
def test_a_rank_beyond_the_size_joins_and_an_operator_drain_lets_its_node_go(cluster):
    url = cluster.url
    node = serving_at(cluster, "node-5", 5)
    # A second node claiming the same number is not let in while rank 5 lives.
    dup = joining(cluster, "node-5b", "5", [f"127.0.0.1:{cluster.rpc_port}"])
    dup.start()
    try:
        assert wait_until(lambda: "already connected" in dup.text(), 30, what="the duplicate refused"), dup.text()[-2000:]
    finally:
        dup.stop()
        cluster.nodes.pop("node-5b")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        load = [pool.submit(stream, url, body("Tell me about the sea.", 40, ignore_eos=True),
                            {"X-data-parallel-rank": "5"}) for _ in range(2)]
        # Both running before the drain: a request pinned to a rank that is
        # draining is refused (503, the rank is not serving), which is right,
        # but not what this test checks (what runs on a drained rank finishes).
        assert wait_until(lambda: metric_ranks(url, "vllm:num_requests_running").get(5, 0) >= 2, 60, what="both busy")
        assert httpx.post(url + "/v1/admin/ranks/5/drain", timeout=10).status_code == 202
        results = [f.result(timeout=120) for f in load]
    assert not failed(results), failed(results)
    # Released by its only API node, the node leaves by itself.
    assert wait_until(lambda: not node.alive(), 60, what="the drained node exits"), node.text()[-2000:]
    assert node.proc.returncode == 0, node.text()[-2000:]
    assert "released" in node.text()
    assert wait_until(lambda: 5 not in metric_ranks(url), 10, what="rank 5 gone"), metric_ranks(url)


@pytest.mark.timeout(300)
def test_a_killed_node_leaves_membership_after_the_grace_and_rejoins_with_its_rank(cluster):
    url = cluster.url
    node = serving_at(cluster, "node-k", 3)
    node.kill9()
    # Shown down while it may come back (the link's own timeout), then gone.
    assert wait_until(lambda: metric_ranks(url).get(3) == 0.0, 15, what="rank 3 down"), metric_ranks(url)
    assert wait_until(lambda: 3 not in metric_ranks(url), 30, what="rank 3 no longer a member"), metric_ranks(url)
    node.start()
    assert_serves(cluster, node, 3)
    node.stop()


@pytest.mark.timeout(400)
def test_two_api_nodes_share_the_ranks_and_one_survives_the_other(tmp_path: Path):
    c = new_cluster(1)
    try:
        port_b, rpc_b = free_tcp_port(), free_tcp_udp_port()
        a = elastic_api(c, "api-a", local=0)
        b = elastic_api(c, "api-b", port=port_b, rpc=rpc_b, local=0)
        url_a, url_b = c.url, f"http://127.0.0.1:{port_b}"
        addrs = [f"127.0.0.1:{c.rpc_port}", f"127.0.0.1:{rpc_b}"]
        # Two headless nodes, each serving both API nodes with the same rank.
        n0 = joining(c, "node-0", "0", addrs)
        n1 = joining(c, "node-1", "1", addrs)
        for n in (a, b, n0, n1):
            n.start()
        for u in (url_a, url_b):
            assert wait_until(lambda u=u: health(u) == 200 and metric_ranks(u) == {0: 1.0, 1: 1.0}, 90,
                              what=f"{u} has both ranks"), c.logs()
        # Both API nodes serve every rank, with the same greedy text.
        for rank in ("0", "1"):
            texts = {u: httpx.post(u + "/v1/completions", json=body("The capital of France is", 8),
                                   headers={"X-data-parallel-rank": rank}, timeout=60).json()["choices"][0]["text"]
                     for u in (url_a, url_b)}
            assert texts[url_a] == texts[url_b], texts
        # A's requests on rank 0 are counted by B too.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            on_a = [pool.submit(stream, url_a, body("Write about rivers.", 200, ignore_eos=True),
                                {"X-data-parallel-rank": "0"}) for _ in range(3)]
            assert wait_until(lambda: metric_ranks(url_b, "vllm:num_requests_running").get(0, 0) >= 3, 60,
                              what="B sees A's load on rank 0"), metric_ranks(url_b, "vllm:num_requests_running")
            on_b = [pool.submit(stream, url_b, body("Write about mountains.", 60, ignore_eos=True)) for _ in range(3)]
            assert wait_until(lambda: metric_ranks(url_b, "vllm:num_requests_running").get(0, 0)
                              + metric_ranks(url_b, "vllm:num_requests_running").get(1, 0) >= 4, 60, what="B's load")
            a.kill9()
            # A's clients lose their streams; B's lose nothing.
            lost = [f.result(timeout=120) for f in on_a]
            kept = [f.result(timeout=240) for f in on_b]
        assert not failed(kept), failed(kept)[:2]
        assert all(failed([r]) or r[0] for r in lost)
        # Clients that retry on B are served on every rank.
        for rank in ("0", "1"):
            r = httpx.post(url_b + "/v1/completions", json=body("Hello", 4), headers={"X-data-parallel-rank": rank},
                           timeout=60)
            assert r.status_code == 200, r.text
        assert n0.alive() and n1.alive(), "the headless nodes outlive one API node"
        # A comes back: the nodes dial it again.
        a.start()
        assert wait_until(lambda: health(url_a) == 200, 90, what="A healthy again"), c.logs()
    finally:
        c.stop()
