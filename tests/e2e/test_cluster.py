"""A cluster of real processes on loopback: an API node with one engine rank of
its own (flume) and two headless nodes with one rank each (QUIC with mutual
TLS), vLLM's data-parallel flags. Compared against the single-node server of
the session for the same greedy requests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time

import pytest

from e2e_cluster import Cluster, new_cluster
from e2e_util import completion_stream_text, need, sse_json_events, wait_until

httpx = need("httpx")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
           "Water boils at", "A haiku about the sea:"]


@pytest.fixture(scope="module")
def cluster():
    c = new_cluster(3)
    try:
        # Either side may start first: the headless nodes dial before the API node listens.
        c.headless("node-a", 1, 1).start()
        c.headless("node-b", 2, 1).start()
        time.sleep(1.0)
        c.api_node(0, 1).start()
        c.wait_healthy()
        yield c
    finally:
        c.stop()


def body(prompt: str, max_tokens: int = 12, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def single_node_texts(server, prompts, max_tokens=12) -> dict[str, str]:
    out = {}
    with httpx.Client(base_url=server.http_url, headers=server.auth, timeout=120) as c:
        for p in prompts:
            r = c.post("/v1/completions", json={"model": server.model_id, **body(p, max_tokens)})
            assert r.status_code == 200, r.text
            out[p] = r.json()["choices"][0]["text"]
    return out


def stream_h1(url: str, payload: dict, headers: dict | None = None, timeout: float = 120) -> tuple[str, list[dict], float]:
    """A streamed completion over HTTP/1.1: its text, its events, and when it ended."""
    with httpx.Client(timeout=timeout) as c:
        with c.stream("POST", url + "/v1/completions", json={**payload, "stream": True}, headers=headers or {}) as r:
            raw = "".join(r.iter_text())
    events = sse_json_events(raw)
    return completion_stream_text([e for e in events if "choices" in e]), events, time.monotonic()


async def stream_h3(c: Cluster, payload: dict) -> str:
    from e2e_h3 import h3_connect
    async with h3_connect("127.0.0.1", c.tls_port, cafile=str(c.dir / "tls" / "cert.pem")) as h3:
        _, head, body_chunks = await h3.stream("/v1/completions", {**payload, "stream": True}, timeout=120)
        assert head.status == 200 and head.alpn == "h3", head
        chunks = [data async for data in body_chunks]
    raw = b"".join(chunks).decode()
    return completion_stream_text([e for e in sse_json_events(raw) if "choices" in e])


@pytest.mark.timeout(300)
def test_mixed_h1_and_h3_stream_load_gives_single_node_text_on_every_rank(cluster, server):
    want = single_node_texts(server, PROMPTS)
    before = cluster.generation_tokens()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        h1 = [pool.submit(stream_h1, cluster.url, body(p)) for p in PROMPTS for _ in range(2)]
        h3 = [pool.submit(lambda p=p: asyncio.run(stream_h3(cluster, body(p)))) for p in PROMPTS]
        got_h1 = [f.result() for f in h1]
        got_h3 = [f.result() for f in h3]
    for (text, events, _), p in zip(got_h1, [p for p in PROMPTS for _ in range(2)]):
        assert not any("error" in e for e in events), events
        assert text == want[p], f"{p!r}: cluster {text!r} != single node {want[p]!r}"
    for text, p in zip(got_h3, PROMPTS):
        assert text == want[p], f"h3 {p!r}: cluster {text!r} != single node {want[p]!r}"
    after = cluster.generation_tokens()
    assert all(a > b for a, b in zip(after, before)), f"every rank should have decoded: {before} -> {after}\n{cluster.logs()}"


def test_a_pinned_rank_is_honoured_and_a_bad_pin_refused(cluster):
    before = cluster.generation_tokens()
    with httpx.Client(base_url=cluster.url, timeout=60) as c:
        r = c.post("/v1/completions", json=body("Hello", 5), headers={"X-data-parallel-rank": "2"})
        assert r.status_code == 200, r.text
        bad = c.post("/v1/completions", json=body("Hello", 5), headers={"X-data-parallel-rank": "7"})
        assert bad.status_code == 400 and "7" in bad.json()["error"]["message"], bad.text
    after = cluster.generation_tokens()
    assert after[2] - before[2] == 5 and after[0] == before[0] and after[1] == before[1], (before, after)


@pytest.mark.timeout(300)
def test_a_busy_rank_gets_fewer_new_requests(cluster):
    # Keep rank 1 busy with long pinned requests, then send short unpinned ones,
    # three at a time: the least-loaded choice sends them elsewhere.
    long_body = body("Tell me a long story about a dragon.", 300, ignore_eos=True)
    with concurrent.futures.ThreadPoolExecutor(6) as busy_pool, concurrent.futures.ThreadPoolExecutor(3) as pool:
        busy = [busy_pool.submit(stream_h1, cluster.url, long_body, {"X-data-parallel-rank": "1"}) for _ in range(6)]
        assert wait_until(lambda: cluster.per_rank("vllm:num_requests_running")[1] >= 6, 60, what="rank 1 busy")
        before = cluster.per_rank("vllm:request_success_total")
        short = [pool.submit(stream_h1, cluster.url, body(p, 4)) for p in PROMPTS for _ in range(2)]
        for f in short:
            assert "error" not in json.dumps(f.result()[1])
        counts = [a - b for a, b in zip(cluster.per_rank("vllm:request_success_total"), before)]
        for f in busy:
            f.result()
    assert sum(counts) == len(short), counts
    assert counts[1] * 3 < sum(counts) and counts[1] < max(counts[0], counts[2]), f"short requests per rank: {counts}"


@pytest.mark.timeout(300)
def test_kill9_of_a_headless_node_moves_its_streams_and_it_rejoins(cluster, server):
    node = cluster.nodes["node-b"]
    long_body = body("Write a very long essay about rivers.", 160, ignore_eos=True)
    want = single_node_texts(server, ["Write a very long essay about rivers."], 160)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        moved = [pool.submit(stream_h1, cluster.url, long_body, {"X-data-parallel-rank": "2"}) for _ in range(2)]
        others = [pool.submit(stream_h1, cluster.url, body("Once upon a time", 48), {"X-data-parallel-rank": str(r)})
                  for r in (0, 1)]
        assert wait_until(lambda: cluster.per_rank("vllm:num_requests_running")[2] >= 2, 60, what="rank 2 busy")
        node.kill9()
        for f in moved:
            # The streams go on, on another rank, from where they were.
            text, events, _ = f.result(timeout=120)
            assert not any("error" in e for e in events), events[-3:]
            assert text == want["Write a very long essay about rivers."]
        for f in others:
            text, events, _ = f.result(timeout=120)
            assert not any("error" in e for e in events), events[-3:]
    assert cluster.health() == 200, "the API node must stay healthy while other ranks serve"
    assert cluster.ranks_up() == [1.0, 1.0, 0.0]
    with httpx.Client(base_url=cluster.url, timeout=60) as c:
        for p in PROMPTS[:3]:  # new requests go to the living ranks
            assert c.post("/v1/completions", json=body(p, 4)).status_code == 200
        r = c.post("/v1/completions", json=body("Hi", 4), headers={"X-data-parallel-rank": "2"})
        assert r.status_code == 503, r.text
    restarted = time.monotonic()
    node.start()
    # Loading the model takes a moment; the rank is taken back as soon as it dials.
    assert wait_until(lambda: cluster.ranks_up() == [1.0, 1.0, 1.0], 60, what="rank 2 back")
    assert "connected to the API node" in node.text()
    want = single_node_texts(server, PROMPTS[:1])
    text, events, _ = stream_h1(cluster.url, body(PROMPTS[0]), {"X-data-parallel-rank": "2"})
    assert text == want[PROMPTS[0]]
    assert time.monotonic() - restarted < 120


def test_nodes_with_a_foreign_or_no_certificate_cannot_join(cluster):
    # Rank 2's slot is free while node-b is down: a stranger claiming it must not get in.
    cluster.nodes["node-b"].kill9()
    assert wait_until(lambda: cluster.ranks_up()[2] == 0.0, 10, what="rank 2 down")
    foreign = cluster.headless("stranger", 2, 1, ["--cluster-cert-dir", str(cluster.cert_dir("stranger", "other-ca"))])
    nocert = cluster.headless("anonymous", 2, 1, ["--cluster-insecure"])
    try:
        foreign.start()
        nocert.start()
        time.sleep(6)
        assert cluster.ranks_up()[2] == 0.0, "a node outside the cluster CA joined\n" + cluster.logs()
        api = cluster.nodes["api"].text()
        assert "refused a cluster link" in api, api[-2000:]
        assert "UnknownIssuer" in foreign.text() or "refused" in foreign.text(), foreign.text()[-2000:]
    finally:
        for n in (foreign, nocert):
            n.stop()
            cluster.nodes.pop(n.name)
    cluster.nodes["node-b"] = cluster.headless("node-b", 2, 1)
    cluster.nodes["node-b"].start()
    assert wait_until(lambda: cluster.ranks_up() == [1.0, 1.0, 1.0], 60, what="rank 2 back")


@pytest.mark.timeout(300)
def test_sigterm_on_the_api_node_drains_and_headless_nodes_reconnect_to_a_new_one(cluster):
    api = cluster.nodes["api"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        f = pool.submit(stream_h1, cluster.url, body("Once upon a time", 40, ignore_eos=True), {"X-data-parallel-rank": "1"})
        assert wait_until(lambda: cluster.per_rank("vllm:num_requests_running")[1] >= 1, 30, what="request running")
        assert api.term(timeout=30) == 0, api.text()[-2000:]
        text, events, _ = f.result(timeout=30)
    assert not any("error" in e for e in events), events[-3:]
    assert len(text) > 0
    assert cluster.nodes["node-a"].alive() and cluster.nodes["node-b"].alive(), "headless nodes outlive the API node"
    api.start()
    cluster.wait_healthy()
    assert cluster.ranks_up() == [1.0, 1.0, 1.0]


@pytest.mark.timeout(300)
def test_a_headless_rank_keeps_its_prefix_cache_when_its_api_node_restarts(cluster):
    """The engine outlives its link: after the API node is killed and started
    again, the headless rank still holds the blocks of a prompt it served."""
    prompt = "Remember these words exactly: " + " ".join(f"token{i}" for i in range(80)) + ". Now answer:"
    pin = {"X-data-parallel-rank": "1"}
    first = httpx.post(cluster.url + "/v1/completions", json=body(prompt, 4), headers=pin, timeout=120)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["prompt_tokens"] > 48
    api = cluster.nodes["api"]
    api.kill9()
    api.start()
    cluster.wait_healthy()
    assert wait_until(lambda: cluster.ranks_up() == [1.0, 1.0, 1.0], 60, what="every rank back")
    again = httpx.post(cluster.url + "/v1/completions", json=body(prompt, 4), headers=pin, timeout=120)
    assert again.status_code == 200, again.text
    usage = again.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0, usage
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]


def test_one_machine_two_in_process_replicas_both_take_work(tmp_path):
    from e2e_cluster import Node
    from e2e_util import free_tcp_port, free_tcp_udp_port
    from e2e_server import default_model
    from e2e_cluster import ENGINE_ARGS

    port = free_tcp_port()
    n = Node("dp2", [str(default_model()), "--host", "127.0.0.1", "--port", str(port), "--tls-port",
                     str(free_tcp_udp_port()), "--cert-dir", str(tmp_path / "tls"), "--data-parallel-size", "2",
                     *ENGINE_ARGS], tmp_path / "dp2.log").start()
    try:
        c = Cluster(dir=tmp_path, model=default_model(), size=2, port=port, tls_port=0, rpc_port=0, nodes={"dp2": n})
        c.wait_healthy()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda p: stream_h1(c.url, body(p, 16)), PROMPTS))
        assert all(not any("error" in e for e in ev) for _, ev, _ in rs)
        assert all(t > 0 for t in c.generation_tokens()), c.generation_tokens()
        assert "waiting for engine ranks on udp" not in n.text(), "one machine needs no RPC listener"
    finally:
        n.stop()


def test_an_api_node_without_ranks_loads_no_weights_and_engine_refusals_are_400s(tmp_path):
    """--data-parallel-size-local 0: the API node tokenizes only. Its own limit is
    the model's context (8192); the headless rank was started with 512, so a
    longer prompt passes the gateway and is refused by the engine: that refusal
    is the client's fault and must come back as a 400 with the engine's words."""
    from e2e_cluster import new_cluster
    c = new_cluster(1)
    try:
        c.api_node(0, 0, engine=["--max-model-len", "8192"]).start()
        c.headless("solo", 0, 1).start()
        c.wait_healthy()
        api = c.nodes["api"].text()
        assert "engine rank 0 ready" not in api, "the API node started an engine of its own"
        with httpx.Client(base_url=c.url, timeout=60) as h:
            ok = h.post("/v1/completions", json=body("The capital of France is", 4))
            assert ok.status_code == 200, ok.text
            long_prompt = "hello " * 700
            r = h.post("/v1/completions", json=body(long_prompt, 4))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "BadRequestError" and "maximum context length is 512" in err["message"], err
    finally:
        c.stop()
