//! Which decode batch sizes get a CUDA graph, and how a batch is padded to one.
//!
//! vLLM captures graphs for 1, 2 and 4 sequences, then every multiple of 8 up
//! to 256 and every multiple of 16 beyond, up to its largest capture size; a
//! decode batch runs the graph of the smallest captured size that holds it,
//! with the extra rows padding (they compute on a dummy slot and are thrown
//! away). Larger batches, prefill chunks and steps that want every logit row
//! run eagerly. `--enforce-eager` captures nothing.

/// The largest batch size ever captured (vLLM's default cap).
pub const MAX_CAPTURE: usize = 512;

/// The capture sizes for `max_num_seqs`, ascending: vLLM's list cut at
/// `max_num_seqs` (capped at [`MAX_CAPTURE`]), plus that size itself so every
/// decode batch the scheduler can form has a graph. Empty when eager.
pub fn capture_sizes(max_num_seqs: usize, enforce_eager: bool) -> Vec<usize> {
    if enforce_eager || max_num_seqs == 0 {
        return Vec::new();
    }
    let cap = max_num_seqs.min(MAX_CAPTURE);
    let mut sizes: Vec<usize> = [1, 2, 4].into_iter().chain((8..=256).step_by(8)).chain((272..=MAX_CAPTURE).step_by(16)).filter(|&s| s <= cap).collect();
    if sizes.last() != Some(&cap) {
        sizes.push(cap);
    }
    sizes
}

/// The captured size a decode batch of `n` sequences runs as, or None (eager).
pub fn bucket(sizes: &[usize], n: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let i = sizes.partition_point(|&s| s < n);
    sizes.get(i).copied()
}

/// Rows a batch of `n` gets padded with to run as `bucket`.
pub fn padding(bucket: usize, n: usize) -> usize {
    bucket.saturating_sub(n)
}

/// Whether a step may replay a graph: every chunk one decode token, every
/// chunk sampled (no prompt-logprob rows), and a bucket that holds it.
pub fn graph_bucket(input: &crate::batch::ModelInput, sizes: &[usize]) -> Option<usize> {
    use crate::batch::LogitRows;
    let decode_only = !input.seqs.is_empty()
        && input.tokens.len() == input.seqs.len()
        && input.seqs.iter().all(|c| c.len == 1 && c.logits == LogitRows::Last);
    if decode_only {
        bucket(sizes, input.seqs.len())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{LogitRows, ModelInput, SeqChunk};

    #[test]
    fn vllm_sizes_cut_at_max_num_seqs() {
        assert_eq!(capture_sizes(256, false)[..8], [1, 2, 4, 8, 16, 24, 32, 40]);
        assert_eq!(*capture_sizes(256, false).last().unwrap(), 256);
        assert_eq!(capture_sizes(256, false).len(), 3 + 32);
        assert_eq!(capture_sizes(20, false), vec![1, 2, 4, 8, 16, 20]);
        assert_eq!(capture_sizes(1, false), vec![1]);
        let big = capture_sizes(1024, false);
        assert_eq!(*big.last().unwrap(), MAX_CAPTURE);
        assert!(big.contains(&272) && !big.contains(&264));
        assert!(capture_sizes(256, true).is_empty());
        assert!(big.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_batch_runs_as_the_smallest_size_that_holds_it() {
        let s = capture_sizes(64, false);
        assert_eq!(bucket(&s, 1), Some(1));
        assert_eq!(bucket(&s, 3), Some(4));
        assert_eq!(bucket(&s, 9), Some(16));
        assert_eq!(bucket(&s, 64), Some(64));
        assert_eq!(bucket(&s, 65), None);
        assert_eq!(bucket(&s, 0), None);
        assert_eq!(padding(16, 9), 7);
        assert_eq!(bucket(&[], 1), None);
    }

    #[test]
    fn only_pure_decode_steps_replay_a_graph() {
        let s = capture_sizes(8, false);
        let chunk = |len, logits| SeqChunk { start_pos: 10, len, prompt_len: 10, block_table: vec![0], logits };
        let decode = ModelInput { tokens: vec![1, 2, 3], seqs: vec![chunk(1, LogitRows::Last); 3] };
        assert_eq!(graph_bucket(&decode, &s), Some(4));
        let prefill = ModelInput { tokens: vec![1, 2, 3], seqs: vec![chunk(3, LogitRows::Last)] };
        assert_eq!(graph_bucket(&prefill, &s), None);
        let logprobs = ModelInput { tokens: vec![1], seqs: vec![chunk(1, LogitRows::All)] };
        assert_eq!(graph_bucket(&logprobs, &s), None);
        let big = ModelInput { tokens: vec![1; 9], seqs: vec![chunk(1, LogitRows::Last); 9] };
        assert_eq!(graph_bucket(&big, &s), None);
        assert_eq!(graph_bucket(&decode, &[]), None);
    }
}
