//! The messages between the gateway and one engine rank.
//!
//! Plain data, no behaviour: the flume transport moves these structs as they are,
//! the QUIC transport serializes them with a versioned codec. Engines see token
//! ids only; text stays in the gateway.

use serde::{Deserialize, Serialize};

/// Bumped whenever a message below changes shape or a bound (9: up to 32
/// speculative positions, for the suffix proposer).
pub const PROTOCOL_VERSION: u32 = 9;

/// The gateway's id for one request. Unique per gateway for its lifetime.
pub type RequestId = u64;

/// Most completions (sequences) one request may ask for.
pub const MAX_N: u32 = 128;
/// Most alternatives per token a request may ask for (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: u32 = 20;

/// How to pick tokens, and when to stop. Ranges follow vLLM's; the engine
/// validates them (`ferry_engine::sampler::validate`) before accepting a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Completions generated for the prompt (vLLM `n`); each is one sequence,
    /// all sharing the prompt's KV blocks through the prefix cache.
    pub n: u32,
    /// 0 means greedy.
    pub temperature: f32,
    /// (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 or -1 disables; otherwise >= 1.
    pub top_k: i32,
    /// [0, 1]; 0 disables.
    pub min_p: f32,
    /// > 0; 1 disables. Applied over prompt and output tokens.
    pub repetition_penalty: f32,
    /// [-2, 2]; over output tokens.
    pub presence_penalty: f32,
    /// [-2, 2]; over output tokens.
    pub frequency_penalty: f32,
    /// Same seed, same output.
    pub seed: Option<u64>,
    /// Tokens to generate at most (>= 1).
    pub max_tokens: u32,
    /// Tokens to generate before EOS or stop tokens may end the sequence.
    pub min_tokens: u32,
    /// Extra token ids that end a sequence (besides the model's EOS unless `ignore_eos`).
    #[serde(deserialize_with = "bounded_vec::<_, _, FRAME_BOUNDED>")]
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's EOS (vLLM `ignore_eos`, for
    /// benchmarks); `stop_token_ids` still stop. EOS stays masked during
    /// `min_tokens` either way.
    pub ignore_eos: bool,
    /// Number of top alternatives to return with each sampled token (None: no logprobs).
    pub logprobs: Option<u32>,
    /// Number of top alternatives to return for each prompt token after the
    /// first (vLLM `prompt_logprobs`; also what `echo` + `logprobs` needs).
    /// None: no prompt logprobs. A request that asks for them is not served
    /// from the prefix cache, so every prompt position gets its logits.
    pub prompt_logprobs: Option<u32>,
    /// Added to the logits before penalties and sampling, greedy included
    /// (OpenAI `logit_bias`, already clamped to [-100, 100]): (token id, bias),
    /// ids unique and inside the vocabulary.
    #[serde(deserialize_with = "bounded_vec::<_, _, FRAME_BOUNDED>")]
    pub logit_bias: Vec<(u32, f32)>,
    /// Structured outputs: every sampled token must keep the output inside
    /// this language (vLLM `structured_outputs` / `response_format`). The
    /// engine compiles it against its own tokenizer; read off the wire it is
    /// untrusted, so its size is bounded (`MAX_CONSTRAINT_BYTES`).
    pub constraint: Option<Constraint>,
    /// Scheduling priority (vLLM's request `priority`): under the engine's
    /// `--scheduling-policy priority`, lower values are admitted first and
    /// preempted last; otherwise it must be 0. Travels with the sampling
    /// settings so a moved request keeps it.
    pub priority: i64,
}

/// Most bytes a constraint's text may hold (a schema, regex, grammar, or all
/// choices together): bounds what one request can make an engine compile.
pub const MAX_CONSTRAINT_BYTES: usize = 256 * 1024;

/// The language a structured output must belong to. Text forms (not parsed
/// values) so every codec carries them as they are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Constraint {
    /// A JSON Schema, as JSON text.
    JsonSchema(String),
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// The output is exactly one of these strings. Each counts at least one
    /// byte toward [`MAX_CONSTRAINT_BYTES`], so no more than that many.
    Choice(#[serde(deserialize_with = "bounded_vec::<_, _, MAX_CONSTRAINT_BYTES>")] Vec<String>),
    /// A context-free grammar in llguidance's Lark syntax.
    Lark(String),
}

