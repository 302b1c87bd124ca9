//! Continuous-batching scheduler, modelled on vLLM v1's `Scheduler` (FCFS
//! policy, one KV cache group, no speculative decoding, LoRA or encoder).
//!
//! There is no prefill or decode phase: every sequence has a number of
//! computed tokens and a number of known tokens (prompt + outputs), and each
//! step hands out one token budget so the computed count catches up. Running
//! sequences go first (a decode costs one token), then waiting ones in
//! arrival order; a prompt that does not fit the remaining budget is chunked
//! (chunked prefill), so prompt chunks and decodes share a step. When blocks
//! run out, the most recently admitted running sequence is preempted by
//! recomputation: its blocks are freed and it goes back to the head of the
//! waiting queue with its prompt and output tokens, to be recomputed later
//! (largely from the prefix cache).
//!
//! Sans-IO: the engine calls `schedule`, runs the model on the result, then
//! calls `update` with the sampled tokens, then `schedule` again.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use crate::kv_cache::{CachedPrefix, KvCacheManager, KvError, DEFAULT_BLOCK_SIZE};

/// The engine's id for one sequence (one completion of a request; a request
/// with `n` > 1 has several). The engine counts them up and never reuses one.
pub type SeqId = u64;

/// The scheduler's limits, vLLM's `SchedulerConfig` fields of the same names;
/// [`crate::assemble::build_engine_core`] fills them from the engine's flags.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Token budget of one step (prompt chunks + decodes).
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + outputs) the model takes.
    pub max_model_len: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// KV blocks in the cache.
    pub num_blocks: usize,
    /// Look up a waiting sequence's full prompt blocks in the prefix cache
    /// before computing them.
    pub enable_prefix_caching: bool,
    /// Split prompts that do not fit the remaining budget across steps.
    pub enable_chunked_prefill: bool,
    /// Cap on the tokens one sequence gets per step (0 = off), so a long
    /// prompt cannot hog a step.
    pub long_prefill_token_threshold: usize,
    /// Which sequence goes first (vLLM's `--scheduling-policy`).
    pub policy: SchedulingPolicy,
}

/// The order sequences are admitted and kept in (vLLM's scheduling policies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SchedulingPolicy {
    /// First come, first served: admission in arrival order, and the most
    /// recently admitted sequence is preempted first.
    #[default]
    Fcfs,
    /// By (priority, arrival), lower first: waiting sequences are admitted
    /// in that order, running ones get the step's budget in that order, and
    /// the last in it (the lowest priority, latest arrival) is preempted
    /// first, as vLLM's priority scheduler does.
    Priority,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_model_len: 2048,
            block_size: DEFAULT_BLOCK_SIZE,
            num_blocks: 1024,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: 0,
            policy: SchedulingPolicy::Fcfs,
        }
    }
}

/// One step's plan (vLLM's `SchedulerOutput`): what the model computes now.
/// Hand it back to [`Scheduler::update`] after the model ran.
#[derive(Clone, Debug)]
pub struct SchedulerOutput {
    /// The sequences computed this step: running ones first, in admission
    /// order, then the ones admitted now.
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences preempted during this step (their KV is gone; they will be
    /// recomputed). None of them is in `seqs`.
    pub preempted: Vec<SeqId>,
    /// Sum of `tokens.len()` over `seqs`.
    pub num_batched_tokens: usize,
}

/// One sequence's part of a step.
#[derive(Clone, Debug)]
pub struct ScheduledSeq {
    /// Which sequence.
    pub id: SeqId,
    /// Positions start_pos .. start_pos + tokens.len() are computed this step (token ids to feed).
    pub start_pos: usize,
    /// The token ids to feed at those positions: a prompt chunk (after a
    /// preemption, outputs too), or a decode's one token, sampled last step.
    pub tokens: Vec<u32>,
    /// Covers at least start_pos + tokens.len() positions: position p lives in
    /// block block_table[p / block_size], slot p % block_size.
    pub block_table: Vec<u32>,
    /// After this step every known token of the sequence is computed, so the engine samples one for it.
    pub sample: bool,
    /// Tokens served from the prefix cache when the sequence was (re)admitted this step, else 0.
    pub num_cached_tokens: usize,
    /// Proposed tokens at the end of `tokens` (a speculative verify chunk,
    /// `crate::spec`): not the sequence's yet, each kept only if the model
    /// picks it at the position before. 0 for every other chunk.
    pub num_draft: usize,
}

/// Why `try_add_sequence` refused a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddError {
    /// A live sequence already has this id (a caller bug).
    DuplicateId(SeqId),
    /// A prompt of no tokens: nothing to compute logits from.
    EmptyPrompt,
    /// The prompt leaves no room for an output token under `max_model_len`.
    TooLong {
        /// Prompt tokens.
        len: usize,
        /// The limit, which the prompt reaches or passes.
        max_model_len: usize,
    },
    /// The prompt plus one generated token needs more blocks than the whole cache.
    ExceedsCache {
        /// Prompt tokens.
        len: usize,
        /// Token slots in the whole cache (blocks x block size).
        capacity_tokens: usize,
    },
}

impl fmt::Display for AddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddError::DuplicateId(id) => write!(f, "sequence id {id} is already scheduled"),
            AddError::EmptyPrompt => write!(f, "the prompt is empty"),
            AddError::TooLong { len, max_model_len } => write!(
                f,
                "the prompt has {len} tokens, but this model's maximum context length is {max_model_len} tokens"
            ),
            AddError::ExceedsCache { len, capacity_tokens } => write!(
                f,
                "the prompt has {len} tokens, more than the KV cache can ever hold ({capacity_tokens} tokens)"
            ),
        }
    }
}

impl std::error::Error for AddError {}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
}

#[derive(Clone, Debug)]
struct Sequence {
    tokens: Vec<u32>,
    num_prompt_tokens: usize,
    num_computed: usize,
    num_preemptions: u64,
    state: State,
    /// False when every prompt position must be computed (its logits are
    /// wanted for prompt logprobs): the prefix cache is not looked up.
    use_prefix_cache: bool,
    /// (priority, arrival number): the order under the priority policy.
    order: (i64, u64),
}

