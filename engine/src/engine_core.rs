//! EngineCore: turns requests into tokens, one step at a time.
//!
//! Sans-IO, as quinn-proto is: no threads, no clock (every call that needs the
//! time takes `now`), no links. A step has two halves around the model:
//! [`EngineCore::begin_step`] schedules and says what to run and how to pick
//! each token, the executor runs it, and [`EngineCore::finish_step`] takes the
//! picked tokens and reports what each sequence made; [`EngineCore::step`]
//! does all three. The threads and links live in `crate::shell`.

use crate::backend::{ExecError, MaskGuard, StepOutput, StepSampling, TokenMask};
use crate::batch::{LogitRows, ModelInput, SeqChunk};
use crate::executor::Executor;
use crate::sampler::{check_stop, position_logprob, sequence_seed, validate, SequenceSampler};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput, SchedulingPolicy, SeqId};
use crate::spec::{backoff::PassCost, ngram, SpecBackoff, SpecMethod, SpecStats, SpeculativeConfig, StepTimes, SuffixCache};
use crate::structured::{Commit, GrammarEnv, SeqGrammar};
use crate::rng::{RngCore, SplitMix64};
use crate::trace::{SeqTrace, TraceSink};
use ferry_transport::{
    EngineError, EngineRequest, EngineStats, FinishReason, KvEvent, RequestId, SamplingParams, SeqTiming, TokenLogprob, TokenOutput,
    TraceContext, MAX_STEP_REPORTS,
};
use std::sync::Arc;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What an [`EngineCore`] is built with (`crate::assemble` fills it from the
/// engine's arguments).
#[derive(Clone, Debug)]
pub struct EngineCoreConfig {
    /// This engine's rank among the engines a gateway serves from (vLLM's
    /// data-parallel rank): said in its `Hello`, so a gateway can refuse a
    /// duplicate, and in its thread names and logs.
    pub rank: u32,
    /// Batch limits and the KV cache's shape, for the scheduler.
    pub scheduler: SchedulerConfig,
    /// Seeds requests that bring no seed of their own.
    pub seed: u64,
    /// Speculative decoding (`--speculative-config`); None: off.
    pub spec: Option<SpeculativeConfig>,
}

/// Who sent a request: the shell's number for the link it came on.
pub type Owner = u32;

struct RequestState {
    params: SamplingParams,
    /// The trace its sequences' records join (None: not traced, or no sink).
    trace: Option<TraceContext>,
    /// Sequences of this request still running.
    live: usize,
}

struct SeqState {
    request: RequestId,
    index: u32,
    sampler: SequenceSampler,
    prompt_len: usize,
    /// The first output reports how much of the prompt the prefix cache served.
    reported_cached: bool,
    num_cached_tokens: usize,
    /// Set while this sequence computes its request's prompt logprobs.
    prompt_lp: Option<PromptLogprobs>,
    /// The structured-output constraint's state, when the request has one.
    grammar: Option<SeqGrammar>,
    clock: SeqClock,
    /// How much of its proposals this sequence verifies (speculation on).
    backoff: SpecBackoff,
}

/// When a sequence arrived, was first scheduled and made its first token:
/// its last output reports the phases (vLLM's queue / prefill / decode times).
#[derive(Clone, Copy)]
struct SeqClock {
    arrived: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
}

impl SeqClock {
    fn timing(&self, now: Instant) -> SeqTiming {
        let scheduled = self.scheduled.unwrap_or(now);
        let first = self.first_token.unwrap_or(now);
        SeqTiming {
            queue_secs: (scheduled - self.arrived).as_secs_f32(),
            prefill_secs: first.saturating_duration_since(scheduled).as_secs_f32(),
            decode_secs: now.saturating_duration_since(first).as_secs_f32(),
        }
    }
}

/// Prompt logprobs being gathered over a prompt's prefill chunks; sent with
/// the sequence's first output.
struct PromptLogprobs {
    /// Alternatives per position.
    k: usize,
    prompt: Vec<u32>,
    /// Entry p - 1 is prompt token p's (p >= 1). Indexed by position, so a
    /// prefill recomputed after preemption just writes the same entries again.
    entries: Vec<Option<TokenLogprob>>,
}

impl PromptLogprobs {
    /// Records the logits row of position `pos` (it predicts token pos + 1).
    fn record(&mut self, pos: usize, row: &mut [f32]) {
        if let Some(&next) = self.prompt.get(pos + 1) {
            self.entries[pos] = Some(position_logprob(row, next, self.k));
        }
    }

    fn finish(self) -> Vec<TokenLogprob> {
        // Every position was recorded before the first token could be sampled;
        // a hole would be an engine bug, so it is reported as the worst logprob
        // rather than shifting the positions after it.
        self.entries
            .into_iter()
            .zip(self.prompt.into_iter().skip(1))
            .map(|(e, t)| e.unwrap_or(TokenLogprob { token: t, logprob: f32::NEG_INFINITY, rank: u32::MAX, top: vec![] }))
            .collect()
    }
}

/// The engine's state machine: requests, their sequences and samplers, the
/// scheduler and its KV blocks, and the executor that runs the model.
pub struct EngineCore {
    cfg: EngineCoreConfig,
    sched: Scheduler,
    executor: Box<dyn Executor>,
    eog_ids: Vec<u32>,
    requests: HashMap<RequestId, RequestState>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq: SeqId,
    seeds: SplitMix64,
    /// Requests offered to `add_request`, refused ones included.
    num_added: u64,
    /// Tokens of each step not yet reported (`take_step_tokens`).
    step_tokens: Vec<u32>,
    /// The vocabulary for structured outputs; None: constrained requests are refused.
    grammars: Option<GrammarEnv>,
    mask_timing: MaskTiming,
    /// Speculative decoding's totals since the engine started.
    spec_stats: SpecStats,
    /// The suffix proposer's counts of earlier and running outputs (its
    /// method only).
    suffix: Option<SuffixCache>,
    /// How long decode and verify steps take by their rows: what a verify
    /// pass costs here (speculation on).
    step_times: StepTimes,
    /// Where traced sequences' records go when they end; None: no tracing.
    trace_sink: Option<Arc<dyn TraceSink>>,
}

/// What structured outputs' masks cost, since the engine started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MaskTiming {
    /// Masks computed (one per constrained sequence per sampling step).
    pub masks: u64,
    /// Steps that computed masks.
    pub steps: u64,
    /// Time spent computing them (on the helper thread, beside the forward pass).
    pub compute: std::time::Duration,
    /// Time the step waited for them after the forward pass was done: what
    /// they added to the step.
    pub stall: std::time::Duration,
}

