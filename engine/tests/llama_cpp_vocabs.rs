//! ferry's GGUF tokenizers against llama.cpp's own expected tokenizations: the
//! vocab-only files llama.cpp ships in `models/` (ggml-vocab-*.gguf, the real
//! vocabularies of Llama 3, Qwen2, GPT-2, Llama 2 / TinyLlama / Mistral's
//! SentencePiece, Phi-3, StarCoder, ...) with their `.gguf.inp` texts (digits,
//! whitespace runs, non-Latin scripts, emoji, code) and `.gguf.out` token ids,
//! which llama.cpp's test-tokenizer-0 checks llama.cpp itself against.
//!
//! The files come from the llama-cpp-python sdist (its vendor/llama.cpp/models);
//! scripts/fetch/fetch-llama-cpp-vocabs.sh puts them in the model cache and prints the
//! folder, which scripts/test/all.sh passes as `FERRY_LLAMA_CPP_VOCABS` (then a
//! missing folder fails the test); without the variable the test skips.

use ferry_engine::model::gguf::GgufFile;
use ferry_engine::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// Vocabularies ferry must tokenize exactly as llama.cpp does, by file stem.
const MUST_MATCH: &[&str] = &[
    "llama-spm", "phi-3", "llama-bpe", "qwen2", "gpt-2", "starcoder", "refact", "command-r", "mpt", "falcon",
];

/// Vocabularies whose `tokenizer.ggml.pre` (or tokenizer model) ferry does not
/// implement: each must be refused at load with a message naming the value.
const REFUSED: &[(&str, &str)] = &[
    ("deepseek-coder", "'deepseek-coder'"),
    ("deepseek-llm", "'deepseek-llm'"),
    ("qwen35", "'qwen35'"),
    ("bert-bge", "'bert'"),
    ("gemma-4", "'gemma4'"),
];

fn vocab_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("FERRY_LLAMA_CPP_VOCABS")?);
    assert!(dir.join("ggml-vocab-llama-spm.gguf").is_file(), "FERRY_LLAMA_CPP_VOCABS={} holds no ggml-vocab-*.gguf", dir.display());
    Some(dir)
}

/// (text, expected ids) pairs of one vocabulary, read as test-tokenizer-0 does:
/// texts split on "\n__ggml_vocab_test__\n", one line of ids per text.
fn cases(dir: &Path, stem: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{stem}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{stem}.gguf.out"))).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    // The .inp ends with a separator: its last piece is empty and has no line.
    let texts = &texts[..ids.len()];
    texts.iter().map(std::string::ToString::to_string).zip(ids).collect()
}

fn open(dir: &Path, stem: &str) -> Result<Tokenizer, String> {
    let g = GgufFile::open(dir.join(format!("ggml-vocab-{stem}.gguf"))).map_err(|e| e.to_string())?;
    Tokenizer::from_gguf(&g).map_err(|e| e.to_string())
}

#[test]
fn tokenizers_match_llama_cpp_on_its_own_vocab_files() {
    let Some(dir) = vocab_dir() else {
        eprintln!("SKIPPED: FERRY_LLAMA_CPP_VOCABS not set (scripts/fetch/fetch-llama-cpp-vocabs.sh)");
        return;
    };
    let mut failures = Vec::new();
    for stem in MUST_MATCH {
        let tok = open(&dir, stem).unwrap_or_else(|e| panic!("{stem}: {e}"));
        let cases = cases(&dir, stem);
        assert!(cases.len() > 20, "{stem}: only {} cases", cases.len());
        for (text, want) in cases {
            // test-tokenizer-0: no BOS/EOS added, special tokens not parsed
            // (no text here contains one).
            let got = tok.encode(&text, false).unwrap();
            if got != want {
                failures.push(format!("{stem} {text:?}:\n  ferry     {got:?}\n  llama.cpp {want:?}"));
            }
            // And llama.cpp's ids decode back to the text.
            let back = tok.decode(&want, false).unwrap();
            if back != text {
                failures.push(format!("{stem} decode {text:?}: got {back:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// llama.cpp's tokenization of more texts (scripts/reference/llama-cpp-tokenize.py wrote
/// it with llama-cpp-python, vocab_only): as its server tokenizes a prompt, no
/// BOS added and special tokens in the text parsed, as ferry's encode does.
const VOCAB_TEXTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama_cpp/vocab_texts.json");

#[test]
fn tokenizers_match_llama_cpp_on_more_texts_with_special_tokens() {
    let Some(dir) = vocab_dir() else {
        eprintln!("SKIPPED: FERRY_LLAMA_CPP_VOCABS not set (scripts/fetch/fetch-llama-cpp-vocabs.sh)");
        return;
    };
    let data: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(VOCAB_TEXTS).unwrap()).unwrap();
    let vocabs = data["vocabs"].as_object().unwrap();
    assert_eq!(vocabs.len(), MUST_MATCH.len());
    let mut failures = Vec::new();
    for (stem, cases) in vocabs {
        let tok = open(&dir, stem).unwrap_or_else(|e| panic!("{stem}: {e}"));
        for c in cases.as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let got = tok.encode(text, false).unwrap();
            if got != want {
                failures.push(format!("{stem} {text:?}:\n  ferry     {got:?}\n  llama.cpp {want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn vocabularies_ferry_does_not_implement_are_refused_by_name() {
    let Some(dir) = vocab_dir() else {
        eprintln!("SKIPPED: FERRY_LLAMA_CPP_VOCABS not set (scripts/fetch/fetch-llama-cpp-vocabs.sh)");
        return;
    };
    for (stem, name) in REFUSED {
        match open(&dir, stem) {
            Ok(_) => panic!("{stem} should be refused"),
            Err(e) => assert!(e.contains(name) && e.contains(&format!("ggml-vocab-{stem}.gguf")), "{stem}: {e}"),
        }
    }
}
