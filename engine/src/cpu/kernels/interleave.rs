//! A second copy of a Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL or Q8_0 matrix in the layout gemm16 works
//! in, made once when the model loads, so that its one-token and few-token
//! paths read vectors instead of transposing 16 rows for every block.
//!
//! Why: gemm16 puts one weight row in each zmm lane. From the rows as the
//! file stores them that takes two or three 16x4 transposes a block (16
//! loads, 12 inserts and 8 shuffles each), which is most of the one-token
//! kernel's work: compute-bound at about the memory's speed on a Xeon, and
//! below it on Zen 4 (whose 512-bit shuffles run at half rate). Weights
//! stored transposed cost nothing to read but the bytes themselves.
//! llama.cpp does the same ("repacking" its Q4_0 weights for its AVX-512
//! and ARM kernels).
//!
//! The copy holds the same bytes, moved: lane r of each line is row r of the
//! group, dword by dword, as `gemm16::transpose16x4` would give them, so the
//! kernels compute the same integers and the same float operations in the
//! same order (the bits do not change). Per group of 16 rows, per block:
//! - Q4_1 (20-byte blocks: d, m, 16 bytes of nibbles): 4 lines of quants
//!   (line k: the block's quant bytes 4k..4k+4), then 1 line of d and m (the
//!   block's first dword): 320 bytes, the rows' own size.
//! - Q4_0, IQ4_NL and Q8_0 (2-byte d, then 16 or 32 quant bytes): blocks in
//!   pairs: the first block's 4 (8) quant lines, the second's, then 1 line
//!   whose dword r holds row r's two d values (the first in the low half).
//!   Q8_0's quants are stored with their top bit flipped (biased by 128:
//!   unsigned, as vpdpbusd takes them). An odd last block has a zero partner.
//! - Q5_0 (d, 4 bytes of fifth bits, 16 of nibbles): in pairs, each block's
//!   4 nibble lines and 1 line of fifth bits, then the pair's d line: 704
//!   bytes, the rows' own size. Q5_1 (d, m, fifth bits, nibbles): per block 4
//!   nibble lines, the fifth bits, d and m: 384 bytes. The fifth bits (and
//!   IQ4_NL's level table) are applied as the kernel reads, as from the rows,
//!   so the copy is no larger than the rows.
//!
//! Only whole groups are copied; the rows after the last one are read where
//! they are. [`copy_block`] says where a block's lines are, for this
//! module's builder and gemm16's reader alike. The copy is built only where
//! gemm16 runs (AVX512-VNNI, `matmul::interleave_for_this_cpu`), and
//! costs the matrix's size again in memory (the file's pages, no longer
//! read by the matmuls, can leave the page cache).

use crate::quant::blocks::{IQ4_NL_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES};
use crate::quant::{GgmlType, Interleaved16, Line64, QMatrix};

/// Rows per group (gemm16's zmm lanes).
const ROWS: usize = 16;

/// Where block `b`'s lines are in a group of the copy: the layout the module
/// docs describe, read by gemm16 (`FromLines`) and written by [`interleave`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CopyBlock {
    /// The first of the block's quant lines (4 of nibbles, Q8_0's 8 of bytes).
    pub(crate) quants: usize,
    /// The line of fifth bits (Q5_0 and Q5_1; unused for the others).
    pub(crate) qh: usize,
    /// The line of d (and m) values.
    pub(crate) scales: usize,
    /// Which half of each lane's dword of `scales` is this block's d (0 or
    /// 1: Q4_0, IQ4_NL, Q5_0 and Q8_0 pair two blocks' d in one line; Q4_1
    /// and Q5_1 keep d and m as the two halves of the block's own line).
    pub(crate) half: usize,
}

/// Block `b`'s lines in a group of the copy of a `ty` matrix (a type that
/// [`group_lines`] takes).
#[inline(always)]
pub(crate) const fn copy_block(ty: GgmlType, b: usize) -> CopyBlock {
    let (pair, odd) = (b / 2, b % 2);
    match ty {
        GgmlType::Q4_1 => CopyBlock { quants: 5 * b, qh: 0, scales: 5 * b + 4, half: 0 },
        GgmlType::Q5_1 => CopyBlock { quants: 6 * b, qh: 6 * b + 4, scales: 6 * b + 5, half: 0 },
        GgmlType::Q5_0 => CopyBlock { quants: 11 * pair + 5 * odd, qh: 11 * pair + 5 * odd + 4, scales: 11 * pair + 10, half: odd },
        GgmlType::Q8_0 => CopyBlock { quants: 17 * pair + 8 * odd, qh: 0, scales: 17 * pair + 16, half: odd },
        // Q4_0 and IQ4_NL.
        _ => CopyBlock { quants: 9 * pair + 4 * odd, qh: 0, scales: 9 * pair + 8, half: odd },
    }
}

/// Lines per group of the copy of a `ty` matrix of `nb` blocks a row, or
/// None for a type the copy does not take: up to the last block's scale
/// line, which ends every block's (or pair's) lines.
pub(crate) fn group_lines(ty: GgmlType, nb: usize) -> Option<usize> {
    use GgmlType::*;
    matches!(ty, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | IQ4_NL).then(|| nb.checked_sub(1).map_or(0, |last| copy_block(ty, last).scales + 1))
}

/// How a `ty` block's bytes fill its lines: the block's size, where its
/// quants start and how many 4-byte lines of them, the XOR applied to them,
/// where its fifth bits are, and how many bytes of d (and m) it starts with.
struct BlockBytes {
    size: usize,
    quants_at: usize,
    quant_lines: usize,
    flip: u8,
    qh_at: Option<usize>,
    scale_bytes: usize,
}

