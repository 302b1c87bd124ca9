//! vLLM's `--speculative-config`: a JSON object naming the proposer and how
//! many tokens it may propose, checked as vLLM's `SpeculativeConfig` checks it.

use serde::Deserialize;

/// Most tokens one verify pass may propose: bounds a request's step (and the
/// per-position metrics) whatever the flag says.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// Where proposals come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecMethod {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence
    /// of the sequence's last `n` tokens, for the longest `n` in
    /// `min..=max` that occurs (vLLM's `ngram`).
    Ngram {
        /// Shortest suffix matched (`prompt_lookup_min`).
        min: usize,
        /// Longest suffix matched (`prompt_lookup_max`).
        max: usize,
    },
}

/// Speculative decoding's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeculativeConfig {
    /// The proposer.
    pub method: SpecMethod,
    /// Most tokens proposed for one sequence per step (`num_speculative_tokens`).
    pub num_speculative_tokens: usize,
    /// No proposals while this many sequences or more are running (vLLM's
    /// `disable_by_batch_size`); None: no such limit.
    pub disable_by_batch_size: Option<usize>,
}

/// The JSON as vLLM takes it; fields that only other methods read are
/// listed so that naming them is not an error, and checked against the method.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    method: Option<String>,
    model: Option<String>,
    num_speculative_tokens: Option<i64>,
    prompt_lookup_max: Option<i64>,
    prompt_lookup_min: Option<i64>,
    disable_by_batch_size: Option<i64>,
    draft_tensor_parallel_size: Option<i64>,
}

impl SpeculativeConfig {
    /// Parses `--speculative-config`'s JSON. Errors say which field is wrong
    /// and why, in vLLM's terms.
    pub fn parse(json: &str) -> Result<SpeculativeConfig, String> {
        let raw: Raw = serde_json::from_str(json).map_err(|e| format!("--speculative-config is not a valid speculative config: {e}"))?;
        // vLLM names the n-gram proposer by method, or by model "ngram" / "[ngram]".
        let method = match (raw.method.as_deref(), raw.model.as_deref()) {
            (Some("ngram" | "[ngram]"), _) | (None, Some("ngram" | "[ngram]")) => "ngram",
            (Some(m), _) => m,
            (None, Some(_)) => "draft_model",
            (None, None) => return Err("--speculative-config needs a \"method\" (ferry has \"ngram\")".into()),
        };
        if method != "ngram" {
            return Err(format!("speculative method {method:?} is not supported by ferry; the one it has is \"ngram\""));
        }
        let k = raw.num_speculative_tokens.ok_or("--speculative-config needs num_speculative_tokens for the ngram method")?;
        if k < 1 || k as usize > MAX_SPECULATIVE_TOKENS {
            return Err(format!("num_speculative_tokens={k} must be between 1 and {MAX_SPECULATIVE_TOKENS}"));
        }
        // vLLM's defaults: both 5 when neither is given, else the one given for both.
        let (min, max) = match (raw.prompt_lookup_min, raw.prompt_lookup_max) {
            (None, None) => (5, 5),
            (Some(m), None) => (m, m),
            (None, Some(m)) => (m, m),
            (Some(a), Some(b)) => (a, b),
        };
        if min < 1 {
            return Err(format!("prompt_lookup_min={min} must be > 0"));
        }
        if max < 1 {
            return Err(format!("prompt_lookup_max={max} must be > 0"));
        }
        if min > max {
            return Err(format!("prompt_lookup_min={min} must be <= prompt_lookup_max={max}"));
        }
        if max > 1024 {
            return Err(format!("prompt_lookup_max={max} must be at most 1024"));
        }
        if let Some(tp) = raw.draft_tensor_parallel_size.filter(|&tp| tp != 1) {
            return Err(format!("draft_tensor_parallel_size={tp}: the ngram method has no draft model (it must be 1 or absent)"));
        }
        let disable_by_batch_size = match raw.disable_by_batch_size {
            None => None,
            Some(n) if n >= 2 => Some(n as usize),
            Some(n) => return Err(format!("disable_by_batch_size={n} must be >= 2")),
        };
        Ok(SpeculativeConfig {
            method: SpecMethod::Ngram { min: min as usize, max: max as usize },
            num_speculative_tokens: k as usize,
            disable_by_batch_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_forms_and_defaults() {
        let c = SpeculativeConfig::parse(r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}"#).unwrap();
        assert_eq!(c.method, SpecMethod::Ngram { min: 2, max: 3 });
        assert_eq!(c.num_speculative_tokens, 4);
        let c = SpeculativeConfig::parse(r#"{"model": "[ngram]", "num_speculative_tokens": 2}"#).unwrap();
        assert_eq!(c.method, SpecMethod::Ngram { min: 5, max: 5 });
        let c = SpeculativeConfig::parse(r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4}"#).unwrap();
        assert_eq!(c.method, SpecMethod::Ngram { min: 4, max: 4 });
    }

    #[test]
    fn refusals_say_why() {
        for (json, says) in [
            ("{", "not a valid"),
            (r#"{"method": "ngram"}"#, "num_speculative_tokens"),
            (r#"{"method": "ngram", "num_speculative_tokens": 0}"#, "between 1"),
            (r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}"#, "must be <="),
            (r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}"#, "must be > 0"),
            (r#"{"method": "eagle", "num_speculative_tokens": 2}"#, "not supported"),
            (r#"{"model": "/models/draft.gguf", "num_speculative_tokens": 2}"#, "\"draft_model\" is not supported"),
            (r#"{"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}"#, "unknown field"),
            (r#"{"num_speculative_tokens": 2}"#, "needs a \"method\""),
        ] {
            let e = SpeculativeConfig::parse(json).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
    }
}
