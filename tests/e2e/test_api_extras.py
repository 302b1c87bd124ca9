"""The OpenAI and vLLM request fields beyond the core ones, against the real
model: logit_bias, echo + logprobs and vLLM's prompt_logprobs, the prefix
cache in usage, streamed chat chunks in OpenAI's order, and the chat
template fields (add_generation_prompt, continue_final_message,
chat_template_kwargs, chat_template)."""

from __future__ import annotations

import json
import math

import pytest

from e2e_server import start_server, stop_server
from e2e_util import need

pytestmark = pytest.mark.timeout(180)


def complete(http, server, **body):
    r = http.post("/v1/completions", json={"model": server.model_id, **body})
    assert r.status_code == 200, r.text
    return r.json()


def error_of(http, path, body):
    r = http.post(path, json=body)
    assert r.status_code == 400, f"{body} -> {r.status_code} {r.text}"
    err = r.json()["error"]
    assert err["message"] and err["type"] == "BadRequestError", err
    return err


# ------------------------------------------------------------------ logit_bias


def test_logit_bias_forces_and_bans_tokens_greedy(http, server, tokenize):
    prompt = "The capital of France is"
    free = complete(http, server, prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
    free_ids = [t for t in tokenize(prompt="".join(free["choices"][0]["logprobs"]["tokens"]), add_special_tokens=False)]
    first = free_ids[0]
    # Ban the greedy first token: the first token must change.
    banned = complete(http, server, prompt=prompt, max_tokens=1, temperature=0, logprobs=0,
                      logit_bias={str(first): -100})
    assert banned["choices"][0]["logprobs"]["tokens"][0] != free["choices"][0]["logprobs"]["tokens"][0]
    # Force one token: every step picks it.
    forced_id = tokenize(prompt=" banana", add_special_tokens=False)[0]
    forced = complete(http, server, prompt=prompt, max_tokens=5, temperature=0, ignore_eos=True,
                      logit_bias={str(forced_id): 100})
    piece = http.post("/detokenize", json={"model": server.model_id, "tokens": [forced_id]}).json()["prompt"]
    assert forced["choices"][0]["text"] == piece * 5, forced["choices"][0]["text"]
    # Sampling too: a +100 bias dominates the distribution.
    sampled = complete(http, server, prompt=prompt, max_tokens=5, temperature=1.0, seed=3, ignore_eos=True,
                       logit_bias={str(forced_id): 100})
    assert sampled["choices"][0]["text"] == piece * 5


def test_logit_bias_on_chat(oai, server, tokenize):
    forced_id = tokenize(prompt="Yes", add_special_tokens=False)[0]
    r = oai.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=3, temperature=0, logit_bias={str(forced_id): 100},
                                    extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == "Yes" * 3


@pytest.mark.parametrize("bias", [
    {"abc": 1}, {"1.5": 2}, {"5": "big"}, {"99999999": 1}, {"-3": 1}, [1, 2], "x",
])
def test_invalid_logit_bias_maps_are_400(http, server, bias):
    err = error_of(http, "/v1/completions", {"model": server.model_id, "prompt": "a", "max_tokens": 1, "logit_bias": bias})
    assert "logit_bias" in (err.get("param") or "") + err["message"], err


# ------------------------------------------------------------------ prompt logprobs


def test_echo_logprobs_equal_a_separate_scoring(http, server, tokenize):
    ids = tokenize(prompt="Paris is the capital of France.", add_special_tokens=False)
    r = complete(http, server, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = r["choices"][0]["logprobs"]
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == n + 1  # the prompt, then the generated token
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:n])
    assert r["choices"][0]["text"].startswith("Paris is the capital of France.")
    # Each prompt token scored alone: generate it after its prefix, forced by
    # a +100 bias (logprobs come from the raw logits, before the bias).
    for p in range(1, n):
        one = complete(http, server, prompt=ids[:p], max_tokens=1, temperature=0, logprobs=1,
                       logit_bias={str(ids[p]): 100})
        want = one["choices"][0]["logprobs"]["token_logprobs"][0]
        got = lp["token_logprobs"][p]
        assert math.isclose(got, want, abs_tol=2e-3), f"position {p}: echo {got} vs scoring {want}"
        top = lp["top_logprobs"][p]
        assert len(top) >= 2 and all(v <= 0 for v in top.values())


