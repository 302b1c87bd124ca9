//! The batch one engine step computes: the scheduler's output as the model sees
//! it. Owned by no backend, so the CPU backend and a device backend take the
//! same input.

/// One sequence's slice of a step: `len` tokens starting at position `start_pos`.
#[derive(Clone, Debug)]
pub struct SeqChunk {
    pub start_pos: usize,
    pub len: usize,
    pub block_table: Vec<u32>,
    /// The logits of the chunk's last token are wanted (it will be sampled).
    pub want_logits: bool,
}

/// What the model computes in one step: the sequences' tokens back to back.
#[derive(Clone, Debug, Default)]
pub struct ModelInput {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqChunk>,
}
