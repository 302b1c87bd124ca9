//! ggml's tensor element types, as GGUF numbers them, and their block geometry.

/// The element types ferry can load. Discriminants are ggml's type ids. Block
/// layouts are byte for byte those of GGUF files (ggml-common.h); `blocks.rs`
/// lists every field's offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types, reason = "variants are spelled as ggml's GGML_TYPE_* names (Q4_0, Q2_K, IQ4_XS)")]
pub enum GgmlType {
    /// 32-bit IEEE float, 4 bytes per element, little-endian.
    F32 = 0,
    /// IEEE half float, 2 bytes per element.
    F16 = 1,
    /// 32 elements in 18 bytes: an f16 scale `d`, then 16 bytes of 4-bit
    /// quants; value = (q - 8) * d.
    Q4_0 = 2,
    /// 32 elements in 20 bytes: f16 scale `d` and minimum `m`, then 16 bytes of
    /// 4-bit quants; value = q * d + m.
    Q4_1 = 3,
    /// 32 elements in 22 bytes: f16 `d`, 4 bytes of fifth bits, 16 bytes of low
    /// nibbles; value = (q - 16) * d.
    Q5_0 = 6,
    /// 32 elements in 24 bytes: f16 `d` and `m`, 4 bytes of fifth bits, 16 bytes
    /// of low nibbles; value = q * d + m.
    Q5_1 = 7,
    /// 32 elements in 34 bytes: f16 `d`, then 32 i8 quants; value = q * d.
    Q8_0 = 8,
    /// 32 elements in 36 bytes: Q8_0 plus an f16 `s` = d * sum(q). ggml's
    /// activation format for the Q4_1/Q5_1 dots; never a weight.
    Q8_1 = 9,
    /// K-quant, 256 elements in 84 bytes: 16 sub-blocks of 16 with 4-bit scales
    /// and mins, 2-bit quants, f16 `d` and `dmin`.
    Q2_K = 10,
    /// K-quant, 256 elements in 110 bytes: 3-bit quants (2 low bits plus a
    /// high-bit mask), 16 packed 6-bit scales, f16 `d`.
    Q3_K = 11,
    /// K-quant, 256 elements in 144 bytes: f16 `d` and `dmin`, 8 six-bit scales
    /// and mins, 4-bit quants.
    Q4_K = 12,
    /// K-quant, 256 elements in 176 bytes: Q4_K's scales plus a fifth bit per
    /// element.
    Q5_K = 13,
    /// K-quant, 256 elements in 210 bytes: 6-bit quants (4 low bits plus 2
    /// high), 16 i8 scales, f16 `d`.
    Q6_K = 14,
    /// 256 elements in 292 bytes: f32 `d`, 256 i8 quants and 16 i16 sums of 16
    /// quants. ggml's activation format for the K-quant and IQ4_XS dots; never
    /// a weight.
    Q8_K = 15,
    /// 32 elements in 18 bytes laid out as Q4_0, each nibble an index into 16
    /// fixed non-linear levels, times the f16 scale.
    IQ4_NL = 20,
    /// 256 elements in 136 bytes: 8 sub-blocks of IQ4_NL's non-linear nibbles,
    /// each with a 6-bit scale, under one f16 `d`.
    IQ4_XS = 23,
    /// bfloat16 (f32's top 16 bits), 2 bytes per element.
    BF16 = 30,
}

/// Elements in one K-quant super-block.
pub const QK_K: usize = 256;

impl GgmlType {
    /// Every type ferry loads, in ggml id order (for messages that list them).
    pub const ALL: [GgmlType; 17] = {
        use GgmlType::*;
        [F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL, IQ4_XS, BF16]
    };

    /// The type with ggml id `id`, if ferry supports it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            20 => IQ4_NL,
            23 => IQ4_XS,
            30 => BF16,
            _ => return None,
        })
    }

    /// ggml's type id, as GGUF's tensor table stores it.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// ggml's name for the type ("Q4_K", "BF16"), for messages.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ4_NL => "IQ4_NL",
            IQ4_XS => "IQ4_XS",
            BF16 => "BF16",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ4_XS => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 => 2 + 16,
            Q4_1 => 2 + 2 + 16,
            Q5_0 => 2 + 4 + 16,
            Q5_1 => 2 + 2 + 4 + 16,
            Q8_0 => 2 + 32,
            Q8_1 => 2 + 2 + 32,
            Q2_K => QK_K / 16 + QK_K / 4 + 2 + 2,
            Q3_K => QK_K / 8 + QK_K / 4 + 12 + 2,
            Q4_K => 2 + 2 + 12 + QK_K / 2,
            Q5_K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            Q8_K => 4 + QK_K + QK_K / 16 * 2,
            IQ4_NL => 2 + 16,
            IQ4_XS => 2 + 2 + QK_K / 64 + QK_K / 2,
        }
    }

    /// Bytes that `n` elements take, or None when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let bs = self.block_size();
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size())
    }
}
