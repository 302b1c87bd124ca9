"""Every HTTP version ferry speaks, with clients nobody here wrote: curl
(HTTP/1.1, h2c prior knowledge, h2 over TLS) and aioquic (HTTP/3 over QUIC)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from e2e_util import completion_stream_text, need, spki_pin_of_pem, sse_json_events

pytestmark = pytest.mark.timeout(120)

PROMPT = "The quick brown fox"
SEEDED = {"prompt": "In the morning I like to", "max_tokens": 20, "temperature": 0.8, "seed": 4242,
          "ignore_eos": True}


def _curl_bin() -> str:
    c = shutil.which("curl")
    if not c:
        pytest.fail("curl is not installed (apt-get install curl)", pytrace=False)
    return c


def curl(server, url: str, *opts: str, body=None, timeout: int = 60) -> tuple[int, dict, str, str]:
    """Run curl; return (status, headers lower-cased, body, http_version)."""
    with tempfile.TemporaryDirectory() as d:
        hdr_file = os.path.join(d, "headers")
        cmd = [_curl_bin(), "-sS", "-N", "--max-time", str(timeout), "-D", hdr_file,
               "-H", f"Authorization: Bearer {server.api_key}",
               "-w", "\n@@%{http_code} %{http_version}", *opts]
        if body is not None:
            cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        cmd.append(url)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
        assert p.returncode == 0, f"curl failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}"
        out, _, tail = p.stdout.rpartition("\n@@")
        code, version = tail.split()
        headers = {}
        with open(hdr_file) as f:
            for line in f:
                if ":" in line and not line.startswith("HTTP/"):
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
        return int(code), headers, out, version


def check_alt_svc(server, headers: dict) -> None:
    alt = headers.get("alt-svc")
    assert alt, f"no alt-svc header in {headers}"
    m = re.search(r'h3="[^"]*:(\d+)"', alt)
    assert m and int(m.group(1)) == server.tls_port, f"alt-svc {alt!r} does not offer h3 on :{server.tls_port}"


def completion_body(server, **kw) -> dict:
    return {"model": server.model_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            **kw}


@pytest.fixture(scope="module")
def greedy_text(http, server) -> str:
    r = http.post("/v1/completions", json=completion_body(server))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def cert_path(server) -> str:
    assert server.cert_path, (f"no certificate (*.pem with BEGIN CERTIFICATE) found under FERRY_STATE_DIR "
                              f"{server.state_dir}")
    return server.cert_path


# ------------------------------------------------------------------ TLS material


def test_spki_pin_printed_matches_cert_file(server, cert_path):
    assert server.spki_pin, "no line mentioning SPKI with a base64 SHA-256 pin on stderr:\n" + server.stderr_tail(30)
    assert spki_pin_of_pem(cert_path) == server.spki_pin


# ------------------------------------------------------------------ curl, plain port


def test_curl_http11_json(server, greedy_text):
    code, h, body, ver = curl(server, server.http_url + "/v1/completions", "--http1.1", body=completion_body(server))
    assert (code, ver) == (200, "1.1"), body
    assert h.get("content-type", "").startswith("application/json")
    j = json.loads(body)
    assert j["choices"][0]["text"] == greedy_text
    assert j["usage"]["completion_tokens"] == 8
    check_alt_svc(server, h)


def test_curl_h2c_prior_knowledge_json(server, greedy_text):
    code, h, body, ver = curl(server, server.http_url + "/v1/completions", "--http2-prior-knowledge",
                              body=completion_body(server))
    assert (code, ver) == (200, "2"), body
    assert json.loads(body)["choices"][0]["text"] == greedy_text
    check_alt_svc(server, h)


@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"])
def test_curl_plain_sse_stream(server, greedy_text, flag):
    code, h, body, ver = curl(server, server.http_url + "/v1/completions", flag,
                              body=completion_body(server, stream=True))
    assert code == 200 and ver == ("1.1" if flag == "--http1.1" else "2"), (code, ver)
    assert h.get("content-type", "").startswith("text/event-stream"), h
    events = sse_json_events(body)
    assert all(e["object"] == "text_completion" for e in events)
    assert completion_stream_text(events) == greedy_text
    check_alt_svc(server, h)


def test_curl_get_endpoints_h2c(server):
    code, h, body, ver = curl(server, server.http_url + "/metrics", "--http2-prior-knowledge")
    assert (code, ver) == (200, "2")
    assert "vllm:num_requests_running" in body and "vllm:kv_cache_usage_perc" in body
    code, _, body, _ = curl(server, server.http_url + "/health", "--http1.1")
    assert code == 200


# ------------------------------------------------------------------ curl, TLS


@pytest.mark.parametrize("trust", ["cacert", "insecure"])
def test_curl_https_h2_json(server, cert_path, greedy_text, trust):
    opts = ["--cacert", cert_path] if trust == "cacert" else ["-k"]
    code, h, body, ver = curl(server, server.https_url + "/v1/completions", "--http2", *opts,
                              body=completion_body(server))
    assert code == 200, body
    assert ver == "2", f"ALPN should pick h2 over TLS, curl used HTTP/{ver}"
    assert json.loads(body)["choices"][0]["text"] == greedy_text
    check_alt_svc(server, h)


def test_curl_https_localhost_name(server, cert_path):
    # The self-signed certificate covers the name localhost too.
    url = f"https://localhost:{server.tls_port}/v1/models"
    code, h, body, ver = curl(server, url, "--http2", "--cacert", cert_path,
                              "--resolve", f"localhost:{server.tls_port}:127.0.0.1")
    assert (code, ver) == (200, "2"), body
    assert json.loads(body)["data"][0]["id"] == server.model_id


def test_curl_https_http11_fallback(server, cert_path):
    code, h, body, ver = curl(server, server.https_url + "/v1/models", "--http1.1", "--cacert", cert_path)
    assert (code, ver) == (200, "1.1"), body
    check_alt_svc(server, h)


def test_curl_https_h2_sse_stream(server, cert_path, greedy_text):
    code, h, body, ver = curl(server, server.https_url + "/v1/completions", "--http2", "--cacert", cert_path,
                              body=completion_body(server, stream=True))
    assert (code, ver) == (200, "2")
    events = sse_json_events(body)
    assert completion_stream_text(events) == greedy_text
    check_alt_svc(server, h)


def test_curl_rejects_untrusted_cert(server):
    # Without -k or --cacert, curl must refuse the self-signed certificate: the
    # TLS port really is TLS with this certificate, not plain text.
    p = subprocess.run([_curl_bin(), "-sS", "--max-time", "20", server.https_url + "/health"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 60, (p.returncode, p.stderr)


# ------------------------------------------------------------------ HTTP/3 (aioquic)


def run(coro):
    return asyncio.run(coro)


def test_h3_json_completion_cafile(server, cert_path, greedy_text):
    need("aioquic")
    from e2e_h3 import h3_connect

    async def go():
        async with h3_connect(server.host, server.tls_port, cafile=cert_path) as c:
            r = await c.request("POST", "/v1/completions", headers=server.auth, json_body=completion_body(server))
            m = await c.request("GET", "/v1/models", headers=server.auth)
            return r, m

    r, m = run(go())
    assert r.alpn == "h3", f"QUIC ALPN was {r.alpn!r}, not h3"
    assert r.status == 200, r.body
    assert r.headers.get("content-type", "").startswith("application/json")
    j = r.json()
    assert j["choices"][0]["text"] == greedy_text
    assert j["usage"]["completion_tokens"] == 8
    assert m.status == 200 and m.json()["data"][0]["id"] == server.model_id


def test_h3_pin_trust_and_wrong_pin_refused(server):
    need("aioquic")
    from e2e_h3 import H3Error, h3_connect
    assert server.spki_pin, "no SPKI pin printed by the server"

    async def good():
        async with h3_connect(server.host, server.tls_port, pin=server.spki_pin) as c:
            return await c.request("GET", "/health", headers=server.auth)

    async def bad():
        async with h3_connect(server.host, server.tls_port, pin="A" * 43 + "=") as c:
            return await c.request("GET", "/health", headers=server.auth)

    r = run(good())
    assert r.alpn == "h3" and r.status == 200
    with pytest.raises(H3Error, match="does not match"):
        run(bad())


def test_h3_stream_equals_h1_nonstream_same_seed(server, http):
    need("aioquic")
    from e2e_h3 import h3_connect

    body = {"model": server.model_id, **SEEDED}
    r1 = http.post("/v1/completions", json=body)
    assert r1.status_code == 200 and r1.http_version == "HTTP/1.1", r1.text
    h1_text = r1.json()["choices"][0]["text"]

    async def go():
        async with h3_connect(server.host, server.tls_port, pin=server.spki_pin) as c:
            sid, head, chunks = await c.stream("/v1/completions", {**body, "stream": True}, headers=server.auth)
            data = b"".join([x async for x in chunks])
            return head, data

    head, data = run(go())
    assert head.alpn == "h3" and head.status == 200, head
    assert head.headers.get("content-type", "").startswith("text/event-stream")
    events = sse_json_events(data.decode())
    assert len(events) >= 2, "a 20-token stream should come in several events"
    assert completion_stream_text(events) == h1_text


def test_h3_chat_and_error_shape(server, cert_path):
    need("aioquic")
    from e2e_h3 import h3_connect

    async def go():
        async with h3_connect(server.host, server.tls_port, cafile=cert_path) as c:
            ok = await c.request("POST", "/v1/chat/completions", headers=server.auth, json_body={
                "model": server.model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                "temperature": 0})
            bad = await c.request("POST", "/v1/completions", headers=server.auth,
                                  json_body={"model": "no-such-model", "prompt": "x", "max_tokens": 2})
            unauth = await c.request("GET", "/v1/models")
            return ok, bad, unauth

    ok, bad, unauth = run(go())
    assert ok.status == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert bad.status == 404 and bad.json()["error"]["message"]
    assert unauth.status == 401 and "error" in unauth.json()
