//! Weights to bf16 on the host, before they go to the device.
//!
//! The CUDA backend keeps every weight matrix in bf16 and multiplies with
//! cuBLAS (bf16 inputs, f32 accumulation). Safetensors F32/F16/BF16 and every
//! GGUF type ferry loads are converted here at load time: each row decoded by
//! the CPU backend's own dequantizer (`crate::quant::dequantize_row`), then
//! rounded to bf16 with `half::bf16::from_f32` (round to nearest even). BF16
//! rows are copied as they are, which is the same thing bit for bit.
//!
//! Supported: every type of [`GgmlType::ALL`] that can be a weight matrix
//! (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
//! Q6_K, IQ4_NL, IQ4_XS); Q8_1 and Q8_K are activation formats that no weight
//! file holds, and `QMatrix` refuses them already. Dequantizing costs memory:
//! a Q4_K model takes about 3.6 times its file size on the device. A quantized
//! GEMV kernel (decode reads the quantized blocks and dequantizes in
//! registers, as llama.cpp's MMVQ does) would keep the file's size on the
//! device and read ~4x fewer bytes per decoded token; prefill would still
//! dequantize tiles for tensor-core GEMMs. Neither is written.

use crate::quant::{GgmlType, QMatrix};
use rayon::prelude::*;

/// bf16 bits of `x`, rounded to nearest even (NaN stays NaN).
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// The types a weight matrix may have for the CUDA backend.
pub fn supported(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K)
}

/// `m` as row-major bf16 bits (rows × cols), rows converted in parallel.
pub fn matrix_to_bf16(m: &QMatrix) -> Vec<u16> {
    let cols = m.cols();
    let mut out = vec![0u16; m.rows() * cols];
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols).enumerate().for_each_init(
        || vec![0f32; cols],
        |row, (r, dst)| {
            if m.ty() == GgmlType::BF16 {
                for (d, b) in dst.iter_mut().zip(m.row_bytes(r).chunks_exact(2)) {
                    *d = u16::from_le_bytes([b[0], b[1]]);
                }
            } else {
                m.dequantize_row(r, row);
                for (d, &x) in dst.iter_mut().zip(row.iter()) {
                    *d = bf16_bits(x);
                }
            }
        },
    );
    out
}

/// An f32 vector (norm weights, biases) as bf16 bits.
pub fn vec_to_bf16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16_bits(x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{seeded, symmetric_f32};

    /// Every weight type: the conversion equals the CPU dequantizer followed by
    /// `half::bf16::from_f32`, bit for bit, on a matrix quantized from random
    /// values, and on a row slice and a column slice of it (tensor-parallel shards).
    #[test]
    fn every_weight_type_converts_like_the_cpu_dequantizer() {
        let (rows, cols) = (7, 512);
        let mut rng = seeded(25);
        let data: Vec<f32> = (0..rows * cols).map(|_| symmetric_f32(&mut rng) * 3.0).collect();
        let mut tested = Vec::new();
        for ty in GgmlType::ALL {
            if !supported(ty) {
                assert!(QMatrix::quantize(ty, rows, cols, &data).is_err(), "{ty:?} is no weight type");
                continue;
            }
            let m = QMatrix::quantize(ty, rows, cols, &data).unwrap();
            for part in [m.clone(), m.slice_rows(2..6).unwrap(), m.slice_cols(256..512).unwrap()] {
                let got = matrix_to_bf16(&part);
                let mut want = Vec::new();
                let mut row = vec![0f32; part.cols()];
                for r in 0..part.rows() {
                    crate::quant::dequantize_row(part.ty(), part.row_bytes(r), &mut row).unwrap();
                    want.extend(row.iter().map(|&x| half::bf16::from_f32(x).to_bits()));
                }
                assert_eq!(got, want, "{ty:?} {}x{}", part.rows(), part.cols());
            }
            tested.push(ty);
        }
        assert_eq!(tested.len(), 15, "{tested:?}");
    }

    /// Rounding is to nearest even, and specials survive.
    #[test]
    fn bf16_rounding() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // bf16 keeps 7 mantissa bits: 1 + 1/256 is halfway between 0x3f80 and
        // 0x3f81, 1 + 3/256 halfway between 0x3f81 and 0x3f82 (exact in f32).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80); // halfway: down to even
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82); // halfway: up to even
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert!(half::bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(vec_to_bf16(&[-2.5, 0.0]), vec![0xc020, 0x0000]);
    }
}
