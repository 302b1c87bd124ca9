//! The CPU forward pass against a plain f64 reference, and against itself under
//! every way the engine slices work: paged blocks, chunked prefill, batching,
//! tensor parallelism.

mod common;

use common::*;
use ferry_engine::model::config::RopeStyle;
use ferry_engine::cpu::{CpuShard, LogitRows, ModelInput, SeqChunk};
use ferry_engine::communicator::SoloCommunicator;
use ferry_engine::quant::GgmlType;
use ferry_engine::model::weights::dummy;

const BS: usize = 4;

fn one_seq(tokens: &[u32], start_pos: usize, table: Vec<u32>) -> ModelInput {
    ModelInput {
        tokens: tokens.to_vec(),
        seqs: vec![SeqChunk { start_pos, len: tokens.len(), prompt_len: if start_pos == 0 { tokens.len() } else { start_pos }, block_table: table, logits: LogitRows::Last }],
    }
}

/// Logits of every position, computing one token per step (each step attends over
/// the cache the earlier steps wrote).
fn logits_token_by_token(shard: &CpuShard, toks: &[u32], table: &[u32], blocks: usize) -> Vec<Vec<f32>> {
    let mut kv = shard.new_kv_store(blocks, BS);
    (0..toks.len())
        .map(|p| shard.forward(&one_seq(&toks[p..p + 1], p, table.to_vec()), &mut kv, &SoloCommunicator).unwrap())
        .collect()
}

#[test]
fn forward_matches_f64_reference_for_every_weight_type() {
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        let cfg = tiny_config(style);
        for (ty, tol) in [
            // Float weights: only the f16 KV cache (llama.cpp's default precision) rounds.
            (GgmlType::F32, 3e-3),
            (GgmlType::F16, 3e-3),
            (GgmlType::BF16, 3e-3),
            (GgmlType::Q8_0, 3e-2),
            (GgmlType::Q4_0, 5e-2),
            (GgmlType::Q4_1, 5e-2),
            (GgmlType::Q4_K, 5e-2),
            (GgmlType::Q6_K, 3e-2),
            (GgmlType::Q5_0, 5e-2),
            (GgmlType::Q5_1, 5e-2),
            (GgmlType::IQ4_NL, 5e-2),
            (GgmlType::Q2_K, 5e-2),
            (GgmlType::Q3_K, 5e-2),
            (GgmlType::Q5_K, 5e-2),
            (GgmlType::IQ4_XS, 5e-2),
        ] {
            let w = dummy(&cfg, ty, 7).unwrap();
            let toks = tokens(1, 11, cfg.vocab_size);
            let want = reference_logits(&cfg, &w, &toks);
            let shard = CpuShard::new(&cfg, &w, 0, 1).unwrap();
            let table: Vec<u32> = (0..4).collect();
            let got = logits_token_by_token(&shard, &toks, &table, 4);
            for (p, (g, r)) in got.iter().zip(&want).enumerate() {
                let e = max_rel_err(g, r);
                assert!(e < tol, "{ty:?} {style:?} position {p}: relative error {e} > {tol}");
            }
        }
    }
}

#[test]
fn paged_blocks_in_any_order_give_the_same_logits_as_contiguous() {
    let cfg = tiny_config(RopeStyle::Interleaved);
    let w = dummy(&cfg, GgmlType::F32, 3).unwrap();
    let shard = CpuShard::new(&cfg, &w, 0, 1).unwrap();
    let toks = tokens(2, 14, cfg.vocab_size);
    let contiguous = logits_token_by_token(&shard, &toks, &[0, 1, 2, 3], 16);
    let scattered = logits_token_by_token(&shard, &toks, &[13, 2, 9, 5], 16);
    for (a, b) in contiguous.iter().zip(&scattered) {
        assert!(max_abs_diff(a, b) < 1e-5);
    }
    let want = reference_logits(&cfg, &w, &toks);
    assert!(max_rel_err(scattered.last().unwrap(), want.last().unwrap()) < 3e-3);
}

#[test]
fn chunked_prefill_matches_whole_prefill() {
    let cfg = tiny_config(RopeStyle::Neox);
    let w = dummy(&cfg, GgmlType::Q8_0, 4).unwrap();
    let shard = CpuShard::new(&cfg, &w, 0, 1).unwrap();
    let toks = tokens(3, 23, cfg.vocab_size);
    let table: Vec<u32> = vec![3, 0, 5, 1, 4, 2];
    let mut kv = shard.new_kv_store(6, BS);
    let whole = shard.forward(&one_seq(&toks, 0, table.clone()), &mut kv, &SoloCommunicator).unwrap();
    let mut kv = shard.new_kv_store(6, BS);
    let mut last = Vec::new();
    let mut at = 0;
    for chunk in [5usize, 1, 9, 8] {
        last = shard.forward(&one_seq(&toks[at..at + chunk], at, table.clone()), &mut kv, &SoloCommunicator).unwrap();
        at += chunk;
    }
    assert_eq!(at, toks.len());
    let d = max_abs_diff(&whole, &last);
    assert!(d < 1e-4, "chunked vs whole prefill differ by {d}");
}

