//! Tests against the real SmolLM2 GGUF (skipped when absent) and llama.cpp's
//! reference tokenizations, plus the Hugging Face folder loader.

use std::sync::Arc;

use super::*;
use crate::model::gguf::GgufFile;

fn real_tokenizer() -> Option<Tokenizer> {
    let path = test_model_path()?;
    let g = GgufFile::open(&path).unwrap();
    Some(Tokenizer::from_gguf(&g).unwrap())
}

/// Only the SmolLM2 file has the expected ids below.
fn is_smollm2(t: &Tokenizer) -> bool {
    t.vocab_size() == 49152 && t.token_to_id("<|im_start|>") == Some(1)
}

/// llama.cpp's outputs on the default model, kept in the repository
/// (engine/tests/data/llama_cpp/, copied from ../shared/reference/).
fn reference() -> serde_json::Value {
    let path = std::env::var("FERRY_TEST_REFERENCE").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama_cpp/smollm2_greedy.json").into()
    });
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("reference {path}: {e}"))).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<IncrementalDetokenizer>();
}

#[test]
fn reference_prompts_tokenize_exactly() {
    let Some(t) = real_tokenizer() else { return };
    let r = reference();
    assert!(is_smollm2(&t), "FERRY_TEST_MODEL is not the reference's model");
    assert_eq!(t.bos_token_id(), Some(r["bos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(t.eos_token_id(), Some(r["eos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(t.eog_token_ids(), ids_of(&r["eog_token_ids"]).as_slice());
    assert_eq!(t.vocab_size(), r["n_vocab"].as_u64().unwrap() as usize);
    assert_eq!(t.chat_template(), r["chat_template"].as_str());
    let mut n = 0;
    for p in r["prompts"].as_array().unwrap() {
        let want = ids_of(&p["prompt_token_ids"]);
        let got = match p["kind"].as_str().unwrap() {
            "text" => t.encode(p["prompt"].as_str().unwrap(), true).unwrap(),
            "chat" => {
                let msgs: Vec<ChatMessage> = serde_json::from_value(p["messages"].clone()).unwrap();
                let text = t.apply_chat_template(&msgs, true).unwrap();
                assert_eq!(text, p["rendered_prompt"].as_str().unwrap(), "{}", p["id"]);
                t.encode(&text, true).unwrap()
            }
            k => panic!("unknown prompt kind {k}"),
        };
        assert_eq!(got, want, "prompt {}", p["id"]);
        // The generated pieces and text decode as llama.cpp printed them.
        let gen = ids_of(&p["generated_token_ids"]);
        for (id, piece) in gen.iter().zip(p["generated_pieces"].as_array().unwrap()) {
            assert_eq!(t.id_to_piece(*id).as_deref(), piece.as_str(), "piece of {id}");
        }
        // llama.cpp's text leaves control tokens (the final EOG) out.
        assert_eq!(t.decode(&gen, true).unwrap(), p["generated_text"].as_str().unwrap());
        n += 1;
    }
    assert!(n >= 3);
}

/// Token ids llama.cpp (llama-cpp-python 0.3.36, `tokenize(add_bos=True,
/// special=True)`) gives for these strings with the SmolLM2 GGUF.
const LLAMA_CPP_CASES: &[(&str, &[u32])] = &[
    ("Hello world! 123", &[19556, 905, 17, 216, 33, 34, 35]),
    ("  multiple   spaces", &[216, 2701, 256, 5600]),
    ("Café déjà vu.", &[51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]),
    (
        "emoji 🤖🚀 and 👍🏽 ok",
        &[391, 33777, 15107, 114, 240, 10813, 244, 218, 284, 15107, 235, 231, 10813, 233, 138, 10907],
    ),
    (
        "中文测试，日本語のテキスト",
        &[28589, 29184, 43222, 229, 16313, 239, 12831, 23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226],
    ),
    ("line1\nline2\n\n\nline3\r\n", &[1311, 33, 198, 1311, 34, 1116, 198, 1311, 35, 2738]),
    ("tabs\tand\t\tmore", &[100, 7366, 197, 397, 197, 197, 3143]),
    ("I'm sure they'll've done it; don't", &[57, 5248, 2090, 502, 3060, 3543, 2294, 357, 43, 1326, 982]),
    (
        "x = 3.14159 * 2**10 # 10000000",
        &[104, 446, 216, 35, 30, 33, 36, 33, 37, 41, 1672, 216, 34, 828, 33, 32, 907, 216, 33, 32, 32, 32, 32, 32, 32, 32],
    ),
    ("    indented code\n        deeper", &[333, 641, 6574, 2909, 448, 4296]),
    ("<|im_start|>user\nhi<|im_end|>", &[1, 4093, 198, 6004, 2]),
    ("trailing spaces   ", &[4861, 4966, 5600, 333]),
    ("\u{a0}nbsp and \u{2028} sep", &[15442, 94, 32093, 284, 459, 118, 25853]),
    ("Ünïcödé ÄÖÜ ß ﬁ", &[142, 246, 94, 25972, 83, 7466, 84, 2756, 5549, 222, 142, 240, 142, 246, 5549, 249, 40367]),
    ("a<|im_end|>b<|endoftext|>", &[81, 2, 82, 0]),
];

#[test]
fn matches_llama_cpp_on_assorted_text() {
    let Some(t) = real_tokenizer() else { return };
    if !is_smollm2(&t) {
        eprintln!("skipping: not the SmolLM2 model");
        return;
    }
    for (text, want) in LLAMA_CPP_CASES {
        assert_eq!(t.encode(text, true).unwrap(), *want, "{text:?}");
    }
}

const ROUND_TRIP: &[&str] = &[
    "",
    "Hello, world!",
    "emoji 🤖🚀 and 👍🏽 ok 👨‍👩‍👧",
    "中文测试，日本語のテキスト、한국어",
    "runs   of    spaces     ",
    "\n\n\nnewlines\r\n\tand tabs\n",
    "مرحبا بالعالم",
    "<|im_start|>system\nspecial tokens<|im_end|>\n",
    "ℌ𝔢𝔩𝔩𝔬 ∑∫√ ﬁ",
    " leading space",
];

#[test]
fn decode_inverts_encode() {
    let Some(t) = real_tokenizer() else { return };
    for s in ROUND_TRIP {
        let ids = t.encode(s, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), *s);
    }
    // Special tokens are dropped on request, and only they.
    let ids = t.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nhi");
    assert!(t.decode(&[u32::MAX], false).is_err());
}

/// Deterministic xorshift, so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn stream(t: &Arc<Tokenizer>, ids: &[u32], skip: bool, context: Option<&[u32]>) -> String {
    let mut d = match context {
        Some(c) => IncrementalDetokenizer::with_context(t.clone(), skip, c),
        None => IncrementalDetokenizer::new(t.clone(), skip),
    };
    let mut out = String::new();
    for &id in ids {
        out.push_str(&d.push(id));
    }
    out.push_str(&d.finish());
    out
}

#[test]
fn incremental_equals_full_decode() {
    let Some(t) = real_tokenizer() else { return };
    let t = Arc::new(t);
    let n = t.vocab_size() as u64;
    // Byte tokens that are parts of multi-byte characters, to stress the
    // hold-back logic: ids whose piece is not valid UTF-8 alone.
    let partial: Vec<u32> = (0..n as u32)
        .filter(|&i| std::str::from_utf8(t.id_to_bytes(i).unwrap()).is_err())
        .collect();
    assert!(!partial.is_empty());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..200 {
        let len = 1 + (rng.next() % 40) as usize;
        let ids: Vec<u32> = (0..len)
            .map(|_| match rng.next() % 4 {
                0 => partial[(rng.next() % partial.len() as u64) as usize],
                1 => (rng.next() % 20) as u32, // control tokens
                _ => (rng.next() % n) as u32,
            })
            .collect();
        let skip = round % 2 == 0;
        assert_eq!(stream(&t, &ids, skip, None), t.decode(&ids, skip).unwrap(), "ids {ids:?}");
    }
    // Real text split into tokens: never a broken character mid-stream.
    for s in ROUND_TRIP {
        let ids = t.encode(s, false).unwrap();
        let mut d = IncrementalDetokenizer::new(t.clone(), false);
        let mut out = String::new();
        for &id in &ids {
            let piece = d.push(id);
            assert!(!piece.contains('\u{FFFD}'), "{s:?}: emitted {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&d.finish());
        assert_eq!(out, *s);
    }
    // After a prompt, only the new text comes out.
    let prompt = t.encode("The capital of France is", false).unwrap();
    let gen = t.encode(" Paris. 🤖 Done", false).unwrap();
    assert_eq!(stream(&t, &gen, true, Some(&prompt)), " Paris. 🤖 Done");
}

/// A byte-level BPE folder written by hand: tokenizer.json with
/// `<|im_start|>`/`<|im_end|>` added tokens, a config with a chat template
/// and EOS, and a generation config listing two EOS ids.
#[test]
fn hf_folder() {
    let dir = std::env::temp_dir().join(format!("ferry-hf-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(pieces::byte_to_char(b).to_string(), (b as u64).into());
    }
    let extra = ["Ġh", "Ġhi", "<|im_start|>", "<|im_end|>", "<|endoftext|>"];
    for (i, e) in extra.iter().enumerate() {
        vocab.insert((*e).into(), (256 + i as u64).into());
    }
    let added = |id: u64, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(258, "<|im_start|>"), added(259, "<|im_end|>"), added(260, "<|endoftext|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab, "merges": ["Ġ h", "Ġh i"]}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
    let config = serde_json::json!({
        "bos_token": null,
        "eos_token": {"content": "<|im_end|>", "special": true},
        "chat_template": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [259, 260]}"#).unwrap();

    let t = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(t.vocab_size(), 261);
    assert_eq!(t.eos_token_id(), Some(259));
    assert_eq!(t.bos_token_id(), None);
    assert_eq!(t.eog_token_ids(), &[259, 260]);
    let msgs = [ChatMessage::new("user", " hi")];
    let text = t.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(text, "<|im_start|>user\n hi<|im_end|>\n<|im_start|>assistant\n");
    let ids = t.encode(&text, true).unwrap();
    let b = |c: char| c as u32;
    assert_eq!(
        ids,
        vec![258, b('u'), b('s'), b('e'), b('r'), 10, 257, 259, 10, 258, b('a'), b('s'), b('s'), b('i'), b('s'), b('t'), b('a'), b('n'), b('t'), 10]
    );
    assert_eq!(t.decode(&ids, false).unwrap(), text);
    assert_eq!(t.decode(&ids, true).unwrap(), "user\n hi\nassistant\n");
    assert!(t.is_special(258) && !t.is_special(257));
    assert_eq!(t.id_to_piece(257).as_deref(), Some(" hi"));
    let e = Tokenizer::from_hf_dir(&dir.join("missing")).err().unwrap();
    assert!(e.to_string().contains("tokenizer.json: not found"), "{e}");
}
