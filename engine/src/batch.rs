//! The batch one engine step computes: the scheduler's output as the model sees
//! it. Owned by no backend, so the CPU backend and a device backend take the
//! same input.

/// One sequence's slice of a step: `len` tokens starting at position `start_pos`.
#[derive(Clone, Debug)]
pub struct SeqChunk {
    /// Position (0-based, in the whole sequence) of the chunk's first token;
    /// the positions before it are already in the KV cache.
    pub start_pos: usize,
    /// Tokens in the chunk: its slice of [`ModelInput::tokens`], in order.
    pub len: usize,
    /// The sequence's prompt length: positions below it are prompt, the rest
    /// output (resumed output included). A backend may compute the two kinds
    /// in different float orders, but each position always in its kind's, so
    /// a position's bits never depend on the chunk it comes in (the CPU's
    /// attention keeps llama.cpp's prompt and decode orders this way).
    pub prompt_len: usize,
    /// The sequence's KV blocks, covering at least `start_pos + len`
    /// positions: position `p` lives in block `block_table[p / block_size]`,
    /// slot `p % block_size` (vLLM's block table).
    pub block_table: Vec<u32>,
    /// Which of the chunk's positions need logits.
    pub logits: LogitRows,
}

/// The positions of a chunk whose full-vocabulary logits the step returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// None: a prefill chunk that is not the prompt's last.
    None,
    /// The last token's (it will be sampled).
    Last,
    /// Every token's, in order (prompt logprobs); the last row is also the
    /// sampling row when the chunk ends the prompt.
    All,
    /// The last `n` tokens', each sampled by a row of its own and none
    /// returned: a speculative verify chunk (the sequence's last token and
    /// `n - 1` proposed ones, `crate::spec`).
    Verify(usize),
}

impl LogitRows {
    /// Rows of logits this chunk of `len` tokens contributes.
    pub fn count(self, len: usize) -> usize {
        match self {
            LogitRows::None => 0,
            LogitRows::Last => 1,
            LogitRows::All => len,
            LogitRows::Verify(n) => n.min(len),
        }
    }
}

/// What the model computes in one step: the sequences' tokens back to back.
#[derive(Clone, Debug, Default)]
pub struct ModelInput {
    /// Every chunk's token ids, concatenated in `seqs` order.
    pub tokens: Vec<u32>,
    /// The chunks, one per scheduled sequence; their `len`s sum to `tokens.len()`.
    pub seqs: Vec<SeqChunk>,
}
