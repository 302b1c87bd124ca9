"""Bad requests get the right status and OpenAI's error shape, and leave the
server healthy. Tests run in file order: the last one checks the server still
answers a normal request exactly as before the battery."""

from __future__ import annotations

import socket
import time

import pytest

from e2e_util import assert_openai_error, need

pytestmark = pytest.mark.timeout(120)

COMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
HUGE_BODY_BYTES = 16 << 20  # over any sane request-body limit (ferry's is a few MiB)


@pytest.fixture(scope="module")
def baseline(http, server):
    body = {"model": server.model_id, "prompt": "Water boils at", "max_tokens": 10, "temperature": 0,
            "ignore_eos": True}
    r = http.post(COMPL, json=body)
    assert r.status_code == 200, r.text
    return body, r.json()["choices"][0]["text"]


def test_baseline_before_battery(baseline):
    assert baseline[1]


def post_raw(http, path: str, content: bytes, headers=None):
    h = {"Content-Type": "application/json", **(headers or {})}
    return http.post(path, content=content, headers=h)


@pytest.mark.parametrize("path,raw", [
    (COMPL, b'{"model": "m", "prompt": "hi", '),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}'),
    (COMPL, b'not json at all'),
    (COMPL, b'[1, 2, 3]'),
    (COMPL, b''),
])
def test_broken_json(http, path, raw):
    r = post_raw(http, path, raw)
    assert_openai_error(r.status_code, r.content, 400)


def _c(server, **kw):
    return {"model": server.model_id, "prompt": "Hello", "max_tokens": 4, **kw}


def _m(server, **kw):
    return {"model": server.model_id, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **kw}


# (endpoint, body builder, field the error must name)
BAD_FIELDS = [
    (COMPL, lambda s: _c(s, prompt=5), "prompt"),
    (COMPL, lambda s: _c(s, max_tokens="x"), "max_tokens"),
    (COMPL, lambda s: {"model": s.model_id, "max_tokens": 4}, "prompt"),
    (COMPL, lambda s: _c(s, temperature="hot"), "temperature"),
    (CHAT, lambda s: _m(s, messages="hi"), "messages"),
    (CHAT, lambda s: {"model": s.model_id, "max_tokens": 4}, "messages"),
    (CHAT, lambda s: _m(s, max_tokens="x"), "max_tokens"),
    # out of range
    (COMPL, lambda s: _c(s, temperature=-1), "temperature"),
    (COMPL, lambda s: _c(s, top_p=2), "top_p"),
    (COMPL, lambda s: _c(s, top_p=0), "top_p"),
    (COMPL, lambda s: _c(s, top_k=-5), "top_k"),
    (COMPL, lambda s: _c(s, n=0), None),
    (COMPL, lambda s: _c(s, logprobs=50), "logprobs"),
    (COMPL, lambda s: _c(s, presence_penalty=3), "presence_penalty"),
    (COMPL, lambda s: _c(s, frequency_penalty=-3), "frequency_penalty"),
    (COMPL, lambda s: _c(s, max_tokens=0), "max_tokens"),
    (CHAT, lambda s: _m(s, temperature=-1), "temperature"),
    (CHAT, lambda s: _m(s, top_p=2), "top_p"),
    (CHAT, lambda s: _m(s, logprobs=True, top_logprobs=50), "logprobs"),
    (CHAT, lambda s: _m(s, n=0), None),
    # stream_options only with stream (as vLLM)
    (COMPL, lambda s: _c(s, stream_options={"include_usage": True}), "stream"),
]


