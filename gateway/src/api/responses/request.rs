//! A Responses API request (`POST /v1/responses`) as the typed chat
//! completions request that serves it. Sans-IO, and no JSON in between: the
//! request's own fields are read straight into [`ChatCompletionRequest`].
//!
//! `input` items become chat messages (`instructions` first, as a system
//! message; `developer` is `system`; `function_call` items become an
//! assistant message's `tool_calls`, `function_call_output` items `tool`
//! messages), function tools and `tool_choice` take chat's shapes, and
//! `text.format` becomes `response_format`.
//!
//! The request's shape is checked first (input, tools, tool_choice,
//! text.format), then the type of each field chat takes, in chat's order; a
//! field of the wrong type is refused as chat refuses it, under chat's name
//! for it (`max_output_tokens` is chat's `max_completion_tokens`).

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::errors::ApiError;
use crate::api::structured::{JsonSchemaFormat, ResponseFormat};
use crate::api::tools::{FunctionDef, Tool};
use crate::api::types::{ChatCompletionRequest, OpenAiMessage, StreamOptions};

/// The chat completions request for a Responses request `body` (a JSON object).
pub(super) fn chat_request(body: &Value) -> Result<ChatCompletionRequest, ApiError> {
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
        Some(Value::String(s)) => messages.push(OpenAiMessage::new("system", s.clone())),
        Some(_) => return Err(ApiError::invalid_param("instructions", "`instructions` must be a string.")),
    }
    match req.get("input") {
        Some(Value::String(s)) => messages.push(OpenAiMessage::new("user", s.clone())),
        Some(Value::Array(items)) => {
            let mut turn = Turn::default();
            for (i, item) in items.iter().enumerate() {
                input_item(item, i, &mut messages, &mut turn)?;
            }
        }
        None | Some(Value::Null) => return Err(ApiError::invalid_param("input", "`input` is required.")),
        Some(_) => return Err(ApiError::invalid_param("input", "`input` must be a string or a list of input items.")),
    }
    if messages.is_empty() {
        return Err(ApiError::invalid_param("input", "`input` must hold at least one item."));
    }
    let tools = req.get("tools").filter(|v| !v.is_null()).map(function_tools).transpose()?;
    let tool_choice = req.get("tool_choice").filter(|v| !v.is_null()).map(chat_tool_choice).transpose()?;
    let format = match req.get("text").and_then(|t| t.get("format")).filter(|v| !v.is_null()) {
        Some(f) => text_format(f)?,
        None => None,
    };

    // The fields' types, in the order chat reads them.
    let mut chat = ChatCompletionRequest { messages: Some(messages), ..Default::default() };
    let s = &mut chat.sampling;
    chat.model = field(req, "model", "model")?;
    s.temperature = field(req, "temperature", "temperature")?;
    s.top_p = field(req, "top_p", "top_p")?;
    s.user = field(req, "user", "user")?;
    s.seed = field(req, "seed", "seed")?;
    s.top_k = field(req, "top_k", "top_k")?;
    s.min_p = field(req, "min_p", "min_p")?;
    s.repetition_penalty = field(req, "repetition_penalty", "repetition_penalty")?;
    s.presence_penalty = field(req, "presence_penalty", "presence_penalty")?;
    s.frequency_penalty = field(req, "frequency_penalty", "frequency_penalty")?;
    s.stop = field(req, "stop", "stop")?;
    s.ignore_eos = field(req, "ignore_eos", "ignore_eos")?;
    s.min_tokens = field(req, "min_tokens", "min_tokens")?;
    s.logit_bias = field(req, "logit_bias", "logit_bias")?;
    s.skip_special_tokens = field(req, "skip_special_tokens", "skip_special_tokens")?;
    chat.tool_fields.parallel_tool_calls = field(req, "parallel_tool_calls", "parallel_tool_calls")?;
    chat.max_completion_tokens = field(req, "max_output_tokens", "max_completion_tokens")?;
    if req.get("top_logprobs").is_some_and(|v| !v.is_null()) {
        chat.logprobs = Some(true);
        chat.top_logprobs = field(req, "top_logprobs", "top_logprobs")?;
    }
    chat.tool_fields.tools = tools.map(|t| t.into_iter().map(FunctionTool::typed).collect()).transpose()?;
    chat.tool_fields.tool_choice = tool_choice;
    chat.sampling.structured.response_format = format.map(TextFormat::typed).transpose()?;
    if req.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        chat.sampling.stream = Some(true);
        chat.sampling.stream_options = Some(StreamOptions { include_usage: Some(true), continuous_usage_stats: None });
    }
    Ok(chat)
}

/// Field `key` of `obj` as a `T`; a value of another type is a 400 naming
/// `name` (chat's name for the field), in chat's words.
fn field<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str, name: &str) -> Result<Option<T>, ApiError> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => Option::<T>::deserialize(v).map_err(|e| ApiError::invalid_param(name, format!("Invalid value for `{name}`: {e}"))),
    }
}

