//! A Messages request as the typed chat completions request that serves it.
//! Sans-IO: the typed Anthropic request goes straight into
//! [`ChatCompletionRequest`], whose `prepare` then checks it as chat's.
//!
//! - `system` (a string, or text blocks joined as vLLM joins them) is a
//!   system message first.
//! - A turn's text blocks are joined with newlines (chat's rule for text
//!   parts); an assistant turn's `tool_use` blocks are its `tool_calls`; a
//!   user turn's `tool_result` blocks are `tool` messages, sent before the
//!   turn's text; `thinking` blocks are dropped; images and documents are
//!   refused (the served models read text).
//! - A last assistant turn of text is a prefill: the answer continues it
//!   (chat's `continue_final_message`).
//! - `tools` are chat's function tools (`input_schema` is `parameters`);
//!   `tool_choice` auto, any, tool and none are chat's auto, required, a named
//!   function and none; `disable_parallel_tool_use` is `parallel_tool_calls: false`;
//!   tools without a choice are auto, as in Anthropic's API.
//! - `stop_sequences` are chat's `stop`; `max_tokens` is a ceiling, cut to
//!   the room the context leaves; `metadata.user_id` is `user`.

use serde_json::{json, Value};

use super::types::{InputBlock, InputMessage, MessagesRequest, Role, SystemBlock, TextOrBlocks, ToolChoiceParam, ToolParam, ToolResultBlock};
use crate::api::errors::ApiError;
use crate::api::tools::{FunctionDef, Tool};
use crate::api::types::{ChatCompletionRequest, OpenAiMessage, StopSpec};

/// Which endpoint the request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// `/v1/messages`: `max_tokens` is required.
    Create,
    /// `/v1/messages/count_tokens`: nothing is generated.
    CountTokens,
}

/// The chat completions request for a Messages request.
pub(super) fn chat_request(req: MessagesRequest, endpoint: Endpoint) -> Result<ChatCompletionRequest, ApiError> {
    let max_tokens = match (endpoint, req.max_tokens) {
        (Endpoint::Create, None) => return Err(ApiError::invalid_param("max_tokens", "Field required")),
        (Endpoint::Create, m) => m,
        (Endpoint::CountTokens, _) => None,
    };
    let turns = match req.messages {
        Some(m) if !m.is_empty() => m,
        Some(_) => return Err(ApiError::invalid_param("messages", "at least one message is required")),
        None => return Err(ApiError::invalid_param("messages", "Field required")),
    };
    if req.sampling.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_param("n", "a message has one answer: `n` must be 1"));
    }
    let mut messages = Vec::with_capacity(turns.len() + 1);
    match req.system {
        None => {}
        Some(TextOrBlocks::Text(s)) => messages.push(OpenAiMessage::new("system", s)),
        // vLLM joins the blocks as they are.
        Some(TextOrBlocks::Blocks(b)) => messages.push(OpenAiMessage::new("system", b.into_iter().map(|SystemBlock::Text { text }| text).collect::<String>())),
    }
    let last = turns.len() - 1;
    let mut prefill = false;
    for (i, turn) in turns.into_iter().enumerate() {
        let is_prefill = turn_into_messages(turn, i, &mut messages)?;
        prefill = i == last && is_prefill;
    }

    let mut chat = ChatCompletionRequest { model: req.model, messages: Some(messages), max_tokens, max_tokens_is_ceiling: true, ..Default::default() };
    chat.sampling = req.sampling;
    if let Some(stops) = req.stop_sequences {
        if chat.sampling.stop.is_some() {
            return Err(ApiError::invalid_param("stop", "give the stop strings as `stop_sequences` only"));
        }
        chat.sampling.stop = Some(StopSpec::Many(stops));
    }
    if let Some(user) = req.metadata.and_then(|m| m.user_id) {
        chat.sampling.user = Some(user);
    }
    if prefill {
        chat.template.continue_final_message = Some(true);
    }
    if let Some(tools) = req.tools {
        chat.tool_fields.tools = Some(tools.into_iter().enumerate().map(|(i, t)| chat_tool(t, i)).collect::<Result<_, _>>()?);
    }
    let (choice, parallel) = match req.tool_choice {
        None => (None, None),
        Some(ToolChoiceParam::Auto { disable_parallel_tool_use: d }) => (Some(json!("auto")), d),
        Some(ToolChoiceParam::Any { disable_parallel_tool_use: d }) => (Some(json!("required")), d),
        Some(ToolChoiceParam::Tool { name, disable_parallel_tool_use: d }) => (Some(json!({"type": "function", "function": {"name": name}})), d),
        Some(ToolChoiceParam::NoTool) => (Some(json!("none")), None),
    };
    chat.tool_fields.tool_choice = choice;
    chat.tool_fields.parallel_tool_calls = parallel.map(|disable| !disable);
    if endpoint == Endpoint::CountTokens {
        chat.sampling.stream = None;
    }
    Ok(chat)
}

