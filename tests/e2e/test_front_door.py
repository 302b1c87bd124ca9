"""The front door behind a load balancer, where one address is many clients:
a burst from one address gets 200 or 503 with Retry-After and never a
connection closed without a status; connections past --max-connections are
answered 503 (HTTP/1.1, HTTP/2, HTTP/3); /health answers while slow clients
hold that address's connections; and --forwarded-allow-ips lets a trusted
proxy name the client (X-Forwarded-For, PROXY protocol v1) for the
per-client limits, while nobody else can."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import threading
import time
from pathlib import Path

import pytest

from e2e_cluster import Cluster, Node
from e2e_server import default_model
from e2e_util import free_tcp_port, free_tcp_udp_port, need

httpx = need("httpx")
pytestmark = pytest.mark.timeout(120)


def _raise_fd_limit(want: int = 8192) -> None:
    """A thousand sockets here and as many in the server (which inherits this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# One engine thread and a small cache, with room for one long stream to hold a
# client's place while the probes run.
ENGINE_ARGS = ["--threads", "1", "--max-model-len", "2048", "--max-num-seqs", "16",
               "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0"]


def serve(tmp_path: Path, *extra: str, name: str = "srv") -> Cluster:
    """One `ferry serve` of its own, the default model, small engine settings."""
    _raise_fd_limit()
    port, tls_port = free_tcp_port(), free_tcp_udp_port()
    node = Node(name, [str(default_model()), "--host", "127.0.0.1", "--port", str(port), "--tls-port", str(tls_port),
                       "--cert-dir", str(tmp_path / "tls"), *ENGINE_ARGS, *extra], tmp_path / f"{name}.log")
    node.start()
    c = Cluster(dir=tmp_path, model=default_model(), size=1, port=port, tls_port=tls_port, rpc_port=0,
                nodes={name: node})
    c.wait_healthy()
    # The start-up probes' connections are closed and their places freed.
    time.sleep(0.3)
    return c


# ------------------------------------------------------------------ raw HTTP/1.1


def completion_request(body: dict, extra_headers: bytes = b"", prefix: bytes = b"") -> bytes:
    data = json.dumps(body).encode()
    return (prefix + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra_headers
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)


def parse_answer(raw: bytes) -> tuple[int | None, dict, bytes]:
    """(status, lower-cased headers, body) of one HTTP/1.1 answer; status None
    when the connection closed before a status line."""
    if not raw.startswith(b"HTTP/1.1 "):
        return None, {}, raw
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


async def exchange(port: int, request: bytes, timeout: float = 60, source: str | None = None) -> tuple[int | None, dict, bytes]:
    """Send one request on a fresh connection and read until the server closes it."""
    try:
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0) if source else None), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        return None, {"error": f"connect: {e!r}"}, b""
    try:
        w.write(request)
        await w.drain()
        raw = await asyncio.wait_for(r.read(), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        return None, {"error": repr(e)}, b""
    finally:
        w.close()
    return parse_answer(raw)


def assert_refusal(status, headers, body, what: str = "") -> None:
    assert status == 503, (what, status, headers, body[:300])
    assert headers.get("retry-after", "").isdigit(), (what, headers)
    err = json.loads(body)["error"]
    assert err["type"] == "ServiceUnavailableError" and err["code"] == 503 and err["message"], err


def tally(results) -> dict:
    out: dict = {}
    for status, headers, body in results:
        out[status] = out.get(status, 0) + 1
    return out


# ------------------------------------------------------------------ one address, a burst


@pytest.mark.parametrize("caps", [[], ["--max-connections", "64"]], ids=["default-caps", "max-connections-64"])
def test_a_burst_from_one_address_gets_200_or_503_never_a_silent_close(tmp_path, caps):
    # As behind a load balancer: 1100 streams at once from one address.
    c = serve(tmp_path, "--max-concurrent-requests", "64", *caps)
    try:
        req = completion_request({"prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "stream": True})

        async def burst():
            return await asyncio.gather(*(exchange(c.port, req) for _ in range(1100)))

        t0 = time.monotonic()
        results = asyncio.run(burst())
        took = time.monotonic() - t0
        counts = tally(results)
        silent = [h for s, h, _ in results if s is None]
        assert not silent, f"{len(silent)} connections closed without a status, e.g. {silent[:3]}; {counts}"
        assert set(counts) <= {200, 503}, counts
        assert counts.get(200, 0) >= 64, f"fewer than the admission limit were served: {counts}"
        assert counts.get(503, 0) > 0, f"nothing was over the limits: {counts}"
        for s, h, b in results:
            if s == 200:
                assert b"data: [DONE]" in b, b[-200:]
            else:
                assert_refusal(s, h, b)
        assert took < 60, f"the burst took {took:.0f}s"
        assert c.health() == 200
        if caps:
            assert "refused" in c.nodes["srv"].text(), "refusals are logged"
    finally:
        c.stop()


# ------------------------------------------------------------------ past --max-connections


def hold_idle(port: int, n: int) -> list[socket.socket]:
    """n keep-alive connections, each served once and then left open (idle)."""
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200"), "a connection under the cap must be served"
        held.append(s)
    return held


def test_past_max_connections_http1_http2_and_http3_read_503(tmp_path):
    c = serve(tmp_path, "--max-connections", "64")
    held = hold_idle(c.port, 64)
    try:
        body = {"prompt": "Hello", "max_tokens": 4, "stream": True}

        async def over():
            h1 = [exchange(c.port, completion_request(body)) for _ in range(40)]

            async def h2_one():
                async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as cl:
                    r = await cl.post(f"http://127.0.0.1:{c.port}/v1/completions", json=body)
                    return r.status_code, dict(r.headers), r.content

            return await asyncio.gather(*h1), await asyncio.gather(*(h2_one() for _ in range(20)))

        h1, h2 = asyncio.run(over())
        for s, h, b in h1:
            assert_refusal(s, h, b, "HTTP/1.1")
            assert h.get("connection") == "close", h
        for s, h, b in h2:
            assert_refusal(s, h, b, "HTTP/2")
        assert "--max-connections" in json.loads(h1[0][2])["error"]["message"]

        from e2e_h3 import h3_connect

        async def h3():
            async with h3_connect("127.0.0.1", c.tls_port, cafile=str(tmp_path / "tls" / "cert.pem")) as cl:
                return await cl.request("GET", "/v1/models")

        r = asyncio.run(h3())
        assert r.status == 503 and r.headers.get("retry-after", "").isdigit(), (r.status, r.headers)

        # Health probes still get the truth.
        assert httpx.get(c.url + "/health", timeout=10).status_code == 200
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    # Freed places are served in full again.
    status, _, b = asyncio.run(exchange(c.port, completion_request(body)))
    assert status == 200 and b"data: [DONE]" in b
    c.stop()


# ------------------------------------------------------------------ /health under slow clients


class SlowClients:
    """n connections from 127.0.0.1, each sending a request head one byte a
    second and never finishing it (slowloris)."""

    def __init__(self, port: int, n: int):
        self.socks = []
        for _ in range(n):
            s = socket.socket()
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            self.socks.append(s)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self):
        while not self.stop.wait(1.0):
            for s in self.socks:
                try:
                    s.send(b"a")
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


@pytest.mark.parametrize("caps", [[], ["--max-connections-per-addr", "256"], ["--max-connections", "256"]],
                         ids=["default-caps", "per-addr-256", "max-connections-256"])
def test_health_answers_while_slow_clients_hold_the_address(tmp_path, caps):
    c = serve(tmp_path, *caps)
    slow = SlowClients(c.port, 300)
    try:
        time.sleep(0.5)
        worst = 0.0
        for _ in range(5):
            t = time.monotonic()
            r = httpx.get(c.url + "/health", timeout=5)
            worst = max(worst, time.monotonic() - t)
            assert r.status_code == 200, (r.status_code, r.text)
            time.sleep(0.3)
        assert worst < 2, f"/health took {worst:.1f}s"
        if caps:
            # A request that is not a probe, from the crowded address, is told why.
            s, h, b = asyncio.run(exchange(c.port, completion_request({"prompt": "hi", "max_tokens": 1})))
            assert_refusal(s, h, b)
            assert caps[0] in json.loads(b)["error"]["message"]
    finally:
        slow.close()
        c.stop()


# ------------------------------------------------------------------ trusted proxies

LONG = {"prompt": "Tell me a story", "max_tokens": 1500, "ignore_eos": True, "stream": True}
SHORT = {"prompt": "hi", "max_tokens": 2}


def xff(ip: str) -> bytes:
    return f"X-Forwarded-For: {ip}\r\n".encode()


def proxy_v1(ip: str) -> bytes:
    return f"PROXY TCP4 {ip} 127.0.0.1 40000 8000\r\n".encode()


async def while_holding(port: int, hold: bytes, probes: list[tuple[bytes, str | None]]) -> list[int | None]:
    """Hold one long stream (`hold`), then send each probe (request, source
    address) while it runs; the probes' statuses."""
    held = asyncio.create_task(exchange(port, hold))
    await asyncio.sleep(1.0)
    out = []
    for req, source in probes:
        status, _, _ = await exchange(port, req, timeout=30, source=source)
        out.append(status)
    assert not held.done(), "the held stream ended before the probes"
    held.cancel()
    try:
        await held
    except asyncio.CancelledError:
        pass
    return out


def test_forwarded_for_from_a_trusted_proxy_names_the_client(tmp_path):
    c = serve(tmp_path, "--forwarded-allow-ips", "127.0.0.1", "--max-requests-per-client", "1")
    try:
        a, b = "198.51.100.1", "198.51.100.2"
        got = asyncio.run(while_holding(c.port, completion_request(LONG, xff(a)), [
            (completion_request(SHORT, xff(a)), None),
            (completion_request(SHORT, xff(b)), None),
            # The client's own forged entry left of the proxy's is not believed.
            (completion_request(SHORT, xff(f"{b}, {a}")), None),
        ]))
        assert got == [429, 200, 429], got
    finally:
        c.stop()


def test_without_the_flag_forwarded_for_is_ignored(tmp_path):
    c = serve(tmp_path, "--max-requests-per-client", "1")
    try:
        got = asyncio.run(while_holding(c.port, completion_request(LONG, xff("198.51.100.1")), [
            (completion_request(SHORT, xff("198.51.100.2")), None),
        ]))
        assert got == [429], "X-Forwarded-For from an untrusted peer must not split the limit"
        # Nor is a PROXY header read: the request is refused as malformed.
        status, _, _ = asyncio.run(exchange(c.port, completion_request(SHORT, prefix=proxy_v1("198.51.100.9"))))
        assert status == 400, status
    finally:
        c.stop()


def test_proxy_protocol_from_a_trusted_peer_names_the_client_and_no_one_else_may(tmp_path):
    c = serve(tmp_path, "--forwarded-allow-ips", "127.0.0.1", "--max-requests-per-client", "1")
    try:
        a, b = "203.0.113.7", "203.0.113.8"
        got = asyncio.run(while_holding(c.port, completion_request(LONG, prefix=proxy_v1(a)), [
            (completion_request(SHORT, prefix=proxy_v1(a)), None),
            (completion_request(SHORT, prefix=proxy_v1(b)), None),
            # The proxy's own connection (no header) is a client of its own.
            (completion_request(SHORT), None),
            # From an untrusted peer (127.0.0.2) the header is not read: refused as malformed...
            (completion_request(SHORT, prefix=proxy_v1(b)), "127.0.0.2"),
            # ...and that peer is itself, not the client it claims.
            (completion_request(SHORT), "127.0.0.2"),
        ]))
        assert got == [429, 200, 200, 400, 200], got
        # A malformed header from the trusted peer closes the connection, and the server serves on.
        status, _, _ = asyncio.run(exchange(c.port, completion_request(SHORT, prefix=b"PROXY TCP4 1.2.3.4 nope\r\n")))
        assert status is None
        assert c.health() == 200
    finally:
        c.stop()