/// A request's constraint compiled ahead of `add_request_compiled` (on the
/// input thread, off the busy loop): None when it has none.
pub type Compiled = Option<Result<SeqGrammar, EngineError>>;

/// Compiles `req`'s constraint, if any, against `env`.
pub fn compile_constraint(env: Option<&GrammarEnv>, req: &EngineRequest) -> Compiled {
    let c = req.sampling.constraint.as_ref()?;
    Some(match env {
        None => Err(EngineError::invalid("this engine cannot serve structured outputs (it has no tokenizer)")),
        Some(env) => crate::structured::compile(env, c).map_err(|e| EngineError::invalid(e.0)),
    })
}

impl EngineCore {
    /// An idle engine over `executor`. `eog_ids` are the model's
    /// end-of-generation tokens (EOS and its kin), which end a sequence unless
    /// its request ignores EOS. Structured outputs are refused until
    /// [`Self::with_grammars`] gives a vocabulary.
    pub fn new(cfg: EngineCoreConfig, executor: Box<dyn Executor>, eog_ids: Vec<u32>) -> EngineCore {
        let seeds = crate::rng::splitmix(cfg.seed);
        let suffix = match cfg.spec.as_ref().map(|s| &s.method) {
            Some(SpecMethod::Suffix(p)) => Some(SuffixCache::new(p.clone())),
            _ => None,
        };
        EngineCore {
            sched: Scheduler::new(cfg.scheduler.clone()),
            cfg,
            executor,
            eog_ids,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            seeds,
            num_added: 0,
            step_tokens: Vec::new(),
            grammars: None,
            mask_timing: MaskTiming::default(),
            spec_stats: SpecStats::default(),
            suffix,
            step_times: StepTimes::default(),
            trace_sink: None,
        }
    }

    /// The rank this engine serves as.
    pub fn rank(&self) -> u32 {
        self.cfg.rank
    }

    /// What structured outputs' masks have cost so far.
    pub fn mask_timing(&self) -> MaskTiming {
        self.mask_timing
    }

    /// Sends a record of each traced sequence to `sink` when it ends.
    pub fn with_trace_sink(mut self, sink: Arc<dyn TraceSink>) -> EngineCore {
        self.trace_sink = Some(sink);
        self
    }

    /// Serves structured outputs over this vocabulary (the model's tokenizer).
    pub fn with_grammars(mut self, env: GrammarEnv) -> EngineCore {
        self.grammars = Some(env);
        self
    }

    /// The vocabulary structured outputs are compiled against; None when
    /// this engine refuses them.
    pub fn grammars(&self) -> Option<&GrammarEnv> {
        self.grammars.as_ref()
    }

