//! Every way the forward pass computes a position gives it the bits that
//! decoding it, one token per step, gives: a whole-prompt prefill, chunked
//! prefill at uneven boundaries, recompute after preemption (a prefill over
//! prompt and output), a verify chunk of several tokens at a sequence's end (as
//! speculative decoding runs), and each of these with other sequences in the
//! same step, on one thread, or (one-token decode, which runs on the team
//! of `cpu::team`) on more threads than cores. The logits of every position and the K/V the
//! cache holds for it are compared with `to_bits`, for every weight type, a
//! GGUF and a Hugging Face model, on every SIMD level this CPU runs, and on the
//! default model when `FERRY_TEST_MODEL` is set.
//!
//! Decode's own bits are pinned elsewhere (llama_cpp_reference.rs): here they
//! are what every other path must reproduce.

mod common;

use common::files::{tiny_gguf_writer, write_tiny_hf};
use common::*;
use ferry_engine::communicator::SoloCommunicator;
use ferry_engine::cpu::kernels::{set_force_avx2, set_force_scalar};
use ferry_engine::cpu::kv::KvStore;
use ferry_engine::cpu::{CpuShard, LogitRows, ModelInput, SeqChunk};
use ferry_engine::model::config::{ModelConfig, RopeStyle};
use ferry_engine::model::weights::{dummy, NoProgress};
use ferry_engine::quant::GgmlType;
use ferry_engine::{load_model, LoadFormat};
use std::path::Path;
use std::sync::Mutex;

const BS: usize = 16;
/// Positions computed: the prompt and the output so far (a recompute).
const LEN: usize = 41;
/// Of those, the prompt's: prompt and output positions are summed in
/// different orders (llama.cpp's prompt and decode orders), each always in
/// its own, so both kinds are checked.
const PROMPT_LEN: usize = 23;
/// The sequence under test: shuffled blocks, so paging is exercised.
const TABLE: [u32; 3] = [6, 1, 4];
/// The other sequences' blocks, apart from the sequence's.
const NEIGHBOUR_TABLES: [[u32; 3]; 2] = [[10, 11, 12], [13, 14, 15]];
const BLOCKS: usize = 16;

/// The SIMD switches are process-wide: the tests here run one at a time.
static SIMD: Mutex<()> = Mutex::new(());

/// A way to compute positions 0..LEN: each step's chunk length, whether
/// other sequences share each step, the pool's threads (None: the global pool).
struct Route {
    name: &'static str,
    chunks: Vec<usize>,
    neighbours: bool,
    threads: Option<usize>,
}

fn paths() -> Vec<Route> {
    let p = |name, chunks: Vec<usize>, neighbours, threads| Route { name, chunks, neighbours, threads };
    vec![
        p("whole prefill", vec![LEN], false, None),
        p("chunks 7 + 13 + 21", vec![7, 13, 21], false, None),
        p("prefill 37 + verify 4", vec![LEN - 4, 4], false, None),
        p("decode 20 + chunk 21", vec![1; 20].into_iter().chain([LEN - 20]).collect(), false, None),
        p("decode beside other sequences", vec![1; LEN], true, None),
        p("chunks 7 + 13 + 21 beside other sequences", vec![7, 13, 21], true, None),
        p("prefill 37 + verify 4 beside other sequences", vec![LEN - 4, 4], true, None),
        p("whole prefill on one thread", vec![LEN], false, Some(1)),
        // One token alone runs on the pool's team (cpu::team) with more than
        // one thread, on the parallel regions with one; five threads on
        // fewer cores make the team's threads take each other's shares.
        p("decode on one thread", vec![1; LEN], false, Some(1)),
        p("decode on five threads", vec![1; LEN], false, Some(5)),
    ]
}

/// What a run leaves, as bits: each position's logits, and each position's
/// K and V over all layers and KV heads as the cache stores them.
struct Bits {
    logits: Vec<Vec<u32>>,
    kv: Vec<Vec<u16>>,
}

/// Another sequence's chunk for step `step`: one prefilling 5 tokens a step,
/// or one decoding. Their numbers don't matter, only that they share the step.
fn neighbour(which: usize, step: usize, vocab: usize) -> (Vec<u32>, SeqChunk) {
    let (len, start_pos, logits) = if which == 0 { (5, (5 * step) % 40, LogitRows::Last) } else { (1, step % 48, LogitRows::All) };
    let toks = (0..len).map(|i| ((step * 31 + i * 7 + which) % vocab) as u32).collect();
    (toks, SeqChunk { start_pos, len, prompt_len: 20, block_table: NEIGHBOUR_TABLES[which].to_vec(), logits })
}

/// Computes `toks` along `path`, logits of every position.
fn run(shard: &CpuShard, toks: &[u32], path: &Route) -> Bits {
    let v = shard.cfg.vocab_size;
    let mut kv = shard.new_kv_store(BLOCKS, BS);
    let mut logits = Vec::with_capacity(LEN);
    let mut at = 0;
    for (step, &len) in path.chunks.iter().enumerate() {
        let ours = SeqChunk { start_pos: at, len, prompt_len: PROMPT_LEN, block_table: TABLE.to_vec(), logits: LogitRows::All };
        let mut input = ModelInput { tokens: toks[at..at + len].to_vec(), seqs: vec![ours] };
        // Neighbours before and after: the sequence's rows sit mid-batch.
        let mut skip = 0;
        if path.neighbours {
            let (t0, s0) = neighbour(0, step, v);
            let (t1, s1) = neighbour(1, step, v);
            skip = s0.logits.count(s0.len);
            input.tokens = [t0, input.tokens, t1].concat();
            input.seqs.insert(0, s0);
            input.seqs.push(s1);
        }
        let out = if let Some(threads) = path.threads {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| shard.forward(&input, &mut kv, &SoloCommunicator))
        } else {
            shard.forward(&input, &mut kv, &SoloCommunicator)
        }
        .unwrap();
        let rows = &out[skip * v..(skip + len) * v];
        logits.extend(rows.chunks_exact(v).map(|r| r.iter().map(|x| x.to_bits()).collect()));
        at += len;
    }
    assert_eq!(at, LEN);
    Bits { logits, kv: (0..LEN).map(|p| kv_bits(&kv, p)).collect() }
}

