//! EngineCore: turns requests into tokens, one step at a time.
//!
//! [`EngineCore`] itself is sans-IO: `add_request`, `abort`, `step`. [`spawn_engine`]
//! wraps it in three threads as vLLM's EngineCore does: an input thread that receives
//! commands from the transport, a busy loop that schedules, executes and samples, and
//! an output thread that sends each step's outputs with the queue figures attached.

use crate::backend::{StepOutput, StepSampling};
use crate::batch::{LogitRows, ModelInput, SeqChunk};
use crate::executor::Executor;
use crate::sampler::{check_stop, position_logprob, sequence_seed, validate, SequenceSampler};
use crate::scheduler::{Scheduler, SchedulerConfig, SeqId};
use crate::structured::{Commit, GrammarEnv, SeqGrammar};
use crate::rng::{RngCore, SplitMix64};
use ferry_transport::{
    EngineCommand, EngineEnd, EngineError, EngineOutputs, EngineRequest, EngineStats, FinishReason, FromEngine, Hello, RequestId,
    SamplingParams, SeqTiming, ToEngine, TokenLogprob, TokenOutput, MAX_STEP_REPORTS,
};
use std::time::Instant;
use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct EngineCoreConfig {
    pub rank: u32,
    pub scheduler: SchedulerConfig,
    /// Seeds requests that bring no seed of their own.
    pub seed: u64,
}

