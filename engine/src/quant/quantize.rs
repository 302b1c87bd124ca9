//! f32 -> ggml blocks, like ggml's quantize_row_*_ref (deterministic, used to
//! write weights). The K-quant quantizers are simpler than ggml's iterative
//! search (plain min/max ranges) but produce valid blocks with bounded error.

#![allow(clippy::needless_range_loop, reason = "kernels index several same-length arrays by one counter; iterators would obscure them")]

use super::blocks::*;
use super::{GgmlType, QuantError};

/// Encodes `src` as type `ty`. Err if `src.len()` is not a whole number of blocks.
pub fn quantize_row(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    let n = src.len();
    let bytes = ty.row_bytes(n).ok_or(QuantError::NotWholeBlocks { ty: ty.name(), n, block: ty.block_size() })?;
    let mut out = Vec::with_capacity(bytes);
    match ty {
        GgmlType::F32 => src.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => src.iter().for_each(|v| out.extend(f16_bytes(*v))),
        GgmlType::BF16 => src.iter().for_each(|v| out.extend(f32_to_bf16(*v).to_le_bytes())),
        GgmlType::Q4_0 => src.chunks_exact(QK).for_each(|x| q4_0_block(x, &mut out)),
        GgmlType::Q4_1 => src.chunks_exact(QK).for_each(|x| q4_1_block(x, &mut out)),
        GgmlType::Q5_0 => src.chunks_exact(QK).for_each(|x| q5_0_block(x, &mut out)),
        GgmlType::Q5_1 => src.chunks_exact(QK).for_each(|x| q5_1_block(x, &mut out)),
        GgmlType::IQ4_NL => src.chunks_exact(QK).for_each(|x| iq4_nl_block(x, &mut out)),
        GgmlType::IQ4_XS => src.chunks_exact(QK_K).for_each(|x| iq4_xs_block(x, &mut out)),
        GgmlType::Q2_K => src.chunks_exact(QK_K).for_each(|x| q2_k_block(x, &mut out)),
        GgmlType::Q3_K => src.chunks_exact(QK_K).for_each(|x| q3_k_block(x, &mut out)),
        GgmlType::Q5_K => src.chunks_exact(QK_K).for_each(|x| q5_k_block(x, &mut out)),
        GgmlType::Q8_0 => src.chunks_exact(QK).for_each(|x| q8_0_block(x, &mut out)),
        GgmlType::Q8_1 => src.chunks_exact(QK).for_each(|x| q8_1_block(x, &mut out)),
        GgmlType::Q4_K => src.chunks_exact(QK_K).for_each(|x| q4_k_block(x, &mut out)),
        GgmlType::Q6_K => src.chunks_exact(QK_K).for_each(|x| q6_k_block(x, &mut out)),
        GgmlType::Q8_K => src.chunks_exact(QK_K).for_each(|x| q8_k_block(x, &mut out)),
    }
    debug_assert_eq!(out.len(), bytes);
    Ok(out)
}

/// ggml's nearest_int: round half to even (the float magic-number trick).
#[inline(always)]
pub(crate) fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// The value with the largest magnitude (first one on ties), as ggml picks it.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    let (_, max) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16_bytes(d));
    for j in 0..16 {
        // (int8_t)(v + 8.5f): truncation toward zero, then capped at 15.
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        out.push(q0 | (q1 << 4));
    }
}

fn q4_1_block(x: &[f32], out: &mut Vec<u8>) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(min));
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        out.push(q0 | (q1 << 4));
    }
}

/// quantize_row_q5_0_ref: d = max / -16, q = min(31, trunc(x / d + 16.5)).
fn q5_0_block(x: &[f32], out: &mut Vec<u8>) {
    let (_, max) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] * id + 16.5) as i8).min(31) as u8);
    push_q5(f16_bytes(d).as_slice(), &q, out);
}

