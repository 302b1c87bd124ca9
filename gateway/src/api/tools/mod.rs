//! Tool calling on chat completions, as vLLM serves it: `tools` go to the
//! chat template, `tool_choice` picks how calls are made, and calls come back
//! as `message.tool_calls` (streamed as `delta.tool_calls`).
//!
//! - `none`: the model answers in text (the tools are still rendered, as in vLLM).
//! - `auto`: the model decides; its text is parsed by the server's
//!   `--tool-call-parser` (needs `--enable-auto-tool-choice`).
//! - `required` / a named function: a structured-output constraint makes the
//!   model write the calls' JSON, so their arguments always parse.

pub(crate) mod hermes;
pub(crate) mod json;
pub(crate) mod stream;

use ferry_engine::tokenizer::ChatMessage;
use ferry_transport::Constraint;
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::ApiError;

/// Most tools one request may define.
pub(crate) const MAX_TOOLS: usize = 128;

/// The request fields of tool calling.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct ToolFields {
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, serde::Serialize)]
pub(crate) struct Tool {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionDef,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq, serde::Serialize)]
pub(crate) struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Which parser reads tool calls out of the model's text (`--tool-call-parser`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParserKind {
    /// `<tool_call>{...}</tool_call>` blocks (Hermes, Qwen2, SmolLM).
    Hermes,
    /// Bare JSON calls (Llama 3's format; vLLM's `llama3_json`).
    Json,
}

impl ParserKind {
    pub(crate) const NAMES: &'static [&'static str] = &["hermes", "json", "llama3_json"];

    pub(crate) fn from_name(name: &str) -> Option<ParserKind> {
        match name {
            "hermes" => Some(ParserKind::Hermes),
            "json" | "llama3_json" => Some(ParserKind::Json),
            _ => None,
        }
    }
}

/// The server's tool-calling settings (`ferry serve` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ToolConfig {
    /// `--enable-auto-tool-choice`.
    pub auto: bool,
    /// `--tool-call-parser`.
    pub parser: Option<ParserKind>,
}

impl ToolConfig {
    /// vLLM's rule: auto tool choice needs a parser to read the calls.
    pub(crate) fn new(auto: bool, parser: Option<&str>) -> Result<ToolConfig, String> {
        let parser = match parser {
            None => None,
            Some(n) => Some(ParserKind::from_name(n).ok_or_else(|| {
                format!("--tool-call-parser {n:?} is not known; choose one of {}", ParserKind::NAMES.join(", "))
            })?),
        };
        if auto && parser.is_none() {
            return Err("--enable-auto-tool-choice requires --tool-call-parser".into());
        }
        Ok(ToolConfig { auto, parser })
    }
}

/// How one request's output is to be read.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ToolMode {
    /// Plain content.
    Off,
    /// Parse calls out of the text, if the model made any.
    Auto(ParserKind),
    /// The output is a JSON array of `{name, parameters}`.
    Required,
    /// The output is the named function's arguments.
    Named(String),
}

/// A request's tool calling, resolved and checked.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ToolPlan {
    pub mode: ToolMode,
    /// The tools as the chat template gets them (None: no `tools` variable).
    pub template_tools: Option<Value>,
    /// What `required` or a named choice asks the engine to enforce.
    pub constraint: Option<Constraint>,
}

impl ToolPlan {
    pub(crate) fn off() -> ToolPlan {
        ToolPlan { mode: ToolMode::Off, template_tools: None, constraint: None }
    }
}

enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

fn parse_choice(v: &Value) -> Result<Choice, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "tool_choice",
            "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}.",
        )
    };
    match v {
        Value::String(s) => match s.as_str() {
            "none" => Ok(Choice::None),
            "auto" => Ok(Choice::Auto),
            "required" => Ok(Choice::Required),
            _ => Err(bad()),
        },
        Value::Object(o) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(bad)?;
            Ok(Choice::Named(name.to_string()))
        }
        _ => Err(bad()),
    }
}

fn parameters(t: &Tool) -> Value {
    t.function.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}))
}

