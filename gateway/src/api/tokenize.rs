//! POST /tokenize and /detokenize (vLLM's extras).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::chat::{render_chat, render_options};
use super::errors::ApiError;
use super::params::{resolve_model, JsonBody};
use super::types::{DetokenizeRequest, OpenAiMessage, TokenizeRequest};
use super::AppState;

#[derive(Serialize, Debug, PartialEq)]
pub(crate) struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: u32,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

/// llama.cpp's /tokenize answer: `{"tokens": [..]}` and nothing else.
#[derive(Serialize, Debug, PartialEq)]
pub(crate) struct LlamaTokenizeResponse {
    pub tokens: Vec<LlamaToken>,
}

/// A token of llama.cpp's answer: the id alone, or with `with_pieces` the id
/// and its piece (a string, or the piece's bytes when they are no valid UTF-8
/// by themselves, as llama.cpp's `handle_tokenize` does).
#[derive(Serialize, Debug, PartialEq)]
#[serde(untagged)]
pub(crate) enum LlamaToken {
    Id(u32),
    WithPiece { id: u32, piece: LlamaPiece },
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(untagged)]
pub(crate) enum LlamaPiece {
    Text(String),
    Bytes(Vec<u8>),
}

/// The text of `tokens`: vLLM's `prompt`, and, when the request names no
/// `model` (as llama.cpp's clients send it: only `{"tokens": [..]}`), the
/// same text as llama.cpp's `content` too. A request that names its model is
/// a vLLM client's, and gets vLLM's answer exactly.
#[derive(Serialize, Debug, PartialEq)]
pub(crate) struct DetokenizeResponse {
    pub prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// llama.cpp's /tokenize: `content` with `add_special` (default false; special
/// tokens written in the text are always parsed, as llama.cpp's default
/// `parse_special`) and `with_pieces`.
fn llama_tokenize(state: &AppState, req: &TokenizeRequest, content: &str) -> Result<LlamaTokenizeResponse, ApiError> {
    let tok = &state.tokenizer;
    let ids = tok
        .encode(content, req.add_special.unwrap_or(false))
        .map_err(|e| ApiError::invalid_param("content", format!("Failed to tokenize: {e}")))?;
    let tokens = if req.with_pieces.unwrap_or(false) {
        ids.into_iter()
            .map(|id| {
                let bytes = tok.id_to_bytes(id).unwrap_or_default();
                let piece = match std::str::from_utf8(bytes) {
                    Ok(s) => LlamaPiece::Text(s.to_string()),
                    Err(_) => LlamaPiece::Bytes(bytes.to_vec()),
                };
                LlamaToken::WithPiece { id, piece }
            })
            .collect()
    } else {
        ids.into_iter().map(LlamaToken::Id).collect()
    };
    Ok(LlamaTokenizeResponse { tokens })
}

/// `prompt` is tokenized as completions would (special tokens added by default);
/// `messages` go through the chat template as chat would (none added by default).
/// llama.cpp's `content` gets llama.cpp's answer (see [`llama_tokenize`]).
pub(crate) async fn tokenize(State(state): State<AppState>, JsonBody(req): JsonBody<TokenizeRequest>) -> Response {
    if let Err(e) = resolve_model(req.model.as_deref(), &state.served_model_names).and_then(|_| match (&req.messages, &req.content) {
        (Some(m), _) => super::limits::check_messages(m),
        (None, Some(c)) => super::limits::check_prompt_chars("content", c.chars().count()),
        (None, None) => super::limits::check_prompt_chars("prompt", req.prompt.as_ref().map_or(0, |p| p.chars().count())),
    }) {
        return e.into_response();
    }
    if let Some(content) = req.content.clone() {
        if req.prompt.is_some() || req.messages.is_some() {
            return ApiError::bad_request("Provide exactly one of `prompt`, `messages` or `content`.").into_response();
        }
        let st = state.clone();
        return answer(&state, move || llama_tokenize(&st, &req, &content)).await;
    }
    let st = state.clone();
    let run = move || -> Result<TokenizeResponse, ApiError> {
        let state = st;
        let tok = &state.tokenizer;
        let tokens = match (&req.prompt, &req.messages) {
            (Some(p), None) => tok
                .encode(p, req.add_special_tokens.unwrap_or(true))
                .map_err(|e| ApiError::invalid_param("prompt", format!("Failed to tokenize: {e}")))?,
            (None, Some(m)) => {
                let opts = render_options(&state, &req.template)?;
                let messages: Vec<_> = m.iter().map(OpenAiMessage::to_template).collect();
                render_chat(tok, &messages, &opts, req.template.chat_template.as_deref(), req.add_special_tokens.unwrap_or(false))?
            }
            _ => return Err(ApiError::bad_request("Provide exactly one of `prompt` or `messages`.")),
        };
        let token_strs = req.return_token_strs.unwrap_or(false).then(|| {
            tokens.iter().map(|&t| tok.id_to_piece(t).unwrap_or_default()).collect()
        });
        Ok(TokenizeResponse { count: tokens.len(), max_model_len: state.max_model_len, tokens, token_strs })
    };
    answer(&state, run).await
}

pub(crate) async fn detokenize(State(state): State<AppState>, JsonBody(req): JsonBody<DetokenizeRequest>) -> Response {
    let st = state.clone();
    let run = move || -> Result<DetokenizeResponse, ApiError> {
        let state = st;
        resolve_model(req.model.as_deref(), &state.served_model_names)?;
        let tokens = req.tokens.as_deref().ok_or_else(|| ApiError::invalid_param("tokens", "`tokens` is required."))?;
        let vocab = state.tokenizer.vocab_size();
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid_param("tokens", format!("Token id {t} is out of vocabulary (size {vocab}).")));
        }
        let prompt = state
            .tokenizer
            .decode(tokens, false)
            .map_err(|e| ApiError::invalid_param("tokens", format!("Failed to detokenize: {e}")))?;
        let content = req.model.is_none().then(|| prompt.clone());
        Ok(DetokenizeResponse { prompt, content })
    };
    answer(&state, run).await
}

/// Runs `work` on the text workers: its answer as JSON, or its error.
async fn answer<T: Serialize + Send + 'static>(state: &AppState, work: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Response {
    match state.text_work(work).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}
