//! What both endpoints' logprobs share: a token's text as the client sees it
//! and the number JSON can carry for -inf.

use ferry_engine::tokenizer::Tokenizer;
use ferry_transport::TokenLogprob;

/// One token's text, special tokens included.
pub(crate) fn token_text(tok: &Tokenizer, t: u32) -> String {
    tok.decode(&[t], false).unwrap_or_default()
}

/// JSON has no -inf; OpenAI (and vLLM) send -9999.0.
pub(crate) fn clamp_lp(lp: f32) -> f32 {
    if lp.is_nan() {
        -9999.0
    } else {
        lp.max(-9999.0)
    }
}

/// vLLM's `prompt_logprobs`: null for the first prompt token (nothing
/// predicts it), then for each later one a map from token id to
/// `{logprob, rank, decoded_token}` holding the prompt's own token and the
/// best alternatives asked for.
pub(crate) fn vllm_prompt_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Vec<Option<serde_json::Map<String, serde_json::Value>>> {
    let entry = |t: u32, lp: f32, rank: u32| {
        serde_json::json!({"logprob": clamp_lp(lp), "rank": rank, "decoded_token": token_text(tok, t)})
    };
    let mut out = Vec::with_capacity(lps.len() + 1);
    out.push(None);
    for l in lps {
        let mut m = serde_json::Map::new();
        m.insert(l.token.to_string(), entry(l.token, l.logprob, l.rank));
        for (i, &(t, lp)) in l.top.iter().enumerate() {
            m.entry(t.to_string()).or_insert_with(|| entry(t, lp, i as u32 + 1));
        }
        out.push(Some(m));
    }
    out
}
