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
//!    draw from the softmax of what is left at the sequence's counter-based
//!    draw `crate::rng::draw_unit(seed, output position, 0)`, so a token
//!    depends only on the sequence's seed and its position in the output.
//!
//! [`sample_row`] is the one place a token is picked: backends call it (the
//! CPU's directly; a device mirrors it, see `crate::backend::RowSampling`),
//! and [`SequenceSampler`] keeps what a sequence must remember between steps
//! (the counts penalties need, its seed, how many tokens it made) and turns
//! it into each step's [`RowSampling`].
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

use crate::backend::{RowSampling, SampledToken};
use ferry_transport::{SamplingParams, TokenLogprob};

mod stop;
mod validate;
pub use stop::check_stop;
pub use validate::{validate, ParamError};

/// vLLM's `_SAMPLING_EPS`: temperatures below this are greedy.
const SAMPLING_EPS: f32 = 1e-5;
/// vLLM's `_MAX_TEMP`: positive temperatures are raised to at least this.
const MIN_POSITIVE_TEMPERATURE: f32 = 1e-2;
pub use ferry_transport::{MAX_LOGPROBS, MAX_N};

/// A seed for the `index`-th completion of a request seeded with `request_seed`,
/// so that n > 1 completions differ but each is reproducible.
pub fn sequence_seed(request_seed: u64, index: u32) -> u64 {
    use crate::rng::RngCore;
    crate::rng::splitmix(request_seed ^ (index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64()
}

/// True when this temperature means greedy decoding, after vLLM's clamp.
pub(crate) fn is_greedy(temperature: f32) -> bool {
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

/// What `SequenceSampler::sample` picked.
pub type Sampled = SampledToken;

/// What one sequence remembers between steps: its seed, the counts the
/// penalties need, and how many tokens it has generated (the draw's position).
#[derive(Debug, Clone)]
pub struct SequenceSampler {
    seed: u64,
    /// Distinct prompt token ids, sorted (for the repetition penalty).
    prompt_set: Vec<u32>,
    /// Output token id -> times generated (frequency/presence/repetition).
    output_counts: HashMap<u32, u32>,
    num_generated: usize,
    /// For `sample`, the one-call form used off the engine's path.
    scratch: SamplerScratch,
}

/// Buffers `sample_row` reuses from call to call (one per worker thread).
#[derive(Debug, Clone, Default)]
pub struct SamplerScratch {
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
    /// [`sequence_seed`]), or one the gateway drew at admission. The prompt's
    /// distinct ids are kept whatever the params (they are few next to the
    /// KV cache), for the repetition penalty.
    pub fn new(_params: &SamplingParams, prompt_tokens: &[u32], seed: u64) -> SequenceSampler {
        let mut prompt_set = prompt_tokens.to_vec();
        prompt_set.sort_unstable();
        prompt_set.dedup();
        SequenceSampler { seed, prompt_set, output_counts: HashMap::new(), num_generated: 0, scratch: SamplerScratch::default() }
    }

    /// Output tokens sampled so far.
    pub fn num_generated(&self) -> usize {
        self.num_generated
    }

    /// Counts `token` as this sequence's next output (a sampled token, or one
    /// it resumes with).
    pub fn record(&mut self, token: u32) {
        self.num_generated += 1;
        *self.output_counts.entry(token).or_insert(0) += 1;
    }

    /// The settings of this sequence's next draw, sampling from batch chunk
    /// `chunk`. `eog_ids`: the model's end-of-generation ids.
    pub fn row(&self, params: &SamplingParams, eog_ids: &[u32], chunk: usize) -> RowSampling {
        let banned = if self.num_generated < params.min_tokens as usize {
            eog_ids.iter().chain(&params.stop_token_ids).copied().collect()
        } else {
            Vec::new()
        };
        RowSampling {
            chunk,
            back: 0,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k.max(0) as u32,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            seed: self.seed,
            position: self.num_generated as u64,
            logprobs: params.logprobs,
            penalties: self.penalties(params),
            logit_bias: params.logit_bias.clone(),
            banned,
            allowed: None,
        }
    }

    /// (token, times generated, in the prompt) for every token a penalty of
    /// `params` touches: prompt and output tokens under a repetition penalty,
    /// output tokens under frequency or presence penalties, none otherwise.
    fn penalties(&self, params: &SamplingParams) -> Vec<(u32, u32, bool)> {
        let rep = params.repetition_penalty;
        let repetition = rep.is_finite() && rep > 0.0 && rep != 1.0;
        let additive = params.frequency_penalty != 0.0 || params.presence_penalty != 0.0;
        let mut out = Vec::new();
        if repetition {
            out.extend(self.prompt_set.iter().map(|&t| (t, self.output_counts.get(&t).copied().unwrap_or(0), true)));
        }
        if repetition || additive {
            out.extend(
                self.output_counts.iter().filter(|(t, _)| !repetition || self.prompt_set.binary_search(t).is_err()).map(|(&t, &c)| (t, c, false)),
            );
        }
        out
    }

    /// Picks the next token from this position's raw logits with
    /// [`sample_row`] and records it: the whole of a step for one sequence,
    /// for callers outside the engine's batched path (tests, tools).
    /// `logits` is used as scratch.
    pub fn sample(&mut self, logits: &mut [f32], params: &SamplingParams, eog_ids: &[u32]) -> Sampled {
        let row = self.row(params, eog_ids, 0);
        let picked = sample_row(logits, &row, &mut self.scratch);
        self.record(picked.token);
        picked
    }
}

/// Picks one token from one position's raw logits as `row` says (see
/// [`RowSampling`] for the order of operations). `logits` is used as
/// scratch and holds no particular values afterwards. Waits for the row's
/// constraint mask if it has one. Empty logits (a caller bug) give token 0.
pub fn sample_row(logits: &mut [f32], row: &RowSampling, scratch: &mut SamplerScratch) -> SampledToken {
    if let Some(words) = row.allowed.as_ref().and_then(super::backend::TokenMask::wait) {
        apply_allowed(logits, &words);
    }
    // NaN -> -inf, +inf -> MAX, so every later comparison and softmax is sound.
    let raw_argmax = sanitize(logits);
    if row.logprobs.is_some() {
        scratch.raw.clear();
        scratch.raw.extend_from_slice(logits);
    }
    mask_ids(logits, &row.banned);
    apply_logit_bias(logits, &row.logit_bias);
    apply_penalties(logits, row);

    let token = if is_greedy(row.temperature) {
        argmax(logits).unwrap_or(raw_argmax)
    } else {
        let u = crate::rng::draw_unit(row.seed, row.position, 0);
        sample_random(logits, row, u, scratch).unwrap_or(raw_argmax)
    };

    let logprob = row.logprobs.map(|k| {
        let k = k.min(MAX_LOGPROBS) as usize;
        log_softmax_top(&scratch.raw, token, k, &mut scratch.heap)
    });
    SampledToken { token, logprob }
}

/// Sets every logit the mask does not allow to -inf: vLLM's bitmask layout,
/// bit `b` of word `w` for token `32 w + b`, ids past the words not allowed.
pub fn apply_allowed(logits: &mut [f32], words: &[u32]) {
    // 32 ids per mask word; all-allowed words are skipped.
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Repetition penalty over prompt and output tokens, then frequency and
/// presence penalties over output tokens, as vLLM's `apply_penalties`
/// (positive logits times 1/penalty, the others times penalty). Each token
/// appears once in `row.penalties`, so the order of the list does not matter.
/// Ids outside the vocabulary are skipped; out-of-range penalty values
/// (unvalidated params) are ignored rather than poisoning the logits.
fn apply_penalties(logits: &mut [f32], row: &RowSampling) {
    let rep = row.repetition_penalty;
    let repetition = rep.is_finite() && rep > 0.0 && rep != 1.0;
    let freq = if row.frequency_penalty.is_finite() { row.frequency_penalty } else { 0.0 };
    let pres = if row.presence_penalty.is_finite() { row.presence_penalty } else { 0.0 };
    let inv = 1.0 / rep;
    for &(t, count, in_prompt) in &row.penalties {
        let Some(l) = logits.get_mut(t as usize) else { continue };
        if repetition && (in_prompt || count > 0) {
            *l = if *l > 0.0 { *l * inv } else { *l * rep };
        }
        if count > 0 && (freq != 0.0 || pres != 0.0) {
            *l -= freq * count as f32;
            *l -= pres;
        }
    }
}

/// Temperature, min-p, top-k, top-p, then a draw at `u` in [0, 1). None
/// when no token has a finite logit.
fn sample_random(logits: &mut [f32], row: &RowSampling, u: f64, scratch: &mut SamplerScratch) -> Option<u32> {
    let t = effective_temperature(row.temperature);
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
    let min_p = if row.min_p.is_nan() { 0.0 } else { row.min_p.clamp(0.0, 1.0) };
    let floor = if min_p > 0.0 { (min_p as f64).ln() } else { f64::NEG_INFINITY };
    let keep = |l: f32| l > f32::NEG_INFINITY && ((l - max) as f64) >= floor;

    let vocab = logits.len();
    let top_k = (row.top_k > 0 && (row.top_k as usize) < vocab).then_some(row.top_k as usize);
    let top_p = (row.top_p < 1.0).then_some(row.top_p as f64);

    if top_k.is_none() && top_p.is_none() {
        // No ranking needed: draw straight from the (min-p filtered) vocabulary.
        scratch.weights.clear();
        scratch.weights.extend(logits.iter().map(|&l| if keep(l) { weight(l, max) } else { 0.0 }));
        return draw(u, scratch.weights.iter().enumerate().map(|(i, &w)| (i as u32, w)));
    }

    let kept = logits.iter().enumerate().filter(|&(_, &l)| keep(l)).map(|(i, &l)| (i as u32, l));
    // vLLM's top-k masks logits below the k-th largest (of the min-p
    // survivors): ties with it stay.
    let kth = match top_k {
        Some(k) => {
            best_k(&mut scratch.heap, kept.clone(), k);
            if scratch.heap.len() == k {
                scratch.heap.peek().map_or(f32::NEG_INFINITY, |r| r.1)
            } else {
                f32::NEG_INFINITY
            }
        }
        None => f32::NEG_INFINITY,
    };
    scratch.cand.clear();
    scratch.cand.extend(kept.filter(|&(_, l)| l >= kth));
    if let Some(p) = top_p {
        let n = top_p_keep(&mut scratch.cand, max, p, &mut scratch.buckets);
        scratch.cand.truncate(n);
    }
    // The draw walks the kept tokens in id order, as it walks the whole
    // vocabulary above and as a device sampler does: which token a given u
    // lands on then depends on the kept set, not on how it was found.
    scratch.cand.sort_unstable_by_key(|&(i, _)| i);
    draw(u, scratch.cand.iter().map(|&(i, l)| (i, weight(l, max))))
}

/// NaN -> -inf, +inf -> `f32::MAX`; returns the argmax of the result (the
/// lowest id on ties, 0 when all are -inf): the last-resort token.
fn sanitize(logits: &mut [f32]) -> u32 {
    for l in logits.iter_mut() {
        *l = if l.is_nan() { f32::NEG_INFINITY } else { l.min(f32::MAX) };
    }
    argmax(logits).unwrap_or(0)
}

/// Adds each (id, bias) to its logit, as vLLM's `LogitBiasLogitsProcessor`
/// (after min_tokens, before penalties; it moves greedy picks too). Ids
/// outside the vocabulary and non-finite biases (unvalidated params) are
/// skipped; a -inf logit stays -inf.
fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(t, b) in bias {
        if let (Some(l), true) = (logits.get_mut(t as usize), b.is_finite()) {
            *l = (*l + b).min(f32::MAX);
        }
    }
}

/// The logprob of `token` (with its rank and the `k` best alternatives) in
/// the distribution of one position's raw logits: what prompt logprobs
/// report for each prompt token. `logits` is sanitized in place.
pub fn position_logprob(logits: &mut [f32], token: u32, k: usize) -> TokenLogprob {
    sanitize(logits);
    let mut heap = BinaryHeap::new();
    log_softmax_top(logits, token, k.min(MAX_LOGPROBS as usize), &mut heap)
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

/// Inverse-CDF draw at `u` in [0, 1) over (id, unnormalized weight) pairs.
/// None when the weights sum to zero.
fn draw<I>(u: f64, items: I) -> Option<u32>
where
    I: Iterator<Item = (u32, f32)> + Clone,
{
    let total: f64 = items.clone().map(|(_, w)| w as f64).sum();
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let u = u * total;
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
    // Tokens strictly better than the chosen one, plus one: ties share the
    // better rank (an -inf token ranks after every finite one).
    let rank = 1 + raw.iter().filter(|&&x| x > chosen).count() as u32;
    TokenLogprob {
        token,
        logprob: lp(chosen),
        rank,
        top,
    }
}

#[cfg(test)]
mod tests;
