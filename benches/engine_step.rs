//! One decode step of the EngineCore (schedule, forward pass, sample) at batch
//! 1, 4 and 16, on random weights of SmolLM2-135M's shape (Q4_1), and on the
//! real model file when it is there (FERRY_TEST_MODEL, or
//! the model cache, where scripts/fetch/fetch-model.sh puts it).
//!
//! Only decode steps are timed: `batch` requests are added and prefilled
//! untimed, then every timed step advances each of them by one token.
//! Throughput is sequences per step, so criterion's elements/s is the
//! aggregate decode tokens/s. Sequences are restarted (aborted and re-added,
//! untimed) before they grow past `MAX_DECODE` tokens, so the attention cost
//! stays within one short range of context lengths whatever criterion's
//! iteration counts.
//!
//! Run it with `cargo bench --bench engine_step`. The groups are
//! `engine_step/dummy-smollm2-135m-q4_1` (random weights) and
//! `engine_step/smollm2-135m-instruct-q4_1` (the file); `-- dummy` or
//! `-- instruct` runs one of them, and `FERRY_TEST_MODEL=path.gguf` picks the
//! file. The figures are in docs/performance.md.

mod common;
use common::model_path;
use criterion::{criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use ferry_engine::cpu::kv::KvStore;
use ferry_engine::model::config::{ModelConfig, RopeStyle};
use ferry_engine::model::weights::{dummy, NoProgress};
use ferry_engine::quant::GgmlType;
use ferry_engine::scheduler::SchedulerConfig;
use ferry_engine::rng::{RngCore, SplitMix64};
use ferry_engine::{build_engine_core, load_model, EngineArgs, EngineCore, EngineCoreConfig, LoadFormat};
use ferry_transport::{EngineRequest, RequestId, SamplingParams};
use std::time::{Duration, Instant};

const BATCHES: [usize; 3] = [1, 4, 16];
const PROMPT_LEN: usize = 16;
/// Decode tokens a sequence may reach before it is restarted.
const MAX_DECODE: usize = 128;
const BLOCK_SIZE: usize = 16;
const MAX_MODEL_LEN: usize = 1024;

fn smollm2_135m_shape() -> ModelConfig {
    ModelConfig {
        arch: "llama".into(),
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_style: RopeStyle::Interleaved,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        qkv_bias: false,
        rope_freq_factors: None,
        sliding_window: None,
    }
}

/// Blocks for the largest batch at its longest, with room to spare.
fn num_blocks() -> usize {
    let per_seq = (PROMPT_LEN + MAX_DECODE + 8).div_ceil(BLOCK_SIZE);
    BATCHES.iter().max().copied().unwrap_or(1) * per_seq * 2
}

fn scheduler_config(num_blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 64,
        max_num_batched_tokens: 2048,
        max_model_len: MAX_MODEL_LEN,
        block_size: BLOCK_SIZE,
        num_blocks,
        // Restarted sequences get fresh random prompts, but never let a cache hit help.
        enable_prefix_caching: false,
        enable_chunked_prefill: true,
        long_prefill_token_threshold: 0,
        policy: Default::default(),
    }
}

fn dummy_core() -> Result<EngineCore, String> {
    let cfg = smollm2_135m_shape();
    let w = dummy(&cfg, GgmlType::Q4_1, 0).map_err(|e| e.to_string())?;
    let blocks = num_blocks();
    let exec = ferry_engine::cpu::build(&cfg, &w, 1, 0).and_then(|b| b.into_executor(blocks, BLOCK_SIZE)).map_err(|e| e.to_string())?;
    // No EOG ids: the requests ignore EOS anyway.
    Ok(EngineCore::new(EngineCoreConfig { rank: 0, scheduler: scheduler_config(blocks), seed: 0 , spec: None }, exec, vec![]))
}

fn real_core(path: &std::path::Path) -> Result<EngineCore, String> {
    let model = load_model(path, LoadFormat::Auto, GgmlType::Q4_1, &NoProgress).map_err(|e| e.to_string())?;
    let args = EngineArgs {
        max_model_len: Some(MAX_MODEL_LEN),
        max_num_seqs: 64,
        enable_prefix_caching: false,
        block_size: BLOCK_SIZE,
        kv_cache_memory_bytes: Some(num_blocks() * KvStore::bytes_per_block(model.cfg.num_layers, BLOCK_SIZE, model.cfg.num_kv_heads, model.cfg.head_dim)),
        ..EngineArgs::default()
    };
    build_engine_core(&model, &args, 0).map(|(core, _)| core)
}

/// A set of `batch` decoding sequences kept alive across criterion's calls.
struct Decoder {
    core: EngineCore,
    rng: SplitMix64,
    next_id: RequestId,
    live: Vec<RequestId>,
    /// Tokens each live sequence has generated so far.
    generated: usize,
}

impl Decoder {
    fn new(core: EngineCore) -> Decoder {
        Decoder { core, rng: ferry_engine::rng::splitmix(42), next_id: 0, live: Vec::new(), generated: 0 }
    }