#[test]
fn a_batch_gives_each_sequence_what_it_gets_alone() {
    let cfg = tiny_config(RopeStyle::Interleaved);
    let w = dummy(&cfg, GgmlType::Q4_1, 5).unwrap();
    let shard = CpuShard::new(&cfg, &w, 0, 1).unwrap();
    let prompts = [tokens(10, 9, 300), tokens(11, 3, 300), tokens(12, 13, 300)];
    let tables: [Vec<u32>; 3] = [vec![0, 1, 2], vec![3], vec![4, 5, 6, 7]];
    // Alone: each prompt prefilled in its own call.
    let mut kv = shard.new_kv_store(8, BS);
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| shard.forward(&one_seq(p, 0, t.clone()), &mut kv, &SoloCommunicator).unwrap())
        .collect();
    // Together: one batch, mixing sequences of different lengths.
    let mut kv = shard.new_kv_store(8, BS);
    let batch = ModelInput {
        tokens: prompts.concat(),
        seqs: prompts
            .iter()
            .zip(&tables)
            .map(|(p, t)| SeqChunk { start_pos: 0, len: p.len(), prompt_len: p.len(), block_table: t.clone(), logits: LogitRows::Last })
            .collect(),
    };
    let together = shard.forward(&batch, &mut kv, &SoloCommunicator).unwrap();
    let v = cfg.vocab_size;
    for (i, a) in alone.iter().enumerate() {
        let d = max_abs_diff(a, &together[i * v..(i + 1) * v]);
        assert!(d < 1e-4, "sequence {i}: batched differs by {d}");
    }
    // Then one decode step for all three at once.
    let next: Vec<u32> = vec![7, 8, 9];
    let decode = ModelInput {
        tokens: next.clone(),
        seqs: prompts
            .iter()
            .zip(&tables)
            .map(|(p, t)| SeqChunk { start_pos: p.len(), len: 1, prompt_len: p.len(), block_table: t.clone(), logits: LogitRows::Last })
            .collect(),
    };
    let batched = shard.forward(&decode, &mut kv, &SoloCommunicator).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let mut full = p.clone();
        full.push(next[i]);
        let want = reference_logits(&cfg, &w, &full);
        let e = max_rel_err(&batched[i * v..(i + 1) * v], want.last().unwrap());
        assert!(e < 5e-2, "sequence {i}: batched decode vs reference {e}");
    }
}

#[test]
fn tensor_parallel_matches_one_worker() {
    for ty in [GgmlType::F32, GgmlType::Q8_0] {
        let cfg = tiny_config(RopeStyle::Interleaved);
        let w = dummy(&cfg, ty, 6).unwrap();
        let toks = tokens(4, 10, cfg.vocab_size);
        let input = one_seq(&toks, 0, vec![0, 1, 2]);
        let decode = one_seq(&[42], toks.len(), vec![0, 1, 2]);
        let mut solo = ferry_engine::cpu::build(&cfg, &w, 1, 0).unwrap().into_executor(4, BS).unwrap();
        let want = (solo.logits(&input).unwrap(), solo.logits(&decode).unwrap());
        for world in [2, 4] {
            let mut tp = ferry_engine::cpu::build(&cfg, &w, world, 0).unwrap().into_executor(4, BS).unwrap();
            let got = (tp.logits(&input).unwrap(), tp.logits(&decode).unwrap());
            let tol = if ty == GgmlType::F32 { 1e-4 } else { 2e-2 };
            assert!(max_abs_diff(&got.0, &want.0) < tol, "{ty:?} TP={world} prefill");
            assert!(max_abs_diff(&got.1, &want.1) < tol, "{ty:?} TP={world} decode");
        }
    }
}

#[test]
fn a_model_that_cannot_be_split_is_refused_with_a_reason() {
    let mut cfg = tiny_config(RopeStyle::Interleaved);
    cfg.num_kv_heads = 2;
    let w = dummy(&cfg, GgmlType::F32, 1).unwrap();
    let err = ferry_engine::cpu::build(&cfg, &w, 4, 0).err().expect("2 KV heads over 4 workers");
    assert!(err.to_string().contains("KV heads"), "{err}");
}

#[test]
fn a_batch_outside_the_cache_is_an_error_not_a_panic() {
    let cfg = tiny_config(RopeStyle::Interleaved);
    let w = dummy(&cfg, GgmlType::F32, 1).unwrap();
    let shard = CpuShard::new(&cfg, &w, 0, 1).unwrap();
    let mut kv = shard.new_kv_store(2, BS);
    let too_far = one_seq(&[1, 2, 3], 6, vec![0, 1]);
    assert!(shard.forward(&too_far, &mut kv, &SoloCommunicator).is_err());
    let bad_block = one_seq(&[1], 0, vec![9]);
    assert!(shard.forward(&bad_block, &mut kv, &SoloCommunicator).is_err());
    let bad_token = one_seq(&[300], 0, vec![0]);
    assert!(shard.forward(&bad_token, &mut kv, &SoloCommunicator).is_err());
}
