//! Token sampling, request-parameter validation and stop conditions.
//!
//! Sans-IO: plain functions and one per-sequence struct, no threads or clocks.
//! The semantics follow vLLM v1's sampler (`vllm/v1/sample/sampler.py`):
//!
//! 1. logprobs, when asked for, come from the raw logits (vLLM's default
//!    `raw_logprobs` mode: a log-softmax before penalties and temperature);
//! 2. min_tokens: while fewer than `min_tokens` tokens exist, the model's
//!    end-of-generation ids and `stop_token_ids` get -inf. Like vLLM, the EOG
//!    ids are masked even under `ignore_eos` (vLLM puts the EOS id into
//!    `all_stop_token_ids` whatever `ignore_eos` says);
//! 3. penalties: repetition over prompt + output tokens (positive logits
//!    divided, others multiplied), then frequency and presence over output tokens;
//! 4. temperature 0: greedy argmax (ties go to the lowest id). Otherwise divide
//!    by the temperature, then min-p, then top-k, then top-p (vLLM v1 applies
//!    min-p, an "argmax-invariant logits processor", before top-k/top-p), and
//!    draw from the softmax of what is left with the sequence's own RNG.
//!
//! Like vLLM's `SamplingParams.__post_init__`, a temperature in (0, 0.01) is
//! raised to 0.01 (smaller ones only produce inf/NaN on GPUs), so only an
//! exact 0 is greedy.
//!
//! Bad numbers never panic: a NaN logit counts as -inf and +inf as `f32::MAX`.
//! If every candidate ends up at -inf (all logits NaN/-inf, or min_tokens
//! masked the only finite ones), the token is the argmax of the raw logits
//! (the lowest id when those are all -inf too).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

use ferry_transport::protocol::{FinishReason, SamplingParams, TokenLogprob};

/// vLLM's `_SAMPLING_EPS`: temperatures below this are greedy.
const SAMPLING_EPS: f32 = 1e-5;
/// vLLM's `_MAX_TEMP`: positive temperatures are raised to at least this.
const MIN_POSITIVE_TEMPERATURE: f32 = 1e-2;
/// Most completions per request.
pub const MAX_N: u32 = 128;
/// vLLM's default `max_logprobs`.
pub const MAX_LOGPROBS: u32 = 20;

/// A sampling parameter out of its allowed range.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamError {
    /// The request field at fault, as the OpenAI API names it.
    pub param: &'static str,
    /// vLLM's wording: names the parameter, its range and the value received.
    pub message: String,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParamError {}

fn err(param: &'static str, message: String) -> Result<(), ParamError> {
    Err(ParamError { param, message })
}

/// Formats a float as Python's `repr` would for the usual cases ("-1.0",
/// "1.5", "inf", "nan"), so messages read like vLLM's.
fn py_float(x: f32) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{x:?}")
    }
}

/// Checks a request's parameters against vLLM's ranges, in vLLM's order
/// (`SamplingParams._verify_args`, `_verify_greedy_sampling`, then the
/// model-dependent checks `_validate_logprobs` and `_validate_stop_token_ids`).
pub fn validate(p: &SamplingParams, vocab_size: usize) -> Result<(), ParamError> {
    if p.n < 1 {
        return err("n", format!("n must be at least 1, got {}.", p.n));
    }
    if p.n > MAX_N {
        return err("n", format!("n must be at most {MAX_N}, got {}.", p.n));
    }
    // `!(a <= x && x <= b)` also rejects NaN.
    if !(-2.0..=2.0).contains(&p.presence_penalty) {
        return err(
            "presence_penalty",
            format!(
                "presence_penalty must be in [-2, 2], got {}.",
                py_float(p.presence_penalty)
            ),
        );
    }
    if !(-2.0..=2.0).contains(&p.frequency_penalty) {
        return err(
            "frequency_penalty",
            format!(
                "frequency_penalty must be in [-2, 2], got {}.",
                py_float(p.frequency_penalty)
            ),
        );
    }
    if !p.repetition_penalty.is_finite() {
        return err(
            "repetition_penalty",
            format!(
                "repetition_penalty must be a finite number, got {}.",
                py_float(p.repetition_penalty)
            ),
        );
    }
    if p.repetition_penalty <= 0.0 {
        return err(
            "repetition_penalty",
            format!(
                "repetition_penalty must be greater than zero, got {}.",
                py_float(p.repetition_penalty)
            ),
        );
    }
    if !p.temperature.is_finite() {
        return err(
            "temperature",
            format!(
                "temperature must be a finite number, got {}.",
                py_float(p.temperature)
            ),
        );
    }
    if p.temperature < 0.0 {
        return err(
            "temperature",
            format!(
                "temperature must be non-negative, got {}.",
                py_float(p.temperature)
            ),
        );
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return err(
            "top_p",
            format!("top_p must be in (0, 1], got {}.", py_float(p.top_p)),
        );
    }
    if p.top_k < -1 {
        return err(
            "top_k",
            format!("top_k must be 0 (disable), or at least 1, got {}.", p.top_k),
        );
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        return err(
            "min_p",
            format!("min_p must be in [0, 1], got {}.", py_float(p.min_p)),
        );
    }
    if p.max_tokens < 1 {
        return err(
            "max_tokens",
            format!("max_tokens must be at least 1, got {}.", p.max_tokens),
        );
    }
    if p.min_tokens > p.max_tokens {
        return err(
            "min_tokens",
            format!(
                "min_tokens must be less than or equal to max_tokens={}, got {}.",
                p.max_tokens, p.min_tokens
            ),
        );
    }
    // vLLM refuses n > 1 with greedy sampling: the completions would be identical.
    if is_greedy(p.temperature) && p.n > 1 {
        return err(
            "n",
            format!("n must be 1 when using greedy sampling, got {}.", p.n),
        );
    }
    if let Some(k) = p.logprobs {
        if k > MAX_LOGPROBS {
            return err(
                "logprobs",
                format!(
                    "Requested sample logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"
                ),
            );
        }
    }
    let bad: Vec<u32> = p
        .stop_token_ids
        .iter()
        .copied()
        .filter(|&t| t as usize >= vocab_size)
        .collect();
    if !bad.is_empty() {
        return err(
            "stop_token_ids",
            format!(
                "token_id(s) {bad:?} in stop_token_ids contain out-of-vocab token ids. Vocabulary size: {vocab_size}"
            ),
        );
    }
    Ok(())
}

