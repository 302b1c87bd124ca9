//! Rotary-embedding frequency scaling: the per-pair divisors ("freq factors") a
//! long-context model applies to RoPE's frequencies, as llama.cpp does. Llama 3.1+
//! ships them in GGUF as the `rope_freqs.weight` tensor; a Hugging Face
//! config.json gives the parameters in `rope_scaling` and the factors are
//! computed here exactly as llama.cpp's converter (convert_hf_to_gguf.py) does,
//! so a folder and its GGUF conversion rotate by the same f32 values.
//!
//! One representation for every supported scheme: pair i's angle is
//! `pos * base^(-2i/d) / factors[i]` (ggml_rope_cache_init's `theta / ff`).

use crate::model::gguf::GgufFile;
use crate::quant::GgmlType;

/// The schemes ferry runs, for refusals.
pub const SUPPORTED: &str = "none, linear, llama3";

/// Llama 3's parameters (HF `rope_scaling` with rope_type "llama3").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Params {
    /// What the lowest frequencies are divided by (8 in Llama 3.1).
    pub factor: f64,
    /// Wavelengths above original_max_position_embeddings / low_freq_factor
    /// are divided by the whole `factor`.
    pub low_freq_factor: f64,
    /// Wavelengths below original_max_position_embeddings / high_freq_factor
    /// are left alone; above low_freq_factor.
    pub high_freq_factor: f64,
    /// The context length the model was pre-trained at (8192 in Llama 3.1).
    pub original_max_position_embeddings: f64,
}

/// Llama 3's factors for `head_dim` and `base`, in f64 then rounded to f32, as
/// llama.cpp's converter writes them into `rope_freqs.weight`: high frequencies
/// (short wavelengths) untouched, low ones divided by `factor`, a smooth blend
/// between.
pub fn llama3_factors(p: &Llama3Params, head_dim: usize, base: f64) -> Vec<f32> {
    let low_freq_wavelen = p.original_max_position_embeddings / p.low_freq_factor;
    let high_freq_wavelen = p.original_max_position_embeddings / p.high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                p.factor
            } else {
                let smooth = (p.original_max_position_embeddings / wavelen - p.low_freq_factor)
                    / (p.high_freq_factor - p.low_freq_factor);
                1.0 / ((1.0 - smooth) / p.factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// The factors a Hugging Face `rope_scaling` object asks for (`None` for plain
/// RoPE), or why ferry cannot run it.
pub fn from_hf(rope_scaling: Option<&serde_json::Value>, head_dim: usize, base: f64) -> Result<Option<Vec<f32>>, String> {
    let Some(s) = rope_scaling.filter(|v| !v.is_null()) else { return Ok(None) };
    // transformers accepts both spellings; "rope_type" is the current one.
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let num = |k: &str| -> Result<f64, String> {
        s.get(k)
            .and_then(serde_json::Value::as_f64)
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| format!("rope_scaling.{k} must be a positive number for rope_type '{kind}'"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(vec![num("factor")? as f32; head_dim / 2])),
        "llama3" => {
            let p = Llama3Params {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            };
            if p.high_freq_factor <= p.low_freq_factor {
                return Err("rope_scaling.high_freq_factor must be above low_freq_factor".into());
            }
            Ok(Some(llama3_factors(&p, head_dim, base)))
        }
        other => Err(format!("unsupported rope_scaling.rope_type '{other}' (ferry supports {SUPPORTED})")),
    }
}

/// The factors of a GGUF file: its `rope_freqs.weight` tensor (Llama 3) and/or
/// `{arch}.rope.scaling.type` "linear" with `{arch}.rope.scaling.factor`
/// (llama.cpp applies both when both are there, and so does this).
pub fn from_gguf(g: &GgufFile, arch: &str, head_dim: usize) -> Result<Option<Vec<f32>>, String> {
    let type_key = format!("{arch}.rope.scaling.type");
    let linear = match g.get_str(&type_key) {
        None | Some("none") => None,
        Some("linear") => {
            let key = format!("{arch}.rope.scaling.factor");
            match g.get_f32(&key) {
                Some(f) if f.is_finite() && f > 0.0 => Some(f),
                _ => return Err(format!("metadata key {key} must be a positive number when {type_key} is linear")),
            }
        }
        Some(other) => return Err(format!("unsupported rope scaling '{other}' in metadata key {type_key} (ferry supports {SUPPORTED})")),
    };
    let mut factors = match g.tensor("rope_freqs.weight") {
        None => None,
        Some(t) => {
            let n = head_dim / 2;
            if t.ty != GgmlType::F32 || t.n_elements() != n as u64 {
                return Err(format!(
                    "tensor 'rope_freqs.weight' is {} of {} values; expected F32 of head_dim/2 = {n}",
                    t.ty.name(),
                    t.n_elements()
                ));
            }
            let bytes = g.tensor_data(t);
            Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<f32>>())
        }
    };
    if let Some(f) = linear {
        let base = factors.take().unwrap_or_else(|| vec![1.0; head_dim / 2]);
        factors = Some(base.into_iter().map(|x| x * f).collect());
    }
    Ok(factors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1 8B's parameters give its published rope_freqs: the first pairs
    /// untouched, the last divided by the full factor, a blend in between.
    #[test]
    fn llama3_factors_have_the_three_regimes() {
        let p = Llama3Params { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 };
        let f = llama3_factors(&p, 128, 500000.0);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.iter().any(|&x| x > 1.0 && x < 8.0));
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "non-decreasing: {f:?}");
    }

    #[test]
    fn hf_rope_scaling_kinds() {
        use serde_json::json;
        assert_eq!(from_hf(None, 8, 1e4).unwrap(), None);
        assert_eq!(from_hf(Some(&json!(null)), 8, 1e4).unwrap(), None);
        assert_eq!(from_hf(Some(&json!({"rope_type": "default"})), 8, 1e4).unwrap(), None);
        assert_eq!(from_hf(Some(&json!({"type": "linear", "factor": 2.0})), 8, 1e4).unwrap(), Some(vec![2.0; 4]));
        let e = from_hf(Some(&json!({"rope_type": "yarn", "factor": 4.0})), 8, 1e4).unwrap_err();
        assert!(e.contains("yarn") && e.contains("llama3"), "{e}");
        let e = from_hf(Some(&json!({"rope_type": "llama3", "factor": 8.0})), 8, 1e4).unwrap_err();
        assert!(e.contains("low_freq_factor"), "{e}");
    }
}