/// Resolves `tools` and `tool_choice` against the server's settings, with
/// vLLM's rules and messages.
pub(crate) fn plan(f: &ToolFields, cfg: &ToolConfig) -> Result<ToolPlan, ApiError> {
    let tools = f.tools.as_deref().unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid_param("tools", format!("At most {MAX_TOOLS} tools are allowed, got {}.", tools.len())));
    }
    for t in tools {
        if t.kind != "function" {
            return Err(ApiError::invalid_param("tools", format!("Unsupported tool type {:?}: only \"function\" tools are supported.", t.kind)));
        }
        if t.function.name.is_empty() {
            return Err(ApiError::invalid_param("tools", "Every function needs a name."));
        }
        if t.function.parameters.as_ref().is_some_and(|p| !p.is_object()) {
            return Err(ApiError::invalid_param("tools", format!("The parameters of function {:?} must be a JSON schema object.", t.function.name)));
        }
    }
    // vLLM: with tools and no tool_choice, the choice is "auto".
    let choice = match (&f.tool_choice, tools.is_empty()) {
        (Some(v), _) => parse_choice(v)?,
        (None, false) => Choice::Auto,
        (None, true) => Choice::None,
    };
    if tools.is_empty() {
        return match choice {
            Choice::None => Ok(ToolPlan::off()),
            _ => Err(ApiError::invalid_param("tool_choice", "When using `tool_choice`, `tools` must be set.")),
        };
    }
    let template_tools = Some(serde_json::to_value(tools).map_err(|e| ApiError::internal(e.to_string()))?);
    let (mode, constraint) = match choice {
        Choice::None => (ToolMode::Off, None),
        Choice::Auto => match (cfg.auto, cfg.parser) {
            (true, Some(p)) => (ToolMode::Auto(p), None),
            _ => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
                ))
            }
        },
        Choice::Required => {
            let alts: Vec<Value> = tools
                .iter()
                .map(|t| {
                    json!({
                        "type": "object",
                        "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": parameters(t)},
                        "required": ["name", "parameters"],
                        "additionalProperties": false
                    })
                })
                .collect();
            let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": alts}});
            if f.parallel_tool_calls == Some(false) {
                schema["maxItems"] = json!(1);
            }
            (ToolMode::Required, Some(Constraint::JsonSchema(schema.to_string())))
        }
        Choice::Named(name) => {
            let t = tools.iter().find(|t| t.function.name == name).ok_or_else(|| {
                ApiError::invalid_param("tool_choice", format!("Tool '{name}' has not been passed in `tools`."))
            })?;
            (ToolMode::Named(name), Some(Constraint::JsonSchema(parameters(t).to_string())))
        }
    };
    Ok(ToolPlan { mode, template_tools, constraint })
}

/// The request's constraint: a structured-outputs one, or the one a tool
/// choice needs; both at once is a 400.
pub(crate) fn merge_constraint(structured: Option<Constraint>, plan: &ToolPlan) -> Result<Option<Constraint>, ApiError> {
    match (structured, &plan.constraint) {
        (Some(_), Some(_)) => Err(ApiError::invalid_param(
            "tool_choice",
            "A `required` or named `tool_choice` cannot be combined with a structured outputs constraint.",
        )),
        (s, t) => Ok(s.or_else(|| t.clone())),
    }
}

/// Messages as the template wants them: assistant `tool_calls` carry their
/// arguments as JSON objects, not the JSON strings the API uses (vLLM does
/// the same before rendering), so templates can `tojson` them.
pub(crate) fn template_messages(mut messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    for m in &mut messages {
        let Some(Value::Array(calls)) = m.extra.get_mut("tool_calls") else { continue };
        for c in calls {
            if let Some(args) = c.get_mut("function").and_then(|f| f.get_mut("arguments")) {
                if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
                    *args = parsed;
                }
            }
        }
    }
    messages
}

/// A tool call the model made, whole: what every API renders its calls from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ToolCall {
    /// `chatcmpl-tool-...`, given when the call was read.
    pub id: String,
    pub name: String,
    /// The arguments as a JSON string (the API's form).
    pub arguments: String,
}