impl Constraint {
    /// Bytes of text this constraint carries (what `MAX_CONSTRAINT_BYTES` bounds).
    pub fn text_len(&self) -> usize {
        match self {
            Constraint::JsonSchema(s) | Constraint::Regex(s) | Constraint::Lark(s) => s.len(),
            Constraint::JsonObject => 0,
            Constraint::Choice(v) => v.iter().map(|c| c.len() + 1).sum(),
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            constraint: None,
            priority: 0,
        }
    }
}

/// One request for the engine: a prompt already tokenized by the gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineRequest {
    /// The gateway's id; every output of the request carries it back.
    pub id: RequestId,
    /// The prompt's token ids, at least one, each below the rank's
    /// `vocab_size` (the engine refuses the request otherwise).
    #[serde(deserialize_with = "bounded_vec::<_, _, FRAME_BOUNDED>")]
    pub prompt_tokens: Vec<u32>,
    /// How to sample and when to stop; validated by the engine on arrival.
    pub sampling: SamplingParams,
    /// Set when the request continues one completion that another rank (or
    /// this one, before a link dropped) already began: see [`Resume`].
    pub resume: Option<Resume>,
    /// The trace the request belongs to, when the gateway traces it: the
    /// engine's spans for it join that trace under `span_id`.
    pub trace: Option<TraceContext>,
}

impl EngineRequest {
    /// A new request, not a resumed one, traced by nobody.
    pub fn new(id: RequestId, prompt_tokens: Vec<u32>, sampling: SamplingParams) -> EngineRequest {
        EngineRequest { id, prompt_tokens, sampling, resume: None, trace: None }
    }
}

/// A W3C trace context, as it crosses from the gateway to an engine: the
/// engine's spans of a request become children of `span_id` in trace
/// `trace_id`. Only sampled traces are sent, so it has no flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// The trace's 16-byte id (never 0).
    pub trace_id: u128,
    /// The parent span's 8-byte id (never 0).
    pub span_id: u64,
}

/// One completion of a request carried on from where it stopped. The engine
/// treats `output_tokens` as output, not prompt: penalties, `min_tokens`,
/// `max_tokens`, the random draw's position and a constraint's state all count
/// them, so the completion goes on token for token as an undisturbed run
/// would (given the request's seed, which the gateway fixes at admission).
/// A resumed request has one completion whatever `sampling.n` says, reported
/// under `index`; its prompt logprobs are computed again only for completion
/// 0 resumed before its first token (they come with the first output).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// Which completion of the original request this is (it seeds the draw
    /// and numbers the outputs).
    pub index: u32,
    /// The tokens already generated and delivered, oldest first.
    #[serde(deserialize_with = "bounded_vec::<_, _, FRAME_BOUNDED>")]
    pub output_tokens: Vec<u32>,
}

/// Gateway -> engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EngineCommand {
    /// Admit a request. The engine answers every one with outputs under its
    /// id, ending in a `finish` (an `Error` one if it refuses the request).
    /// (Boxed: a request is several times the size of the other commands.)
    Add(Box<EngineRequest>),
    /// Stop these requests now and free their KV blocks. Unknown ids are ignored.
    /// At most [`MAX_ABORT_IDS`] (the QUIC link's sender splits a longer list).
    Abort(#[serde(deserialize_with = "bounded_vec::<_, _, MAX_ABORT_IDS>")] Vec<RequestId>),
    /// The gateway is closing this link: the rank stops reading it.
    Shutdown,
}

/// Why a sequence ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// EOS or one of `stop_token_ids`.
    Stop,
    /// `max_tokens` reached, or the model's maximum length.
    Length,
    /// Aborted by the gateway.
    Abort,
    /// The engine refused or failed this request; the kind says whose fault it
    /// is (the gateway maps it to an HTTP status in one place), the message why.
    Error(EngineError),
}

/// Whose fault an engine error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request breaks a rule of the model or of the sampling ranges (HTTP 400).
    InvalidRequest,
    /// The rank has no room for the request now (HTTP 503: try again later). A
    /// prompt that could never fit is an invalid request, as in vLLM.
    Capacity,
    /// The engine itself failed (HTTP 500).
    Internal,
}