/// Whether the sequence ends after emitting `token` as its `num_generated`-th
/// output token (1-based). Mirrors vLLM v1's `check_stop`: nothing stops before
/// `min_tokens` tokens exist; then an EOG id (unless `ignore_eos`) or a stop
/// token id gives `Stop`, which wins over `max_tokens` (`Length`).
pub fn check_stop(
    params: &SamplingParams,
    token: u32,
    num_generated: usize,
    eog_ids: &[u32],
) -> Option<FinishReason> {
    let max_tokens = params.max_tokens as usize;
    if num_generated < params.min_tokens as usize {
        // vLLM returns "not finished" here; validated params have
        // min_tokens <= max_tokens so Length can't be due yet. Unvalidated ones
        // still end at max_tokens rather than run on forever.
        return (num_generated >= max_tokens).then_some(FinishReason::Length);
    }
    if !params.ignore_eos && eog_ids.contains(&token) {
        return Some(FinishReason::Stop);
    }
    if params.stop_token_ids.contains(&token) {
        return Some(FinishReason::Stop);
    }
    if num_generated >= max_tokens {
        return Some(FinishReason::Length);
    }
    None
}

/// A seed for the `index`-th completion of a request seeded with `request_seed`,
/// so that n > 1 completions differ but each is reproducible.
pub fn sequence_seed(request_seed: u64, index: u32) -> u64 {
    let mut state = request_seed ^ (index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    splitmix64(&mut state)
}

/// True when this temperature means greedy decoding, after vLLM's clamp.
fn is_greedy(temperature: f32) -> bool {
    // NaN is treated as greedy too: it can only come from unvalidated params.
    temperature.is_nan() || effective_temperature(temperature) < SAMPLING_EPS
}

/// vLLM raises temperatures in (0, 0.01) to 0.01; the upper clamp keeps
/// `-inf / t` at -inf (an infinite t would make it NaN).
fn effective_temperature(t: f32) -> f32 {
    if t <= 0.0 {
        0.0
    } else {
        t.clamp(MIN_POSITIVE_TEMPERATURE, f32::MAX)
    }
}

// ---------------------------------------------------------------------------
// PRNG: SplitMix64 to seed xoshiro256**. Our own, so outputs for a given seed
// never change with a dependency upgrade.

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    fn from_seed(seed: u64) -> Self {
        let mut st = seed;
        let mut s = [0u64; 4];
        for x in &mut s {
            *x = splitmix64(&mut st);
        }
        if s == [0; 4] {
            // The all-zero state is a fixed point; SplitMix64 never yields it
            // in practice, but keep the generator alive regardless.
            s[0] = 1;
        }
        Xoshiro256StarStar { s }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

// ---------------------------------------------------------------------------

/// What `SequenceSampler::sample` picked.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Present when the request asked for logprobs.
    pub logprob: Option<TokenLogprob>,
}

/// Per-sequence sampling state: its RNG, the counts the penalties need, and
/// scratch buffers reused from step to step.
///
/// `sample` must be called with the same `SamplingParams` that `new` got.
#[derive(Debug, Clone)]
pub struct SequenceSampler {
    rng: Xoshiro256StarStar,
    /// Distinct prompt token ids, sorted (for the repetition penalty).
    prompt_set: Vec<u32>,
    /// Output token id -> times generated (frequency/presence/repetition).
    output_counts: HashMap<u32, u32>,
    num_generated: usize,
    /// Surviving (id, logit) pairs when top-k/top-p need them.
    cand: Vec<(u32, f32)>,
    /// Unnormalized probabilities when sampling over the whole vocabulary.
    weights: Vec<f32>,
    /// Copy of the raw logits for logprobs.
    raw: Vec<f32>,
    /// The k best candidates, worst on top (top-k threshold, top logprobs).
    heap: BinaryHeap<Ranked>,
    /// Probability mass per logit bucket for top-p.
    buckets: Vec<f64>,
}

/// Descending by logit, ascending by id on ties: a total order on distinct ids
/// (there are no NaNs by then), so unstable sorts and selections give the same
/// result every time.
fn desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// (id, logit) ordered by `desc`: in a max-heap the worst of the kept ones is on top.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ranked(u32, f32);

impl Eq for Ranked {}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        desc(&(self.0, self.1), &(other.0, other.1))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Leaves the `k` best items in `heap` (worst on top). One pass with a bounded
/// heap: O(V + k log k · log V) for random order, no full sort or copy of the vocabulary.
fn best_k(heap: &mut BinaryHeap<Ranked>, items: impl Iterator<Item = (u32, f32)>, k: usize) {
    heap.clear();
    if k == 0 {
        return;
    }
    for (id, l) in items {
        if heap.len() < k {
            heap.push(Ranked(id, l));
        } else if let Some(mut worst) = heap.peek_mut() {
            if desc(&(id, l), &(worst.0, worst.1)) == Ordering::Less {
                *worst = Ranked(id, l);
            }
        }
    }
}

/// Index of the first maximum (lowest id on ties); None when every value is
/// -inf or NaN, or the slice is empty (NaN never wins).
fn argmax(xs: &[f32]) -> Option<u32> {
    let best = max_lanes(xs);
    if best == f32::NEG_INFINITY {
        return None;
    }
    // The first index holding the maximum, as a scan with `>` would pick.
    xs.iter().position(|&x| x == best).map(|i| i as u32)
}

/// The largest value (NaN never wins), over 16 running lanes so the loop
/// vectorizes: a scan with a data-dependent branch per logit cost ~3% of a
/// 16-sequence decode step.
fn max_lanes(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        let c: &[f32; 16] = c.try_into().expect("chunks of 16");
        for i in 0..16 {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    for &x in chunks.remainder() {
        lanes[0] = if x > lanes[0] { x } else { lanes[0] };
    }
    lanes.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Unnormalized probability of a logit given the maximum: the one weight
/// function every step uses, so filtering and drawing agree exactly.
#[inline]
fn weight(l: f32, max: f32) -> f32 {
    (l - max).exp()
}

impl SequenceSampler {
    /// `seed`: the request's seed mixed with the sequence's index (see
    /// [`sequence_seed`]), or an engine-drawn seed when the request has none.
    /// The prompt's distinct ids are kept whatever the params (they are few
    /// next to the KV cache), for the repetition penalty.
    pub fn new(_params: &SamplingParams, prompt_tokens: &[u32], seed: u64) -> SequenceSampler {
        let mut prompt_set = prompt_tokens.to_vec();
        prompt_set.sort_unstable();
        prompt_set.dedup();
        SequenceSampler {
            rng: Xoshiro256StarStar::from_seed(seed),
            prompt_set,
            output_counts: HashMap::new(),
            num_generated: 0,
            cand: Vec::new(),
            weights: Vec::new(),
            raw: Vec::new(),
            heap: BinaryHeap::new(),
            buckets: Vec::new(),
        }
    }

    /// Output tokens sampled so far.
    pub fn num_generated(&self) -> usize {
        self.num_generated
    }

    /// Picks the next token from this position's raw logits; `logits` is used
    /// as scratch and holds no particular values afterwards. `eog_ids`: the
    /// model's end-of-generation ids. Records the token for the penalties and
    /// min_tokens. Empty logits (a caller bug) give token 0.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        eog_ids: &[u32],
    ) -> Sampled {
        // NaN -> -inf, +inf -> MAX, so every later comparison and softmax is sound.
        let raw_argmax = sanitize(logits);
        if params.logprobs.is_some() {
            self.raw.clear();
            self.raw.extend_from_slice(logits);
        }

        if self.num_generated < params.min_tokens as usize {
            mask_ids(logits, eog_ids);
            mask_ids(logits, &params.stop_token_ids);
        }
        self.apply_penalties(logits, params);

        let token = if is_greedy(params.temperature) {
            argmax(logits).unwrap_or(raw_argmax)
        } else {
            self.sample_random(logits, params).unwrap_or(raw_argmax)
        };

        let logprob = params.logprobs.map(|k| {
            let k = k.min(MAX_LOGPROBS) as usize;
            log_softmax_top(&self.raw, token, k, &mut self.heap)
        });

        self.num_generated += 1;
        *self.output_counts.entry(token).or_insert(0) += 1;
        Sampled { token, logprob }
    }

    /// Repetition penalty over prompt and output tokens, then frequency and
    /// presence penalties over output tokens, as vLLM's `apply_penalties`
    /// (positive logits times 1/penalty, the others times penalty).
    /// Ids outside the vocabulary are skipped; out-of-range penalty values
    /// (unvalidated params) are ignored rather than poisoning the logits.
    fn apply_penalties(&self, logits: &mut [f32], params: &SamplingParams) {
        let rep = params.repetition_penalty;
        if rep.is_finite() && rep > 0.0 && rep != 1.0 {
            let inv = 1.0 / rep;
            let penalize = |l: &mut f32| *l = if *l > 0.0 { *l * inv } else { *l * rep };
            for &t in &self.prompt_set {
                if let Some(l) = logits.get_mut(t as usize) {
                    penalize(l);
                }
            }
            for &t in self.output_counts.keys() {
                if self.prompt_set.binary_search(&t).is_err() {
                    if let Some(l) = logits.get_mut(t as usize) {
                        penalize(l);
                    }
                }
            }
        }
        let freq = params.frequency_penalty;
        let pres = params.presence_penalty;
        let freq = if freq.is_finite() { freq } else { 0.0 };
        let pres = if pres.is_finite() { pres } else { 0.0 };
        if freq != 0.0 || pres != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= freq * count as f32;
                    *l -= pres;
                }
            }
        }
    }

    /// Temperature, min-p, top-k, top-p, then a draw. None when no token has
    /// a finite logit.
    fn sample_random(&mut self, logits: &mut [f32], params: &SamplingParams) -> Option<u32> {
        let t = effective_temperature(params.temperature);
        let mut max = f32::NEG_INFINITY;
        for l in logits.iter_mut() {
            // A penalty or a small temperature can overflow to +inf; keep it finite.
            *l = (*l / t).min(f32::MAX);
            max = max.max(*l);
        }
        if max == f32::NEG_INFINITY {
            return None;
        }
        // min-p keeps p_i >= min_p * p_max, i.e. l_i - max >= ln(min_p).
        let min_p = if params.min_p.is_nan() {
            0.0
        } else {
            params.min_p.clamp(0.0, 1.0)
        };
        let floor = if min_p > 0.0 {
            (min_p as f64).ln()
        } else {
            f64::NEG_INFINITY
        };
        let keep = |l: f32| l > f32::NEG_INFINITY && ((l - max) as f64) >= floor;

        let vocab = logits.len();
        let top_k =
            (params.top_k > 0 && (params.top_k as usize) < vocab).then_some(params.top_k as usize);
        let top_p = (params.top_p < 1.0).then_some(params.top_p as f64);

        if top_k.is_none() && top_p.is_none() {
            // No ranking needed: draw straight from the (min-p filtered) vocabulary.
            self.weights.clear();
            self.weights.extend(
                logits
                    .iter()
                    .map(|&l| if keep(l) { weight(l, max) } else { 0.0 }),
            );
            return draw(
                &mut self.rng,
                self.weights.iter().enumerate().map(|(i, &w)| (i as u32, w)),
            );
        }

        let kept = logits
            .iter()
            .enumerate()
            .filter(|&(_, &l)| keep(l))
            .map(|(i, &l)| (i as u32, l));
        // vLLM's top-k masks logits below the k-th largest (of the min-p
        // survivors): ties with it stay.
        let kth = match top_k {
            Some(k) => {
                best_k(&mut self.heap, kept.clone(), k);
                if self.heap.len() == k {
                    self.heap.peek().map_or(f32::NEG_INFINITY, |r| r.1)
                } else {
                    f32::NEG_INFINITY
                }
            }
            None => f32::NEG_INFINITY,
        };
        self.cand.clear();
        self.cand.extend(kept.filter(|&(_, l)| l >= kth));
        if let Some(p) = top_p {
            let n = top_p_keep(&mut self.cand, max, p, &mut self.buckets);
            self.cand.truncate(n);
        }
        draw(
            &mut self.rng,
            self.cand.iter().map(|&(i, l)| (i, weight(l, max))),
        )
    }
}

