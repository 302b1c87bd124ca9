//! Request and response bodies of the OpenAI API, in the shapes vLLM's server uses.
//!
//! Every request field is optional at the serde level (`#[serde(default)]`): required
//! ones are checked afterwards so that the error can name the field, and a field of
//! the wrong type is found by [`super::params::parse_json`] probing one key at a time.
//! Unknown fields are ignored, as vLLM ignores them.

use ferry_engine::tokenizer::ChatMessage;
use serde::{Deserialize, Deserializer, Serialize};

/// One message of a chat request, in OpenAI's shape.
///
/// `content` is a string, null (read as ""), or a list of parts of which the
/// `{"type": "text", "text": ..}` ones (and bare strings) are joined with
/// newlines, as vLLM does; other part types are refused. The message's other
/// fields (`tool_calls` of an assistant message, `tool_call_id` and `name` of a
/// tool's answer, ...) are kept as they came, for the chat template.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(crate) struct OpenAiMessage {
    pub role: String,
    #[serde(default, deserialize_with = "content_text")]
    pub content: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl OpenAiMessage {
    pub(crate) fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        OpenAiMessage { role: role.into(), content: content.into(), extra: serde_json::Map::new() }
    }

    /// The message as the engine's chat template takes it.
    pub(crate) fn to_template(&self) -> ChatMessage {
        ChatMessage { role: self.role.clone(), content: self.content.clone(), extra: self.extra.clone() }
    }
}

/// OpenAI's forms of a message's `content`, as one text.
fn content_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
        Null(()),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Part {
        Text(String),
        Typed {
            #[serde(rename = "type")]
            ty: String,
            #[serde(default)]
            text: Option<String>,
        },
    }
    let content = Content::deserialize(d).map_err(|_| {
        serde::de::Error::custom("message content must be a string, null or a list of content parts")
    })?;
    Ok(match content {
        Content::Text(s) => s,
        Content::Null(()) => String::new(),
        Content::Parts(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                match p {
                    Part::Text(s) => texts.push(s),
                    Part::Typed { ty, text } if ty == "text" => texts.push(text.ok_or_else(|| {
                        serde::de::Error::custom("a content part of type 'text' has no 'text' field")
                    })?),
                    Part::Typed { ty, .. } => {
                        return Err(serde::de::Error::custom(format!(
                            "content parts of type '{ty}' are not supported (only 'text')"
                        )))
                    }
                }
            }
            texts.join("\n")
        }
    })
}

/// `prompt` of /v1/completions: text, texts, token ids, or lists of token ids.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub(crate) enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or several.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub(crate) enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    /// The stop strings, one or many, without copying them.
    pub(crate) fn as_slice(&self) -> &[String] {
        match self {
            StopSpec::One(s) => std::slice::from_ref(s),
            StopSpec::Many(v) => v,
        }
    }

    pub(crate) fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct StreamOptions {
    pub include_usage: Option<bool>,
    pub continuous_usage_stats: Option<bool>,
}

/// `seed` within a 64-bit signed integer, refused outside it with pydantic's
/// wording for vLLM's bounds (`Input should be less than or equal to
/// 9223372036854775807`); integers past `u64` arrive from serde_json as floats.
fn seed_in_range<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    if let Some(i) = n.as_i64() {
        return Ok(Some(i));
    }
    let too_big = || Error::custom(format!("Input should be less than or equal to {}", i64::MAX));
    let too_small = || Error::custom(format!("Input should be greater than or equal to {}", i64::MIN));
    if n.as_u64().is_some() {
        return Err(too_big());
    }
    match n.as_f64() {
        Some(f) if f.fract() != 0.0 || !f.is_finite() => {
            Err(Error::custom("Input should be a valid integer, got a number with a fractional part"))
        }
        Some(f) if f > 0.0 => Err(too_big()),
        Some(_) => Err(too_small()),
        None => Err(Error::custom("Input should be a valid integer")),
    }
}