struct RequestState {
    params: SamplingParams,
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
    pub fn new(cfg: EngineCoreConfig, executor: Box<dyn Executor>, eog_ids: Vec<u32>) -> EngineCore {
        let seeds = crate::rng::splitmix(cfg.seed);
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
        }
    }

    pub fn mask_timing(&self) -> MaskTiming {
        self.mask_timing
    }

    /// Serves structured outputs over this vocabulary (the model's tokenizer).
    pub fn with_grammars(mut self, env: GrammarEnv) -> EngineCore {
        self.grammars = Some(env);
        self
    }

    pub fn grammars(&self) -> Option<&GrammarEnv> {
        self.grammars.as_ref()
    }

    pub fn vocab_size(&self) -> usize {
        self.executor.vocab_size()
    }

    /// Checks a request against the model and the cache, as vLLM's input processor does.
    fn check_request(&self, req: &EngineRequest) -> Result<(), EngineError> {
        if let Some(t) = req.prompt_tokens.iter().find(|&&t| t as usize >= self.vocab_size()) {
            return Err(EngineError::invalid(format!("prompt token id {t} is out of vocabulary (size {})", self.vocab_size())));
        }
        self.sched.check_prompt(req.prompt_tokens.len()).map_err(|e| EngineError::invalid(e.to_string()))?;
        if self.requests.contains_key(&req.id) {
            return Err(EngineError::invalid(format!("request id {} is already running", req.id)));
        }
        validate(&req.sampling, self.vocab_size()).map_err(|e| EngineError::invalid(e.to_string()))
    }

    /// Queues a request, or returns the output that refuses it.
    pub fn add_request(&mut self, req: EngineRequest) -> Result<(), TokenOutput> {
        let compiled = compile_constraint(self.grammars.as_ref(), &req);
        self.add_request_compiled(req, compiled)
    }

    /// `add_request` with the constraint already compiled by [`compile_constraint`].
    pub fn add_request_compiled(&mut self, req: EngineRequest, compiled: Compiled) -> Result<(), TokenOutput> {
        self.num_added += 1;
        let checked = self.check_request(&req).and_then(|()| compiled.transpose());
        let grammar = match checked {
            Ok(g) => g,
            Err(why) => return Err(refusal(req.id, why)),
        };
        let n = req.sampling.n.max(1);
        for index in 0..n {
            let seed = match req.sampling.seed {
                // Children of one seeded request differ from each other, yet are reproducible.
                Some(s) => sequence_seed(s, index),
                None => self.seeds.next_u64(),
            };
            let id = self.next_seq;
            self.next_seq += 1;
            // Completion 0 computes the prompt logprobs, so it skips the prefix
            // cache (every prompt position must run); its siblings may use it.
            let prompt_lp = req.sampling.prompt_logprobs.filter(|_| index == 0).map(|k| PromptLogprobs {
                k: k as usize,
                prompt: req.prompt_tokens.clone(),
                entries: vec![None; req.prompt_tokens.len().saturating_sub(1)],
            });
            let use_cache = prompt_lp.is_none();
            self.seqs.insert(
                id,
                SeqState {
                    request: req.id,
                    index,
                    sampler: SequenceSampler::new(&req.sampling, &req.prompt_tokens, seed),
                    prompt_len: req.prompt_tokens.len(),
                    reported_cached: false,
                    num_cached_tokens: 0,
                    prompt_lp,
                    clock: SeqClock { arrived: Instant::now(), scheduled: None, first_token: None },
                    // Each completion follows its own tokens.
                    grammar: grammar.as_ref().map(SeqGrammar::fork),
                },
            );
            // check_request applied the scheduler's rules, so this cannot fail.
            let _ = self.sched.try_add_sequence_with(id, req.prompt_tokens.clone(), use_cache);
        }
        self.requests.insert(req.id, RequestState { params: req.sampling, live: n as usize });
        Ok(())
    }

    /// Stops these requests and frees their blocks now. Returns their final outputs.
    pub fn abort(&mut self, ids: &[RequestId]) -> Vec<TokenOutput> {
        let mut outs = Vec::new();
        for &rid in ids {
            if self.requests.remove(&rid).is_none() {
                continue;
            }
            let mine: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.request == rid).map(|(&id, _)| id).collect();
            for sid in mine {
                let s = self.seqs.remove(&sid).expect("listed above");
                self.sched.abort(sid);
                outs.push(finished(rid, s.index, vec![], None, FinishReason::Abort, 0));
            }
        }
        outs
    }

    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    /// The token counts of the steps run since the last call (for the stats
    /// of the next batch sent).
    pub fn take_step_tokens(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.step_tokens)
    }

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
        }
    }

    /// One step: schedule, run the model, sample, and report what each sequence made.
    pub fn step(&mut self) -> Vec<TokenOutput> {
        let plan = self.sched.schedule();
        if plan.seqs.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        if self.step_tokens.len() == MAX_STEP_REPORTS {
            self.step_tokens.remove(0);
        }
        self.step_tokens.push(plan.num_batched_tokens as u32);
        for s in &plan.seqs {
            if let Some(st) = self.seqs.get_mut(&s.id) {
                st.clock.scheduled.get_or_insert(now);
            }
            if s.num_cached_tokens > 0 {
                if let Some(st) = self.seqs.get_mut(&s.id) {
                    if !st.reported_cached {
                        st.num_cached_tokens = s.num_cached_tokens;
                    }
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
                    block_table: s.block_table.clone(),
                    logits: self.logit_rows(s),
                })
                .collect(),
        };
        // The masks of constrained sequences due to sample are computed on a
        // helper thread while the model runs, so they add nothing to the step
        // unless they take longer than the forward pass.
        let mut masked: Vec<(SeqId, SeqGrammar)> = plan
            .seqs
            .iter()
            .filter(|s| s.sample)
            .filter_map(|s| Some((s.id, self.seqs.get_mut(&s.id)?.grammar.take()?)))
            .collect();
        let executor = &mut self.executor;
        let result = if masked.is_empty() {
            executor.execute(&input, &StepSampling::Host)
        } else {
            let timing = &mut self.mask_timing;
            std::thread::scope(|scope| {
                let masks = scope.spawn(|| {
                    let t = std::time::Instant::now();
                    masked.iter_mut().for_each(|(_, g)| g.fill_mask());
                    t.elapsed()
                });
                let r = executor.execute(&input, &StepSampling::Host);
                let waited = std::time::Instant::now();
                let compute = masks.join().unwrap_or_default();
                timing.stall += waited.elapsed();
                timing.compute += compute;
                timing.steps += 1;
                r
            })
        };
        self.mask_timing.masks += masked.len() as u64;
        for (sid, g) in masked {
            if let Some(st) = self.seqs.get_mut(&sid) {
                st.grammar = Some(g);
            }
        }
        // The host samples (StepSampling::Host), so logit rows come back;
        // taking device-sampled ids here waits for a backend that makes them.
        let mut logits = match result {
            Ok(StepOutput::Logits(l)) => l,
            Ok(StepOutput::Sampled(_)) => return self.fail_scheduled(&plan, "the backend sampled when asked for logits"),
            Err(e) => return self.fail_scheduled(&plan, &e.to_string()),
        };
        let vocab = self.vocab_size();
        let mut sampled = Vec::new();
        let mut outs = Vec::new();
        let mut ended = Vec::new();
        let mut next_row = 0usize;
        for (s, chunk) in plan.seqs.iter().zip(&input.seqs) {
            let rows = next_row..next_row + chunk.logits.count(chunk.len);
            next_row = rows.end;
            let Some(st) = self.seqs.get_mut(&s.id) else { continue };
            if chunk.logits == LogitRows::All {
                if let Some(plp) = st.prompt_lp.as_mut() {
                    for (t, r) in rows.clone().enumerate() {
                        plp.record(s.start_pos + t, &mut logits[r * vocab..(r + 1) * vocab]);
                    }
                }
            }
            if !s.sample || rows.is_empty() {
                continue;
            }
            let Some(req) = self.requests.get(&st.request) else { continue };
            let row = rows.end - 1;
            let logits_row = &mut logits[row * vocab..(row + 1) * vocab];
            // Tokens outside the constraint get -inf before anything else
            // looks at the logits, greedy decoding included.
            // A mask that cannot be computed is the constraint's fault (too
            // complex for llguidance's limits); a rejected token is ours.
            let mut grammar_error = st.grammar.as_mut().and_then(|g| g.apply_mask(logits_row).err()).map(EngineError::invalid);
            let pick = st.sampler.sample(logits_row, &req.params, &self.eog_ids);
            sampled.push((s.id, pick.token));
            let generated = st.sampler.num_generated();
            let mut finish = check_stop(&req.params, pick.token, generated, &self.eog_ids);
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
            let cached = if st.reported_cached { 0 } else { st.num_cached_tokens };
            st.reported_cached = true;
            let token_at = Instant::now();
            st.clock.first_token.get_or_insert(token_at);
            outs.push(TokenOutput {
                id: st.request,
                index: st.index,
                new_tokens: vec![pick.token],
                logprobs: pick.logprob.map(|l| vec![l]),
                finish: finish.clone(),
                num_cached_tokens: cached as u32,
                prompt_logprobs: st.prompt_lp.take().map(PromptLogprobs::finish),
                timing: finish.is_some().then(|| st.clock.timing(token_at)),
            });
            if finish.is_some() {
                ended.push(s.id);
            }
        }
        self.sched.update(&plan, &sampled);
        for sid in ended {
            self.end_sequence(sid);
        }
        outs
    }

    /// Which logits a scheduled chunk needs: every position while its
    /// sequence gathers prompt logprobs and the chunk is still in the prompt.
    fn logit_rows(&self, s: &crate::scheduler::ScheduledSeq) -> LogitRows {
        let gathering = self.seqs.get(&s.id).is_some_and(|st| st.prompt_lp.is_some() && s.start_pos < st.prompt_len);
        match (gathering, s.sample) {
            (true, _) => LogitRows::All,
            (false, true) => LogitRows::Last,
            (false, false) => LogitRows::None,
        }
    }

    fn end_sequence(&mut self, sid: SeqId) {
        self.sched.finish(sid);
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
    fn fail_scheduled(&mut self, plan: &crate::scheduler::SchedulerOutput, why: &str) -> Vec<TokenOutput> {
        tracing::error!("model step failed: {why}");
        let rids: Vec<RequestId> = plan.seqs.iter().filter_map(|s| self.seqs.get(&s.id).map(|st| st.request)).collect();
        let mut outs = self.abort(&rids);
        for o in &mut outs {
            o.finish = Some(FinishReason::Error(EngineError::internal(format!("engine failure: {why}"))));
        }
        outs
    }

    /// Ends every request with `why` (the rank cannot go on) and frees their blocks.
    pub fn fail_all(&mut self, why: &EngineError) -> Vec<TokenOutput> {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        let mut outs = self.abort(&ids);
        for o in &mut outs {
            o.finish = Some(FinishReason::Error(why.clone()));
        }
        outs
    }

    /// Requests still in flight (for tests and shutdown).
    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.sched.num_free_blocks()
    }

    pub fn num_blocks(&self) -> usize {
        self.sched.num_blocks()
    }
}

