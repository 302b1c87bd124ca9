//! A step's sampling rows packed for `kernels/sampling.cu`'s `sample_rows`
//! (its `RowParams` and flat lists), and the kernel's answers unpacked into
//! tokens and logprobs. Pure host code: tested here without a GPU.

use crate::backend::{RowSampling, SampledToken};
use ferry_transport::{TokenLogprob, MAX_LOGPROBS};

/// kernels/sampling.cu's `#define MAX_TOP_LOGPROBS`, read from its source at
/// compile time: the kernel writes that many top logprobs per row (the row
/// stride of `Answers::top_ids` and `top_logprobs`). It must be the most a
/// request may ask for, `ferry_transport::MAX_LOGPROBS`, the one name the
/// engine uses for the limit.
const SAMPLING_CU_MAX_TOP_LOGPROBS: usize = kernel_define(b"sampling.cu", b"#define MAX_TOP_LOGPROBS ");
const _: () = assert!(
    SAMPLING_CU_MAX_TOP_LOGPROBS == MAX_LOGPROBS as usize,
    "kernels/sampling.cu's MAX_TOP_LOGPROBS differs from ferry_transport::MAX_LOGPROBS"
);

/// The number after `define` (a line's start, e.g. `#define NAME `) in the
/// kernel source `file`; fails the build when there is none.
const fn kernel_define(file: &[u8], define: &[u8]) -> usize {
    const fn at(hay: &[u8], i: usize, needle: &[u8]) -> bool {
        if i + needle.len() > hay.len() {
            return false;
        }
        let mut j = 0;
        while j < needle.len() {
            if hay[i + j] != needle[j] {
                return false;
            }
            j += 1;
        }
        true
    }
    let mut k = 0;
    while k < ferry_kernels::KERNELS.len() {
        let (name, src) = (ferry_kernels::KERNELS[k].file.as_bytes(), ferry_kernels::KERNELS[k].source.as_bytes());
        if name.len() == file.len() && at(name, 0, file) {
            let mut i = 0;
            while i < src.len() {
                if (i == 0 || src[i - 1] == b'\n') && at(src, i, define) {
                    let (mut j, mut n) = (i + define.len(), 0);
                    while j < src.len() && src[j].is_ascii_digit() {
                        n = n * 10 + (src[j] - b'0') as usize;
                        j += 1;
                    }
                    assert!(j > i + define.len(), "the kernel's define has no number");
                    return n;
                }
                i += 1;
            }
            panic!("the kernel source has no such define");
        }
        k += 1;
    }
    panic!("no such kernel source")
}

/// sampling.cu's `RowParams`, field for field (80 bytes). A row's settings
/// are its [`RowSampling`]'s; its lists are `[from, to)` index ranges into
/// [`Packed`]'s flat arrays.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowParams {
    /// `RowSampling::temperature`: 0 or less (or NaN) is greedy.
    pub temperature: f32,
    /// `RowSampling::top_p`; 1: off.
    pub top_p: f32,
    /// `RowSampling::min_p`; 0: off.
    pub min_p: f32,
    /// `RowSampling::repetition_penalty`; 1: off.
    pub repetition: f32,
    /// `RowSampling::presence_penalty`; 0: off.
    pub presence: f32,
    /// `RowSampling::frequency_penalty`; 0: off.
    pub frequency: f32,
    /// `RowSampling::top_k`, saturated to i32::MAX; 0: off.
    pub top_k: i32,
    /// Top logprobs to write, 0..=MAX_LOGPROBS; -1: no logprobs for this row.
    pub logprobs: i32,
    /// The sequence's seed; with `position`, names the row's draw.
    pub seed: u64,
    /// Tokens the sequence generated before this one.
    pub position: u64,
    /// Start of the row's penalties in `pen_tokens`, `pen_counts` and `pen_in_prompt`.
    pub pen_from: i32,
    /// End (exclusive) of the row's penalties.
    pub pen_to: i32,
    /// Start of the row's logit biases in `bias_tokens` and `bias_values`.
    pub bias_from: i32,
    /// End (exclusive) of the row's logit biases.
    pub bias_to: i32,
    /// Start of the row's banned ids in `ban_tokens`.
    pub ban_from: i32,
    /// End (exclusive) of the row's banned ids.
    pub ban_to: i32,
    /// The row's first word in `mask_words` (vocab.div_ceil(32) words
    /// follow); -1: no grammar mask.
    pub mask_word: i64,
}

