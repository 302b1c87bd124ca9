//! The weight matrix: a row-major matrix of one ggml type viewed in place over
//! its bytes (a memory-mapped file or an owned buffer). Loaders make them,
//! every backend reads them; the CPU kernels that multiply them are in
//! `cpu::kernels`.

use super::{GgmlType, QuantError};
use std::ops::Range;
use std::sync::Arc;

/// Bytes behind a weight: a memory map (never copied) or an owned buffer.
pub type WeightBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A row-major matrix of `rows` x `cols` elements of type `ty`, viewed in place.
#[derive(Clone)]
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    bytes: WeightBytes,
    /// Byte offset of row 0 (and of column 0 of a column slice).
    offset: usize,
    /// Bytes from one row to the next (the full row of the parent tensor).
    row_stride: usize,
    /// A second copy of the rows in the CPU's 16-row kernel layout, if one
    /// was made for this matrix (not shared with slices: they drop it).
    interleaved: Option<Arc<Interleaved16>>,
}

/// 64 bytes on a 64-byte boundary: one vector of the 16-row layout.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line64(pub [u8; 64]);

/// A matrix's whole groups of 16 rows in the layout of the CPU's 16-row
/// kernel (`cpu::kernels::interleave`): group g is the `group_lines` lines
/// from line `g * group_lines`.
pub(crate) struct Interleaved16 {
    pub(crate) lines: Vec<Line64>,
    pub(crate) group_lines: usize,
    pub(crate) groups: usize,
}
impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("offset", &self.offset)
            .field("row_stride", &self.row_stride)
            .finish()
    }
}

fn is_weight_type(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K)
}

impl QMatrix {
    /// `rows` rows of `cols` elements of type `ty`; row r starts at
    /// offset + r * ty.row_bytes(cols). Err if out of bounds or cols not a whole
    /// number of blocks.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, bytes: WeightBytes, offset: usize) -> Result<QMatrix, QuantError> {
        if !is_weight_type(ty) {
            return Err(QuantError::Unsupported { ty: ty.name(), op: "a weight matrix" });
        }
        let row_stride = ty.row_bytes(cols).ok_or(QuantError::NotWholeBlocks { ty: ty.name(), n: cols, block: ty.block_size() })?;
        let needed = rows
            .checked_mul(row_stride)
            .and_then(|n| n.checked_add(offset))
            .ok_or(QuantError::Overflow("matrix byte size"))?;
        let len = (*bytes).as_ref().len();
        if needed > len {
            return Err(QuantError::OutOfBounds { ty: ty.name(), rows, cols, offset, needed, len });
        }
        Ok(QMatrix { ty, rows, cols, bytes, offset, row_stride, interleaved: None })
    }

    /// An F32 matrix owning `data` (rows * cols values, row-major).
    ///
    /// # Panics
    /// If `data.len() != rows * cols` (a caller bug, not input).
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> QMatrix {
        assert_eq!(data.len(), rows * cols, "QMatrix::from_f32: {} values for a {rows}x{cols} matrix", data.len());
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        QMatrix { ty: GgmlType::F32, rows, cols, bytes: Arc::new(bytes), offset: 0, row_stride: 4 * cols, interleaved: None }
    }

    /// Quantizes `data` (rows * cols values, row-major) to `ty`.
    pub fn quantize(ty: GgmlType, rows: usize, cols: usize, data: &[f32]) -> Result<QMatrix, QuantError> {
        if data.len() != rows * cols {
            return Err(QuantError::WrongLength { what: "matrix data", expected: rows * cols, got: data.len() });
        }
        if !is_weight_type(ty) {
            return Err(QuantError::Unsupported { ty: ty.name(), op: "a weight matrix" });
        }
        let row_bytes = ty.row_bytes(cols).ok_or(QuantError::NotWholeBlocks { ty: ty.name(), n: cols, block: ty.block_size() })?;
        let mut bytes = Vec::with_capacity(rows * row_bytes);
        if cols > 0 {
            for row in data.chunks_exact(cols) {
                bytes.extend(super::quantize_row(ty, row)?);
            }
        }
        QMatrix::new(ty, rows, cols, Arc::new(bytes), 0)
    }

    /// The element type of every row.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    /// Rows (a linear layer's outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Elements per row (a linear layer's inputs); a whole number of blocks.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows r0..r1 (tensor-parallel split of a linear layer's outputs): shares the bytes.
    pub fn slice_rows(&self, r: Range<usize>) -> Result<QMatrix, QuantError> {
        if r.start > r.end || r.end > self.rows {
            return Err(QuantError::BadRange { what: "row", start: r.start, end: r.end, limit: self.rows });
        }
        Ok(QMatrix { rows: r.end - r.start, offset: self.offset + r.start * self.row_stride, interleaved: None, ..self.clone() })
    }

    /// Columns c0..c1 of every row (tensor-parallel split of a layer's inputs):
    /// shares the bytes, keeps the row stride; Err unless c0 and c1 fall on
    /// block boundaries.
    pub fn slice_cols(&self, c: Range<usize>) -> Result<QMatrix, QuantError> {
        if c.start > c.end || c.end > self.cols {
            return Err(QuantError::BadRange { what: "column", start: c.start, end: c.end, limit: self.cols });
        }
        let bs = self.ty.block_size();
        if !c.start.is_multiple_of(bs) || !c.end.is_multiple_of(bs) {
            return Err(QuantError::UnalignedColumns { ty: self.ty.name(), start: c.start, end: c.end, block: bs });
        }
        let skip = c.start / bs * self.ty.type_size();
        Ok(QMatrix { cols: c.end - c.start, offset: self.offset + skip, interleaved: None, ..self.clone() })
    }

    /// The bytes of row `r` (exactly `ty.row_bytes(cols)` of them).
    ///
    /// # Panics
    /// If `r >= rows()`.
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        assert!(r < self.rows, "row {r} of a matrix with {} rows", self.rows);
        let start = self.offset + r * self.row_stride;
        let len = self.ty.row_bytes(self.cols).unwrap_or(0);
        &(*self.bytes).as_ref()[start..start + len]
    }

    /// Decodes row `r` into `out` (cols values): the embedding lookup.
    ///
    /// # Panics
    /// If `r >= rows()` or `out.len() != cols()`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row: output has {} values, the matrix {} columns", out.len(), self.cols);
        // Lengths were checked at construction, so this cannot fail.
        super::dequantize_row(self.ty, self.row_bytes(r), out).expect("row length checked at construction");
    }

    /// Bytes from one row to the next (the full row of the parent tensor):
    /// what the CPU kernels step by.
    pub(crate) fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// The copy in the 16-row kernel layout, if one was made.
    pub(crate) fn interleaved(&self) -> Option<&Interleaved16> {
        self.interleaved.as_deref()
    }

    /// Keeps `copy` (made from this matrix's rows) beside the rows.
    pub(crate) fn set_interleaved(&mut self, copy: Interleaved16) {
        self.interleaved = Some(Arc::new(copy));
    }

    /// Where row 0 starts, for the CPU kernels' raw reads.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, reason = "only the x86_64 kernels read rows through raw pointers"))]
    pub(crate) fn base_ptr(&self) -> *const u8 {
        // wrapping_add, not add: with rows >= 1 the offset is inside the buffer
        // (`new` checked offset + rows * row_stride <= len, and slicing only
        // moves it within that range), but a column slice of a matrix with no
        // rows may point past its end. Such a pointer is never read, and
        // computing it must not be undefined behaviour.
        (*self.bytes).as_ref().as_ptr().wrapping_add(self.offset)
    }
}