/// An engine's refusal or failure of one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineError {
    /// Whose fault it is, which picks the HTTP status.
    pub kind: ErrorKind,
    /// Why, in words fit for the client (the gateway passes it on as it is).
    pub message: String,
}

impl EngineError {
    /// The request breaks a rule ([`ErrorKind::InvalidRequest`], HTTP 400).
    pub fn invalid(message: impl Into<String>) -> Self {
        EngineError { kind: ErrorKind::InvalidRequest, message: message.into() }
    }
    /// No room for the request now ([`ErrorKind::Capacity`], HTTP 503).
    pub fn capacity(message: impl Into<String>) -> Self {
        EngineError { kind: ErrorKind::Capacity, message: message.into() }
    }
    /// The engine itself failed ([`ErrorKind::Internal`], HTTP 500).
    pub fn internal(message: impl Into<String>) -> Self {
        EngineError { kind: ErrorKind::Internal, message: message.into() }
    }
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The log-probability of one token and its top alternatives at one position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token at this position (sampled, or the prompt's own).
    pub token: u32,
    /// Its natural-log probability under the raw logits (before penalties
    /// and temperature, vLLM's `raw_logprobs`).
    pub logprob: f32,
    /// 1-based rank of `token` among all tokens by logprob (ties share the
    /// better rank), as vLLM reports it.
    pub rank: u32,
    /// Best first, as many as asked for (at most [`MAX_LOGPROBS`]).
    #[serde(deserialize_with = "bounded_vec::<_, _, { MAX_LOGPROBS as usize }>")]
    pub top: Vec<(u32, f32)>,
}

/// What one sequence produced in one engine step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenOutput {
    /// The request this output belongs to.
    pub id: RequestId,
    /// Which of the request's `n` completions this is (0-based).
    pub index: u32,
    /// At most [`MAX_TOKENS_PER_OUTPUT`].
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_TOKENS_PER_OUTPUT>")]
    pub new_tokens: Vec<u32>,
    /// One entry per new token, when the request asked for logprobs.
    #[serde(deserialize_with = "bounded_opt_vec::<_, _, MAX_TOKENS_PER_OUTPUT>")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Set on the sequence's last output.
    pub finish: Option<FinishReason>,
    /// Prompt tokens served from the prefix cache (set on the first output).
    pub num_cached_tokens: u32,
    /// On the first output of completion 0 when the request asked for
    /// `prompt_logprobs`: one entry per prompt token after the first (the
    /// first has no context to be predicted from), in prompt order.
    #[serde(deserialize_with = "bounded_opt_vec::<_, _, FRAME_BOUNDED>")]
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    /// On a sequence's last output: where its time went.
    pub timing: Option<SeqTiming>,
}

/// The engine's queue figures, attached to every output batch so the
/// coordinator can balance load and the gateway can export metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineStats {
    /// Sequences admitted but not yet scheduled, or preempted (vLLM's
    /// `num_requests_waiting`, counted in sequences).
    pub num_waiting: u32,
    /// Sequences holding KV blocks and stepping (vLLM's `num_requests_running`).
    pub num_running: u32,
    /// Fraction of KV blocks in use, 0..=1.
    pub kv_usage: f32,
    /// Totals since the engine started.
    pub num_preemptions: u64,
    /// Prompt tokens looked up in the prefix cache, first admissions only
    /// (vLLM's `prefix_cache_queries`).
    pub prefix_cache_queries: u64,
    /// Of those, tokens found cached (vLLM's `prefix_cache_hits`).
    pub prefix_cache_hits: u64,
    /// `Add` commands the engine has taken in since it started (refused ones
    /// too): the gateway counts what it sent beyond this as waiting, so figures
    /// that lag behind a slow link never hide a burst it just sent.
    pub num_added: u64,
    /// The engine is finishing what it has and takes nothing new (its node is
    /// stopping).
    pub draining: bool,
    /// Per engine step since the previous batch, vLLM's iteration tokens
    /// (`IterationStats`: the tokens the step sampled, plus the whole prompt,
    /// cached part included, of each sequence whose first token it sampled;
    /// 0 for a step of prefill chunks alone), at most [`MAX_STEP_REPORTS`],
    /// oldest first.
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_STEP_REPORTS>")]
    pub step_tokens: Vec<u32>,
    /// Speculative decoding's totals since the engine started (all zero
    /// when it does not speculate).
    pub spec: SpecDecodeStats,
}

