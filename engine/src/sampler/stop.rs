//! Stop conditions the engine checks on each sampled token.

use ferry_transport::{FinishReason, SamplingParams};

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