    /// The model's vocabulary size (logits per row), as the executor reports it.
    pub fn vocab_size(&self) -> usize {
        self.executor.vocab_size()
    }

    /// Checks a request against the model and the cache, as vLLM's input processor does.
    fn check_request(&self, req: &EngineRequest) -> Result<(), EngineError> {
        if let Some(t) = req.prompt_tokens.iter().find(|&&t| t as usize >= self.vocab_size()) {
            return Err(EngineError::invalid(format!("prompt token id {t} is out of vocabulary (size {})", self.vocab_size())));
        }
        let resumed = req.resume.as_ref().map_or(0, |r| r.output_tokens.len());
        if let Some(r) = &req.resume {
            if let Some(t) = r.output_tokens.iter().find(|&&t| t as usize >= self.vocab_size()) {
                return Err(EngineError::invalid(format!("resumed token id {t} is out of vocabulary (size {})", self.vocab_size())));
            }
            if r.index >= ferry_transport::MAX_N {
                return Err(EngineError::invalid(format!("resumed completion index {} is not below {}", r.index, ferry_transport::MAX_N)));
            }
            if resumed >= req.sampling.max_tokens as usize {
                return Err(EngineError::invalid(format!(
                    "{resumed} resumed tokens leave nothing to generate (max_tokens is {})",
                    req.sampling.max_tokens
                )));
            }
        }
        self.sched.check_prompt(req.prompt_tokens.len() + resumed).map_err(|e| EngineError::invalid(e.to_string()))?;
        if self.requests.contains_key(&req.id) {
            return Err(EngineError::invalid(format!("request id {} is already running", req.id)));
        }
        if req.sampling.priority != 0 && self.sched.config().policy != SchedulingPolicy::Priority {
            // vLLM's words for it.
            return Err(EngineError::invalid(format!("Got priority {} but Priority scheduling is not enabled.", req.sampling.priority)));
        }
        validate(&req.sampling, self.vocab_size()).map_err(|e| EngineError::invalid(e.to_string()))
    }

    /// Queues a request, or returns the output that refuses it (boxed: it is
    /// large, and rare).
    pub fn add_request(&mut self, req: EngineRequest, now: Instant) -> Result<(), Box<TokenOutput>> {
        let compiled = compile_constraint(self.grammars.as_ref(), &req);
        self.add_request_compiled(req, compiled, now)
    }

    /// `add_request` with the constraint already compiled by
    /// [`compile_constraint`].
    pub fn add_request_compiled(&mut self, req: EngineRequest, compiled: Compiled, now: Instant) -> Result<(), Box<TokenOutput>> {
        self.num_added += 1;
        let checked = self.check_request(&req).and_then(|()| compiled.transpose());
        let grammar = match checked {
            Ok(g) => g,
            Err(why) => return Err(Box::new(refusal(req.id, why))),
        };
        // A resumed request continues one completion; a new one starts n.
        let indices = match &req.resume {
            Some(r) => r.index..r.index + 1,
            None => 0..req.sampling.n.max(1),
        };
        let resumed: &[u32] = req.resume.as_ref().map_or(&[], |r| &r.output_tokens);
        let mut seqs = Vec::with_capacity(indices.len());
        for index in indices.clone() {
            let seed = match req.sampling.seed {
                // Children of one seeded request differ from each other, yet are reproducible.
                Some(s) => sequence_seed(s, index),
                None => self.seeds.next_u64(),
            };
            let mut sampler = SequenceSampler::new(&req.sampling, &req.prompt_tokens, seed);
            // Each completion follows its own tokens; a resumed one replays
            // what it already made, as output.
            let mut grammar = grammar.as_ref().map(SeqGrammar::fork);
            for &t in resumed {
                sampler.record(t);
                let why = match grammar.as_mut().map(|g| g.commit(t)) {
                    Some(Commit::Rejected(e)) => e,
                    Some(Commit::Finished) => "the constraint was complete before the last resumed token".into(),
                    Some(Commit::Continue) | None => continue,
                };
                let why = EngineError::invalid(format!("the resumed tokens do not follow the constraint: {why}"));
                return Err(Box::new(refusal(req.id, why)));
            }
            // Completion 0 computes the prompt logprobs (not again on a
            // resume that delivered tokens: the first output carried them),
            // so it skips the prefix cache (every prompt position must run);
            // its siblings may use it.
            let prompt_lp = req.sampling.prompt_logprobs.filter(|_| index == 0 && resumed.is_empty()).map(|k| PromptLogprobs {
                k: k as usize,
                prompt: req.prompt_tokens.clone(),
                entries: vec![None; req.prompt_tokens.len().saturating_sub(1)],
            });
            seqs.push((index, sampler, grammar, prompt_lp));
        }
        let tokens: Vec<u32> = req.prompt_tokens.iter().chain(resumed).copied().collect();
        for (index, sampler, grammar, prompt_lp) in seqs {
            let id = self.next_seq;
            self.next_seq += 1;
            let use_cache = prompt_lp.is_none();
            self.seqs.insert(
                id,
                SeqState {
                    request: req.id,
                    index,
                    sampler,
                    prompt_len: req.prompt_tokens.len(),
                    reported_cached: false,
                    num_cached_tokens: 0,
                    prompt_lp,
                    clock: SeqClock { arrived: now, scheduled: None, first_token: None },
                    grammar,
                    backoff: SpecBackoff::default(),
                },
            );
            // check_request applied the scheduler's rules, so this cannot fail.
            let _ = self.sched.try_add_sequence_prioritized(id, tokens.clone(), use_cache, req.sampling.priority);
        }
        let trace = req.trace.filter(|_| self.trace_sink.is_some());
        self.requests.insert(req.id, RequestState { params: req.sampling, trace, live: indices.len() });
        Ok(())
    }

