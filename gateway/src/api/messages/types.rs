//! Anthropic's Messages API bodies, typed: the request (`POST /v1/messages`
//! and `/v1/messages/count_tokens`), the message answered, and the stream's
//! events. Request fields are optional at the serde level, as everywhere in
//! the gateway, so a missing one is refused naming it and a field of the
//! wrong type is found by `params::parse_json`; unknown fields are ignored
//! (Anthropic's `cache_control`, `citations`, `thinking`, ...).

use std::fmt;
use std::marker::PhantomData;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::api::types::SamplingFields;

/// A Messages request. `temperature`, `top_p`, `top_k` and `stream` are read
/// with the vLLM sampling extras (`seed`, `min_p`, `repetition_penalty`, ...)
/// from the flattened [`SamplingFields`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct MessagesRequest {
    pub model: Option<String>,
    /// Required by `/v1/messages` (not by `count_tokens`).
    pub max_tokens: Option<u32>,
    pub messages: Option<Vec<InputMessage>>,
    pub system: Option<TextOrBlocks<SystemBlock>>,
    pub stop_sequences: Option<Vec<String>>,
    pub metadata: Option<Metadata>,
    pub tools: Option<Vec<ToolParam>>,
    pub tool_choice: Option<ToolChoiceParam>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `metadata`: only `user_id` is read (as chat's `user`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct Metadata {
    pub user_id: Option<String>,
}

/// One turn of the conversation.
#[derive(Debug, Deserialize)]
pub(crate) struct InputMessage {
    pub role: Role,
    pub content: TextOrBlocks<InputBlock>,
}

/// Who speaks a turn (the system prompt is `system`, not a role).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    User,
    Assistant,
}

/// A content field: a string, or a list of typed blocks. Read with a visitor
/// rather than as an untagged enum, so a bad block's own error (an unknown
/// `type`, a missing `text`) reaches the client.
#[derive(Debug, PartialEq)]
pub(crate) enum TextOrBlocks<T> {
    Text(String),
    Blocks(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for TextOrBlocks<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = TextOrBlocks<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of content blocks")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(TextOrBlocks::Text(s.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(TextOrBlocks::Text(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // The body's size bounds the list; the hint only sizes the first allocation.
                let mut blocks = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(b) = seq.next_element()? {
                    blocks.push(b);
                }
                Ok(TextOrBlocks::Blocks(blocks))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A block of the system prompt.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum SystemBlock {
    Text { text: String },
}

/// A block of a message's content.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum InputBlock {
    Text {
        text: String,
    },
    /// Refused: the served models read text only.
    Image,
    /// Refused, as images are.
    Document,
    /// A call the assistant made (assistant turns only).
    ToolUse {
        id: String,
        name: String,
        /// The call's arguments: any JSON object.
        #[serde(default)]
        input: Value,
    },
    /// A call's answer (user turns only).
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<TextOrBlocks<ToolResultBlock>>,
        #[serde(default)]
        is_error: Option<bool>,
    },
    /// Earlier turns' thinking: dropped, as Anthropic drops it from the prompt.
    Thinking,
    /// Dropped, as `thinking` is.
    RedactedThinking,
}

/// A block of a tool result's content.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToolResultBlock {
    Text { text: String },
    /// Refused: the served models read text only.
    Image,
}

/// A client tool: its name, what it does, and its input's JSON schema.
#[derive(Debug, Deserialize)]
pub(crate) struct ToolParam {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// Absent or "custom" for a client tool; Anthropic's server tools
    /// (`web_search_...`, `bash_...`) are refused.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// `tool_choice`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToolChoiceParam {
    /// The model decides.
    Auto {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    /// Some tool must be called.
    Any {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    /// This tool must be called.
    Tool {
        name: String,
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    /// No tool is called.
    #[serde(rename = "none")]
    NoTool,
}

// ---------------------------------------------------------------- responses

/// The message answered (and, empty, the one `message_start` opens).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct MessageResponse {
    pub id: String,
    /// Always "message".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always "assistant".
    pub role: &'static str,
    pub model: String,
    pub content: Vec<OutputBlock>,
    /// end_turn, max_tokens, stop_sequence, tool_use or
    /// model_context_window_exceeded; null while streaming.
    pub stop_reason: Option<&'static str>,
    /// The stop sequence that ended the message, if one did.
    pub stop_sequence: Option<String>,
    pub usage: MessageUsage,
}

/// Token counts: the whole prompt (prefix-cached tokens included, as
/// `count_tokens` counts it) and the tokens generated.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub(crate) struct MessageUsage {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// A block of the answer.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum OutputBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        /// The arguments as JSON (an object when the model kept to the schema).
        input: Value,
    },
}

/// The answer of `count_tokens`.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub(crate) struct TokenCount {
    pub input_tokens: usize,
}