/// Speculative decoding's totals since an engine started, as vLLM's
/// `SpecDecodingStats` counts them: a draft is one sequence's proposed
/// tokens verified in one step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpecDecodeStats {
    /// Drafts verified.
    pub num_drafts: u64,
    /// Tokens proposed in them.
    pub num_draft_tokens: u64,
    /// Proposed tokens accepted (each equal to the token the model picked there).
    pub num_accepted_tokens: u64,
    /// Entry `i`: drafts whose token at position `i` (0-based) was accepted;
    /// at most [`MAX_SPEC_POSITIONS`] entries.
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_SPEC_POSITIONS>")]
    pub accepted_per_pos: Vec<u64>,
}

impl SpecDecodeStats {
    /// Counts one draft of `proposed` tokens whose first `accepted` were taken.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        self.num_drafts += 1;
        self.num_draft_tokens += proposed as u64;
        self.num_accepted_tokens += accepted as u64;
        let positions = accepted.min(MAX_SPEC_POSITIONS);
        if self.accepted_per_pos.len() < positions {
            self.accepted_per_pos.resize(positions, 0);
        }
        for n in &mut self.accepted_per_pos[..positions] {
            *n += 1;
        }
    }
}

/// Most draft positions [`SpecDecodeStats::accepted_per_pos`] reports (an
/// engine proposes at most this many tokens per sequence and step).
pub const MAX_SPEC_POSITIONS: usize = 32;

/// Most `EngineStats::step_tokens` entries one batch carries; an engine with
/// more unreported steps keeps the newest.
pub const MAX_STEP_REPORTS: usize = 4096;

/// How long one finished sequence spent in each phase, as the engine saw it
/// (vLLM's request queue, prefill and decode times).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SeqTiming {
    /// From arrival at the engine to its first scheduled step.
    pub queue_secs: f32,
    /// From the first scheduled step to the first token.
    pub prefill_secs: f32,
    /// From the first token to the last.
    pub decode_secs: f32,
}

/// Engine -> gateway, once per turn that produced outputs or prefix-cache
/// changes for this link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineOutputs {
    /// The rank that sent the batch (the QUIC link's checks hold it to the
    /// rank its Hello named).
    pub rank: u32,
    /// At most [`MAX_OUTPUTS_PER_BATCH`] (the QUIC link's sender splits a
    /// larger batch, keeping each request's outputs together).
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_OUTPUTS_PER_BATCH>")]
    pub outputs: Vec<TokenOutput>,
    /// The rank's queue and cache figures as this batch leaves (the queue
    /// figures counting only this link's requests).
    pub stats: EngineStats,
    /// Changes to the set of full KV blocks this rank holds in its prefix
    /// cache since the previous batch to this link, oldest first (at most
    /// [`MAX_KV_EVENTS`]). A link's first batches after it attaches start
    /// with `Cleared` and then list every block held, so a gateway that
    /// (re)joins learns the whole set.
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_KV_EVENTS>")]
    pub kv_events: Vec<KvEvent>,
}

/// One change to a rank's prefix cache, named by the block's chained hash
/// (`ferry_engine::kv_cache::chain_hash` over the block's tokens, chained
/// from `ROOT_HASH`): the same function the gateway computes over a prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvEvent {
    /// Forget every block reported before on this link.
    Cleared,
    /// The rank now holds one more block with this hash.
    Stored(u64),
    /// The rank dropped one block with this hash.
    Removed(u64),
}

/// Most `EngineOutputs::kv_events` one batch carries.
pub const MAX_KV_EVENTS: usize = 1 << 16;

/// Most ids one `Abort` names. The gateway aborts one request at a time, or
/// every placement of a drained rank at once: that is bounded by what it has
/// in flight (`--max-concurrent-requests`, 1024 by default), far below this.
pub const MAX_ABORT_IDS: usize = 1 << 16;

