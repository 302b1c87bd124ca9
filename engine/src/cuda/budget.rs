//! How much of a GPU's memory goes to the KV cache.
//!
//! vLLM's rule (`--gpu-memory-utilization`): the engine may use that fraction
//! of the device's *total* memory, weights, KV cache and activations together;
//! the KV cache gets what is left of that share once the weights are loaded
//! and the activations' peak is set aside. Memory other processes hold counts
//! against the device, not against the share: if the share does not fit in
//! what was free when the engine started, start-up stops and says so.
//! `--kv-cache-memory-bytes` instead names the KV cache's size outright.

use ferry_transport::MAX_LOGPROBS;

/// The sizes one step's activations and workspaces need on one device, the
/// peak the budget sets aside (the forward pass reuses these buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActivationShape {
    /// The model's hidden size (whole on every rank: the residual stream is
    /// not split).
    pub hidden: usize,
    /// Per rank (q heads × head_dim on this rank).
    pub q_size: usize,
    /// Per rank.
    pub kv_size: usize,
    /// Per rank.
    pub intermediate: usize,
    /// The whole vocabulary: every rank computes full logit rows.
    pub vocab: usize,
    /// Per rank: query heads on this rank (attention's partial results).
    pub num_heads: usize,
    /// Elements per attention head.
    pub head_dim: usize,
    /// Tokens one step may take (max_num_batched_tokens).
    pub max_tokens: usize,
    /// Sequences one step may take (max_num_seqs).
    pub max_seqs: usize,
    /// Positions a sequence may reach (for attention's partitions).
    pub max_model_len: usize,
}

/// Decode attention's partition length (kernels/paged_attention.cu's PARTITION).
pub const PARTITION: usize = 512;
/// cuBLAS's workspace, set explicitly so graph capture never allocates.
pub const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Set aside for the CUDA context's own allocations after start-up, NCCL's
/// buffers, the graphs' memory and fragmentation.
pub const RESERVE: usize = 512 << 20;

impl ActivationShape {
    /// Bytes of every activation and scratch buffer of one step at its largest.
    pub fn bytes(&self) -> usize {
        let t = self.max_tokens;
        let bf = 2;
        // Logit rows: every sampled row, or every token when a prompt asks for its logprobs.
        let logit_rows = t.max(self.max_seqs);
        let parts = self.max_model_len.div_ceil(PARTITION).max(1);
        let per_token = bf
            * (2 * self.hidden          // residual, normed
                + self.hidden           // attention / MLP output (all-reduced in place)
                + self.q_size + 2 * self.kv_size // q, k, v
                + self.q_size           // attention output
                + 2 * self.intermediate // gate|up
                + self.intermediate); // silu(gate)*up
        let attention_parts = self.max_seqs * self.num_heads * parts * (self.head_dim + 2) * 4;
        let logits = 2 * logit_rows * self.vocab * 4; // logits and the logprobs' raw copy
        let sampling = self.max_seqs * (80 + 16 + 2 * MAX_LOGPROBS as usize * 4); // top ids and logprobs
        // Positions, slots and per-token sequence ids; block tables at block size 16 or more.
        let metadata = t * 24 + self.max_seqs * (self.max_model_len.div_ceil(16) * 4 + 64);
        t * per_token + attention_parts + logits + sampling + metadata + CUBLAS_WORKSPACE
    }
}

/// One device's memory, as the driver reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// The device's memory in bytes, whoever uses it.
    pub total: usize,
    /// Free when the engine started, before it loaded anything.
    pub free_at_start: usize,
    /// Free now, after the weights were loaded.
    pub free_now: usize,
}

