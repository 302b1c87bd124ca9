//! vLLM's `--speculative-config`: a JSON object naming the proposer (`ngram`
//! or `suffix`) and how many tokens it may propose, checked as vLLM's
//! `SpeculativeConfig` checks it.

use super::suffix::SuffixParams;
use serde::Deserialize;

/// Most tokens one verify pass may propose: bounds a request's step (and the
/// per-position metrics) whatever the flag says.
pub const MAX_SPECULATIVE_TOKENS: usize = ferry_transport::MAX_SPEC_POSITIONS;
/// Deepest suffix tree accepted: a window is matched and walked per step, so
/// this bounds the suffix proposer's work per sequence.
const MAX_TREE_DEPTH: i64 = 64;
/// Most earlier outputs the suffix proposer may be told to keep (its trie is
/// bounded by nodes as well: see `suffix::MAX_NODES`).
const MAX_CACHED_REQUESTS: i64 = 1_000_000;

/// Where proposals come from.
#[derive(Clone, Debug, PartialEq)]
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
    /// Suffix decoding: the most frequent continuation of the sequence's
    /// suffix in its own tokens and in earlier outputs (vLLM's `suffix`).
    Suffix(SuffixParams),
}

/// Speculative decoding's settings.
#[derive(Clone, Debug, PartialEq)]
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
    suffix_decoding_max_tree_depth: Option<i64>,
    suffix_decoding_max_cached_requests: Option<i64>,
    suffix_decoding_max_spec_factor: Option<f64>,
    suffix_decoding_min_token_prob: Option<f64>,
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
            (None, None) => return Err("--speculative-config needs a \"method\" (ferry has \"ngram\" and \"suffix\")".into()),
        };
        if let Some(tp) = raw.draft_tensor_parallel_size.filter(|&tp| tp != 1) {
            return Err(format!("draft_tensor_parallel_size={tp}: the {method} method has no draft model (it must be 1 or absent)"));
        }
        let disable_by_batch_size = match raw.disable_by_batch_size {
            None => None,
            Some(n) if n >= 2 => Some(n as usize),
            Some(n) => return Err(format!("disable_by_batch_size={n} must be >= 2")),
        };
        let suffix_fields = [
            ("suffix_decoding_max_tree_depth", raw.suffix_decoding_max_tree_depth.is_some()),
            ("suffix_decoding_max_cached_requests", raw.suffix_decoding_max_cached_requests.is_some()),
            ("suffix_decoding_max_spec_factor", raw.suffix_decoding_max_spec_factor.is_some()),
            ("suffix_decoding_min_token_prob", raw.suffix_decoding_min_token_prob.is_some()),
        ];
        let (method, k) = match method {
            "ngram" => {
                if let Some((name, _)) = suffix_fields.iter().find(|(_, given)| *given) {
                    return Err(format!("{name} is a setting of the suffix method, not of ngram"));
                }
                let k = raw.num_speculative_tokens.ok_or("--speculative-config needs num_speculative_tokens for the ngram method")?;
                (Self::ngram(&raw)?, k)
            }
            "suffix" => {
                if raw.prompt_lookup_min.is_some() || raw.prompt_lookup_max.is_some() {
                    return Err("prompt_lookup_min and prompt_lookup_max are settings of the ngram method, not of suffix".into());
                }
                let params = Self::suffix(&raw)?;
                // vLLM's default: as many tokens as the tree is deep.
                let k = raw.num_speculative_tokens.unwrap_or(params.max_tree_depth as i64);
                (SpecMethod::Suffix(params), k)
            }
            m => return Err(format!("speculative method {m:?} is not supported by ferry; the ones it has are \"ngram\" and \"suffix\"")),
        };
        if k < 1 || k as usize > MAX_SPECULATIVE_TOKENS {
            return Err(format!("num_speculative_tokens={k} must be between 1 and {MAX_SPECULATIVE_TOKENS}"));
        }
        Ok(SpeculativeConfig { method, num_speculative_tokens: k as usize, disable_by_batch_size })
    }

    /// The n-gram method's lookup bounds.
    fn ngram(raw: &Raw) -> Result<SpecMethod, String> {
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
        Ok(SpecMethod::Ngram { min: min as usize, max: max as usize })
    }

    /// The suffix method's settings, vLLM's defaults where not given.
    fn suffix(raw: &Raw) -> Result<SuffixParams, String> {
        let d = SuffixParams::default();
        let depth = raw.suffix_decoding_max_tree_depth.unwrap_or(d.max_tree_depth as i64);
        if !(1..=MAX_TREE_DEPTH).contains(&depth) {
            return Err(format!("suffix_decoding_max_tree_depth={depth} must be between 1 and {MAX_TREE_DEPTH}"));
        }
        let cached = raw.suffix_decoding_max_cached_requests.unwrap_or(d.max_cached_requests as i64);
        if !(0..=MAX_CACHED_REQUESTS).contains(&cached) {
            return Err(format!("suffix_decoding_max_cached_requests={cached} must be between 0 and {MAX_CACHED_REQUESTS}"));
        }
        let factor = raw.suffix_decoding_max_spec_factor.unwrap_or(f64::from(d.max_spec_factor));
        if !(factor.is_finite() && factor >= 0.0) {
            return Err(format!("suffix_decoding_max_spec_factor={factor} must be >= 0"));
        }
        let prob = raw.suffix_decoding_min_token_prob.unwrap_or(f64::from(d.min_token_prob));
        if !(0.0..=1.0).contains(&prob) {
            return Err(format!("suffix_decoding_min_token_prob={prob} must be between 0 and 1"));
        }
        Ok(SuffixParams {
            max_tree_depth: depth as usize,
            max_cached_requests: cached as usize,
            max_spec_factor: factor as f32,
            min_token_prob: prob as f32,
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
    fn suffix_forms_and_defaults() {
        let c = SpeculativeConfig::parse(r#"{"method": "suffix"}"#).unwrap();
        assert_eq!(c.method, SpecMethod::Suffix(SuffixParams::default()));
        assert_eq!(c.num_speculative_tokens, 24, "vLLM's default: the tree's depth");
        let c = SpeculativeConfig::parse(
            r#"{"method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_max_tree_depth": 16,
                "suffix_decoding_max_cached_requests": 0, "suffix_decoding_max_spec_factor": 2.5,
                "suffix_decoding_min_token_prob": 0.3}"#,
        )
        .unwrap();
        assert_eq!(c.num_speculative_tokens, 8);
        assert_eq!(
            c.method,
            SpecMethod::Suffix(SuffixParams { max_tree_depth: 16, max_cached_requests: 0, max_spec_factor: 2.5, min_token_prob: 0.3 })
        );
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
            (r#"{"method": "suffix", "suffix_decoding_max_tree_depth": 40}"#, "num_speculative_tokens=40 must be between"),
            (r#"{"method": "suffix", "suffix_decoding_max_tree_depth": 0}"#, "max_tree_depth=0"),
            (r#"{"method": "suffix", "suffix_decoding_min_token_prob": 1.5}"#, "min_token_prob=1.5"),
            (r#"{"method": "suffix", "suffix_decoding_max_spec_factor": -1}"#, "max_spec_factor=-1"),
            (r#"{"method": "suffix", "suffix_decoding_max_cached_requests": -1}"#, "max_cached_requests=-1"),
            (r#"{"method": "suffix", "prompt_lookup_max": 3}"#, "settings of the ngram method"),
            (r#"{"method": "ngram", "num_speculative_tokens": 2, "suffix_decoding_max_tree_depth": 8}"#, "setting of the suffix method"),
            (r#"{"method": "ngram", "num_speculative_tokens": 40}"#, "between 1 and 32"),
        ] {
            let e = SpeculativeConfig::parse(json).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
    }
}