def test_echo_logprobs_stream_and_n(http, server, tokenize):
    ids = tokenize(prompt="One two three four", add_special_tokens=False)
    body = {"model": server.model_id, "prompt": ids, "max_tokens": 2, "temperature": 0.8, "seed": 1,
            "n": 3, "echo": True, "logprobs": 1, "stream": True}
    firsts = {}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            for ch in c["choices"]:
                firsts.setdefault(ch["index"], ch)
    assert sorted(firsts) == [0, 1, 2]
    for ch in firsts.values():
        tl = ch["logprobs"]["token_logprobs"]
        assert tl[0] is None and all(isinstance(x, float) for x in tl[1:len(ids)]), tl


def test_vllm_prompt_logprobs(http, server, tokenize):
    ids = tokenize(prompt="The sky is blue", add_special_tokens=False)
    r = complete(http, server, prompt=ids, max_tokens=1, temperature=0, prompt_logprobs=3)
    plp = r["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        entry = plp[p]
        assert str(ids[p]) in entry, (p, entry)  # the prompt's own token is always there
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[0] >= 1 and all(isinstance(v["decoded_token"], str) for v in entry.values())
        assert len(entry) in (3, 4)
    r = http.post("/v1/chat/completions", json={"model": server.model_id, "messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 1, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    assert r.json()["prompt_logprobs"][0] is None and len(r.json()["prompt_logprobs"]) > 2
    error_of(http, "/v1/completions", {"model": server.model_id, "prompt": "a", "max_tokens": 1, "prompt_logprobs": 21})


# ------------------------------------------------------------------ usage details


def test_cached_tokens_in_usage(oai, server):
    text = "Ferry keeps a prefix cache. " * 12
    first = oai.completions.create(model=server.model_id, prompt=text, max_tokens=1, temperature=0)
    again = oai.completions.create(model=server.model_id, prompt=text, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens > 0, again.usage
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    chat = oai.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": text}],
                                       max_tokens=1, temperature=0)
    chat2 = oai.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": text}],
                                        max_tokens=1, temperature=0)
    assert chat2.usage.prompt_tokens_details.cached_tokens > 0, (chat.usage, chat2.usage)


# ------------------------------------------------------------------ streamed chat order


def test_streamed_chat_ends_with_an_empty_delta_carrying_finish_reason(oai, server):
    stream = oai.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "Say hi"}],
                                         max_tokens=8, temperature=0, stream=True, n=1,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    finish = chunks[-2]
    assert finish.choices[0].finish_reason in ("stop", "length")
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    for c in chunks[:-2]:
        assert all(ch.finish_reason is None for ch in c.choices)
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    full = oai.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "Say hi"}],
                                       max_tokens=8, temperature=0)
    assert text == full.choices[0].message.content


# ------------------------------------------------------------------ chat template fields


def test_continue_final_message_and_its_exclusion(http, server, tokenize):
    msgs = [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "1, 2, 3,"}]
    open_ids = tokenize(messages=msgs, add_generation_prompt=False, continue_final_message=True)
    closed_ids = tokenize(messages=msgs, add_generation_prompt=False)
    text = http.post("/detokenize", json={"model": server.model_id, "tokens": open_ids}).json()["prompt"]
    assert text.endswith("1, 2, 3,"), text
    assert len(closed_ids) > len(open_ids)
    r = http.post("/v1/chat/completions", json={"model": server.model_id, "messages": msgs, "max_tokens": 3,
                                                "temperature": 0, "add_generation_prompt": False,
                                                "continue_final_message": True})
    assert r.status_code == 200, r.text
    err = error_of(http, "/v1/chat/completions", {"model": server.model_id, "messages": msgs, "max_tokens": 1,
                                                   "add_generation_prompt": True, "continue_final_message": True})
    assert "continue_final_message" in err["message"]


def test_add_generation_prompt_false_leaves_no_assistant_header(tokenize):
    msgs = [{"role": "user", "content": "Hi"}]
    assert len(tokenize(messages=msgs, add_generation_prompt=True)) > len(tokenize(messages=msgs, add_generation_prompt=False))


