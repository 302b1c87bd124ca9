//! ggml's quantized tensor formats, what loaders and every backend share:
//! the element types and their block geometry, the block layouts byte-for-byte
//! as in GGUF files, row dequantize and quantize, and the weight matrix
//! (`QMatrix`) viewed in place over a file's bytes. The CPU kernels that
//! multiply these formats live with the CPU backend (`cpu::kernels`).

mod types;
pub use types::*;

pub(crate) mod blocks;
mod dequant;
mod qmatrix;
mod quantize;

pub(crate) use blocks::round_f16;
pub(crate) use dequant::check_row;
pub use dequant::dequantize_row;
pub use qmatrix::{QMatrix, WeightBytes};
pub(crate) use quantize::q8_k_values;
pub use quantize::quantize_row;

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
