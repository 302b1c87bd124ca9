//! What both endpoints' logprobs share: a token's text as the client sees it
//! and the number JSON can carry for -inf.

use super::fe::tokenizer::Tokenizer;

/// One token's text, special tokens included.
pub fn token_text(tok: &Tokenizer, t: u32) -> String {
    tok.decode(&[t], false).unwrap_or_default()
}

/// JSON has no -inf; OpenAI (and vLLM) send -9999.0.
pub fn clamp_lp(lp: f32) -> f32 {
    if lp.is_nan() {
        -9999.0
    } else {
        lp.max(-9999.0)
    }
}
