"""A client that goes away mid-stream aborts its engine request, on every
HTTP version: HTTP/1.1 (socket closed), HTTP/2 (RST_STREAM, connection kept),
HTTP/3 (QUIC stream reset, connection kept; and the whole QUIC connection
closed). Proof: /metrics shows the request running with KV blocks held while
streaming, then vllm:num_requests_running and vllm:kv_cache_usage_perc fall
to 0 within seconds, far sooner than the generation could have finished."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from e2e_util import need, prom_value, sse_payloads

pytestmark = pytest.mark.timeout(180)

FIRST_EVENTS = 4        # SSE events read before going away (to time the decode)
IDLE_DEADLINE_S = 5.0   # "within a few seconds"


def engine_load(http) -> tuple[float, float]:
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    return prom_value(r.text, "vllm:num_requests_running"), prom_value(r.text, "vllm:kv_cache_usage_perc")


def wait_idle(http, timeout: float) -> tuple[bool, float, tuple[float, float]]:
    t0 = time.monotonic()
    last = (-1.0, -1.0)
    while time.monotonic() - t0 < timeout:
        last = engine_load(http)
        if last == (0.0, 0.0):
            return True, time.monotonic() - t0, last
        time.sleep(0.05)
    return False, time.monotonic() - t0, last


@pytest.fixture
def idle_before(http):
    ok, _, last = wait_idle(http, 30)
    assert ok, f"engine not idle before the test (running, kv) = {last}: an earlier request was never freed"


def long_completion(server) -> dict:
    return {"model": server.model_id, "prompt": "Count from one to one thousand: one, two, three,",
            "max_tokens": server.max_model_len - 64, "ignore_eos": True, "temperature": 0, "stream": True}


def long_chat(server) -> dict:
    return {"model": server.model_id, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": server.max_model_len - 128, "ignore_eos": True, "temperature": 0, "stream": True}


class Timing:
    """How long the rest of the generation would take, from the first events."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.stamps: list[float] = []

    def event(self) -> None:
        self.stamps.append(time.monotonic())

    def remaining_s(self) -> float:
        span = self.stamps[-1] - self.stamps[0]
        per_token = span / max(1, len(self.stamps) - 1)
        return per_token * (self.max_tokens - len(self.stamps))


def check_live_then_freed(http, timing: Timing, disconnect) -> None:
    running, kv = engine_load(http)
    assert running >= 1 and kv > 0, (f"while streaming, /metrics should show the request running with KV blocks; "
                                      f"got running={running} kv_cache_usage_perc={kv}")
    remaining = timing.remaining_s()
    disconnect()
    ok, took, last = wait_idle(http, IDLE_DEADLINE_S)
    print(f"disconnect: engine idle after {took:.3f}s; the generation had ~{remaining:.1f}s left")
    assert ok, (f"{IDLE_DEADLINE_S}s after the client went away the engine still has (running, kv) = {last}: "
                f"the request was not aborted or its KV blocks not freed")
    # Freed long before the generation could have ended on its own.
    assert took < max(0.5, remaining / 2), (f"engine idle after {took:.2f}s but the generation would have "
                                            f"finished by itself in ~{remaining:.2f}s: inconclusive or not aborted")


# ------------------------------------------------------------------ HTTP/1.1


def test_http11_close_mid_stream(server, http, idle_before):
    body = json.dumps(long_completion(server)).encode()
    s = socket.create_connection((server.host, server.port), timeout=60)
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
               f"Authorization: Bearer {server.api_key}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    timing = Timing(long_completion(server)["max_tokens"])
    buf = b""
    seen = 0
    while seen < FIRST_EVENTS:
        part = s.recv(65536)
        assert part, f"server closed the stream early: {buf[:500]!r}"
        buf += part
        n = buf.count(b"\ndata: ") + buf.startswith(b"data: ")
        for _ in range(n - seen):
            timing.event()
        seen = n
    assert buf.startswith(b"HTTP/1.1 200"), buf[:200]

    def disconnect():
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    check_live_then_freed(http, timing, disconnect)


# ------------------------------------------------------------------ HTTP/2 (h2c)


