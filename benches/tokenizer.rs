//! The gateway's text work per request: `Tokenizer::encode` of a ~2 KB English
//! prompt, a full `decode` of its tokens, and streaming detokenization
//! (`IncrementalDetokenizer::push` once per token, as the gateway does for each
//! generated token).
//!
//! Runs on the real model's tokenizer when the file is there (FERRY_TEST_MODEL,
//! or the model cache, where scripts/fetch/fetch-model.sh puts it); otherwise on a small byte-level
//! BPE vocabulary written into a GGUF here, with merges learned from the text
//! itself so it splits words roughly as a real vocabulary does.
//!
//! Run it with `cargo bench --bench tokenizer`; the groups are
//! `tokenizer/<vocabulary>/{encode_2kb,decode_full,detokenize_incremental}`,
//! and the bench says on stderr which vocabulary it used.

mod common;
use common::model_path;
use criterion::{criterion_main, Criterion, Throughput};
use ferry_engine::model::gguf::{GgufFile, GgufWriter, MetaValue};
use ferry_engine::tokenizer::{IncrementalDetokenizer, Tokenizer};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

/// About 2 KB of plain English prose.
const TEXT: &str = "The ferry left the harbour a little after seven, when the fog had thinned enough \
for the captain to see the green light at the end of the breakwater. Most of the passengers \
stayed inside, where the windows were fogged and the coffee was hot, but a few stood at the rail \
and watched the town fall away behind them: the church with its square tower, the row of painted \
houses along the quay, the cranes of the boatyard standing over their half-built hulls like \
patient birds. A boy asked his mother how deep the water was. She said she did not know, perhaps \
a hundred metres, perhaps more, and he leaned over the rail as if he might see the bottom.\n\n\
Out in the channel the swell grew longer and slower. The engines settled into the steady beat \
that would carry them for the next two hours, and the gulls that had followed them out of the \
harbour gave up one by one and turned back. On the upper deck an old man unfolded a map of the \
islands and traced the route with his finger, naming each headland under his breath. He had made \
this crossing every summer for forty years, he told anyone who would listen, and the only thing \
that had changed was the price of the ticket.\n\n\
Halfway across, the sun broke through. The sea turned from grey to a deep, glittering blue, and \
the far island appeared all at once, much closer than anyone expected: a long ridge of pale rock, \
a white lighthouse, a scatter of houses above a small stone harbour. People came out from the \
cabin with their cameras and their children, and for a few minutes the deck was crowded and loud. \
Then the novelty passed, the wind picked up again, and most of them went back inside to wait.\n\n\
When the ferry finally slowed and swung towards the pier, the old man folded his map, put it in \
his pocket, and was the first to reach the ramp. He did not look back at the mainland. Behind \
him, the boy was still asking questions, and his mother was still answering them as well as she \
could, one after another, all the way down to the shore.";

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the
/// others for code points from 256 up, in byte order.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}

/// Words the way GPT-2's pre-tokenizer roughly splits them: a run of letters
/// (with the space before it), a run of digits, or a run of other characters.
fn rough_words(text: &str) -> Vec<&str> {
    let class = |c: char| if c.is_alphabetic() { 0 } else if c.is_numeric() { 1 } else { 2 };
    let mut words = Vec::new();
    let mut start = 0;
    let mut prev: Option<char> = None;
    for (i, c) in text.char_indices() {
        if let Some(p) = prev {
            let joins_space = p == ' ' && c.is_alphanumeric();
            if !joins_space && class(p) != class(c) {
                words.push(&text[start..i]);
                start = i;
            }
        }
        prev = Some(c);
    }
    words.push(&text[start..]);
    words
}

/// A byte-level BPE vocabulary: the 256 byte tokens, up to `n_merges` merges
/// learned greedily from `text` (most frequent adjacent pair first), and an
/// end-of-text token. Returns (tokens, merges as "a b").
fn learn_bpe(text: &str, n_merges: usize) -> (Vec<String>, Vec<String>) {
    let bc = byte_chars();
    let mut tokens: Vec<String> = bc.iter().map(std::string::ToString::to_string).collect();
    let mut merges = Vec::new();
    let mut words: Vec<Vec<String>> =
        rough_words(text).iter().map(|w| w.bytes().map(|b| bc[b as usize].to_string()).collect()).collect();
    for _ in 0..n_merges {
        let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
        for w in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].as_str(), p[1].as_str())).or_default() += 1;
            }
        }
        // Ties broken by the pair itself so the vocabulary is the same every run.
        let Some(((a, b), n)) = counts.into_iter().max_by(|x, y| x.1.cmp(&y.1).then_with(|| y.0.cmp(&x.0))) else { break };
        if n < 2 {
            break;
        }
        let (a, b) = (a.to_string(), b.to_string());
        let joined = format!("{a}{b}");
        for w in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = joined.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        merges.push(format!("{a} {b}"));
        tokens.push(joined);
    }
    tokens.push("<|endoftext|>".into());
    (tokens, merges)
}