const _: () = assert!(std::mem::size_of::<RowParams>() == 80);

/// Everything `sample_rows` reads besides the logits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Packed {
    /// One per row, in the order of the rows given.
    pub params: Vec<RowParams>,
    /// Every row's penalized token ids, row after row (`RowSampling::penalties`).
    pub pen_tokens: Vec<u32>,
    /// Times each of `pen_tokens` was generated.
    pub pen_counts: Vec<u32>,
    /// 1 where that token is in the prompt, else 0.
    pub pen_in_prompt: Vec<u8>,
    /// Every row's logit-bias token ids, row after row.
    pub bias_tokens: Vec<u32>,
    /// The bias added to each of `bias_tokens`.
    pub bias_values: Vec<f32>,
    /// Every row's banned ids, row after row.
    pub ban_tokens: Vec<u32>,
    /// Every masked row's grammar mask in vLLM's bitmask layout (bit b of
    /// word w allows token 32w + b), vocab.div_ceil(32) words per row.
    pub mask_words: Vec<u32>,
    /// Some row asked for logprobs (the raw copy is then written).
    pub any_logprobs: bool,
}

fn at(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Packs `rows` for a vocabulary of `vocab`. Waits for each row's grammar
/// mask; a mask shorter than the vocabulary disallows the tokens it does not
/// reach (a model's padding rows), a longer one is cut.
pub fn pack(rows: &[RowSampling], vocab: usize) -> Packed {
    let words = vocab.div_ceil(32);
    let mut p = Packed::default();
    for r in rows {
        let pen_from = at(p.pen_tokens.len());
        for &(t, n, in_prompt) in &r.penalties {
            p.pen_tokens.push(t);
            p.pen_counts.push(n);
            p.pen_in_prompt.push(in_prompt as u8);
        }
        let bias_from = at(p.bias_tokens.len());
        for &(t, b) in &r.logit_bias {
            p.bias_tokens.push(t);
            p.bias_values.push(b);
        }
        let ban_from = at(p.ban_tokens.len());
        p.ban_tokens.extend_from_slice(&r.banned);
        let mask_word = match r.allowed.as_ref().and_then(super::super::backend::TokenMask::wait) {
            Some(mask) => {
                let start = p.mask_words.len() as i64;
                p.mask_words.extend(mask.iter().copied().chain(std::iter::repeat(0)).take(words));
                start
            }
            None => -1,
        };
        let logprobs = r.logprobs.map_or(-1, |k| k.min(MAX_LOGPROBS) as i32);
        p.any_logprobs |= logprobs >= 0;
        p.params.push(RowParams {
            temperature: r.temperature,
            top_p: r.top_p,
            min_p: r.min_p,
            repetition: r.repetition_penalty,
            presence: r.presence_penalty,
            frequency: r.frequency_penalty,
            top_k: i32::try_from(r.top_k).unwrap_or(i32::MAX),
            logprobs,
            seed: r.seed,
            position: r.position,
            pen_from,
            pen_to: at(p.pen_tokens.len()),
            bias_from,
            bias_to: at(p.bias_tokens.len()),
            ban_from,
            ban_to: at(p.ban_tokens.len()),
            mask_word,
        });
    }
    p
}

/// The kernel's outputs for `rows` rows, as copied back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answers {
    /// The token picked for each row.
    pub tokens: Vec<u32>,
    /// Each picked token's logprob in its raw row (meaningful where the row asked for logprobs).
    pub logprob: Vec<f32>,
    /// Each picked token's rank: 1 + the tokens strictly more likely.
    pub rank: Vec<i32>,
    /// rows × MAX_LOGPROBS (sampling.cu's MAX_TOP_LOGPROBS).
    pub top_ids: Vec<u32>,
    /// The logprobs of `top_ids`, same layout: best first, the lowest id first on ties.
    pub top_logprobs: Vec<f32>,
}

