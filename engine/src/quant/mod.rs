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
pub(crate) use qmatrix::{Interleaved16, Line64};
pub(crate) use quantize::q8_k_values;
pub use quantize::quantize_row;

/// What can go wrong reading, writing or slicing quantized data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// A row or matrix width that is not a multiple of the type's block size.
    #[error("{n} elements is not a whole number of {ty} blocks ({block} elements each)")]
    NotWholeBlocks {
        /// The type's name, as [`GgmlType::name`] gives it.
        ty: &'static str,
        /// The element count asked for.
        n: usize,
        /// Elements per block of `ty`.
        block: usize,
    },
    /// Encoded bytes whose length does not match the element count.
    #[error("{ty} data for {n} elements must be {expected} bytes, got {got}")]
    WrongByteLength {
        /// The type's name.
        ty: &'static str,
        /// Elements the bytes should hold.
        n: usize,
        /// Bytes `n` elements of `ty` take.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// A buffer of f32 values whose length is not what the shape implies.
    #[error("{what}: expected {expected} values, got {got}")]
    WrongLength {
        /// Which buffer (e.g. "matrix data").
        what: &'static str,
        /// Values the shape implies.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// An operation the type does not support, e.g. an activation-only type
    /// (Q8_1, Q8_K) as a weight matrix.
    #[error("{op} is not supported for type {ty}")]
    Unsupported {
        /// The type's name.
        ty: &'static str,
        /// What was asked of it.
        op: &'static str,
    },
    /// A matrix that would reach past the end of its bytes.
    #[error("a {rows}x{cols} {ty} matrix at byte offset {offset} needs {needed} bytes but the buffer has {len}")]
    OutOfBounds {
        /// The type's name.
        ty: &'static str,
        /// The matrix's rows.
        rows: usize,
        /// The matrix's columns (elements per row).
        cols: usize,
        /// Byte offset of row 0 in the buffer.
        offset: usize,
        /// `offset` plus the matrix's bytes: the buffer length it needs.
        needed: usize,
        /// The buffer's length in bytes.
        len: usize,
    },
    /// A row or column range that is reversed or runs past the matrix.
    #[error("{what} range {start}..{end} is outside 0..{limit}")]
    BadRange {
        /// "row" or "column".
        what: &'static str,
        /// First index of the range.
        start: usize,
        /// One past its last index.
        end: usize,
        /// The matrix's rows or columns.
        limit: usize,
    },
    /// A column slice that would cut a block in two.
    #[error("column range {start}..{end} does not fall on {ty} block boundaries ({block} elements)")]
    UnalignedColumns {
        /// The type's name.
        ty: &'static str,
        /// First column of the slice.
        start: usize,
        /// One past its last column.
        end: usize,
        /// Elements per block of `ty`: both ends must be multiples of it.
        block: usize,
    },
    /// A byte size that does not fit a usize; the text says which.
    #[error("size overflow: {0}")]
    Overflow(&'static str),
}
