//! ggml's names for every tensor type id a GGUF file may carry, including the
//! ones ferry cannot load, so a refusal names the type the file really has
//! ("IQ2_XXS") and lists what ferry does load, instead of a bare id.
//! The supported list is read from `GgmlType::from_id`, so it grows by itself
//! as kernels land.

use crate::quant::GgmlType;

/// ggml's name for type id `id` (ggml.h's `enum ggml_type`), if it has one.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Whether ferry computes with weights of this type (Q8_1 and Q8_K exist only
/// as activation formats of the dot products).
pub fn is_weight_type(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K)
}

/// The weight types ferry loads, comma separated, in ggml id order.
pub fn supported_weight_types() -> String {
    (0..64u32)
        .filter_map(GgmlType::from_id)
        .filter(|&t| is_weight_type(t))
        .map(crate::quant::GgmlType::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// "type IQ2_XXS (ggml type 16)" or "unknown type id 99".
pub fn describe_type_id(id: u32) -> String {
    match ggml_type_name(id) {
        Some(name) => format!("type {name} (ggml type {id})"),
        None => format!("unknown type id {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_supported_list() {
        assert_eq!(describe_type_id(16), "type IQ2_XXS (ggml type 16)");
        assert_eq!(describe_type_id(99), "unknown type id 99");
        let s = supported_weight_types();
        for t in ["F32", "F16", "BF16", "Q4_0", "Q8_0", "Q4_K", "Q6_K"] {
            assert!(s.contains(t), "{s}");
        }
        assert!(!s.contains("Q8_K") && !s.contains("Q8_1"), "{s}");
        // Every type ferry knows has ggml's name for its id.
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(ggml_type_name(id), Some(t.name()));
            }
        }
    }
}