/// quantize_row_q5_1_ref: d = (max - min) / 31, m = min, q = round(x - min) / d.
fn q5_1_block(x: &[f32], out: &mut Vec<u8>) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: [u8; 32] = std::array::from_fn(|j| (((x[j] - min) * id + 0.5) as u8).min(31));
    let mut head = f16_bytes(d).to_vec();
    head.extend(f16_bytes(min));
    push_q5(&head, &q, out);
}

/// Writes a Q5_0 / Q5_1 block: `head` (scales), qh (5th bits), then the nibbles.
fn push_q5(head: &[u8], q: &[u8; 32], out: &mut Vec<u8>) {
    out.extend_from_slice(head);
    let qh = q.iter().enumerate().fold(0u32, |h, (j, &v)| h | (((v >> 4) as u32 & 1) << j));
    out.extend(qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
}

/// The IQ4_NL level nearest to `v` (in units of the block scale).
fn nearest_iq4(v: f32) -> u8 {
    let mut best = 0;
    for (i, &k) in KVALUES_IQ4NL.iter().enumerate() {
        if (v - k as f32).abs() < (v - KVALUES_IQ4NL[best] as f32).abs() {
            best = i;
        }
    }
    best as u8
}

/// 32 values as IQ4_NL indices with scale `d` first mapping the largest
/// magnitude onto the -127 level, then refitted by least squares (a one-step
/// version of ggml's search). Returns (d, indices).
fn iq4_fit(x: &[f32]) -> (f32, [u8; 32]) {
    let (amax, max) = signed_absmax(x);
    if amax == 0.0 {
        return (0.0, [8; 32]); // level 8 is 1: times d = 0 it is 0
    }
    let d0 = max / KVALUES_IQ4NL[0] as f32;
    let idx: [u8; 32] = std::array::from_fn(|j| nearest_iq4(x[j] / d0));
    let (mut xv, mut vv) = (0f32, 0f32);
    for j in 0..32 {
        let v = KVALUES_IQ4NL[idx[j] as usize] as f32;
        xv += x[j] * v;
        vv += v * v;
    }
    (if vv > 0.0 { xv / vv } else { d0 }, idx)
}

fn iq4_nl_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, _) = iq4_fit(x);
    let d = round_f16(d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let idx: [u8; 32] = std::array::from_fn(|j| nearest_iq4(x[j] * id));
    out.extend(f16_bytes(d));
    out.extend((0..16).map(|j| idx[j] | (idx[j + 16] << 4)));
}

/// IQ4_XS: each sub-block's own IQ4_NL scale, then those scales as 6-bit
/// multiples (-32..31) of the block's d, then the indices against the result.
fn iq4_xs_block(x: &[f32], out: &mut Vec<u8>) {
    let sub: [f32; 8] = std::array::from_fn(|ib| iq4_fit(&x[32 * ib..32 * ib + 32]).0);
    let (_, max_scale) = signed_absmax(&sub);
    let d = round_f16(max_scale / -32.0);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let ls: [i32; 8] = std::array::from_fn(|ib| nearest_int(sub[ib] * id).clamp(-32, 31));
    out.extend(f16_bytes(d));
    let sh = (0..8).fold(0u16, |h, ib| h | ((((ls[ib] + 32) >> 4) as u16 & 3) << (2 * ib)));
    out.extend(sh.to_le_bytes());
    out.extend((0..4).map(|k| (((ls[2 * k] + 32) & 0x0f) | (((ls[2 * k + 1] + 32) & 0x0f) << 4)) as u8));
    for ib in 0..8 {
        let dl = d * ls[ib] as f32;
        let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
        let idx: [u8; 32] = std::array::from_fn(|j| if dl != 0.0 { nearest_iq4(x[32 * ib + j] * idl) } else { 8 });
        out.extend((0..16).map(|j| idx[j] | (idx[j + 16] << 4)));
    }
}