/// The output that refuses request `id`.
fn refusal(id: RequestId, why: EngineError) -> TokenOutput {
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

/// A running engine's threads. Dropping it does not stop them: send Shutdown, or
/// drop the gateway's end of the link, then `join`.
pub struct EngineThreads {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Why the gateway refused this rank, if it did.
    refused: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    control: std::sync::Arc<Control>,
    wake: flume::Sender<Inbox>,
}

/// What the node may ask of a running engine besides its link's commands.
#[derive(Default)]
struct Control {
    /// Finish what is running, take nothing new, and say so in the stats.
    draining: std::sync::atomic::AtomicBool,
    /// Requests in flight, as of the busy loop's last turn.
    in_flight: std::sync::atomic::AtomicUsize,
}

/// A running engine's controls, for the node that runs it (cheap to clone).
#[derive(Clone)]
pub struct EngineHandle {
    control: std::sync::Arc<Control>,
    wake: flume::Sender<Inbox>,
}

impl EngineHandle {
    /// Stop taking requests: the gateway sees `draining` in the next stats and
    /// sends no more; requests already running finish. (The node is stopping.)
    pub fn drain(&self) {
        self.control.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake an idle busy loop so the gateway hears of it now.
        let _ = self.wake.send(Inbox::Wake);
    }

    /// Requests the engine is still working on.
    pub fn in_flight(&self) -> usize {
        self.control.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl EngineThreads {
    pub fn handle(&self) -> EngineHandle {
        EngineHandle { control: self.control.clone(), wake: self.wake.clone() }
    }

    /// Waits for the threads to end; returns the gateway's refusal, if that is why.
    pub fn join(self) -> Option<String> {
        for t in self.threads {
            let _ = t.join();
        }
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

enum Inbox {
    Command(EngineCommand),
    /// An Add whose constraint the input thread already compiled.
    Add(EngineRequest, Compiled),
    /// The gateway's end went away.
    Closed,
    /// Look at the control flags (a drain began).
    Wake,
}

/// A test-only fault: with `FERRY_FAULT_INJECT_PANIC=ID` set, the busy loop
/// panics on a request whose prompt holds token `ID`, so tests can prove the
/// panic boundary. Unset in normal use, and then it costs one check per Add.
fn fault_injection_token() -> Option<u32> {
    std::env::var("FERRY_FAULT_INJECT_PANIC").ok().and_then(|v| v.parse().ok())
}

/// Schedules, executes and samples until the link closes or Shutdown comes.
fn busy_loop(
    core: &mut EngineCore,
    inbox_rx: &flume::Receiver<Inbox>,
    outbox_tx: &flume::Sender<EngineOutputs>,
    control: &Control,
    fault: Option<u32>,
) {
    let rank = core.cfg.rank;
    let mut pending = Vec::new();
    let mut woken = false;
    'run: loop {
        // Block for commands only when idle; otherwise take what has arrived.
        if !core.has_work() && pending.is_empty() {
            match inbox_rx.recv() {
                Ok(m) => pending.push(m),
                Err(_) => break,
            }
        }
        pending.extend(inbox_rx.try_iter());
        let mut outputs = Vec::new();
        for m in pending.drain(..) {
            match m {
                Inbox::Command(EngineCommand::Add(req)) => {
                    if fault.is_some_and(|t| req.prompt_tokens.contains(&t)) {
                        let _ = core.add_request(req);
                        panic!("injected fault (FERRY_FAULT_INJECT_PANIC)");
                    }
                    if let Err(refusal) = core.add_request(req) {
                        outputs.push(refusal);
                    }
                }
                Inbox::Add(req, compiled) => {
                    if fault.is_some_and(|t| req.prompt_tokens.contains(&t)) {
                        let _ = core.add_request_compiled(req, compiled);
                        panic!("injected fault (FERRY_FAULT_INJECT_PANIC)");
                    }
                    if let Err(refusal) = core.add_request_compiled(req, compiled) {
                        outputs.push(refusal);
                    }
                }
                Inbox::Command(EngineCommand::Abort(ids)) => outputs.extend(core.abort(&ids)),
                Inbox::Command(EngineCommand::Shutdown) | Inbox::Closed => break 'run,
                Inbox::Wake => woken = true,
            }
        }
        if core.has_work() {
            outputs.extend(core.step());
        }
        let draining = control.draining.load(std::sync::atomic::Ordering::Relaxed);
        control.in_flight.store(core.num_requests(), std::sync::atomic::Ordering::Relaxed);
        if !outputs.is_empty() || woken {
            woken = false;
            let batch = EngineOutputs { rank, outputs, stats: EngineStats { draining, step_tokens: core.take_step_tokens(), ..core.stats() } };
            if outbox_tx.send(batch).is_err() {
                break;
            }
        }
    }
}

/// Starts the input thread, busy loop and output thread of `core` on `end`. The
/// first message out is `hello`.
pub fn spawn_engine(mut core: EngineCore, end: EngineEnd, hello: Hello) -> std::io::Result<EngineThreads> {
    let EngineEnd { rx: mut cmd_rx, tx: mut out_tx } = end;
    let (inbox_tx, inbox_rx) = flume::unbounded::<Inbox>();
    let (outbox_tx, outbox_rx) = flume::unbounded::<EngineOutputs>();
    let rank = core.cfg.rank;
    let refused = std::sync::Arc::new(std::sync::Mutex::new(None));
    let refused_in = refused.clone();
    let control = std::sync::Arc::new(Control::default());
    let control_busy = control.clone();
    let wake = inbox_tx.clone();
    // Constraints compile on the input thread (milliseconds for a big schema),
    // so the busy loop never waits on a compile.
    let grammars = core.grammars().cloned();

    let input = std::thread::Builder::new().name(format!("ferry-in{rank}")).spawn(move || loop {
        match cmd_rx.recv() {
            Ok(ToEngine::Command(c)) => {
                let stop = matches!(c, EngineCommand::Shutdown);
                let msg = match c {
                    EngineCommand::Add(req) if req.sampling.constraint.is_some() => {
                        let compiled = compile_constraint(grammars.as_ref(), &req);
                        Inbox::Add(req, compiled)
                    }
                    c => Inbox::Command(c),
                };
                if inbox_tx.send(msg).is_err() || stop {
                    break;
                }
            }
            Ok(ToEngine::Welcome(w)) => {
                // The gateway may refuse this rank (a duplicate, another model, another
                // protocol version): say why and stop, rather than idle on a link that
                // will never carry a request.
                if let Err(refusal) = ferry_transport::handshake::check_welcome(&w) {
                    tracing::error!(rank, "engine rank {rank} stops: {refusal}");
                    *refused_in.lock().unwrap_or_else(|p| p.into_inner()) = Some(refusal.message);
                    let _ = inbox_tx.send(Inbox::Closed);
                    break;
                }
            }
            Err(_) => {
                let _ = inbox_tx.send(Inbox::Closed);
                break;
            }
        }
    })?;

    let fault = fault_injection_token();
    let busy = std::thread::Builder::new().name(format!("ferry-busy{rank}")).spawn(move || {
        // The panic boundary: a bug in a step must not leave the rank's streams
        // hanging. Every request still here fails as an internal error, the
        // panic is logged, and the loop ends, which closes the link, so the
        // gateway marks the rank down and serves on with the others.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            busy_loop(&mut core, &inbox_rx, &outbox_tx, &control_busy, fault)
        }));
        if let Err(panic) = run {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with no message".into());
            tracing::error!(rank, "engine rank {rank} panicked: {what}; failing its requests");
            let why = EngineError::internal(format!("engine rank {rank} failed: {what}"));
            let outputs = core.fail_all(&why);
            let _ = outbox_tx.send(EngineOutputs { rank, outputs, stats: EngineStats::default() });
        }
    })?;

    let output = std::thread::Builder::new().name(format!("ferry-out{rank}")).spawn(move || {
        if out_tx.send(FromEngine::Hello(hello)).is_err() {
            return;
        }
        while let Ok(batch) = outbox_rx.recv() {
            if out_tx.send(FromEngine::Outputs(batch)).is_err() {
                break;
            }
        }
    })?;
    Ok(EngineThreads { threads: vec![input, busy, output], refused, control, wake })
}
