//! Byte offsets inside ggml's blocks and helpers to read them from unaligned
//! little-endian bytes (GGUF tensors are memory-mapped; an 18- or 20-byte block
//! sits at any address, so nothing here assumes alignment).
//!
//! Layouts (ggml-common.h):
//! - Q4_0 (18 B): d f16, qs[16]: element j = low nibble of qs[j], j+16 = high nibble.
//! - Q4_1 (20 B): d f16, m f16, qs[16]: value = q * d + m.
//! - Q5_0 (22 B): d f16, qh[4] (bit j = 5th bit of element j), qs[16] as Q4_0: value = (q - 16) * d.
//! - Q5_1 (24 B): d f16, m f16, qh[4], qs[16]: value = q * d + m.
//! - Q8_0 (34 B): d f16, qs[32] i8.
//! - Q8_1 (36 B): d f16, s f16 (= d * sum(qs)), qs[32] i8.
//! - Q2_K (84 B): scales[16] (low nibble scale, high nibble min, per 16 elements),
//!   qs[64] (2 bits), d f16, dmin f16: value = d*sc*q - dmin*m.
//! - Q3_K (110 B): hmask[32] (3rd bit), qs[64] (low 2 bits), scales[12] (16 packed
//!   6-bit scales, stored +32), d f16: value = d*(sc-32)*(q - 4 if the hmask bit is clear).
//! - Q4_K (144 B): d f16, dmin f16, scales[12] (8 six-bit scales + 8 six-bit mins), qs[128].
//! - Q5_K (176 B): d f16, dmin f16, scales[12] as Q4_K, qh[32] (5th bits), qs[128].
//! - Q6_K (210 B): ql[128], qh[64], scales[16] i8, d f16.
//! - Q8_K (292 B): d f32, qs[256] i8, bsums[16] i16 (sums of 16 consecutive qs).
//! - IQ4_NL (18 B): d f16, qs[16] as Q4_0, each nibble an index into `KVALUES_IQ4NL`.
//! - IQ4_XS (136 B): d f16, scales_h u16, scales_l[4], qs[128]: 8 sub-blocks of 32
//!   as IQ4_NL, each with a 6-bit scale (stored +32) from a scales_l nibble and 2 scales_h bits.
//!
//! In every 2- and 3-bit K-quant, element e of half h = e / 128 and quarter
//! j = (e % 128) / 32 sits at bits 2j of qs[32h + e % 32].

use half::f16;

pub(crate) const QK: usize = 32;
pub(crate) const QK_K: usize = super::QK_K;

pub(crate) const Q4_0_BYTES: usize = 18;
pub(crate) const Q4_1_BYTES: usize = 20;
pub(crate) const Q5_0_BYTES: usize = 22;
pub(crate) const Q5_1_BYTES: usize = 24;
pub(crate) const Q8_0_BYTES: usize = 34;
pub(crate) const IQ4_NL_BYTES: usize = 18;
#[allow(dead_code, reason = "layout documentation beside the other block sizes, checked against `type_size` in tests, which are its only readers")]
pub(crate) const Q8_1_BYTES: usize = 36;
pub(crate) const Q2_K_BYTES: usize = 84;
pub(crate) const Q3_K_BYTES: usize = 110;
pub(crate) const Q4_K_BYTES: usize = 144;
pub(crate) const Q5_K_BYTES: usize = 176;
pub(crate) const IQ4_XS_BYTES: usize = 136;
pub(crate) const Q6_K_BYTES: usize = 210;
#[allow(dead_code, reason = "layout documentation beside the other block sizes, checked against `type_size` in tests, which are its only readers")]
pub(crate) const Q8_K_BYTES: usize = 292;

/// Q4_K: offset of `scales` and of `qs`.
pub(crate) const Q4_K_SCALES: usize = 4;
pub(crate) const Q4_K_QS: usize = 16;
/// Q2_K: offsets of `qs`, `d` and `dmin`.
pub(crate) const Q2_K_QS: usize = 16;
pub(crate) const Q2_K_D: usize = 80;
/// Q3_K: offsets of `qs`, `scales` and `d` (hmask is at 0).
pub(crate) const Q3_K_QS: usize = 32;
pub(crate) const Q3_K_SCALES: usize = 96;
pub(crate) const Q3_K_D: usize = 108;
/// Q5_K: offsets of `qh` and `qs` (d, dmin, scales as Q4_K).
pub(crate) const Q5_K_QH: usize = 16;
pub(crate) const Q5_K_QS: usize = 48;
/// IQ4_XS: offsets of `scales_l` and `qs`.
pub(crate) const IQ4_XS_SCALES_L: usize = 4;
pub(crate) const IQ4_XS_QS: usize = 8;

