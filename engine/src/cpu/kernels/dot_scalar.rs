//! Portable dot products of one weight row with one token's activations, the
//! way ggml's generic (scalar) vec_dot functions compute them: an exact integer
//! sum per block, scaled by the product of the two blocks' scales.

#![allow(clippy::needless_range_loop, reason = "kernels index several same-length arrays by one counter; iterators would obscure them")]

use super::act::ActRow;
use crate::quant::blocks::*;
use crate::quant::GgmlType;

/// Dot of weight row `w` (ggml bytes of `n` elements) with activations `a`
/// quantized to `ty`'s vec_dot_type (or f32 for float weights).
pub(crate) fn dot(ty: GgmlType, w: &[u8], a: &ActRow, n: usize) -> f32 {
    match ty {
        GgmlType::Q4_0 => q4_0(w, a, n / QK),
        GgmlType::Q4_1 => q4_1(w, a, n / QK),
        GgmlType::Q5_0 => q5_0(w, a, n / QK),
        GgmlType::Q5_1 => q5_1(w, a, n / QK),
        GgmlType::IQ4_NL => iq4_nl(w, a, n / QK),
        GgmlType::Q8_0 => q8_0(w, a, n / QK),
        GgmlType::Q2_K => q2_k(w, a, n / QK_K),
        GgmlType::Q3_K => q3_k(w, a, n / QK_K),
        GgmlType::Q4_K => q4_k(w, a, n / QK_K),
        GgmlType::Q5_K => q5_k(w, a, n / QK_K),
        GgmlType::IQ4_XS => iq4_xs(w, a, n / QK_K),
        GgmlType::Q6_K => q6_k(w, a, n / QK_K),
        GgmlType::F32 => a.f[..n].iter().zip(w.chunks_exact(4)).map(|(x, b)| f32_at(b, 0) * x).sum(),
        GgmlType::F16 => a.f[..n].iter().zip(w.chunks_exact(2)).map(|(x, b)| f16_at(b, 0) * x).sum(),
        GgmlType::BF16 => a.f[..n]
            .iter()
            .zip(w.chunks_exact(2))
            .map(|(x, b)| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])) * x)
            .sum(),
        // Not weight types: dequantize and dot (only reachable through vec_dot on odd input).
        GgmlType::Q8_1 | GgmlType::Q8_K => {
            let mut tmp = vec![0f32; n];
            match crate::quant::dequantize_row(ty, w, &mut tmp) {
                Ok(()) => tmp.iter().zip(a.f).map(|(x, y)| x * y).sum(),
                Err(_) => f32::NAN,
            }
        }
    }
}

fn q4_0(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q4_0_BYTES..(b + 1) * Q4_0_BYTES];
        let y = &a.qs[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..16 {
            let q = blk[2 + j];
            sumi += ((q & 0x0f) as i32 - 8) * y[j] as i32 + ((q >> 4) as i32 - 8) * y[j + 16] as i32;
        }
        sumf += sumi as f32 * (f16_at(blk, 0) * a.d[b]);
    }
    sumf
}

/// In the order of llama.cpp's x86 kernel (ggml_vec_dot_q4_1_q8_1, which the
/// SIMD kernels here follow too, see gemm16::tokens_q4_1): eight lanes of four
/// products, each accumulated with an fma per block, summed pairwise, plus the
/// m * s terms summed on their own. Every path then gives the same bits.
fn q4_1(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q4_1_BYTES..(b + 1) * Q4_1_BYTES];
        let y = &a.qs[b * QK..(b + 1) * QK];
        let dd = f16_at(blk, 0) * a.d[b];
        // value = q*d + m, so the dot is d*dy*sum(q*y) + m*(dy*sum(y)) = ... + m*s.
        summs += f16_at(blk, 2) * a.s[b];
        for (j, lane) in acc.iter_mut().enumerate() {
            // Lane j: elements 4j..4j+4; element e < 16 is byte e's low nibble,
            // element e >= 16 byte e-16's high nibble.
            let mut p = 0i32;
            for e in 4 * j..4 * j + 4 {
                let q = if e < 16 { blk[4 + e] & 0x0f } else { blk[4 + e - 16] >> 4 };
                p += q as i32 * y[e] as i32;
            }
            *lane = (p as f32).mul_add(dd, *lane);
        }
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + summs
}

