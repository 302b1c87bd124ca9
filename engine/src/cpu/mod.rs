//! The CPU backend: a Llama-family decoder's forward pass over one tensor-parallel
//! shard of the weights, with the paged KV cache.
//!
//! Tensor parallelism follows Megatron: q/k/v/gate/up are split by output rows
//! (each worker owns whole heads and a slice of the FFN), o/down by input columns,
//! and each row-parallel layer ends in an all-reduce. The vocabulary projection is
//! split by rows and all-gathered. With one worker the shard is the whole model.

pub mod attention;
pub mod build;
mod dump;
pub mod kernels;
pub mod kv;
pub mod ops;
pub mod profile;
pub mod team;
pub mod worker;

use crate::communicator::Communicator;
use crate::model::config::ModelConfig;
use crate::model::weights::{LayerWeights, ModelWeights};
use crate::quant::QMatrix;
use attention::{paged_attention, AttnSeq};
use half::slice::HalfFloatSliceExt;
use kernels::{matmul, matmul_gated, matmul_group};
use kv::KvStore;
use profile::Part;
use std::ops::Range;

pub use crate::batch::{LogitRows, ModelInput, SeqChunk};
pub use build::build;

/// Why [`CpuShard::forward`] refused a step (nothing was computed or written).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The batch does not fit the model or the KV store: a token id outside
    /// the vocabulary, an empty chunk, a block table too short for its
    /// positions, chunks that do not cover the tokens, or sampling rows that
    /// do not match the chunks.
    #[error("batch is malformed: {0}")]
    BadBatch(String),
}

/// Why the model cannot be split into tensor-parallel shards.
#[derive(Debug, thiserror::Error)]
#[error("cannot split the model over {world} workers: {why}")]
pub struct ShardError {
    /// Workers the model was to be split over.
    pub world: usize,
    /// What does not divide (KV heads, intermediate size) or is out of range.
    pub why: String,
}

struct ShardLayer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
}

/// One worker's share of the model.
pub struct CpuShard {
    /// The whole model's config (not the shard's: head counts here are all heads).
    pub cfg: ModelConfig,
    rank: usize,
    world: usize,
    /// Heads this shard computes.
    n_heads: usize,
    n_kv_heads: usize,
    embed: QMatrix,
    layers: Vec<ShardLayer>,
    norm: Vec<f32>,
    /// This shard's rows of the vocabulary projection, and where they sit.
    lm_head: QMatrix,
    vocab_counts: Vec<usize>,
    /// ggml's step between rope frequencies (see ops::rope_theta_scale).
    rope_theta_scale: f32,
}

fn even_split(n: usize, world: usize, rank: usize) -> Range<usize> {
    let (base, rem) = (n / world, n % world);
    let start = rank * base + rank.min(rem);
    start..start + base + usize::from(rank < rem)
}

/// The CPU backend's own limits on a model's shape (its attention kernels keep a
/// head, and a KV head's query group, in fixed-size buffers). They belong to this
/// backend, not to the model's config: another backend has other limits.
pub fn check_model(cfg: &ModelConfig) -> Result<(), String> {
    if cfg.head_dim > attention::MAX_HEAD_DIM {
        return Err(format!("head_dim {} is larger than the CPU backend's limit of {}", cfg.head_dim, attention::MAX_HEAD_DIM));
    }
    if cfg.num_heads / cfg.num_kv_heads * cfg.head_dim > attention::MAX_GROUP_DIM {
        return Err(format!(
            "{} query heads of {} per KV head exceed the CPU backend's limit of {} values",
            cfg.num_heads / cfg.num_kv_heads,
            cfg.head_dim,
            attention::MAX_GROUP_DIM
        ));
    }
    Ok(())
}