/// IQ4_NL's 16 non-linear levels (ggml's kvalues_iq4nl), also used by IQ4_XS.
pub(crate) const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Q6_K: offsets of `qh`, `scales` and `d`.
pub(crate) const Q6_K_QH: usize = 128;
pub(crate) const Q6_K_SCALES: usize = 192;
pub(crate) const Q6_K_D: usize = 208;
/// Q8_K: offset of `qs` (bsums follow at 260).
pub(crate) const Q8_K_QS: usize = 4;

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[inline(always)]
pub(crate) fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// `x` rounded to f16 (nearest, ties to even) and back, as F16C's vcvtps2ph
/// does: how ggml stores a scale it computed in f32, and what llama.cpp's f16
/// KV cache does to the values that meet it (q, probabilities). Done on
/// the bits so it inlines and vectorizes (a call per value into a conversion
/// routine cost 5% of a batched decode step). Below 2^-14 f16 has subnormals,
/// a fixed step of 2^-24: adding and taking away 0.5 (whose f32 step is 2^-24)
/// rounds to that step. Small probabilities land there on every long prompt.
#[inline(always)]
pub(crate) fn round_f16(x: f32) -> f32 {
    let b = x.to_bits();
    let abs = b & 0x7fff_ffff;
    if abs >= 0x7f80_0000 {
        return x; // inf and NaN stay as they are
    }
    if abs < 0x3880_0000 {
        // |x| < 2^-14: an f16 subnormal (or zero).
        let half = f32::from_bits((b & 0x8000_0000) | 0x3f00_0000);
        return ((x + half) - half).copysign(x); // -0 stays -0
    }
    let rounded = f32::from_bits(b.wrapping_add(0x0fff + ((b >> 13) & 1)) & !0x1fff);
    // Past f16's largest finite value (65504) rounding goes to infinity.
    if rounded.abs() > 65504.0 {
        return f32::INFINITY.copysign(x);
    }
    rounded
}

#[inline(always)]
pub(crate) fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// ggml_compute_fp32_to_bf16: round to nearest even, NaN kept quiet.
#[inline]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// ggml's get_scale_min_k4: the 6-bit scale and min of sub-block `j` (0..8) of
/// a Q4_K block's 12 packed scale bytes.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All 8 scales and 8 mins of a Q4_K block.
#[inline(always)]
pub(crate) fn scales_mins_k4(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        (sc[j], mn[j]) = scale_min_k4(j, q);
    }
    (sc, mn)
}

/// Q5_0 / Q5_1: the 32 five-bit quants (0..31) of a block from its qh word and
/// 16 nibble bytes (element j < 16: low nibble of qs[j]; j >= 16: high nibble of qs[j-16]).
#[inline(always)]
pub(crate) fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    std::array::from_fn(|e| {
        let nib = if e < 16 { qs[e] & 0x0f } else { qs[e - 16] >> 4 };
        nib | ((((qh >> e) & 1) as u8) << 4)
    })
}

#[inline(always)]
pub(crate) fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Q3_K's 16 signed scales (-32..31) from its 12 packed bytes: scale j's low
/// nibble is in byte j % 8 (high half for j >= 8), its top 2 bits in byte
/// 8 + j % 4 at bits 2 * (j / 4).
#[inline(always)]
pub(crate) fn scales_q3_k(q: &[u8]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let lo = if j < 8 { q[j] & 0x0f } else { q[j - 8] >> 4 };
        let hi = (q[8 + j % 4] >> (2 * (j / 4))) & 3;
        (lo | (hi << 4)) as i8 - 32
    })
}