/// NaN -> -inf, +inf -> `f32::MAX`; returns the argmax of the result (the
/// lowest id on ties, 0 when all are -inf): the last-resort token.
fn sanitize(logits: &mut [f32]) -> u32 {
    for l in logits.iter_mut() {
        *l = if l.is_nan() { f32::NEG_INFINITY } else { l.min(f32::MAX) };
    }
    argmax(logits).unwrap_or(0)
}

fn mask_ids(logits: &mut [f32], ids: &[u32]) {
    for &t in ids {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Top-p buckets: logit distance below the maximum, 1/32 logit wide, up to 128.
const TOP_P_BUCKETS: usize = 4096;
const TOP_P_BUCKETS_PER_LOGIT: f32 = 32.0;

#[inline]
fn top_p_bucket(l: f32, max: f32) -> usize {
    let d = (max - l) * TOP_P_BUCKETS_PER_LOGIT;
    if d < (TOP_P_BUCKETS - 1) as f32 {
        d as usize
    } else {
        TOP_P_BUCKETS - 1
    }
}

/// Moves the tokens top-p keeps to the front of `cand` and returns how many.
/// vLLM drops a token when the ascending cumulative probability up to and
/// including it is <= 1 - p, i.e. keeps it while the mass of better tokens is
/// < p. Rather than sort the vocabulary, the mass is histogrammed by logit:
/// buckets wholly above the crossing are kept, those below dropped, and only
/// the bucket where the mass crosses p is sorted. The best token always stays.
fn top_p_keep(cand: &mut [(u32, f32)], max: f32, p: f64, buckets: &mut Vec<f64>) -> usize {
    buckets.clear();
    buckets.resize(TOP_P_BUCKETS, 0.0);
    let mut total = 0.0f64;
    for &(_, l) in cand.iter() {
        let w = weight(l, max) as f64;
        buckets[top_p_bucket(l, max)] += w;
        total += w;
    }
    let target = p * total;
    // The first bucket whose cumulative mass reaches the target, and the mass above it.
    let mut crossing = TOP_P_BUCKETS;
    let mut above = 0.0f64;
    for (b, &m) in buckets.iter().enumerate() {
        if above + m >= target {
            crossing = b;
            break;
        }
        above += m;
    }
    if crossing == TOP_P_BUCKETS {
        return cand.len(); // rounding kept the target out of reach: keep all
    }
    let mut end = 0;
    for i in 0..cand.len() {
        if top_p_bucket(cand[i].1, max) < crossing {
            cand.swap(end, i);
            end += 1;
        }
    }
    let start = end;
    for i in start..cand.len() {
        if top_p_bucket(cand[i].1, max) == crossing {
            cand.swap(end, i);
            end += 1;
        }
    }
    cand[start..end].sort_unstable_by(desc);
    for (i, &(_, l)) in cand.iter().enumerate().take(end).skip(start) {
        if i > 0 && above >= target {
            return i;
        }
        above += weight(l, max) as f64;
    }
    end
}

/// Inverse-CDF draw over (id, unnormalized weight) pairs. None when the
/// weights sum to zero.
fn draw<I>(rng: &mut Xoshiro256StarStar, items: I) -> Option<u32>
where
    I: Iterator<Item = (u32, f32)> + Clone,
{
    let total: f64 = items.clone().map(|(_, w)| w as f64).sum();
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let u = rng.next_f64() * total;
    let mut acc = 0.0f64;
    let mut last = None;
    for (id, w) in items {
        if w > 0.0 {
            acc += w as f64;
            last = Some(id);
            if u < acc {
                return Some(id);
            }
        }
    }
    // Rounding left u at or past the final sum: take the last positive weight.
    last
}

/// Log-softmax of the raw logits (max subtracted, summed in f64): the chosen
/// token's logprob and the `k` best (id, logprob), best first (lowest id first
/// on ties). With every logit at -inf all logprobs are -inf.
fn log_softmax_top(
    raw: &[f32],
    token: u32,
    k: usize,
    heap: &mut BinaryHeap<Ranked>,
) -> TokenLogprob {
    let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = if max == f32::NEG_INFINITY {
        f64::INFINITY // makes every x - lse equal -inf
    } else {
        let sum: f64 = raw.iter().map(|&x| weight(x, max) as f64).sum();
        max as f64 + sum.ln()
    };
    let lp = |x: f32| (x as f64 - lse) as f32;
    best_k(heap, raw.iter().enumerate().map(|(i, &x)| (i as u32, x)), k);
    let mut best: Vec<Ranked> = heap.drain().collect();
    best.sort_unstable();
    let top = best.into_iter().map(|r| (r.0, lp(r.1))).collect();
    let chosen = raw
        .get(token as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    TokenLogprob {
        token,
        logprob: lp(chosen),
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test data from a tiny LCG of the tests' own, independent of the sampler's RNG.
    struct Lcg(u64);
    impl Lcg {
        fn next_f32(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32) / (1u64 << 24) as f32
        }
        fn logits(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n)
                .map(|_| (self.next_f32() * 2.0 - 1.0) * scale)
                .collect()
        }
    }

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    type Edit = Box<dyn Fn(&mut SamplingParams)>;

    // ---- validation -------------------------------------------------------

    #[test]
    fn validate_accepts_defaults_and_edges() {
        assert_eq!(validate(&params(), 100), Ok(()));
        let edges: Vec<Edit> = vec![
            Box::new(|p| p.n = 128),
            Box::new(|p| p.temperature = 0.0),
            Box::new(|p| p.temperature = 1e-6),
            Box::new(|p| p.temperature = 2.0),
            Box::new(|p| p.temperature = 50.0),
            Box::new(|p| p.top_p = 1.0),
            Box::new(|p| p.top_p = 1e-9),
            Box::new(|p| p.top_k = -1),
            Box::new(|p| p.top_k = 0),
            Box::new(|p| p.top_k = 1),
            Box::new(|p| p.top_k = i32::MAX),
            Box::new(|p| p.min_p = 0.0),
            Box::new(|p| p.min_p = 1.0),
            Box::new(|p| p.repetition_penalty = 1e-6),
            Box::new(|p| p.repetition_penalty = 100.0),
            Box::new(|p| p.presence_penalty = -2.0),
            Box::new(|p| p.presence_penalty = 2.0),
            Box::new(|p| p.frequency_penalty = -2.0),
            Box::new(|p| p.frequency_penalty = 2.0),
            Box::new(|p| p.max_tokens = 1),
            Box::new(|p| {
                p.max_tokens = 7;
                p.min_tokens = 7
            }),
            Box::new(|p| p.logprobs = Some(0)),
            Box::new(|p| p.logprobs = Some(20)),
            Box::new(|p| p.stop_token_ids = vec![0, 99]),
            Box::new(|p| p.seed = Some(u64::MAX)),
            Box::new(|p| p.ignore_eos = true),
        ];
        for (i, edit) in edges.iter().enumerate() {
            let mut p = params();
            edit(&mut p);
            assert_eq!(validate(&p, 100), Ok(()), "edge case {i}: {p:?}");
        }
    }

    #[test]
    fn validate_rejects_each_field() {
        type Case = (Edit, &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (Box::new(|p| p.n = 0), "n", "n must be at least 1, got 0."),
            (Box::new(|p| p.n = 129), "n", "n must be at most 128, got 129."),
            (
                Box::new(|p| {
                    p.n = 2;
                    p.temperature = 0.0
                }),
                "n",
                "n must be 1 when using greedy sampling, got 2.",
            ),
            (Box::new(|p| p.temperature = -1.0), "temperature", "temperature must be non-negative, got -1.0."),
            (Box::new(|p| p.temperature = f32::NAN), "temperature", "temperature must be a finite number, got nan."),
            (
                Box::new(|p| p.temperature = f32::INFINITY),
                "temperature",
                "temperature must be a finite number, got inf.",
            ),
            (Box::new(|p| p.top_p = 1.5), "top_p", "top_p must be in (0, 1], got 1.5."),
            (Box::new(|p| p.top_p = 0.0), "top_p", "top_p must be in (0, 1], got 0.0."),
            (Box::new(|p| p.top_p = f32::NAN), "top_p", "top_p must be in (0, 1], got nan."),
            (Box::new(|p| p.top_k = -2), "top_k", "top_k must be 0 (disable), or at least 1, got -2."),
            (Box::new(|p| p.min_p = -0.5), "min_p", "min_p must be in [0, 1], got -0.5."),
            (Box::new(|p| p.min_p = 1.5), "min_p", "min_p must be in [0, 1], got 1.5."),
            (
                Box::new(|p| p.repetition_penalty = 0.0),
                "repetition_penalty",
                "repetition_penalty must be greater than zero, got 0.0.",
            ),
            (
                Box::new(|p| p.repetition_penalty = f32::INFINITY),
                "repetition_penalty",
                "repetition_penalty must be a finite number, got inf.",
            ),
            (
                Box::new(|p| p.presence_penalty = 2.5),
                "presence_penalty",
                "presence_penalty must be in [-2, 2], got 2.5.",
            ),
            (
                Box::new(|p| p.presence_penalty = f32::NAN),
                "presence_penalty",
                "presence_penalty must be in [-2, 2], got nan.",
            ),
            (
                Box::new(|p| p.frequency_penalty = -3.0),
                "frequency_penalty",
                "frequency_penalty must be in [-2, 2], got -3.0.",
            ),
            (Box::new(|p| p.max_tokens = 0), "max_tokens", "max_tokens must be at least 1, got 0."),
            (
                Box::new(|p| {
                    p.max_tokens = 5;
                    p.min_tokens = 6
                }),
                "min_tokens",
                "min_tokens must be less than or equal to max_tokens=5, got 6.",
            ),
            (
                Box::new(|p| p.logprobs = Some(21)),
                "logprobs",
                "Requested sample logprobs of 21, which is greater than max allowed: 20",
            ),
            (
                Box::new(|p| p.stop_token_ids = vec![3, 100, 7, 250]),
                "stop_token_ids",
                "token_id(s) [100, 250] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: 100",
            ),
        ];
        for (edit, param, message) in &cases {
            let mut p = params();
            edit(&mut p);
            let e = validate(&p, 100).expect_err(message);
            assert_eq!(e.param, *param);
            assert_eq!(e.message, *message);
            assert_eq!(e.to_string(), *message);
            assert!(
                e.message.contains(param),
                "message names the parameter: {message}"
            );
        }
    }

    // ---- RNG --------------------------------------------------------------

    #[test]
    fn prng_matches_published_vectors() {
        // SplitMix64 from state 0 (reference splitmix64.c).
        let mut st = 0u64;
        assert_eq!(splitmix64(&mut st), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut st), 0x6E78_9E6A_A1B9_65F4);
        // xoshiro256** from state [1, 2, 3, 4] (the reference test vector).
        let mut x = Xoshiro256StarStar { s: [1, 2, 3, 4] };
        let want = [
            11520u64,
            0,
            1509978240,
            1215971899390074240,
            1216172134540287360,
            607988272756665600,
        ];
        for w in want {
            assert_eq!(x.next_u64(), w);
        }
        let mut x = Xoshiro256StarStar::from_seed(7);
        for _ in 0..1000 {
            let u = x.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }

    // ---- greedy and determinism -------------------------------------------

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut rng = Lcg(1);
        let mut p = params();
        p.temperature = 0.0;
        let mut s = SequenceSampler::new(&p, &[], 0);
        for _ in 0..20 {
            let logits = rng.logits(3000, 10.0);
            // Reference: first index of the maximum, compared in f64.
            let mut best = 0;
            for i in 0..logits.len() {
                if (logits[i] as f64) > (logits[best] as f64) {
                    best = i;
                }
            }
            let mut scratch = logits.clone();
            assert_eq!(s.sample(&mut scratch, &p, &[]).token, best as u32);
        }
        let mut tied = vec![0.5, 3.0, -1.0, 3.0, 3.0];
        assert_eq!(s.sample(&mut tied, &p, &[]).token, 1);
        assert_eq!(s.num_generated(), 21);
    }

    fn run(seed: u64, steps: usize, p: &SamplingParams) -> Vec<u32> {
        let mut data = Lcg(99);
        let mut s = SequenceSampler::new(p, &[1, 2, 3], seed);
        (0..steps)
            .map(|_| {
                let mut l = data.logits(1000, 3.0);
                s.sample(&mut l, p, &[]).token
            })
            .collect()
    }

    #[test]
    fn same_seed_same_tokens_different_seeds_differ() {
        for p in [
            params(),
            SamplingParams {
                top_k: 50,
                top_p: 0.9,
                temperature: 0.8,
                ..params()
            },
            SamplingParams {
                min_p: 0.05,
                repetition_penalty: 1.3,
                ..params()
            },
        ] {
            let a = run(42, 60, &p);
            assert_eq!(a, run(42, 60, &p));
            assert_ne!(a, run(43, 60, &p));
        }
        assert_ne!(sequence_seed(42, 0), sequence_seed(42, 1));
        assert_eq!(sequence_seed(42, 3), sequence_seed(42, 3));
        assert_ne!(
            run(sequence_seed(5, 0), 40, &params()),
            run(sequence_seed(5, 1), 40, &params())
        );
    }

    // ---- distribution -----------------------------------------------------

    /// The filtered distribution written out plainly in f64, with a full sort:
    /// temperature, min-p, top-k (ties with the k-th kept), top-p (ascending
    /// cumulative sum <= 1 - p dropped, the best token always kept), softmax.
    fn reference_distribution(
        logits: &[f32],
        t: f64,
        top_k: i32,
        top_p: f64,
        min_p: f64,
    ) -> Vec<f64> {
        let n = logits.len();
        let t = if t < 0.01 { 0.01 } else { t };
        let mut l: Vec<f64> = logits.iter().map(|&x| x as f64 / t).collect();
        let softmax = |l: &[f64]| {
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|x| x / z).collect::<Vec<f64>>()
        };
        if min_p > 0.0 {
            let p = softmax(&l);
            let pmax = p.iter().cloned().fold(0.0, f64::max);
            for i in 0..n {
                if p[i] < min_p * pmax {
                    l[i] = f64::NEG_INFINITY;
                }
            }
        }
        if top_k > 0 && (top_k as usize) < n {
            let mut sorted = l.clone();
            sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let kth = sorted[top_k as usize - 1];
            for x in l.iter_mut() {
                if *x < kth {
                    *x = f64::NEG_INFINITY;
                }
            }
        }
        if top_p < 1.0 {
            let p = softmax(&l);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| l[a].partial_cmp(&l[b]).unwrap().then(b.cmp(&a)));
            let mut cum = 0.0;
            for (pos, &i) in order.iter().enumerate() {
                cum += p[i];
                if cum <= 1.0 - top_p && pos + 1 < n {
                    l[i] = f64::NEG_INFINITY;
                }
            }
        }
        softmax(&l)
    }

    #[test]
    fn draws_match_the_filtered_distribution() {
        let logits = [1.0f32, 2.5, 0.3, 2.0, -1.0, 1.7, 0.0, 2.5, -0.4, 1.2];
        // (temperature, top_k, top_p, min_p)
        let configs = [
            (1.0, 0, 1.0, 0.0),
            (0.7, 0, 1.0, 0.0),
            (1.5, 0, 1.0, 0.0),
            (1.0, 3, 1.0, 0.0), // the 3rd best (2.0) and a tie at the top (2.5, 2.5)
            (1.0, 2, 1.0, 0.0),
            (1.0, 1, 1.0, 0.0), // top_k = 1 keeps both tokens tied at the top, like vLLM
            (1.0, 0, 0.6, 0.0),
            (1.0, 0, 0.85, 0.0),
            (1.0, 0, 1.0, 0.2),
            (0.8, 0, 1.0, 0.3),
            (1.3, 5, 0.8, 0.05),
            (0.9, 6, 0.9, 0.25),
            // min-p before top-p (vLLM v1's order): the other order differs by 0.15 here.
            (1.0, 0, 0.7, 0.3),
            (1e-6, 0, 1.0, 0.0), // raised to 0.01 like vLLM: the tied best two
        ];
        const DRAWS: usize = 20_000;
        for (ci, &(t, k, tp, mp)) in configs.iter().enumerate() {
            let p = SamplingParams {
                temperature: t as f32,
                top_k: k,
                top_p: tp as f32,
                min_p: mp as f32,
                ..params()
            };
            let want = reference_distribution(&logits, t, k, tp, mp);
            let mut s = SequenceSampler::new(&p, &[], 1234 + ci as u64);
            let mut counts = [0usize; 10];
            for _ in 0..DRAWS {
                let mut l = logits.to_vec();
                counts[s.sample(&mut l, &p, &[]).token as usize] += 1;
                // Penalties are off, so the recorded outputs don't matter.
            }
            for i in 0..10 {
                let got = counts[i] as f64 / DRAWS as f64;
                assert!(
                    (got - want[i]).abs() < 0.02,
                    "config {ci} {:?}: token {i} got {got}, want {}",
                    (t, k, tp, mp),
                    want[i]
                );
                if want[i] == 0.0 {
                    assert_eq!(counts[i], 0, "config {ci}: filtered token {i} drawn");
                }
            }
        }
    }

    #[test]
    fn top_p_over_a_large_vocabulary_matches_a_full_sort() {
        let mut rng = Lcg(7);
        for (n, scale, p) in [
            (5000, 0.5, 0.9),
            (5000, 8.0, 0.5),
            (150, 2.0, 0.95),
            (3000, 0.01, 0.3),
        ] {
            let logits = rng.logits(n, scale);
            let want = reference_distribution(&logits, 1.0, 0, p, 0.0);
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut cand: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            let kept = top_p_keep(&mut cand, max, p, &mut Vec::new());
            let mut got: Vec<u32> = cand[..kept].iter().map(|c| c.0).collect();
            got.sort_unstable();
            let expected: Vec<u32> = (0..n as u32).filter(|&i| want[i as usize] > 0.0).collect();
            assert_eq!(got, expected, "n={n} scale={scale} p={p}");
        }
    }

    // ---- penalties --------------------------------------------------------

    #[test]
    fn penalties_match_the_formula() {
        let prompt = [1u32, 2, 2, 7, 9999]; // 9999 lies outside the vocabulary: ignored
        let outputs = [3u32, 3, 2, 5, 3];
        let (rep, freq, pres) = (1.7f32, 0.4f32, -0.3f32);
        let p = SamplingParams {
            temperature: 0.0,
            repetition_penalty: rep,
            frequency_penalty: freq,
            presence_penalty: pres,
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &prompt, 0);
        // Force the outputs with an overwhelming logit.
        for &t in &outputs {
            let mut l = vec![0.0f32; 10];
            l[t as usize] = 1000.0;
            assert_eq!(s.sample(&mut l, &p, &[]).token, t);
        }
        let base: Vec<f32> = vec![1.5, -2.0, 0.8, 3.0, -0.5, 0.0, 2.2, -1.1, 0.6, -3.3];
        let mut got = base.clone();
        s.apply_penalties(&mut got, &p);
        for i in 0..10u32 {
            let count = outputs.iter().filter(|&&t| t == i).count() as f64;
            let seen = prompt.contains(&i) || count > 0.0;
            let mut want = base[i as usize] as f64;
            if seen {
                want = if want > 0.0 {
                    want / rep as f64
                } else {
                    want * rep as f64
                };
            }
            want -= freq as f64 * count;
            if count > 0.0 {
                want -= pres as f64;
            }
            assert!(
                (got[i as usize] as f64 - want).abs() < 1e-5,
                "token {i}: got {} want {want}",
                got[i as usize]
            );
        }

        // End to end: the penalty moves the greedy pick off the repeated token.
        let mut l = vec![0.0f32; 10];
        l[3] = 2.0; // 2/1.7 - 0.4*3 + 0.3 = 0.276...
        l[4] = 1.0; // untouched
        assert_eq!(s.sample(&mut l, &p, &[]).token, 4);
    }

    // ---- logprobs ---------------------------------------------------------

    fn reference_logprobs(raw: &[f32]) -> Vec<f64> {
        let clean: Vec<f64> = raw
            .iter()
            .map(|&x| {
                if x.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    x as f64
                }
            })
            .collect();
        let m = clean.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = clean.iter().map(|x| (x - m).exp()).sum();
        clean.iter().map(|x| x - m - z.ln()).collect()
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax() {
        let mut rng = Lcg(3);
        let mut raw = rng.logits(2000, 12.0);
        raw[17] = f32::NEG_INFINITY;
        raw[18] = f32::NAN;
        let want = reference_logprobs(&raw);
        let mut order: Vec<usize> = (0..raw.len()).collect();
        order.sort_by(|&a, &b| want[b].partial_cmp(&want[a]).unwrap().then(a.cmp(&b)));
        // Penalties and temperature must not touch the reported logprobs.
        let p = SamplingParams {
            logprobs: Some(5),
            temperature: 0.5,
            repetition_penalty: 1.8,
            top_k: 40,
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &[order[0] as u32, 5, 6], 11);
        for _ in 0..5 {
            let mut l = raw.clone();
            let out = s.sample(&mut l, &p, &[]);
            let lp = out.logprob.expect("logprobs asked for");
            assert_eq!(lp.token, out.token);
            assert!((lp.logprob as f64 - want[out.token as usize]).abs() < 1e-5);
            assert_eq!(lp.top.len(), 5);
            for (j, &(id, v)) in lp.top.iter().enumerate() {
                assert_eq!(id as usize, order[j]);
                assert!((v as f64 - want[order[j]]).abs() < 1e-5);
            }
        }
        // k = 0: only the chosen token; no logprobs asked: none.
        let p0 = SamplingParams {
            logprobs: Some(0),
            ..params()
        };
        let mut l = raw.clone();
        let out = SequenceSampler::new(&p0, &[], 1).sample(&mut l, &p0, &[]);
        let lp = out.logprob.unwrap();
        assert!(lp.top.is_empty());
        assert!((lp.logprob as f64 - want[out.token as usize]).abs() < 1e-5);
        let mut l = raw.clone();
        assert!(SequenceSampler::new(&params(), &[], 1)
            .sample(&mut l, &params(), &[])
            .logprob
            .is_none());
    }

    // ---- min_tokens and stopping -----------------------------------------

    #[test]
    fn min_tokens_masks_eog_and_stop_ids() {
        let eog = [0u32, 9];
        let stop = 4u32;
        for (temperature, ignore_eos) in [(0.0, false), (1.0, false), (0.0, true)] {
            let p = SamplingParams {
                temperature,
                min_tokens: 3,
                max_tokens: 10,
                stop_token_ids: vec![stop],
                ignore_eos,
                ..params()
            };
            for seed in 0..50 {
                let mut s = SequenceSampler::new(&p, &[], seed);
                for step in 0..5 {
                    // EOG and the stop id dominate; everything else is tiny but finite.
                    let mut l = vec![-5.0f32; 10];
                    l[0] = 10.0;
                    l[9] = 10.0;
                    l[stop as usize] = 10.0;
                    let t = s.sample(&mut l, &p, &eog).token;
                    let ends = eog.contains(&t) || t == stop;
                    if step < 3 {
                        // Like vLLM, EOG is masked during min_tokens even with ignore_eos.
                        assert!(!ends, "step {step} produced {t} (seed {seed})");
                    } else {
                        assert!(ends, "step {step} produced {t} (seed {seed})");
                    }
                }
                if temperature == 0.0 {
                    break; // greedy: one seed is enough
                }
            }
        }
    }

    #[test]
    fn check_stop_cases() {
        let eog = [2u32, 50];
        let p = SamplingParams {
            max_tokens: 10,
            stop_token_ids: vec![7],
            ..params()
        };
        assert_eq!(check_stop(&p, 2, 1, &eog), Some(FinishReason::Stop));
        assert_eq!(check_stop(&p, 50, 4, &eog), Some(FinishReason::Stop));
        assert_eq!(check_stop(&p, 7, 4, &eog), Some(FinishReason::Stop));
        assert_eq!(check_stop(&p, 3, 9, &eog), None);
        assert_eq!(check_stop(&p, 3, 10, &eog), Some(FinishReason::Length));
        // Stop wins over Length on the last token.
        assert_eq!(check_stop(&p, 2, 10, &eog), Some(FinishReason::Stop));

        let ig = SamplingParams {
            ignore_eos: true,
            ..p.clone()
        };
        assert_eq!(check_stop(&ig, 2, 1, &eog), None);
        assert_eq!(check_stop(&ig, 7, 1, &eog), Some(FinishReason::Stop));
        assert_eq!(check_stop(&ig, 2, 10, &eog), Some(FinishReason::Length));

        // min_tokens: no stop while fewer than min_tokens tokens exist (vLLM).
        let mt = SamplingParams {
            min_tokens: 3,
            ..p.clone()
        };
        assert_eq!(check_stop(&mt, 2, 1, &eog), None);
        assert_eq!(check_stop(&mt, 7, 2, &eog), None);
        assert_eq!(check_stop(&mt, 2, 3, &eog), Some(FinishReason::Stop));
        assert_eq!(check_stop(&mt, 7, 4, &eog), Some(FinishReason::Stop));

        let one = SamplingParams {
            max_tokens: 1,
            ..params()
        };
        assert_eq!(check_stop(&one, 5, 1, &[]), Some(FinishReason::Length));
        // Unvalidated min_tokens > max_tokens still ends at max_tokens.
        let bad = SamplingParams {
            max_tokens: 2,
            min_tokens: 5,
            ..params()
        };
        assert_eq!(check_stop(&bad, 5, 2, &[]), Some(FinishReason::Length));
    }

    // ---- bad numbers --------------------------------------------------------

    #[test]
    fn nan_and_inf_never_panic() {
        let greedy = SamplingParams {
            temperature: 0.0,
            logprobs: Some(3),
            ..params()
        };
        let random = SamplingParams {
            top_k: 3,
            top_p: 0.5,
            min_p: 0.1,
            logprobs: Some(3),
            ..params()
        };
        for p in [&greedy, &random, &params()] {
            let mut s = SequenceSampler::new(p, &[0, 1], 5);
            // All NaN: raw argmax fallback, the lowest id.
            let mut l = vec![f32::NAN; 8];
            let out = s.sample(&mut l, p, &[]);
            assert_eq!(out.token, 0);
            // NaN is -inf, +inf is the best.
            let mut l = vec![f32::NAN, 0.0, f32::INFINITY, f32::NAN, 1.0];
            assert_eq!(s.sample(&mut l, p, &[]).token, 2);
            // NaNs mixed in are never drawn.
            for _ in 0..200 {
                let mut l = vec![f32::NAN, 1.0, f32::NAN, 1.2, f32::NEG_INFINITY];
                let t = s.sample(&mut l, p, &[]).token;
                assert!(t == 1 || t == 3, "drew {t}");
            }
            // Empty logits: token 0, no panic.
            assert_eq!(s.sample(&mut [], p, &[]).token, 0);
        }
        // min_tokens masks the only finite logit: fall back to the raw argmax.
        let p = SamplingParams {
            min_tokens: 2,
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &[], 0);
        let mut l = vec![f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY];
        assert_eq!(s.sample(&mut l, &p, &[1]).token, 1);
        // Penalties and tiny temperatures that overflow stay finite.
        let p = SamplingParams {
            repetition_penalty: 1e-6,
            temperature: 1e-4,
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &[0, 1], 0);
        let mut l = vec![f32::MAX, f32::MAX / 2.0, -f32::MAX];
        // Both penalized logits saturate at f32::MAX, so either may come out.
        assert!(s.sample(&mut l, &p, &[]).token < 2);
        // Unvalidated params don't panic either.
        let wild = SamplingParams {
            temperature: f32::NAN,
            top_p: -1.0,
            top_k: -7,
            min_p: 5.0,
            repetition_penalty: -1.0,
            frequency_penalty: f32::NAN,
            logprobs: Some(1000),
            ..params()
        };
        let mut s = SequenceSampler::new(&wild, &[0], 0);
        let mut l = vec![0.1, 0.2, 0.3];
        let out = s.sample(&mut l, &wild, &[]);
        assert_eq!(out.token, 2);
        assert_eq!(out.logprob.unwrap().top.len(), 3);
        let wild2 = SamplingParams {
            temperature: f32::INFINITY,
            top_p: 0.0,
            min_p: 1.5,
            ..params()
        };
        let mut l = vec![0.1, 0.9, f32::NEG_INFINITY];
        let t = SequenceSampler::new(&wild2, &[], 0)
            .sample(&mut l, &wild2, &[])
            .token;
        assert!(t < 2);
    }
}
