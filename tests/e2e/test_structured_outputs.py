"""Structured outputs through the openai SDK: `response_format` (json_object,
json_schema), vLLM's `structured_outputs` and the legacy `guided_*` fields,
on completions and chat, streamed and not, with n = 4. The model is tiny and
not smart; the constraint must make every output valid anyway."""

from __future__ import annotations

import json
import re

import pytest

from e2e_util import assert_openai_error, need

pytestmark = pytest.mark.timeout(300)

N = 4
MAX_TOKENS = 300
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]

# Varied schemas: bounded so a tiny model finishes inside MAX_TOKENS.
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "admin": {"type": "boolean"},
        },
        "required": ["name", "age", "admin"],
        "additionalProperties": False,
    },
    "enum_array": {
        "type": "array",
        "items": {"enum": ["red", "green", "blue"]},
        "minItems": 1,
        "maxItems": 3,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                    "langs": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "maxItems": 2},
                },
                "required": ["id", "langs"],
                "additionalProperties": False,
            },
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "note": {"type": ["string", "null"], "maxLength": 12},
        },
        "required": ["user", "score", "note"],
        "additionalProperties": False,
    },
    "any_of": {
        "anyOf": [
            {"type": "integer", "minimum": 10, "maximum": 99},
            {"type": "object", "properties": {"ok": {"const": True}}, "required": ["ok"], "additionalProperties": False},
        ]
    },
}


def _chat_choices(oai, server, stream, **kw):
    """(text, finish_reason) per choice index, streamed or not."""
    args = dict(model=server.model_id, messages=MESSAGES, n=N, temperature=1.0, seed=7, max_tokens=MAX_TOKENS, **kw)
    if not stream:
        r = oai.chat.completions.create(**args)
        return {c.index: (c.message.content, c.finish_reason) for c in r.choices}
    out: dict[int, list] = {}
    for ch in oai.chat.completions.create(stream=True, **args):
        for c in ch.choices:
            e = out.setdefault(c.index, ["", None])
            e[0] += c.delta.content or ""
            e[1] = c.finish_reason or e[1]
    return {i: tuple(v) for i, v in out.items()}


def _completion_choices(oai, server, stream, prompt="A JSON value:", **kw):
    args = dict(model=server.model_id, prompt=prompt, n=N, temperature=1.0, seed=7, max_tokens=MAX_TOKENS, **kw)
    if not stream:
        r = oai.completions.create(**args)
        return {c.index: (c.text, c.finish_reason) for c in r.choices}
    out: dict[int, list] = {}
    for ch in oai.completions.create(stream=True, **args):
        for c in ch.choices:
            e = out.setdefault(c.index, ["", None])
            e[0] += c.text or ""
            e[1] = c.finish_reason or e[1]
    return {i: tuple(v) for i, v in out.items()}


def _assert_valid(choices, schema):
    jsonschema = need("jsonschema")
    assert sorted(choices) == list(range(N)), choices
    for i, (text, finish) in choices.items():
        assert finish == "stop", f"choice {i} ended with {finish}: {text!r}"
        value = json.loads(text)
        jsonschema.validate(value, schema)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_chat_json_schema_outputs_validate(oai, server, name, stream):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    _assert_valid(_chat_choices(oai, server, stream, response_format=fmt), schema)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("field", ["structured_outputs", "guided_json"])
def test_completion_json_schema_outputs_validate(oai, server, field, stream):
    schema = SCHEMAS["nested"]
    body = {"structured_outputs": {"json": schema}} if field == "structured_outputs" else {"guided_json": schema}
    _assert_valid(_completion_choices(oai, server, stream, extra_body=body), schema)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_json_object_is_an_object(oai, server, stream):
    # An open object may go on past max_tokens; those that stop must parse.
    choices = _chat_choices(oai, server, stream, response_format={"type": "json_object"})
    stopped = [t for t, f in choices.values() if f == "stop"]
    for t in stopped:
        assert isinstance(json.loads(t), dict), t
    for t, f in choices.values():
        assert t.lstrip().startswith("{"), t


REGEX = r"[A-Z][a-z]{2,6} (19|20)[0-9]{2}"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_regex_always_holds(oai, server, stream):
    for body, call in [({"structured_outputs": {"regex": REGEX}}, _chat_choices),
                       ({"guided_regex": REGEX}, _completion_choices)]:
        for i, (text, finish) in call(oai, server, stream, extra_body=body).items():
            assert re.fullmatch(REGEX, text), f"choice {i}: {text!r}"
            assert finish == "stop"


CHOICES = ["positive", "negative", "neutral \"maybe\""]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_choice_always_holds(oai, server, stream):
    for body, call in [({"structured_outputs": {"choice": CHOICES}}, _chat_choices),
                       ({"guided_choice": CHOICES}, _completion_choices)]:
        got = call(oai, server, stream, extra_body=body)
        assert len(got) == N
        for i, (text, finish) in got.items():
            assert text in CHOICES and finish == "stop", f"choice {i}: {text!r} {finish}"


def test_lark_grammar_holds(oai, server):
    grammar = 'start: greeting " " name "!"\ngreeting: "Hello" | "Hi"\nname: /[A-Z][a-z]{1,8}/'
    got = _completion_choices(oai, server, False, prompt="Say hi:", extra_body={"guided_grammar": grammar})
    for text, finish in got.values():
        assert re.fullmatch(r"(Hello|Hi) [A-Z][a-z]{1,8}!", text) and finish == "stop", text


def test_gbnf_grammar_holds(oai, server):
    # vLLM's examples write grammars in GBNF/EBNF; they are rewritten as Lark.
    grammar = """
root ::= "SELECT " column (", " column)* " FROM " table
column ::= "id" | "name" | "age"
table ::= [a-z]{3,8}
"""
    got = _chat_choices(oai, server, False, extra_body={"structured_outputs": {"grammar": grammar}})
    for text, finish in got.values():
        assert re.fullmatch(r"SELECT (id|name|age)(, (id|name|age))* FROM [a-z]{3,8}", text) and finish == "stop", text


@pytest.mark.parametrize("body, param, mentions", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format", ("frobnicate",)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", ("schema",)),
    ({"response_format": {"type": "yaml"}}, "response_format", ("yaml",)),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", ("invalid",)),
    ({"guided_grammar": "start: missing_rule"}, "guided_grammar", ("missing_rule",)),
    ({"guided_choice": []}, "guided_choice", ("empty",)),
    ({"guided_json": "{not json"}, "guided_json", ("json",)),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", ("one kind",)),
])
def test_bad_constraints_are_400_saying_what_is_wrong(http, server, body, param, mentions):
    for path, base in [("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})]:
        r = http.post(path, json={"model": server.model_id, "max_tokens": 5, **base, **body})
        err = assert_openai_error(r.status_code, r.text, 400, mentions=mentions)
        assert err["param"] == param, err
