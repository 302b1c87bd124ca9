//! One API request in flight: its engine requests (one per prompt, each with `n`
//! sequences) and, per choice, the incremental detokenizer and the stop-string
//! checker. Both endpoints, streamed or not, read the same [`ChoiceDelta`]s, so a
//! streamed answer is the non-streamed one cut in pieces.
//!
//! Choice `i` is sequence `i % n` of prompt `i / n` (vLLM's numbering).
//! Dropping a `Generation` aborts every engine request still running; a stop string
//! that ends the last running sequence of a request aborts that request at once.
//! (Sequences of one request share its id, so with n > 1 a stop string in one
//! sequence cannot stop it alone: its later tokens are dropped here, and the engine
//! request is aborted when its last sequence ends.)

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use ferry_engine::tokenizer::{IncrementalDetokenizer, Tokenizer};
use ferry_transport::{FinishReason, RequestId, SamplingParams, TokenLogprob, TokenOutput};
use tokio::sync::mpsc;

use super::errors::ApiError;
use super::params::TextOptions;
use super::stop_strings::{StopCheck, StopChecker, StopSet};
use super::types::StopReason;
use super::{Admission, AppState};
use crate::engines::coordinator::{RequestGuard, SubmitError};
use crate::engines::rank_link::{EventRx, SeqEvent};
use crate::metrics::FinishedSeq;
use crate::otel::spans::{RequestSummary, RequestTrace};

/// How a choice ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    /// "stop", "length" or "abort", as vLLM reports them.
    pub reason: &'static str,
    /// What stopped it, when a stop string or stop token did (vLLM's `stop_reason`).
    pub stop_reason: Option<StopReason>,
}

/// What one engine output added to one choice.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceDelta {
    /// Which choice (0..n) it belongs to.
    pub index: u32,
    /// Text to show for it: detokenized incrementally, stop strings held back
    /// until they cannot match and cut where they do.
    pub text: String,
    /// Tokens this output counted (those after a matched stop string are dropped).
    pub token_ids: Vec<u32>,
    /// One per counted token, when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the choice's last delta.
    pub finish: Option<Finish>,
}

/// One choice's whole output: its deltas added up.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ChoiceOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    /// None until the choice ends.
    pub finish: Option<Finish>,
}

impl ChoiceOutput {
    /// Adds the choice's next delta.
    pub(crate) fn push(&mut self, d: ChoiceDelta) {
        self.text.push_str(&d.text);
        self.token_ids.extend_from_slice(&d.token_ids);
        self.logprobs.extend(d.logprobs);
        if d.finish.is_some() {
            self.finish = d.finish;
        }
    }
}

