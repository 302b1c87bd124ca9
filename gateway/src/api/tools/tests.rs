use super::stream::{Piece, ToolStream};
use super::*;

fn fields(v: Value) -> ToolFields {
    serde_json::from_value(v).unwrap()
}

fn weather() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "now"}}])
}

const AUTO: ToolConfig = ToolConfig { auto: true, parser: Some(ParserKind::Hermes) };

#[test]
fn choices_resolve_as_vllm_does() {
    let p = plan(&fields(json!({"tools": weather()})), &AUTO).unwrap();
    assert_eq!(p.mode, ToolMode::Auto(ParserKind::Hermes));
    assert!(p.constraint.is_none() && p.template_tools.as_ref().unwrap()[0]["function"]["name"] == "get_weather");
    let e = plan(&fields(json!({"tools": weather(), "tool_choice": "auto"})), &ToolConfig::default()).unwrap_err();
    assert_eq!(e.message, "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set");
    let p = plan(&fields(json!({"tools": weather(), "tool_choice": "none"})), &ToolConfig::default()).unwrap();
    assert_eq!(p.mode, ToolMode::Off);
    assert!(p.template_tools.is_some(), "tools are rendered even with none");
    let p = plan(&fields(json!({"tools": weather(), "tool_choice": "required", "parallel_tool_calls": false})), &ToolConfig::default()).unwrap();
    let Some(Constraint::JsonSchema(s)) = &p.constraint else { panic!() };
    let s: Value = serde_json::from_str(s).unwrap();
    assert_eq!((s["minItems"].clone(), s["maxItems"].clone()), (json!(1), json!(1)));
    assert_eq!(s["items"]["anyOf"][1]["properties"]["parameters"], json!({"type": "object", "properties": {}}));
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let p = plan(&fields(json!({"tools": weather(), "tool_choice": named})), &ToolConfig::default()).unwrap();
    assert_eq!(p.mode, ToolMode::Named("get_weather".into()));
    assert_eq!(p.constraint, Some(Constraint::JsonSchema(weather()[0]["function"]["parameters"].to_string())));
}

#[test]
fn bad_tool_requests_are_400s() {
    let cfg = ToolConfig::default();
    let msg = |v: Value| plan(&fields(v), &cfg).unwrap_err().message;
    assert!(msg(json!({"tool_choice": "required"})).contains("`tools` must be set"));
    assert!(msg(json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}})).contains("nope"));
    assert!(msg(json!({"tools": weather(), "tool_choice": "sometimes"})).contains("tool_choice"));
    assert!(msg(json!({"tools": [{"type": "retrieval", "function": {"name": "x"}}]})).contains("retrieval"));
    assert!(msg(json!({"tools": [{"type": "function", "function": {"name": "x", "parameters": 3}}]})).contains("schema"));
    assert!(plan(&fields(json!({"tool_choice": "none"})), &cfg).is_ok());
    let p = plan(&fields(json!({"tools": weather(), "tool_choice": "required"})), &cfg).unwrap();
    assert!(merge_constraint(Some(Constraint::JsonObject), &p).is_err());
    assert_eq!(merge_constraint(Some(Constraint::JsonObject), &ToolPlan::off()).unwrap(), Some(Constraint::JsonObject));
    assert!(ToolConfig::new(true, None).unwrap_err().contains("--tool-call-parser"));
    assert!(ToolConfig::new(false, Some("pythonic")).is_err());
    assert_eq!(ToolConfig::new(true, Some("hermes")).unwrap(), AUTO);
}

