//! POST /v1/completions, streamed and not (vLLM's serving_completion).

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use ferry_engine::tokenizer::Tokenizer;
use ferry_transport::{SamplingParams, TokenLogprob};

use super::client_limits::ClientId;
use super::errors::ApiError;
use super::generation::{ChoiceDelta, Generation, Origin};
use super::logprobs::{clamp_lp, token_text, vllm_prompt_logprobs};
use super::params::{resolve_model, sampling_params, JsonBody, LengthCheck, StreamPlan, TextOptions, MAX_CHOICES};
use super::sse::{self, ChunkShape, DeltaStream};
use super::types::{CompletionChoice, CompletionChunk, CompletionStreamChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Prompt, Usage};
use crate::otel::spans::RequestTrace;
use super::{new_response_id, unix_now, Admission, AppState};

/// vLLM's (and OpenAI's) default for completions when `max_tokens` is absent.
const DEFAULT_MAX_TOKENS: u32 = 16;

pub(crate) async fn create(
    State(state): State<AppState>,
    axum::Extension(client): axum::Extension<ClientId>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Response {
    run(state, client, headers, req).await.unwrap_or_else(axum::response::IntoResponse::into_response)
}

/// Token ids of each prompt; ids must be inside the vocabulary.
pub(crate) fn tokenize_prompts(tok: &Tokenizer, prompt: Prompt, add_special: bool) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |s: &str| {
        tok.encode(s, add_special)
            .map_err(|e| ApiError::invalid_param("prompt", format!("Failed to tokenize the prompt: {e}")))
    };
    let check = |ids: Vec<u32>| {
        let vocab = tok.vocab_size();
        match ids.iter().find(|&&t| t as usize >= vocab) {
            Some(t) => Err(ApiError::invalid_param("prompt", format!("Token id {t} is out of vocabulary (size {vocab})."))),
            None => Ok(ids),
        }
    };
    match prompt {
        Prompt::Text(s) => Ok(vec![encode(&s)?]),
        Prompt::Texts(v) => v.iter().map(|s| encode(s)).collect(),
        Prompt::Tokens(ids) => Ok(vec![check(ids)?]),
        Prompt::TokenLists(v) => v.into_iter().map(check).collect(),
    }
}

/// A completions request checked, admitted and tokenized: what the handler
/// runs ([`PreparedCompletion::start`]).
pub(crate) struct PreparedCompletion {
    pub plan: StreamPlan,
    out: Output,
    prompts: Vec<Vec<u32>>,
    params: Vec<SamplingParams>,
    text: TextOptions,
    arrival: Instant,
    admission: Admission,
    pin: Option<u32>,
    trace: Option<RequestTrace>,
}

