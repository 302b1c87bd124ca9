//! Tensor parallelism's bookkeeping, independent of any device: how a model
//! is split over `world` ranks (Megatron's split, as the CPU backend does it:
//! q/k/v/gate/up by output rows, o/down by input columns, one all-reduce
//! after each), which GPU each rank takes, how the ranks agree on NCCL's
//! unique id, and the size of the buffers the collectives work on.

use crate::model::config::ModelConfig;
use std::ops::Range;
use std::sync::{Condvar, Mutex};

/// One rank's share of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankShare {
    /// This rank, `0..world`: its NCCL rank and its slice of every split.
    pub rank: usize,
    /// Ranks the model is split over (`--tensor-parallel-size`).
    pub world: usize,
    /// The GPU ordinal this rank runs on.
    pub device: usize,
    /// Query heads of this rank (a range of the model's).
    pub heads: Range<usize>,
    /// KV heads of this rank (a range of the model's): the ones its query
    /// heads read, so grouped-query attention stays within the rank.
    pub kv_heads: Range<usize>,
    /// Columns of the MLP's intermediate layer.
    pub intermediate: Range<usize>,
    /// Elements per head (the model's; heads are never split).
    pub head_dim: usize,
}

impl RankShare {
    /// Rows of wq (and of q's bias) this rank holds.
    pub fn q_rows(&self) -> Range<usize> {
        self.heads.start * self.head_dim..self.heads.end * self.head_dim
    }
    /// Rows of wk and wv.
    pub fn kv_rows(&self) -> Range<usize> {
        self.kv_heads.start * self.head_dim..self.kv_heads.end * self.head_dim
    }
    /// Columns of wo (its input is the attention output of this rank's heads).
    pub fn o_cols(&self) -> Range<usize> {
        self.q_rows()
    }
    /// Query heads on this rank.
    pub fn num_heads(&self) -> usize {
        self.heads.len()
    }
    /// KV heads on this rank (what its KV cache holds).
    pub fn num_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }
}

/// Splits `cfg` over `world` ranks on GPUs `first_device..first_device + world`
/// of the `devices` there are. Err: why it cannot be split, in one line.
pub fn split(cfg: &ModelConfig, world: usize, first_device: usize, devices: usize) -> Result<Vec<RankShare>, String> {
    if world == 0 {
        return Err("--tensor-parallel-size must be at least 1".into());
    }
    if first_device + world > devices {
        return Err(format!(
            "--tensor-parallel-size {world} needs {world} GPU(s) from GPU {first_device}, and this machine has {devices}"
        ));
    }
    for (what, n) in [("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads), ("intermediate size", cfg.intermediate_size)] {
        if n % world != 0 {
            return Err(format!("--tensor-parallel-size {world} does not divide the model's {what} ({n})"));
        }
    }
    let (h, kv, inter) = (cfg.num_heads / world, cfg.num_kv_heads / world, cfg.intermediate_size / world);
    Ok((0..world)
        .map(|r| RankShare {
            rank: r,
            world,
            device: first_device + r,
            heads: r * h..(r + 1) * h,
            kv_heads: r * kv..(r + 1) * kv,
            intermediate: r * inter..(r + 1) * inter,
            head_dim: cfg.head_dim,
        })
        .collect())
}

/// Elements of the all-reduce buffer: one hidden row per token of the largest step.
pub fn all_reduce_elems(hidden: usize, max_tokens: usize) -> usize {
    hidden * max_tokens
}

/// How the ranks of one process agree on NCCL's unique id: rank 0 makes it
/// (`ncclGetUniqueId`) and publishes it; every rank waits for it before
/// `ncclCommInitRank`. (Ranks in other processes would need it sent over the
/// wire; ferry's ranks are threads of one process.)
pub struct IdExchange<T> {
    id: Mutex<Option<T>>,
    ready: Condvar,
}

impl<T: Clone> Default for IdExchange<T> {
    fn default() -> Self {
        IdExchange { id: Mutex::new(None), ready: Condvar::new() }
    }
}

impl<T: Clone> IdExchange<T> {
    /// Rank 0: publish the id (once; a second publish is a caller bug, ignored).
    pub fn publish(&self, id: T) {
        let mut slot = self.id.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(id);
        }
        self.ready.notify_all();
    }

    /// Any rank: the id, once published; None after `timeout`.
    pub fn wait(&self, timeout: std::time::Duration) -> Option<T> {
        let slot = self.id.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (slot, _) = self.ready.wait_timeout_while(slot, timeout, |s| s.is_none()).unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn llama8b() -> ModelConfig {
        ModelConfig {
            arch: "llama".into(),
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            vocab_size: 128256,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_style: crate::model::config::RopeStyle::Neox,
            max_position_embeddings: 8192,
            tie_word_embeddings: false,
            qkv_bias: false,
            rope_freq_factors: None,
            sliding_window: None,
        }
    }

    #[test]
    fn shares_tile_the_model_and_take_one_gpu_each() {
        let cfg = llama8b();
        for world in [1, 2, 4, 8] {
            let s = split(&cfg, world, 0, 8).unwrap();
            assert_eq!(s.len(), world);
            assert_eq!(s.iter().map(super::RankShare::num_heads).sum::<usize>(), 32);
            assert_eq!(s.iter().map(|r| r.kv_heads.len()).sum::<usize>(), 8);
            assert_eq!(s.last().unwrap().q_rows().end, 4096);
            assert_eq!(s.last().unwrap().kv_rows().end, 1024);
            assert_eq!(s.last().unwrap().intermediate.end, 14336);
            for (r, share) in s.iter().enumerate() {
                assert_eq!((share.rank, share.device, share.world), (r, r, world));
                // Grouped-query attention stays within a rank: its q heads read its kv heads.
                assert_eq!(share.num_heads() / share.num_kv_heads(), 4);
            }
        }
        assert_eq!(split(&cfg, 2, 1, 4).unwrap()[1].device, 2);
    }

    #[test]
    fn models_and_machines_that_cannot_be_split_say_why() {
        let cfg = llama8b();
        assert!(split(&cfg, 16, 0, 16).unwrap_err().contains("KV heads (8)"));
        assert!(split(&cfg, 3, 0, 8).unwrap_err().contains("attention heads (32)"));
        assert!(split(&cfg, 2, 0, 1).unwrap_err().contains("this machine has 1"));
        assert!(split(&cfg, 0, 0, 1).is_err());
        let smol = ModelConfig { num_heads: 9, num_kv_heads: 3, intermediate_size: 1536, ..cfg };
        assert!(split(&smol, 3, 0, 4).is_ok());
        assert!(split(&smol, 2, 0, 4).unwrap_err().contains("attention heads (9)"));
        assert_eq!(all_reduce_elems(576, 2048), 576 * 2048);
    }

    #[test]
    fn every_rank_gets_rank_zeros_id() {
        let ex = Arc::new(IdExchange::<[i8; 128]>::default());
        let waiters: Vec<_> = (1..4)
            .map(|_| {
                let ex = ex.clone();
                std::thread::spawn(move || ex.wait(Duration::from_secs(10)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        let mut id = [0i8; 128];
        id[0] = 7;
        id[127] = -3;
        ex.publish(id);
        ex.publish([1; 128]); // ignored
        for w in waiters {
            assert_eq!(w.join().unwrap(), Some(id));
        }
        assert_eq!(IdExchange::<u8>::default().wait(Duration::from_millis(10)), None);
    }
}