/// Most outputs one batch carries. A turn of the engine yields at most one
/// output per running sequence (`--max-num-seqs`, 256 by default) plus one per
/// request it refused and per completion it aborted in that turn; a larger
/// turn goes out in several batches (the QUIC link's sender splits it).
pub const MAX_OUTPUTS_PER_BATCH: usize = 1 << 16;

/// Most tokens (and logprob entries) one `TokenOutput` carries. The engine
/// makes one token per sequence per step; the slack leaves room for
/// speculative decoding, which proposes a handful per step.
pub const MAX_TOKENS_PER_OUTPUT: usize = 64;

/// Most bytes a vector read off the wire reserves before its elements arrive,
/// beyond the codec's budget (below). The length prefix is the peer's word: a
/// vector that really is longer grows as its elements are read, so memory
/// follows the bytes that arrived.
const MAX_PREALLOC_BYTES: usize = 64 << 10;

/// A vector whose length is bounded only by its frame (each element takes at
/// least a byte on the wire, and a frame at most `codec::MAX_FRAME_BYTES`).
const FRAME_BOUNDED: usize = usize::MAX;

thread_local! {
    /// Bytes the vectors of the payload being decoded on this thread may still
    /// reserve in one go, at the length they claim. The codec sets it to a
    /// multiple of the payload's size ([`with_reserve_budget`]); elsewhere it
    /// is 0 and every vector reserves cautiously.
    static RESERVE_BUDGET: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `decode` with a budget of `bytes` for vectors to reserve at their
/// claimed length: an honest vector then takes exactly its size instead of
/// growing by doubling (which at its last step holds three times its data),
/// and a lying one costs no more than the budget.
pub(crate) fn with_reserve_budget<T>(bytes: usize, decode: impl FnOnce() -> T) -> T {
    /// Clears the budget however `decode` ends.
    struct Spent;
    impl Drop for Spent {
        fn drop(&mut self) {
            RESERVE_BUDGET.with(|b| b.set(0));
        }
    }
    RESERVE_BUDGET.with(|b| b.set(bytes));
    let _spent = Spent;
    decode()
}

/// Elements to reserve for a vector of `T` claiming `claimed` (at most its
/// bound): all of them if that fits the cautious amount or the budget (which
/// it then spends), else the cautious amount.
fn reserve_for<T>(claimed: usize) -> usize {
    let size = std::mem::size_of::<T>().max(1);
    let cautious = MAX_PREALLOC_BYTES / size;
    if claimed <= cautious {
        return claimed;
    }
    let bytes = claimed.saturating_mul(size);
    RESERVE_BUDGET.with(|b| match b.get().checked_sub(bytes) {
        Some(left) => {
            b.set(left);
            claimed
        }
        None => cautious,
    })
}

/// A vector of at most `N` elements, read element by element. A bound is
/// refused as soon as element `N + 1` appears, before it is stored, so a
/// decoder never holds more than `N` (without it a frame of one-byte
/// elements would expand many times over before the link's checks could
/// refuse it: a `KvEvent::Cleared` is one byte on the wire, 16 in memory).
struct BoundedVec<T, const N: usize>(Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T, const N: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for Visit<T, N> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a sequence of at most {N} elements")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let claimed = seq.size_hint().unwrap_or(0);
                if claimed > N {
                    return Err(over_bound(claimed, N, &self));
                }
                let mut items = Vec::with_capacity(reserve_for::<T>(claimed));
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(over_bound(N + 1, N, &self));
                    }
                    items.push(item);
                }
                Ok(items)
            }
        }
        d.deserialize_seq(Visit::<T, N>(std::marker::PhantomData)).map(BoundedVec)
    }
}

thread_local! {
    /// The last bound a decode on this thread ran into: (elements, bound).
    /// postcard reports a custom error without its text, so the codec reads
    /// the reason here to say why it refused a frame.
    static OVER_BOUND: std::cell::Cell<Option<(usize, usize)>> = const { std::cell::Cell::new(None) };
}

fn over_bound<E: serde::de::Error>(len: usize, bound: usize, exp: &dyn serde::de::Expected) -> E {
    OVER_BOUND.with(|c| c.set(Some((len, bound))));
    E::invalid_length(len, exp)
}

/// Why the last decode on this thread failed, if a vector's bound was the
/// reason; clears it.
pub(crate) fn take_over_bound() -> Option<String> {
    OVER_BOUND.with(std::cell::Cell::take).map(|(len, bound)| format!("a list of {len} or more elements, over its bound of {bound}"))
}

