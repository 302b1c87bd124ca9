//! Text ⇄ token ids for the gateway: encoding, decoding, the chat template,
//! end-of-generation tokens and incremental detokenization.
//!
//! Built from a GGUF file's metadata (`gguf_vocab`) or from a Hugging Face
//! folder (`hf_dir`). Encoding runs on the `tokenizers` crate; decoding is
//! done here from a per-token byte table (`pieces`), so that a token's bytes
//! are exact even when it holds part of a UTF-8 character, and so that
//! decoding a sequence is the same as concatenating the bytes of its parts —
//! which is what makes the incremental detokenizer agree with a full decode.

mod chat_template;
mod detokenizer;
mod eog;
mod gguf_vocab;
mod hf_dir;
mod pieces;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub use chat_template::{ChatMessage, RenderOptions};
pub use detokenizer::IncrementalDetokenizer;

use chat_template::ChatTemplate;
use pieces::PieceTable;

/// Why a tokenizer could not be built or used. Displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The model's tokenizer description is missing, malformed or unsupported.
    #[error("{0}")]
    Load(String),
    /// The wrapped Hugging Face tokenizer could not encode the text; its message.
    #[error("tokenization failed: {0}")]
    Encode(String),
    /// Ids that cannot be turned back into text (an id outside the vocabulary).
    #[error("detokenization failed: {0}")]
    Decode(String),
    /// A chat request for a model that ships no chat template, with none given.
    #[error("the model has no chat template")]
    NoChatTemplate,
    /// The chat template failed to compile or to render (including
    /// `raise_exception` calls made by the template itself).
    #[error("chat template: {0}")]
    Template(String),
}

/// A model's tokenizer. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pieces: PieceTable,
    /// Tokens dropped by `decode(.., skip_special_tokens = true)`.
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// When true, BOS/EOS are added here per `add_bos`/`add_eos`; when false
    /// the wrapped tokenizer's own post-processor decides (HF folders whose
    /// config does not say).
    manual_specials: bool,
    add_bos: bool,
    add_eos: bool,
    eog: Vec<u32>,
    chat: Option<ChatTemplate>,
    /// The special tokens' texts, for templates sent with a request.
    bos_text: String,
    eos_text: String,
    /// Unique among the tokenizers this process builds (see [`Tokenizer::id`]).
    id: u64,
}

/// Everything a loader hands over to assemble a `Tokenizer`.
struct Parts {
    inner: tokenizers::Tokenizer,
    pieces: PieceTable,
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    manual_specials: bool,
    add_bos: bool,
    add_eos: bool,
    eog: Vec<u32>,
    chat_template: Option<String>,
    bos_text: String,
    eos_text: String,
}