fn bad_block(turn: usize, block: usize, why: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_param("messages", format!("messages.{turn}.content.{block}: {why}"))
}

/// One turn onto the chat messages; true when it is a turn of assistant
/// text alone (a prefill, if it is the last).
fn turn_into_messages(turn: InputMessage, i: usize, messages: &mut Vec<OpenAiMessage>) -> Result<bool, ApiError> {
    let role = match turn.role {
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    let blocks = match turn.content {
        TextOrBlocks::Text(s) => {
            messages.push(OpenAiMessage::new(role, s));
            return Ok(turn.role == Role::Assistant);
        }
        TextOrBlocks::Blocks(b) if b.is_empty() => {
            return Err(ApiError::invalid_param("messages", format!("messages.{i}.content: a message's content must not be empty")));
        }
        TextOrBlocks::Blocks(b) => b,
    };
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.into_iter().enumerate() {
        match block {
            InputBlock::Text { text } => texts.push(text),
            InputBlock::Image | InputBlock::Document => {
                return Err(bad_block(i, j, "images and documents are not supported: the served model reads text only"))
            }
            InputBlock::Thinking | InputBlock::RedactedThinking => {}
            InputBlock::ToolUse { id, name, input } => {
                if turn.role != Role::Assistant {
                    return Err(bad_block(i, j, "tool_use blocks belong in assistant messages"));
                }
                // Chat's template takes the arguments as an object (tools::template_messages).
                let input = if input.is_null() { json!({}) } else { input };
                calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input}}));
            }
            InputBlock::ToolResult { tool_use_id, content, is_error: _ } => {
                if turn.role != Role::User {
                    return Err(bad_block(i, j, "tool_result blocks belong in user messages"));
                }
                let text = match content {
                    None => String::new(),
                    Some(TextOrBlocks::Text(s)) => s,
                    Some(TextOrBlocks::Blocks(parts)) => {
                        let mut texts = Vec::with_capacity(parts.len());
                        for p in parts {
                            match p {
                                ToolResultBlock::Text { text } => texts.push(text),
                                ToolResultBlock::Image => {
                                    return Err(bad_block(i, j, "images in tool results are not supported: the served model reads text only"))
                                }
                            }
                        }
                        texts.join("\n")
                    }
                };
                let mut m = OpenAiMessage::new("tool", text);
                m.extra.insert("tool_call_id".into(), Value::String(tool_use_id));
                messages.push(m);
            }
        }
    }
    let plain = calls.is_empty();
    if !texts.is_empty() || !calls.is_empty() {
        let mut m = OpenAiMessage::new(role, texts.join("\n"));
        if !calls.is_empty() {
            m.extra.insert("tool_calls".into(), Value::Array(calls));
        }
        messages.push(m);
    }
    Ok(turn.role == Role::Assistant && plain && !texts.is_empty())
}