/// Per-choice text state.
struct Choice {
    detok: IncrementalDetokenizer,
    stop: StopChecker,
    rank: usize,
    num_tokens: u32,
    finished: bool,
    /// How it ended ("abort" until it does).
    reason: &'static str,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

struct PromptRun {
    guard: RequestGuard,
    len: u32,
    unfinished: u32,
    prompt_counted: bool,
    /// Prompt tokens the prefix cache served (the most any sequence reported).
    cached: u32,
    /// The request asked for prompt logprobs; they come with completion 0's
    /// first output.
    wants_prompt_lp: bool,
    prompt_lp: Option<Vec<TokenLogprob>>,
    /// The request's `max_tokens` (for the metrics).
    max_tokens: u32,
    /// Outputs of this run's other completions that came before the prompt
    /// logprobs: held, so every choice's first delta can carry them (echo).
    held: Vec<TokenOutput>,
}

pub(crate) struct Generation {
    state: AppState,
    rx: EventRx,
    runs: Vec<PromptRun>,
    by_id: HashMap<RequestId, usize>,
    choices: Vec<Choice>,
    n: u32,
    opts: TextOptions,
    remaining: usize,
    arrival: Instant,
    failed: bool,
    /// The admission slot, held to the end; its client is charged the tokens.
    admission: Option<Admission>,
    /// Held outputs released once their prompt logprobs came, in arrival order.
    replay: VecDeque<TokenOutput>,
    /// The request's trace, emitted when this ends; and its first prompt's
    /// settings, for the trace's attributes.
    trace: Option<(RequestTrace, SamplingParams)>,
}

/// Where a generation comes from and goes: what [`Generation::start`] takes
/// besides the prompts and their settings.
pub(crate) struct Origin {
    /// When the request arrived (latencies are measured from it).
    pub arrival: Instant,
    /// The client's admission slot, held until the generation is dropped.
    pub admission: Option<Admission>,
    /// Sends every prompt to this rank (vLLM's `X-data-parallel-rank`).
    pub pin: Option<u32>,
    /// The request's trace, emitted when the generation ends.
    pub trace: Option<RequestTrace>,
}

impl Origin {
    /// A request of this process's own (`ferry::Llm`): no slot, no pin, no trace.
    pub(crate) fn local() -> Origin {
        Origin { arrival: Instant::now(), admission: None, pin: None, trace: None }
    }
}

impl Generation {
    /// Send every prompt to the engines. `prompts[i]` goes with `params[i]`; all
    /// share `n`.
    pub(crate) fn start(state: &AppState, prompts: Vec<Vec<u32>>, params: Vec<SamplingParams>, opts: TextOptions, origin: Origin) -> Result<Self, ApiError> {
        let Origin { arrival, admission, pin, trace } = origin;
        let context = trace.as_ref().map(RequestTrace::context);
        let trace = trace.map(|t| (t, params.first().cloned().unwrap_or_default()));
        let n = params.first().map_or(1, |p| p.n).max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut runs = Vec::with_capacity(prompts.len());
        let mut by_id = HashMap::new();
        let mut choices = Vec::new();
        // One set of stop strings for the whole request, shared by its choices.
        let stops = StopSet::new(opts.stop.clone());
        for (p, (tokens, sampling)) in prompts.into_iter().zip(params).enumerate() {
            let len = tokens.len() as u32;
            let wants_prompt_lp = sampling.prompt_logprobs.is_some();
            let max_tokens = sampling.max_tokens;
            // The prompt's last tokens give the first new token its context (a
            // SentencePiece word-start space decodes as it would in the whole text).
            let context_tail = tokens[tokens.len().saturating_sub(8)..].to_vec();
            let guard = state.coordinator.submit(tokens, sampling, tx.clone(), pin, context).map_err(|e| match e {
                SubmitError::NoHealthyRank => ApiError::unavailable(e.to_string(), 5),
                SubmitError::RankDown(_) => ApiError::unavailable(e.to_string(), 1),
                SubmitError::NoSuchRank { .. } => ApiError::bad_request(e.to_string()),
                SubmitError::Send(m) => ApiError::unavailable(m, 1),
            })?;
            by_id.insert(guard.id(), p);
            for _ in 0..n {
                choices.push(Choice {
                    detok: IncrementalDetokenizer::with_context(
                        state.tokenizer.clone(),
                        opts.skip_special_tokens,
                        &context_tail,
                    ),
                    stop: StopChecker::new(stops.clone(), opts.include_stop_str_in_output),
                    rank: guard.rank_index(),
                    num_tokens: 0,
                    finished: false,
                    reason: "abort",
                    first_token_at: None,
                    last_token_at: None,
                });
            }
            runs.push(PromptRun {
                guard,
                len,
                unfinished: n,
                prompt_counted: false,
                cached: 0,
                wants_prompt_lp,
                max_tokens,
                prompt_lp: None,
                held: Vec::new(),
            });
        }
        let remaining = choices.len();
        Ok(Generation {
            state: state.clone(),
            rx,
            runs,
            by_id,
            choices,
            n,
            opts,
            remaining,
            arrival,
            failed: false,
            admission,
            replay: VecDeque::new(),
            trace,
        })
    }

    /// Prompt `p`'s logprobs (one per token after the first), once they came.
    pub(crate) fn prompt_logprobs(&self, p: usize) -> Option<&[TokenLogprob]> {
        self.runs.get(p)?.prompt_lp.as_deref()
    }

    /// Prompt tokens the prefix cache served, over all prompts.
    pub(crate) fn cached_tokens(&self) -> u32 {
        self.runs.iter().map(|r| r.cached).sum()
    }

    /// Prompt tokens the prefix cache served for the prompt of choice `i`.
    pub(crate) fn cached_tokens_of_choice(&self, i: usize) -> u32 {
        self.runs.get(i / self.n as usize).map_or(0, |r| r.cached)
    }

    pub(crate) fn num_choices(&self) -> usize {
        self.choices.len()
    }

    pub(crate) fn prompt_lens(&self) -> Vec<u32> {
        self.runs.iter().map(|r| r.len).collect()
    }

    /// Tokens counted so far for choice `i`.
    pub(crate) fn completion_tokens(&self, i: usize) -> u32 {
        self.choices.get(i).map_or(0, |c| c.num_tokens)
    }

    pub(crate) fn total_completion_tokens(&self) -> u32 {
        self.choices.iter().map(|c| c.num_tokens).sum()
    }

    pub(crate) fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.state.tokenizer
    }

