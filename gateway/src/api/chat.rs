//! POST /v1/chat/completions, streamed and not (vLLM's serving_chat).
//!
//! Messages go through the model's chat template (with the generation prompt by
//! default) and are tokenized without adding special tokens again, as vLLM does.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use ferry_engine::tokenizer::{RenderOptions, Tokenizer};
use ferry_transport::{SamplingParams, TokenLogprob, MAX_LOGPROBS};

use super::client_limits::ClientId;
use super::errors::ApiError;
use super::generation::{Generation, Origin};
use super::logprobs::{clamp_lp, token_text, vllm_prompt_logprobs};
use super::output::{ChatGeneration, ChatStep};
use super::params::{resolve_model, sampling_params, JsonBody, LengthCheck, StreamPlan, TextOptions};
use super::sse::{self, ChunkShape, DeltaStream};
use super::tools::stream::Piece;
use super::tools::{ToolCall, ToolCallDelta, ToolMode};
use super::types::{
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta, ChatFunctionCall,
    ChatFunctionDelta, ChatLogprobs, ChatResponseMessage, ChatStreamChoice, ChatToolCall, ChatToolCallDelta,
    ChatTokenLogprob, ChatTopLogprob, OpenAiMessage, TemplateFields, Usage,
};
use super::{new_response_id, unix_now, Admission, AppState};
use crate::otel::spans::RequestTrace;