/// `deserialize_with` for a `Vec<T>` field of at most `N` elements.
fn bounded_vec<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>, const N: usize>(d: D) -> Result<Vec<T>, D::Error> {
    BoundedVec::<T, N>::deserialize(d).map(|v| v.0)
}

/// `deserialize_with` for an `Option<Vec<T>>` field of at most `N` elements.
fn bounded_opt_vec<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    Option::<BoundedVec<T, N>>::deserialize(d).map(|v| v.map(|v| v.0))
}

/// Engine -> gateway, first message on a transport.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The engine's [`PROTOCOL_VERSION`]; must equal the gateway's.
    pub protocol_version: u32,
    /// The data-parallel rank this engine serves, below the gateway's
    /// `--data-parallel-size` (below [`MAX_RANKS`] in an elastic cluster),
    /// or [`AUTO_RANK`]: the API node picks a free one and says which in
    /// its `Welcome`.
    pub rank: u32,
    /// The served model name (for logs; the fingerprint is what must match).
    pub model: String,
    /// Which model the rank loaded, so a rank of another model is refused.
    pub fingerprint: ModelFingerprint,
    /// Token ids the engine may emit are below this.
    pub vocab_size: u32,
    /// Most tokens (prompt and output) one sequence may hold on this rank.
    pub max_model_len: u32,
    /// KV-cache blocks the rank allocated (vLLM's `num_gpu_blocks`): sizes
    /// the gateway's index of what the rank caches.
    pub num_kv_blocks: u32,
    /// Tokens per KV block; every rank of a cluster must agree, since prefix
    /// hashes are taken per block.
    pub block_size: u32,
    /// Who this rank's node is: drawn when the node starts (its host name and
    /// a random 128-bit token, at most [`MAX_NODE_ID_BYTES`]), the same on
    /// every link it dials. A rank whose old link the gateway still holds
    /// (the node timed it out first, in a one-way partition) comes back on a
    /// new link with the same identity and replaces the stale one, instead of
    /// being refused as a duplicate.
    pub node: String,
}

/// Most bytes of `Hello::node`.
pub const MAX_NODE_ID_BYTES: usize = 256;

/// A `Hello::rank` that asks the API node for a free rank number
/// (`--data-parallel-start-rank auto`).
pub const AUTO_RANK: u32 = u32::MAX;

/// Rank numbers are below this, in every cluster (`--data-parallel-size`'s
/// own bound too): an elastic API node keeps a slot per number.
pub const MAX_RANKS: u32 = 1024;

/// What a model is, not its weights' bytes (hashing gigabytes at start-up would
/// cost more than it proves): two nodes that loaded the same file agree, a node
/// that loaded another model or another quantization of it does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelFingerprint {
    /// The architecture's shape (layers, widths, heads, vocabulary, RoPE, norms).
    /// An API node that loads no weights can compute this one.
    pub config: u64,
    /// The tensor table: every weight matrix's element type and shape, in order.
    pub tensors: u64,
}

/// Gateway -> engine, answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The gateway's [`PROTOCOL_VERSION`]; the engine refuses a gateway of another.
    pub protocol_version: u32,
    /// The gateway took the rank: commands follow on this link.
    pub accepted: bool,
    /// Why the rank was refused (the same sentence the gateway logs); None
    /// when accepted.
    pub reason: Option<String>,
    /// The rank the API node knows this link by: the one the Hello named
    /// (a node that lets the API node assign its ranks will learn it here).
    pub rank: u32,
    /// The refusal may pass by waiting (another node's live link holds the
    /// rank, the API node is draining): the engine dials again rather than
    /// stop. False for refusals that waiting cannot change (another model,
    /// another protocol version).
    pub retry: bool,
}

/// Gateway -> engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToEngine {
    /// The answer to the rank's Hello; the first message on a link.
    Welcome(Welcome),
    /// Every message after an accepting Welcome.
    Command(EngineCommand),
}

/// Engine -> gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FromEngine {
    /// The rank introduces itself; the first message on a link.
    Hello(Hello),
    /// Every message after the Hello.
    Outputs(EngineOutputs),
}