    /// Reads the generation to its end: every choice's whole output, in index
    /// order. The one way a non-streamed answer is gathered, whichever API
    /// renders it (chat, completions, Responses, `ferry::Llm`).
    pub(crate) async fn collect(&mut self) -> Result<Vec<ChoiceOutput>, ApiError> {
        let mut out = vec![ChoiceOutput::default(); self.num_choices()];
        while let Some(d) = self.next().await {
            let d = d?;
            let i = d.index as usize;
            out[i].push(d);
        }
        Ok(out)
    }

    /// The next change to some choice; `None` once every choice has finished.
    /// An error ends the generation (the engine failed or went away).
    pub(crate) async fn next(&mut self) -> Option<Result<ChoiceDelta, ApiError>> {
        loop {
            if self.remaining == 0 || self.failed {
                return None;
            }
            if let Some(out) = self.replay.pop_front() {
                if let Some(r) = self.on_output(out) {
                    return Some(r);
                }
                continue;
            }
            let mut deadline = self.state.drain_deadline.clone();
            let event = tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some(ev) => ev,
                    None => {
                        self.failed = true;
                        return Some(Err(ApiError::internal("the engine stopped answering this request")));
                    }
                },
                // A draining server's time is up: end with an error rather than be cut.
                Ok(_) = deadline.wait_for(|fired| *fired) => {
                    self.failed = true;
                    return Some(Err(ApiError::unavailable("the server is shutting down and its --shutdown-timeout ran out", 1)));
                }
            };
            match event {
                SeqEvent::Moved { id, indices, rank } => self.on_moved(id, &indices, rank),
                SeqEvent::Failed { message, .. } => {
                    self.failed = true;
                    return Some(Err(ApiError::unavailable(message, 1)));
                }
                SeqEvent::Output(out) => {
                    if let Some(r) = self.on_output(out) {
                        return Some(r);
                    }
                }
            }
        }
    }

    fn charge(&self, tokens: u64) {
        if let Some(a) = &self.admission {
            a.client.charge(tokens);
        }
    }

    /// Completions of one prompt moved to another rank: their later tokens
    /// count as that rank's.
    fn on_moved(&mut self, id: RequestId, indices: &[u32], rank: usize) {
        let Some(&p) = self.by_id.get(&id) else { return };
        for &k in indices.iter().filter(|&&k| k < self.n) {
            self.choices[p * self.n as usize + k as usize].rank = rank;
        }
    }

    fn on_output(&mut self, out: TokenOutput) -> Option<Result<ChoiceDelta, ApiError>> {
        let p = *self.by_id.get(&out.id)?;
        if out.index >= self.n {
            return None; // never trust an index off the wire
        }
        let i = p * self.n as usize + out.index as usize;
        if self.choices[i].finished {
            return None; // already ended here by a stop string
        }
        if let Some(FinishReason::Error(e)) = &out.finish {
            self.failed = true;
            return Some(Err(ApiError::from_engine(e)));
        }
        let run = &mut self.runs[p];
        run.cached = run.cached.max(out.num_cached_tokens);
        if run.wants_prompt_lp && run.prompt_lp.is_none() {
            // Completion 0's first output carries them; should it not (a
            // misbehaving rank), nothing is held any longer.
            match out.prompt_logprobs.clone().or_else(|| (out.index == 0).then(Vec::new)) {
                Some(lps) => {
                    run.prompt_lp = Some(lps);
                    // Held outputs came first: they go before anything newer.
                    for h in run.held.drain(..).rev() {
                        self.replay.push_front(h);
                    }
                    self.replay.push_front(out);
                    return None;
                }
                None => {
                    run.held.push(out);
                    return None;
                }
            }
        }
        let now = Instant::now();
        let rank = self.choices[i].rank;
        let metrics = &self.state.metrics;
        if !self.runs[p].prompt_counted {
            self.runs[p].prompt_counted = true;
            metrics.add_prompt_tokens(rank, self.runs[p].len as u64);
            self.charge(self.runs[p].len as u64);
        }
        self.charge(out.new_tokens.len() as u64);
        if !out.new_tokens.is_empty() {
            let c = &mut self.choices[i];
            match c.last_token_at {
                None => metrics.observe_ttft(rank, (now - self.arrival).as_secs_f64()),
                Some(t) => metrics.observe_inter_token(rank, (now - t).as_secs_f64()),
            }
            c.first_token_at.get_or_insert(now);
            c.last_token_at = Some(now);
        }

        let delta = self.choices[i].apply(&out, &self.opts, &self.state.tokenizer, i as u32);
        metrics.add_generation_tokens(rank, delta.token_ids.len() as u64);
        if let Some(f) = &delta.finish {
            self.choices[i].finished = true;
            self.choices[i].reason = f.reason;
            self.remaining -= 1;
            let run = &self.runs[p];
            metrics.sequence_finished(
                rank,
                &FinishedSeq {
                    reason: f.reason,
                    e2e_secs: (now - self.arrival).as_secs_f64(),
                    prompt_tokens: run.len,
                    generation_tokens: self.choices[i].num_tokens,
                    n: self.n,
                    max_tokens: run.max_tokens,
                    timing: out.timing,
                },
            );
            let run = &mut self.runs[p];
            run.unfinished = run.unfinished.saturating_sub(1);
            if run.unfinished == 0 {
                // All its sequences are done here: if the engine is still at it
                // (a stop string matched), this sends Abort now.
                run.guard.abort();
            }
        }
        if delta.text.is_empty() && delta.finish.is_none() && delta.logprobs.is_empty() {
            return None; // text held back for a possible stop string
        }
        Some(Ok(delta))
    }
}