impl CompletionRequest {
    /// Every check of a completions request, in one place, with vLLM's rules
    /// and words: cheap bounds first (the `X-data-parallel-rank` header, the
    /// model, streaming options, the prompt's size, stop strings), then a
    /// slot for the client, then the tokenizer off the async workers, the
    /// choices' count, the structured-outputs constraint compiled, and the
    /// sampling fields against each prompt's length.
    pub(crate) async fn prepare(self, state: &AppState, client: ClientId, headers: &HeaderMap) -> Result<PreparedCompletion, ApiError> {
        let req = self;
        let pin = super::params::data_parallel_rank(headers)?;
        let arrival = Instant::now();
        let model = resolve_model(req.model.as_deref(), &state.served_model_names)?;
        let mut trace = RequestTrace::begin(state.tracer.as_ref(), headers, "POST /v1/completions", &model, arrival);
        let plan = StreamPlan::from_fields(&req.sampling)?;
        let prompt = req.prompt.clone().ok_or_else(|| ApiError::invalid_param("prompt", "`prompt` is required."))?;
        let echo_texts: Option<Vec<String>> = match (&prompt, req.echo.unwrap_or(false)) {
            (_, false) => None,
            (Prompt::Text(s), true) => Some(vec![s.clone()]),
            (Prompt::Texts(v), true) => Some(v.clone()),
            _ => None, // token prompts: decoded below
        };
        super::limits::check_stop(req.sampling.stop.as_ref())?;
        match &prompt {
            Prompt::Text(s) => super::limits::check_prompt_chars("prompt", s.chars().count())?,
            Prompt::Texts(v) => {
                super::limits::check_prompt_count(v.len())?;
                super::limits::check_prompt_chars("prompt", v.iter().map(|s| s.chars().count()).sum())?;
            }
            Prompt::Tokens(_) => {}
            Prompt::TokenLists(v) => super::limits::check_prompt_count(v.len())?,
        }
        let admission = state.admit(client)?;
        let tok = state.tokenizer.clone();
        let add_special = req.sampling.add_special_tokens.unwrap_or(true);
        let prompts = {
            let tok = tok.clone();
            state.text_work(move || tokenize_prompts(&tok, prompt, add_special)).await?
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid_param("prompt", "Please provide at least one prompt."));
        }
        let n = req.sampling.n.unwrap_or(1) as usize;
        if prompts.len().saturating_mul(n) > MAX_CHOICES {
            return Err(ApiError::invalid_param("n", format!("At most {MAX_CHOICES} choices (prompts × n) per request.")));
        }
        let echo_texts = match (echo_texts, req.echo.unwrap_or(false)) {
            (Some(t), _) => Some(t),
            (None, true) => Some(prompts.iter().map(|p| tok.decode(p, false).unwrap_or_default()).collect()),
            (None, false) => None,
        };
        let limits = LengthCheck { max_model_len: state.max_model_len, prompt_param: "prompt", max_tokens_param: "max_tokens" };
        let constraint = super::structured::constraint(state, &req.sampling.structured).await?;
        let mut params = Vec::with_capacity(prompts.len());
        for p in &prompts {
            // The default 16 shrinks to the room left; an explicit value must fit.
            let room = state.max_model_len.saturating_sub(p.len() as u32);
            let max_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS.min(room.max(1)));
            let mut sp = sampling_params(&req.sampling, Some(max_tokens), req.logprobs, p.len(), &limits, tok.vocab_size())?;
            // vLLM: echo with logprobs asks for the prompt's logprobs too.
            if req.echo.unwrap_or(false) {
                sp.prompt_logprobs = sp.prompt_logprobs.or(req.logprobs);
            }
            sp.constraint = constraint.clone();
            params.push(sp);
        }
        let echo_tokens = echo_texts.as_ref().map(|_| prompts.clone());
        let out = Output {
            id: new_response_id("cmpl"),
            created: unix_now(),
            model,
            n,
            logprobs: req.logprobs,
            prompt_logprobs: req.sampling.prompt_logprobs.is_some(),
            echo_texts,
            echo_tokens,
        };
        if let Some(t) = trace.as_mut() {
            t.tokenized(Instant::now());
            t.request_id.clone_from(&out.id);
        }
        Ok(PreparedCompletion { plan, out, prompts, params, text: TextOptions::from_fields(&req.sampling), arrival, admission, pin, trace })
    }
}

impl PreparedCompletion {
    /// Sends the prompts to the engines.
    fn start(self, state: &AppState) -> Result<(Generation, Output), ApiError> {
        let gen = Generation::start(state, self.prompts, self.params, self.text, Origin { arrival: self.arrival, admission: Some(self.admission), pin: self.pin, trace: self.trace })?;
        Ok((gen, self.out))
    }
}

async fn run(state: AppState, client: ClientId, headers: HeaderMap, req: CompletionRequest) -> Result<Response, ApiError> {
    let prepared = req.prepare(&state, client, &headers).await?;
    let plan = prepared.plan;
    let (gen, out) = prepared.start(&state)?;
    if plan.stream {
        let k = gen.num_choices();
        let shape = CompletionStream { gen, out, plan, echoed: vec![false; k], text_len: vec![0; k] };
        return Ok(sse::response(DeltaStream::new(shape, vec![])));
    }
    collect(gen, out).await.map(|r| Json(r).into_response())
}

/// What every chunk of one response shares.
struct Output {
    id: String,
    created: u64,
    model: String,
    n: usize,
    logprobs: Option<u32>,
    /// vLLM's `prompt_logprobs` was asked for (each choice carries them).
    prompt_logprobs: bool,
    echo_texts: Option<Vec<String>>,
    echo_tokens: Option<Vec<Vec<u32>>>,
}

impl Output {
    /// The prompt text (and tokens) to put before choice `i`'s first text.
    fn echo(&self, i: usize) -> Option<(&str, &[u32])> {
        let p = i / self.n.max(1);
        let text = self.echo_texts.as_ref()?.get(p)?;
        let toks = self.echo_tokens.as_ref()?.get(p)?;
        Some((text.as_str(), toks.as_slice()))
    }
}

async fn collect(mut gen: Generation, out: Output) -> Result<CompletionResponse, ApiError> {
    let outputs = gen.collect().await?;
    let tok = gen.tokenizer().clone();
    let choices = outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let (echo_text, echo_toks) = out.echo(i).unwrap_or(("", &[]));
            let prompt_lps = gen.prompt_logprobs(i / out.n.max(1));
            CompletionChoice {
                index: i as u32,
                text: format!("{echo_text}{}", o.text),
                logprobs: out.logprobs.map(|_| completion_logprobs(&tok, echo_toks, prompt_lps, &o.logprobs, 0)),
                finish_reason: o.finish.as_ref().map(|f| f.reason),
                stop_reason: o.finish.and_then(|f| f.stop_reason),
                prompt_logprobs: out.prompt_logprobs.then(|| prompt_lps.map(|l| vllm_prompt_logprobs(&tok, l))).flatten(),
            }
        })
        .collect();
    let prompt_tokens = gen.prompt_lens().iter().sum();
    Ok(CompletionResponse {
        id: out.id,
        object: "text_completion",
        created: out.created,
        model: out.model,
        choices,
        usage: Usage::new(prompt_tokens, gen.total_completion_tokens()).with_cached(gen.cached_tokens()),
    })
}

