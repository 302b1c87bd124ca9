"""The front door against hostile or careless clients, each on a fresh server
of its own where the test changes the server's state: a drain on SIGTERM and
SIGINT, bounded stop lists and inputs (refused while /health stays fast),
tokenizing off the async workers, an engine panic failing only its rank's
requests, per-client limits with 429, several API keys, and CORS preflights."""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import signal
import subprocess
import threading
import time
import urllib.parse
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
    port, tls_port = free_tcp_port(), free_tcp_udp_port()
    node = Node(name, [str(default_model()), "--host", "127.0.0.1", "--port", str(port), "--tls-port",
                       str(tls_port), "--cert-dir", str(tmp_path / "tls"), *(engine or ENGINE_ARGS), *extra],
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
    c = Cluster(dir=tmp_path, model=default_model(), size=size, port=port, tls_port=tls_port, rpc_port=0, nodes={name: node})
    c.wait_healthy()
    return c


def stream(url: str, body: dict, headers: dict | None = None, timeout: float = 120) -> tuple[int, list[dict], str]:
    with httpx.Client(timeout=timeout) as c:
        with c.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=headers or {}) as r:
            raw = "".join(r.iter_text())
            return r.status_code, sse_json_events(raw), raw


def health_ms(url: str) -> float:
    """One GET /health on a fresh connection, as a load balancer's probe
    makes it, timed from connect to the last byte. The standard library's
    client, not httpx: `httpx.get` builds a TLS context for every call (some
    60 ms of Python on a busy 2-core machine, 350 ms at worst), which would
    time the client instead of the server."""
    where = urllib.parse.urlsplit(url)
    t = time.monotonic()
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    try:
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
    finally:
        conn.close()
    assert r.status == 200
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
    # FERRY_FAULT_INJECT_PANIC (test-only) panics the engine step that runs a prompt holding that token.
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


# ------------------------------------------------------------------ bodies and connections

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_413_is_readable_by_a_plain_client_still_sending(server):
    import http.client
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = b'{"prompt": "' + b"x" * (20 << 20) + b'"}'
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json", **server.auth})
    r = conn.getresponse()
    assert r.status == 413, r.status
    assert b"limit" in r.read()


def test_stalled_bodies_are_cut_after_the_timeout_on_every_http_version(tmp_path):
    import asyncio
    import socket
    c = serve(tmp_path, "--request-body-timeout", "2")
    try:
        stalled_bodies(c, tmp_path)
    finally:
        c.stop()


def stalled_bodies(c, tmp_path):
    import asyncio
    import socket
    pid = c.nodes["srv"].proc.pid
    base = rss_mb(pid)
    # HTTP/1.1: 24 connections each send 3 MB of a 4 MB body, then stall.
    socks = []
    for _ in range(24):
        s = socket.create_connection(("127.0.0.1", c.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 4000000\r\n\r\n" + b"{" + b" " * 3_000_000)
        socks.append(s)
    peak = rss_mb(pid)
    t0 = time.monotonic()
    for s in socks:
        s.settimeout(10)
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 400"), head[:100]
        s.close()
    assert time.monotonic() - t0 < 8, "the stalled bodies were not cut within the timeout"

    # HTTP/2 (prior knowledge): one connection, 8 stalled streams.
    h2 = need("h2.connection")
    import h2.config
    import h2.events
    sock = socket.create_connection(("127.0.0.1", c.port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    ids = []
    for _ in range(8):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                                (":path", "/v1/completions"), ("content-type", "application/json")])
        conn.send_data(sid, b"{" + b" " * 5_000)
        ids.append(sid)
    sock.sendall(conn.data_to_send())
    ended, t0 = set(), time.monotonic()
    sock.settimeout(10)
    while len(ended) < len(ids) and time.monotonic() - t0 < 10:
        data = sock.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, (h2.events.StreamReset, h2.events.StreamEnded, h2.events.ResponseReceived)):
                ended.add(ev.stream_id)
        sock.sendall(conn.data_to_send())
    sock.close()
    assert ended >= set(ids) and time.monotonic() - t0 < 8, f"HTTP/2 streams cut: {sorted(ended)} of {ids}"

    # HTTP/3: stalled request streams get an answer or a reset too.
    from e2e_h3 import h3_connect

    async def h3_stalled():
        async with h3_connect("127.0.0.1", c.tls_port, cafile=str(tmp_path / "tls" / "cert.pem")) as h3:
            proto = h3.proto
            qs = []
            for _ in range(4):
                sid = proto._quic.get_next_available_stream_id()
                q = asyncio.Queue()
                proto.queues[sid] = q
                proto.http.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"),
                                              (b":authority", h3.authority.encode()), (b":path", b"/v1/completions"),
                                              (b"content-type", b"application/json")], end_stream=False)
                proto.http.send_data(sid, b"{" + b" " * 10_000, end_stream=False)
                qs.append(q)
            proto.transmit()
            t0 = time.monotonic()
            for q in qs:
                await asyncio.wait_for(q.get(), 10)
            return time.monotonic() - t0

    assert asyncio.run(h3_stalled()) < 8
    time.sleep(0.5)
    after = rss_mb(pid)
    assert after - base < 64, f"resident memory {base:.0f} MB -> peak {peak:.0f} MB -> {after:.0f} MB after the cut"


def test_idle_quic_connections_are_closed_even_while_the_client_pings(tmp_path):
    import asyncio
    from aioquic.quic.events import ConnectionTerminated
    from e2e_h3 import h3_connect
    c = serve(tmp_path, "--idle-connection-timeout", "2")

    async def idle():
        async with h3_connect("127.0.0.1", c.tls_port, cafile=str(tmp_path / "tls" / "cert.pem")) as h3:
            r = await h3.request("GET", "/health")
            assert r.status == 200
            t0 = time.monotonic()
            while time.monotonic() - t0 < 8:
                h3.proto._quic.send_ping(1)
                h3.proto.transmit()
                await asyncio.sleep(0.3)
                if h3.proto._quic._close_event is not None or h3.proto._closed.is_set():
                    return time.monotonic() - t0
            return None

    try:
        took = asyncio.run(idle())
    finally:
        c.stop()
    assert took is not None and took < 5, f"an idle, pinging QUIC connection stayed open ({took})"


def test_connections_over_the_cap_are_refused_and_the_server_serves_on(tmp_path):
    import socket
    c = serve(tmp_path, "--max-connections", "8")
    try:
        over_the_cap(c)
    finally:
        c.stop()


def over_the_cap(c):
    import socket
    time.sleep(0.5)  # the start-up health probes' connections are closed and freed
    held = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", c.port))
        s.settimeout(5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200"), "a connection under the cap must be served"
        held.append(s)
    extra = socket.create_connection(("127.0.0.1", c.port))
    extra.settimeout(5)
    # Not /health: health probes are still answered past the cap (test_front_door.py).
    extra.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        got = extra.recv(100)
    except (ConnectionResetError, TimeoutError):
        got = b""
    # Answered, not dropped: a 503 the client can read, and then the close.
    assert got.startswith(b"HTTP/1.1 503"), f"a connection over --max-connections got {got!r}"
    for s in held:
        s.close()
    time.sleep(0.3)
    assert c.health() == 200, "freed places are taken again"
