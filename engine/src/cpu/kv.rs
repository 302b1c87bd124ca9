//! The paged KV cache's memory on the CPU: one K and one V array per layer, laid out
//! [block][kv head][slot in block][head dim], so attention, which walks one KV
//! head of one sequence block by block, reads contiguous runs of a block's rows.
//! Values are f16, as in llama.cpp's default cache: half the memory and half the
//! traffic of f32, which is what batched decode's attention is bound by. Which
//! block belongs to which sequence is the block manager's business
//! (`crate::kv_cache`); this only stores numbers.

use half::f16;

/// One worker's keys and values for every layer, in blocks of `block_size`
/// positions (vLLM's paged KV cache, on the host).
pub struct KvStore {
    /// Positions (token slots) per block.
    pub block_size: usize,
    /// Blocks per layer; block ids in block tables are below this.
    pub num_blocks: usize,
    /// KV heads held by this worker (all of them, or its tensor-parallel share).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Keys, one array per layer of num_blocks * num_kv_heads * block_size *
    /// head_dim values, laid out as the module says; element offsets come from
    /// [`Self::head_offset`].
    pub k: Vec<Vec<f16>>,
    /// Values, laid out as `k`.
    pub v: Vec<Vec<f16>>,
}

impl KvStore {
    /// A zeroed store of `num_blocks` blocks for each of `num_layers` layers.
    pub fn new(num_layers: usize, num_blocks: usize, block_size: usize, num_kv_heads: usize, head_dim: usize) -> KvStore {
        let len = num_blocks * block_size * num_kv_heads * head_dim;
        KvStore {
            block_size,
            num_blocks,
            num_kv_heads,
            head_dim,
            k: (0..num_layers).map(|_| vec![f16::ZERO; len]).collect(),
            v: (0..num_layers).map(|_| vec![f16::ZERO; len]).collect(),
        }
    }

    /// Bytes one block takes over all layers, for `num_kv_heads` heads.
    pub fn bytes_per_block(num_layers: usize, block_size: usize, num_kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * std::mem::size_of::<f16>()
    }

    /// Index of the first element of KV head `kvh` at position `pos` of a sequence
    /// with `block_table`. None when the table doesn't reach `pos` or names a block
    /// outside the store.
    #[inline]
    pub fn head_offset(&self, block_table: &[u32], pos: usize, kvh: usize) -> Option<usize> {
        let block = *block_table.get(pos / self.block_size)? as usize;
        if block >= self.num_blocks || kvh >= self.num_kv_heads {
            return None;
        }
        Some(((block * self.num_kv_heads + kvh) * self.block_size + pos % self.block_size) * self.head_dim)
    }
}
