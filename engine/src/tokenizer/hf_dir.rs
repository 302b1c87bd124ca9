//! Builds a tokenizer from a Hugging Face model folder: `tokenizer.json`
//! (the `tokenizers` crate reads it), `tokenizer_config.json` (chat template,
//! bos/eos tokens, add_bos_token/add_eos_token, added tokens) and
//! `generation_config.json` (eos_token_id, an int or a list).

use std::path::Path;

use serde_json::Value as Json;
use tokenizers::AddedToken;

use super::eog::{eog_ids, KnownIds};
use super::pieces::{PieceKind, PieceTable};
use super::{Parts, TokenizerError};

fn load_err(path: &Path, msg: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Load(format!("{}: {msg}", path.display()))
}

/// A JSON file, or None when it does not exist.
fn read_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| load_err(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(load_err(path, format!("cannot read: {e}"))),
    }
}

/// `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// The template from tokenizer_config.json (a string, or a list of named
/// templates of which "default" is used), else chat_template.jinja, else
/// chat_template.json.
fn chat_template(dir: &Path, config: Option<&Json>) -> Result<Option<String>, TokenizerError> {
    match config.and_then(|c| c.get("chat_template")) {
        Some(Json::String(s)) => return Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some(name))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_owned))
            };
            return Ok(named("default").or_else(|| {
                list.first()
                    .and_then(|t| t.get("template")?.as_str().map(str::to_owned))
            }));
        }
        _ => {}
    }
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(s) => return Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(load_err(&jinja, format!("cannot read: {e}"))),
    }
    let json_path = dir.join("chat_template.json");
    Ok(read_json(&json_path)?
        .and_then(|j| j.get("chat_template")?.as_str().map(str::to_owned)))
}

/// What tokenizer.json's decoder says about token spellings.
struct DecoderInfo {
    kind: Option<PieceKind>,
    strip_leading_space: bool,
}

fn decoder_info(decoder: Option<&Json>) -> DecoderInfo {
    let mut info = DecoderInfo { kind: None, strip_leading_space: false };
    let Some(d) = decoder else { return info };
    let parts: Vec<&Json> = match d.get("type").and_then(Json::as_str) {
        Some("Sequence") => d
            .get("decoders")
            .and_then(Json::as_array)
            .map(|v| v.iter().collect())
            .unwrap_or_default(),
        _ => vec![d],
    };
    for p in parts {
        match p.get("type").and_then(Json::as_str) {
            Some("ByteLevel") => info.kind = Some(PieceKind::ByteLevel),
            Some("ByteFallback") => info.kind = Some(PieceKind::SentencePiece),
            Some("Replace") => {
                let pat = p.get("pattern").and_then(|x| x.get("String")).and_then(Json::as_str);
                if pat == Some("▁") {
                    info.kind = Some(PieceKind::SentencePiece);
                }
            }
            Some("Metaspace") => {
                info.kind = Some(PieceKind::SentencePiece);
                let scheme = p.get("prepend_scheme").and_then(Json::as_str);
                let legacy = p.get("add_prefix_space").and_then(Json::as_bool);
                info.strip_leading_space = match scheme {
                    Some(s) => s != "never",
                    None => legacy.unwrap_or(true),
                };
            }
            Some("Strip") => {
                let content = p.get("content").and_then(Json::as_str);
                let start = p.get("start").and_then(Json::as_u64).unwrap_or(0);
                if content == Some(" ") && start >= 1 {
                    info.strip_leading_space = true;
                }
            }
            _ => {}
        }
    }
    info
}