/// The continuous-batching scheduler (see the module doc): a waiting queue, a
/// running list and the KV block manager they share.
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// In admission order: the last one is the first preemption victim.
    running: Vec<SeqId>,
    num_preemptions: u64,
    /// Proposed tokens for decoding sequences, for the next `schedule` only.
    drafts: HashMap<SeqId, Vec<u32>>,
    /// Sequences added so far: the next one's arrival number.
    arrivals: u64,
}

impl Scheduler {
    /// Zero limits are raised to 1 (block size, max_num_seqs, token budget,
    /// max_model_len) so that no configuration makes the scheduler panic or
    /// spin; the engine validates its flags before this.
    pub fn new(mut cfg: SchedulerConfig) -> Scheduler {
        cfg.block_size = cfg.block_size.max(1);
        cfg.max_num_seqs = cfg.max_num_seqs.max(1);
        cfg.max_num_batched_tokens = cfg.max_num_batched_tokens.max(1);
        cfg.max_model_len = cfg.max_model_len.max(1);
        let kv = KvCacheManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching);
        cfg.num_blocks = kv.num_blocks();
        Scheduler {
            cfg,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
            drafts: HashMap::new(),
            arrivals: 0,
        }
    }

    /// The configuration in force: as given, with zero limits raised to 1 and
    /// `num_blocks` as many as the block manager holds.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The block manager, read-only (metrics, tests).
    pub fn kv_cache(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Longest sequence this scheduler can carry: the smaller of
    /// max_model_len and the cache's capacity in tokens. The engine must end a
    /// sequence once it has this many tokens, or it could outgrow the cache
    /// and never be scheduled again.
    pub fn max_seq_len(&self) -> usize {
        let capacity = self.kv.num_blocks().saturating_mul(self.kv.block_size());
        self.cfg.max_model_len.min(capacity)
    }

    /// Queue at the tail of the waiting queue. The caller has validated
    /// 1 <= prompt.len() < max_model_len and that prompt.len() + 1 tokens fit
    /// in the whole cache; a sequence failing those checks (or reusing a live
    /// id) is dropped rather than left to block the queue forever. Use
    /// [`Self::try_add_sequence`] to learn why.
    pub fn add_sequence(&mut self, id: SeqId, prompt_tokens: Vec<u32>) {
        let _ = self.try_add_sequence(id, prompt_tokens);
    }

    /// The rules a prompt of `len` tokens must meet to be scheduled at all: the
    /// one place they are stated (the engine refuses a request with these).
    pub fn check_prompt(&self, len: usize) -> Result<(), AddError> {
        if len == 0 {
            return Err(AddError::EmptyPrompt);
        }
        if len >= self.cfg.max_model_len {
            return Err(AddError::TooLong {
                len,
                max_model_len: self.cfg.max_model_len,
            });
        }
        let capacity_tokens = self.kv.num_blocks().saturating_mul(self.kv.block_size());
        if len + 1 > capacity_tokens {
            return Err(AddError::ExceedsCache {
                len,
                capacity_tokens,
            });
        }
        Ok(())
    }

    /// `add_sequence` that reports what is wrong with the request.
    pub fn try_add_sequence(&mut self, id: SeqId, prompt_tokens: Vec<u32>) -> Result<(), AddError> {
        self.try_add_sequence_with(id, prompt_tokens, true)
    }

    /// `try_add_sequence`, choosing whether the prefix cache may serve the
    /// prompt (what it computes is still cached for others).
    pub fn try_add_sequence_with(&mut self, id: SeqId, prompt_tokens: Vec<u32>, use_prefix_cache: bool) -> Result<(), AddError> {
        self.try_add_sequence_prioritized(id, prompt_tokens, use_prefix_cache, 0)
    }

    /// [`Self::try_add_sequence_with`] at `priority` (lower goes first under
    /// [`SchedulingPolicy::Priority`]; ignored under FCFS).
    pub fn try_add_sequence_prioritized(&mut self, id: SeqId, prompt_tokens: Vec<u32>, use_prefix_cache: bool, priority: i64) -> Result<(), AddError> {
        if self.seqs.contains_key(&id) {
            return Err(AddError::DuplicateId(id));
        }
        let len = prompt_tokens.len();
        self.check_prompt(len)?;
        self.seqs.insert(
            id,
            Sequence {
                tokens: prompt_tokens,
                num_prompt_tokens: len,
                num_computed: 0,
                num_preemptions: 0,
                state: State::Waiting,
                use_prefix_cache,
                order: (priority, self.arrivals),
            },
        );
        self.arrivals += 1;
        self.waiting.push_back(id);
        Ok(())
    }

    /// Remove a waiting or running sequence and free its blocks at once; false if unknown.
    pub fn abort(&mut self, id: SeqId) -> bool {
        self.remove(id)
    }

    /// The engine ended this sequence (EOS, max_tokens, stop): free its blocks, forget it.
    pub fn finish(&mut self, id: SeqId) -> bool {
        self.remove(id)
    }

    fn remove(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        match seq.state {
            State::Waiting => self.waiting.retain(|&w| w != id),
            State::Running => self.running.retain(|&r| r != id),
        }
        self.kv.free(id);
        true
    }

    /// Tokens a sequence may compute this step, before the budget: what it
    /// has not computed, capped by the long-prefill threshold and so that no
    /// input position reaches max_model_len (the last position is only ever
    /// sampled, never fed).
    fn wanted_tokens(&self, num_tokens: usize, num_computed: usize) -> usize {
        let mut n = num_tokens.saturating_sub(num_computed);
        let threshold = self.cfg.long_prefill_token_threshold;
        if threshold > 0 {
            n = n.min(threshold);
        }
        n.min((self.cfg.max_model_len - 1).saturating_sub(num_computed))
    }

    /// Plans the next step within `max_num_batched_tokens`: running sequences
    /// first (preempting the most recently admitted when blocks run out), then
    /// waiting ones in FCFS order while there is budget and room, unless this
    /// step preempted. Allocates the KV slots the plan needs.
    pub fn schedule(&mut self) -> SchedulerOutput {
        if self.cfg.policy == SchedulingPolicy::Priority {
            // Both queues in (priority, arrival) order: the FCFS logic below
            // then serves the first first and preempts the last first.
            let seqs = &self.seqs;
            let key = |id: &SeqId| seqs.get(id).map_or((i64::MAX, u64::MAX), |s| s.order);
            self.running.sort_by_key(key);
            self.waiting.make_contiguous().sort_by_key(key);
        }
        let max_budget = self.cfg.max_num_batched_tokens;
        let mut budget = max_budget;
        let mut scheduled = Vec::new();
        let mut preempted = Vec::new();

        // Running sequences first, in admission order.
        let mut idx = 0;
        while idx < self.running.len() && budget > 0 {
            let id = self.running[idx];
            let Some(seq) = self.seqs.get(&id) else {
                // Cannot happen (remove() keeps both in step); drop the stray id.
                self.running.remove(idx);
                continue;
            };
            let base = self
                .wanted_tokens(seq.tokens.len(), seq.num_computed)
                .min(budget);
            if base == 0 {
                idx += 1;
                continue;
            }
            let num_computed = seq.num_computed;
            // A decoding sequence may feed proposed tokens after its last
            // one, within max_model_len and leaving a token of the budget
            // for each running sequence after it.
            let mut draft = match self.drafts.remove(&id) {
                Some(d) if num_computed + 1 == seq.tokens.len() => d,
                _ => Vec::new(),
            };
            let behind = self.running.len() - idx - 1;
            let room = (self.cfg.max_model_len - 1)
                .saturating_sub(num_computed + 1)
                .min(budget.saturating_sub(behind + 1));
            draft.truncate(room);
            let mut n = base + draft.len();
            let mut can_schedule = true;
            loop {
                let seq = &self.seqs[&id];
                match self.kv.allocate_slots(
                    id,
                    &seq.tokens,
                    num_computed,
                    n,
                    &CachedPrefix::default(),
                ) {
                    Ok(()) => break,
                    Err(KvError::OutOfBlocks { .. }) if n > base => {
                        // Proposals never cost another sequence its blocks.
                        n = base;
                        draft.clear();
                    }
                    Err(KvError::OutOfBlocks { .. }) => {
                        // The victim is the most recently admitted: it sits
                        // after `idx`, so it was not scheduled this step, or
                        // it is this very sequence.
                        let Some(victim) = self.running.pop() else {
                            can_schedule = false;
                            break;
                        };
                        self.preempt(victim);
                        preempted.push(victim);
                        if victim == id {
                            can_schedule = false;
                            break;
                        }
                    }
                    Err(KvError::Invalid(_)) => {
                        // Not reachable without a prefix; skip rather than loop.
                        can_schedule = false;
                        break;
                    }
                }
            }
            if !can_schedule {
                break;
            }
            scheduled.push(self.scheduled_seq(id, num_computed, base, 0, draft));
            budget -= n;
            idx += 1;
        }

        // Then waiting sequences in FCFS order, unless this step had to preempt
        // (memory is tight: admitting more would only cause more preemption).
        if preempted.is_empty() {
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&id) = self.waiting.front() else {
                    break;
                };
                let Some(seq) = self.seqs.get(&id) else {
                    self.waiting.pop_front();
                    continue;
                };
                let prefix = if seq.use_prefix_cache {
                    self.kv.get_computed_blocks(&seq.tokens, seq.num_preemptions > 0)
                } else {
                    Default::default()
                };
                let seq = &self.seqs[&id];
                let computed = prefix.num_tokens;
                let mut n = self.wanted_tokens(seq.tokens.len(), computed);
                if n == 0 {
                    // Only a sequence past max_model_len (the engine should
                    // have finished it): it cannot move, and FCFS does not skip.
                    break;
                }
                if !self.cfg.enable_chunked_prefill && n > budget {
                    // Without chunking a prefill waits for a step with room
                    // for all of it, unless it could never fit a step at all;
                    // then chunking is the only way forward.
                    if n <= max_budget {
                        break;
                    }
                }
                n = n.min(budget);
                if self
                    .kv
                    .allocate_slots(id, &seq.tokens, 0, n, &prefix)
                    .is_err()
                {
                    break;
                }
                self.waiting.pop_front();
                self.running.push(id);
                if let Some(seq) = self.seqs.get_mut(&id) {
                    seq.state = State::Running;
                    seq.num_computed = computed;
                }
                scheduled.push(self.scheduled_seq(id, computed, n, computed, Vec::new()));
                budget -= n;
            }
        }

        self.drafts.clear();
        let num_batched_tokens = scheduled
            .iter()
            .map(|s: &ScheduledSeq| s.tokens.len())
            .sum();
        SchedulerOutput {
            seqs: scheduled,
            preempted,
            num_batched_tokens,
        }
    }

    fn scheduled_seq(&self, id: SeqId, start: usize, n: usize, cached: usize, draft: Vec<u32>) -> ScheduledSeq {
        let seq = &self.seqs[&id];
        let mut tokens = seq.tokens[start..start + n].to_vec();
        let num_draft = draft.len();
        tokens.extend(draft);
        ScheduledSeq {
            id,
            start_pos: start,
            tokens,
            block_table: self.kv.block_table(id).unwrap_or_default().to_vec(),
            sample: start + n == seq.tokens.len(),
            num_cached_tokens: cached,
            num_draft,
        }
    }

    /// Preempt by recomputation: drop the KV, keep every token, requeue first.
    fn preempt(&mut self, id: SeqId) {
        self.kv.free(id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed = 0;
            seq.num_preemptions += 1;
            seq.state = State::Waiting;
        }
        self.waiting.push_front(id);
        self.num_preemptions += 1;
    }

    /// Proposes `draft` to follow decoding sequence `id`'s tokens in the next
    /// [`Self::schedule`] (which may shorten or drop it: budget, room,
    /// blocks); forgotten after that step.
    pub fn set_draft(&mut self, id: SeqId, draft: Vec<u32>) {
        if !draft.is_empty() && self.is_decoding(id) {
            self.drafts.insert(id, draft);
        }
    }

    /// Whether `id` is running with every token but its last computed: its
    /// next step is a decode (or a verify pass).
    pub fn is_decoding(&self, id: SeqId) -> bool {
        self.seqs.get(&id).is_some_and(|s| s.state == State::Running && s.num_computed + 1 == s.tokens.len())
    }

    /// After the model ran `out`: advance each scheduled sequence's
    /// computed-token count; for the sequences in `sampled` (those with
    /// sample == true) append the new tokens (the last is fed on the next
    /// step). A verify chunk's sequence takes up to `1 + num_draft` tokens,
    /// in order: each after the first says the proposed token before it was
    /// the model's pick (it must equal it), so its position is computed too.
    /// Entries for sequences aborted or finished since `schedule`, repeated
    /// updates, tokens past what a chunk allows and tokens for sequences
    /// that were not due to sample are ignored.
    pub fn update(&mut self, out: &SchedulerOutput, sampled: &[(SeqId, u32)]) {
        // Per sequence due to sample: its chunk's proposed tokens, and how
        // many tokens it has taken so far.
        let mut may_sample: HashMap<SeqId, (&[u32], usize)> = HashMap::new();
        for s in &out.seqs {
            let Some(seq) = self.seqs.get_mut(&s.id) else {
                continue;
            };
            let Some(fed) = s.tokens.len().checked_sub(s.num_draft) else {
                continue;
            };
            let end = s.start_pos + fed;
            if seq.state != State::Running
                || seq.num_computed != s.start_pos
                || end > seq.tokens.len()
            {
                continue;
            }
            seq.num_computed = end;
            if s.sample && end == seq.tokens.len() {
                may_sample.insert(s.id, (&s.tokens[fed..], 0));
            }
        }
        for &(id, tok) in sampled {
            let Some((draft, taken)) = may_sample.get_mut(&id).filter(|(_, t)| *t != usize::MAX) else {
                continue;
            };
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if *taken > 0 {
                // The token before this one must have been the proposal
                // there, whose position the verify pass computed.
                if *taken > draft.len() || seq.tokens.last() != Some(&draft[*taken - 1]) {
                    *taken = usize::MAX;
                    continue;
                }
                seq.num_computed += 1;
            }
            seq.tokens.push(tok);
            *taken += 1;
        }
    }

    /// Prompt + output tokens so far.
    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    /// Prompt tokens of a live sequence (None: unknown id).
    pub fn num_prompt_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.num_prompt_tokens)
    }

    /// Tokens of a live sequence whose KV is computed (or scheduled and
    /// updated); 0 again after a preemption.
    pub fn num_computed_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.num_computed)
    }

    /// Whether the sequence holds KV blocks and is stepped (false for waiting,
    /// preempted and unknown ones).
    pub fn is_running(&self, id: SeqId) -> bool {
        self.seqs
            .get(&id)
            .is_some_and(|s| s.state == State::Running)
    }

    /// Sequences waiting for admission, preempted ones included.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted and holding blocks (at most `max_num_seqs`).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether any sequence is waiting or running: the engine steps while so.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Fraction of KV blocks held by some sequence, 0..=1 (vLLM's `kv_cache_usage`).
    pub fn kv_usage(&self) -> f32 {
        self.kv.usage()
    }

    /// KV blocks that can be handed out now, cached ones nobody holds included.
    pub fn num_free_blocks(&self) -> usize {
        self.kv.num_free_blocks()
    }

    /// KV blocks in the cache.
    pub fn num_blocks(&self) -> usize {
        self.kv.num_blocks()
    }

    /// Preemptions since the scheduler was made (vLLM's `num_preemptions`).
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Prompt tokens looked up in the prefix cache at first admission
    /// ([`KvCacheManager::prefix_cache_queries`]).
    pub fn prefix_cache_queries(&self) -> u64 {
        self.kv.prefix_cache_queries()
    }

    /// Of those, tokens found cached ([`KvCacheManager::prefix_cache_hits`]).
    pub fn prefix_cache_hits(&self) -> u64 {
        self.kv.prefix_cache_hits()
    }

    /// Prefix-cache changes since the last call ([`KvCacheManager::take_kv_events`]).
    pub fn take_kv_events(&mut self) -> Vec<ferry_transport::KvEvent> {
        self.kv.take_kv_events()
    }

    /// Every registered block's chained hash ([`KvCacheManager::held_block_hashes`]).
    pub fn held_block_hashes(&self) -> Vec<u64> {
        self.kv.held_block_hashes()
    }

    /// Consistency of queues, sequences and blocks (for tests and debugging).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.kv.check_invariants()?;
        if self.waiting.len() + self.running.len() != self.seqs.len() {
            return Err("queues and sequence map disagree".into());
        }
        if self.running.len() > self.cfg.max_num_seqs {
            return Err("more running sequences than max_num_seqs".into());
        }
        for &id in &self.waiting {
            let s = self.seqs.get(&id).ok_or("waiting id without sequence")?;
            if s.state != State::Waiting || s.num_computed != 0 || self.kv.block_table(id).is_some()
            {
                return Err(format!(
                    "waiting seq {id} has state, computed tokens or blocks"
                ));
            }
        }
        let bs = self.kv.block_size();
        for &id in &self.running {
            let s = self.seqs.get(&id).ok_or("running id without sequence")?;
            let table = self
                .kv
                .block_table(id)
                .ok_or(format!("running seq {id} has no blocks"))?;
            if s.state != State::Running || table.len() * bs < s.num_computed {
                return Err(format!(
                    "running seq {id}: blocks do not cover its computed tokens"
                ));
            }
            self.kv.check_seq_contents(id, &s.tokens)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn cfg(num_blocks: usize, block_size: usize, budget: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: budget,
            max_model_len: 1024,
            block_size,
            num_blocks,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: 0,
            policy: SchedulingPolicy::Fcfs,
        }
    }

    /// One engine step: schedule, "sample" `tok` for every sequence due.
    fn step(s: &mut Scheduler, tok: u32) -> SchedulerOutput {
        let out = s.schedule();
        let sampled: Vec<(SeqId, u32)> = out
            .seqs
            .iter()
            .filter(|x| x.sample)
            .map(|x| (x.id, tok))
            .collect();
        s.update(&out, &sampled);
        s.check_invariants().unwrap();
        out
    }

    fn find(out: &SchedulerOutput, id: SeqId) -> Option<&ScheduledSeq> {
        out.seqs.iter().find(|x| x.id == id)
    }

    #[test]
    fn prefill_then_decode() {
        let mut s = Scheduler::new(cfg(16, 4, 64));
        s.add_sequence(1, vec![10, 11, 12, 13, 14]);
        let out = step(&mut s, 100);
        let x = find(&out, 1).unwrap();
        assert_eq!(
            (x.start_pos, x.tokens.clone(), x.sample),
            (0, vec![10, 11, 12, 13, 14], true)
        );
        assert_eq!(x.block_table.len(), 2);
        assert_eq!(out.num_batched_tokens, 5);
        let out = step(&mut s, 101);
        let x = find(&out, 1).unwrap();
        assert_eq!(
            (x.start_pos, x.tokens.clone(), x.sample),
            (5, vec![100], true)
        );
        assert_eq!(s.tokens(1).unwrap(), &[10, 11, 12, 13, 14, 100, 101]);
        assert_eq!(s.num_prompt_tokens(1), Some(5));
        assert!(s.finish(1));
        assert!(!s.has_work());
        assert_eq!(s.num_free_blocks(), 16);
    }

    #[test]
    fn chunked_prefill_mixes_with_decodes() {
        let mut s = Scheduler::new(cfg(64, 4, 8));
        s.add_sequence(1, vec![1, 2, 3]);
        step(&mut s, 50); // seq 1 prefilled, sampled 50
        s.add_sequence(2, (0..20).collect());
        // Step: seq 1 decodes (1 token), seq 2 gets the remaining 7.
        let out = step(&mut s, 51);
        assert_eq!(find(&out, 1).unwrap().tokens, vec![50]);
        let x = find(&out, 2).unwrap();
        assert_eq!((x.start_pos, x.tokens.len(), x.sample), (0, 7, false));
        assert_eq!(out.num_batched_tokens, 8);
        let out = step(&mut s, 52);
        let x = find(&out, 2).unwrap();
        assert_eq!(
            (x.start_pos, x.tokens.clone(), x.sample),
            (7, (7..14).collect(), false)
        );
        assert!(x.block_table.len() * 4 >= 14);
        let out = step(&mut s, 53);
        let x = find(&out, 2).unwrap();
        assert_eq!(
            (x.start_pos, x.tokens.clone(), x.sample),
            (14, (14..20).collect(), true)
        );
        assert_eq!(out.num_batched_tokens, 7);
        assert_eq!(s.tokens(2).unwrap().len(), 21);
        assert_eq!(*s.tokens(2).unwrap().last().unwrap(), 53);
        // Seq 1 sampled every step: 3 prompt + 4 outputs.
        assert_eq!(s.tokens(1).unwrap(), &[1, 2, 3, 50, 51, 52, 53]);
    }

    #[test]
    fn budget_and_max_num_seqs() {
        let mut c = cfg(256, 4, 10);
        c.max_num_seqs = 3;
        let mut s = Scheduler::new(c);
        for id in 0..5 {
            s.add_sequence(id, vec![id as u32 + 1; 6]);
        }
        // Step 1: seq 0 (6) + seq 1 chunk (4) = 10.
        let out = step(&mut s, 7);
        assert_eq!(out.num_batched_tokens, 10);
        assert_eq!(out.seqs.len(), 2);
        assert_eq!(find(&out, 1).unwrap().tokens.len(), 4);
        // Step 2: seq 0 decode 1, seq 1 rest 2, seq 2 chunk 6 (max 3 running).
        let out = step(&mut s, 7);
        assert_eq!(
            out.seqs.iter().map(|x| x.tokens.len()).collect::<Vec<_>>(),
            vec![1, 2, 6]
        );
        assert_eq!(s.num_running(), 3);
        assert_eq!(s.num_waiting(), 2);
        // Steady state: 3 decodes, nobody else admitted.
        let out = step(&mut s, 7);
        assert_eq!(out.num_batched_tokens, 3);
        assert_eq!(s.num_running(), 3);
        s.finish(0);
        let out = step(&mut s, 7);
        assert_eq!(
            out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn long_prefill_threshold_caps_each_sequence() {
        let mut c = cfg(256, 4, 100);
        c.long_prefill_token_threshold = 6;
        let mut s = Scheduler::new(c);
        s.add_sequence(1, (0..15).collect());
        s.add_sequence(2, (0..4).collect());
        let out = step(&mut s, 0);
        assert_eq!(
            out.seqs.iter().map(|x| x.tokens.len()).collect::<Vec<_>>(),
            vec![6, 4]
        );
        let out = step(&mut s, 0);
        assert_eq!(
            out.seqs.iter().map(|x| x.tokens.len()).collect::<Vec<_>>(),
            vec![6, 1]
        );
        let out = step(&mut s, 0);
        assert_eq!(find(&out, 1).unwrap().tokens.len(), 3);
        assert!(find(&out, 1).unwrap().sample);
    }

    #[test]
    fn no_chunking_waits_for_room() {
        let mut c = cfg(256, 4, 10);
        c.enable_chunked_prefill = false;
        let mut s = Scheduler::new(c);
        s.add_sequence(1, vec![1; 4]);
        s.add_sequence(2, vec![2; 8]);
        s.add_sequence(3, vec![3; 2]);
        // 4 fits, 8 does not fit the remaining 6: it waits, and 3 waits behind it.
        let out = step(&mut s, 0);
        assert_eq!(out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1]);
        // Decode 1 + 8 = 9 <= 10; then 3 (2 tokens) does not fit 1.
        let out = step(&mut s, 0);
        assert_eq!(
            out.seqs
                .iter()
                .map(|x| (x.id, x.tokens.len()))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 8)]
        );
        let out = step(&mut s, 0);
        assert_eq!(
            out.seqs
                .iter()
                .map(|x| (x.id, x.tokens.len()))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 1), (3, 2)]
        );
        // A prompt longer than the whole budget is chunked rather than stuck.
        s.add_sequence(4, vec![4; 25]);
        s.finish(1);
        s.finish(2);
        s.finish(3);
        let out = step(&mut s, 0);
        assert_eq!(find(&out, 4).unwrap().tokens.len(), 10);
    }

    #[test]
    fn shared_prompts_hit_the_prefix_cache() {
        let mut s = Scheduler::new(cfg(64, 4, 100));
        let prompt: Vec<u32> = (0..10).collect(); // 2 full blocks
        s.add_sequence(1, prompt.clone());
        let out = step(&mut s, 99);
        assert_eq!(find(&out, 1).unwrap().num_cached_tokens, 0);
        for id in 2..5 {
            s.add_sequence(id, prompt.clone());
        }
        let out = step(&mut s, 99);
        let t1 = find(&out, 1).unwrap().block_table.clone();
        for id in 2..5 {
            let x = find(&out, id).unwrap();
            assert_eq!(
                (x.num_cached_tokens, x.start_pos, x.tokens.clone()),
                (8, 8, vec![8, 9])
            );
            assert_eq!(&x.block_table[..2], &t1[..2]);
            assert!(x.sample);
        }
        assert_eq!(s.kv_cache().ref_count(t1[0]), Some(4));
        assert_eq!(s.prefix_cache_queries(), 40);
        assert_eq!(s.prefix_cache_hits(), 24);
        // Same prompt admitted in the same step as the sequence that computes
        // it: it hits blocks registered earlier in this very step.
        let mut s = Scheduler::new(cfg(64, 4, 100));
        s.add_sequence(1, prompt.clone());
        s.add_sequence(2, prompt.clone());
        let out = step(&mut s, 0);
        assert_eq!(find(&out, 2).unwrap().num_cached_tokens, 8);
        assert_eq!(out.num_batched_tokens, 12);
    }

    #[test]
    fn priority_policy_admits_and_keeps_the_urgent_first() {
        // Room for two running sequences (max_num_seqs 2); 6 blocks of 2 slots.
        let mut c = cfg(6, 2, 64);
        c.enable_prefix_caching = false;
        c.max_num_seqs = 2;
        c.policy = SchedulingPolicy::Priority;
        let mut s = Scheduler::new(c);
        // Arrival order 1, 2, 3; priorities 5, 0, 0: 2 and 3 go first.
        for (id, priority) in [(1, 5), (2, 0), (3, 0)] {
            s.try_add_sequence_prioritized(id, vec![id as u32 * 10; 3], false, priority).unwrap();
        }
        let out = step(&mut s, 1);
        assert_eq!(out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![2, 3]);
        // A later, more urgent arrival is next in line, before 1.
        s.try_add_sequence_prioritized(4, vec![40; 3], false, -1).unwrap();
        s.finish(3);
        let out = step(&mut s, 2);
        assert_eq!(out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![2, 4]);
        // Blocks run out as they grow: the less urgent of the two running
        // (2, priority 0, against 4's -1) is the one preempted, though 4
        // was admitted after it.
        let mut preempted = Vec::new();
        for t in 3..8 {
            preempted.extend(step(&mut s, t).preempted);
        }
        assert_eq!(preempted.first(), Some(&2), "{preempted:?}");
        // Under FCFS the same arrivals run in arrival order.
        let mut c = cfg(6, 2, 64);
        c.max_num_seqs = 2;
        let mut f = Scheduler::new(c);
        for (id, priority) in [(1, 5), (2, 0), (3, 0)] {
            f.try_add_sequence_prioritized(id, vec![id as u32 * 10; 3], false, priority).unwrap();
        }
        assert_eq!(step(&mut f, 1).seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn preemption_order_and_resume() {
        // 6 blocks of 2 slots; three sequences of 3 prompt tokens (2 blocks each).
        let mut c = cfg(6, 2, 64);
        c.enable_prefix_caching = false;
        let mut s = Scheduler::new(c);
        for id in 1..=3 {
            s.add_sequence(id, vec![id as u32 * 10; 3]);
        }
        let out = step(&mut s, 1);
        assert_eq!(out.seqs.len(), 3);
        assert_eq!(s.num_free_blocks(), 0);
        // Position 3 is slot 1 of block 1: the decodes need no new block.
        let out = step(&mut s, 2);
        assert!(out.preempted.is_empty());
        // Position 4 needs a third block each. Seq 1 gets one by preempting
        // seq 3 (the last admitted); seq 2 takes the other freed block.
        let out = step(&mut s, 3);
        assert_eq!(out.preempted, vec![3]);
        assert_eq!(
            out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(s.num_preemptions(), 1);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.tokens(3).unwrap(), &[30, 30, 30, 1, 2]);
        assert_eq!(s.num_computed_tokens(3), Some(0));
        // 1 and 2 hold 3 blocks each, so 3 cannot come back yet.
        let out = step(&mut s, 4);
        assert!(out.preempted.is_empty());
        assert_eq!(out.seqs.len(), 2);
        // Position 6 needs a fourth block for seq 1: seq 2 is preempted and
        // goes to the head of the queue, before 3.
        let out = step(&mut s, 5);
        assert_eq!(out.preempted, vec![2]);
        assert_eq!(out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.num_preemptions(), 2);
        assert_eq!(s.tokens(2).unwrap(), &[20, 20, 20, 1, 2, 3, 4]);
        // Free everything; a small newcomer queues behind 3.
        s.finish(1);
        s.add_sequence(4, vec![40]);
        // 2 (7 tokens, 4 blocks) comes back first; 3 needs 3 blocks of the 2
        // left, and 4 (1 block) is not allowed to jump the queue.
        let out = step(&mut s, 6);
        assert_eq!(out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![2]);
        let x2 = find(&out, 2).unwrap();
        assert_eq!(
            (x2.start_pos, x2.tokens.clone(), x2.sample),
            (0, vec![20, 20, 20, 1, 2, 3, 4], true)
        );
        assert_eq!(s.tokens(2).unwrap(), &[20, 20, 20, 1, 2, 3, 4, 6]);
        s.finish(2);
        let out = step(&mut s, 7);
        assert_eq!(
            out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![3, 4]
        );
        let x3 = find(&out, 3).unwrap();
        assert_eq!(
            (x3.start_pos, x3.tokens.clone(), x3.sample),
            (0, vec![30, 30, 30, 1, 2], true)
        );
        assert_eq!(s.tokens(3).unwrap(), &[30, 30, 30, 1, 2, 7]);
        assert_eq!(s.num_prompt_tokens(3), Some(3));
    }

    #[test]
    fn self_preemption_then_chunked_resume() {
        // 4 blocks of 2 slots, budget 4.
        let mut c = cfg(4, 2, 4);
        c.enable_prefix_caching = false;
        let mut s = Scheduler::new(c);
        s.add_sequence(1, vec![1]);
        s.add_sequence(2, vec![2, 2, 2]);
        step(&mut s, 10); // 1: 1 block, 2: 2 blocks, 1 free
        step(&mut s, 11); // positions 1 and 3: no new blocks
                          // Seq 1 takes the last block for position 2; seq 2 needs one for
                          // position 4, and the only victim left is itself: the pass stops.
        let out = step(&mut s, 12);
        assert_eq!(out.preempted, vec![2]);
        assert_eq!(out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.tokens(2).unwrap(), &[2, 2, 2, 10, 11]);
        assert_eq!(s.tokens(1).unwrap(), &[1, 10, 11, 12]);
        s.finish(1);
        // The recompute is chunked by the budget: no sample until its end.
        let out = step(&mut s, 13);
        let x = find(&out, 2).unwrap();
        assert_eq!(
            (x.start_pos, x.tokens.clone(), x.sample),
            (0, vec![2, 2, 2, 10], false)
        );
        assert_eq!(s.tokens(2).unwrap(), &[2, 2, 2, 10, 11]);
        let out = step(&mut s, 14);
        let x = find(&out, 2).unwrap();
        assert_eq!(
            (x.start_pos, x.tokens.clone(), x.sample),
            (4, vec![11], true)
        );
        assert_eq!(s.tokens(2).unwrap(), &[2, 2, 2, 10, 11, 14]);
        assert_eq!(s.num_preemptions(), 1);
    }

    #[test]
    fn abort_waiting_and_running() {
        let mut s = Scheduler::new(cfg(8, 4, 8));
        s.add_sequence(1, vec![1; 6]);
        s.add_sequence(2, vec![2; 6]);
        s.add_sequence(3, vec![3; 6]);
        let out = step(&mut s, 0);
        assert_eq!(out.seqs.len(), 2); // 6 + chunk of 2
        assert_eq!(s.num_waiting(), 1);
        let used = s.num_blocks() - s.num_free_blocks();
        assert_eq!(used, 3);
        assert!(s.abort(3)); // waiting
        assert_eq!(s.num_waiting(), 0);
        assert!(s.abort(2)); // running, mid-prefill
        assert_eq!(s.num_running(), 1);
        assert_eq!(s.num_blocks() - s.num_free_blocks(), 2);
        assert!(!s.abort(2));
        assert!(!s.finish(77));
        assert!(s.tokens(2).is_none());
        // An update for an aborted sequence is ignored.
        let out = s.schedule();
        s.abort(1);
        s.update(&out, &[(1, 5)]);
        assert!(!s.has_work());
        assert_eq!(s.num_free_blocks(), 8);
        assert_eq!(s.kv_usage(), 0.0);
        s.check_invariants().unwrap();
    }

    #[test]
    fn rejects_bad_sequences_without_panicking() {
        let mut c = cfg(2, 4, 8);
        c.max_model_len = 8;
        let mut s = Scheduler::new(c);
        assert_eq!(s.try_add_sequence(1, vec![]), Err(AddError::EmptyPrompt));
        assert_eq!(
            s.try_add_sequence(1, vec![0; 8]),
            Err(AddError::TooLong {
                len: 8,
                max_model_len: 8
            })
        );
        assert_eq!(s.try_add_sequence(1, vec![0; 7]), Ok(()));
        assert_eq!(
            s.try_add_sequence(1, vec![0; 3]),
            Err(AddError::DuplicateId(1))
        );
        let mut c = cfg(1, 4, 8);
        c.max_model_len = 8;
        let mut s2 = Scheduler::new(c);
        assert!(matches!(
            s2.try_add_sequence(1, vec![0; 4]),
            Err(AddError::ExceedsCache { .. })
        ));
        assert_eq!(s2.max_seq_len(), 4);
        // A sequence grown to max_model_len is left alone, not scheduled past it.
        for t in 0..4 {
            let out = step(&mut s, t);
            assert!(out.seqs.iter().all(|x| x.start_pos + x.tokens.len() <= 7));
        }
        assert_eq!(s.tokens(1).unwrap().len(), 8);
        assert_eq!(s.num_computed_tokens(1), Some(7));
        assert_eq!(s.schedule().seqs.len(), 0);
        // Zero config values are raised instead of spinning or dividing by zero.
        let mut z = Scheduler::new(SchedulerConfig {
            max_num_seqs: 0,
            max_num_batched_tokens: 0,
            block_size: 0,
            ..cfg(4, 4, 0)
        });
        z.add_sequence(1, vec![1, 2]);
        assert_eq!(z.schedule().num_batched_tokens, 1);
    }

    #[test]
    fn counters_track_queries_hits_and_preemptions() {
        let mut s = Scheduler::new(cfg(64, 4, 100));
        s.add_sequence(1, (0..9).collect());
        step(&mut s, 0);
        s.add_sequence(2, (0..9).collect());
        s.add_sequence(3, (0..5).chain(50..60).collect());
        step(&mut s, 0);
        // Queries: 9 + 9 + 15; hits: 0 + 8 + 4 (block [0..4] only).
        assert_eq!(s.prefix_cache_queries(), 33);
        assert_eq!(s.prefix_cache_hits(), 12);
        assert_eq!(s.num_preemptions(), 0);
        let used = s.num_blocks() - s.num_free_blocks();
        assert!((s.kv_usage() - used as f32 / 64.0).abs() < 1e-6);
    }

    // ---------- randomized test against a simulated model ----------

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Simulated KV memory: each slot remembers the exact token prefix whose
    /// last position was computed into it. Attention for position q of a
    /// sequence is correct only if slot(q) holds that sequence's tokens[..=q].
    struct FakeModel {
        slots: Vec<Option<Vec<u32>>>,
        bs: usize,
    }

    impl FakeModel {
        fn run(&mut self, s: &Scheduler, out: &SchedulerOutput, cfg: &SchedulerConfig) {
            assert!(out.num_batched_tokens <= cfg.max_num_batched_tokens);
            assert_eq!(
                out.num_batched_tokens,
                out.seqs.iter().map(|x| x.tokens.len()).sum::<usize>()
            );
            assert!(s.num_running() <= cfg.max_num_seqs);
            let mut ids = HashSet::new();
            // Every layer writes K/V for the whole batch first...
            for x in &out.seqs {
                assert!(ids.insert(x.id), "sequence scheduled twice");
                assert!(!out.preempted.contains(&x.id));
                assert!(!x.tokens.is_empty());
                let toks = s.tokens(x.id).unwrap();
                let end = x.start_pos + x.tokens.len();
                assert_eq!(&toks[x.start_pos..end], &x.tokens[..]);
                assert_eq!(x.sample, end == toks.len());
                assert!(
                    x.block_table.len() * self.bs >= end,
                    "table does not cover positions"
                );
                for p in x.start_pos..end {
                    let slot = x.block_table[p / self.bs] as usize * self.bs + p % self.bs;
                    self.slots[slot] = Some(toks[..=p].to_vec());
                }
            }
            // ...then attention reads every earlier position.
            for x in &out.seqs {
                let toks = s.tokens(x.id).unwrap();
                for q in 0..x.start_pos + x.tokens.len() {
                    let slot = x.block_table[q / self.bs] as usize * self.bs + q % self.bs;
                    assert_eq!(
                        self.slots[slot].as_deref(),
                        Some(&toks[..=q]),
                        "seq {} reads wrong KV at position {q}",
                        x.id
                    );
                }
            }
        }
    }

    fn random_run(
        seed: u64,
        cfg: SchedulerConfig,
        steps: usize,
        colliding_hash: bool,
    ) -> (u64, u64) {
        let mut rng = XorShift(seed);
        let mut s = Scheduler::new(cfg.clone());
        if colliding_hash {
            // Only 2 buckets: exactness must come from the token and parent checks.
            s.kv.set_hash_fn(|_, t| u64::from(t[0] & 1));
        }
        let bs = cfg.block_size;
        let mut model = FakeModel {
            slots: vec![None; cfg.num_blocks * bs],
            bs,
        };
        let prefixes: Vec<Vec<u32>> = (0..3)
            .map(|i| (0..(4 + 5 * i)).map(|t| t % 3 + i).collect())
            .collect();
        let mut live: Vec<SeqId> = Vec::new();
        let mut next_id = 0u64;
        let max_len = s.max_seq_len().min(40);
        for _ in 0..steps {
            // Arrivals: shared prefixes plus a random tail, tiny vocabulary.
            if rng.below(3) == 0 {
                let mut p = prefixes[rng.below(3) as usize].clone();
                for _ in 0..rng.below(6) {
                    p.push(rng.below(3) as u32);
                }
                p.truncate(max_len - 1);
                s.try_add_sequence(next_id, p).unwrap();
                live.push(next_id);
                next_id += 1;
            }
            if !live.is_empty() && rng.below(25) == 0 {
                let id = live.swap_remove(rng.below(live.len() as u64) as usize);
                assert!(s.abort(id));
            }
            let out = s.schedule();
            s.check_invariants().unwrap();
            model.run(&s, &out, &cfg);
            let sampled: Vec<(SeqId, u32)> = out
                .seqs
                .iter()
                .filter(|x| x.sample)
                .map(|x| (x.id, rng.below(3) as u32))
                .collect();
            // An abort between the model run and update must be harmless.
            if !live.is_empty() && rng.below(50) == 0 {
                let id = live.swap_remove(rng.below(live.len() as u64) as usize);
                assert!(s.abort(id));
            }
            s.update(&out, &sampled);
            // The engine ends sequences: at max length, or by chance after sampling.
            for &(id, _) in &sampled {
                let Some(t) = s.tokens(id) else { continue };
                if t.len() >= max_len || rng.below(12) == 0 {
                    assert!(s.finish(id));
                    live.retain(|&x| x != id);
                }
            }
            s.check_invariants().unwrap();
        }
        for id in live {
            assert!(s.finish(id));
        }
        assert!(!s.has_work());
        assert_eq!(s.num_free_blocks(), s.num_blocks());
        for b in 0..s.num_blocks() as u32 {
            assert_eq!(s.kv_cache().ref_count(b), Some(0));
        }
        s.check_invariants().unwrap();
        (s.num_preemptions(), s.prefix_cache_hits())
    }

    #[test]
    fn randomized_against_simulated_model() {
        let base = SchedulerConfig {
            max_num_seqs: 6,
            max_num_batched_tokens: 24,
            max_model_len: 64,
            block_size: 4,
            num_blocks: 14,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: 0,
            policy: SchedulingPolicy::Fcfs,
        };
        let mut total_preempt = 0;
        let mut total_hits = 0;
        for (i, seed) in [0x1234_5678_9abc_def1u64, 7, 0xdead_beef]
            .into_iter()
            .enumerate()
        {
            let mut c = base.clone();
            c.long_prefill_token_threshold = [0, 5, 0][i];
            c.enable_chunked_prefill = i != 2;
            let (p, h) = random_run(seed, c, 4000, i == 1);
            total_preempt += p;
            total_hits += h;
        }
        let mut c = base.clone();
        c.enable_prefix_caching = false;
        c.block_size = 3;
        random_run(99, c, 3000, false);
        eprintln!("randomized: {total_preempt} preemptions, {total_hits} hit tokens");
        // The tiny cache really forced preemptions and the prompts really shared blocks.
        assert!(total_preempt > 50, "only {total_preempt} preemptions");
        assert!(total_hits > 1000, "only {total_hits} hit tokens");
    }
}