def test_http2_rst_stream_mid_stream(server, http, idle_before):
    need("h2")
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    s = socket.create_connection((server.host, server.port), timeout=60)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())

    def send_request(method: str, path: str, body: bytes | None) -> int:
        sid = conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":path", path), (":scheme", "http"),
                (":authority", f"{server.host}:{server.port}"), ("authorization", f"Bearer {server.api_key}")]
        if body is not None:
            hdrs += [("content-type", "application/json"), ("content-length", str(len(body)))]
        conn.send_headers(sid, hdrs, end_stream=body is None)
        if body is not None:
            conn.send_data(sid, body, end_stream=True)
        s.sendall(conn.data_to_send())
        return sid

    def pump(on_event) -> None:
        data = s.recv(65536)
        assert data, "server closed the HTTP/2 connection"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            on_event(ev)
        out = conn.data_to_send()
        if out:
            s.sendall(out)

    req = long_chat(server)
    sid = send_request("POST", "/v1/chat/completions", json.dumps(req).encode())
    timing = Timing(req["max_tokens"])
    state = {"status": None, "buf": b"", "events": 0}

    def on_first(ev):
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
            state["status"] = dict(ev.headers)[":status"]
        elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
            state["buf"] += ev.data
            n = len(sse_payloads(state["buf"].decode(errors="replace")))
            for _ in range(n - state["events"]):
                timing.event()
            state["events"] = n
        elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
            pytest.fail(f"stream ended before the client reset it: {state['buf'][:300]!r}")

    while state["events"] < FIRST_EVENTS:
        pump(on_first)
    assert state["status"] == "200"

    def disconnect():
        conn.reset_stream(sid, error_code=h2.errors.ErrorCodes.CANCEL)
        s.sendall(conn.data_to_send())
    check_live_then_freed(http, timing, disconnect)

    # The connection itself survives a stream reset: a new request on it works.
    sid2 = send_request("GET", "/health", None)
    done = {"status": None, "ended": False}

    def on_second(ev):
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid2:
            done["status"] = dict(ev.headers)[":status"]
        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid2:
            done["ended"] = True
        elif isinstance(ev, h2.events.ConnectionTerminated):
            pytest.fail(f"server closed the HTTP/2 connection after a stream reset: {ev}")

    deadline = time.monotonic() + 15
    while not done["ended"] and time.monotonic() < deadline:
        pump(on_second)
    assert done["status"] == "200", done
    s.close()


# ------------------------------------------------------------------ HTTP/3 (QUIC)


@pytest.mark.parametrize("how", ["reset_stream", "close_connection"])
def test_http3_abort_mid_stream(server, http, idle_before, how):
    need("aioquic")
    from e2e_h3 import h3_connect

    req = long_completion(server) if how == "reset_stream" else long_chat(server)
    path = "/v1/completions" if how == "reset_stream" else "/v1/chat/completions"
    timing = Timing(req["max_tokens"])

    async def go():
        async with h3_connect(server.host, server.tls_port, pin=server.spki_pin) as c:
            sid, head, chunks = await c.stream(path, req, headers=server.auth)
            assert head.alpn == "h3" and head.status == 200, head
            buf, n = b"", 0
            async for data in chunks:
                buf += data
                m = len(sse_payloads(buf.decode(errors="replace")))
                for _ in range(m - n):
                    timing.event()
                n = m
                if n >= FIRST_EVENTS:
                    break
            assert n >= FIRST_EVENTS, f"stream ended early: {buf[:300]!r}"

            loop = asyncio.get_running_loop()

            def on_loop(coro_fn):
                # aioquic is not thread-safe: act on the connection from its own loop.
                return lambda: asyncio.run_coroutine_threadsafe(coro_fn(), loop).result(timeout=10)

            async def reset():
                c.reset_stream(sid)

            async def close():
                c.close()
                await c.proto.wait_closed()

            if how == "reset_stream":
                await asyncio.to_thread(check_live_then_freed, http, timing, on_loop(reset))
                # The QUIC connection is still good for another request.
                r = await c.request("GET", "/health", headers=server.auth)
                assert r.status == 200
            else:
                await asyncio.to_thread(check_live_then_freed, http, timing, on_loop(close))

    assert server.spki_pin, "no SPKI pin printed by the server"
    asyncio.run(go())


def test_server_still_serves_after_disconnects(server, oai, http):
    ok, _, last = wait_idle(http, 10)
    assert ok, last
    r = oai.completions.create(model=server.model_id, prompt="One, two, three,", max_tokens=8, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8 and r.choices[0].text
    c = oai.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=6, temperature=0)
    assert c.choices[0].message.content is not None