impl Tokenizer {
    /// The tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(g: &crate::model::gguf::GgufFile) -> Result<Tokenizer, TokenizerError> {
        Self::assemble(gguf_vocab::build(g)?)
    }

    /// A Hugging Face folder: `tokenizer.json`, plus `tokenizer_config.json`
    /// and `generation_config.json` when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        Self::assemble(hf_dir::build(dir)?)
    }

    fn assemble(p: Parts) -> Result<Tokenizer, TokenizerError> {
        let chat = match p.chat_template {
            Some(src) => Some(ChatTemplate::new(src, p.bos_text.clone(), p.eos_text.clone())?),
            None => None,
        };
        Ok(Tokenizer {
            inner: p.inner,
            pieces: p.pieces,
            special: p.special,
            bos: p.bos,
            eos: p.eos,
            manual_specials: p.manual_specials,
            add_bos: p.add_bos,
            add_eos: p.add_eos,
            eog: p.eog,
            chat,
            bos_text: p.bos_text,
            eos_text: p.eos_text,
            id: {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
        })
    }

    /// Token ids for `text`. Special tokens written in the text (such as
    /// `<|im_start|>`) always become their single ids. With
    /// `add_special_tokens`, BOS (and EOS) are added when the model asks for it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let hf_specials = add_special_tokens && !self.manual_specials;
        let enc = self
            .inner
            .encode_fast(text, hf_specials)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = enc.get_ids();
        if !(add_special_tokens && self.manual_specials) {
            return Ok(ids.to_vec());
        }
        let mut out = Vec::with_capacity(ids.len() + 2);
        if self.add_bos {
            out.extend(self.bos);
        }
        out.extend_from_slice(ids);
        if self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Text for `ids`. Bytes that do not form valid UTF-8 become U+FFFD.
    /// Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let bytes = self.decode_bytes(ids, skip_special_tokens)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The raw bytes `ids` stand for.
    pub fn decode_bytes(&self, ids: &[u32], skip_special_tokens: bool) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::new();
        let mut first = true;
        for &id in ids {
            let piece = self
                .pieces
                .get(id)
                .ok_or_else(|| TokenizerError::Decode(format!("token id {id} is outside the vocabulary of {}", self.vocab_size())))?;
            if skip_special_tokens && self.is_special(id) {
                continue;
            }
            // SentencePiece models drop the space their encoder put in front
            // of the text (HF's Strip decoder; llama.cpp's remove_space).
            let piece = if first && self.pieces.strip_leading_space() {
                piece.strip_prefix(b" ").unwrap_or(piece)
            } else {
                piece
            };
            first = false;
            out.extend_from_slice(piece);
        }
        Ok(out)
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The id of a vocabulary entry, in the vocabulary's own spelling (for
    /// byte-level BPE, " the" is spelled "Ġthe"); added tokens by their text.
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The vocabulary entry for `id`, as `token_to_id` spells it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The text a single token stands for (" Paris", "\n"); a token holding
    /// part of a UTF-8 character gives U+FFFD.
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        self.pieces.get(id).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// The exact bytes of a single token.
    pub fn id_to_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id)
    }

    /// The beginning-of-sequence token (GGUF `tokenizer.ggml.bos_token_id`, or
    /// the folder's `bos_token`), if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the model names one; the tokens that end
    /// generation are [`Self::eog_token_ids`], which include it.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Tokens that end generation, sorted: EOS, end-of-turn tokens found as
    /// llama.cpp finds them, and generation_config's eos ids.
    pub fn eog_token_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` is one of [`Self::eog_token_ids`].
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Control tokens: dropped when decoding with `skip_special_tokens`.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// This tokenizer's identity, unique among the tokenizers this process
    /// builds (a tokenizer is never cloned): what a cache of something derived
    /// from its vocabulary keys on, so that everyone holding this tokenizer
    /// shares one copy.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The model's own chat template (Jinja source), if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat.as_ref().map(chat_template::ChatTemplate::source)
    }

    /// The prompt text for a conversation, rendered as Hugging Face
    /// transformers renders the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.render_chat(messages, &RenderOptions { add_generation_prompt, ..Default::default() }, None)
    }

    /// `apply_chat_template` with every option a request may set; `template`
    /// replaces the model's own for this one render (bounded, since it comes
    /// from a client).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
        template: Option<&str>,
    ) -> Result<String, TokenizerError> {
        match template {
            Some(src) => ChatTemplate::untrusted(src.to_string(), self.bos_text.clone(), self.eos_text.clone())?.render(messages, opts),
            None => self.chat.as_ref().ok_or(TokenizerError::NoChatTemplate)?.render(messages, opts),
        }
    }
}

/// The path of the real model for tests, or None (with a notice) when absent.
#[cfg(test)]
pub(crate) fn test_model_path() -> Option<std::path::PathBuf> {
    let p = std::env::var("FERRY_TEST_MODEL")
        .unwrap_or_else(|_| "/work/cache/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let p = std::path::PathBuf::from(p);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: test model {} not found (set FERRY_TEST_MODEL)", p.display());
        None
    }
}

#[cfg(test)]
mod tests;