@pytest.mark.parametrize("path,make,field", BAD_FIELDS,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{i}" for i, (p, _, _) in enumerate(BAD_FIELDS)])
def test_bad_field(http, server, path, make, field):
    body = make(server)
    r = http.post(path, json=body)
    assert_openai_error(r.status_code, r.content, 400, mentions=(field,) if field else ())


def test_bad_field_in_stream_request_is_plain_error(http, server):
    # Validation happens before streaming starts: a JSON error with status 400,
    # not a 200 SSE stream carrying an error.
    r = http.post(COMPL, json=_c(server, stream=True, temperature=-1))
    assert_openai_error(r.status_code, r.content, 400, mentions=("temperature",))


def test_prompt_over_max_model_len(http, server, tokenize):
    prompt = "hello there " * 700
    n = len(tokenize(prompt=prompt))
    assert n > server.max_model_len
    r = http.post(COMPL, json=_c(server, prompt=prompt))
    err = assert_openai_error(r.status_code, r.content, 400)
    assert str(server.max_model_len) in err["message"], err
    assert str(n) in err["message"], f"message should give the prompt's {n} tokens: {err}"


def test_chat_over_max_model_len(http, server, tokenize):
    messages = [{"role": "user", "content": "tell me " * 800}]
    n = len(tokenize(messages=messages))
    r = http.post(CHAT, json=_m(server, messages=messages))
    err = assert_openai_error(r.status_code, r.content, 400)
    assert str(server.max_model_len) in err["message"] and str(n) in err["message"], err


def test_max_tokens_over_context(http, server):
    r = http.post(COMPL, json=_c(server, max_tokens=server.max_model_len * 4))
    err = assert_openai_error(r.status_code, r.content, 400)
    assert str(server.max_model_len) in err["message"], err


def test_unknown_model_404(http):
    r = http.post(COMPL, json={"model": "no-such-model", "prompt": "hi", "max_tokens": 2})
    assert_openai_error(r.status_code, r.content, 404, mentions=("no-such-model",))
    r = http.post(CHAT, json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(r.status_code, r.content, 404, mentions=("no-such-model",))


def test_unknown_route_404(http):
    r = http.get("/v1/nothing-here")
    assert_openai_error(r.status_code, r.content, 404)


def _raw_http(server, head: bytes, body_len: int, chunk: bytes) -> bytes:
    """Send a request whose body may be cut short by the server; read its answer."""
    s = socket.create_connection((server.host, server.port), timeout=30)
    try:
        s.sendall(head)
        sent = 0
        try:
            while sent < body_len:
                n = min(len(chunk), body_len - sent)
                s.sendall(chunk[:n])
                sent += n
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed: read what it said
        data = b""
        s.settimeout(30)
        try:
            while True:
                part = s.recv(65536)
                if not part:
                    break
                data += part
                if b"\r\n\r\n" in data:
                    hdr, _, rest = data.partition(b"\r\n\r\n")
                    for line in hdr.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            if len(rest) >= int(line.split(b":")[1]):
                                return data
        except (ConnectionResetError, socket.timeout):
            pass
        return data
    finally:
        s.close()


def test_huge_body_413(server):
    prefix = b'{"prompt": "'
    total = HUGE_BODY_BYTES
    head = (f"POST {COMPL} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            f"Authorization: Bearer {server.api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {total}\r\nConnection: close\r\n\r\n").encode() + prefix
    data = _raw_http(server, head, total - len(prefix), b"a" * 65536)
    assert data.startswith(b"HTTP/1.1 "), f"no HTTP response to a {total}-byte body: {data[:200]!r}"
    status = int(data.split(b" ", 2)[1])
    body = data.partition(b"\r\n\r\n")[2]
    assert_openai_error(status, body, 413)


def test_huge_body_413_chunked(http, server):
    # No Content-Length: the limit must hold while streaming the body in.
    def gen():
        yield b'{"prompt": "'
        for _ in range(HUGE_BODY_BYTES // 65536):
            yield b"a" * 65536
        yield b'"}'
    try:
        r = http.post(COMPL, content=gen(), headers={"Content-Type": "application/json"})
    except Exception as e:  # noqa: BLE001 - the write may fail once the server answered
        pytest.fail(f"no 413 response to a chunked {HUGE_BODY_BYTES}-byte body: {e!r}")
    assert_openai_error(r.status_code, r.content, 413)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic eDp5"},
                                     {"Authorization": "Bearer"}],
                         ids=["missing", "wrong", "basic", "empty"])
def test_api_key_required(server, headers):
    httpx = need("httpx")
    for method, path, body in [("GET", "/v1/models", None),
                               ("POST", COMPL, {"model": server.model_id, "prompt": "hi", "max_tokens": 2}),
                               ("POST", CHAT, {"model": server.model_id,
                                               "messages": [{"role": "user", "content": "hi"}]}),
                               ("POST", "/tokenize", {"prompt": "hi"})]:
        # A fresh connection each time: connection reuse after a rejected POST is
        # checked on its own in test_keep_alive_after_early_401.
        with httpx.Client(base_url=server.http_url, timeout=30) as c:
            r = c.request(method, path, json=body, headers=headers)
        assert_openai_error(r.status_code, r.content, 401)
    with httpx.Client(base_url=server.http_url, timeout=30) as c:
        r = c.get("/v1/models", headers={"Authorization": f"Bearer {server.api_key}"})
    assert r.status_code == 200


def test_keep_alive_after_early_401(server):
    """A POST rejected before its body arrived (401) must not leave the client a
    dead keep-alive connection: either the connection serves the next request,
    or the response says `Connection: close`. Clients (httpx, requests, the
    openai SDK) reuse the connection otherwise and fail with 'Server
    disconnected without sending a response'."""
    body = b'{"model": "x", "prompt": "hi", "max_tokens": 2}'
    s = socket.create_connection((server.host, server.port), timeout=10)
    try:
        s.sendall(f"POST {COMPL} HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.2)  # the body comes later, as from a client that writes headers first
        s.sendall(body)
        first = _read_response(s)
        assert first.startswith(b"HTTP/1.1 401"), first[:200]
        head = first.partition(b"\r\n\r\n")[0].lower()
        if b"connection: close" in head:
            return
        time.sleep(0.2)
        try:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
            second = _read_response(s)
        except OSError as e:
            second = repr(e).encode()
        assert second.startswith(b"HTTP/1.1 200"), (
            "after a 401 sent before the request body was read, the server closed the keep-alive "
            f"connection without `Connection: close`; the next request got {second[:200]!r}")
    finally:
        s.close()


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        part = s.recv(65536)
        if not part:
            return data
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(rest) < length:
        part = s.recv(65536)
        if not part:
            break
        rest += part
    return head + b"\r\n\r\n" + rest


def test_openai_sdk_wrong_key_raises_authentication_error(server):
    openai = need("openai")
    bad = openai.OpenAI(base_url=server.http_url + "/v1", api_key="not-the-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.completions.create(model=server.model_id, prompt="hi", max_tokens=2)
    assert ei.value.status_code == 401


def test_unknown_fields_ignored(http, server, baseline):
    body, text = baseline
    r = http.post(COMPL, json={**body, "definitely_not_a_field": {"x": [1, 2]}, "another_one": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text
    r = http.post(CHAT, json=_m(server, not_a_field=True, metadata={"a": "b"}))
    assert r.status_code == 200, r.text


def test_zz_server_still_serves_after_battery(http, server, baseline):
    body, text = baseline
    r = http.post(COMPL, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text
    assert r.json()["usage"]["completion_tokens"] == 10
    assert http.get("/health").status_code == 200


# ------------------------------------------------------------------ a second, small server


@pytest.fixture(scope="module")
def small_server():
    """One generation at a time, and an alias for the model name."""
    from e2e_server import SetupError, start_server, stop_server
    srv, problem = None, None
    try:
        srv = start_server(["--max-concurrent-requests", "1", "--served-model-name", "e2e-alias"])
    except SetupError as e:
        problem = str(e)
    if problem:
        pytest.fail(problem, pytrace=False)
    yield srv
    stop_server(srv)


def test_served_model_name(small_server):
    httpx = need("httpx")
    with httpx.Client(base_url=small_server.http_url, headers=small_server.auth, timeout=60) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["e2e-alias"]
        r = c.post(COMPL, json={"model": "e2e-alias", "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "e2e-alias", r.text


def test_overloaded_503_with_retry_after(small_server):
    httpx = need("httpx")
    srv = small_server
    long = {"model": "e2e-alias", "prompt": "Count to a thousand:", "max_tokens": srv.max_model_len - 64,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=srv.http_url, headers=srv.auth, timeout=60) as busy, \
            httpx.Client(base_url=srv.http_url, headers=srv.auth, timeout=60) as other:
        with busy.stream("POST", COMPL, json=long) as stream:
            assert stream.status_code == 200
            # Keep the iterator: a dropped one closes the response, which aborts the generation.
            raw = stream.iter_raw()
            first = next(raw)  # the first generation is under way
            assert first.startswith(b"data: {"), first
            r = other.post(COMPL, json={"model": "e2e-alias", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503, (f"a second generation was admitted while the only slot "
                                          f"(--max-concurrent-requests 1) streams {first[:150]!r}: {r.text}")
            assert_openai_error(r.status_code, r.content, 503)
            ra = r.headers.get("retry-after")
            assert ra is not None and ra.strip().isdigit(), f"503 without a Retry-After in seconds: {r.headers}"
            assert other.get("/health").status_code == 200, "busy is not unhealthy"
        # The slot comes back once the first client went away.
        deadline = time.monotonic() + 10
        while True:
            r = other.post(COMPL, json={"model": "e2e-alias", "prompt": "Hi", "max_tokens": 2})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200, f"still {r.status_code} 10s after the busy client left: {r.text}"
