"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`)
through the official `anthropic` SDK against the real server: text whole and
streamed (equal at temperature 0 with a seed), stop sequences, max_tokens,
the system prompt, multi-turn and prefill, a forced tool call and its round
trip, count_tokens against usage, and errors in Anthropic's shape.

The SDK (2.17) takes the sampling fields other than max_tokens through
`extra_body`, as vLLM's extras (`seed`, `ignore_eos`) go."""

from __future__ import annotations

import json

import pytest

from e2e_util import need

pytestmark = pytest.mark.timeout(300)

GREEDY = {"temperature": 0, "seed": 7}
QUESTION = [{"role": "user", "content": "Tell me about the sea in two sentences."}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"name": "get_weather", "description": "The weather in a city now.", "input_schema": WEATHER}]
FORCED = {"type": "tool", "name": "get_weather"}


@pytest.fixture(scope="module")
def claude(server):
    """The official Anthropic SDK pointed at ferry (the SDK adds /v1/messages)."""
    anthropic = need("anthropic")
    return anthropic.Anthropic(base_url=server.http_url, api_key=server.api_key, timeout=120, max_retries=0)


def _ask(claude, server, **kw):
    kw.setdefault("messages", QUESTION)
    kw.setdefault("max_tokens", 40)
    kw.setdefault("extra_body", GREEDY)
    return claude.messages.create(model=server.model_id, **kw)


def _stream(claude, server, **kw):
    """The streamed message as the SDK accumulates it, and its text as `text_stream` gave it."""
    kw.setdefault("messages", QUESTION)
    kw.setdefault("max_tokens", 40)
    kw.setdefault("extra_body", GREEDY)
    with claude.messages.stream(model=server.model_id, **kw) as s:
        text = "".join(s.text_stream)
        return s.get_final_message(), text


def _text(m) -> str:
    return "".join(b.text for b in m.content if b.type == "text")


def _chat_prompt_tokens(http, server, messages, **extra) -> int:
    r = http.post("/tokenize", json={"model": server.model_id, "messages": messages, **extra})
    assert r.status_code == 200, r.text
    return r.json()["count"]


def test_text_whole_and_streamed_are_equal(claude, server):
    m = _ask(claude, server)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant", m
    assert m.model == server.model_id
    assert [b.type for b in m.content] == ["text"] and _text(m).strip(), m
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert m.usage.output_tokens > 0
    again = _ask(claude, server)
    assert _text(again) == _text(m), "temperature 0 with a seed gave two texts"
    final, text = _stream(claude, server)
    assert text == _text(m) == _text(final)
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == \
        (m.stop_reason, m.usage.input_tokens, m.usage.output_tokens)


def test_the_raw_stream_has_anthropics_events_in_order(http, server):
    httpx = need("httpx")
    body = {"model": server.model_id, "max_tokens": 12, "stream": True, "messages": QUESTION, **GREEDY}
    headers = {"x-api-key": server.api_key, "anthropic-version": "2023-06-01"}
    events = []
    with httpx.stream("POST", server.http_url + "/v1/messages", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name, (name, data)
                events.append(data)
    names = [e["type"] for e in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"], names
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"], names
    assert set(names[3:-3]) == {"content_block_delta"}, names
    assert events[0]["message"]["usage"]["output_tokens"] == 0
    assert all(e["delta"]["type"] == "text_delta" for e in events[3:-3])
    assert events[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens") and 0 < events[-2]["usage"]["output_tokens"] <= 12


def test_stop_sequence_is_named(claude, server):
    whole = _text(_ask(claude, server, max_tokens=40, extra_body={**GREEDY, "ignore_eos": True}))
    stop = next((w for w in whole.split()[2:] if len(w) >= 4), None)
    assert stop, whole
    m = _ask(claude, server, max_tokens=40, stop_sequences=[stop], extra_body={**GREEDY, "ignore_eos": True})
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop), m
    assert _text(m) == whole[:whole.index(stop)]
    final, text = _stream(claude, server, max_tokens=40, stop_sequences=[stop], extra_body={**GREEDY, "ignore_eos": True})
    assert (final.stop_reason, final.stop_sequence, text) == ("stop_sequence", stop, _text(m))


def test_max_tokens(claude, server):
    m = _ask(claude, server, max_tokens=5, extra_body={**GREEDY, "ignore_eos": True})
    assert (m.stop_reason, m.usage.output_tokens) == ("max_tokens", 5), m
    final, _ = _stream(claude, server, max_tokens=5, extra_body={**GREEDY, "ignore_eos": True})
    assert (final.stop_reason, final.usage.output_tokens) == ("max_tokens", 5)
    # 0 is Anthropic's cache warm-up: the prompt is counted, nothing is generated.
    warm = _ask(claude, server, max_tokens=0)
    assert (warm.stop_reason, warm.usage.output_tokens, _text(warm)) == ("max_tokens", 0, "")
    assert warm.usage.input_tokens == m.usage.input_tokens


def test_max_tokens_past_the_context_is_a_ceiling(claude, server):
    m = _ask(claude, server, max_tokens=100_000, extra_body={**GREEDY, "ignore_eos": True})
    assert m.stop_reason == "model_context_window_exceeded", m
    assert m.usage.input_tokens + m.usage.output_tokens == server.max_model_len


def test_system_prompt_is_in_the_prompt(claude, server, http):
    system = "You are a pirate. Answer like one."
    m = _ask(claude, server, system=system)
    want = _chat_prompt_tokens(http, server, [{"role": "system", "content": system}] + QUESTION)
    assert m.usage.input_tokens == want
    blocks = _ask(claude, server, system=[{"type": "text", "text": "You are a pirate. "}, {"type": "text", "text": "Answer like one."}])
    assert blocks.usage.input_tokens == want and _text(blocks) == _text(m)
    plain = _ask(claude, server)
    assert plain.usage.input_tokens != m.usage.input_tokens


def test_multi_turn_and_prefill(claude, server, http):
    turns = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]},
    ]
    m = _ask(claude, server, messages=turns)
    chat = [{"role": t["role"], "content": t["content"] if isinstance(t["content"], str) else t["content"][0]["text"]} for t in turns]
    assert m.usage.input_tokens == _chat_prompt_tokens(http, server, chat)
    assert _text(m).strip()
    # A last assistant turn is continued, not answered.
    prefill = turns + [{"role": "assistant", "content": "Your name is"}]
    p = _ask(claude, server, messages=prefill, max_tokens=8)
    assert p.usage.input_tokens == _chat_prompt_tokens(http, server, chat + [{"role": "assistant", "content": "Your name is"}],
                                                       continue_final_message=True, add_generation_prompt=False)
    assert _text(p).strip()