/// The sampling and stopping fields both endpoints share (vLLM's extras included).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopSpec>,
    /// Any 64-bit signed integer, as vLLM's `Field(ge=_LONG_INFO.min, le=_LONG_INFO.max)`.
    #[serde(deserialize_with = "seed_in_range")]
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub user: Option<String>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub include_stop_str_in_output: Option<bool>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u32>,
    pub skip_special_tokens: Option<bool>,
    pub add_special_tokens: Option<bool>,
    /// Token id (as a string) -> bias in [-100, 100] (larger values are clamped).
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// vLLM's `prompt_logprobs`: alternatives for each prompt token.
    pub prompt_logprobs: Option<u32>,
    /// vLLM's `priority`: lower is scheduled sooner (engines with
    /// `--scheduling-policy priority`; others take only 0).
    pub priority: Option<i64>,
    /// response_format, structured_outputs, guided_*.
    #[serde(flatten)]
    pub structured: super::structured::StructuredFields,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<u32>,
    /// Top alternatives per token (0..=20).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<OpenAiMessage>>,
    pub max_tokens: Option<u32>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub template: TemplateFields,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// tools, tool_choice, parallel_tool_calls.
    #[serde(flatten)]
    pub tool_fields: super::tools::ToolFields,
    /// Not a request field: set by an API whose `max_tokens` is a ceiling
    /// (Anthropic's Messages API), so that one above the room the context
    /// leaves is cut to it rather than refused.
    #[serde(skip)]
    pub max_tokens_is_ceiling: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<OpenAiMessage>>,
    #[serde(flatten)]
    pub template: TemplateFields,
    pub add_special_tokens: Option<bool>,
    pub return_token_strs: Option<bool>,
    /// llama.cpp's form: the text to tokenize (instead of vLLM's `prompt`).
    pub content: Option<String>,
    /// llama.cpp's `add_special` (default false) for `content`.
    pub add_special: Option<bool>,
    /// llama.cpp's `with_pieces`: each token as `{id, piece}`.
    pub with_pieces: Option<bool>,
}

/// How a chat is rendered: the fields chat completions and /tokenize share
/// (checked by `chat::render_options`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct TemplateFields {
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    /// A template for this request instead of the model's (needs
    /// `--trust-request-chat-template`, as in vLLM).
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Option<Vec<u32>>,
}

// ---------------------------------------------------------------- responses

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub(crate) struct Usage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
    pub completion_tokens: u32,
    /// Always present (vLLM's `--enable-prompt-tokens-details`, on here).
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub(crate) struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

impl Usage {
    pub(crate) fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: PromptTokensDetails::default(),
        }
    }

    pub(crate) fn with_cached(mut self, cached_tokens: u32) -> Self {
        self.prompt_tokens_details.cached_tokens = cached_tokens;
        self
    }
}

/// Why a choice stopped beyond its finish reason: the stop string matched, or the
/// stop token id sampled (null for EOS and length), as vLLM's `stop_reason`.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StopReason {
    Text(String),
    Token(u32),
}

/// Completions' logprobs (the legacy OpenAI shape).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub(crate) struct CompletionLogprobs {
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f32>>,
    pub tokens: Vec<String>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReason>,
    /// vLLM's `prompt_logprobs` (see `logprobs::vllm_prompt_logprobs`): on
    /// every choice of a response, null when not asked for, as vLLM's
    /// `CompletionResponseChoice` carries it.
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// A choice in a streamed completion's chunk: vLLM's
/// `CompletionResponseStreamChoice`, which has no `prompt_logprobs`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct CompletionStreamChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReason>,
}

/// Per prompt token: null for the first, then token id -> {logprob, rank, decoded_token}.
pub(crate) type PromptLogprobs = Vec<Option<serde_json::Map<String, serde_json::Value>>>;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

/// One SSE event of a streamed completion (`usage` only when asked for).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct CompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionStreamChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Chat's logprobs: `{"content": [ {token, logprob, bytes, top_logprobs} ]}`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub(crate) struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatResponseMessage {
    pub role: &'static str,
    pub content: String,
    pub tool_calls: Vec<ChatToolCall>,
}

