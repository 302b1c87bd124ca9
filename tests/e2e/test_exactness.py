"""Exactness under pressure: sixteen 300-token streams at once in a KV cache
that holds about two of them, so the scheduler preempts and recomputes them
again and again, give each stream the text it gives alone: greedy, and
sampled at temperature 0.8 with a seed. Recompute computes every position
with decode's bits, and a seeded draw depends only on the seed and the
position in the output."""

from __future__ import annotations

import concurrent.futures
import re

import pytest

from e2e_server import start_server, stop_server
from e2e_util import need

httpx = need("httpx")

TOKENS = 300
PROMPTS = [f"Story {i}: " + p for i, p in enumerate([
    "The lighthouse keeper", "In the year 3000", "A recipe for bread", "The history of Rome",
    "Dear diary, today", "The rules of chess", "Once upon a time", "How rivers form",
    "The old clock tower", "A letter to my future self", "Why the sky is blue", "The last dragon",
    "Notes on gardening", "The train station at night", "A guide to the stars", "The baker's secret",
])]


@pytest.fixture(scope="module")
def tight():
    # 20 MB of KV cache holds about 860 tokens of the default model: two of
    # these streams at a time.
    srv = start_server(["--kv-cache-memory-bytes", "20000000"], max_model_len=800, max_num_seqs=16)
    try:
        r = httpx.get(srv.http_url + "/v1/models", headers=srv.auth, timeout=10)
        srv.model_id = r.json()["data"][0]["id"]
        yield srv
    finally:
        stop_server(srv)


def complete(srv, prompt: str, **extra) -> str:
    payload = {"model": srv.model_id, "prompt": prompt, "max_tokens": TOKENS, "ignore_eos": True, **extra}
    r = httpx.post(srv.http_url + "/v1/completions", json=payload, headers=srv.auth, timeout=600)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == TOKENS, body["usage"]
    return body["choices"][0]["text"]


def preemptions(srv) -> float:
    text = httpx.get(srv.http_url + "/metrics", headers=srv.auth, timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(r"^vllm:num_preemptions_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.mark.heavy
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_sixteen_streams_preempted_again_and_again_give_their_single_stream_text(tight, mode):
    def params(i: int) -> dict:
        return {"temperature": 0} if mode == "greedy" else {"temperature": 0.8, "seed": 4242 + i}

    # Alone: one at a time, nothing else in the cache, no preemption.
    alone = [complete(tight, p, **params(i)) for i, p in enumerate(PROMPTS)]
    before = preemptions(tight)
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda ip: complete(tight, ip[1], **params(ip[0])), enumerate(PROMPTS)))
    assert preemptions(tight) - before >= 16, "the cache should have forced many preemptions"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a == b, f"stream {i} ({mode}) differs from its single-stream text:\n{a!r}\n{b!r}"