/// Where each type keeps its f16 scales (byte offsets inside a block).
fn f16_scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[0],
    }
}

impl QMatrix {
    /// A `rows` × `cols` matrix of `ty` with random bytes in every block
    /// (every bit pattern of quants, packed scales and high bits) and its f16
    /// scales set to random sane values (±0.001 to ±0.021), the same for the
    /// same `seed`: what the kernels' tests and the benches multiply. `cols`
    /// must be whole blocks.
    pub fn random(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Result<QMatrix, QuantError> {
        let rb = ty.row_bytes(cols).ok_or(QuantError::NotWholeBlocks { ty: ty.name(), n: cols, block: ty.block_size() })?;
        let len = rows.checked_mul(rb).ok_or(QuantError::Overflow("matrix byte size"))?;
        // xorshift64: fast, and the same bytes on every machine.
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut bytes: Vec<u8> = (0..len).map(|_| (next() >> 32) as u8).collect();
        for blk in bytes.chunks_exact_mut(ty.type_size()) {
            for &o in f16_scale_offsets(ty) {
                let v = 1e-3 + (next() >> 40) as f32 / (1u64 << 24) as f32 * 0.02;
                let v = if next() & 1 == 0 { v } else { -v };
                blk[o..o + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        }
        QMatrix::new(ty, rows, cols, Arc::new(bytes), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_errors() {
        let bytes: WeightBytes = Arc::new(vec![0u8; 100]);
        assert!(matches!(
            QMatrix::new(GgmlType::Q4_0, 6, 32, bytes.clone(), 0),
            Err(QuantError::OutOfBounds { needed: 108, len: 100, .. })
        ));
        assert!(QMatrix::new(GgmlType::Q4_0, 5, 32, bytes.clone(), 10).is_ok());
        assert!(QMatrix::new(GgmlType::Q4_0, 5, 32, bytes.clone(), 11).is_err());
        assert!(matches!(QMatrix::new(GgmlType::Q4_0, 1, 33, bytes.clone(), 0), Err(QuantError::NotWholeBlocks { .. })));
        assert!(QMatrix::new(GgmlType::Q8_K, 1, 256, Arc::new(vec![0u8; 292]), 0).is_err());
        assert!(QMatrix::new(GgmlType::Q4_0, usize::MAX / 2, 32, bytes.clone(), 0).is_err());
        let m = QMatrix::new(GgmlType::Q4_0, 2, 64, bytes, 0).unwrap();
        assert!(matches!(m.slice_cols(16..64), Err(QuantError::UnalignedColumns { .. })));
        assert!(matches!(m.slice_cols(0..96), Err(QuantError::BadRange { .. })));
        assert!(matches!(m.slice_rows(1..3), Err(QuantError::BadRange { .. })));
        assert!(QMatrix::quantize(GgmlType::Q4_0, 2, 32, &[0.0; 63]).is_err());
        let e = QMatrix::new(GgmlType::Q4_0, 6, 32, Arc::new(vec![0u8; 100]), 0).unwrap_err();
        assert!(e.to_string().contains("needs 108 bytes"), "{e}");
    }
}