fn bad_item(i: usize, why: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_param("input", format!("input[{i}]: {why}"))
}

/// Whether the last message is an assistant turn made of `function_call`
/// items, which the next call joins.
#[derive(Default)]
struct Turn {
    calls_open: bool,
}

/// One input item onto the chat messages.
fn input_item(item: &Value, i: usize, messages: &mut Vec<OpenAiMessage>, turn: &mut Turn) -> Result<(), ApiError> {
    let ty = item.get("type").and_then(Value::as_str).unwrap_or("message");
    match ty {
        "message" => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some("developer") => "system",
                Some(r @ ("system" | "user" | "assistant")) => r,
                Some(r) => return Err(bad_item(i, format!("role '{r}' is not one of user, assistant, system, developer"))),
                None => return Err(bad_item(i, "a message needs a role")),
            };
            messages.push(OpenAiMessage::new(role, content_text(item.get("content"), i)?));
            turn.calls_open = false;
        }
        "function_call" => {
            let field = |k: &str| {
                item.get(k).and_then(Value::as_str).ok_or_else(|| bad_item(i, format!("a function_call needs a string `{k}`")))
            };
            let call = json!({"id": field("call_id")?, "type": "function",
                              "function": {"name": field("name")?, "arguments": field("arguments")?}});
            // Calls one after another are one assistant turn.
            if turn.calls_open {
                if let Some(Value::Array(calls)) = messages.last_mut().and_then(|m| m.extra.get_mut("tool_calls")) {
                    calls.push(call);
                    return Ok(());
                }
            }
            let mut m = OpenAiMessage::new("assistant", "");
            m.extra.insert("tool_calls".into(), Value::Array(vec![call]));
            messages.push(m);
            turn.calls_open = true;
        }
        "function_call_output" => {
            let call_id = item.get("call_id").and_then(Value::as_str).ok_or_else(|| bad_item(i, "a function_call_output needs a string `call_id`"))?;
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(v @ Value::Array(_)) => content_text(Some(v), i)?,
                _ => return Err(bad_item(i, "a function_call_output needs an `output` string")),
            };
            let mut m = OpenAiMessage::new("tool", output);
            m.extra.insert("tool_call_id".into(), call_id.into());
            messages.push(m);
            turn.calls_open = false;
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

/// One of Responses' flat function tools, its shape checked.
struct FunctionTool<'a> {
    name: &'a str,
    def: &'a Map<String, Value>,
}

impl FunctionTool<'_> {
    /// As chat's tool, its fields typed.
    fn typed(self) -> Result<Tool, ApiError> {
        Ok(Tool {
            kind: "function".into(),
            function: FunctionDef {
                name: self.name.to_string(),
                description: field(self.def, "description", "tools")?,
                parameters: self.def.get("parameters").filter(|v| !v.is_null()).cloned(),
                strict: field(self.def, "strict", "tools")?,
            },
        })
    }
}

/// Responses' tools: a list of function tools, each with a name.
fn function_tools(tools: &Value) -> Result<Vec<FunctionTool<'_>>, ApiError> {
    let Value::Array(tools) = tools else {
        return Err(ApiError::invalid_param("tools", "`tools` must be a list."));
    };
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let Some(def) = t.as_object() else {
            return Err(ApiError::invalid_param("tools", format!("tools[{i}] needs a type")));
        };
        match def.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => return Err(ApiError::invalid_param("tools", format!("tools[{i}]: tools of type '{other}' are not supported (only function)"))),
            None => return Err(ApiError::invalid_param("tools", format!("tools[{i}] needs a type"))),
        }
        let name = def.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid_param("tools", format!("tools[{i}] needs a name")))?;
        out.push(FunctionTool { name, def });
    }
    Ok(out)
}

/// `tool_choice` in chat's shape (a named function nests its name).
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

/// `text.format` that constrains the output (plain text does not).
enum TextFormat<'a> {
    JsonObject,
    JsonSchema(&'a Map<String, Value>),
}

impl TextFormat<'_> {
    /// As chat's `response_format`, its fields typed.
    fn typed(self) -> Result<ResponseFormat, ApiError> {
        let format = match self {
            TextFormat::JsonObject => return Ok(ResponseFormat { kind: "json_object".into(), json_schema: None }),
            TextFormat::JsonSchema(f) => f,
        };
        let name = match format.get("name") {
            None => Some("response".to_string()),
            Some(_) => field(format, "name", "response_format")?,
        };
        // In chat's order: a bad `strict` is named before a bad `description`.
        let schema = format.get("schema").filter(|v| !v.is_null()).cloned();
        let strict = field(format, "strict", "response_format")?;
        let description = field(format, "description", "response_format")?;
        let json_schema = JsonSchemaFormat { name, description, schema, strict };
        Ok(ResponseFormat { kind: "json_schema".into(), json_schema: Some(json_schema) })
    }
}