fn block_bytes(ty: GgmlType) -> BlockBytes {
    let plain = |size, quants_at, scale_bytes| BlockBytes { size, quants_at, quant_lines: 4, flip: 0, qh_at: None, scale_bytes };
    match ty {
        GgmlType::Q4_1 => plain(Q4_1_BYTES, 4, 4),
        GgmlType::Q5_0 => BlockBytes { qh_at: Some(2), ..plain(Q5_0_BYTES, 6, 2) },
        GgmlType::Q5_1 => BlockBytes { qh_at: Some(4), ..plain(Q5_1_BYTES, 8, 4) },
        GgmlType::Q4_0 => plain(Q4_0_BYTES, 2, 2),
        GgmlType::IQ4_NL => plain(IQ4_NL_BYTES, 2, 2),
        // Q8_0: 8 lines of quants, stored biased by 128 (unsigned, as vpdpbusd takes them).
        _ => BlockBytes { quant_lines: 8, flip: 0x80, ..plain(Q8_0_BYTES, 2, 2) },
    }
}

/// The copy of `w`'s whole groups of 16 rows, or None where gemm16 would
/// not read one (another type, fewer than 16 rows).
pub(crate) fn interleave(w: &QMatrix) -> Option<Interleaved16> {
    let ty = w.ty();
    let nb = w.cols() / ty.block_size().max(1);
    let per_group = group_lines(ty, nb)?;
    let groups = w.rows() / ROWS;
    if groups == 0 || nb == 0 {
        return None;
    }
    let bytes = block_bytes(ty);
    let mut lines = vec![Line64([0; 64]); groups * per_group];
    for g in 0..groups {
        let group = &mut lines[g * per_group..(g + 1) * per_group];
        for r in 0..ROWS {
            let row = w.row_bytes(g * ROWS + r);
            // Lane r: bytes 4r..4r + 4 of every line.
            let lane = 4 * r;
            for b in 0..nb {
                let blk = &row[b * bytes.size..(b + 1) * bytes.size];
                let at = copy_block(ty, b);
                for k in 0..bytes.quant_lines {
                    let q = bytes.quants_at + 4 * k;
                    put(group, at.quants + k, lane, &blk[q..q + 4], bytes.flip);
                }
                if let Some(qh) = bytes.qh_at {
                    put(group, at.qh, lane, &blk[qh..qh + 4], 0);
                }
                put(group, at.scales, lane + 2 * at.half, &blk[..bytes.scale_bytes], 0);
            }
        }
    }
    Some(Interleaved16 { lines, group_lines: per_group, groups })
}

/// `src`'s bytes, each XORed with `flip`, into `line` from byte `at`.
fn put(group: &mut [Line64], line: usize, at: usize, src: &[u8], flip: u8) {
    for (d, s) in group[line].0[at..at + src.len()].iter_mut().zip(src) {
        *d = s ^ flip;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_hold_each_rows_dwords() {
        // Q4_1: line 5b + k, lane r = row r's block b bytes 4 + 4k.., line 5b + 4 its d and m.
        let w = QMatrix::random(GgmlType::Q4_1, 35, 64, 3).unwrap();
        let c = interleave(&w).unwrap();
        assert_eq!((c.groups, c.group_lines, c.lines.len()), (2, 10, 20));
        let row = w.row_bytes(16 + 5);
        let line = |l: usize| &c.lines[10 + l].0[4 * 5..4 * 5 + 4];
        assert_eq!(line(5 + 2), &row[20 + 12..20 + 16]);
        assert_eq!(line(5 + 4), &row[20..24]);
        // Q8_0, an odd block count: the last pair's second block is zero,
        // the quants flipped, the d values paired.
        let w = QMatrix::random(GgmlType::Q8_0, 16, 96, 4).unwrap();
        let c = interleave(&w).unwrap();
        assert_eq!((c.groups, c.group_lines), (1, 34));
        let row = w.row_bytes(3);
        let lane = |l: usize| c.lines[l].0[12..16].to_vec();
        assert_eq!(lane(17 + 1), row[2 * 34 + 6..2 * 34 + 10].iter().map(|b| b ^ 0x80).collect::<Vec<_>>());
        assert_eq!(lane(17 + 16)[..2], row[2 * 34..2 * 34 + 2]);
        assert_eq!(lane(17 + 16)[2..], [0, 0]);
        assert_eq!(lane(16)[2..], row[34..36]);
        // Lines a group: per block (Q4_1 5, Q5_1 6) or per pair of blocks (Q4_0 and IQ4_NL 9, Q5_0 11, Q8_0 17).
        for (ty, per, paired) in [(GgmlType::Q4_1, 5, false), (GgmlType::Q5_1, 6, false), (GgmlType::Q4_0, 9, true), (GgmlType::IQ4_NL, 9, true), (GgmlType::Q5_0, 11, true), (GgmlType::Q8_0, 17, true)] {
            for nb in 1..6 {
                assert_eq!(group_lines(ty, nb), Some(per * if paired { nb.div_ceil(2) } else { nb }), "{ty:?}, {nb} blocks");
            }
        }
        assert_eq!(group_lines(GgmlType::Q4_K, 4), None);
        // Types gemm16 does not take, and too few rows, get none.
        assert!(interleave(&QMatrix::random(GgmlType::Q4_K, 32, 256, 1).unwrap()).is_none());
        assert!(interleave(&QMatrix::random(GgmlType::Q4_0, 15, 64, 1).unwrap()).is_none());
    }
}