pub(super) fn build(dir: &Path) -> Result<Parts, TokenizerError> {
    let tok_path = dir.join("tokenizer.json");
    let tok_json = read_json(&tok_path)?.ok_or_else(|| load_err(&tok_path, "not found"))?;
    let mut inner = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| load_err(&tok_path, e))?;
    let config_path = dir.join("tokenizer_config.json");
    let config = read_json(&config_path)?;
    let gen_path = dir.join("generation_config.json");
    let gen = read_json(&gen_path)?;
    let cfg = |k: &str| config.as_ref().and_then(|c| c.get(k));

    // Added tokens the config knows and tokenizer.json lacks; only those
    // whose id is the next free one can be added faithfully.
    if let Some(Json::Object(decoder)) = cfg("added_tokens_decoder") {
        let mut entries: Vec<(u32, &Json)> = decoder
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
            .collect();
        entries.sort_by_key(|e| e.0);
        for (id, v) in entries {
            let Some(content) = token_text(Some(v)) else { continue };
            if inner.token_to_id(&content).is_some() || id as usize != inner.get_vocab_size(true) {
                continue;
            }
            let special = v.get("special").and_then(Json::as_bool).unwrap_or(false);
            inner.add_special_tokens(&[AddedToken::from(content, special).normalized(false)]);
        }
    }

    let added = inner.get_added_tokens_decoder();
    let info = decoder_info(tok_json.get("decoder"));
    // Ids may have gaps; the table covers up to the largest.
    let n = inner
        .get_vocab(true)
        .values()
        .map(|&i| i as usize + 1)
        .max()
        .unwrap_or(0)
        .max(inner.get_vocab_size(true));
    let mut pieces = PieceTable::new(info.strip_leading_space);
    let mut special = vec![false; n];
    for id in 0..n as u32 {
        if let Some(t) = added.get(&id) {
            special[id as usize] = t.special;
            pieces.push(&t.content, PieceKind::Raw);
            continue;
        }
        match (inner.id_to_token(id), info.kind) {
            (Some(text), Some(kind)) => pieces.push(&text, kind),
            // Decoders we do not model (WordPiece...): the token's own decode.
            (Some(_), None) => {
                let s = inner.decode(&[id], false).unwrap_or_default();
                pieces.push(&s, PieceKind::Raw);
            }
            (None, _) => pieces.push("", PieceKind::Raw),
        }
    }

    let bos_text = token_text(cfg("bos_token"));
    let eos_text = token_text(cfg("eos_token"));
    let lookup = |t: &Option<String>| t.as_deref().and_then(|s| inner.token_to_id(s));
    let gen_eos: Vec<u32> = match gen.as_ref().and_then(|g| g.get("eos_token_id")) {
        Some(Json::Number(x)) => x.as_u64().into_iter().map(|v| v as u32).collect(),
        Some(Json::Array(xs)) => xs.iter().filter_map(Json::as_u64).map(|v| v as u32).collect(),
        _ => Vec::new(),
    };
    let gen_eos: Vec<u32> = gen_eos.into_iter().filter(|&i| (i as usize) < n).collect();
    let bos = lookup(&bos_text).or_else(|| {
        gen.as_ref()
            .and_then(|g| g.get("bos_token_id")?.as_u64())
            .map(|v| v as u32)
            .filter(|&v| (v as usize) < n)
    });
    let eos = lookup(&eos_text).or_else(|| gen_eos.first().copied());

    // An explicit add_bos_token/add_eos_token in the config rules (as
    // transformers' Llama tokenizers rebuild their post-processor from it);
    // otherwise tokenizer.json's post-processor decides.
    let add_bos = cfg("add_bos_token").and_then(Json::as_bool);
    let add_eos = cfg("add_eos_token").and_then(Json::as_bool);
    let manual_specials = add_bos.is_some() || add_eos.is_some();
    if manual_specials {
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
    }

    let mut vocab: Vec<(u32, String)> = inner.get_vocab(true).into_iter().map(|(t, i)| (i, t)).collect();
    vocab.sort_unstable();
    let known = KnownIds { eos, extra: gen_eos, ..Default::default() };
    let eog = eog_ids(vocab.iter().map(|(i, t)| (*i, t.as_str())), &known);
    for &id in &eog {
        if let Some(s) = special.get_mut(id as usize) {
            *s = true;
        }
    }

    Ok(Parts {
        chat_template: chat_template(dir, config.as_ref())?,
        pieces,
        special,
        bos,
        eos,
        manual_specials,
        add_bos: add_bos.unwrap_or(false) && bos.is_some(),
        add_eos: add_eos.unwrap_or(false) && eos.is_some(),
        eog,
        bos_text: bos_text.unwrap_or_default(),
        eos_text: eos_text.unwrap_or_default(),
        inner,
    })
}