/// Sub-block scales and mins for the asymmetric K-quants (value = d*sc*q - dmin*m,
/// q in 0..=qmax) with `bits`-bit sc and m over sub-blocks of `len` elements.
/// Ranges are rounded outward (ceil) so no element falls outside its grid.
/// Returns (d, dmin, sc, m).
fn k_ranges(x: &[f32], len: usize, qmax: f32, bits: u32) -> (f32, f32, Vec<u8>, Vec<u8>) {
    let top = ((1 << bits) - 1) as f32;
    let n = x.len() / len;
    let mins: Vec<f32> = x.chunks(len).map(|c| -c.iter().fold(0f32, |m, &v| m.min(v))).collect();
    let dmin = round_f16(mins.iter().fold(0f32, |m, &v| m.max(v)) / top);
    let lm: Vec<u8> = mins.iter().map(|&m| if dmin > 0.0 { ((m / dmin).ceil()).clamp(0.0, top) as u8 } else { 0 }).collect();
    let scales: Vec<f32> = (0..n)
        .map(|j| {
            let hi = x[len * j..len * j + len].iter().fold(f32::MIN, |m, &v| m.max(v));
            ((hi + dmin * lm[j] as f32) / qmax).max(0.0)
        })
        .collect();
    let d = round_f16(scales.iter().fold(0f32, |m, &v| m.max(v)) / top);
    let ls: Vec<u8> = scales.iter().map(|&s| if d > 0.0 { ((s / d).ceil()).clamp(0.0, top) as u8 } else { 0 }).collect();
    (d, dmin, ls, lm)
}

/// Each element's quant on its sub-block's grid (0..=qmax).
fn k_levels(x: &[f32], len: usize, qmax: i32, d: f32, dmin: f32, ls: &[u8], lm: &[u8]) -> [u8; QK_K] {
    std::array::from_fn(|i| {
        let (de, me) = (d * ls[i / len] as f32, dmin * lm[i / len] as f32);
        if de > 0.0 {
            nearest_int((x[i] + me) / de).clamp(0, qmax) as u8
        } else {
            0
        }
    })
}

/// Q2_K: value = d*sc*q - dmin*m, 4-bit sc and m per 16 elements, q in 0..4.
fn q2_k_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, ls, lm) = k_ranges(x, 16, 3.0, 4);
    let l = k_levels(x, 16, 3, d, dmin, &ls, &lm);
    out.extend((0..16).map(|j| ls[j] | (lm[j] << 4)));
    for h in 0..2 {
        for i in 0..32 {
            let e = 128 * h + i;
            out.push(l[e] | (l[e + 32] << 2) | (l[e + 64] << 4) | (l[e + 96] << 6));
        }
    }
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(dmin));
}

/// Q3_K: value = d*sc*q, signed 6-bit sc per 16 elements, q in -4..3. Each
/// group's largest magnitude goes to -4 (the scale takes its sign), as ggml.
fn q3_k_block(x: &[f32], out: &mut Vec<u8>) {
    let scales: [f32; 16] = std::array::from_fn(|j| signed_absmax(&x[16 * j..16 * j + 16]).1 / -4.0);
    let (_, max_scale) = signed_absmax(&scales);
    let d = round_f16(max_scale / -32.0);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let ls: [i8; 16] = std::array::from_fn(|j| nearest_int(scales[j] * id).clamp(-32, 31) as i8);
    let l: [u8; QK_K] = std::array::from_fn(|i| {
        let de = d * ls[i / 16] as f32;
        let q = if de != 0.0 { nearest_int(x[i] / de).clamp(-4, 3) } else { 0 };
        (q + 4) as u8
    });
    let mut hmask = [0u8; 32];
    let mut qs = [0u8; 64];
    for e in 0..QK_K {
        let (h, j, i) = (e / 128, (e % 128) / 32, e % 32);
        hmask[i] |= (l[e] >> 2) << (4 * h + j);
        qs[32 * h + i] |= (l[e] & 3) << (2 * j);
    }
    out.extend(hmask);
    out.extend(qs);
    out.extend(pack_scales_q3_k(&ls));
    out.extend(f16_bytes(d));
}

