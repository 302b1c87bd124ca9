"""The front door against hostile or careless clients, each on a fresh server
of its own where the test changes the server's state: a drain on SIGTERM and
SIGINT, bounded stop lists and inputs (refused while /health stays fast),
tokenizing off the async workers, an engine panic failing only its rank's
requests, per-client limits with 429, several API keys, and CORS preflights."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from e2e_cluster import ENGINE_ARGS, Cluster, Node
from e2e_server import default_model
from e2e_util import free_tcp_port, free_tcp_udp_port, need, sse_json_events

httpx = need("httpx")
pytestmark = pytest.mark.timeout(240)


LONG_CONTEXT = ["--threads", "1", "--max-model-len", "4096", "--max-num-seqs", "8", "--seed", "0"]


def serve(tmp_path: Path, *extra: str, env: dict | None = None, name: str = "srv", engine: list[str] | None = None) -> Cluster:
    """One `ferry serve` of its own (a Cluster of one node, for its helpers)."""
    port = free_tcp_port()
    node = Node(name, [str(default_model()), "--host", "127.0.0.1", "--port", str(port), "--tls-port",
                       str(free_tcp_udp_port()), "--cert-dir", str(tmp_path / "tls"), *(engine or ENGINE_ARGS), *extra],
                tmp_path / f"{name}.log")
    if env:
        os.environ.update(env)
        try:
            node.start()
        finally:
            for k in env:
                os.environ.pop(k, None)
    else:
        node.start()
    size = 2 if "--data-parallel-size" in extra else 1
    c = Cluster(dir=tmp_path, model=default_model(), size=size, port=port, tls_port=0, rpc_port=0, nodes={name: node})
    c.wait_healthy()
    return c


def stream(url: str, body: dict, headers: dict | None = None, timeout: float = 120) -> tuple[int, list[dict], str]:
    with httpx.Client(timeout=timeout) as c:
        with c.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=headers or {}) as r:
            raw = "".join(r.iter_text())
            return r.status_code, sse_json_events(raw), raw


def health_ms(url: str) -> float:
    t = time.monotonic()
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200
    return (time.monotonic() - t) * 1000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_in_flight_streams_and_exits_zero(tmp_path, sig):
    c = serve(tmp_path, "--shutdown-timeout", "3", engine=LONG_CONTEXT)
    node = c.nodes["srv"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        short = pool.submit(stream, c.url, {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True})
        # Far longer than the timeout: it must end with an error event and [DONE].
        long = pool.submit(stream, c.url, {"prompt": "Tell me everything", "max_tokens": 4000, "ignore_eos": True})
        time.sleep(0.5)
        t0 = time.monotonic()
        os.killpg(node.proc.pid, sig)
        code = node.proc.wait(timeout=20)
        took = time.monotonic() - t0
        s_status, s_events, s_raw = short.result(timeout=10)
        l_status, l_events, l_raw = long.result(timeout=10)
    assert code == 0, node.text()[-2000:]
    assert took < 3 + 4, f"exit took {took:.1f}s with --shutdown-timeout 3"
    assert s_raw.rstrip().endswith("data: [DONE]") and not any("error" in e for e in s_events), s_raw[-300:]
    assert l_raw.rstrip().endswith("data: [DONE]"), l_raw[-300:]
    errs = [e for e in l_events if "error" in e]
    assert errs and "shutting down" in errs[0]["error"]["message"], l_events[-2:]


def test_a_second_signal_exits_at_once(tmp_path):
    c = serve(tmp_path, "--shutdown-timeout", "60", engine=LONG_CONTEXT)
    node = c.nodes["srv"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(stream, c.url, {"prompt": "Tell me everything", "max_tokens": 4000, "ignore_eos": True})
        time.sleep(0.5)
        os.killpg(node.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert node.alive(), "the first signal drains; it must not exit yet"
        t0 = time.monotonic()
        os.killpg(node.proc.pid, signal.SIGTERM)
        node.proc.wait(timeout=10)
        assert time.monotonic() - t0 < 3


def test_stop_lists_and_inputs_are_bounded_and_health_stays_fast(tmp_path, server, http):
    url = server.http_url
    big_stop = {"prompt": "hi", "max_tokens": 4, "stop": [f"s{i}" for i in range(200_000)], "n": 4}
    too_long_stop = {"prompt": "hi", "max_tokens": 4, "stop": ["x" * 20_000]}
    many_prompts = {"prompt": ["hi"] * 300, "max_tokens": 1}
    huge_prompt = {"prompt": "word " * 400_000, "max_tokens": 1}
    many_messages = {"messages": [{"role": "user", "content": "hi"}] * 5000, "max_tokens": 1}
    cases = [("/v1/completions", big_stop, "128"), ("/v1/completions", too_long_stop, "16384"),
             ("/v1/completions", many_prompts, "256"), ("/v1/completions", huge_prompt, "1048576"),
             ("/v1/chat/completions", many_messages, "4096")]
    stop = threading.Event()
    worst = [0.0]

    def probe():
        while not stop.is_set():
            worst[0] = max(worst[0], health_ms(url))
            time.sleep(0.02)

    t = threading.Thread(target=probe)
    t.start()
    try:
        for _ in range(2):
            for path, body, limit in cases:
                r = http.post(path, json={"model": server.model_id, **body})
                assert r.status_code == 400, (path, r.text[:300])
                assert limit in r.json()["error"]["message"], r.json()
    finally:
        stop.set()
        t.join()
    assert worst[0] < 100, f"/health took {worst[0]:.0f} ms while bad requests were refused"


def test_tokenizing_a_huge_input_does_not_stall_health(server, http):
    # Under the character bound, but a lot of work for the tokenizer.
    body = {"model": server.model_id, "prompt": "the quick brown fox " * 50_000}
    stop = threading.Event()
    worst = [0.0]

    def probe():
        while not stop.is_set():
            worst[0] = max(worst[0], health_ms(server.http_url))
            time.sleep(0.02)

    t = threading.Thread(target=probe)
    t.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            rs = list(pool.map(lambda _: http.post("/tokenize", json=body), range(2)))
    finally:
        stop.set()
        t.join()
    assert all(r.status_code == 200 and r.json()["count"] > 100_000 for r in rs)
    assert worst[0] < 100, f"/health took {worst[0]:.0f} ms while two big inputs were tokenized"


def test_an_engine_panic_fails_its_requests_and_the_server_serves_on(tmp_path):
    # FERRY_FAULT_INJECT_PANIC (test-only) panics the busy loop on a prompt holding that token.
    c = serve(tmp_path, "--data-parallel-size", "2", env={"FERRY_FAULT_INJECT_PANIC": "31"})
    try:
        status, events, _ = stream(c.url, {"prompt": [31, 5], "max_tokens": 4}, {"X-data-parallel-rank": "0"})
        errs = [e for e in events if "error" in e]
        assert errs and errs[0]["error"]["code"] == 500, events
        assert "internal" in errs[0]["error"]["type"].lower() and "failed" in errs[0]["error"]["message"], errs
        deadline = time.monotonic() + 5
        while c.ranks_up() != [0.0, 1.0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.ranks_up() == [0.0, 1.0], c.ranks_up()
        pinned = httpx.post(c.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4},
                            headers={"X-data-parallel-rank": "0"}, timeout=30)
        assert pinned.status_code == 503, pinned.text
        assert c.health() == 200, "the other rank still serves"
        ok = httpx.post(c.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert "panicked" in c.nodes["srv"].text()
    finally:
        c.stop()


def test_one_client_over_its_limit_gets_429_and_another_is_unaffected(tmp_path):
    c = serve(tmp_path, "--api-key", "alpha", "--api-key", "beta", "--max-requests-per-client", "2")
    try:
        a = {"Authorization": "Bearer alpha"}
        b = {"Authorization": "Bearer beta"}
        long = {"prompt": "Tell me a story", "max_tokens": 200, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            held = [pool.submit(stream, c.url, long, a) for _ in range(2)]
            time.sleep(1.0)
            over = httpx.post(c.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=a, timeout=30)
            t0 = time.monotonic()
            other = httpx.post(c.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 8}, headers=b, timeout=30)
            other_s = time.monotonic() - t0
            for f in held:
                assert f.result()[0] == 200
        assert over.status_code == 429 and over.headers.get("retry-after") == "1", over.text
        assert over.json()["error"]["type"] == "RateLimitError"
        assert other.status_code == 200, other.text
        assert other_s < 10, f"the other client's request took {other_s:.1f}s"
        assert httpx.get(c.url + "/v1/models", headers={"Authorization": "Bearer gamma"}).status_code == 401
        after = httpx.post(c.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=a, timeout=30)
        assert after.status_code == 200, "the limit frees as requests end"
    finally:
        c.stop()


def test_tokens_per_minute_limit_answers_429_with_retry_after(tmp_path):
    c = serve(tmp_path, "--max-tokens-per-minute-per-client", "60")
    try:
        first = httpx.post(c.url + "/v1/completions", json={"prompt": "Hello there", "max_tokens": 64, "ignore_eos": True}, timeout=60)
        assert first.status_code == 200
        second = httpx.post(c.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert second.status_code == 429, second.text
        assert int(second.headers["retry-after"]) >= 5
    finally:
        c.stop()


def test_cors_preflight_is_answered_as_configured(tmp_path):
    c = serve(tmp_path, "--allowed-origins", '["https://app.example"]', "--allowed-methods", '["POST","GET"]',
              "--api-key", "k")
    try:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
        r = httpx.options(c.url + "/v1/chat/completions", headers=pre)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        bad = httpx.options(c.url + "/v1/chat/completions", headers={**pre, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in bad.headers
        real = httpx.get(c.url + "/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        assert real.status_code == 200 and real.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        c.stop()
