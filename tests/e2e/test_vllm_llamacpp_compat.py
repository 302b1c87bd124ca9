"""The last shapes matched to vLLM's and llama.cpp's servers, against the real
model: `prompt_logprobs` null on every completion choice (and on the chat
response), usage in streamed chunks under `stream_options`, vLLM's messages
for an out-of-range seed, several bad logit_bias keys and an empty stop
string, llama.cpp's /tokenize (`content`, `add_special`, `with_pieces`) and
/detokenize (`content`), and vLLM's newer metric families."""

from __future__ import annotations

import pytest

from e2e_util import need, sse_json_events

pytestmark = pytest.mark.timeout(180)


def error_of(http, path, body):
    r = http.post(path, json=body)
    assert r.status_code == 400, f"{body} -> {r.status_code} {r.text}"
    return r.json()["error"]


# ------------------------------------------------------------------ prompt_logprobs


def test_prompt_logprobs_is_null_unless_asked(http, server):
    r = http.post("/v1/completions", json={"model": server.model_id, "prompt": ["a", "b"], "max_tokens": 2})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert "prompt_logprobs" in c and c["prompt_logprobs"] is None, c
    r = http.post("/v1/chat/completions", json={"model": server.model_id, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    assert "prompt_logprobs" in r.json() and r.json()["prompt_logprobs"] is None
    assert "prompt_logprobs" not in r.json()["choices"][0]


# ------------------------------------------------------------------ stream usage


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_on_every_chunk(http, server, path):
    body = {"model": server.model_id, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body |= {"prompt": "Count: one, two,"} if "chat" not in path else {"messages": [{"role": "user", "content": "Count."}]}
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    events = sse_json_events(r.text)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    prompt = last["usage"]["prompt_tokens"]
    for e in chunks:
        u = e["usage"]
        assert u["prompt_tokens"] == prompt and u["total_tokens"] == prompt + u["completion_tokens"], e
    finishing = [e for e in chunks if e["choices"][0].get("finish_reason")]
    assert len(finishing) == 1 and finishing[0]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_include_usage_alone_adds_one_final_chunk(http, server, path):
    body = {"model": server.model_id, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    body |= {"prompt": "Hello"} if "chat" not in path else {"messages": [{"role": "user", "content": "Hello"}]}
    events = sse_json_events(http.post(path, json=body).text)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0
    assert all("usage" not in e or e["usage"] is None for e in events[:-1])


# ------------------------------------------------------------------ vLLM's messages


def test_seed_out_of_a_64_bit_int_is_refused(http, server):
    base = {"model": server.model_id, "prompt": "a", "max_tokens": 1}
    err = error_of(http, "/v1/completions", base | {"seed": 2**63})
    assert "less than or equal to 9223372036854775807" in err["message"] and err["param"] == "seed"
    err = error_of(http, "/v1/completions", base | {"seed": -(2**63) - 1})
    assert "greater than or equal to -9223372036854775808" in err["message"]
    for ok in (2**63 - 1, -(2**63)):
        assert http.post("/v1/completions", json=base | {"seed": ok}).status_code == 200


def test_logit_bias_names_every_bad_key(http, server):
    err = error_of(http, "/v1/completions", {"model": server.model_id, "prompt": "a", "max_tokens": 1,
                                             "logit_bias": {"5": 1, "999999999": 1, "-1": 1}})
    assert "token_id(s) [" in err["message"] and "in logit_bias contain out-of-vocab token ids" in err["message"]
    assert "999999999" in err["message"] and "-1" in err["message"] and err["param"] == "logit_bias"


@pytest.mark.parametrize("stop", ["", ["x", ""]])
def test_an_empty_stop_string_is_refused(http, server, stop):
    for path, body in (("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})):
        err = error_of(http, path, {"model": server.model_id, "max_tokens": 1, "stop": stop, **body})
        assert err["message"] == "stop cannot contain an empty string." and err["param"] == "stop"


# ------------------------------------------------------------------ llama.cpp's /tokenize


def test_llamacpp_tokenize_content_and_pieces(http, server, tokenize):
    # llama.cpp's tools/server/tests/unit/test_tokenize.py, on ferry.
    text = "What is the capital of France ?"
    r = http.post("/tokenize", json={"content": text})
    assert r.status_code == 200, r.text
    assert r.json() == {"tokens": tokenize(prompt=text, add_special_tokens=False)}
    r = http.post("/tokenize", json={"content": text, "add_special": True})
    assert r.json()["tokens"] == tokenize(prompt=text, add_special_tokens=True)
    r = http.post("/tokenize", json={"content": text, "with_pieces": True})
    tokens = r.json()["tokens"]
    assert all(isinstance(t["id"], int) and isinstance(t["piece"], (str, list)) for t in tokens)
    assert "".join(t["piece"] for t in tokens).strip() == text
    # A piece that is no valid UTF-8 by itself comes as a list of bytes.
    text = "This is a test string with unicode 媽 and emoji 🤗"
    tokens = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    raw = b"".join(t["piece"].encode() if isinstance(t["piece"], str) else bytes(t["piece"]) for t in tokens)
    assert raw.decode().strip() == text
    r = http.post("/detokenize", json={"tokens": [t["id"] for t in tokens]})
    assert r.status_code == 200 and r.json()["content"] == r.json()["prompt"]
    assert r.json()["content"].strip() == text
    # A request that names its model is a vLLM client's: vLLM's answer exactly.
    r = http.post("/detokenize", json={"model": r_model(http), "tokens": [t["id"] for t in tokens]})
    assert r.status_code == 200 and set(r.json()) == {"prompt"}


# ------------------------------------------------------------------ metrics


def test_waiting_by_reason_and_iteration_tokens(http, server, tokenize):
    parser = need("prometheus_client.parser")

    def families():
        return {f.name: f for f in parser.text_string_to_metric_families(http.get("/metrics").text)}

    def iteration_sum(f):
        return next(s.value for s in f["vllm:iteration_tokens_total"].samples if s.name.endswith("_sum"))

    before = iteration_sum(families())
    prompt = "Count: one, two, three,"
    r = http.post("/v1/completions", json={"model": server.model_id, "prompt": prompt, "max_tokens": 4,
                                           "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    f = families()
    # vLLM's IterationStats: the whole prompt (cached or not) plus each token made.
    assert iteration_sum(f) - before == len(tokenize(prompt=prompt)) + 4
    by_reason = {s.labels["reason"]: s.value for s in f["vllm:num_requests_waiting_by_reason"].samples}
    assert set(by_reason) == {"capacity", "deferred"} and by_reason["deferred"] == 0
    waiting = sum(s.value for s in f["vllm:num_requests_waiting"].samples)
    assert sum(by_reason.values()) == waiting


def r_model(http) -> str:
    """The served model's name, as /v1/models lists it."""
    return http.get("/v1/models").json()["data"][0]["id"]