/// Why a device has no usable KV cache; each message names the flag to change.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BudgetError {
    /// `--gpu-memory-utilization` outside (0, 1] (NaN included).
    #[error("--gpu-memory-utilization must be in (0, 1], not {0}")]
    BadUtilization(f32),
    /// The share (`util` x `total`) is more than was free at start-up: other
    /// processes hold the difference.
    #[error(
        "GPU {device}: --gpu-memory-utilization {util} asks for {want} of the {total} GPU, but only {free} was free at start-up \
         (other processes hold the rest); lower --gpu-memory-utilization or free the GPU"
    )]
    ShareNotFree {
        /// The GPU ordinal.
        device: usize,
        /// `--gpu-memory-utilization`.
        util: f32,
        /// The share: `util` of `total`.
        want: Gib,
        /// The device's memory.
        total: Gib,
        /// What was free before the engine loaded anything.
        free: Gib,
    },
    /// The share holds the weights and activations but leaves nothing for
    /// the KV cache.
    #[error(
        "GPU {device}: the weights ({weights}) and activations ({activations}) need more than --gpu-memory-utilization {util} \
         of the GPU ({share}); raise it, use a smaller --max-num-batched-tokens / --max-num-seqs, or more GPUs (--tensor-parallel-size)"
    )]
    NoRoomForKv {
        /// The GPU ordinal.
        device: usize,
        /// `--gpu-memory-utilization`.
        util: f32,
        /// `util` of the device's memory.
        share: Gib,
        /// What loading took, measured (weights and the context's own memory).
        weights: Gib,
        /// The activations' peak plus [`RESERVE`].
        activations: Gib,
    },
    /// `--kv-cache-memory-bytes` is more than the device has free once the
    /// weights are loaded and the activations set aside.
    #[error("GPU {device}: --kv-cache-memory-bytes {want} does not fit in the {free} left after the weights and activations")]
    ExplicitKvTooLarge {
        /// The GPU ordinal.
        device: usize,
        /// `--kv-cache-memory-bytes`.
        want: Gib,
        /// Free after the weights, less the activations' peak and [`RESERVE`].
        free: Gib,
    },
    /// The KV memory holds fewer blocks than one sequence of `max_model_len`
    /// tokens needs, so a long request could never be scheduled.
    #[error(
        "GPU {device}: room for {blocks} KV block(s) of {block_bytes} bytes, fewer than the {needed} one sequence of \
         --max-model-len {max_model_len} needs; lower --max-model-len or give the KV cache more memory"
    )]
    TooFewBlocks {
        /// The GPU ordinal.
        device: usize,
        /// Blocks the KV memory holds.
        blocks: usize,
        /// Bytes of one block on this rank ([`block_bytes`]).
        block_bytes: usize,
        /// Blocks one full-length sequence needs: `max_model_len / block_size`, rounded up.
        needed: usize,
        /// `--max-model-len` (or the model's).
        max_model_len: usize,
    },
}

/// Bytes shown in GiB (messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gib(pub usize);

impl std::fmt::Display for Gib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} GiB", self.0 as f64 / (1u64 << 30) as f64)
    }
}

/// What the budget decided, for the start-up log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBudget {
    /// Bytes given to the KV cache: `--kv-cache-memory-bytes`, or what is left
    /// of the share.
    pub kv_bytes: usize,
    /// Whole blocks those bytes hold (at least one sequence's worth).
    pub num_blocks: usize,
}

/// KV blocks for one device. `weights`: bytes this engine put on the device
/// (measured: free_at_start - free_now, so the context's own memory counts
/// too); `block_bytes`: one block's keys and values for this rank's layers and
/// heads; `max_model_len` and `block_size`: the blocks one full sequence needs.
#[allow(clippy::too_many_arguments, reason = "each argument is one measured or configured input of the budget, documented above; tests call it with literal values")]
pub fn kv_blocks(
    device: usize,
    mem: DeviceMemory,
    utilization: f32,
    explicit_kv_bytes: Option<usize>,
    activations: usize,
    block_bytes: usize,
    block_size: usize,
    max_model_len: usize,
) -> Result<KvBudget, BudgetError> {
    let used_by_us = mem.free_at_start.saturating_sub(mem.free_now);
    let kv_bytes = match explicit_kv_bytes {
        Some(want) => {
            let room = mem.free_now.saturating_sub(activations + RESERVE);
            if want > room {
                return Err(BudgetError::ExplicitKvTooLarge { device, want: Gib(want), free: Gib(room) });
            }
            want
        }
        None => {
            if !(utilization > 0.0 && utilization <= 1.0) {
                return Err(BudgetError::BadUtilization(utilization));
            }
            let share = (mem.total as f64 * utilization as f64) as usize;
            // Memory others hold (total - free_at_start) must leave our share free.
            if share > mem.free_at_start {
                return Err(BudgetError::ShareNotFree {
                    device,
                    util: utilization,
                    want: Gib(share),
                    total: Gib(mem.total),
                    free: Gib(mem.free_at_start),
                });
            }
            let fixed = used_by_us + activations + RESERVE;
            if fixed >= share {
                return Err(BudgetError::NoRoomForKv {
                    device,
                    util: utilization,
                    share: Gib(share),
                    weights: Gib(used_by_us),
                    activations: Gib(activations + RESERVE),
                });
            }
            share - fixed
        }
    };
    let num_blocks = kv_bytes / block_bytes.max(1);
    let needed = max_model_len.div_ceil(block_size.max(1));
    if num_blocks < needed.max(1) {
        return Err(BudgetError::TooFewBlocks { device, blocks: num_blocks, block_bytes, needed, max_model_len });
    }
    Ok(KvBudget { kv_bytes, num_blocks })
}