def test_forced_tool_call_and_round_trip(claude, server):
    jsonschema = need("jsonschema")
    q = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = _ask(claude, server, messages=q, tools=TOOLS, tool_choice=FORCED, max_tokens=200)
    assert m.stop_reason == "tool_use", m
    calls = [b for b in m.content if b.type == "tool_use"]
    assert len(calls) == 1, m
    call = calls[0]
    assert call.id.startswith("toolu_") and call.name == "get_weather", call
    jsonschema.validate(call.input, WEATHER)
    final, _ = _stream(claude, server, messages=q, tools=TOOLS, tool_choice=FORCED, max_tokens=200)
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and len(streamed) == 1
    assert (streamed[0].name, streamed[0].input) == (call.name, call.input)
    assert streamed[0].id.startswith("toolu_")
    history = q + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": json.dumps({"temperature": 21, "sky": "clear"})}]},
    ]
    answer = _ask(claude, server, messages=history, tools=TOOLS, tool_choice={"type": "none"}, max_tokens=60)
    assert answer.stop_reason in ("end_turn", "max_tokens") and _text(answer).strip(), answer
    assert not [b for b in answer.content if b.type == "tool_use"]


def test_count_tokens_equals_usage(claude, server):
    for kw in ({"messages": QUESTION},
               {"messages": QUESTION, "system": "Be brief."},
               {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": TOOLS, "tool_choice": FORCED}):
        count = claude.messages.count_tokens(model=server.model_id, **kw)
        m = _ask(claude, server, max_tokens=60, **kw)
        assert count.input_tokens == m.usage.input_tokens > 0, (kw, count, m.usage)
    # Tools count as the template renders them (SmolLM2's own template leaves them out).
    with_tools = claude.messages.count_tokens(model=server.model_id, messages=QUESTION, tools=TOOLS)
    assert with_tools.input_tokens >= claude.messages.count_tokens(model=server.model_id, messages=QUESTION).input_tokens


def test_errors_in_anthropics_shape(claude, server, http):
    anthropic = need("anthropic")
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=server.model_id, messages=QUESTION, max_tokens=anthropic.omit)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"
    assert e.value.body["type"] == "error" and "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-nonexistent-9", messages=QUESTION, max_tokens=5)
    assert e.value.status_code == 404 and e.value.type == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="claude-nonexistent-9", messages=QUESTION)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=server.model_id, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert "image" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=server.model_id, max_tokens=5, messages=QUESTION, extra_body={"temperature": -1})
    assert e.value.body["error"]["message"].startswith("temperature")
    bad_key = anthropic.Anthropic(base_url=server.http_url, api_key="not-the-key", timeout=30, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad_key.messages.create(model=server.model_id, messages=QUESTION, max_tokens=5)
    assert e.value.status_code == 401 and e.value.type == "authentication_error"
    # Anthropic's own header is a key as `Authorization: Bearer` is.
    body = {"model": server.model_id, "max_tokens": 3, "messages": QUESTION}
    r = http.post("/v1/messages", json=body, headers={"authorization": "", "x-api-key": server.api_key})
    assert r.status_code == 200 and r.json()["type"] == "message", r.text
    r = http.post("/v1/messages", json=body, headers={"authorization": "", "x-api-key": "wrong"})
    assert r.status_code == 401 and r.json() == {"type": "error", "error": {"type": "authentication_error", "message": "Unauthorized"}}