/// The legacy logprobs object: echoed prompt tokens (null for the first, as
/// OpenAI sends it; the prompt logprobs for the others when known), then
/// generated tokens. Offsets count characters from `offset0`.
pub(crate) fn completion_logprobs(
    tok: &Tokenizer,
    echoed: &[u32],
    echo_lps: Option<&[TokenLogprob]>,
    lps: &[TokenLogprob],
    offset0: usize,
) -> CompletionLogprobs {
    let mut r = CompletionLogprobs::default();
    let mut offset = offset0;
    let mut push = |r: &mut CompletionLogprobs, token: String, lp: Option<f32>, top| {
        r.text_offset.push(offset);
        offset += token.chars().count();
        r.tokens.push(token);
        r.token_logprobs.push(lp);
        r.top_logprobs.push(top);
    };
    let top_map = |l: &TokenLogprob| {
        let mut top = serde_json::Map::new();
        for &(t, lp) in &l.top {
            top.insert(token_text(tok, t), clamp_lp(lp).into());
        }
        // OpenAI's shape: the chosen token is always among the top entries.
        top.entry(token_text(tok, l.token)).or_insert(clamp_lp(l.logprob).into());
        top
    };
    for (j, &t) in echoed.iter().enumerate() {
        let known = j.checked_sub(1).and_then(|k| echo_lps?.get(k)).filter(|l| l.token == t);
        match known {
            Some(l) => push(&mut r, token_text(tok, t), Some(clamp_lp(l.logprob)), Some(top_map(l))),
            None => push(&mut r, token_text(tok, t), None, None),
        }
    }
    for l in lps {
        push(&mut r, token_text(tok, l.token), Some(clamp_lp(l.logprob)), Some(top_map(l)));
    }
    r
}

struct CompletionStream {
    gen: Generation,
    out: Output,
    plan: StreamPlan,
    echoed: Vec<bool>,
    text_len: Vec<usize>,
}

impl CompletionStream {
    fn chunk(&self, choices: Vec<CompletionStreamChoice>, usage: Option<Usage>) -> Bytes {
        sse::event(&CompletionChunk {
            id: self.out.id.clone(),
            object: "text_completion",
            created: self.out.created,
            model: self.out.model.clone(),
            choices,
            usage,
        })
    }

    fn on_delta(&mut self, d: ChoiceDelta) -> Bytes {
        let i = d.index as usize;
        let mut text = String::new();
        let mut echo_toks: &[u32] = &[];
        let mut echo_lps = None;
        if !self.echoed[i] {
            self.echoed[i] = true;
            if let Some((t, toks)) = self.out.echo(i) {
                text.push_str(t);
                echo_toks = toks;
                echo_lps = self.gen.prompt_logprobs(i / self.out.n.max(1));
            }
        }
        text.push_str(&d.text);
        let logprobs = self
            .out
            .logprobs
            .map(|_| completion_logprobs(self.gen.tokenizer(), echo_toks, echo_lps, &d.logprobs, self.text_len[i]));
        self.text_len[i] += text.chars().count();
        let usage = self.plan.continuous_usage.then(|| {
            let p = self.gen.prompt_lens().get(i / self.out.n.max(1)).copied().unwrap_or(0);
            Usage::new(p, self.gen.completion_tokens(i)).with_cached(self.gen.cached_tokens_of_choice(i))
        });
        let finish = d.finish;
        let choice = CompletionStreamChoice {
            index: d.index,
            text,
            logprobs,
            finish_reason: finish.as_ref().map(|f| f.reason),
            stop_reason: finish.and_then(|f| f.stop_reason),
        };
        self.chunk(vec![choice], usage)
    }
}

impl ChunkShape for CompletionStream {
    type Delta = ChoiceDelta;
    async fn next_delta(&mut self) -> Option<Result<ChoiceDelta, ApiError>> {
        self.gen.next().await
    }
    fn delta_chunk(&mut self, d: ChoiceDelta) -> Bytes {
        self.on_delta(d)
    }
    fn usage_chunk(&self) -> Option<Bytes> {
        self.plan.include_usage.then(|| {
            let p = self.gen.prompt_lens().iter().sum();
            self.chunk(vec![], Some(Usage::new(p, self.gen.total_completion_tokens()).with_cached(self.gen.cached_tokens())))
        })
    }
}
