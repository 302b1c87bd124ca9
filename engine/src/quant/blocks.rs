//! Byte offsets inside ggml's blocks and helpers to read them from unaligned
//! little-endian bytes (GGUF tensors are memory-mapped; an 18- or 20-byte block
//! sits at any address, so nothing here assumes alignment).
//!
//! Layouts (ggml-common.h):
//! - Q4_0 (18 B): d f16, qs[16]: element j = low nibble of qs[j], j+16 = high nibble.
//! - Q4_1 (20 B): d f16, m f16, qs[16]: value = q * d + m.
//! - Q8_0 (34 B): d f16, qs[32] i8.
//! - Q8_1 (36 B): d f16, s f16 (= d * sum(qs)), qs[32] i8.
//! - Q4_K (144 B): d f16, dmin f16, scales[12] (8 six-bit scales + 8 six-bit mins), qs[128].
//! - Q6_K (210 B): ql[128], qh[64], scales[16] i8, d f16.
//! - Q8_K (292 B): d f32, qs[256] i8, bsums[16] i16 (sums of 16 consecutive qs).

// Kernels index several same-length arrays by one counter; iterators would obscure them.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use half::f16;

pub(crate) const QK: usize = 32;
pub(crate) const QK_K: usize = super::QK_K;

pub(crate) const Q4_0_BYTES: usize = 18;
pub(crate) const Q4_1_BYTES: usize = 20;
pub(crate) const Q8_0_BYTES: usize = 34;
#[allow(dead_code)] // layout documentation, checked in tests
pub(crate) const Q8_1_BYTES: usize = 36;
pub(crate) const Q4_K_BYTES: usize = 144;
pub(crate) const Q6_K_BYTES: usize = 210;
#[allow(dead_code)] // layout documentation, checked in tests
pub(crate) const Q8_K_BYTES: usize = 292;

/// Q4_K: offset of `scales` and of `qs`.
pub(crate) const Q4_K_SCALES: usize = 4;
pub(crate) const Q4_K_QS: usize = 16;
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
