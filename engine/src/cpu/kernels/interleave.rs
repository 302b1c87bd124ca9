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
//! they are. The copy is built only where gemm16 runs (AVX512-VNNI), and
//! costs the matrix's size again in memory (the file's pages, no longer
//! read by the matmuls, can leave the page cache).

use crate::quant::blocks::{IQ4_NL_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES};
use crate::quant::{GgmlType, Interleaved16, Line64, QMatrix};

/// Rows per group (gemm16's zmm lanes).
const ROWS: usize = 16;

/// Lines per group of the copy of a `ty` matrix of `nb` blocks a row, or
/// None for a type the copy does not take.
pub(crate) fn group_lines(ty: GgmlType, nb: usize) -> Option<usize> {
    match ty {
        GgmlType::Q4_1 => Some(5 * nb),
        GgmlType::Q4_0 => Some(9 * nb.div_ceil(2)),
        GgmlType::Q8_0 => Some(17 * nb.div_ceil(2)),
        GgmlType::Q5_0 => Some(11 * nb.div_ceil(2)),
        GgmlType::Q5_1 => Some(6 * nb),
        GgmlType::IQ4_NL => Some(9 * nb.div_ceil(2)),
        _ => None,
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
    let mut lines = vec![Line64([0; 64]); groups * per_group];
    for g in 0..groups {
        let group = &mut lines[g * per_group..(g + 1) * per_group];
        for r in 0..ROWS {
            let row = w.row_bytes(g * ROWS + r);
            let lane = 4 * r;
            for b in 0..nb {
                match ty {
                    GgmlType::Q4_1 => {
                        let blk = &row[b * Q4_1_BYTES..(b + 1) * Q4_1_BYTES];
                        for k in 0..4 {
                            put(group, 5 * b + k, lane, &blk[4 + 4 * k..8 + 4 * k], 0);
                        }
                        put(group, 5 * b + 4, lane, &blk[..4], 0);
                    }
                    GgmlType::Q5_0 => {
                        let blk = &row[b * Q5_0_BYTES..(b + 1) * Q5_0_BYTES];
                        let (base, at) = (11 * (b / 2), 11 * (b / 2) + 5 * (b % 2));
                        for k in 0..4 {
                            put(group, at + k, lane, &blk[6 + 4 * k..10 + 4 * k], 0);
                        }
                        put(group, at + 4, lane, &blk[2..6], 0);
                        put(group, base + 10, lane + 2 * (b % 2), &blk[..2], 0);
                    }
                    GgmlType::Q5_1 => {
                        let blk = &row[b * Q5_1_BYTES..(b + 1) * Q5_1_BYTES];
                        for k in 0..4 {
                            put(group, 6 * b + k, lane, &blk[8 + 4 * k..12 + 4 * k], 0);
                        }
                        put(group, 6 * b + 4, lane, &blk[4..8], 0);
                        put(group, 6 * b + 5, lane, &blk[..4], 0);
                    }
                    GgmlType::Q4_0 | GgmlType::IQ4_NL => {
                        let bytes = if ty == GgmlType::Q4_0 { Q4_0_BYTES } else { IQ4_NL_BYTES };
                        let blk = &row[b * bytes..(b + 1) * bytes];
                        let base = 9 * (b / 2);
                        for k in 0..4 {
                            put(group, base + 4 * (b % 2) + k, lane, &blk[2 + 4 * k..6 + 4 * k], 0);
                        }
                        put(group, base + 8, lane + 2 * (b % 2), &blk[..2], 0);
                    }
                    _ => {
                        let blk = &row[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
                        let base = 17 * (b / 2);
                        for k in 0..8 {
                            put(group, base + 8 * (b % 2) + k, lane, &blk[2 + 4 * k..6 + 4 * k], 0x80);
                        }
                        put(group, base + 16, lane + 2 * (b % 2), &blk[..2], 0);
                    }
                }
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

/// Gives `w` its copy in gemm16's layout where gemm16 will multiply it on
/// this CPU (AVX512-VNNI, a type the copy takes, rows gemm16 can address).
/// `FERRY_INTERLEAVE=0` leaves every matrix without one (to compare).
pub fn interleave_for_this_cpu(w: &mut QMatrix) {
    #[cfg(target_arch = "x86_64")]
    {
        let off = std::env::var("FERRY_INTERLEAVE").is_ok_and(|v| v.trim() == "0");
        if off || super::simd::detected() != super::simd::Isa::Avx512Vnni || !super::gemm16::stride_ok(w.row_stride()) {
            return;
        }
        if let Some(copy) = interleave(w) {
            w.set_interleaved(copy);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = w;
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
        // Types gemm16 does not take, and too few rows, get none.
        assert!(interleave(&QMatrix::random(GgmlType::Q4_K, 32, 256, 1).unwrap()).is_none());
        assert!(interleave(&QMatrix::random(GgmlType::Q4_0, 15, 64, 1).unwrap()).is_none());
    }
}
