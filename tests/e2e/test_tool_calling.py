"""Tool calling through the openai SDK: `tools` with `tool_choice` required
and named (enforced with structured outputs, so the arguments always parse),
a full round trip (tools -> tool_calls -> a `tool` message -> an answer),
streamed and not; `auto` needs `--enable-auto-tool-choice`, as in vLLM."""

from __future__ import annotations

import json

import pytest

from e2e_util import assert_openai_error, need

pytestmark = pytest.mark.timeout(300)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def auto_server():
    from e2e_server import SetupError, start_server, stop_server
    srv, problem = None, None
    try:
        srv = start_server(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    except SetupError as e:
        problem = str(e)
    if problem:
        pytest.fail(problem, pytrace=False)
    yield srv
    stop_server(srv)


def _check_calls(calls, names):
    jsonschema = need("jsonschema")
    assert calls, "no tool calls"
    for c in calls:
        assert c["id"].startswith("chatcmpl-tool-"), c
        assert c["type"] == "function", c
        assert c["function"]["name"] in names, c
        args = json.loads(c["function"]["arguments"])
        jsonschema.validate(args, SCHEMAS[c["function"]["name"]])


def _ask(oai, server, stream, tool_choice, messages=QUESTION, **kw):
    """(content, tool calls as dicts, finish_reason) of choice 0, streamed or not."""
    args = dict(model=server.model_id, messages=messages, tools=TOOLS, tool_choice=tool_choice,
                max_tokens=200, temperature=0.7, seed=3, **kw)
    if not stream:
        r = oai.chat.completions.create(**args)
        m = r.choices[0].message
        calls = [c.model_dump() for c in (m.tool_calls or [])]
        return m.content or "", calls, r.choices[0].finish_reason
    content, calls, finish, saw_finish_chunk = "", {}, None, False
    for ch in oai.chat.completions.create(stream=True, **args):
        for c in ch.choices:
            assert not saw_finish_chunk, "a chunk came after the finish_reason chunk"
            d = c.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                e = calls.setdefault(tc.index, {"id": None, "type": None, "function": {"name": None, "arguments": ""}})
                e["id"] = tc.id or e["id"]
                e["type"] = tc.type or e["type"]
                if tc.function:
                    e["function"]["name"] = tc.function.name or e["function"]["name"]
                    e["function"]["arguments"] += tc.function.arguments or ""
            if c.finish_reason:
                # OpenAI's order: the finish reason comes alone, after the last delta.
                assert not d.content and not d.tool_calls, c
                finish, saw_finish_chunk = c.finish_reason, True
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_round_trip(oai, server, choice, stream):
    tool_choice = "required" if choice == "required" else NAMED
    content, calls, finish = _ask(oai, server, stream, tool_choice)
    _check_calls(calls, SCHEMAS if choice == "required" else {"get_weather"})
    # vLLM: "tool_calls" for required (and auto) calls; a named choice keeps "stop".
    assert finish == ("tool_calls" if choice == "required" else "stop")
    history = QUESTION + [{"role": "assistant", "content": content or None, "tool_calls": calls}]
    for c in calls:
        history.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"temperature": 21, "sky": "clear"})})
    answer, more, finish = _ask(oai, server, stream, "none", messages=history)
    assert more == [] and finish in ("stop", "length")
    assert answer.strip(), "the model said nothing after the tool's answer"


def test_required_with_n_calls_every_choice(oai, server):
    r = oai.chat.completions.create(model=server.model_id, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                    n=3, temperature=1.0, seed=5, max_tokens=200, parallel_tool_calls=False)
    assert len(r.choices) == 3
    for c in r.choices:
        calls = [t.model_dump() for t in c.message.tool_calls]
        assert len(calls) == 1 and c.finish_reason == "tool_calls"
        _check_calls(calls, SCHEMAS)


def test_auto_needs_the_server_flag(http, server):
    for body in ({"tools": TOOLS, "tool_choice": "auto"}, {"tools": TOOLS}):
        r = http.post("/v1/chat/completions", json={"model": server.model_id, "messages": QUESTION, **body})
        err = assert_openai_error(r.status_code, r.text, 400)
        assert err["message"] == '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


@pytest.mark.parametrize("body, mentions", [
    ({"tool_choice": "required"}, ("tools",)),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, ("nope",)),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, ("structured",)),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}],
      "tool_choice": "required"}, ("frobnicate",)),
])
def test_bad_tool_requests(http, server, body, mentions):
    r = http.post("/v1/chat/completions", json={"model": server.model_id, "messages": QUESTION, **body})
    assert_openai_error(r.status_code, r.text, 400, mentions=mentions)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_auto_answers_or_calls_consistently(auto_server, stream):
    openai = need("openai")
    oai = openai.OpenAI(base_url=auto_server.http_url + "/v1", api_key=auto_server.api_key, timeout=120, max_retries=0)
    auto_server.model_id = oai.models.list().data[0].id
    content, calls, finish = _ask(oai, auto_server, stream, "auto")
    # Auto calls are not constrained: whatever the parser found must be well formed.
    if calls:
        assert finish == "tool_calls"
        for c in calls:
            assert c["id"].startswith("chatcmpl-tool-") and c["function"]["name"]
            json.loads(c["function"]["arguments"])
    else:
        assert finish in ("stop", "length")
    # Required still works with the auto flags on.
    _, calls, finish = _ask(oai, auto_server, stream, "required")
    _check_calls(calls, SCHEMAS)