/// The small tokenizer, through the same GGUF loading path as a real model.
fn tiny_tokenizer() -> Result<Tokenizer, String> {
    let (tokens, merges) = learn_bpe(TEXT, 400);
    let eos = (tokens.len() - 1) as u32;
    let mut types = vec![1i32; tokens.len()];
    types[eos as usize] = 3; // control
    let mut g = GgufWriter::new();
    g.add_metadata("general.architecture", MetaValue::String("llama".into()))
        .add_metadata("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .add_metadata("tokenizer.ggml.pre", MetaValue::String("gpt-2".into()))
        .add_metadata("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()))
        .add_metadata("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()))
        .add_metadata("tokenizer.ggml.merges", MetaValue::Array(merges.into_iter().map(MetaValue::String).collect()))
        .add_metadata("tokenizer.ggml.eos_token_id", MetaValue::U32(eos))
        .add_metadata("tokenizer.ggml.bos_token_id", MetaValue::U32(eos))
        .add_metadata("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    let path = std::env::temp_dir().join(format!("ferry-bench-tokenizer-{}.gguf", std::process::id()));
    g.write(&path).map_err(|e| e.to_string())?;
    let tok = GgufFile::open(&path).map_err(|e| e.to_string()).and_then(|f| Tokenizer::from_gguf(&f).map_err(|e| e.to_string()));
    let _ = std::fs::remove_file(&path);
    tok
}

fn real_tokenizer(path: &std::path::Path) -> Result<Tokenizer, String> {
    let file = GgufFile::open(path).map_err(|e| e.to_string())?;
    Tokenizer::from_gguf(&file).map_err(|e| e.to_string())
}

fn bench_tokenizer_on(c: &mut Criterion, name: &str, tok: Tokenizer) {
    let tok = Arc::new(tok);
    let ids = match tok.encode(TEXT, false) {
        Ok(ids) => ids,
        Err(e) => return eprintln!("tokenizer: {name} cannot encode the text: {e}"),
    };
    // The benches below only mean something if the tokenizer round-trips the text.
    match tok.decode(&ids, false) {
        Ok(back) if back == TEXT => {}
        Ok(_) => eprintln!("tokenizer: warning: {name} does not decode the text back exactly"),
        Err(e) => return eprintln!("tokenizer: {name} cannot decode its own tokens: {e}"),
    }
    eprintln!("tokenizer: {name}: {} bytes -> {} tokens (vocabulary {})", TEXT.len(), ids.len(), tok.vocab_size());

    let mut group = c.benchmark_group(format!("tokenizer/{name}"));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Bytes(TEXT.len() as u64));
    group.bench_function("encode_2kb", |b| b.iter(|| tok.encode(black_box(TEXT), false)));
    // Per token: elements/s is tokens/s, and time / tokens is the cost of one push.
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("decode_full", |b| b.iter(|| tok.decode(black_box(&ids), false)));
    group.bench_function("detokenize_incremental", |b| {
        b.iter(|| {
            let mut d = IncrementalDetokenizer::new(tok.clone(), true);
            let mut bytes = 0;
            for &t in &ids {
                bytes += d.push(black_box(t)).len();
            }
            bytes + d.finish().len()
        });
    });
    group.finish();
}

fn bench_tokenizer(c: &mut Criterion) {
    match model_path() {
        Some(path) => match real_tokenizer(&path) {
            Ok(tok) => bench_tokenizer_on(c, "smollm2-135m", tok),
            Err(e) => eprintln!("tokenizer: cannot load the tokenizer of {}: {e}", path.display()),
        },
        None => {
            eprintln!("tokenizer: real model not found (set FERRY_TEST_MODEL); using a small byte-level BPE");
            match tiny_tokenizer() {
                Ok(tok) => bench_tokenizer_on(c, "tiny-bpe", tok),
                Err(e) => eprintln!("tokenizer: cannot build the small tokenizer: {e}"),
            }
        }
    }
}

// `criterion_group!` makes a `pub fn` it cannot document; in a private module
// it is not exported, so `missing_docs` has nothing to ask of it.
mod group {
    criterion::criterion_group!(benches, super::bench_tokenizer);
}
criterion_main!(group::benches);