/// Inverse of `scales_q3_k`: 16 scales in -32..31 into 12 bytes.
pub(crate) fn pack_scales_q3_k(sc: &[i8; 16]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..16 {
        let l = (sc[j] as i32 + 32).clamp(0, 63) as u8;
        if j < 8 {
            q[j] |= l & 0x0f;
        } else {
            q[j - 8] |= (l & 0x0f) << 4;
        }
        q[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
    }
    q
}

/// IQ4_XS: the signed scale (-32..31) of sub-block `ib` (0..8) of block `b`.
#[inline(always)]
pub(crate) fn scale_iq4_xs(b: &[u8], ib: usize) -> i32 {
    let sh = u16::from_le_bytes([b[2], b[3]]);
    let lo = (b[IQ4_XS_SCALES_L + ib / 2] >> (4 * (ib % 2))) & 0x0f;
    let hi = ((sh >> (2 * ib)) & 3) as u8;
    (lo | (hi << 4)) as i32 - 32
}

/// Inverse of `scale_min_k4`: packs 8 six-bit scales and mins into 12 bytes.
pub(crate) fn pack_scales_mins_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (sc[j] & 63, mn[j] & 63);
        if j < 4 {
            q[j] |= ls;
            q[j + 4] |= lm;
        } else {
            q[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            q[j - 4] |= (ls >> 4) << 6;
            q[j] |= (lm >> 4) << 6;
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GgmlType;

    #[test]
    fn sizes_match_types() {
        assert_eq!(GgmlType::Q4_0.type_size(), Q4_0_BYTES);
        assert_eq!(GgmlType::Q4_1.type_size(), Q4_1_BYTES);
        assert_eq!(GgmlType::Q8_0.type_size(), Q8_0_BYTES);
        assert_eq!(GgmlType::Q8_1.type_size(), Q8_1_BYTES);
        assert_eq!(GgmlType::Q4_K.type_size(), Q4_K_BYTES);
        assert_eq!(GgmlType::Q6_K.type_size(), Q6_K_BYTES);
        assert_eq!(GgmlType::Q8_K.type_size(), Q8_K_BYTES);
        assert_eq!(GgmlType::Q5_0.type_size(), Q5_0_BYTES);
        assert_eq!(GgmlType::Q5_1.type_size(), Q5_1_BYTES);
        assert_eq!(GgmlType::Q2_K.type_size(), Q2_K_BYTES);
        assert_eq!(GgmlType::Q3_K.type_size(), Q3_K_BYTES);
        assert_eq!(GgmlType::Q5_K.type_size(), Q5_K_BYTES);
        assert_eq!(GgmlType::IQ4_NL.type_size(), IQ4_NL_BYTES);
        assert_eq!(GgmlType::IQ4_XS.type_size(), IQ4_XS_BYTES);
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
    }

    #[test]
    fn q3_k_scales_match_ggml_unpacking() {
        // ggml's dequantize_row_q3_K rebuilds the scales with u32 masks; check the
        // per-index formula above (and the packer) against that word arithmetic.
        for seed in 0..64u32 {
            let sc: [i8; 16] = std::array::from_fn(|j| ((seed as i32 * 7 + j as i32 * 13) % 64 - 32) as i8);
            let q = pack_scales_q3_k(&sc);
            let mut aux = [u32_at(&q, 0), u32_at(&q, 4), u32_at(&q, 8), 0];
            let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
            let tmp = aux[2];
            aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
            aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
            aux[0] = (aux[0] & k2) | ((tmp & k1) << 4);
            aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);
            let bytes: Vec<i8> = aux.iter().flat_map(|w| w.to_le_bytes()).map(|b| b as i8 - 32).collect();
            assert_eq!(&bytes[..], &sc[..]);
            assert_eq!(scales_q3_k(&q), sc);
        }
    }

    #[test]
    fn k4_scales_roundtrip_all_values() {
        // Every 6-bit value in every slot survives packing and ggml's unpacking.
        for v in 0..64u8 {
            let sc: [u8; 8] = std::array::from_fn(|j| ((v as usize + j * 7) % 64) as u8);
            let mn: [u8; 8] = std::array::from_fn(|j| ((v as usize * 3 + j * 11) % 64) as u8);
            let q = pack_scales_mins_k4(&sc, &mn);
            assert_eq!(scales_mins_k4(&q), (sc, mn));
        }
    }

    #[test]
    fn bf16_rounding_known_values() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down).
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_to_f32(0xc000), -2.0);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }

    #[test]
    fn round_f16_matches_a_real_f16() {
        let mut x = 1e-9f32;
        while x < 1e6 {
            for v in [x, -x, x * 1.000_3, x * 0.999_7, x * 1.000_01] {
                assert_eq!(round_f16(v).to_bits(), half::f16::from_f32(v).to_f32().to_bits(), "{v}");
            }
            x *= 1.013;
        }
        // Ties at the subnormal step and at the top.
        for v in [3.0 * 2f32.powi(-25), 5.0 * 2f32.powi(-25), 65519.0, 65520.0, 2f32.powi(-14), 2f32.powi(-25)] {
            assert_eq!(round_f16(v).to_bits(), half::f16::from_f32(v).to_f32().to_bits(), "{v}");
        }
        assert_eq!(round_f16(0.0), 0.0);
        assert!(round_f16(f32::NAN).is_nan());
    }
}