fn q5_0(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q5_0_BYTES..(b + 1) * Q5_0_BYTES];
        let y = &a.qs[b * QK..(b + 1) * QK];
        let q = q5_values(u32_at(blk, 2), &blk[6..22]);
        let sumi: i32 = q.iter().zip(y).map(|(&q, &v)| (q as i32 - 16) * v as i32).sum();
        sumf += sumi as f32 * (f16_at(blk, 0) * a.d[b]);
    }
    sumf
}

/// value = q*d + m, so the dot is d*dy*sum(q*y) + m*s (s = dy * sum(y), f16), as ggml.
fn q5_1(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q5_1_BYTES..(b + 1) * Q5_1_BYTES];
        let y = &a.qs[b * QK..(b + 1) * QK];
        let q = q5_values(u32_at(blk, 4), &blk[8..24]);
        let sumi: i32 = q.iter().zip(y).map(|(&q, &v)| q as i32 * v as i32).sum();
        sumf += sumi as f32 * (f16_at(blk, 0) * a.d[b]) + f16_at(blk, 2) * a.s[b];
    }
    sumf
}

fn iq4_nl(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * IQ4_NL_BYTES..(b + 1) * IQ4_NL_BYTES];
        let y = &a.qs[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..16 {
            let q = blk[2 + j];
            sumi += KVALUES_IQ4NL[(q & 0x0f) as usize] as i32 * y[j] as i32;
            sumi += KVALUES_IQ4NL[(q >> 4) as usize] as i32 * y[j + 16] as i32;
        }
        sumf += sumi as f32 * (f16_at(blk, 0) * a.d[b]);
    }
    sumf
}

/// Per 16 elements: scale * sum(q*y) and, through the activations' bsums, min * sum(y).
fn q2_k(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q2_K_BYTES..(b + 1) * Q2_K_BYTES];
        let y = &a.qs[b * QK_K..(b + 1) * QK_K];
        let bsums = &a.bsums[b * 16..(b + 1) * 16];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for g in 0..16 {
            let sc = blk[g];
            summ += bsums[g] as i32 * (sc >> 4) as i32;
            let mut p = 0i32;
            for e in 16 * g..16 * g + 16 {
                let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let q = (blk[Q2_K_QS + 32 * h + l] >> (2 * j)) & 3;
                p += q as i32 * y[e] as i32;
            }
            sumi += p * (sc & 0x0f) as i32;
        }
        let dy = a.d[b];
        sumf += f16_at(blk, Q2_K_D) * dy * sumi as f32 - f16_at(blk, Q2_K_D + 2) * dy * summ as f32;
    }
    sumf
}

fn q3_k(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q3_K_BYTES..(b + 1) * Q3_K_BYTES];
        let y = &a.qs[b * QK_K..(b + 1) * QK_K];
        let sc = scales_q3_k(&blk[Q3_K_SCALES..Q3_K_SCALES + 12]);
        let mut sumi = 0i32;
        for g in 0..16 {
            let mut p = 0i32;
            for e in 16 * g..16 * g + 16 {
                let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let q = ((blk[Q3_K_QS + 32 * h + l] >> (2 * j)) & 3) as i32;
                let q = if (blk[l] >> (4 * h + j)) & 1 == 0 { q - 4 } else { q };
                p += q * y[e] as i32;
            }
            sumi += p * sc[g] as i32;
        }
        sumf += f16_at(blk, Q3_K_D) * a.d[b] * sumi as f32;
    }
    sumf
}

fn q5_k(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q5_K_BYTES..(b + 1) * Q5_K_BYTES];
        let y = &a.qs[b * QK_K..(b + 1) * QK_K];
        let bsums = &a.bsums[b * 16..(b + 1) * 16];
        let (sc, mn) = scales_mins_k4(&blk[Q4_K_SCALES..Q4_K_SCALES + 12]);
        let mut sum_mins = 0i32;
        for j in 0..16 {
            sum_mins += bsums[j] as i32 * mn[j / 2] as i32;
        }
        let mut sumi = 0i32;
        for s in 0..8 {
            let mut p = 0i32;
            for l in 0..32 {
                let byte = blk[Q5_K_QS + 32 * (s / 2) + l];
                let nib = if s % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                let q = nib | (((blk[Q5_K_QH + l] >> s) & 1) << 4);
                p += q as i32 * y[32 * s + l] as i32;
            }
            sumi += p * sc[s] as i32;
        }
        let dy = a.d[b];
        sumf += f16_at(blk, 0) * dy * sumi as f32 - f16_at(blk, 2) * dy * sum_mins as f32;
    }
    sumf
}