/// Q5_K: as Q4_K with q in 0..32, the 5th bits in qh.
fn q5_k_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, ls, lm) = k_ranges(x, 32, 31.0, 6);
    let l = k_levels(x, 32, 31, d, dmin, &ls, &lm);
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(dmin));
    out.extend(pack_scales_mins_k4(&ls[..].try_into().unwrap(), &lm[..].try_into().unwrap()));
    let mut qh = [0u8; 32];
    for e in 0..QK_K {
        qh[e % 32] |= (l[e] >> 4) << (e / 32);
    }
    out.extend(qh);
    for c in 0..4 {
        for i in 0..32 {
            out.push((l[64 * c + i] & 0x0f) | ((l[64 * c + 32 + i] & 0x0f) << 4));
        }
    }
}

fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let (amax, _) = signed_absmax(x);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16_bytes(d));
    // roundf: half away from zero.
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

fn q8_1_block(x: &[f32], out: &mut Vec<u8>) {
    let (amax, _) = signed_absmax(x);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let qs: Vec<i8> = x.iter().map(|v| (v * id).round() as i8).collect();
    let sum: i32 = qs.iter().map(|&q| q as i32).sum();
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(sum as f32 * d));
    out.extend(qs.iter().map(|&q| q as u8));
}

fn q8_k_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, qs, bsums) = q8_k_values(x);
    out.extend(d.to_le_bytes());
    out.extend(qs.iter().map(|&q| q as u8));
    for s in bsums {
        out.extend(s.to_le_bytes());
    }
}

/// quantize_row_q8_K_ref for one super-block: (d, qs, bsums).
pub(crate) fn q8_k_values(x: &[f32]) -> (f32, [i8; QK_K], [i16; 16]) {
    let mut qs = [0i8; QK_K];
    let mut bsums = [0i16; 16];
    let (amax, max) = signed_absmax_strict(x);
    if amax == 0.0 {
        return (0.0, qs, bsums);
    }
    let iscale = -127.0 / max;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (j, s) in bsums.iter_mut().enumerate() {
        *s = qs[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
    }
    (1.0 / iscale, qs, bsums)
}

/// Q8_K's variant: `ax > amax` (same result as `signed_absmax` except for NaN).
fn signed_absmax_strict(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        let a = v.abs();
        if a > amax {
            amax = a;
            max = v;
        }
    }
    (amax, max)
}

/// Q4_K: each 32-element sub-block gets value = d*sc*q - dmin*m with q in 0..16.
/// Ranges are rounded outward (ceil) so no element falls outside its grid.
fn q4_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut mins = [0f32; 8]; // -(sub-block minimum), >= 0
    for j in 0..8 {
        let lo = x[32 * j..32 * j + 32].iter().fold(0f32, |m, &v| m.min(v));
        mins[j] = -lo;
    }
    let max_min = mins.iter().fold(0f32, |m, &v| m.max(v));
    let dmin = round_f16(max_min / 63.0);
    let mut lm = [0u8; 8];
    for j in 0..8 {
        lm[j] = if dmin > 0.0 { ((mins[j] / dmin).ceil() as i32).clamp(0, 63) as u8 } else { 0 };
    }
    // Sub-block scale that covers [-m_eff, max] in 15 steps.
    let mut scales = [0f32; 8];
    for j in 0..8 {
        let hi = x[32 * j..32 * j + 32].iter().fold(f32::MIN, |m, &v| m.max(v));
        let m_eff = dmin * lm[j] as f32;
        scales[j] = ((hi + m_eff) / 15.0).max(0.0);
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| m.max(v));
    let d = round_f16(max_scale / 63.0);
    let mut ls = [0u8; 8];
    for j in 0..8 {
        ls[j] = if d > 0.0 { ((scales[j] / d).ceil() as i32).clamp(0, 63) as u8 } else { 0 };
    }
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(dmin));
    out.extend(pack_scales_mins_k4(&ls, &lm));
    let mut l = [0u8; QK_K];
    for j in 0..8 {
        let de = d * ls[j] as f32;
        let me = dmin * lm[j] as f32;
        for i in 32 * j..32 * j + 32 {
            l[i] = if de > 0.0 { nearest_int((x[i] + me) / de).clamp(0, 15) as u8 } else { 0 };
        }
    }
    for c in 0..4 {
        for i in 0..32 {
            out.push(l[64 * c + i] | (l[64 * c + 32 + i] << 4));
        }
    }
}

