//! ggml's quantized tensor formats (block layouts byte-for-byte as in GGUF files)
//! and the CPU kernels that multiply them: dequantize, quantize, dot products and
//! the batched matmul the model runs.
//!
//! Dot products follow llama.cpp: the f32 activations are quantized once per
//! matmul to the weight type's "vec_dot_type" (Q8_0, Q8_1 or Q8_K), then each
//! block is an integer dot scaled by both blocks' scales. Every kernel has a
//! scalar version and an x86 SIMD version picked at run time; `set_force_scalar`
//! (or FERRY_FORCE_SCALAR=1) keeps the scalar one reachable.

mod types;
pub use types::*;

mod act;
mod blocks;
mod dequant;
mod dot_scalar;
#[cfg(target_arch = "x86_64")]
mod dot_x86;
#[cfg(target_arch = "x86_64")]
mod gemm16;
#[cfg(target_arch = "x86_64")]
mod gemm16k;
mod matmul;
mod quantize;
mod simd;

pub(crate) use blocks::round_f16;
pub use dequant::dequantize_row;
pub use matmul::{matmul, matmul_gated, matmul_group, vec_dot, QMatrix, WeightBytes};
pub use quantize::quantize_row;
pub use simd::{force_scalar, has_avx2_fma, has_avx512, set_force_avx2, set_force_scalar, simd_name};

/// What can go wrong reading, writing or slicing quantized data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("{n} elements is not a whole number of {ty} blocks ({block} elements each)")]
    NotWholeBlocks { ty: &'static str, n: usize, block: usize },
    #[error("{ty} data for {n} elements must be {expected} bytes, got {got}")]
    WrongByteLength { ty: &'static str, n: usize, expected: usize, got: usize },
    #[error("{what}: expected {expected} values, got {got}")]
    WrongLength { what: &'static str, expected: usize, got: usize },
    #[error("{op} is not supported for type {ty}")]
    Unsupported { ty: &'static str, op: &'static str },
    #[error("a {rows}x{cols} {ty} matrix at byte offset {offset} needs {needed} bytes but the buffer has {len}")]
    OutOfBounds { ty: &'static str, rows: usize, cols: usize, offset: usize, needed: usize, len: usize },
    #[error("{what} range {start}..{end} is outside 0..{limit}")]
    BadRange { what: &'static str, start: usize, end: usize, limit: usize },
    #[error("column range {start}..{end} does not fall on {ty} block boundaries ({block} elements)")]
    UnalignedColumns { ty: &'static str, start: usize, end: usize, block: usize },
    #[error("size overflow: {0}")]
    Overflow(&'static str),
}