impl ToolCall {
    /// A call read from the output, with a new id.
    pub(crate) fn new(name: String, arguments: String) -> ToolCall {
        ToolCall { id: super::new_response_id("chatcmpl-tool"), name, arguments }
    }
}

impl From<ParsedCall> for ToolCall {
    fn from(c: ParsedCall) -> ToolCall {
        ToolCall::new(c.name, c.arguments)
    }
}

/// A piece of a tool call as it streams: the call's first piece names it, the
/// others add to its arguments.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ToolCallDelta {
    /// The call's place among its choice's calls.
    pub index: usize,
    /// On the call's first piece only.
    pub head: Option<ToolCallHead>,
    /// More of the arguments' JSON text.
    pub arguments: String,
}

/// What a call's first piece says of it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ToolCallHead {
    pub id: String,
    pub name: String,
}

impl ToolCallDelta {
    /// A whole call as one piece.
    pub(crate) fn whole(index: usize, c: ToolCall) -> ToolCallDelta {
        ToolCallDelta { index, head: Some(ToolCallHead { id: c.id, name: c.name }), arguments: c.arguments }
    }
}

/// One call as a parser read it from the model's output.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ParsedCall {
    pub name: String,
    /// The arguments as a JSON string (the API's form).
    pub arguments: String,
}

/// `{"name": ..., "arguments" | "parameters": {...}}` as a call.
fn call_from_value(v: Value) -> Option<ParsedCall> {
    let Value::Object(mut o) = v else { return None };
    let name = o.get("name")?.as_str()?.to_string();
    let args = o.remove("arguments").or_else(|| o.remove("parameters")).unwrap_or_else(|| json!({}));
    // Arguments sent as a JSON string are passed through as they are.
    let arguments = match args {
        Value::String(s) => s,
        v => v.to_string(),
    };
    Some(ParsedCall { name, arguments })
}

fn call_from_json(text: &str) -> Option<ParsedCall> {
    call_from_value(serde_json::from_str(text).ok()?)
}

/// The calls a `required` choice's output holds (a JSON array of
/// `{name, parameters}`); None when it does not parse (cut by max_tokens).
fn required_calls(text: &str) -> Option<Vec<ParsedCall>> {
    match serde_json::from_str::<Value>(text).ok()? {
        Value::Array(items) => items.into_iter().map(call_from_value).collect(),
        _ => None,
    }
}

/// What one finished choice says: its content, its calls and its finish
/// reason, as vLLM reads them.
pub(crate) fn read_output(mode: &ToolMode, text: String, finish: &'static str) -> (String, Vec<ToolCall>, &'static str) {
    let (content, calls, finish) = parse_output(mode, text, finish);
    (content, calls.into_iter().map(ToolCall::from).collect(), finish)
}

fn parse_output(mode: &ToolMode, text: String, finish: &'static str) -> (String, Vec<ParsedCall>, &'static str) {
    // vLLM reports "tool_calls" for auto and required calls; a named choice
    // keeps its own reason, as OpenAI does.
    let tool_finish = |calls: &Vec<ParsedCall>| if calls.is_empty() || finish != "stop" { finish } else { "tool_calls" };
    match mode {
        ToolMode::Off => (text, Vec::new(), finish),
        ToolMode::Named(name) => (String::new(), vec![ParsedCall { name: name.clone(), arguments: text }], finish),
        ToolMode::Required => match required_calls(&text) {
            Some(calls) => {
                let f = tool_finish(&calls);
                (String::new(), calls, f)
            }
            None => (text, Vec::new(), finish),
        },
        ToolMode::Auto(ParserKind::Hermes) => {
            let (content, calls) = hermes::parse(&text);
            let f = if calls.is_empty() { finish } else { "tool_calls" };
            (content, calls, f)
        }
        ToolMode::Auto(ParserKind::Json) => {
            let calls = json::parse(&text);
            if calls.is_empty() {
                (text, calls, finish)
            } else {
                (String::new(), calls, "tool_calls")
            }
        }
    }
}

#[cfg(test)]
mod tests;
