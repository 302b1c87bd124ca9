//! Builds a tokenizer from GGUF `tokenizer.*` metadata the way llama.cpp's
//! llama-vocab.cpp reads it.
//!
//! - `gpt2`: byte-level BPE from tokens + merges, with the pre-tokenizer
//!   regexes llama.cpp picks for `tokenizer.ggml.pre` (each regex splits the
//!   pieces left by the previous one; unmatched gaps stay pieces).
//! - `llama`: SentencePiece BPE, built as HF's LlamaConverter does: spaces
//!   become '▁' (plus one in front when add_space_prefix), merges derived from
//!   the vocabulary and scores (higher score merges first), `<0xXX>` byte
//!   fallback for anything not in the vocabulary.
//!
//! Token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
//! 6 byte. Control, unknown and user-defined tokens match whole in the text.

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::eog::{eog_ids, KnownIds};
use super::pieces::{PieceKind, PieceTable};
use super::{Parts, TokenizerError};
use crate::model::gguf::{GgufFile, MetaValue};

const TT_NORMAL: i64 = 1;
const TT_UNKNOWN: i64 = 2;
const TT_CONTROL: i64 = 3;
const TT_USER_DEFINED: i64 = 4;
const TT_BYTE: i64 = 6;

// llama.cpp's pre-tokenizer regexes (llama-vocab.cpp, llm_tokenizer_bpe).
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes for a `tokenizer.ggml.pre` value.
struct PreTok {
    regexes: &'static [&'static str],
    /// Whole pre-tokenized words that are in the vocabulary skip the merges.
    ignore_merges: bool,
    /// Adds BOS unless the metadata says otherwise.
    add_bos: bool,
}

/// Every `tokenizer.ggml.pre` value [`pre_tokenizer_for`] accepts, for the
/// refusal of any other (a test keeps the two in step).
const PRE_NAMES: &[&str] = &[
    "default", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
    "smaug-bpe", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
    "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "starcoder", "refact", "command-r", "smollm",
    "codeshell", "exaone", "minerva-7b", "qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan", "falcon",
];