def test_chat_template_kwargs_are_accepted(http, server):
    r = http.post("/v1/chat/completions", json={"model": server.model_id, "messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
    error_of(http, "/v1/chat/completions", {"model": server.model_id, "messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 1, "chat_template_kwargs": [1]})


def test_a_request_template_needs_the_trust_flag(http, server):
    body = {"model": server.model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    err = error_of(http, "/v1/chat/completions", body)
    assert "--trust-request-chat-template" in err["message"]


@pytest.fixture(scope="module")
def trusting_server():
    srv = start_server(["--trust-request-chat-template"])
    try:
        yield srv
    finally:
        stop_server(srv)


def test_a_trusted_request_template_is_used(trusting_server):
    httpx = need("httpx")
    srv = trusting_server
    with httpx.Client(base_url=srv.http_url, headers=srv.auth, timeout=60) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        tmpl = "{% for m in messages %}[{{ m.role }}|{{ m.content }}|{{ flavour }}]{% endfor %}"
        r = c.post("/tokenize", json={"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                      "chat_template": tmpl, "chat_template_kwargs": {"flavour": "mint"}})
        assert r.status_code == 200, r.text
        text = c.post("/detokenize", json={"model": model, "tokens": r.json()["tokens"]}).json()["prompt"]
        assert text == "[user|Hi|mint]", text
        r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 1, "chat_template": "{% for %}"})
        assert r.status_code == 400, r.text


# ------------------------------------------------------------------ metrics

# vLLM's families as `vllm serve` exports them (v1 engine, no LoRA or
# speculative decoding), with the type prometheus_client's parser reports
# (counter families lose their `_total`).
VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_waiting_by_reason": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:iteration_tokens_total": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_max_num_generation_tokens": "histogram",
    "vllm:request_params_n": "histogram",
    "vllm:request_params_max_tokens": "histogram",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
}


def test_metrics_have_vllms_names_types_and_labels(http, server):
    parser = need("prometheus_client.parser")
    complete(http, server, prompt="Count: one, two,", max_tokens=4, temperature=0, n=1)
    r = http.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
    for name, kind in VLLM_FAMILIES.items():
        assert name in families, f"{name} missing"
        assert families[name].type == kind, (name, families[name].type)
        for s in families[name].samples:
            assert s.labels.get("model_name") == server.model_id and s.labels.get("engine") == "0", s
    phases = {s.name: s.value for f in ("vllm:request_queue_time_seconds", "vllm:request_decode_time_seconds",
                                          "vllm:iteration_tokens_total") for s in families[f].samples}
    assert phases["vllm:request_queue_time_seconds_count"] >= 1
    assert phases["vllm:request_decode_time_seconds_count"] >= 1
    assert phases["vllm:iteration_tokens_total_count"] >= 4  # a prefill and decode steps
    info = families["vllm:cache_config_info"].samples[0]
    assert info.value == 1 and int(info.labels["block_size"]) > 0 and int(info.labels["num_gpu_blocks"]) > 0
    les = [float(s.labels["le"]) for s in families["vllm:request_params_n"].samples if s.name.endswith("_bucket")]
    assert les == [1, 2, 5, 10, 20, math.inf]


# ------------------------------------------------------------------ Responses API


def test_responses_create(oai, server):
    r = oai.responses.create(model=server.model_id, input="Say hello.", instructions="Be brief.",
                             max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status in ("completed", "incomplete")
    assert r.output_text and r.output[0].type == "message"
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 8
    chat = oai.chat.completions.create(model=server.model_id, max_tokens=8, temperature=0,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Say hello."}])
    assert r.output_text == chat.choices[0].message.content


def test_responses_stream(oai, server):
    kinds = []
    with oai.responses.stream(model=server.model_id, input=[{"role": "user", "content": "Count to three."}],
                              max_output_tokens=10, temperature=0) as stream:
        text = ""
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.done" in kinds and "response.output_item.done" in kinds
    assert final.output_text == text and text
    assert final.usage.output_tokens > 0


def test_responses_json_schema_and_errors(oai, server, http):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    # Greedy, the tiny model can loop on the whitespace JSON allows; sampled
    # outputs that finish must parse and validate.
    done = 0
    for seed in range(4):
        r = oai.responses.create(model=server.model_id, input="Give a number as JSON.", max_output_tokens=64,
                                 temperature=1.0, extra_body={"seed": seed},
                                 text={"format": {"type": "json_schema", "name": "num", "schema": schema, "strict": True}})
        if r.status == "completed":
            done += 1
            assert isinstance(json.loads(r.output_text)["n"], int), r.output_text
    assert done >= 1
    for body, needle in [({"input": [{"type": "input_image"}]}, "input_image"),
                         ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
                         ({}, "input")]:
        err = error_of(http, "/v1/responses", {"model": server.model_id, **body})
        assert needle in err["message"], err


def test_responses_function_tool_round_trip(oai, server):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                             "required": ["city"], "additionalProperties": False}}]
    r = oai.responses.create(model=server.model_id, input="What is the weather in Paris?", tools=tools,
                             tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=120, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    args = json.loads(calls[0].arguments)
    assert isinstance(args["city"], str)
    follow = oai.responses.create(model=server.model_id, tools=tools, max_output_tokens=10, temperature=0, tool_choice="none",
                                  input=[{"role": "user", "content": "What is the weather in Paris?"},
                                         {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                                          "arguments": calls[0].arguments},
                                         {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18C, sunny"}])
    assert follow.output_text