    /// Stops these requests and frees their blocks now (`now` stamps their
    /// traces). Returns their final outputs.
    pub fn abort(&mut self, ids: &[RequestId], now: Instant) -> Vec<TokenOutput> {
        let mut outs = Vec::new();
        for &rid in ids {
            let Some(req) = self.requests.remove(&rid) else { continue };
            let mine: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.request == rid).map(|(&id, _)| id).collect();
            for sid in mine {
                let s = self.seqs.remove(&sid).expect("listed above");
                self.sched.abort(sid);
                if let Some(c) = &mut self.suffix {
                    c.finish(sid);
                }
                self.trace_end(req.trace, rid, &s, "abort", now);
                outs.push(finished(rid, s.index, vec![], None, FinishReason::Abort, 0));
            }
        }
        outs
    }

    /// Whether any sequence is waiting or running: the shell steps while so.
    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    /// The token counts of the steps run since the last call (for the stats
    /// of the next batch sent).
    pub fn take_step_tokens(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.step_tokens)
    }

    /// How the prefix cache changed since the last call, oldest first (see
    /// [`crate::kv_cache::KvCacheManager::take_kv_events`]): for the gateways'
    /// prefix-aware routing.
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.sched.take_kv_events()
    }

    /// The chained hash of every block in the prefix cache, one per block:
    /// the snapshot a newly attached link starts from.
    pub fn held_block_hashes(&self) -> Vec<u64> {
        self.sched.held_block_hashes()
    }

    /// Whether request `id` still has sequences in the engine.
    pub fn has_request(&self, id: RequestId) -> bool {
        self.requests.contains_key(&id)
    }

    /// The whole engine's queue and cache figures, every owner's requests
    /// counted: every link hears them, so gateways that share a rank each
    /// see its whole load. `draining` is false and `step_tokens` empty (the
    /// shell knows those, and each link's `num_added`).
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            num_waiting: self.sched.num_waiting() as u32,
            num_running: self.sched.num_running() as u32,
            kv_usage: self.sched.kv_usage(),
            num_preemptions: self.sched.num_preemptions(),
            prefix_cache_queries: self.sched.prefix_cache_queries(),
            prefix_cache_hits: self.sched.prefix_cache_hits(),
            num_added: self.num_added,
            draining: false,
            step_tokens: Vec::new(),
            spec: self.spec_stats.clone(),
        }
    }

    /// One step: schedule, run the model, pick tokens, and report what each
    /// sequence made. `now` stamps the whole step; the shell stamps the two
    /// halves apart ([`Self::begin_step`], [`Self::finish_step`]).
    pub fn step(&mut self, now: Instant) -> Vec<TokenOutput> {
        let Some(mut step) = self.begin_step(now) else { return Vec::new() };
        let result = self.run_step(&mut step);
        self.finish_step(step, result, now)
    }

    /// Schedules the next step: what the model runs and how each sampled
    /// token is picked. None: nothing to run.
    pub fn begin_step(&mut self, now: Instant) -> Option<PlannedStep> {
        if let Some(spec) = &self.cfg.spec {
            let spec = spec.clone();
            self.propose(&spec);
        }
        let plan = self.sched.schedule();
        if plan.seqs.is_empty() {
            return None;
        }
        for s in &plan.seqs {
            if let Some(st) = self.seqs.get_mut(&s.id) {
                st.clock.scheduled.get_or_insert(now);
                if s.num_cached_tokens > 0 && !st.reported_cached {
                    st.num_cached_tokens = s.num_cached_tokens;
                }
            }
        }
        let input = ModelInput {
            tokens: plan.seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect(),
            seqs: plan
                .seqs
                .iter()
                .map(|s| SeqChunk {
                    start_pos: s.start_pos,
                    len: s.tokens.len(),
                    prompt_len: self.seqs.get(&s.id).map_or(0, |st| st.prompt_len),
                    block_table: s.block_table.clone(),
                    logits: self.logit_rows(s),
                })
                .collect(),
        };
        // One sampling row per chunk due to sample, and one per position of
        // a verify chunk: each as the sequence's sampler would set it had
        // the proposed tokens before it been picked. A constrained
        // sequence's rows carry empty masks, filled beside the forward pass.
        let mut sampling = StepSampling::default();
        let mut masked = Vec::new();
        for (chunk, s) in plan.seqs.iter().enumerate().filter(|(_, s)| s.sample) {
            let Some(st) = self.seqs.get_mut(&s.id) else { continue };
            let Some(req) = self.requests.get(&st.request) else { continue };
            let draft = &s.tokens[s.tokens.len() - s.num_draft..];
            let mut masks = Vec::new();
            let mut ahead = (!draft.is_empty()).then(|| st.sampler.clone());
            for i in 0..=draft.len() {
                let sampler = ahead.as_ref().unwrap_or(&st.sampler);
                let mut row = sampler.row(&req.params, &self.eog_ids, chunk);
                row.back = (draft.len() - i) as u32;
                if let (Some(a), Some(&t)) = (ahead.as_mut(), draft.get(i)) {
                    a.record(t);
                }
                if st.grammar.is_some() {
                    let mask = TokenMask::new();
                    row.allowed = Some(mask.clone());
                    masks.push(mask);
                }
                sampling.rows.push(row);
            }
            if let Some(g) = st.grammar.take() {
                masked.push(MaskedSeq { sid: s.id, grammar: g, masks, draft: draft.to_vec(), error: None });
            }
        }
        Some(PlannedStep { plan, input, sampling, masked, began: now })
    }

    /// Runs a planned step on this core's executor, computing the
    /// constraint masks on a helper thread while the model runs: they add
    /// nothing to the step unless they take longer than the forward pass
    /// (the backend waits for a row's mask only when it samples that row).
    pub fn run_step(&mut self, step: &mut PlannedStep) -> Result<StepOutput, ExecError> {
        let executor = &mut self.executor;
        if step.masked.is_empty() {
            return executor.execute(&step.input, &step.sampling);
        }
        let (input, sampling, masked) = (&step.input, &step.sampling, &mut step.masked);
        // Should the helper fail, the guard fills its masks with "nothing to
        // apply" so the backend never waits forever.
        let guard = MaskGuard(masked.iter().flat_map(|m| m.masks.iter().cloned()).collect());
        let (result, compute) = std::thread::scope(|scope| {
            let masks = scope.spawn(move || {
                let t = Instant::now();
                for m in masked.iter_mut() {
                    // A verify chunk's masks follow its proposed tokens.
                    match m.grammar.masks_along(&m.draft) {
                        Ok(words) => {
                            for (mask, w) in m.masks.iter().zip(words) {
                                mask.fill(Some(w));
                            }
                        }
                        Err(e) => m.error = Some(e),
                    }
                    for mask in &m.masks {
                        mask.fill(None);
                    }
                }
                drop(guard);
                t.elapsed()
            });
            let r = executor.execute(input, sampling);
            (r, masks.join().unwrap_or_default())
        });
        self.mask_timing.compute += compute;
        self.mask_timing.steps += 1;
        self.mask_timing.masks += step.masked.iter().map(|m| m.masks.len() as u64).sum::<u64>();
        self.mask_timing.stall += step.masked.iter().flat_map(|m| &m.masks).map(TokenMask::waited).sum::<Duration>();
        result
    }

    /// Takes what the model picked for a planned step and reports what each
    /// sequence made. `now`: when the step's tokens were picked.
    pub fn finish_step(&mut self, step: PlannedStep, result: Result<StepOutput, ExecError>, now: Instant) -> Vec<TokenOutput> {
        let PlannedStep { plan, input, sampling, masked, began } = step;
        if self.cfg.spec.is_some() && input.seqs.iter().all(|c| c.len == 1 || matches!(c.logits, LogitRows::Verify(_))) {
            self.step_times.record(input.tokens.len(), now.saturating_duration_since(began));
        }
        // A constrained sequence gets its grammar back, and learns whether
        // its mask could be computed.
        let mut mask_errors: HashMap<SeqId, String> = HashMap::new();
        for m in masked {
            if let Some(e) = m.error {
                mask_errors.insert(m.sid, e);
            }
            if let Some(st) = self.seqs.get_mut(&m.sid) {
                st.grammar = Some(m.grammar);
            }
        }
        let out = match result {
            Ok(out) if out.sampled.len() == sampling.rows.len() => out,
            Ok(out) => {
                let why = format!("the backend picked {} tokens for {} rows", out.sampled.len(), sampling.rows.len());
                return self.fail_scheduled(&plan, &why, now);
            }
            Err(e) => return self.fail_scheduled(&plan, &e.to_string(), now),
        };
        let vocab = self.vocab_size();
        let mut logits = out.logits;
        let mut picks = out.sampled.into_iter().zip(&sampling.rows).map(|(p, r)| (r.chunk, p)).peekable();
        let mut sampled = Vec::new();
        let mut outs = Vec::new();
        let mut ended = Vec::new();
        // vLLM's IterationStats: the tokens this step made, plus the whole
        // prompt (cached part included) of each sequence whose first token
        // it made; a step of prefill chunks alone counts 0.
        let mut iteration_tokens: u64 = 0;
        // Rows come back for All chunks (all of theirs) and for Last chunks
        // not sampled (their one), in batch order.
        let mut next_row = 0usize;
        for (chunk_index, (s, chunk)) in plan.seqs.iter().zip(&input.seqs).enumerate() {
            let mut picks_here = Vec::new();
            while let Some((_, p)) = picks.next_if(|(c, _)| *c == chunk_index) {
                picks_here.push(p);
            }
            let returned = match chunk.logits {
                LogitRows::All => chunk.len,
                LogitRows::Last if picks_here.is_empty() => 1,
                LogitRows::Last | LogitRows::None | LogitRows::Verify(_) => 0,
            };
            let rows = next_row..next_row + returned;
            next_row = rows.end;
            let Some(st) = self.seqs.get_mut(&s.id) else { continue };
            if chunk.logits == LogitRows::All {
                if let Some(plp) = st.prompt_lp.as_mut() {
                    for (t, r) in rows.clone().enumerate() {
                        if let Some(row) = logits.get_mut(r * vocab..(r + 1) * vocab) {
                            plp.record(s.start_pos + t, row);
                        }
                    }
                }
            }
            if picks_here.is_empty() {
                continue;
            }
            let Some(req) = self.requests.get(&st.request) else { continue };
            // A mask that cannot be computed is the constraint's fault (too
            // complex for llguidance's limits); a rejected token is ours.
            let mask_error = mask_errors.remove(&s.id).map(EngineError::invalid);
            // The picks in order; past the first, each is kept only while the
            // one before it was the proposal there (its position then holds
            // the right keys and values), and none after a finish.
            let draft = &s.tokens[s.tokens.len() - s.num_draft..];
            let mut new_tokens = Vec::with_capacity(picks_here.len());
            let mut logprobs = Vec::new();
            let mut finish = None;
            for (i, pick) in picks_here.into_iter().enumerate() {
                st.sampler.record(pick.token);
                sampled.push((s.id, pick.token));
                new_tokens.push(pick.token);
                logprobs.extend(pick.logprob);
                let generated = st.sampler.num_generated();
                finish = check_stop(&req.params, pick.token, generated, &self.eog_ids);
                let mut grammar_error = mask_error.clone();
                if grammar_error.is_none() {
                    match st.grammar.as_mut().map(|g| g.commit(pick.token)) {
                        Some(Commit::Finished) => finish = finish.or(Some(FinishReason::Stop)),
                        Some(Commit::Rejected(e)) => grammar_error = Some(EngineError::internal(e)),
                        Some(Commit::Continue) | None => {}
                    }
                }
                if let Some(e) = grammar_error {
                    finish = Some(FinishReason::Error(e));
                }
                if finish.is_none() && st.prompt_len + generated >= self.sched.max_seq_len() {
                    finish = Some(FinishReason::Length);
                }
                if finish.is_some() || draft.get(i) != Some(&pick.token) {
                    break;
                }
            }
            if !draft.is_empty() {
                let accepted = new_tokens.iter().zip(draft).take_while(|(a, b)| a == b).count();
                st.backoff.record(draft.len(), accepted);
                self.spec_stats.record(draft.len(), accepted);
            }
            if let Some(c) = &mut self.suffix {
                c.extend(s.id, &new_tokens);
            }
            let cached = if st.reported_cached { 0 } else { st.num_cached_tokens };
            st.reported_cached = true;
            iteration_tokens += new_tokens.len() as u64 + if st.clock.first_token.is_none() { st.prompt_len as u64 } else { 0 };
            st.clock.first_token.get_or_insert(now);
            outs.push(TokenOutput {
                id: st.request,
                index: st.index,
                new_tokens,
                logprobs: (!logprobs.is_empty()).then_some(logprobs),
                finish: finish.clone(),
                num_cached_tokens: cached as u32,
                prompt_logprobs: st.prompt_lp.take().map(PromptLogprobs::finish),
                timing: finish.is_some().then(|| st.clock.timing(now)),
            });
            if let Some(f) = &finish {
                ended.push((s.id, finish_name(f)));
            }
        }
        self.sched.update(&plan, &sampled);
        for (sid, how) in ended {
            if let Some(s) = self.seqs.get(&sid) {
                let context = self.requests.get(&s.request).and_then(|r| r.trace);
                self.trace_end(context, s.request, s, how, now);
            }
            self.end_sequence(sid);
        }
        if self.step_tokens.len() == MAX_STEP_REPORTS {
            self.step_tokens.remove(0);
        }
        self.step_tokens.push(u32::try_from(iteration_tokens).unwrap_or(u32::MAX));
        outs
    }

    /// Which logits a scheduled chunk needs: every position while its
    /// sequence gathers prompt logprobs and the chunk is still in the prompt.
    fn logit_rows(&self, s: &crate::scheduler::ScheduledSeq) -> LogitRows {
        let gathering = self.seqs.get(&s.id).is_some_and(|st| st.prompt_lp.is_some() && s.start_pos < st.prompt_len);
        match (gathering, s.sample) {
            _ if s.num_draft > 0 => LogitRows::Verify(1 + s.num_draft),
            (true, _) => LogitRows::All,
            (false, true) => LogitRows::Last,
            (false, false) => LogitRows::None,
        }
    }

    /// Speculative decoding: proposes tokens for each decoding sequence and
    /// hands the scheduler as many as its [`SpecBackoff`] says pay, within
    /// what `max_tokens` leaves and what its constraint allows.
    ///
    /// Each sequence's proposals are weighed against the step they join:
    /// what it makes without them (a token per decoding sequence, plus what
    /// the proposals taken so far are expected to add) and how much longer
    /// their rows make it (`StepTimes`, measured).
    fn propose(&mut self, spec: &SpeculativeConfig) {
        let running = self.sched.num_running();
        if spec.disable_by_batch_size.is_some_and(|n| running >= n) {
            return;
        }
        let decoding = self.seqs.keys().filter(|&&sid| self.sched.is_decoding(sid)).count();
        let (mut rows, mut base_tokens) = (decoding, decoding as f32);
        for (&sid, st) in &mut self.seqs {
            if !self.sched.is_decoding(sid) {
                continue;
            }
            let Some(req) = self.requests.get(&st.request) else { continue };
            // A verify pass makes up to 1 + k tokens. A sequence cooling down
            // after failed drafts proposes nothing (`budget` counts it down).
            let left = (req.params.max_tokens as usize).saturating_sub(st.sampler.num_generated() + 1);
            let k = if st.backoff.cooling() { 0 } else { spec.num_speculative_tokens.min(left) };
            // The suffix proposer estimates each draft's chances itself.
            let (mut draft, chances) = match (self.sched.tokens(sid), &spec.method) {
                (Some(tokens), SpecMethod::Ngram { min, max }) if k > 0 => (ngram::propose(tokens, *min, *max, k), None),
                (Some(tokens), SpecMethod::Suffix(_)) if k > 0 => match self.suffix.as_ref() {
                    Some(c) => {
                        let d = c.propose(tokens, k);
                        (d.tokens, Some(d.chances))
                    }
                    None => (Vec::new(), None),
                },
                _ => (Vec::new(), None),
            };
            if let Some(g) = st.grammar.as_mut() {
                draft.truncate(g.valid_draft_len(&draft));
            }
            let cost = PassCost { base_tokens, relative: self.step_times.relative_from(rows, draft.len()) };
            let chances = chances.as_deref().map(|c| &c[..draft.len()]);
            let budget = match chances {
                Some(c) => st.backoff.budget_estimated(c, &cost),
                None => st.backoff.budget(draft.len(), &cost),
            };
            draft.truncate(budget);
            rows += budget;
            base_tokens += st.backoff.expected(chances, budget);
            self.sched.set_draft(sid, draft);
        }
    }

    /// Hands a traced sequence's record to the sink as it ends.
    fn trace_end(&self, context: Option<TraceContext>, rid: RequestId, s: &SeqState, how: &'static str, now: Instant) {
        let (Some(sink), Some(context)) = (&self.trace_sink, context) else { return };
        sink.record(SeqTrace {
            context,
            request: rid,
            index: s.index,
            rank: self.cfg.rank,
            arrived: s.clock.arrived,
            scheduled: s.clock.scheduled,
            first_token: s.clock.first_token,
            finished: now,
            prompt_tokens: s.prompt_len as u32,
            cached_tokens: s.num_cached_tokens as u32,
            output_tokens: s.sampler.num_generated() as u32,
            finish: how,
        });
    }

    fn end_sequence(&mut self, sid: SeqId) {
        self.sched.finish(sid);
        if let Some(c) = &mut self.suffix {
            c.finish(sid);
        }
        if let Some(s) = self.seqs.remove(&sid) {
            if let Some(r) = self.requests.get_mut(&s.request) {
                r.live -= 1;
                if r.live == 0 {
                    self.requests.remove(&s.request);
                }
            }
        }
    }

    /// The model failed on this batch: end its requests with the error rather than
    /// retrying forever, and keep serving the others.
    fn fail_scheduled(&mut self, plan: &SchedulerOutput, why: &str, now: Instant) -> Vec<TokenOutput> {
        tracing::error!("model step failed: {why}");
        let rids: Vec<RequestId> = plan.seqs.iter().filter_map(|s| self.seqs.get(&s.id).map(|st| st.request)).collect();
        let mut outs = self.abort(&rids, now);
        for o in &mut outs {
            o.finish = Some(FinishReason::Error(EngineError::internal(format!("engine failure: {why}"))));
        }
        outs
    }

    /// Hands the executor the flag that drains its engine (see
    /// [`Executor::watch_drain`]).
    pub fn watch_drain(&mut self, draining: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.executor.watch_drain(draining);
    }

    /// Ends every request with `why` (the rank cannot go on) and frees their blocks.
    pub fn fail_all(&mut self, why: &EngineError, now: Instant) -> Vec<TokenOutput> {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        let mut outs = self.abort(&ids, now);
        for o in &mut outs {
            o.finish = Some(FinishReason::Error(why.clone()));
        }
        outs
    }

    /// Requests still in flight (for tests and shutdown).
    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    /// KV blocks that can be handed out now, cached ones nobody holds included.
    pub fn num_free_blocks(&self) -> usize {
        self.sched.num_free_blocks()
    }

    /// KV blocks in the cache.
    pub fn num_blocks(&self) -> usize {
        self.sched.num_blocks()
    }
}