fn pre_tokenizer_for(pre: &str) -> Option<PreTok> {
    let p = |regexes, ignore_merges, add_bos| Some(PreTok { regexes, ignore_merges, add_bos });
    match pre {
        "default" => p(
            &[
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
            p(&[RE_LLAMA3], true, true)
        }
        "dbrx" | "smaug-bpe" => p(&[RE_LLAMA3], false, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0"
        | "mellum" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => p(&[RE_GPT2], false, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            p(&[r"\p{N}", RE_GPT2], false, false)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" | "hunyuan" => p(&[RE_QWEN2], false, false),
        "falcon" => p(
            &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"],
            false,
            false,
        ),
        _ => None,
    }
}

fn load_err(g: &GgufFile, msg: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Load(format!("{}: tokenizer: {msg}", g.path().display()))
}

fn string_array(g: &GgufFile, key: &str) -> Result<Option<Vec<String>>, TokenizerError> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let arr = v
        .as_array()
        .ok_or_else(|| load_err(g, format!("{key} is not an array")))?;
    arr.iter()
        .map(|x| x.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .map(Some)
        .ok_or_else(|| load_err(g, format!("{key} holds a non-string")))
}

fn number_array<T>(
    g: &GgufFile,
    key: &str,
    n: usize,
    conv: impl Fn(&MetaValue) -> Option<T>,
) -> Result<Option<Vec<T>>, TokenizerError> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let arr = v
        .as_array()
        .ok_or_else(|| load_err(g, format!("{key} is not an array")))?;
    if arr.len() != n {
        return Err(load_err(g, format!("{key} has {} entries for {n} tokens", arr.len())));
    }
    arr.iter()
        .map(conv)
        .collect::<Option<Vec<_>>>()
        .map(Some)
        .ok_or_else(|| load_err(g, format!("{key} holds a value of the wrong type")))
}

/// A token id from metadata, ignored (as llama.cpp does) when out of range.
fn token_id(g: &GgufFile, key: &str, n: usize) -> Option<u32> {
    g.get_u64(key).filter(|&v| (v as usize) < n).map(|v| v as u32)
}

pub(super) fn build(g: &GgufFile) -> Result<Parts, TokenizerError> {
    let model = g
        .get_str("tokenizer.ggml.model")
        .ok_or_else(|| load_err(g, "no tokenizer.ggml.model in the metadata"))?;
    let tokens = string_array(g, "tokenizer.ggml.tokens")?
        .filter(|t| !t.is_empty())
        .ok_or_else(|| load_err(g, "no tokenizer.ggml.tokens in the metadata"))?;
    let n = tokens.len();
    if n > u32::MAX as usize {
        return Err(load_err(g, "vocabulary too large"));
    }
    let types = number_array(g, "tokenizer.ggml.token_type", n, super::super::model::gguf::MetaValue::as_i64)?
        .unwrap_or_else(|| vec![TT_NORMAL; n]);
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(load_err(
                g,
                format!("tokenizer model '{other}' is not supported (gpt2 and llama are)"),
            ))
        }
    };

    // Special ids. llama.cpp defaults SentencePiece vocabularies to
    // <unk>=0, <s>=1, </s>=2; BPE ones have no defaults worth keeping.
    let default = |id: u32| if spm && (id as usize) < n { Some(id) } else { None };
    let bos = token_id(g, "tokenizer.ggml.bos_token_id", n).or(default(1));
    let eos = token_id(g, "tokenizer.ggml.eos_token_id", n).or(default(2));
    let unk = token_id(g, "tokenizer.ggml.unknown_token_id", n).or(default(0));

    let pre = if spm {
        None
    } else {
        let name = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        Some(pre_tokenizer_for(name).ok_or_else(|| {
            load_err(
                g,
                format!(
                    "pre-tokenizer '{name}' (metadata key tokenizer.ggml.pre) is not supported (ferry knows {})",
                    PRE_NAMES.join(", ")
                ),
            )
        })?)
    };
    let add_bos = g
        .get_bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(spm || pre.as_ref().is_some_and(|p| p.add_bos));
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
    let add_space_prefix = spm && g.get_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);

    let known = KnownIds {
        eos,
        eot: token_id(g, "tokenizer.ggml.eot_token_id", n),
        eom: token_id(g, "tokenizer.ggml.eom_token_id", n),
        fim_pad: token_id(g, "tokenizer.ggml.fim_pad_token_id", n),
        fim_rep: token_id(g, "tokenizer.ggml.fim_rep_token_id", n),
        fim_sep: token_id(g, "tokenizer.ggml.fim_sep_token_id", n),
        extra: Vec::new(),
    };
    let eog = eog_ids(tokens.iter().enumerate().map(|(i, t)| (i as u32, t.as_str())), &known);

    // Control-like tokens: the typed ones, plus the ids llama.cpp forces to
    // control (end-of-generation tokens) and BOS/EOS.
    let mut special: Vec<bool> = types.iter().map(|&t| t == TT_CONTROL || t == TT_UNKNOWN).collect();
    for id in eog.iter().copied().chain(bos).chain(eos) {
        special[id as usize] = true;
    }
    let user_defined: Vec<bool> = types.iter().map(|&t| t == TT_USER_DEFINED).collect();

    let mut pieces = PieceTable::new(add_space_prefix);
    for (i, t) in tokens.iter().enumerate() {
        let kind = if special[i] || user_defined[i] {
            PieceKind::Raw
        } else if spm {
            PieceKind::SentencePiece
        } else {
            PieceKind::ByteLevel
        };
        pieces.push(t, kind);
    }

    let mut inner = if spm {
        let scores = number_array(g, "tokenizer.ggml.scores", n, super::super::model::gguf::MetaValue::as_f32)?
            .unwrap_or_else(|| vec![0.0; n]);
        spm_tokenizer(&tokens, &types, &scores, unk, add_space_prefix).map_err(|e| load_err(g, e))?
    } else {
        let merges = string_array(g, "tokenizer.ggml.merges")?
            .ok_or_else(|| load_err(g, "no tokenizer.ggml.merges for a gpt2 tokenizer"))?;
        let pre = pre.expect("set for gpt2 above");
        bpe_tokenizer(&tokens, &merges, &pre).map_err(|e| load_err(g, e))?
    };

    // Control and user-defined tokens match whole in text, before any
    // normalization (llama.cpp's tokenizer_st_partition).
    let added: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|&(i, t)| (special[i] || user_defined[i]) && !t.is_empty())
        .map(|(i, t)| AddedToken::from(t.clone(), special[i]).normalized(false))
        .collect();
    inner.add_special_tokens(&added);

    let text_of = |id: Option<u32>| id.map(|i| tokens[i as usize].clone()).unwrap_or_default();
    Ok(Parts {
        inner,
        pieces,
        special,
        bos,
        eos,
        manual_specials: true,
        add_bos: add_bos && bos.is_some(),
        add_eos: add_eos && eos.is_some(),
        eog,
        chat_template: g.get_str("tokenizer.chat_template").map(str::to_owned),
        bos_text: text_of(bos),
        eos_text: text_of(eos),
    })
}