pub(crate) async fn create(
    State(state): State<AppState>,
    axum::Extension(client): axum::Extension<ClientId>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Response {
    run(state, client, headers, req).await.unwrap_or_else(axum::response::IntoResponse::into_response)
}

/// The chat rendered with the model's template (or the request's own), as token ids.
pub(crate) fn render_chat(
    tok: &Tokenizer,
    messages: &[ferry_engine::tokenizer::ChatMessage],
    opts: &RenderOptions,
    template: Option<&str>,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    let text = tok
        .render_chat(messages, opts, template)
        .map_err(|e| ApiError::invalid_param("messages", format!("Failed to apply the chat template: {e}")))?;
    tok.encode(&text, add_special_tokens)
        .map_err(|e| ApiError::invalid_param("messages", format!("Failed to tokenize the chat: {e}")))
}

/// The template options a chat request sets, checked as vLLM checks them:
/// `continue_final_message` and `add_generation_prompt` both set true is a
/// 400; a request's own `chat_template` needs `--trust-request-chat-template`.
pub(crate) fn render_options(state: &AppState, f: &TemplateFields) -> Result<RenderOptions, ApiError> {
    let cont = f.continue_final_message.unwrap_or(false);
    if cont && f.add_generation_prompt == Some(true) {
        return Err(ApiError::bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True."));
    }
    if f.chat_template.is_some() && !state.trust_request_chat_template {
        return Err(ApiError::invalid_param(
            "chat_template",
            "Chat template is passed with request, but --trust-request-chat-template is not set. Refused request with untrusted chat template.",
        ));
    }
    if let Some(t) = &f.chat_template {
        super::limits::check_prompt_chars("chat_template", t.chars().count())?;
    }
    Ok(RenderOptions {
        // vLLM defaults add_generation_prompt to true; continuing a message
        // means not opening a new turn, so an unset flag follows it.
        add_generation_prompt: f.add_generation_prompt.unwrap_or(!cont),
        continue_final_message: cont,
        tools: None,
        kwargs: f.chat_template_kwargs.clone().unwrap_or_default(),
    })
}

/// A chat request checked, admitted and rendered to its prompt: what the
/// handler runs ([`PreparedChat::start`]).
pub(crate) struct PreparedChat {
    /// The served model the request names (the default one if none).
    pub model: String,
    pub plan: StreamPlan,
    /// Some(k): logprobs with k alternatives per token.
    pub logprobs: Option<u32>,
    /// vLLM's `prompt_logprobs` was asked for.
    pub prompt_logprobs: bool,
    /// `max_tokens` was a ceiling above the room the context leaves, and was
    /// cut to that room (so a "length" finish means the context is full).
    pub max_tokens_capped: bool,
    tools: ToolMode,
    prompt: Vec<u32>,
    params: SamplingParams,
    text: TextOptions,
    arrival: Instant,
    admission: Admission,
    pin: Option<u32>,
    /// The request's trace, when the node exports traces.
    pub(crate) trace: Option<RequestTrace>,
}

impl ChatCompletionRequest {
    /// Every check of a chat request, in one place, with vLLM's rules and
    /// words: cheap bounds first (the `X-data-parallel-rank` header, the
    /// model, streaming options, messages, logprobs, stop strings, tools),
    /// then a slot for the client, then the template and the tokenizer off
    /// the async workers, the sampling fields against the prompt's length,
    /// and the structured-outputs constraint compiled.
    pub(crate) async fn prepare(self, state: &AppState, client: ClientId, headers: &HeaderMap) -> Result<PreparedChat, ApiError> {
        let req = self;
        let pin = super::params::data_parallel_rank(headers)?;
        let arrival = Instant::now();
        let model = resolve_model(req.model.as_deref(), &state.served_model_names)?;
        let mut trace = RequestTrace::begin(state.tracer.as_ref(), headers, "POST /v1/chat/completions", &model, arrival);
        let plan = StreamPlan::from_fields(&req.sampling)?;
        let messages = match &req.messages {
            Some(m) if !m.is_empty() => m,
            _ => return Err(ApiError::invalid_param("messages", "`messages` must be a non-empty list.")),
        };
        let want_logprobs = req.logprobs.unwrap_or(false);
        if let Some(k) = req.top_logprobs {
            if !want_logprobs {
                return Err(ApiError::invalid_param("top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true."));
            }
            if k > MAX_LOGPROBS {
                return Err(ApiError::invalid_param("top_logprobs", format!("`top_logprobs` must be at most {MAX_LOGPROBS}, got {k}.")));
            }
        }
        let top_k = req.top_logprobs.unwrap_or(0);
        super::limits::check_stop(req.sampling.stop.as_ref())?;
        super::limits::check_messages(messages)?;
        let tool_plan = super::tools::plan(&req.tool_fields, &state.tools)?;
        let admission = state.admit(client)?;
        let tok = state.tokenizer.clone();
        let prompt = req.render_prompt(state, messages, tool_plan.template_tools.clone()).await?;
        if let Some(t) = trace.as_mut() {
            t.tokenized(Instant::now());
        }
        let (max_tokens, max_tokens_param) = match (req.max_completion_tokens, req.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, m) => (m, "max_tokens"),
        };
        // A ceiling (Anthropic's `max_tokens`) is cut to the room the context leaves.
        let room = state.max_model_len.saturating_sub(prompt.len() as u32);
        let max_tokens_capped = req.max_tokens_is_ceiling && room > 0 && max_tokens.is_some_and(|m| m > room);
        let max_tokens = if max_tokens_capped { Some(room) } else { max_tokens };
        let limits = LengthCheck { max_model_len: state.max_model_len, prompt_param: "messages", max_tokens_param };
        let mut params = sampling_params(&req.sampling, max_tokens, want_logprobs.then_some(top_k), prompt.len(), &limits, tok.vocab_size())?;
        let structured = super::structured::constraint(state, &req.sampling.structured).await?;
        params.constraint = super::tools::merge_constraint(structured, &tool_plan)?;
        Ok(PreparedChat {
            model,
            plan,
            logprobs: want_logprobs.then_some(top_k),
            prompt_logprobs: req.sampling.prompt_logprobs.is_some(),
            max_tokens_capped,
            tools: tool_plan.mode,
            prompt,
            params,
            text: TextOptions::from_fields(&req.sampling),
            arrival,
            admission,
            pin,
            trace,
        })
    }
}

impl ChatCompletionRequest {
    /// The prompt `messages` render to with this request's template fields
    /// and `template_tools`, as token ids: the template and the tokenizer run
    /// off the async workers.
    async fn render_prompt(&self, state: &AppState, messages: &[OpenAiMessage], template_tools: Option<serde_json::Value>) -> Result<Vec<u32>, ApiError> {
        let opts = RenderOptions { tools: template_tools, ..render_options(state, &self.template)? };
        let messages = super::tools::template_messages(messages.iter().map(OpenAiMessage::to_template).collect());
        let (tok, template) = (state.tokenizer.clone(), self.template.chat_template.clone());
        let add_special = self.sampling.add_special_tokens.unwrap_or(false);
        state.text_work(move || render_chat(&tok, &messages, &opts, template.as_deref(), add_special)).await
    }

    /// How many tokens the prompt of this request is, rendered as
    /// [`prepare`](Self::prepare) renders it (its tools included, whatever
    /// `tool_choice` says), with nothing generated and no slot taken: the
    /// model, the messages and the tools are checked as `prepare` checks them.
    pub(crate) async fn count_prompt_tokens(&self, state: &AppState) -> Result<usize, ApiError> {
        resolve_model(self.model.as_deref(), &state.served_model_names)?;
        let messages = match &self.messages {
            Some(m) if !m.is_empty() => m,
            _ => return Err(ApiError::invalid_param("messages", "`messages` must be a non-empty list.")),
        };
        super::limits::check_messages(messages)?;
        // The tools are rendered whatever the choice: "none" plans them without a parser.
        let fields = super::tools::ToolFields { tool_choice: Some(serde_json::Value::from("none")), ..self.tool_fields.clone() };
        let tool_plan = super::tools::plan(&fields, &state.tools)?;
        Ok(self.render_prompt(state, messages, tool_plan.template_tools).await?.len())
    }
}

impl PreparedChat {
    /// Sends the prompt to the engines; its output comes as typed steps.
    pub(crate) fn start(self, state: &AppState) -> Result<ChatGeneration, ApiError> {
        let gen = Generation::start(state, vec![self.prompt], vec![self.params], self.text, Origin { arrival: self.arrival, admission: Some(self.admission), pin: self.pin, trace: self.trace })?;
        Ok(ChatGeneration::new(gen, self.tools))
    }
}

async fn run(state: AppState, client: ClientId, headers: HeaderMap, req: ChatCompletionRequest) -> Result<Response, ApiError> {
    let mut prepared = req.prepare(&state, client, &headers).await?;
    let out = Output {
        id: new_response_id("chatcmpl"),
        created: unix_now(),
        model: prepared.model.clone(),
        logprobs: prepared.logprobs,
        prompt_logprobs: prepared.prompt_logprobs,
    };
    let plan = prepared.plan;
    if let Some(t) = prepared.trace.as_mut() {
        t.request_id.clone_from(&out.id);
    }
    let gen = prepared.start(&state)?;
    if plan.stream {
        let shape = ChatStream { gen, out, plan };
        let first = shape.role_chunks();
        return Ok(sse::response(DeltaStream::new(shape, first)));
    }
    collect(gen, out).await.map(|r| Json(r).into_response())
}

struct Output {
    id: String,
    created: u64,
    model: String,
    /// Some(k): logprobs with k alternatives per token.
    logprobs: Option<u32>,
    /// vLLM's `prompt_logprobs` was asked for.
    prompt_logprobs: bool,
}

async fn collect(mut gen: ChatGeneration, out: Output) -> Result<ChatCompletionResponse, ApiError> {
    let outputs = gen.collect().await?;
    let tok = gen.generation().tokenizer().clone();
    let choices = outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| ChatChoice {
            index: i as u32,
            message: ChatResponseMessage { role: "assistant", content: o.content, tool_calls: o.tool_calls.into_iter().map(tool_call).collect() },
            logprobs: out.logprobs.map(|top| chat_logprobs(&tok, &o.logprobs, top)),
            finish_reason: o.finish.as_ref().map(|f| f.reason),
            stop_reason: o.finish.and_then(|f| f.stop_reason),
        })
        .collect();
    let g = gen.generation();
    Ok(ChatCompletionResponse {
        id: out.id,
        object: "chat.completion",
        created: out.created,
        model: out.model,
        choices,
        usage: gen.usage(),
        prompt_logprobs: out.prompt_logprobs.then(|| g.prompt_logprobs(0).map(|l| vllm_prompt_logprobs(&tok, l))).flatten(),
    })
}