#[test]
fn outputs_are_read_into_calls() {
    let (c, calls, f) = read_output(&ToolMode::Required, r#"[{"name": "now", "parameters": {}}]"#.into(), "stop");
    assert_eq!((c.as_str(), calls.len(), calls[0].name.as_str(), calls[0].arguments.as_str(), f), ("", 1, "now", "{}", "tool_calls"));
    let (_, calls, f) = read_output(&ToolMode::Named("get_weather".into()), r#"{"city": "Oslo"}"#.into(), "stop");
    assert_eq!((calls[0].arguments.as_str(), f), (r#"{"city": "Oslo"}"#, "stop"));
    let text = "Checking.<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>";
    let (c, calls, f) = read_output(&ToolMode::Auto(ParserKind::Hermes), text.into(), "stop");
    assert_eq!((c.as_str(), calls.len(), f), ("Checking.", 1, "tool_calls"));
    let (c, calls, f) = read_output(&ToolMode::Auto(ParserKind::Hermes), "Just text".into(), "length");
    assert_eq!((c.as_str(), calls.len(), f), ("Just text", 0, "length"));
    let c = ToolCall::from(ParsedCall { name: "f".into(), arguments: "{}".into() });
    assert!(c.id.starts_with("chatcmpl-tool-") && c.name == "f" && c.arguments == "{}");
}

/// Feeds `parts` and the finish; returns (content sent, calls sent, finish).
fn stream(mode: ToolMode, parts: &[&str], finish: &'static str) -> (String, Vec<ToolCallDelta>, &'static str) {
    let mut s = ToolStream::new(mode);
    let mut pieces: Vec<Piece> = parts.iter().flat_map(|p| s.push(p)).collect();
    let (rest, f) = s.finish(finish);
    pieces.extend(rest);
    let mut content = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Content(c) => content.push_str(&c),
            Piece::ToolCalls(c) => calls.extend(c),
        }
    }
    (content, calls, f)
}

#[test]
fn streams_hold_what_may_be_calls() {
    let (c, calls, f) = stream(ToolMode::Auto(ParserKind::Hermes), &["Sure. <to", "ol_call>{\"name\": \"now\",", " \"arguments\": {}}</tool_call>"], "stop");
    assert_eq!((c.as_str(), calls.len(), f), ("Sure. ", 1, "tool_calls"));
    assert_eq!((calls[0].index, calls[0].head.as_ref().unwrap().name.as_str()), (0, "now"));
    let (c, calls, _) = stream(ToolMode::Auto(ParserKind::Hermes), &["a <", "b"], "stop");
    assert_eq!((c.as_str(), calls.len()), ("a <b", 0));
    let (c, calls, f) = stream(ToolMode::Auto(ParserKind::Json), &[" {\"name\": \"now\", ", "\"arguments\": {}}"], "stop");
    assert_eq!((c.as_str(), calls.len(), f), ("", 1, "tool_calls"));
    let (c, _, _) = stream(ToolMode::Auto(ParserKind::Json), &["Hello", " {x}"], "stop");
    assert_eq!(c, "Hello {x}");
    let (c, calls, f) = stream(ToolMode::Named("f".into()), &["{\"a\"", ": 1}"], "stop");
    assert_eq!((c.as_str(), calls.len(), f), ("", 2, "stop"));
    assert!(calls[0].head.as_ref().is_some_and(|h| h.id.starts_with("chatcmpl-tool-") && h.name == "f") && calls[1].head.is_none());
    assert_eq!((calls[0].arguments.as_str(), calls[1].arguments.as_str(), calls[1].index), ("{\"a\"", ": 1}", 0));
    let (_, calls, f) = stream(ToolMode::Required, &["[{\"name\": \"f\", ", "\"parameters\": {\"a\": 1}}]"], "stop");
    assert_eq!((calls[0].arguments.as_str(), f), ("{\"a\":1}", "tool_calls"));
}

#[test]
fn template_messages_get_argument_objects() {
    let m: ChatMessage = serde_json::from_value(json!({"role": "assistant", "content": "",
        "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]})).unwrap();
    let out = template_messages(vec![m]);
    assert_eq!(out[0].extra["tool_calls"][0]["function"]["arguments"], json!({"a": 1}));
}
