//! The model's vocabulary as llguidance sees it: a token trie over each
//! token's exact bytes, and the parser factory built on it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::ParserFactory;

use crate::tokenizer::Tokenizer;

/// What compiling and running constraints needs of a model. Cheap to clone.
#[derive(Clone)]
pub struct GrammarEnv {
    inner: Arc<Inner>,
}

struct Inner {
    factory: ParserFactory,
    /// Every end-of-generation id: all are allowed where the grammar allows EOS.
    eog: Vec<u32>,
    /// The id llguidance's masks use for EOS.
    eos: u32,
    vocab_size: usize,
}

impl GrammarEnv {
    /// From each token's bytes (`words[id]`), which ids are control tokens,
    /// the EOS id llguidance reports in masks, and every end-of-generation id.
    pub fn from_vocab(words: Vec<Vec<u8>>, special: &[bool], eos: u32, eog: Vec<u32>) -> Result<GrammarEnv, String> {
        // llguidance marks special tokens with a leading 0xFF byte, so grammars
        // never match their text as ordinary bytes.
        let words: Vec<Vec<u8>> = words
            .into_iter()
            .enumerate()
            .map(|(id, w)| {
                if special.get(id).copied().unwrap_or(false) {
                    let mut m = Vec::with_capacity(w.len() + 1);
                    m.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    m.extend_from_slice(&w);
                    m
                } else {
                    w
                }
            })
            .collect();
        let vocab_size = words.len();
        if (eos as usize) >= vocab_size {
            return Err(format!("EOS id {eos} is outside the vocabulary of {vocab_size}"));
        }
        let mut eog = eog;
        if !eog.contains(&eos) {
            eog.push(eos);
        }
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        // Greedy tokenization over the trie: llguidance uses it only for
        // forced prefixes, which this engine does not take.
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("structured outputs: {e}"))?;
        // Log nothing to stderr: errors come back as values.
        factory.quiet();
        Ok(GrammarEnv { inner: Arc::new(Inner { factory, eog, eos, vocab_size }) })
    }

    /// The environment for a model's tokenizer.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<GrammarEnv, String> {
        let n = tok.vocab_size();
        let words = (0..n as u32).map(|id| tok.id_to_bytes(id).unwrap_or_default().to_vec()).collect();
        let special: Vec<bool> = (0..n as u32).map(|id| tok.is_special(id)).collect();
        let eog = tok.eog_token_ids().to_vec();
        let eos = tok.eos_token_id().or_else(|| eog.first().copied()).ok_or("the model has no EOS token")?;
        GrammarEnv::from_vocab(words, &special, eos, eog)
    }

    /// The environment for `tok`: the one already built for this tokenizer
    /// while anyone still holds it (the gateway's validation and the
    /// in-process engines share one), else built now. Holders keep it alive;
    /// the cache remembers it only weakly, so it goes with its last holder.
    pub fn cached(tok: &Tokenizer) -> Result<GrammarEnv, String> {
        static LIVE: Mutex<BTreeMap<u64, Weak<Inner>>> = Mutex::new(BTreeMap::new());
        let mut live = LIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(inner) = live.get(&tok.id()).and_then(Weak::upgrade) {
            return Ok(GrammarEnv { inner });
        }
        live.retain(|_, env| env.strong_count() > 0);
        // Built under the lock, so two first users of one tokenizer build it
        // once; a process builds few tokenizers, so none waits on another's.
        let env = GrammarEnv::from_tokenizer(tok)?;
        live.insert(tok.id(), Arc::downgrade(&env.inner));
        Ok(env)
    }

    pub(super) fn factory(&self) -> &ParserFactory {
        &self.inner.factory
    }

    pub(super) fn eos(&self) -> u32 {
        self.inner.eos
    }

    pub(super) fn eog(&self) -> &[u32] {
        &self.inner.eog
    }

    /// Token ids the grammar knows: ids at or above this are never allowed.
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }
}

