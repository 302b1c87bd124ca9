//! The Hermes tool-call format (Hermes, Qwen2/2.5, SmolLM templates): JSON
//! objects `{"name": ..., "arguments": {...}}` inside `<tool_call>` ...
//! `</tool_call>` blocks, after optional plain content. As vLLM's
//! `hermes` parser: text before the first block is the content; a block that
//! is not valid JSON makes the whole output plain content.

use super::ParsedCall;

pub(crate) const START: &str = "<tool_call>";
const END: &str = "</tool_call>";

/// (content before the calls, the calls); no calls when the text has none or
/// one of them does not parse.
pub(crate) fn parse(text: &str) -> (String, Vec<ParsedCall>) {
    let Some(first) = text.find(START) else { return (text.to_string(), Vec::new()) };
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(at) = rest.find(START) {
        let body_start = at + START.len();
        // The last block may be cut short of its end tag (max_tokens, or an
        // EOS the model put in its place): what is there is still a call.
        let (body, next) = match rest[body_start..].find(END) {
            Some(e) => (&rest[body_start..body_start + e], &rest[body_start + e + END.len()..]),
            None => (&rest[body_start..], ""),
        };
        match super::call_from_json(body.trim()) {
            Some(c) => calls.push(c),
            None => return (text.to_string(), Vec::new()),
        }
        rest = next;
    }
    (text[..first].to_string(), calls)
}

/// How much of `text`'s end could be the start of a `<tool_call>` tag: the
/// streamer holds that much back until it knows.
pub(crate) fn partial_start(text: &str) -> usize {
    (1..START.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.is_char_boundary(text.len() - k) && START.starts_with(&text[text.len() - k..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_content_become_calls() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>";
        let (content, calls) = parse(text);
        assert_eq!(content, "Let me check.\n");
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("get_weather", "{\"city\":\"Paris\"}"));
        assert_eq!((calls[1].name.as_str(), calls[1].arguments.as_str()), ("now", "{}"));
    }

    #[test]
    fn unterminated_last_block_and_bad_json() {
        let (c, calls) = parse("<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}");
        assert_eq!((c.as_str(), calls.len(), calls[0].arguments.as_str()), ("", 1, "{\"x\":1}"));
        let text = "<tool_call>{\"name\": oops}</tool_call>";
        assert_eq!(parse(text), (text.to_string(), vec![]));
        assert_eq!(parse("no calls here"), ("no calls here".to_string(), vec![]));
    }

    #[test]
    fn partial_tags_are_held_back() {
        assert_eq!(partial_start("Hello <tool"), 5);
        assert_eq!(partial_start("Hello <"), 1);
        assert_eq!(partial_start("Hello"), 0);
        assert_eq!(partial_start("a <tool_call"), 10);
        assert_eq!(partial_start("é"), 0);
    }
}
