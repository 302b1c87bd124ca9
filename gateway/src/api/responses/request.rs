//! A Responses API request (`POST /v1/responses`) as the chat completions
//! request that serves it. Sans-IO: JSON in, JSON out.
//!
//! `input` items become chat messages (`instructions` first, as a system
//! message; `developer` is `system`; `function_call` items become an
//! assistant message's `tool_calls`, `function_call_output` items `tool`
//! messages), function tools and `tool_choice` take chat's shapes, and
//! `text.format` becomes `response_format`.

use serde_json::{json, Map, Value};

use crate::api::errors::ApiError;

/// Sampling fields passed through unchanged (OpenAI's and vLLM's extras).
const PASS_THROUGH: &[&str] = &[
    "model", "temperature", "top_p", "user", "seed", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "stop", "ignore_eos", "min_tokens", "logit_bias", "skip_special_tokens", "parallel_tool_calls",
];

/// The chat completions body for a Responses request `body` (a JSON object).
pub fn chat_body(body: &Value) -> Result<Value, ApiError> {
    let Value::Object(req) = body else {
        return Err(ApiError::bad_request("The request body must be a JSON object."));
    };
    if req.get("previous_response_id").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid_param(
            "previous_response_id",
            "previous_response_id is not supported: this server does not store responses (send the whole conversation as input).",
        ));
    }
    let mut messages = Vec::new();
    match req.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(ApiError::invalid_param("instructions", "`instructions` must be a string.")),
    }
    match req.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(item, i, &mut messages)?;
            }
        }
        None | Some(Value::Null) => return Err(ApiError::invalid_param("input", "`input` is required.")),
        Some(_) => return Err(ApiError::invalid_param("input", "`input` must be a string or a list of input items.")),
    }
    if messages.is_empty() {
        return Err(ApiError::invalid_param("input", "`input` must hold at least one item."));
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    for &k in PASS_THROUGH {
        if let Some(v) = req.get(k) {
            chat.insert(k.into(), v.clone());
        }
    }
    if let Some(v) = req.get("max_output_tokens").filter(|v| !v.is_null()) {
        chat.insert("max_completion_tokens".into(), v.clone());
    }
    if let Some(k) = req.get("top_logprobs").filter(|v| !v.is_null()) {
        chat.insert("logprobs".into(), Value::Bool(true));
        chat.insert("top_logprobs".into(), k.clone());
    }
    if let Some(tools) = req.get("tools").filter(|v| !v.is_null()) {
        chat.insert("tools".into(), chat_tools(tools)?);
    }
    if let Some(choice) = req.get("tool_choice").filter(|v| !v.is_null()) {
        chat.insert("tool_choice".into(), chat_tool_choice(choice)?);
    }
    if let Some(format) = req.get("text").and_then(|t| t.get("format")).filter(|v| !v.is_null()) {
        if let Some(rf) = response_format(format)? {
            chat.insert("response_format".into(), rf);
        }
    }
    if req.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        chat.insert("stream".into(), Value::Bool(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Value::Object(chat))
}

fn bad_item(i: usize, why: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_param("input", format!("input[{i}]: {why}"))
}

/// One input item onto the chat messages.
fn input_item(item: &Value, i: usize, messages: &mut Vec<Value>) -> Result<(), ApiError> {
    let ty = item.get("type").and_then(Value::as_str).unwrap_or("message");
    match ty {
        "message" => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some("developer") => "system",
                Some(r @ ("system" | "user" | "assistant")) => r,
                Some(r) => return Err(bad_item(i, format!("role '{r}' is not one of user, assistant, system, developer"))),
                None => return Err(bad_item(i, "a message needs a role")),
            };
            messages.push(json!({"role": role, "content": content_text(item.get("content"), i)?}));
        }
        "function_call" => {
            let field = |k: &str| {
                item.get(k).and_then(Value::as_str).ok_or_else(|| bad_item(i, format!("a function_call needs a string `{k}`")))
            };
            let call = json!({"id": field("call_id")?, "type": "function",
                              "function": {"name": field("name")?, "arguments": field("arguments")?}});
            // Calls one after another are one assistant turn.
            let last_is_calls = messages
                .last()
                .is_some_and(|m| m["role"] == "assistant" && m.get("tool_calls").is_some() && m["content"].is_null());
            if last_is_calls {
                if let Some(Value::Array(calls)) = messages.last_mut().and_then(|m| m.get_mut("tool_calls")) {
                    calls.push(call);
                }
            } else {
                messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
            }
        }
        "function_call_output" => {
            let call_id = item.get("call_id").and_then(Value::as_str).ok_or_else(|| bad_item(i, "a function_call_output needs a string `call_id`"))?;
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(v @ Value::Array(_)) => content_text(Some(v), i)?,
                _ => return Err(bad_item(i, "a function_call_output needs an `output` string")),
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        other => return Err(bad_item(i, format!("input items of type '{other}' are not supported (message, function_call, function_call_output)"))),
    }
    Ok(())
}

