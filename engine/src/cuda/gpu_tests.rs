//! Checks that need a GPU, run by `scripts/gpu/gpu-check.sh` (ignored elsewhere):
//! the CUDA backend driven directly, without the CLI, on a model folder the
//! script made with transformers. It writes what it computed as JSON for
//! `scripts/gpu/gpu-check/compare_transformers.py` to judge against transformers'
//! own forward pass on the same weights.
//!
//!   FERRY_GPU_MODEL=dir FERRY_GPU_PROMPTS=prompts.json FERRY_GPU_OUT=out.json \
//!     ferry-engine-tests --ignored cuda::gpu_tests
//!
//! prompts.json: `{"prompts": [[token ids], ...], "new_tokens": N}`. out.json:
//! per run (graphs, eager): the first step's logit rows (one per prompt) and
//! the greedy tokens of N steps, sampled on the device.

use super::options::CudaOptions;
use crate::args::EngineArgs;
use crate::backend::{RowSampling, StepSampling};
use crate::executor::KvMemory;
use crate::batch::{LogitRows, ModelInput, SeqChunk};
use crate::model::loader::{load_model, LoadFormat};
use crate::quant::GgmlType;
use crate::model::weights::NoProgress;

fn greedy_row(chunk: usize, position: u64) -> RowSampling {
    RowSampling { chunk, position, ..RowSampling::greedy() }
}

/// Prefill of every prompt in one step, then `new_tokens` greedy decode steps.
fn run(model: &crate::model::loader::LoadedModel, prompts: &[Vec<u32>], new_tokens: usize, eager: bool) -> serde_json::Value {
    let block_size = 16;
    let max_len = prompts.iter().map(std::vec::Vec::len).max().unwrap_or(0) + new_tokens + 1;
    let args = EngineArgs {
        max_num_seqs: prompts.len().max(1),
        max_num_batched_tokens: Some(prompts.iter().map(std::vec::Vec::len).sum::<usize>().max(256)),
        max_model_len: Some(max_len.next_multiple_of(block_size)),
        ..EngineArgs::default()
    };
    let opts = CudaOptions { enforce_eager: eager, ..CudaOptions::default() };
    let loaded = super::build_with(model, &args, &opts).unwrap_or_else(|e| panic!("{e}"));
    let memory = KvMemory { kv_cache_memory_bytes: None, gpu_memory_utilization: opts.gpu_memory_utilization };
    let blocks = loaded.num_kv_blocks(block_size, &memory).unwrap_or_else(|e| panic!("{e}"));
    let per_seq = max_len.div_ceil(block_size);
    assert!(blocks >= per_seq * prompts.len(), "{blocks} KV blocks");
    let mut exec = loaded.into_executor(blocks, block_size).unwrap_or_else(|e| panic!("{e}"));
    let table = |s: usize| (s * per_seq..(s + 1) * per_seq).map(|b| b as u32).collect::<Vec<_>>();
    let input = ModelInput {
        tokens: prompts.concat(),
        seqs: prompts
            .iter()
            .enumerate()
            .map(|(s, p)| SeqChunk { start_pos: 0, len: p.len(), prompt_len: p.len(), block_table: table(s), logits: LogitRows::Last })
            .collect(),
    };
    let t0 = std::time::Instant::now();
    let logits = exec.logits(&input).unwrap_or_else(|e| panic!("{e}"));
    let vocab = exec.vocab_size();
    let mut last: Vec<u32> = logits
        .chunks_exact(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect();
    let mut generated: Vec<Vec<u32>> = last.iter().map(|&t| vec![t]).collect();
    for step in 1..new_tokens {
        let input = ModelInput {
            tokens: last.clone(),
            seqs: prompts
                .iter()
                .enumerate()
                .map(|(s, p)| SeqChunk { start_pos: p.len() + step - 1, len: 1, prompt_len: p.len(), block_table: table(s), logits: LogitRows::Last })
                .collect(),
        };
        let rows = (0..prompts.len()).map(|s| greedy_row(s, step as u64)).collect();
        let out = exec.execute(&input, &StepSampling { rows }).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.sampled.len(), prompts.len(), "asked to sample every row");
        last = out.sampled.iter().map(|t| t.token).collect();
        for (g, &t) in generated.iter_mut().zip(&last) {
            g.push(t);
        }
    }
    serde_json::json!({
        "eager": eager,
        "seconds": t0.elapsed().as_secs_f64(),
        "first_logits": logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect::<Vec<_>>(),
        "tokens": generated,
    })
}

#[test]
#[ignore = "needs a GPU and a model: run by scripts/gpu/gpu-check.sh"]
fn greedy_tokens_and_first_logits() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let model = load_model(std::path::Path::new(&var("FERRY_GPU_MODEL")), LoadFormat::Auto, GgmlType::BF16, &NoProgress)
        .unwrap_or_else(|e| panic!("{e}"));
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(var("FERRY_GPU_PROMPTS")).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = serde_json::from_value(spec["prompts"].clone()).unwrap();
    let n = spec["new_tokens"].as_u64().unwrap_or(16) as usize;
    let graphs = run(&model, &prompts, n, false);
    let eager = run(&model, &prompts, n, true);
    let same = graphs["tokens"] == eager["tokens"];
    std::fs::write(var("FERRY_GPU_OUT"), serde_json::json!({"graphs": graphs, "eager": eager}).to_string()).unwrap();
    eprintln!("found: {} prompts x {n} tokens; CUDA graphs and eager agree: {same}", prompts.len());
    assert!(same, "CUDA graphs and eager decode gave different tokens");
}