/// One event of a streamed message; its `type` is also the SSE event name.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum StreamEvent {
    MessageStart { message: MessageResponse },
    ContentBlockStart { index: usize, content_block: OutputBlock },
    Ping,
    ContentBlockDelta { index: usize, delta: BlockDelta },
    ContentBlockStop { index: usize },
    MessageDelta { delta: MessageDeltaBody, usage: MessageUsage },
    MessageStop,
    /// A failure after the stream began (and the body of every error answer).
    Error { error: ErrorObject },
}

impl StreamEvent {
    /// The SSE `event:` name: the event's `type`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart { .. } => "message_start",
            StreamEvent::ContentBlockStart { .. } => "content_block_start",
            StreamEvent::Ping => "ping",
            StreamEvent::ContentBlockDelta { .. } => "content_block_delta",
            StreamEvent::ContentBlockStop { .. } => "content_block_stop",
            StreamEvent::MessageDelta { .. } => "message_delta",
            StreamEvent::MessageStop => "message_stop",
            StreamEvent::Error { .. } => "error",
        }
    }
}

/// What a content block adds.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum BlockDelta {
    TextDelta { text: String },
    /// More of a tool call's input, as JSON text.
    InputJsonDelta { partial_json: String },
}

/// `message_delta`'s delta: how the message ended.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct MessageDeltaBody {
    pub stop_reason: &'static str,
    pub stop_sequence: Option<String>,
}

/// Anthropic's error object: `{"type": "invalid_request_error", "message": ...}`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ErrorObject {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_is_a_string_or_typed_blocks_with_their_own_errors() {
        let m: InputMessage = serde_json::from_value(json!({"role": "user", "content": "hi"})).unwrap();
        assert_eq!((m.role, m.content), (Role::User, TextOrBlocks::Text("hi".into())));
        let m: InputMessage = serde_json::from_value(json!({"role": "assistant", "content": [
            {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"x": 1}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}},
            {"type": "thinking", "thinking": "hm", "signature": "s"}
        ]}))
        .unwrap();
        let TextOrBlocks::Blocks(b) = m.content else { panic!("blocks") };
        assert_eq!(b[0], InputBlock::Text { text: "a".into() });
        assert_eq!(b[1], InputBlock::ToolUse { id: "toolu_1".into(), name: "f".into(), input: json!({"x": 1}) });
        assert_eq!((&b[2], &b[3]), (&InputBlock::Image, &InputBlock::Thinking));
        for (content, needle) in [
            (json!([{"type": "audio"}]), "unknown variant `audio`"),
            (json!([{"type": "text"}]), "missing field `text`"),
            (json!(5), "expected a string or a list of content blocks"),
        ] {
            let e = serde_json::from_value::<InputMessage>(json!({"role": "user", "content": content})).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
        let e = serde_json::from_value::<InputMessage>(json!({"role": "system", "content": "x"})).unwrap_err();
        assert!(e.to_string().contains("unknown variant `system`"), "{e}");
    }

    #[test]
    fn tool_choices_and_tool_results() {
        let c = |v: Value| serde_json::from_value::<ToolChoiceParam>(v).unwrap();
        assert_eq!(c(json!({"type": "auto"})), ToolChoiceParam::Auto { disable_parallel_tool_use: None });
        assert_eq!(c(json!({"type": "any", "disable_parallel_tool_use": true})), ToolChoiceParam::Any { disable_parallel_tool_use: Some(true) });
        assert_eq!(c(json!({"type": "tool", "name": "f"})), ToolChoiceParam::Tool { name: "f".into(), disable_parallel_tool_use: None });
        assert_eq!(c(json!({"type": "none"})), ToolChoiceParam::NoTool);
        assert!(serde_json::from_value::<ToolChoiceParam>(json!({"type": "tool"})).is_err());
        let b: InputBlock = serde_json::from_value(json!({"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "18C"}], "is_error": false})).unwrap();
        assert_eq!(b, InputBlock::ToolResult {
            tool_use_id: "t".into(),
            content: Some(TextOrBlocks::Blocks(vec![ToolResultBlock::Text { text: "18C".into() }])),
            is_error: Some(false),
        });
    }

    #[test]
    fn events_serialize_in_anthropics_shape() {
        let ev = StreamEvent::ContentBlockDelta { index: 1, delta: BlockDelta::InputJsonDelta { partial_json: "{\"a\":".into() } };
        assert_eq!(serde_json::to_value(&ev).unwrap(), json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}));
        assert_eq!(ev.name(), "content_block_delta");
        for ev in [StreamEvent::Ping, StreamEvent::MessageStop, StreamEvent::ContentBlockStop { index: 0 }] {
            assert_eq!(serde_json::to_value(&ev).unwrap()["type"], ev.name());
        }
        let block = OutputBlock::ToolUse { id: "toolu_1".into(), name: "f".into(), input: json!({}) };
        assert_eq!(serde_json::to_value(&block).unwrap(), json!({"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}));
    }
}
