//! Request-parameter validation, in vLLM's order and with vLLM's messages.

use std::fmt;

use ferry_transport::SamplingParams;
use ferry_transport::{MAX_LOGPROBS, MAX_N};

use super::is_greedy;

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
    if let Some(k) = p.prompt_logprobs {
        if k > MAX_LOGPROBS {
            return err(
                "prompt_logprobs",
                format!(
                    "Requested prompt logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"
                ),
            );
        }
    }
    validate_logit_bias(&p.logit_bias, vocab_size)?;
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


/// vLLM's `_validate_logit_bias`: every id inside the vocabulary; and, since
/// the map may come off a socket, each id once and each bias a number in
/// [-100, 100] (the gateway clamps to that range, as vLLM's protocol does).
fn validate_logit_bias(bias: &[(u32, f32)], vocab_size: usize) -> Result<(), ParamError> {
    let bad: Vec<u32> = bias.iter().map(|&(t, _)| t).filter(|&t| t as usize >= vocab_size).collect();
    if !bad.is_empty() {
        return err(
            "logit_bias",
            format!("token_id(s) {bad:?} in logit_bias contain out-of-vocab token ids. Vocabulary size: {vocab_size}"),
        );
    }
    if let Some(&(t, b)) = bias.iter().find(|&&(_, b)| !(-100.0..=100.0).contains(&b)) {
        return err("logit_bias", format!("logit_bias for token {t} must be in [-100, 100], got {}.", py_float(b)));
    }
    let mut ids: Vec<u32> = bias.iter().map(|&(t, _)| t).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return err("logit_bias", format!("logit_bias names token {} more than once.", w[0]));
    }
    Ok(())
}