fn iq4_xs(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * IQ4_XS_BYTES..(b + 1) * IQ4_XS_BYTES];
        let y = &a.qs[b * QK_K..(b + 1) * QK_K];
        let mut sumi = 0i32;
        for ib in 0..8 {
            let qs = &blk[IQ4_XS_QS + 16 * ib..IQ4_XS_QS + 16 * ib + 16];
            let y = &y[32 * ib..32 * ib + 32];
            let mut p = 0i32;
            for j in 0..16 {
                p += KVALUES_IQ4NL[(qs[j] & 0x0f) as usize] as i32 * y[j] as i32;
                p += KVALUES_IQ4NL[(qs[j] >> 4) as usize] as i32 * y[j + 16] as i32;
            }
            sumi += p * scale_iq4_xs(blk, ib);
        }
        sumf += f16_at(blk, 0) * a.d[b] * sumi as f32;
    }
    sumf
}

fn q8_0(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
        let y = &a.qs[b * QK..(b + 1) * QK];
        let sumi: i32 = blk[2..34].iter().zip(y).map(|(&q, &v)| q as i8 as i32 * v as i32).sum();
        sumf += sumi as f32 * (f16_at(blk, 0) * a.d[b]);
    }
    sumf
}

fn q4_k(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q4_K_BYTES..(b + 1) * Q4_K_BYTES];
        let y = &a.qs[b * QK_K..(b + 1) * QK_K];
        let bsums = &a.bsums[b * 16..(b + 1) * 16];
        let (sc, mn) = scales_mins_k4(&blk[Q4_K_SCALES..Q4_K_SCALES + 12]);
        // The mins term uses the per-16 sums of the activations (bsums).
        let mut sum_mins = 0i32;
        for j in 0..16 {
            sum_mins += bsums[j] as i32 * mn[j / 2] as i32;
        }
        let qs = &blk[Q4_K_QS..Q4_K_QS + 128];
        let mut sumi = 0i32;
        for c in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * c + l];
                lo += (q & 0x0f) as i32 * y[64 * c + l] as i32;
                hi += (q >> 4) as i32 * y[64 * c + 32 + l] as i32;
            }
            sumi += lo * sc[2 * c] as i32 + hi * sc[2 * c + 1] as i32;
        }
        let dy = a.d[b];
        sumf += f16_at(blk, 0) * dy * sumi as f32 - f16_at(blk, 2) * dy * sum_mins as f32;
    }
    sumf
}

fn q6_k(w: &[u8], a: &ActRow, nb: usize) -> f32 {
    let mut sumf = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q6_K_BYTES..(b + 1) * Q6_K_BYTES];
        let y = &a.qs[b * QK_K..(b + 1) * QK_K];
        let mut sumi = 0i32;
        for h in 0..2 {
            let ql = &blk[64 * h..64 * h + 64];
            let qh = &blk[Q6_K_QH + 32 * h..Q6_K_QH + 32 * h + 32];
            let sc = &blk[Q6_K_SCALES + 8 * h..Q6_K_SCALES + 8 * h + 8];
            let y = &y[128 * h..128 * h + 128];
            let mut part = [0i32; 8]; // per 16 elements
            for l in 0..32 {
                let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                let is = l / 16;
                part[is] += q1 * y[l] as i32;
                part[is + 2] += q2 * y[l + 32] as i32;
                part[is + 4] += q3 * y[l + 64] as i32;
                part[is + 6] += q4 * y[l + 96] as i32;
            }
            for (k, p) in part.iter().enumerate() {
                sumi += p * sc[k] as i8 as i32;
            }
        }
        sumf += f16_at(blk, Q6_K_D) * a.d[b] * sumi as f32;
    }
    sumf
}