impl CpuShard {
    /// Worker `rank` of `world`'s share of `w`. The matrices share `w`'s bytes.
    pub fn new(cfg: &ModelConfig, w: &ModelWeights, rank: usize, world: usize) -> Result<CpuShard, ShardError> {
        let err = |why: String| ShardError { world, why };
        if world == 0 || rank >= world {
            return Err(err(format!("rank {rank} is outside the group")));
        }
        if !cfg.num_kv_heads.is_multiple_of(world) {
            return Err(err(format!("the model's {} KV heads don't divide evenly", cfg.num_kv_heads)));
        }
        let hd = cfg.head_dim;
        let n_heads = cfg.num_heads / world;
        let n_kv_heads = cfg.num_kv_heads / world;
        let q_rows = rank * n_heads * hd..(rank + 1) * n_heads * hd;
        let kv_rows = rank * n_kv_heads * hd..(rank + 1) * n_kv_heads * hd;
        if !cfg.intermediate_size.is_multiple_of(world) {
            return Err(err(format!("intermediate size {} doesn't divide evenly", cfg.intermediate_size)));
        }
        let ff = cfg.intermediate_size / world;
        let ff_rows = rank * ff..(rank + 1) * ff;
        // Each matrix the matmuls read gets its copy in the 16-row kernel's
        // layout, where that kernel runs (kernels::interleave); the embedding
        // is read a row at a time, where it is.
        let own = |mut m: QMatrix| {
            kernels::interleave_for_this_cpu(&mut m);
            m
        };
        let q = |m: &QMatrix, r: Range<usize>| m.slice_rows(r).map(own).map_err(|e| err(e.to_string()));
        let c = |m: &QMatrix, r: Range<usize>| m.slice_cols(r).map(own).map_err(|e| err(e.to_string()));
        let bias = |b: &Option<Vec<f32>>, r: &Range<usize>| b.as_ref().map(|b| b[r.clone()].to_vec());
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            let l: &LayerWeights = l;
            layers.push(ShardLayer {
                attn_norm: l.attn_norm.clone(),
                wq: q(&l.wq, q_rows.clone())?,
                wk: q(&l.wk, kv_rows.clone())?,
                wv: q(&l.wv, kv_rows.clone())?,
                bq: bias(&l.bq, &q_rows),
                bk: bias(&l.bk, &kv_rows),
                bv: bias(&l.bv, &kv_rows),
                wo: c(&l.wo, q_rows.clone())?,
                ffn_norm: l.ffn_norm.clone(),
                w_gate: q(&l.w_gate, ff_rows.clone())?,
                w_up: q(&l.w_up, ff_rows.clone())?,
                w_down: c(&l.w_down, ff_rows.clone())?,
            });
        }
        let vocab_counts: Vec<usize> = (0..world).map(|r| even_split(cfg.vocab_size, world, r).len()).collect();
        Ok(CpuShard {
            cfg: cfg.clone(),
            rank,
            world,
            n_heads,
            n_kv_heads,
            embed: w.embed.clone(),
            layers,
            norm: w.norm.clone(),
            lm_head: q(&w.lm_head, even_split(cfg.vocab_size, world, rank))?,
            vocab_counts,
            rope_theta_scale: ops::rope_theta_scale(hd, cfg.rope_theta),
        })
    }

    /// A KV store for this shard's heads.
    pub fn new_kv_store(&self, num_blocks: usize, block_size: usize) -> KvStore {
        KvStore::new(self.cfg.num_layers, num_blocks, block_size, self.n_kv_heads, self.cfg.head_dim)
    }

    /// This shard's tensor-parallel rank, 0..world.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Runs one step. Returns the full-vocabulary logits of the rows each chunk's
    /// `logits` asks for (in batch order), back to back.
    pub fn forward(
        &self,
        input: &ModelInput,
        kv: &mut KvStore,
        comm: &dyn Communicator,
    ) -> Result<Vec<f32>, ForwardError> {
        let whole = profile::start();
        let out = self.forward_body(input, kv, comm);
        profile::add(Part::Forward, whole, 1);
        out
    }

    fn forward_body(
        &self,
        input: &ModelInput,
        kv: &mut KvStore,
        comm: &dyn Communicator,
    ) -> Result<Vec<f32>, ForwardError> {
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let n = input.tokens.len();
        let seqs = self.check_batch(input, kv)?;
        if self.team_fits(input) {
            return Ok(self.forward_team(input, &seqs[0], kv));
        }
        let t = profile::start();
        let (qd, kvd, ff) = (self.n_heads * hd, self.n_kv_heads * hd, self.layers.first().map_or(0, |l| l.w_up.rows()));

        let mut x = vec![0.0f32; n * h];
        for (row, &t) in x.chunks_exact_mut(h).zip(&input.tokens) {
            self.embed.dequantize_row(t as usize, row);
        }
        let mut xn = vec![0.0f32; n * h];
        let (mut q, mut k, mut v) = (vec![0.0f32; n * qd], vec![0.0f32; n * kvd], vec![0.0f32; n * kvd]);
        let mut attn = vec![0.0f32; n * qd];
        let mut proj = vec![0.0f32; n * h];
        let (mut gate, mut up) = (vec![0.0f32; n * ff], vec![0.0f32; n * ff]);
        let positions: Vec<usize> =
            input.seqs.iter().flat_map(|s| s.start_pos..s.start_pos + s.len).collect();
        let mut rope_cache = vec![0.0f32; n * hd];
        profile::add(Part::Buffers, t, 1);
        // Each token's rope angles, once for all layers.
        let t = profile::start();
        for (cache, &pos) in rope_cache.chunks_exact_mut(hd).zip(&positions) {
            ops::rope_cache(pos, self.rope_theta_scale, cfg.rope_freq_factors.as_deref(), cache);
        }
        profile::add(Part::Rope, t, 1);

        dump::tensor("embd", 0, &x);
        for (li, l) in self.layers.iter().enumerate() {
            let t = profile::start();
            ops::rms_norm(&x, &l.attn_norm, cfg.rms_norm_eps, &mut xn);
            profile::add(Part::Norm, t, 1);
            dump::tensor("attn_norm", li, &xn);
            matmul_group(&xn, n, &mut [(&l.wq, &mut q), (&l.wk, &mut k), (&l.wv, &mut v)]);
            let t = profile::start();
            for (b, buf) in [(&l.bq, &mut q), (&l.bk, &mut k), (&l.bv, &mut v)] {
                if let Some(b) = b {
                    ops::add_bias(buf, b);
                }
            }
            profile::add(Part::Residual, t, 1);
            dump::tensor("Qcur", li, &q);
            dump::tensor("Kcur", li, &k);
            dump::tensor("Vcur", li, &v);
            let t = profile::start();
            for (tok, cache) in rope_cache.chunks_exact(hd).enumerate() {
                ops::rope(&mut q[tok * qd..(tok + 1) * qd], hd, cache, cfg.rope_style);
                ops::rope(&mut k[tok * kvd..(tok + 1) * kvd], hd, cache, cfg.rope_style);
            }
            profile::add(Part::Rope, t, 1);
            let t = profile::start();
            // Write the whole batch's K/V before any attention reads: a sequence may
            // read blocks another sequence of this very step computes (prefix cache).
            for s in &seqs {
                for t in 0..s.len {
                    let row = s.row0 + t;
                    for kvh in 0..self.n_kv_heads {
                        let off = kv.head_offset(s.block_table, s.start_pos + t, kvh).expect("checked in check_batch");
                        let src = row * kvd + kvh * hd;
                        // The slice conversion runs 8 at a time on F16C (one
                        // value at a time was a call each, ~4% of a decode step).
                        kv.k[li][off..off + hd].convert_from_f32_slice(&k[src..src + hd]);
                        kv.v[li][off..off + hd].convert_from_f32_slice(&v[src..src + hd]);
                    }
                }
            }
            profile::add(Part::KvWrite, t, 1);
            dump::tensor("Qrope", li, &q);
            dump::tensor("Krope", li, &k);
            paged_attention(&q, kv, li, &seqs, self.n_heads, &mut attn);
            dump::tensor("kqv_out", li, &attn);
            matmul(&l.wo, &attn, n, &mut proj);
            comm.all_reduce_sum(&mut proj);
            dump::tensor("attn_out", li, &proj);
            let t = profile::start();
            ops::add_assign(&mut x, &proj);
            profile::add(Part::Residual, t, 1);
            dump::tensor("ffn_inp", li, &x);

            let t = profile::start();
            ops::rms_norm(&x, &l.ffn_norm, cfg.rms_norm_eps, &mut xn);
            profile::add(Part::Norm, t, 1);
            if dump::enabled() {
                matmul_group(&xn, n, &mut [(&l.w_gate, &mut gate), (&l.w_up, &mut up)]);
                dump::tensor("ffn_norm", li, &xn);
                dump::tensor("ffn_gate", li, &gate);
                dump::tensor("ffn_up", li, &up);
                ops::silu_mul(&mut gate, &up);
            } else {
                // SwiGLU inside the matmuls' parallel tasks.
                matmul_gated(&xn, n, (&l.w_gate, &mut gate), (&l.w_up, &mut up), &ops::silu_mul);
            }
            dump::tensor("ffn_swiglu", li, &gate);
            matmul(&l.w_down, &gate, n, &mut proj);
            comm.all_reduce_sum(&mut proj);
            dump::tensor("ffn_out", li, &proj);
            let t = profile::start();
            ops::add_assign(&mut x, &proj);
            profile::add(Part::Residual, t, 1);
            dump::tensor("l_out", li, &x);
        }

        // Only the rows that will be sampled go through the final norm and the
        // (large) vocabulary projection.
        let t = profile::start();
        let mut rows: Vec<usize> = Vec::new();
        let mut row0 = 0usize;
        for s in &input.seqs {
            let k = s.logits.count(s.len);
            rows.extend(row0 + s.len - k..row0 + s.len);
            row0 += s.len;
        }
        let m = rows.len();
        let mut last = vec![0.0f32; m * h];
        for (dst, &r) in last.chunks_exact_mut(h).zip(&rows) {
            ops::rms_norm(&x[r * h..(r + 1) * h], &self.norm, cfg.rms_norm_eps, dst);
        }
        let local_v = self.lm_head.rows();
        let mut local = vec![0.0f32; m * local_v];
        profile::add(Part::Norm, t, 1);
        dump::tensor("result_norm", 0, &last);
        profile::set_lm_head(true);
        matmul(&self.lm_head, &last, m, &mut local);
        profile::set_lm_head(false);
        dump::tensor("result_output", 0, &local);
        if self.world == 1 {
            return Ok(local);
        }
        // Gather each rank's vocabulary slice, then reorder row-major by token.
        let mut gathered = vec![0.0f32; m * cfg.vocab_size];
        comm.all_gather(&local, &mut gathered);
        let mut logits = vec![0.0f32; m * cfg.vocab_size];
        let mut src = 0;
        let mut col0 = 0;
        for &cnt in &self.vocab_counts {
            for r in 0..m {
                logits[r * cfg.vocab_size + col0..][..cnt].copy_from_slice(&gathered[src..src + cnt]);
                src += cnt;
            }
            col0 += cnt;
        }
        Ok(logits)
    }

    /// Checks a batch against the model and the KV store, so nothing below indexes
    /// out of bounds: token ids, lengths, and every block-table slot the step touches.
    fn check_batch<'a>(&self, input: &'a ModelInput, kv: &KvStore) -> Result<Vec<AttnSeq<'a>>, ForwardError> {
        let bad = |m: String| Err(ForwardError::BadBatch(m));
        if let Some(&t) = input.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return bad(format!("token id {t} is outside the vocabulary of {}", self.cfg.vocab_size));
        }
        let mut row0 = 0;
        let mut seqs = Vec::with_capacity(input.seqs.len());
        for s in &input.seqs {
            if s.len == 0 {
                return bad("a sequence chunk has no tokens".into());
            }
            let end = s.start_pos + s.len;
            if kv.head_offset(&s.block_table, end - 1, 0).is_none()
                || (0..end).step_by(kv.block_size).any(|p| kv.head_offset(&s.block_table, p, 0).is_none())
            {
                return bad(format!("block table of {} blocks doesn't cover position {}", s.block_table.len(), end - 1));
            }
            seqs.push(AttnSeq { row0, len: s.len, start_pos: s.start_pos, prompt_len: s.prompt_len, block_table: &s.block_table });
            row0 += s.len;
        }
        if row0 != input.tokens.len() {
            return bad(format!("chunks cover {row0} tokens but the batch has {}", input.tokens.len()));
        }
        Ok(seqs)
    }
}