/// A tool call in a chat response's message.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: ChatFunctionCall,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatFunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A piece of a tool call in a chunk's `delta.tool_calls`: `id`, `type` and
/// the function's name come with the call's first piece only.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: ChatFunctionDelta,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatFunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatChoice {
    pub index: u32,
    pub message: ChatResponseMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReason>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM's `ChatCompletionResponse.prompt_logprobs`: at the response's
    /// level (one prompt for all choices), null when not asked for.
    pub prompt_logprobs: Option<PromptLogprobs>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub(crate) struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ChatToolCallDelta>>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatStreamChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// Present only on a choice's last chunk (vLLM sets it there alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Option<StopReason>>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatStreamChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn message_content_forms() {
        let m: OpenAiMessage = serde_json::from_str(r#"{"role":"user","content":"hi"}"#).unwrap();
        assert_eq!((m.role.as_str(), m.content.as_str(), m.extra.len()), ("user", "hi", 0));
        let m: OpenAiMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},"b",{"type":"text","text":"c"}]}"#,
        )
        .unwrap();
        assert_eq!(m.content, "a\nb\nc");
        let m: OpenAiMessage = serde_json::from_str(r#"{"role":"assistant","content":null}"#).unwrap();
        assert_eq!(m.content, "");
        let m: OpenAiMessage = serde_json::from_str(r#"{"role":"assistant"}"#).unwrap();
        assert_eq!(m.content, "");
        let e = serde_json::from_str::<OpenAiMessage>(
            r#"{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("content parts of type 'image_url' are not supported (only 'text')"), "{e}");
        let e = serde_json::from_str::<OpenAiMessage>(r#"{"role":"user","content":[{"type":"text"}]}"#).unwrap_err();
        assert!(e.to_string().contains("a content part of type 'text' has no 'text' field"), "{e}");
        let e = serde_json::from_str::<OpenAiMessage>(r#"{"role":"user","content":5}"#).unwrap_err();
        assert!(e.to_string().contains("message content must be a string, null or a list of content parts"), "{e}");
    }

    #[test]
    fn a_message_reaches_the_template_with_its_other_fields() {
        let m: OpenAiMessage = serde_json::from_value(json!({"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "c1"})).unwrap();
        let t = m.to_template();
        assert_eq!((t.role.as_str(), t.content.as_str(), &t.extra["tool_call_id"]), ("tool", "42", &json!("c1")));
    }

    #[test]
    fn prompt_forms_parse() {
        let p = |v: serde_json::Value| serde_json::from_value::<Prompt>(v).unwrap();
        assert_eq!(p(json!("hi")), Prompt::Text("hi".into()));
        assert_eq!(p(json!(["a", "b"])), Prompt::Texts(vec!["a".into(), "b".into()]));
        assert_eq!(p(json!([1, 2])), Prompt::Tokens(vec![1, 2]));
        assert_eq!(p(json!([[1], [2, 3]])), Prompt::TokenLists(vec![vec![1], vec![2, 3]]));
        assert!(serde_json::from_value::<Prompt>(json!([-1])).is_err());
        assert!(serde_json::from_value::<Prompt>(json!({"a": 1})).is_err());
    }

    #[test]
    fn flattened_fields_and_unknown_fields() {
        let r: CompletionRequest = serde_json::from_value(json!({
            "model": "m", "prompt": "x", "temperature": 0, "top_k": 5, "stop": "\n",
            "stream_options": {"include_usage": true}, "some_future_field": [1, 2], "logit_bias": null
        }))
        .unwrap();
        assert_eq!(r.sampling.temperature, Some(0.0));
        assert_eq!(r.sampling.top_k, Some(5));
        assert_eq!(r.sampling.stop, Some(StopSpec::One("\n".into())));
        assert_eq!(r.sampling.stream_options.unwrap().include_usage, Some(true));
    }

    #[test]
    fn chat_chunk_shapes() {
        let role = ChatStreamChoice {
            index: 0,
            delta: ChatDelta { role: Some("assistant"), content: Some(String::new()), tool_calls: None },
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
        };
        assert_eq!(
            serde_json::to_value(&role).unwrap(),
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})
        );
        let last = ChatStreamChoice {
            index: 1,
            delta: ChatDelta { role: None, content: Some("x".into()), tool_calls: None },
            logprobs: None,
            finish_reason: Some("stop"),
            stop_reason: Some(Some(StopReason::Text("END".into()))),
        };
        assert_eq!(
            serde_json::to_value(&last).unwrap(),
            json!({"index": 1, "delta": {"content": "x"}, "logprobs": null, "finish_reason": "stop", "stop_reason": "END"})
        );
        let eos = ChatStreamChoice { stop_reason: Some(None), ..last };
        assert_eq!(serde_json::to_value(&eos).unwrap()["stop_reason"], json!(null));
    }
}