/// A message's content: a string, or text parts (`input_text`, `output_text`, `text`) joined.
fn content_text(content: Option<&Value>, i: usize) -> Result<String, ApiError> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => texts.push(t),
                    (Some(t), _) => return Err(bad_item(i, format!("content parts of type '{t}' are not supported (only text)"))),
                    (None, _) => return Err(bad_item(i, "a content part needs a type")),
                }
            }
            Ok(texts.join("\n"))
        }
        None | Some(Value::Null) => Ok(String::new()),
        Some(_) => Err(bad_item(i, "content must be a string or a list of content parts")),
    }
}

/// Responses' flat function tools as chat's nested ones.
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let Value::Array(tools) = tools else {
        return Err(ApiError::invalid_param("tools", "`tools` must be a list."));
    };
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => return Err(ApiError::invalid_param("tools", format!("tools[{i}]: tools of type '{other}' are not supported (only function)"))),
            None => return Err(ApiError::invalid_param("tools", format!("tools[{i}] needs a type"))),
        }
        let name = t.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid_param("tools", format!("tools[{i}] needs a name")))?;
        let mut f = Map::new();
        f.insert("name".into(), name.into());
        for k in ["description", "parameters", "strict"] {
            if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                f.insert(k.into(), v.clone());
            }
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => Ok(choice.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => match o.get("name").and_then(Value::as_str) {
            Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
            None => Err(ApiError::invalid_param("tool_choice", "a function tool_choice needs a name")),
        },
        _ => Err(ApiError::invalid_param("tool_choice", "`tool_choice` must be auto, none, required or {\"type\": \"function\", \"name\": ...}")),
    }
}

/// `text.format` as chat's `response_format` (None for plain text).
fn response_format(format: &Value) -> Result<Option<Value>, ApiError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut js = Map::new();
            js.insert("name".into(), format.get("name").cloned().unwrap_or_else(|| "response".into()));
            for k in ["schema", "strict", "description"] {
                if let Some(v) = format.get(k).filter(|v| !v.is_null()) {
                    js.insert(k.into(), v.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": js})))
        }
        _ => Err(ApiError::invalid_param("text", "`text.format.type` must be text, json_object or json_schema")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_with_tools_becomes_chat() {
        let body = json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 20, "temperature": 0, "stream": true,
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18C"}
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}}
        });
        let chat = chat_body(&body).unwrap();
        let m = &chat["messages"];
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[1]["role"], "system");
        assert_eq!(m[2], json!({"role": "user", "content": "Weather in Paris?"}));
        assert_eq!(m[3]["tool_calls"].as_array().unwrap().len(), 2, "consecutive calls are one turn");
        assert_eq!(m[4], json!({"role": "tool", "tool_call_id": "c1", "content": "18C"}));
        assert_eq!(chat["max_completion_tokens"], 20);
        assert_eq!(chat["tools"][0], json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}));
        assert_eq!(chat["tool_choice"], json!({"type": "function", "function": {"name": "get_weather"}}));
        assert_eq!(chat["response_format"]["json_schema"]["name"], "w");
        assert_eq!(chat["stream_options"]["include_usage"], true);
    }

    #[test]
    fn unsupported_items_are_400_naming_them() {
        for (body, needle) in [
            (json!({"input": [{"type": "input_image", "image_url": "x"}]}), "input_image"),
            (json!({"input": [{"role": "robot", "content": "x"}]}), "robot"),
            (json!({"input": "x", "previous_response_id": "resp_1"}), "previous_response_id"),
            (json!({"input": "x", "tools": [{"type": "web_search"}]}), "web_search"),
            (json!({"input": 5}), "input"),
            (json!({}), "required"),
        ] {
            let e = chat_body(&body).unwrap_err();
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }
}