/// Q6_K: value = d*sc*(q-32), sc signed 8-bit per 16 elements, q in 0..64.
fn q6_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0f32; 16];
    for j in 0..16 {
        let amax = x[16 * j..16 * j + 16].iter().fold(0f32, |m, &v| m.max(v.abs()));
        scales[j] = amax / 31.0; // q-32 in -31..31 keeps the grid symmetric
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| m.max(v));
    let d = round_f16(max_scale / 127.0);
    let mut ls = [0i8; 16];
    for j in 0..16 {
        ls[j] = if d > 0.0 { ((scales[j] / d).ceil() as i32).clamp(0, 127) as i8 } else { 0 };
    }
    let mut l = [0u8; QK_K];
    for (i, q) in l.iter_mut().enumerate() {
        let de = d * ls[i / 16] as f32;
        let v = if de > 0.0 { nearest_int(x[i] / de).clamp(-32, 31) } else { 0 };
        *q = (v + 32) as u8;
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        for i in 0..32 {
            let e = 128 * h + i;
            let (q1, q2, q3, q4) = (l[e], l[e + 32], l[e + 64], l[e + 96]);
            ql[64 * h + i] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
            ql[64 * h + 32 + i] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
            qh[32 * h + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(ls.iter().map(|&s| s as u8));
    out.extend(f16_bytes(d));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;

    /// Deterministic pseudo-random values (xorshift), roughly N(0, scale).
    pub(crate) fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                let mut acc = 0f32;
                for _ in 0..4 {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                }
                acc * scale * 1.7
            })
            .collect()
    }

    /// Largest |x - dequant(quant(x))| in each block of `bs`, relative to that
    /// block's max |x|.
    fn worst_rel_err(ty: GgmlType, x: &[f32]) -> f32 {
        let q = quantize_row(ty, x).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(ty, &q, &mut y).unwrap();
        let bs = ty.block_size().max(32);
        let mut worst = 0f32;
        for (xb, yb) in x.chunks(bs).zip(y.chunks(bs)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in xb.iter().zip(yb) {
                worst = worst.max((a - b).abs() / amax.max(1e-30));
            }
        }
        worst
    }

    #[test]
    fn roundtrip_errors_within_format_bounds() {
        let x = data(4096, 7, 1.0);
        // Bounds: half a quantization step relative to the block's max |x|, with
        // slack for f16 scales (and for K-quants, for the 6/8-bit sub-scales).
        let cases = [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 4e-3),
            (GgmlType::Q8_0, 0.5 / 127.0 + 1e-3),
            (GgmlType::Q8_1, 0.5 / 127.0 + 1e-3),
            (GgmlType::Q8_K, 0.5 / 127.0 + 1e-3),
            (GgmlType::Q4_0, 1.0 / 8.0 + 1e-2),
            (GgmlType::Q4_1, 2.0 / 15.0 * 0.5 + 1e-2),
            (GgmlType::Q4_K, 2.0 / 15.0 * 0.5 * 1.25 + 2e-2),
            (GgmlType::Q6_K, 0.5 / 31.0 * 1.25 + 5e-3),
            (GgmlType::Q5_0, 1.0 / 16.0 + 1e-2),
            (GgmlType::Q5_1, 2.0 / 31.0 * 0.5 + 1e-2),
            (GgmlType::Q5_K, 2.0 / 31.0 * 0.5 * 1.25 + 2e-2),
            // 2 bits: a third of a range per step, plus sub-scale slack.
            (GgmlType::Q2_K, 2.0 / 3.0 * 0.5 * 1.5 + 5e-2),
            // 3 bits, -4..3: the largest magnitude sits on -4, so one of the other
            // sign can be a whole step (a quarter of the max) off at 3.
            (GgmlType::Q3_K, 0.25 * 1.1 + 2e-2),
            // Non-linear levels: the widest gap (-127 to -104) is 23/127 of the range.
            (GgmlType::IQ4_NL, 23.0 / 127.0 * 0.5 * 1.25 + 2e-2),
            (GgmlType::IQ4_XS, 23.0 / 127.0 * 0.5 * 1.5 + 5e-2),
        ];
        for (ty, bound) in cases {
            let e = worst_rel_err(ty, &x);
            assert!(e <= bound, "{}: worst relative error {e} > {bound}", ty.name());
        }
    }

    #[test]
    fn q4_0_matches_ggml_known_values() {
        // x = j - 14 capped at 15, with x[5] = -16 the largest magnitude:
        // d = max / -8 = 2, id = 0.5, q = min(15, trunc(x * id + 8.5)).
        let mut x = [0f32; 32];
        for (j, v) in x.iter_mut().enumerate() {
            *v = (j as f32 - 14.0).min(15.0);
        }
        x[5] = -16.0;
        let q = quantize_row(GgmlType::Q4_0, &x).unwrap();
        assert_eq!(f16_at(&q, 0), 2.0);
        assert_eq!(q[2] & 0x0f, 1); // -7 + 8.5 = 1.5 -> 1
        assert_eq!(q[2 + 5] & 0x0f, 0); // -8 + 8.5 -> 0
        assert_eq!(q[2 + 15] >> 4, 15); // x[31] = 15: 16 capped to 15
        assert_eq!(q[2 + 14] >> 4, 15); // x[30] = 15
        assert_eq!(q[2 + 1] >> 4, 10); // x[17] = 3: 1.5 + 8.5 = 10
    }

    #[test]
    fn q8_0_rounds_half_away_from_zero() {
        let mut x = [0f32; 32];
        x[0] = 127.0; // d = 1
        x[1] = 2.5;
        x[2] = -2.5;
        let q = quantize_row(GgmlType::Q8_0, &x).unwrap();
        assert_eq!(f16_at(&q, 0), 1.0);
        assert_eq!(q[2] as i8, 127);
        assert_eq!(q[3] as i8, 3);
        assert_eq!(q[4] as i8, -3);
    }

    #[test]
    fn q8_k_matches_reference_semantics() {
        let mut x = data(256, 3, 1.0);
        x[17] = -5.0; // the signed max: iscale = 127/5 > 0
        let (d, qs, bs) = q8_k_values(&x);
        assert!((d - (-5.0 / -127.0f32)).abs() < 1e-7);
        assert_eq!(qs[17], -127);
        for j in 0..16 {
            assert_eq!(bs[j] as i32, qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum::<i32>());
        }
        let (d0, qs0, _) = q8_k_values(&[0.0; 256]);
        assert_eq!((d0, qs0), (0.0, [0i8; 256]));
    }

    #[test]
    fn zero_blocks_and_errors() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q5_K,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
        ] {
            let n = ty.block_size();
            let q = quantize_row(ty, &vec![0.0; n]).unwrap();
            let mut y = vec![1f32; n];
            dequantize_row(ty, &q, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{}", ty.name());
            assert!(matches!(quantize_row(ty, &vec![0.0; n + 1]), Err(QuantError::NotWholeBlocks { .. })));
        }
    }
}