    /// Aborts what runs and starts `batch` fresh sequences, stepping (untimed)
    /// until each has its first token, so the next step is a pure decode step.
    fn restart(&mut self, batch: usize) {
        self.core.abort(&self.live, Instant::now());
        self.live.clear();
        let vocab = self.core.vocab_size() as u64;
        // Far more than MAX_DECODE: a sequence must never finish inside a timed step.
        let sampling = SamplingParams { temperature: 0.0, max_tokens: 100_000, ignore_eos: true, ..Default::default() };
        for _ in 0..batch {
            self.next_id += 1;
            // Stay clear of the special tokens at both ends of most vocabularies.
            let prompt = (0..PROMPT_LEN).map(|_| (100 + self.rng.next_u64() % (vocab - 200)) as u32).collect();
            let req = EngineRequest::new(self.next_id, prompt, sampling.clone());
            if let Err(refused) = self.core.add_request(req, std::time::Instant::now()) {
                panic!("engine_step: the engine refused a bench request: {:?}", refused.finish);
            }
            self.live.push(self.next_id);
        }
        let mut first = 0;
        let mut steps = 0;
        while first < batch {
            first += self.core.step(std::time::Instant::now()).iter().filter(|o| !o.new_tokens.is_empty()).count();
            steps += 1;
            assert!(steps < 1000, "engine_step: prefill did not finish");
        }
        self.generated = 1;
    }

    /// Times `iters` decode steps of `batch` sequences.
    fn time_steps(&mut self, batch: usize, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters as usize;
        while left > 0 {
            if self.live.len() != batch || self.generated >= MAX_DECODE {
                self.restart(batch);
            }
            let n = left.min(MAX_DECODE - self.generated);
            let t = Instant::now();
            for _ in 0..n {
                let outs = self.core.step(std::time::Instant::now());
                debug_assert_eq!(outs.len(), batch);
                std::hint::black_box(outs);
            }
            total += t.elapsed();
            self.generated += n;
            left -= n;
        }
        total
    }
}

fn bench_core(c: &mut Criterion, name: &str, core: EngineCore) {
    let mut dec = Decoder::new(core);
    let mut group = c.benchmark_group(format!("engine_step/{name}"));
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("decode", format!("batch={batch}")), |b| {
            b.iter_custom(|iters| dec.time_steps(batch, iters));
        });
    }
    group.finish();
    dec.core.abort(&dec.live, Instant::now());
}

/// One sequence's verify pass of `1 + k` tokens against a plain decode step
/// (k = 0): what speculative decoding's cost model (`spec::backoff`) rests
/// on. The executor is driven directly, at output positions after a 64-token
/// prompt, every row sampled greedily; the same positions are rewritten on
/// each call.
fn bench_verify_pass(c: &mut Criterion) {
    use ferry_engine::backend::{RowSampling, StepSampling};
    use ferry_engine::batch::{LogitRows, ModelInput, SeqChunk};
    const PROMPT: usize = 64;
    let cfg = smollm2_135m_shape();
    let Ok(w) = dummy(&cfg, GgmlType::Q4_1, 0) else { return eprintln!("engine_step: cannot build the dummy model") };
    let blocks = (PROMPT + 32).div_ceil(BLOCK_SIZE);
    let Ok(mut exec) = ferry_engine::cpu::build(&cfg, &w, 1, 0).and_then(|b| b.into_executor(blocks, BLOCK_SIZE)) else {
        return eprintln!("engine_step: cannot build the executor");
    };
    let table: Vec<u32> = (0..blocks as u32).collect();
    let chunk = |start_pos: usize, len: usize, logits| SeqChunk { start_pos, len, prompt_len: PROMPT, block_table: table.clone(), logits };
    let prompt = ModelInput { tokens: (0..PROMPT as u32).map(|t| 100 + t).collect(), seqs: vec![chunk(0, PROMPT, LogitRows::None)] };
    if let Err(e) = exec.execute(&prompt, &StepSampling::default()) {
        return eprintln!("engine_step: prefill failed: {e}");
    }
    let mut group = c.benchmark_group("engine_step/verify-pass-dummy-smollm2-135m-q4_1");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for k in [0usize, 1, 3, 5, 8] {
        let logits = if k == 0 { LogitRows::Last } else { LogitRows::Verify(1 + k) };
        let input = ModelInput { tokens: (0..=k as u32).map(|t| 300 + t).collect(), seqs: vec![chunk(PROMPT, 1 + k, logits)] };
        let rows = (0..=k).map(|i| RowSampling { back: (k - i) as u32, ..RowSampling::greedy() }).collect();
        let sampling = StepSampling { rows };
        group.bench_function(BenchmarkId::new("proposed", k), |b| {
            b.iter(|| std::hint::black_box(exec.execute(&input, &sampling).map(|o| o.sampled.len())));
        });
    }
    group.finish();
}

fn bench_engine_step(c: &mut Criterion) {
    bench_verify_pass(c);
    match dummy_core() {
        Ok(core) => bench_core(c, "dummy-smollm2-135m-q4_1", core),
        Err(e) => eprintln!("engine_step: cannot build the dummy model: {e}"),
    }
    match model_path() {
        Some(path) => match real_core(&path) {
            Ok(core) => bench_core(c, "smollm2-135m-instruct-q4_1", core),
            Err(e) => eprintln!("engine_step: cannot load {}: {e}", path.display()),
        },
        None => eprintln!("engine_step: real model not found (set FERRY_TEST_MODEL); benching the dummy model only"),
    }
}

// `criterion_group!` makes a `pub fn` it cannot document; in a private module
// it is not exported, so `missing_docs` has nothing to ask of it.
mod group {
    criterion::criterion_group!(benches, super::bench_engine_step);
}
criterion_main!(group::benches);