/// `text.format`, its type checked: None for plain text.
fn text_format(format: &Value) -> Result<Option<TextFormat<'_>>, ApiError> {
    match (format.get("type").and_then(Value::as_str), format.as_object()) {
        (Some("text"), _) => Ok(None),
        (Some("json_object"), _) => Ok(Some(TextFormat::JsonObject)),
        (Some("json_schema"), Some(f)) => Ok(Some(TextFormat::JsonSchema(f))),
        _ => Err(ApiError::invalid_param("text", "`text.format.type` must be text, json_object or json_schema")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::StopSpec;

    #[test]
    fn a_conversation_with_tools_becomes_chat() {
        let body = json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 20, "temperature": 0, "stream": true,
            "stop": ["x"], "top_logprobs": 2, "parallel_tool_calls": false,
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18C"},
                {"type": "function_call", "call_id": "c3", "name": "get_time", "arguments": "{}"}
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}}
        });
        let chat = chat_request(&body).unwrap();
        let m = chat.messages.as_deref().unwrap();
        let plain = |i: usize| (m[i].role.as_str(), m[i].content.as_str());
        assert_eq!(plain(0), ("system", "Be brief."));
        assert_eq!(plain(1), ("system", "Use tools."));
        assert_eq!(plain(2), ("user", "Weather in Paris?"));
        assert_eq!(plain(3), ("assistant", ""));
        assert_eq!(m[3].extra["tool_calls"].as_array().unwrap().len(), 2, "consecutive calls are one turn");
        assert_eq!(m[3].extra["tool_calls"][0], json!({"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}));
        assert_eq!(plain(4), ("tool", "18C"));
        assert_eq!(m[4].extra["tool_call_id"], "c1");
        assert_eq!(m[5].extra["tool_calls"].as_array().unwrap().len(), 1, "a call after a tool's answer is a new turn");
        assert_eq!(chat.model.as_deref(), Some("m"));
        assert_eq!(chat.max_completion_tokens, Some(20));
        assert_eq!((chat.logprobs, chat.top_logprobs), (Some(true), Some(2)));
        assert_eq!(chat.sampling.temperature, Some(0.0));
        assert_eq!(chat.sampling.stop, Some(StopSpec::Many(vec!["x".into()])));
        let tools = chat.tool_fields.tools.as_deref().unwrap();
        assert_eq!((tools[0].kind.as_str(), tools[0].function.name.as_str()), ("function", "get_weather"));
        assert_eq!(tools[0].function.parameters, Some(json!({"type": "object"})));
        assert_eq!(chat.tool_fields.tool_choice, Some(json!({"type": "function", "function": {"name": "get_weather"}})));
        assert_eq!(chat.tool_fields.parallel_tool_calls, Some(false));
        let rf = chat.sampling.structured.response_format.as_ref().unwrap();
        let js = rf.json_schema.as_ref().unwrap();
        assert_eq!((rf.kind.as_str(), js.name.as_deref(), js.strict), ("json_schema", Some("w"), Some(true)));
        assert_eq!(js.schema, Some(json!({"type": "object"})));
        assert_eq!(chat.sampling.stream, Some(true));
        assert_eq!(chat.sampling.stream_options.as_ref().unwrap().include_usage, Some(true));
    }

    #[test]
    fn unsupported_items_are_400s_naming_them() {
        for (body, needle) in [
            (json!({"input": [{"type": "input_image", "image_url": "x"}]}), "input_image"),
            (json!({"input": [{"role": "robot", "content": "x"}]}), "robot"),
            (json!({"input": "x", "previous_response_id": "resp_1"}), "previous_response_id"),
            (json!({"input": "x", "tools": [{"type": "web_search"}]}), "web_search"),
            (json!({"input": 5}), "input"),
            (json!({}), "required"),
        ] {
            let e = chat_request(&body).unwrap_err();
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn a_field_of_the_wrong_type_is_refused_under_chats_name() {
        for (body, param, message) in [
            (json!({"input": "x", "temperature": "hot"}), "temperature", "Invalid value for `temperature`: invalid type: string \"hot\", expected f32"),
            (json!({"input": "x", "max_output_tokens": "x"}), "max_completion_tokens", "Invalid value for `max_completion_tokens`: invalid type: string \"x\", expected u32"),
            (json!({"input": "x", "tools": [{"type": "function", "name": "f", "description": 5}]}), "tools", "Invalid value for `tools`: invalid type: integer `5`, expected a string"),
            (json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "strict": "yes"}}}), "response_format", "Invalid value for `response_format`: invalid type: string \"yes\", expected a boolean"),
        ] {
            let e = chat_request(&body).unwrap_err();
            assert_eq!((e.param.as_deref(), e.message.as_str()), (Some(param), message), "{body}");
        }
    }
}