/// A whole call as chat's response message has it.
fn tool_call(c: ToolCall) -> ChatToolCall {
    ChatToolCall { id: c.id, kind: "function", function: ChatFunctionCall { name: c.name, arguments: c.arguments } }
}

/// A piece of a call as a chunk's `delta.tool_calls` has it.
fn tool_call_delta(d: ToolCallDelta) -> ChatToolCallDelta {
    let (id, name) = d.head.map(|h| (h.id, h.name)).unzip();
    ChatToolCallDelta { index: d.index, kind: id.as_ref().map(|_| "function"), id, function: ChatFunctionDelta { name, arguments: d.arguments } }
}

/// Chat's logprobs: each token with its bytes and its `top` best alternatives.
pub(crate) fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob], top: u32) -> ChatLogprobs {
    let entry = |t: u32| {
        let s = token_text(tok, t);
        let bytes = s.as_bytes().to_vec();
        (s, bytes)
    };
    ChatLogprobs {
        content: lps
            .iter()
            .map(|l| {
                let (token, bytes) = entry(l.token);
                ChatTokenLogprob {
                    token,
                    logprob: clamp_lp(l.logprob),
                    bytes,
                    top_logprobs: l
                        .top
                        .iter()
                        .take(top as usize)
                        .map(|&(t, lp)| {
                            let (token, bytes) = entry(t);
                            ChatTopLogprob { token, logprob: clamp_lp(lp), bytes }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

struct ChatStream {
    gen: ChatGeneration,
    out: Output,
    plan: StreamPlan,
}

impl ChatStream {
    fn chunk(&self, choices: Vec<ChatStreamChoice>, usage: Option<Usage>) -> Bytes {
        sse::event(&ChatCompletionChunk {
            id: self.out.id.clone(),
            object: "chat.completion.chunk",
            created: self.out.created,
            model: self.out.model.clone(),
            choices,
            usage,
        })
    }

    fn generation(&self) -> &Generation {
        self.gen.generation()
    }

    fn prompt_tokens(&self) -> u32 {
        self.generation().prompt_lens().iter().sum()
    }

    /// vLLM opens each choice with `{"role": "assistant", "content": ""}`.
    fn role_chunks(&self) -> Vec<Bytes> {
        let mut chunks = Vec::new();
        for i in 0..self.generation().num_choices() {
            let choice = ChatStreamChoice {
                index: i as u32,
                delta: ChatDelta { role: Some("assistant"), content: Some(String::new()), tool_calls: None },
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
            };
            let usage = self.plan.continuous_usage.then(|| Usage::new(self.prompt_tokens(), 0).with_cached(self.generation().cached_tokens()));
            chunks.push(self.chunk(vec![choice], usage));
        }
        chunks
    }

    /// A step's text (and logprobs) in a content chunk; a finish then gets a
    /// chunk of its own with an empty delta, in OpenAI's order (clients
    /// written against OpenAI drop text that comes with `finish_reason`).
    fn on_text_step(&mut self, step: ChatStep) -> Bytes {
        let i = step.index as usize;
        let g = self.generation();
        let usage = || {
            self.plan
                .continuous_usage
                .then(|| Usage::new(self.prompt_tokens(), g.completion_tokens(i)).with_cached(g.cached_tokens()))
        };
        let text: String = step
            .pieces
            .into_iter()
            .filter_map(|p| match p {
                Piece::Content(c) => Some(c),
                Piece::ToolCalls(_) => None,
            })
            .collect();
        let mut out = bytes::BytesMut::new();
        if !text.is_empty() || !step.logprobs.is_empty() || step.finish.is_none() {
            let logprobs = self.out.logprobs.map(|top| chat_logprobs(g.tokenizer(), &step.logprobs, top));
            let choice = ChatStreamChoice {
                index: step.index,
                delta: ChatDelta { role: None, content: Some(text), tool_calls: None },
                logprobs,
                finish_reason: None,
                stop_reason: None,
            };
            out.extend_from_slice(&self.chunk(vec![choice], usage()));
        }
        if let Some(f) = step.finish {
            let choice = ChatStreamChoice {
                index: step.index,
                delta: ChatDelta::default(),
                logprobs: None,
                finish_reason: Some(f.reason),
                stop_reason: Some(f.stop_reason),
            };
            out.extend_from_slice(&self.chunk(vec![choice], usage()));
        }
        out.freeze()
    }

    /// A step of a choice whose text may hold tool calls: a chunk per piece
    /// (content or `tool_calls`), then, when the choice ends, a chunk with an
    /// empty delta carrying the finish reason.
    fn on_tool_step(&mut self, step: ChatStep) -> Bytes {
        let i = step.index as usize;
        let g = self.generation();
        let mut logprobs = self.out.logprobs.map(|top| chat_logprobs(g.tokenizer(), &step.logprobs, top));
        let usage = self.plan.continuous_usage.then(|| Usage::new(self.prompt_tokens(), g.completion_tokens(i)).with_cached(g.cached_tokens()));
        let mut out = Vec::new();
        for p in step.pieces {
            let delta = match p {
                Piece::Content(c) => ChatDelta { content: Some(c), ..Default::default() },
                Piece::ToolCalls(calls) => ChatDelta { tool_calls: Some(calls.into_iter().map(tool_call_delta).collect()), ..Default::default() },
            };
            let choice = ChatStreamChoice { index: step.index, delta, logprobs: logprobs.take(), finish_reason: None, stop_reason: None };
            out.extend_from_slice(&self.chunk(vec![choice], usage.clone()));
        }
        if let Some(f) = step.finish {
            let choice = ChatStreamChoice {
                index: step.index,
                delta: ChatDelta::default(),
                logprobs: logprobs.take(),
                finish_reason: Some(f.reason),
                stop_reason: Some(f.stop_reason),
            };
            out.extend_from_slice(&self.chunk(vec![choice], usage));
        }
        Bytes::from(out)
    }
}

impl ChunkShape for ChatStream {
    type Delta = ChatStep;
    async fn next_delta(&mut self) -> Option<Result<ChatStep, ApiError>> {
        self.gen.next().await
    }
    fn delta_chunk(&mut self, step: ChatStep) -> Bytes {
        match self.gen.tool_mode() {
            ToolMode::Off => self.on_text_step(step),
            _ => self.on_tool_step(step),
        }
    }
    fn usage_chunk(&self) -> Option<Bytes> {
        self.plan.include_usage.then(|| self.chunk(vec![], Some(self.gen.usage())))
    }
}