fn bpe_tokenizer(tokens: &[String], merges: &[String], pre: &PreTok) -> Result<tokenizers::Tokenizer, String> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut pairs = Vec::with_capacity(merges.len());
    for m in merges {
        // Split at the first space after the first byte, as llama.cpp does.
        let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
            continue;
        };
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        // A merge whose parts or result are not tokens can never apply in
        // llama.cpp either; the BPE builder would refuse it.
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}")) {
            pairs.push((a.to_owned(), b.to_owned()));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| format!("cannot build BPE: {e}"))?;
    let mut seq: Vec<PreTokenizerWrapper> = Vec::new();
    for re in pre.regexes {
        let split = Split::new(SplitPattern::Regex((*re).to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| format!("bad pre-tokenizer regex {re:?}: {e}"))?;
        seq.push(split.into());
    }
    seq.push(ByteLevel::new(false, false, false).into());
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(PreSequence::new(seq)));
    Ok(t)
}

fn spm_tokenizer(
    tokens: &[String],
    types: &[i64],
    scores: &[f32],
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, String> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    // Pieces that take part in merges: normal and user-defined text, not
    // control, unknown or byte tokens.
    let mergeable = |id: u32| {
        let t = types[id as usize];
        t != TT_CONTROL && t != TT_UNKNOWN && t != TT_BYTE
    };
    let ids: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .filter(|&(i, _)| mergeable(i as u32))
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    // HF's SentencePieceExtractor: every split of a piece into two pieces is a
    // merge; merges are ranked by the merged piece's score, highest first,
    // ties in vocabulary order, then by the parts' ids.
    let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if !mergeable(i as u32) || vocab.get(piece) != Some(&(i as u32)) {
            continue;
        }
        let mut local: Vec<(u32, u32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(k, _)| Some((*ids.get(&piece[..k])?, *ids.get(&piece[k..])?)))
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (scores[i], i as u32, l, r)));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let pairs: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(tokens[u as usize].clone());
    }
    let bpe = builder.build().map_err(|e| format!("cannot build BPE: {e}"))?;
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norms.push(Prepend::new("▁".into()).into());
    }
    norms.push(Replace::new(" ", "▁").map_err(|e| e.to_string())?.into());
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_normalizer(Some(NormSequence::new(norms)));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::super::Tokenizer;
    use crate::model::gguf::{GgufFile, GgufWriter, MetaValue};

    fn strings(v: &[&str]) -> MetaValue {
        MetaValue::Array(v.iter().map(|s| MetaValue::String((*s).into())).collect())
    }

    /// A tiny SentencePiece vocabulary with byte fallback, written as GGUF.
    fn tiny_spm(add_space_prefix: bool) -> Tokenizer {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0f32, 0.0, 0.0];
        for b in 0..=255u32 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        // Pieces with scores: higher merges first.
        let pieces: &[(&str, f32)] = &[
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("ll", -3.0),
            ("he", -4.0),
            ("hell", -5.0),
            ("hello", -6.0),
            ("▁hello", -7.0),
            ("▁w", -8.0),
            ("or", -9.0),
            ("▁wor", -10.0),
            ("<|user|>", 0.0),
        ];
        for (p, s) in pieces {
            tokens.push((*p).into());
            types.push(if *p == "<|user|>" { 4 } else { 1 });
            scores.push(*s);
        }
        let mut w = GgufWriter::new();
        w.add_metadata("tokenizer.ggml.model", MetaValue::String("llama".into()))
            .add_metadata("tokenizer.ggml.tokens", strings(&tokens.iter().map(std::string::String::as_str).collect::<Vec<_>>()))
            .add_metadata("tokenizer.ggml.scores", MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()))
            .add_metadata("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()))
            .add_metadata("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .add_metadata("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
            .add_metadata("tokenizer.ggml.add_space_prefix", MetaValue::Bool(add_space_prefix));
        let dir = std::env::temp_dir().join(format!("ferry-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("spm-{add_space_prefix}.gguf"));
        w.write(&path).unwrap();
        Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
    }

    #[test]
    fn tiny_sentencepiece_encodes_and_decodes() {
        let t = tiny_spm(true);
        let id = |s: &str| t.token_to_id(s).unwrap();
        let byte = |b: u8| 3 + b as u32;
        // "hello world": prefix space → "▁hello▁world". Merges by score:
        // ▁hello is one piece; "▁world" becomes ▁wor + l + d.
        let ids = t.encode("hello world", true).unwrap();
        assert_eq!(ids, vec![1, id("▁hello"), id("▁wor"), id("l"), id("d")]);
        assert_eq!(t.decode(&ids, true).unwrap(), "hello world");
        assert_eq!(t.decode(&ids, false).unwrap(), "<s> hello world");
        // Characters not in the vocabulary fall back to bytes: "é" = C3 A9,
        // "€" = E2 82 AC; "x" is not a piece either.
        let ids = t.encode("hé€x", false).unwrap();
        assert_eq!(
            ids,
            vec![id("▁"), id("h"), byte(0xC3), byte(0xA9), byte(0xE2), byte(0x82), byte(0xAC), byte(b'x')]
        );
        assert_eq!(t.decode(&ids, false).unwrap(), "hé€x");
        // User-defined and control tokens match whole; the prefix space is
        // added again after them, as llama.cpp does.
        let ids = t.encode("<s>hello<|user|>hello", false).unwrap();
        assert_eq!(ids, vec![1, id("▁hello"), id("<|user|>"), id("▁hello")]);
        assert_eq!(t.decode(&ids, true).unwrap(), "hello<|user|> hello");
        assert!(t.is_special(1) && !t.is_special(id("<|user|>")));
        assert_eq!(t.bos_token_id(), Some(1));
        assert_eq!(t.eog_token_ids(), &[2]);
        assert_eq!(t.id_to_piece(id("▁hello")).as_deref(), Some(" hello"));

        let t = tiny_spm(false);
        let ids = t.encode("hello", false).unwrap();
        assert_eq!(ids, vec![t.token_to_id("hello").unwrap()]);
        assert_eq!(t.decode(&ids, false).unwrap(), "hello");
    }

    #[test]
    fn incremental_matches_full_on_byte_fallback() {
        use super::super::IncrementalDetokenizer;
        let t = std::sync::Arc::new(tiny_spm(true));
        let text = "hello wörld ✓ 中文 hello";
        let ids = t.encode(text, true).unwrap();
        assert_eq!(t.decode(&ids, true).unwrap(), text);
        let mut d = IncrementalDetokenizer::new(t.clone(), true);
        let mut out = String::new();
        for &id in &ids {
            let s = d.push(id);
            assert!(!s.contains('\u{FFFD}'), "broken UTF-8 emitted: {s:?}");
            out.push_str(&s);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);

        // Continuing a prompt, a "▁word" token keeps its space.
        let ids = t.encode("hello world", false).unwrap();
        let mut d = IncrementalDetokenizer::with_context(t.clone(), true, &ids[..1]);
        let streamed: String = ids[1..].iter().map(|&id| d.push(id)).collect::<String>() + &d.finish();
        assert_eq!(streamed, " world");
    }

    /// (string, ids per pre-tokenizer) from llama.cpp (llama-cpp-python 0.3.36)
    /// run on the SmolLM2 vocabulary with `tokenizer.ggml.pre` rewritten.
    const PRE_STRINGS: &[&str] = &[
        "Hello world! 123",
        "  multiple   spaces",
        "I'm sure they'll've done it; DON'T",
        "x = 3.14159 * 2**10 # 1234567",
        "line1\nline2\n\n\nline3\r\n  \n",
        "emoji 🤖 and 中文测试 ok",
        "trailing spaces   ",
        "a<|im_end|>b",
        "$5+3=<8> ~|^ x...!?",
    ];
    const PRE_CASES: &[(&str, &[&[u32]])] = &[
        ("default", &[
            &[19556, 905, 17, 216, 33, 34, 35],
            &[216, 2701, 256, 5600],
            &[57, 23, 93, 2090, 502, 23, 764, 23, 307, 2294, 357, 43, 422, 2154, 23, 68],
            &[104, 216, 45, 216, 35, 30, 33, 36, 33, 37, 41, 216, 26, 216, 34, 828, 33, 32, 216, 19, 216, 33, 34, 35, 36, 37, 38, 39],
            &[1311, 33, 198, 1311, 34, 1116, 198, 1311, 35, 2738, 32057],
            &[391, 33777, 15107, 114, 240, 284, 216, 28589, 29184, 43222, 229, 16313, 239, 10907],
            &[4861, 4966, 5600, 333],
            &[81, 2, 82],
            &[20, 37, 27, 35, 45, 44, 40, 46, 216, 110, 108, 78, 1792, 2026, 17, 47],
        ]),
        ("gpt-2", &[
            &[19556, 905, 17, 216, 33, 34, 35],
            &[216, 2701, 256, 5600],
            &[57, 5248, 2090, 502, 3060, 3543, 2294, 357, 43, 422, 2154, 23, 68],
            &[104, 446, 216, 35, 30, 33, 36, 33, 37, 41, 1672, 216, 34, 828, 33, 32, 907, 216, 33, 34, 35, 36, 37, 38, 39],
            &[1311, 33, 198, 1311, 34, 1116, 198, 1311, 35, 2738, 32057],
            &[391, 33777, 15107, 114, 240, 284, 216, 28589, 29184, 43222, 229, 16313, 239, 10907],
            &[4861, 4966, 5600, 333],
            &[81, 2, 82],
            &[20, 37, 27, 35, 45, 44, 40, 46, 11417, 108, 78, 1792, 2026, 17, 47],
        ]),
        ("llama-bpe", &[
            &[19556, 905, 17, 216, 33, 34, 35],
            &[216, 2701, 256, 5600],
            &[57, 5248, 2090, 502, 3060, 3543, 2294, 357, 43, 422, 2154, 23, 68],
            &[104, 446, 216, 35, 30, 33, 36, 33, 37, 41, 1672, 216, 34, 828, 33, 32, 907, 216, 33, 34, 35, 36, 37, 38, 39],
            &[1311, 33, 198, 1311, 34, 16506, 1311, 35, 2738, 32057],
            &[391, 33777, 15107, 114, 240, 284, 216, 28589, 29184, 43222, 229, 16313, 239, 10907],
            &[4861, 4966, 5600, 333],
            &[81, 2, 82],
            &[20, 37, 27, 35, 45, 44, 40, 46, 11417, 108, 78, 1792, 2026, 17, 47],
        ]),
        ("qwen2", &[
            &[19556, 905, 17, 216, 33, 34, 35],
            &[216, 2701, 256, 5600],
            &[57, 5248, 2090, 502, 3060, 3543, 2294, 357, 43, 422, 2154, 23, 68],
            &[104, 446, 216, 35, 30, 33, 36, 33, 37, 41, 1672, 216, 34, 828, 33, 32, 907, 216, 33, 34, 35, 36, 37, 38, 39],
            &[1311, 33, 198, 1311, 34, 16506, 1311, 35, 2738, 32057],
            &[391, 33777, 15107, 114, 240, 284, 216, 28589, 29184, 43222, 229, 16313, 239, 10907],
            &[4861, 4966, 5600, 333],
            &[81, 2, 82],
            &[20, 37, 27, 35, 45, 44, 40, 46, 11417, 108, 78, 1792, 2026, 17, 47],
        ]),
        ("starcoder", &[
            &[19556, 905, 17, 216, 33, 34, 35],
            &[216, 2701, 256, 5600],
            &[57, 5248, 2090, 502, 3060, 3543, 2294, 357, 43, 422, 2154, 23, 68],
            &[104, 446, 216, 35, 30, 33, 36, 33, 37, 41, 1672, 216, 34, 828, 33, 32, 907, 216, 33, 34, 35, 36, 37, 38, 39],
            &[1311, 33, 198, 1311, 34, 1116, 198, 1311, 35, 2738, 32057],
            &[391, 33777, 15107, 114, 240, 284, 216, 28589, 29184, 43222, 229, 16313, 239, 10907],
            &[4861, 4966, 5600, 333],
            &[81, 2, 82],
            &[20, 37, 27, 35, 45, 44, 40, 46, 11417, 108, 78, 1792, 2026, 17, 47],
        ]),
        ("falcon", &[
            &[19556, 905, 17, 216, 33, 34, 35],
            &[216, 2701, 256, 5600],
            &[57, 23, 93, 2090, 502, 23, 764, 23, 307, 2294, 357, 43, 422, 2154, 23, 68],
            &[104, 216, 45, 216, 35, 30, 33, 36, 33, 37, 41, 216, 26, 216, 34, 828, 33, 32, 216, 19, 216, 33, 34, 35, 36, 37, 38, 39],
            &[1311, 33, 198, 1311, 34, 1116, 198, 1311, 35, 2738, 32057],
            &[391, 33777, 15107, 114, 240, 284, 216, 28589, 29184, 43222, 229, 16313, 239, 10907],
            &[4861, 4966, 5600, 333],
            &[81, 2, 82],
            &[20, 37, 27, 35, 45, 44, 40, 46, 216, 110, 108, 78, 1792, 2026, 17, 47],
        ]),
    ];

    /// Each pre-tokenizer choice reproduces llama.cpp on the real vocabulary
    /// (the file's metadata copied with only `tokenizer.ggml.pre` changed).
    #[test]
    fn pre_tokenizers_match_llama_cpp() {
        let Some(path) = super::super::test_model_path() else { return };
        let g = GgufFile::open(&path).unwrap();
        if g.get_str("tokenizer.ggml.pre") != Some("smollm") || g.get_str("general.name") != Some("Smollm2 135M 8k Lc100K Mix1 Ep2") {
            eprintln!("skipping: not the SmolLM2 model");
            return;
        }
        let dir = std::env::temp_dir().join(format!("ferry-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (pre, expected) in PRE_CASES {
            let mut w = GgufWriter::new();
            for (k, v) in g.metadata() {
                let v = if k == "tokenizer.ggml.pre" { MetaValue::String((*pre).into()) } else { v.clone() };
                w.add_metadata(k.clone(), v);
            }
            let path = dir.join(format!("pre-{pre}.gguf"));
            w.write(&path).unwrap();
            let t = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
            for (text, want) in PRE_STRINGS.iter().zip(expected.iter()) {
                assert_eq!(t.encode(text, true).unwrap(), *want, "pre {pre}, text {text:?}");
            }
        }
    }

    /// Every pre-tokenizer name we accept (and list in refusals) compiles its regexes.
    #[test]
    fn all_pre_tokenizer_regexes_compile() {
        for &name in super::PRE_NAMES {
            let pre = super::pre_tokenizer_for(name).unwrap();
            let tokens: Vec<String> = (0..=255u8).map(|b| super::super::pieces::byte_to_char(b).to_string()).collect();
            super::bpe_tokenizer(&tokens, &[], &pre).unwrap();
        }
        assert!(super::pre_tokenizer_for("nope").is_none());
    }

    #[test]
    fn missing_or_bad_metadata_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("ferry-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notok.gguf");
        GgufWriter::new().write(&path).unwrap();
        let e = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).err().unwrap();
        assert!(e.to_string().contains("notok.gguf: tokenizer: no tokenizer.ggml.model"), "{e}");

        let mut w = GgufWriter::new();
        w.add_metadata("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .add_metadata("tokenizer.ggml.pre", MetaValue::String("martian".into()))
            .add_metadata("tokenizer.ggml.tokens", strings(&["a", "b"]))
            .add_metadata("tokenizer.ggml.merges", strings(&["a b"]));
        w.write(&path).unwrap();
        let e = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).err().unwrap();
        assert!(e.to_string().contains("pre-tokenizer 'martian' (metadata key tokenizer.ggml.pre)"), "{e}");
        assert!(e.to_string().contains("llama-bpe, ") && e.to_string().contains("qwen2"), "{e}");

        w.add_metadata("tokenizer.ggml.pre", MetaValue::String("gpt-2".into()))
            .add_metadata("tokenizer.ggml.token_type", MetaValue::Array(vec![MetaValue::I32(1)]));
        w.write(&path).unwrap();
        let e = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).err().unwrap();
        assert!(e.to_string().contains("token_type has 1 entries for 2 tokens"), "{e}");
    }
}
