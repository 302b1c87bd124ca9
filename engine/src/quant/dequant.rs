//! Block decoding: ggml's dequantize_row_* for every supported type.

use super::blocks::*;
use super::{GgmlType, QuantError};

/// Checks that `src` holds exactly the bytes of `n` elements of `ty`.
pub(crate) fn check_row(ty: GgmlType, src_len: usize, n: usize) -> Result<(), QuantError> {
    let expected = ty.row_bytes(n).ok_or(QuantError::NotWholeBlocks {
        ty: ty.name(),
        n,
        block: ty.block_size(),
    })?;
    if src_len != expected {
        return Err(QuantError::WrongByteLength { ty: ty.name(), n, expected, got: src_len });
    }
    Ok(())
}

/// Decodes `dst.len()` elements of type `ty` from `src` (exactly their bytes).
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_row(ty, src.len(), dst.len())?;
    let bs = ty.type_size();
    let n = ty.block_size();
    match ty {
        GgmlType::F32 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32_at(b, 0);
            }
        }
        GgmlType::F16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        _ => {
            for (blk, out) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(n)) {
                dequant_block(ty, blk, out);
            }
        }
    }
    Ok(())
}

/// One block of a block-quantized type into `y` (block_size elements).
fn dequant_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for j in 0..16 {
                let q = b[2 + j];
                y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                let q = b[4 + j];
                y[j] = (q & 0x0f) as f32 * d + m;
                y[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = f16_at(b, 0);
            for (e, q) in q5_values(u32_at(b, 2), &b[6..22]).iter().enumerate() {
                y[e] = (*q as i32 - 16) as f32 * d;
            }
        }
        GgmlType::Q5_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (e, q) in q5_values(u32_at(b, 4), &b[8..24]).iter().enumerate() {
                y[e] = *q as f32 * d + m;
            }
        }
        GgmlType::IQ4_NL => {
            let d = f16_at(b, 0);
            for j in 0..16 {
                let q = b[2 + j];
                y[j] = d * KVALUES_IQ4NL[(q & 0x0f) as usize] as f32;
                y[j + 16] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
            }
        }
        GgmlType::IQ4_XS => {
            let d = f16_at(b, 0);
            for ib in 0..8 {
                let dl = d * scale_iq4_xs(b, ib) as f32;
                let qs = &b[IQ4_XS_QS + 16 * ib..IQ4_XS_QS + 16 * ib + 16];
                for j in 0..16 {
                    y[32 * ib + j] = dl * KVALUES_IQ4NL[(qs[j] & 0x0f) as usize] as f32;
                    y[32 * ib + j + 16] = dl * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
                }
            }
        }
        GgmlType::Q2_K => {
            let (d, dmin) = (f16_at(b, Q2_K_D), f16_at(b, Q2_K_D + 2));
            for e in 0..QK_K {
                let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let q = (b[Q2_K_QS + 32 * h + l] >> (2 * j)) & 3;
                let sc = b[e / 16];
                y[e] = d * (sc & 0x0f) as f32 * q as f32 - dmin * (sc >> 4) as f32;
            }
        }
        GgmlType::Q3_K => {
            let d = f16_at(b, Q3_K_D);
            let sc = scales_q3_k(&b[Q3_K_SCALES..Q3_K_SCALES + 12]);
            for e in 0..QK_K {
                let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let q = ((b[Q3_K_QS + 32 * h + l] >> (2 * j)) & 3) as i32;
                let high = (b[l] >> (4 * h + j)) & 1;
                let q = if high == 0 { q - 4 } else { q };
                y[e] = d * sc[e / 16] as f32 * q as f32;
            }
        }
        GgmlType::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, mn) = scales_mins_k4(&b[Q4_K_SCALES..Q4_K_SCALES + 12]);
            // As Q4_K, each 32 bytes of qs hold sub-blocks 2c (low) and 2c+1 (high);
            // qh[l] bit s is the 5th bit of element l of sub-block s.
            for s in 0..8 {
                let (dl, ml) = (d * sc[s] as f32, dmin * mn[s] as f32);
                for l in 0..32 {
                    let byte = b[Q5_K_QS + 32 * (s / 2) + l];
                    let nib = if s % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                    let q = nib | (((b[Q5_K_QH + l] >> s) & 1) << 4);
                    y[32 * s + l] = dl * q as f32 - ml;
                }
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = b[2 + j] as i8 as f32 * d;
            }
        }
        GgmlType::Q8_1 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = b[4 + j] as i8 as f32 * d;
            }
        }
        GgmlType::Q8_K => {
            let d = f32_at(b, 0);
            for j in 0..QK_K {
                y[j] = b[Q8_K_QS + j] as i8 as f32 * d;
            }
        }
        GgmlType::Q4_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[Q4_K_SCALES..Q4_K_SCALES + 12];
            let qs = &b[Q4_K_QS..Q4_K_QS + 128];
            // Each 32 bytes of qs hold two sub-blocks: low nibbles then high nibbles.
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                for l in 0..32 {
                    let q = qs[32 * c + l];
                    y[64 * c + l] = d1 * (q & 0x0f) as f32 - m1;
                    y[64 * c + 32 + l] = d2 * (q >> 4) as f32 - m2;
                }
            }
        }
        GgmlType::Q6_K => {
            let d = f16_at(b, Q6_K_D);
            for h in 0..2 {
                let ql = &b[64 * h..64 * h + 64];
                let qh = &b[Q6_K_QH + 32 * h..Q6_K_QH + 32 * h + 32];
                let sc = &b[Q6_K_SCALES + 8 * h..Q6_K_SCALES + 8 * h + 8];
                let y = &mut y[128 * h..128 * h + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("handled per element"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_0_known_block() {
        // d = 0.5; qs[j] = low nibble j, high nibble 15 - j.
        let mut b = h(0.5).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; 32];
        dequantize_row(GgmlType::Q4_0, &b, &mut y).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
        }
    }

    #[test]
    fn q4_1_known_block() {
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| (j & 0x0f) | (3 << 4)));
        let mut y = [0f32; 32];
        dequantize_row(GgmlType::Q4_1, &b, &mut y).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], 3.0 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q8_0_and_q8_1_known_blocks() {
        let mut b = h(2.0).to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let mut y = [0f32; 32];
        dequantize_row(GgmlType::Q8_0, &b, &mut y).unwrap();
        for (j, &v) in y.iter().enumerate() {
            assert_eq!(v, (j as f32 - 16.0) * 2.0);
        }
        let mut b1 = h(2.0).to_vec();
        b1.extend(h(123.0)); // s is ignored when decoding
        b1.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let mut y1 = [0f32; 32];
        dequantize_row(GgmlType::Q8_1, &b1, &mut y1).unwrap();
        assert_eq!(y, y1);
    }

    #[test]
    fn q4_k_known_block() {
        // d = 1, dmin = 0.5; sub-block j has scale j+1 and min 2j (6-bit, packed
        // the way ggml packs them); every nibble is 3 (low) / 12 (high).
        let sc: [u8; 8] = std::array::from_fn(|j| j as u8 + 1);
        let mn: [u8; 8] = std::array::from_fn(|j| 2 * j as u8 + 40);
        let mut b = h(1.0).to_vec();
        b.extend(h(0.5));
        b.extend(pack_scales_mins_k4(&sc, &mn));
        b.extend(std::iter::repeat_n(3u8 | (12 << 4), 128));
        let mut y = vec![0f32; 256];
        dequantize_row(GgmlType::Q4_K, &b, &mut y).unwrap();
        for (i, v) in y.iter().enumerate() {
            let j = i / 32; // sub-block
            let q = if j % 2 == 0 { 3.0 } else { 12.0 };
            let want = (j as f32 + 1.0) * q - 0.5 * (2.0 * j as f32 + 40.0);
            assert_eq!(*v, want, "element {i}");
        }
    }

    #[test]
    fn q6_k_known_block() {
        // Build the block from chosen 6-bit values with the bit layout written
        // out independently: element e of half h, position l in 0..32, quarter k.
        let want_q = |e: usize| ((e * 37 + 11) % 64) as i32; // 0..63
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for e in 0..256 {
            let (h, r) = (e / 128, e % 128);
            let (k, l) = (r / 32, r % 32);
            let q = want_q(e) as u8;
            // quarters 0,1 use low nibbles of ql[l], ql[l+32]; 2,3 the high nibbles.
            let qi = 64 * h + l + if k % 2 == 1 { 32 } else { 0 };
            ql[qi] |= if k < 2 { q & 0x0f } else { (q & 0x0f) << 4 };
            qh[32 * h + l] |= (q >> 4) << (2 * k);
        }
        let scales: [i8; 16] = std::array::from_fn(|j| (j as i32 * 9 - 70) as i8);
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend(h(0.125));
        let mut y = vec![0f32; 256];
        dequantize_row(GgmlType::Q6_K, &b, &mut y).unwrap();
        for e in 0..256 {
            let want = 0.125 * scales[e / 16] as f32 * (want_q(e) - 32) as f32;
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn q8_k_known_block() {
        let mut b = 0.5f32.to_le_bytes().to_vec();
        b.extend((0..256).map(|j| ((j % 200) - 100) as i8 as u8));
        b.extend([0u8; 32]);
        let mut y = vec![0f32; 256];
        dequantize_row(GgmlType::Q8_K, &b, &mut y).unwrap();
        for (j, &v) in y.iter().enumerate() {
            assert_eq!(v, ((j % 200) as f32 - 100.0) * 0.5);
        }
    }

    /// Dequantized values against f64 values computed from the chosen quants.
    fn assert_block(ty: GgmlType, b: &[u8], want: impl Fn(usize) -> f64) {
        let mut y = vec![0f32; ty.block_size()];
        dequantize_row(ty, b, &mut y).unwrap();
        for (e, v) in y.iter().enumerate() {
            assert!((*v as f64 - want(e)).abs() <= 1e-6 * want(e).abs(), "{} element {e}: {v} vs {}", ty.name(), want(e));
        }
    }

    /// Q5 nibbles and 5th bits as ggml packs them: element j < 16 in qs[j]'s low
    /// nibble, j >= 16 in qs[j - 16]'s high nibble, bit 4 of element e in qh bit e.
    fn q5_body(q: impl Fn(usize) -> u8) -> Vec<u8> {
        let qh: u32 = (0..32).map(|e| ((q(e) as u32 >> 4) & 1) << e).sum();
        let mut b = qh.to_le_bytes().to_vec();
        b.extend((0..16).map(|j| (q(j) & 15) | ((q(j + 16) & 15) << 4)));
        b
    }

    #[test]
    fn q5_0_and_q5_1_known_blocks() {
        let q = |e: usize| ((e * 7 + 3) % 32) as u8;
        let mut b = h(0.5).to_vec();
        b.extend(q5_body(q));
        assert_block(GgmlType::Q5_0, &b, |e| (q(e) as f64 - 16.0) * 0.5);
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.5));
        b.extend(q5_body(q));
        assert_block(GgmlType::Q5_1, &b, |e| q(e) as f64 * 0.25 - 1.5);
    }

    const LEVELS: [f64; 16] = [-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0];

    #[test]
    fn iq4_nl_and_iq4_xs_known_blocks() {
        let idx = |e: usize| ((e * 5 + 1) % 16) as u8;
        let mut b = h(0.125).to_vec();
        b.extend((0..16).map(|j| idx(j) | (idx(j + 16) << 4)));
        assert_block(GgmlType::IQ4_NL, &b, |e| LEVELS[idx(e) as usize] * 0.125);

        // 8 sub-blocks; sub-block ib's 6-bit scale: low 4 bits in scales_l[ib/2]
        // (low nibble for even ib), top 2 bits in scales_h bits 2ib..2ib+2.
        let ls = |ib: usize| ((ib * 9 + 5) % 64) as u16;
        let sh: u16 = (0..8).map(|ib| (ls(ib) >> 4) << (2 * ib)).sum();
        let mut b = h(0.5).to_vec();
        b.extend(sh.to_le_bytes());
        b.extend((0..4).map(|k| ((ls(2 * k) & 15) | ((ls(2 * k + 1) & 15) << 4)) as u8));
        let idx = |e: usize| ((e * 3 + e / 32) % 16) as u8;
        for ib in 0..8 {
            b.extend((0..16).map(|j| idx(32 * ib + j) | (idx(32 * ib + j + 16) << 4)));
        }
        assert_block(GgmlType::IQ4_XS, &b, |e| 0.5 * (ls(e / 32) as f64 - 32.0) * LEVELS[idx(e) as usize]);
    }

    /// 2-bit planes: element e of half h, quarter j, position l at bits 2j of byte 32h + l.
    fn planes(q: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut qs = vec![0u8; 64];
        for e in 0..256 {
            let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
            qs[32 * h + l] |= (q(e) & 3) << (2 * j);
        }
        qs
    }

    #[test]
    fn q2_k_known_block() {
        let (sc, mn) = (|g: usize| (g % 16) as u8, |g: usize| (15 - g) as u8);
        let q = |e: usize| ((e * 3 + 1) % 4) as u8;
        let mut b: Vec<u8> = (0..16).map(|g| sc(g) | (mn(g) << 4)).collect();
        b.extend(planes(q));
        b.extend(h(0.5));
        b.extend(h(0.25));
        assert_block(GgmlType::Q2_K, &b, |e| 0.5 * sc(e / 16) as f64 * q(e) as f64 - 0.25 * mn(e / 16) as f64);
    }

    #[test]
    fn q3_k_known_block() {
        let sc = |g: usize| ((g * 5) % 64) as i8 - 32;
        let q = |e: usize| ((e * 3 + e / 64) % 8) as i32 - 4; // -4..3
        // hmask bit (4h + j) of byte l is set when q >= 0 (no -4 applied).
        let mut b = vec![0u8; 32];
        for e in 0..256 {
            let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
            if q(e) >= 0 {
                b[l] |= 1 << (4 * h + j);
            }
        }
        b.extend(planes(|e| (q(e) + 4) as u8));
        b.extend(pack_scales_q3_k(&std::array::from_fn(sc)));
        b.extend(h(0.25));
        assert_block(GgmlType::Q3_K, &b, |e| 0.25 * sc(e / 16) as f64 * q(e) as f64);
    }

    #[test]
    fn q5_k_known_block() {
        let sc: [u8; 8] = std::array::from_fn(|j| 3 * j as u8 + 1);
        let mn: [u8; 8] = std::array::from_fn(|j| 63 - 5 * j as u8);
        let q = |e: usize| ((e * 11 + 5) % 32) as u8;
        let mut b = h(1.0).to_vec();
        b.extend(h(0.5));
        b.extend(pack_scales_mins_k4(&sc, &mn));
        // qh[l] bit s: 5th bit of element l of sub-block s; qs: sub-blocks 2c, 2c+1
        // in the low and high nibbles of bytes 32c..32c+32.
        let mut qh = [0u8; 32];
        let mut qs = [0u8; 128];
        for e in 0..256 {
            let (s, l) = (e / 32, e % 32);
            qh[l] |= (q(e) >> 4) << s;
            qs[32 * (s / 2) + l] |= (q(e) & 15) << (4 * (s % 2));
        }
        b.extend(qh);
        b.extend(qs);
        assert_block(GgmlType::Q5_K, &b, |e| sc[e / 32] as f64 * q(e) as f64 - 0.5 * mn[e / 32] as f64);
    }

    #[test]
    fn float_types() {
        let x = [1.5f32, -2.25, 0.0, 1e-3];
        let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut y = [0f32; 4];
        dequantize_row(GgmlType::F32, &b, &mut y).unwrap();
        assert_eq!(y, x);
        let b: Vec<u8> = x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        dequantize_row(GgmlType::F16, &b, &mut y).unwrap();
        assert_eq!(&y[..3], &x[..3]);
        assert!((y[3] - 1e-3).abs() < 1e-6);
        let b: Vec<u8> = [0x3fc0u16, 0xc010, 0, 0x3f80].iter().flat_map(|v| v.to_le_bytes()).collect();
        dequantize_row(GgmlType::BF16, &b, &mut y).unwrap();
        assert_eq!(y, [1.5, -2.25, 0.0, 1.0]);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut y = [0f32; 32];
        assert!(matches!(
            dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut y),
            Err(QuantError::WrongByteLength { expected: 18, got: 17, .. })
        ));
        let mut y = [0f32; 31];
        assert!(matches!(
            dequantize_row(GgmlType::Q4_0, &[0u8; 18], &mut y),
            Err(QuantError::NotWholeBlocks { .. })
        ));
    }
}
