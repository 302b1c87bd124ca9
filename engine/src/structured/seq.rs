//! One sequence's constraint at run time: the llguidance matcher, the mask
//! for the next token, and what committing a sampled token means.

use llguidance::toktrie::SimpleVob;
use llguidance::Matcher;

use super::GrammarEnv;

/// A sequence's grammar state. It follows committed (sampled) tokens only, so
/// a sequence recomputed after preemption keeps the state it had.
pub struct SeqGrammar {
    matcher: Matcher,
    env: GrammarEnv,
    /// The mask for the next token, computed ahead by [`SeqGrammar::fill_mask`]
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

    /// Computes the mask for the next token, if not already done. Costly
    /// (tens of microseconds to milliseconds): the engine calls it off its
    /// critical path, in parallel with the forward pass.
    pub fn fill_mask(&mut self) {
        if self.mask.is_none() {
            self.mask = Some(self.matcher.compute_mask_or_eos().map_err(|e| e.to_string()));
        }
    }

    /// Sets the logits of every token the grammar forbids to -inf (ids beyond
    /// the tokenizer's vocabulary too). Where the grammar allows EOS, every
    /// end-of-generation id is allowed. Err: the mask could not be computed
    /// (the grammar is too complex for llguidance's limits, or broke).
    pub fn apply_mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.fill_mask();
        let mask = match self.mask.as_ref().expect("filled above") {
            Ok(m) => m,
            Err(e) => return Err(format!("structured output failed: {e}")),
        };
        let eos_allowed = mask.is_allowed(self.env.eos());
        // The raw logits of the end-of-generation ids, restored below where
        // the grammar allows EOS: which one the model ends with is its choice.
        let eog: Vec<(usize, f32)> = if eos_allowed {
            self.env.eog().iter().filter_map(|&t| logits.get(t as usize).map(|&l| (t as usize, l))).collect()
        } else {
            Vec::new()
        };
        let words = mask.as_slice();
        let n = logits.len().min(self.env.vocab_size());
        // 32 ids per mask word; all-allowed words are skipped.
        for (w, chunk) in logits[..n].chunks_mut(32).enumerate() {
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
        for l in &mut logits[n..] {
            *l = f32::NEG_INFINITY;
        }
        for (t, l) in eog {
            logits[t] = l;
        }
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

    /// Whether the output so far is a complete member of the language.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}