impl Choice {
    fn apply(&mut self, out: &TokenOutput, opts: &TextOptions, tok: &Tokenizer, index: u32) -> ChoiceDelta {
        let engine_stop = matches!(out.finish, Some(FinishReason::Stop));
        let n_new = out.new_tokens.len();
        let mut text = String::new();
        let mut counted = 0usize;
        let mut matched: Option<String> = None;
        for (k, &t) in out.new_tokens.iter().enumerate() {
            counted += 1;
            self.num_tokens += 1;
            // vLLM leaves out the text of the EOS / stop token that ended the
            // sequence, unless include_stop_str_in_output.
            let is_stop_token = k + 1 == n_new
                && engine_stop
                && (tok.eog_token_ids().contains(&t) || opts.stop_token_ids.contains(&t));
            let piece = if is_stop_token && !opts.include_stop_str_in_output {
                String::new()
            } else {
                self.detok.push(t)
            };
            match self.stop.push(&piece, self.num_tokens > opts.min_tokens) {
                StopCheck::Continue(s) => text.push_str(&s),
                StopCheck::Stopped { text: s, matched: m } => {
                    text.push_str(&s);
                    matched = Some(m);
                    break;
                }
            }
        }
        let finish = if let Some(m) = matched {
            Some(Finish { reason: "stop", stop_reason: Some(StopReason::Text(m)) })
        } else if let Some(f) = &out.finish {
            // Flush what the detokenizer and the checker still hold.
            let rest = self.detok.finish();
            let mut stopped = None;
            match self.stop.push(&rest, self.num_tokens > opts.min_tokens) {
                StopCheck::Continue(s) => {
                    text.push_str(&s);
                    text.push_str(&self.stop.finish());
                }
                StopCheck::Stopped { text: s, matched: m } => {
                    text.push_str(&s);
                    stopped = Some(m);
                }
            }
            Some(match (stopped, f) {
                (Some(m), _) => Finish { reason: "stop", stop_reason: Some(StopReason::Text(m)) },
                (None, FinishReason::Stop) => {
                    let last = out.new_tokens.last().copied();
                    let stop_reason = last
                        .filter(|t| opts.stop_token_ids.contains(t) && !tok.eog_token_ids().contains(t))
                        .map(StopReason::Token);
                    Finish { reason: "stop", stop_reason }
                }
                (None, FinishReason::Length) => Finish { reason: "length", stop_reason: None },
                (None, _) => Finish { reason: "abort", stop_reason: None },
            })
        } else {
            None
        };
        let logprobs = match &out.logprobs {
            Some(l) => l.iter().take(counted).cloned().collect(),
            None => Vec::new(),
        };
        ChoiceDelta { index, text, token_ids: out.new_tokens[..counted].to_vec(), logprobs, finish }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Choices still running when the client leaves count as aborted, as in vLLM.
        if !self.failed {
            let secs = self.arrival.elapsed().as_secs_f64();
            for (i, c) in self.choices.iter().enumerate().filter(|(_, c)| !c.finished) {
                let run = &self.runs[i / self.n as usize];
                let f = FinishedSeq {
                    reason: "abort",
                    e2e_secs: secs,
                    prompt_tokens: run.len,
                    generation_tokens: c.num_tokens,
                    n: self.n,
                    max_tokens: run.max_tokens,
                    timing: None,
                };
                self.state.metrics.sequence_finished(c.rank, &f);
            }
        }
        if let Some((trace, params)) = self.trace.take() {
            let mut reasons: Vec<&str> = self.choices.iter().map(|c| c.reason).collect();
            reasons.dedup();
            trace.finish(&RequestSummary {
                params: &params,
                prompt_tokens: self.runs.iter().map(|r| r.len).sum(),
                completion_tokens: self.total_completion_tokens(),
                first_token: self.choices.iter().filter_map(|c| c.first_token_at).min(),
                end: Instant::now(),
                finish: reasons.join(","),
            });
        }
        // The guards in `runs` send Abort for requests the engine still runs.
    }
}
