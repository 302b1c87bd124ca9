//! One sequence's constraint at run time: the llguidance matcher, the mask
//! for the next token, and what committing a sampled token means.

use std::sync::Arc;

use llguidance::toktrie::SimpleVob;
use llguidance::Matcher;

use super::GrammarEnv;

/// A sequence's grammar state. It follows committed (sampled) tokens only, so
/// a sequence recomputed after preemption keeps the state it had.
pub struct SeqGrammar {
    matcher: Matcher,
    env: GrammarEnv,
    /// The mask for the next token, computed ahead by [`SeqGrammar::mask_words`]
    /// (possibly on another thread while the model runs).
    mask: Option<Result<SimpleVob, String>>,
}

/// What committing a token did to the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// More tokens may follow.
    Continue,
    /// The output is complete and nothing else may follow: stop the sequence.
    Finished,
    /// The token broke the grammar (only possible when no mask was applied).
    Rejected(String),
}

impl SeqGrammar {
    pub(super) fn new(matcher: Matcher, env: &GrammarEnv) -> SeqGrammar {
        SeqGrammar { matcher, env: env.clone(), mask: None }
    }

    /// An independent copy in the same state (one per completion of a request).
    pub fn fork(&self) -> SeqGrammar {
        SeqGrammar { matcher: self.matcher.deep_clone(), env: self.env.clone(), mask: None }
    }

    /// The mask for the next token in vLLM's bitmask layout (see
    /// `crate::backend::TokenMask`): the ids the grammar allows, ids beyond
    /// the tokenizer's vocabulary not, and every end-of-generation id where
    /// the grammar allows EOS (which one the model ends with is its choice).
    /// Costly (tens of microseconds to milliseconds): the engine calls it off
    /// its critical path, in parallel with the forward pass. Err: the mask
    /// could not be computed (the grammar is too complex for llguidance's
    /// limits, or broke).
    pub fn mask_words(&mut self) -> Result<Arc<[u32]>, String> {
        if self.mask.is_none() {
            self.mask = Some(self.matcher.compute_mask_or_eos().map_err(|e| e.to_string()));
        }
        let mask = match self.mask.as_ref().expect("filled above") {
            Ok(m) => m,
            Err(e) => return Err(format!("structured output failed: {e}")),
        };
        let vocab = self.env.vocab_size();
        let mut words: Vec<u32> = mask.as_slice().iter().copied().take(vocab.div_ceil(32)).collect();
        words.resize(vocab.div_ceil(32), 0);
        if !vocab.is_multiple_of(32) {
            if let Some(last) = words.last_mut() {
                *last &= (1u32 << (vocab % 32)) - 1;
            }
        }
        if mask.is_allowed(self.env.eos()) {
            for &t in self.env.eog() {
                let w = t as usize / 32;
                if words.len() <= w {
                    words.resize(w + 1, 0);
                }
                words[w] |= 1 << (t % 32);
            }
        }
        Ok(words.into())
    }

    /// Sets the logits of every token the grammar forbids to -inf (what a
    /// backend does with [`Self::mask_words`]).
    pub fn apply_mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let words = self.mask_words()?;
        crate::sampler::apply_allowed(logits, &words);
        Ok(())
    }

    /// Follows a sampled token. End-of-generation ids are not fed to the
    /// matcher: they end the sequence by the usual stop rules, and under
    /// `ignore_eos` the grammar simply stays where it was.
    pub fn commit(&mut self, token: u32) -> Commit {
        self.mask = None;
        if self.env.eog().contains(&token) {
            return Commit::Continue;
        }
        if let Err(e) = self.matcher.consume_token(token) {
            return Commit::Rejected(format!("structured output: token {token} breaks the constraint: {e}"));
        }
        if self.matcher.is_stopped() {
            Commit::Finished
        } else {
            Commit::Continue
        }
    }

    /// How many of `draft`'s tokens, from the first, the grammar allows in
    /// turn (speculative decoding verifies only those); an end-of-generation
    /// id ends the count, as the state it leads to is the sequence's end.
    pub fn valid_draft_len(&mut self, draft: &[u32]) -> usize {
        let upto = draft.iter().position(|t| self.env.eog().contains(t)).unwrap_or(draft.len());
        if upto == 0 {
            return 0;
        }
        self.matcher.validate_tokens(&draft[..upto]).unwrap_or(0)
    }

    /// The masks of a verify pass: the next token's ([`Self::mask_words`]),
    /// then the one after each of `draft`'s tokens in turn, `draft.len() + 1`
    /// in all. The state is as before when it returns (the draft tokens are
    /// rolled back); `draft` must be allowed ([`Self::valid_draft_len`]).
    pub fn masks_along(&mut self, draft: &[u32]) -> Result<Vec<Arc<[u32]>>, String> {
        let mut masks = Vec::with_capacity(draft.len() + 1);
        masks.push(self.mask_words()?);
        if draft.is_empty() {
            return Ok(masks);
        }
        let mut consumed = 0;
        let mut failed = None;
        for &t in draft {
            self.mask = None;
            if let Err(e) = self.matcher.consume_token(t) {
                failed = Some(format!("structured output: proposed token {t} breaks the constraint: {e}"));
                break;
            }
            consumed += 1;
            match self.mask_words() {
                Ok(m) => masks.push(m),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.mask = None;
        if consumed > 0 {
            self.matcher.rollback(consumed).map_err(|e| format!("structured output: cannot roll back proposed tokens: {e}"))?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(masks),
        }
    }

    /// Whether the output so far is a complete member of the language.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}