/// Position `pos`'s K and V in every layer and KV head, as stored.
fn kv_bits(kv: &KvStore, pos: usize) -> Vec<u16> {
    let mut bits = Vec::new();
    for (k, v) in kv.k.iter().zip(&kv.v) {
        for kvh in 0..kv.num_kv_heads {
            let off = kv.head_offset(&TABLE, pos, kvh).unwrap();
            bits.extend(k[off..off + kv.head_dim].iter().chain(&v[off..off + kv.head_dim]).map(|x| x.to_bits()));
        }
    }
    bits
}

/// The first position where `got` differs from `want`, in words.
fn first_difference(want: &Bits, got: &Bits) -> Option<String> {
    (0..LEN).find_map(|p| {
        let what = match (want.logits[p] != got.logits[p], want.kv[p] != got.kv[p]) {
            (false, false) => return None,
            (true, false) => "logits",
            (false, true) => "K/V",
            (true, true) => "logits and K/V",
        };
        Some(format!("{what} first differ at position {p}"))
    })
}

/// Every path against decoding one token per step; returns what differed.
fn check(model: &str, shard: &CpuShard, toks: &[u32]) -> Vec<String> {
    let decode = run(shard, toks, &Route { name: "decode", chunks: vec![1; LEN], neighbours: false, threads: None });
    paths()
        .iter()
        .filter_map(|p| first_difference(&decode, &run(shard, toks, p)).map(|d| format!("{model}, {}: {d}", p.name)))
        .collect()
}

/// The SIMD levels to run: this CPU's best, AVX2 and scalar. Each sets the
/// switches, which `reset` puts back.
const LEVELS: [&str; 3] = ["native", "avx2", "scalar"];

fn set_level(level: &str) {
    set_force_scalar(level == "scalar");
    if level == "avx2" {
        set_force_avx2(true);
    }
}

fn reset_level() {
    set_force_scalar(false);
}

/// [`check`] on every SIMD level.
fn check_all_levels(model: &str, shard: &CpuShard, toks: &[u32]) -> Vec<String> {
    let mut bad = Vec::new();
    for level in LEVELS {
        set_level(level);
        bad.extend(check(&format!("{model} ({level})"), shard, toks));
    }
    reset_level();
    bad
}

/// SmolLM2's head shape (64) and query groups of 2, small.
fn config_hd64() -> ModelConfig {
    ModelConfig { num_heads: 4, num_kv_heads: 2, head_dim: 64, ..tiny_config(RopeStyle::Neox) }
}

fn load_shard(path: &Path) -> (ModelConfig, CpuShard) {
    let m = load_model(path, LoadFormat::Auto, GgmlType::F32, &NoProgress).unwrap();
    let shard = CpuShard::new(&m.cfg, &m.weights, 0, 1).unwrap();
    (m.cfg, shard)
}

fn assert_none(bad: Vec<String>) {
    assert!(bad.is_empty(), "{} path(s) differ from one-token decode:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn gguf_every_weight_type() {
    let _lock = SIMD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_hd64();
    let mut bad = Vec::new();
    for ty in GgmlType::ALL.into_iter().filter(|t| !matches!(t, GgmlType::Q8_1 | GgmlType::Q8_K)) {
        let path = dir.path().join(format!("{}.gguf", ty.name()));
        tiny_gguf_writer(&cfg, &dummy(&cfg, ty, 11).unwrap()).write(&path).unwrap();
        let (cfg, shard) = load_shard(&path);
        bad.extend(check_all_levels(&format!("GGUF {}", ty.name()), &shard, &tokens(21, LEN, cfg.vocab_size)));
    }
    assert_none(bad);
}

#[test]
fn hugging_face_safetensors() {
    let _lock = SIMD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut bad = Vec::new();
    // Head sizes of 64 (whole 64-element dot chunks) and 32 (none: all left over).
    for (name, cfg) in [("head dim 64", config_hd64()), ("head dim 32", tiny_config(RopeStyle::Interleaved))] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf(dir.path(), &cfg, &dummy(&cfg, GgmlType::F32, 12).unwrap());
        let (cfg, shard) = load_shard(dir.path());
        bad.extend(check_all_levels(&format!("HF {name}"), &shard, &tokens(22, LEN, cfg.vocab_size)));
    }
    assert_none(bad);
}

#[test]
fn default_model() {
    let Some(path) = std::env::var_os("FERRY_TEST_MODEL") else {
        eprintln!("SKIPPED: FERRY_TEST_MODEL is not set");
        return;
    };
    let _lock = SIMD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (cfg, shard) = load_shard(Path::new(&path));
    // Ordinary text's ids are low; any ids will do.
    let toks = tokens(23, LEN, cfg.vocab_size.min(20000));
    assert_none(check("default model", &shard, &toks));
}