/// A client tool as chat's function tool.
fn chat_tool(t: ToolParam, i: usize) -> Result<Tool, ApiError> {
    match t.kind.as_deref() {
        None | Some("custom") => {}
        Some(other) => {
            return Err(ApiError::invalid_param("tools", format!("tools.{i}: tools of type '{other}' are not supported (only client tools with an input_schema)")))
        }
    }
    let Some(schema) = t.input_schema else {
        return Err(ApiError::invalid_param("tools", format!("tools.{i}.input_schema: Field required")));
    };
    Ok(Tool { kind: "function".into(), function: FunctionDef { name: t.name, description: t.description, parameters: Some(schema), strict: None } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::params::parse_json;

    fn translate(body: Value) -> Result<ChatCompletionRequest, ApiError> {
        chat_request(parse_json::<MessagesRequest>(body.to_string().as_bytes())?, Endpoint::Create)
    }

    #[test]
    fn a_conversation_with_tools_becomes_chat() {
        let chat = translate(json!({
            "model": "m", "max_tokens": 20, "stream": true, "temperature": 0, "top_k": 5, "seed": 7, "min_p": 0.1,
            "system": [{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Use tools."}],
            "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}, {"type": "text", "text": "And Rome?"}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "...", "signature": "s"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "21C"}]},
                    {"type": "text", "text": "Thanks."}
                ]}
            ],
            "tools": [{"name": "get_weather", "description": "Weather now.", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}
        }))
        .unwrap();
        let m = chat.messages.as_deref().unwrap();
        let plain = |i: usize| (m[i].role.as_str(), m[i].content.as_str());
        assert_eq!(m.len(), 6);
        assert_eq!(plain(0), ("system", "Be brief. Use tools."));
        assert_eq!(plain(1), ("user", "Weather in Paris?\nAnd Rome?"));
        assert_eq!(plain(2), ("assistant", "Let me look."));
        assert_eq!(m[2].extra["tool_calls"], json!([
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
        ]));
        assert_eq!((plain(3), &m[3].extra["tool_call_id"]), (("tool", "18C"), &json!("toolu_1")));
        assert_eq!((plain(4), &m[4].extra["tool_call_id"]), (("tool", "21C"), &json!("toolu_2")));
        assert_eq!(plain(5), ("user", "Thanks."));
        assert_eq!(chat.model.as_deref(), Some("m"));
        assert_eq!((chat.max_tokens, chat.max_tokens_is_ceiling), (Some(20), true));
        let s = &chat.sampling;
        assert_eq!((s.temperature, s.top_k, s.seed, s.min_p, s.stream), (Some(0.0), Some(5), Some(7), Some(0.1), Some(true)));
        assert_eq!(s.stop, Some(StopSpec::Many(vec!["END".into()])));
        assert_eq!(s.user.as_deref(), Some("u1"));
        let tools = chat.tool_fields.tools.as_deref().unwrap();
        assert_eq!((tools[0].kind.as_str(), tools[0].function.name.as_str()), ("function", "get_weather"));
        assert_eq!((tools[0].function.description.as_deref(), tools[0].function.parameters.clone()), (Some("Weather now."), Some(json!({"type": "object"}))));
        assert_eq!(chat.tool_fields.tool_choice, Some(json!({"type": "function", "function": {"name": "get_weather"}})));
        assert_eq!(chat.tool_fields.parallel_tool_calls, Some(false));
        assert_eq!(chat.template.continue_final_message, None);
    }

    #[test]
    fn choices_and_a_prefill() {
        let body = |choice: Value| json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": choice});
        for (choice, want) in [(json!({"type": "auto"}), json!("auto")), (json!({"type": "any"}), json!("required")), (json!({"type": "none"}), json!("none"))] {
            let chat = translate(body(choice)).unwrap();
            assert_eq!(chat.tool_fields.tool_choice, Some(want));
            assert_eq!(chat.tool_fields.parallel_tool_calls, None);
        }
        let chat = translate(json!({"max_tokens": 5, "system": "S", "messages": [
            {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]}))
        .unwrap();
        assert_eq!(chat.template.continue_final_message, Some(true), "a last assistant turn is continued");
        let m = chat.messages.unwrap();
        assert_eq!((m[0].role.as_str(), m[0].content.as_str(), m[2].content.as_str()), ("system", "S", "The colour is"));
        let chat = translate(json!({"max_tokens": 5, "messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]})).unwrap();
        assert_eq!(chat.template.continue_final_message, None);
    }

    #[test]
    fn what_cannot_be_served_is_a_400_naming_it() {
        let user = |content: Value| json!({"max_tokens": 5, "messages": [{"role": "user", "content": content}]});
        for (body, param, needle) in [
            (json!({"messages": [{"role": "user", "content": "x"}]}), "max_tokens", "Field required"),
            (json!({"max_tokens": 5}), "messages", "Field required"),
            (json!({"max_tokens": 5, "messages": []}), "messages", "at least one"),
            (user(json!([])), "messages", "messages.0.content: a message's content must not be empty"),
            (user(json!([{"type": "text", "text": "a"}, {"type": "image", "source": {}}])), "messages", "messages.0.content.1: images"),
            (user(json!([{"type": "tool_use", "id": "t", "name": "f", "input": {}}])), "messages", "belong in assistant"),
            (user(json!([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}])), "messages", "images in tool results"),
            (user(json!([{"type": "video"}])), "messages", "unknown variant `video`"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}), "tools", "tools.0.input_schema: Field required"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}), "tools", "web_search_20250305"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool"}}), "tool_choice", "missing field `name`"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "n": 2}), "n", "must be 1"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stop": "a", "stop_sequences": ["b"]}), "stop", "stop_sequences"),
            (json!({"max_tokens": "many", "messages": []}), "max_tokens", "invalid type"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "system": 5}), "system", "a string or a list of content blocks"),
        ] {
            let e = translate(body.clone()).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn count_tokens_needs_no_max_tokens() {
        let req = parse_json::<MessagesRequest>(br#"{"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}"#).unwrap();
        let chat = chat_request(req, Endpoint::CountTokens).unwrap();
        assert_eq!((chat.max_tokens, chat.sampling.stream), (None, None));
    }
}
