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

#[derive(Serialize, Debug, PartialEq)]
pub(crate) struct DetokenizeResponse {
    pub prompt: String,
}

/// `prompt` is tokenized as completions would (special tokens added by default);
/// `messages` go through the chat template as chat would (none added by default).
pub(crate) async fn tokenize(State(state): State<AppState>, JsonBody(req): JsonBody<TokenizeRequest>) -> Response {
    if let Err(e) = resolve_model(req.model.as_deref(), &state.served_model_names).and_then(|_| match &req.messages {
        Some(m) => super::limits::check_messages(m),
        None => super::limits::check_prompt_chars("prompt", req.prompt.as_ref().map_or(0, |p| p.chars().count())),
    }) {
        return e.into_response();
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
    match state.text_work(run).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
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
        Ok(DetokenizeResponse { prompt })
    };
    match state.text_work(run).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}
