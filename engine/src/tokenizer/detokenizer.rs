//! Streaming detokenization with the prefix/read-offset method of vLLM and
//! TGI: each step decodes only a short window of recent tokens twice (up to
//! the last emitted point, and through the new token) and emits the
//! difference, holding text back while it ends in an incomplete UTF-8
//! character. Work per token is O(window), never a full re-decode.

use std::sync::Arc;

use super::Tokenizer;

/// How many context tokens `with_context` keeps before the first new token,
/// so a SentencePiece "▁word" continuing a prompt decodes with its space.
const CONTEXT_TOKENS: usize = 5;

/// One sequence's output text, token by token: each [`Self::push`] returns the
/// text that token completes; the pieces and [`Self::finish`]'s remainder,
/// joined, are what decoding all the tokens at once gives (vLLM's
/// incremental detokenizer).
pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    /// Tokens from `prefix_offset` on; earlier ones are dropped.
    window: Vec<u32>,
    /// `window[..read]` was already emitted (its text is the prefix text).
    read: usize,
}

impl IncrementalDetokenizer {
    /// A detokenizer with no context: the first token decodes as at the start
    /// of a text. `skip_special_tokens` leaves special tokens out of the text.
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special_tokens: bool) -> Self {
        IncrementalDetokenizer { tokenizer, skip_special_tokens, window: Vec::new(), read: 0 }
    }

    /// Starts after `context` (the prompt): its text is not emitted, but its
    /// last tokens are kept so the first new token decodes as it would
    /// inside the whole text.
    pub fn with_context(tokenizer: Arc<Tokenizer>, skip_special_tokens: bool, context: &[u32]) -> Self {
        let keep = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        IncrementalDetokenizer {
            tokenizer,
            skip_special_tokens,
            window: keep.to_vec(),
            read: keep.len(),
        }
    }

    fn text(&self, tokens: &[u32]) -> String {
        // Ids come from the model, whose vocabulary this is; an id outside it
        // decodes to nothing rather than failing the stream.
        let filtered: Vec<u32>;
        let tokens = if tokens.iter().any(|&t| t as usize >= self.tokenizer.vocab_size()) {
            filtered = tokens.iter().copied().filter(|&t| (t as usize) < self.tokenizer.vocab_size()).collect();
            &filtered
        } else {
            tokens
        };
        self.tokenizer.decode(tokens, self.skip_special_tokens).unwrap_or_default()
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, token: u32) -> String {
        self.window.push(token);
        let prefix = self.text(&self.window[..self.read]);
        let full = self.text(&self.window);
        // Wait while the text ends in a partial character (decoded as U+FFFD)
        // or the token added nothing visible yet.
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return String::new();
        }
        let new = diff(&prefix, &full);
        // The emitted window becomes the next prefix.
        self.window.drain(..self.read);
        self.read = self.window.len();
        new
    }

    /// Flushes what is held back (a trailing partial character comes out as
    /// U+FFFD, as in a full decode) and starts over.
    pub fn finish(&mut self) -> String {
        let prefix = self.text(&self.window[..self.read]);
        let full = self.text(&self.window);
        let out = if full.len() > prefix.len() { diff(&prefix, &full) } else { String::new() };
        self.window.clear();
        self.read = 0;
        out
    }
}

/// The part of `full` after `prefix`. The prefix ends on a complete
/// character, so `full` normally starts with it; otherwise fall back to the
/// longest common prefix on a character boundary.
fn diff(prefix: &str, full: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_owned();
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(full.len()), |((i, _), _)| i);
    full[common..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_falls_back_on_char_boundary() {
        assert_eq!(diff("ab", "abc"), "c");
        assert_eq!(diff("a\u{FFFD}", "aé!"), "é!");
        assert_eq!(diff("", "x"), "x");
    }
}