/// Bytes of one KV block on one rank: keys and values, bf16, every layer.
pub fn block_bytes(num_layers: usize, block_size: usize, kv_heads_per_rank: usize, head_dim: usize) -> usize {
    2 * num_layers * block_size * kv_heads_per_rank * head_dim * 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    fn h100(free_at_start: usize, weights: usize) -> DeviceMemory {
        DeviceMemory { total: 80 * GIB, free_at_start, free_now: free_at_start - weights }
    }

    #[test]
    fn the_kv_cache_gets_the_share_less_weights_and_activations() {
        // Llama-3-8B on one H100: 16 GiB of weights, 0.9 of 80 GiB.
        let bb = block_bytes(32, 16, 8, 128);
        assert_eq!(bb, 2 << 20);
        let b = kv_blocks(0, h100(79 * GIB, 16 * GIB), 0.9, None, 2 * GIB, bb, 16, 8192).unwrap();
        let share = (80.0 * GIB as f64 * 0.9f32 as f64) as usize;
        assert_eq!(b.kv_bytes, share - 16 * GIB - 2 * GIB - RESERVE);
        assert_eq!(b.num_blocks, b.kv_bytes / bb);
        // More utilization, more blocks; exactly proportional to the share.
        let more = kv_blocks(0, h100(79 * GIB, 16 * GIB), 0.95, None, 2 * GIB, bb, 16, 8192).unwrap();
        assert_eq!(more.kv_bytes - b.kv_bytes, (80.0 * GIB as f64 * 0.95f32 as f64) as usize - share);
    }

    #[test]
    fn clear_errors_when_it_does_not_fit() {
        let bb = block_bytes(32, 16, 8, 128);
        // Another process holds 30 GiB: 0.9 of the GPU is not free.
        let e = kv_blocks(0, h100(50 * GIB, 16 * GIB), 0.9, None, GIB, bb, 16, 8192).unwrap_err();
        assert!(matches!(e, BudgetError::ShareNotFree { .. }), "{e}");
        assert!(e.to_string().contains("other processes"), "{e}");
        // Weights larger than the share.
        let e = kv_blocks(0, h100(79 * GIB, 72 * GIB), 0.9, None, GIB, bb, 16, 8192).unwrap_err();
        assert!(matches!(e, BudgetError::NoRoomForKv { .. }) && e.to_string().contains("--tensor-parallel-size"), "{e}");
        // Too little left for one sequence of max_model_len.
        let e = kv_blocks(0, h100(79 * GIB, 60 * GIB), 0.9, None, GIB, bb, 16, 131072).unwrap_err();
        assert!(matches!(e, BudgetError::TooFewBlocks { needed: 8192, .. }), "{e}");
        for u in [0.0, -0.5, 1.5, f32::NAN] {
            assert!(matches!(kv_blocks(0, h100(79 * GIB, GIB), u, None, GIB, bb, 16, 64), Err(BudgetError::BadUtilization(_))));
        }
    }

    #[test]
    fn an_explicit_kv_size_is_taken_as_it_is_when_it_fits() {
        let bb = block_bytes(30, 16, 3, 64);
        let b = kv_blocks(0, h100(79 * GIB, GIB), 0.1, Some(4 * GIB), GIB, bb, 16, 8192).unwrap();
        assert_eq!((b.kv_bytes, b.num_blocks), (4 * GIB, 4 * GIB / bb));
        let e = kv_blocks(0, h100(79 * GIB, GIB), 0.9, Some(78 * GIB), GIB, bb, 16, 8192).unwrap_err();
        assert!(matches!(e, BudgetError::ExplicitKvTooLarge { .. }), "{e}");
    }

    #[test]
    fn activations_grow_with_the_batch_and_the_vocabulary() {
        let s = ActivationShape {
            hidden: 4096,
            q_size: 4096,
            kv_size: 1024,
            intermediate: 14336,
            vocab: 128256,
            num_heads: 32,
            head_dim: 128,
            max_tokens: 2048,
            max_seqs: 256,
            max_model_len: 8192,
        };
        let a = s.bytes();
        // 2048 tokens: ~0.3 GiB of layer activations plus 2 GiB of f32 logits and their copy.
        assert!(a > 2 * GIB && a < 3 * GIB, "{a}");
        assert!(ActivationShape { max_tokens: 4096, ..s }.bytes() > a);
        assert!(ActivationShape { vocab: 32000, ..s }.bytes() < a);
    }
}