/// A step scheduled by [`EngineCore::begin_step`]: what the model runs, how
/// each token is picked, and the constrained sequences' grammars, lent out
/// for the step so their masks can be computed beside the forward pass.
pub struct PlannedStep {
    plan: SchedulerOutput,
    input: ModelInput,
    sampling: StepSampling,
    masked: Vec<MaskedSeq>,
    /// When it was scheduled: with the instant `finish_step` is given, how
    /// long the step took.
    began: Instant,
}

/// A constrained sequence's part of a step: its grammar (lent out), the mask
/// its sampling row waits for, and why that mask could not be computed.
struct MaskedSeq {
    sid: SeqId,
    grammar: SeqGrammar,
    /// One per sampling row: the chunk's last, or each of a verify chunk's.
    masks: Vec<TokenMask>,
    /// A verify chunk's proposed tokens, which its masks follow.
    draft: Vec<u32>,
    error: Option<String>,
}

impl PlannedStep {
    /// What the model runs.
    pub fn input(&self) -> &ModelInput {
        &self.input
    }

    /// How each sampled token is picked.
    pub fn sampling(&self) -> &StepSampling {
        &self.sampling
    }
}

/// A finish's name in a trace (vLLM's finish reasons, plus "error").
fn finish_name(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
        FinishReason::Error(_) => "error",
    }
}

/// The output that refuses request `id`.
pub(crate) fn refusal(id: RequestId, why: EngineError) -> TokenOutput {
    TokenOutput {
        id,
        index: 0,
        new_tokens: vec![],
        logprobs: None,
        finish: Some(FinishReason::Error(why)),
        num_cached_tokens: 0,
        prompt_logprobs: None,
        timing: None,
    }
}

fn finished(id: RequestId, index: u32, toks: Vec<u32>, lp: Option<Vec<ferry_transport::TokenLogprob>>, f: FinishReason, cached: u32) -> TokenOutput {
    TokenOutput { id, index, new_tokens: toks, logprobs: lp, finish: Some(f), num_cached_tokens: cached, prompt_logprobs: None, timing: None }
}
