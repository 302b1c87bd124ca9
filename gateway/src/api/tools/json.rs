//! Tool calls written as bare JSON (Llama 3's JSON tool calling, vLLM's
//! `llama3_json`): the whole output is one call object, an array of them, or
//! several separated by `;`, optionally after `<|python_tag|>`. Each object
//! has `name` and `arguments` (or `parameters`). Anything else is content.

use super::ParsedCall;

const PYTHON_TAG: &str = "<|python_tag|>";

/// Whether `text` (what the model wrote so far) may be the start of JSON
/// tool calls: the streamer then holds it back instead of sending content.
pub(crate) fn may_start(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty() || t.starts_with('{') || t.starts_with('[') || PYTHON_TAG.starts_with(t) || t.starts_with(PYTHON_TAG)
}

/// The calls, or none when the output is not entirely tool-call JSON.
pub(crate) fn parse(text: &str) -> Vec<ParsedCall> {
    let t = text.trim();
    let mut rest = t.strip_prefix(PYTHON_TAG).unwrap_or(t).trim_start();
    if !(rest.starts_with('{') || rest.starts_with('[')) {
        return Vec::new();
    }
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
        let items = match values.next() {
            Some(Ok(serde_json::Value::Array(items))) => items,
            Some(Ok(v)) => vec![v],
            _ => return Vec::new(),
        };
        for v in items {
            match super::call_from_value(v) {
                Some(c) => calls.push(c),
                None => return Vec::new(),
            }
        }
        // Calls may be separated by `;` and whitespace.
        rest = rest[values.byte_offset()..].trim_start_matches(|c: char| c == ';' || c.is_whitespace());
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_arrays_and_separated_calls() {
        let one = parse(r#"{"name": "f", "arguments": {"a": 1}}"#);
        assert_eq!((one[0].name.as_str(), one[0].arguments.as_str()), ("f", r#"{"a":1}"#));
        let params = parse(r#"<|python_tag|>{"name": "g", "parameters": {"b": "x"}}"#);
        assert_eq!(params[0].arguments, r#"{"b":"x"}"#);
        assert_eq!(parse(r#"[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]"#).len(), 2);
        assert_eq!(parse(r#"{"name": "f", "arguments": {}}; {"name": "g", "arguments": {}}"#).len(), 2);
    }

    #[test]
    fn anything_else_is_content() {
        assert!(parse("The weather is fine.").is_empty());
        assert!(parse(r#"{"name": "f", "arguments": {}} and then text"#).is_empty());
        assert!(parse(r#"{"city": "Paris"}"#).is_empty());
        assert!(parse(r#"{"name": "f", "arguments": {"#).is_empty());
        assert!(may_start("  {\"na") && may_start("<|python") && may_start("") && !may_start("Sure"));
    }
}