/// One `SampledToken` per row; logprobs where the row asked for them.
pub fn unpack(params: &[RowParams], a: &Answers) -> Vec<SampledToken> {
    params
        .iter()
        .enumerate()
        .map(|(r, p)| SampledToken {
            token: a.tokens[r],
            logprob: (p.logprobs >= 0).then(|| TokenLogprob {
                token: a.tokens[r],
                logprob: a.logprob[r],
                rank: a.rank[r].max(1) as u32,
                top: (0..p.logprobs as usize)
                    .map(|j| (a.top_ids[r * MAX_LOGPROBS as usize + j], a.top_logprobs[r * MAX_LOGPROBS as usize + j]))
                    .collect(),
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::backend::TokenMask;
    use super::*;
    use std::sync::Arc;

    #[test]
    fn rows_point_into_their_own_slices_of_the_lists() {
        let mut a = RowSampling::greedy();
        a.penalties = vec![(5, 2, true), (9, 0, true)];
        a.logit_bias = vec![(3, -1.5)];
        a.logprobs = Some(50);
        let mut b = RowSampling::greedy();
        b.temperature = 0.7;
        b.top_k = 40;
        b.seed = 42;
        b.position = 17;
        b.banned = vec![2, 0];
        b.penalties = vec![(1, 1, false)];
        b.allowed = Some(TokenMask::ready(Some(Arc::from(vec![0b1010u32]))));
        let c = RowSampling { allowed: Some(TokenMask::ready(None)), ..RowSampling::greedy() };
        let p = pack(&[a, b, c], 70);
        assert_eq!(p.pen_tokens, vec![5, 9, 1]);
        assert_eq!(p.pen_counts, vec![2, 0, 1]);
        assert_eq!(p.pen_in_prompt, vec![1, 1, 0]);
        assert_eq!((p.bias_tokens.clone(), p.bias_values.clone()), (vec![3], vec![-1.5]));
        assert_eq!(p.ban_tokens, vec![2, 0]);
        // A one-word mask for 70 tokens: padded to three words, the rest disallowed.
        assert_eq!(p.mask_words, vec![0b1010, 0, 0]);
        let [r0, r1, r2] = [p.params[0], p.params[1], p.params[2]];
        assert_eq!((r0.pen_from, r0.pen_to, r0.bias_from, r0.bias_to, r0.ban_from, r0.ban_to, r0.mask_word), (0, 2, 0, 1, 0, 0, -1));
        assert_eq!((r1.pen_from, r1.pen_to, r1.bias_from, r1.bias_to, r1.ban_from, r1.ban_to, r1.mask_word), (2, 3, 1, 1, 0, 2, 0));
        assert_eq!((r2.pen_from, r2.pen_to, r2.mask_word), (3, 3, -1));
        assert_eq!((r0.logprobs, r1.logprobs), (20, -1));
        assert_eq!((r1.top_k, r1.seed, r1.position, r1.temperature), (40, 42, 17, 0.7));
        assert!(p.any_logprobs);
        assert!(!pack(&[RowSampling::greedy()], 10).any_logprobs);
    }

    #[test]
    fn answers_become_tokens_with_the_logprobs_asked_for() {
        let mut a = RowSampling::greedy();
        a.logprobs = Some(2);
        let p = pack(&[a, RowSampling::greedy()], 100);
        let mut ans = Answers {
            tokens: vec![7, 3],
            logprob: vec![-0.5, 0.0],
            rank: vec![1, 0],
            top_ids: vec![0; 2 * MAX_LOGPROBS as usize],
            top_logprobs: vec![0.0; 2 * MAX_LOGPROBS as usize],
        };
        ans.top_ids[..2].copy_from_slice(&[7, 8]);
        ans.top_logprobs[..2].copy_from_slice(&[-0.5, -1.25]);
        let out = unpack(&p.params, &ans);
        assert_eq!(out[0].token, 7);
        assert_eq!(out[0].logprob, Some(TokenLogprob { token: 7, logprob: -0.5, rank: 1, top: vec![(7, -0.5), (8, -1.25)] }));
        assert_eq!(out[1], SampledToken { token: 3, logprob: None });
    }
}
