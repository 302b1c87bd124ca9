//! From a request body to the engine's `SamplingParams`, checking every field.
//!
//! Ranges of the sampling fields live in one place, `sampler::validate`; this module
//! adds what only the gateway knows: the JSON itself, the prompt's length against
//! `max_model_len` (with vLLM's wording), streaming options, and defaults.

use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use bytes::Bytes;
use ferry_engine::sampler;
use ferry_transport::SamplingParams;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::errors::ApiError;
use super::types::SamplingFields;

/// Most completions one request may ask for across its prompts (n × prompts);
/// bounds the memory a single request can claim in the gateway. `n` alone is
/// bounded by the protocol's `MAX_N`.
pub(crate) const MAX_CHOICES: usize = 256;

/// A JSON body parsed with errors in OpenAI's shape: invalid JSON and fields of the
/// wrong type give 400 naming the field; a body over the size limit gives 413.
pub(crate) struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Like vLLM: a declared media type must be JSON; none at all is tolerated.
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let media = ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if media != "application/json" && !media.ends_with("+json") {
                return Err(ApiError::bad_request(
                    "Unsupported Media Type: Only 'application/json' is allowed",
                ));
            }
        }
        let http1 = req.version() <= axum::http::Version::HTTP_11;
        let bytes = read_body(req.into_body(), http1).await?;
        let _ = state;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A body over the limit still being sent is read on, and thrown away, up to
/// this much, before the 413 goes out: an HTTP/1.1 client that is still
/// writing would otherwise meet a closed socket and never read the status.
const LINGER_BYTES: usize = 64 << 20;

/// Reads a request body of at most `MAX_BODY_BYTES`; over it, 413 (after
/// draining what an HTTP/1.1 client is still sending, see [`LINGER_BYTES`]).
async fn read_body(body: axum::body::Body, http1: bool) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("Failed to read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        if buf.len() + data.len() > super::MAX_BODY_BYTES {
            let mut drained = buf.len() + data.len();
            drop(buf);
            while http1 && drained < LINGER_BYTES {
                match body.frame().await {
                    Some(Ok(f)) => drained += f.data_ref().map_or(0, bytes::Bytes::len),
                    _ => break,
                }
            }
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("The request body is over the limit of {} bytes.", super::MAX_BODY_BYTES),
            ));
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// Parse `bytes` as a JSON object into `T`. On a type error, find the field at fault
/// by deserializing each key alone (all of `T`'s fields are optional).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON in request body: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(ApiError::bad_request("The request body must be a JSON object."));
    };
    match T::deserialize(&value) {
        Ok(t) => Ok(t),
        Err(whole) => {
            for (k, v) in map {
                let mut one = serde_json::Map::new();
                one.insert(k.clone(), v.clone());
                if let Err(e) = T::deserialize(&Value::Object(one)) {
                    return Err(ApiError::invalid_param(k.as_str(), format!("Invalid value for `{k}`: {e}")));
                }
            }
            Err(ApiError::bad_request(format!("Invalid request: {whole}")))
        }
    }
}

/// What happens to the text, in the gateway.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TextOptions {
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    pub min_tokens: u32,
    pub stop_token_ids: Vec<u32>,
}

impl TextOptions {
    pub(crate) fn from_fields(f: &SamplingFields) -> Self {
        TextOptions {
            stop: f.stop.clone().map(super::types::StopSpec::into_vec).unwrap_or_default(),
            include_stop_str_in_output: f.include_stop_str_in_output.unwrap_or(false),
            skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
            min_tokens: f.min_tokens.unwrap_or(0),
            stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct StreamPlan {
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
}

impl StreamPlan {
    /// vLLM: `stream_options` only with `stream`; continuous stats only with usage.
    pub(crate) fn from_fields(f: &SamplingFields) -> Result<Self, ApiError> {
        let stream = f.stream.unwrap_or(false);
        let (include_usage, continuous_usage) = match &f.stream_options {
            Some(_) if !stream => {
                return Err(ApiError::invalid_param(
                    "stream_options",
                    "Stream options can only be defined when `stream=True`.",
                ))
            }
            Some(o) => {
                let u = o.include_usage.unwrap_or(false);
                (u, u && o.continuous_usage_stats.unwrap_or(false))
            }
            None => (false, false),
        };
        Ok(StreamPlan { stream, include_usage, continuous_usage })
    }
}

/// Where the limits are checked, and which names errors blame.
pub(crate) struct LengthCheck<'a> {
    pub max_model_len: u32,
    /// "prompt" or "messages".
    pub prompt_param: &'a str,
    /// "max_tokens" or "max_completion_tokens".
    pub max_tokens_param: &'a str,
}

/// The engine's parameters for one prompt of `prompt_len` tokens. `max_tokens`
/// `None` means all the room the context has left (vLLM's default).
pub(crate) fn sampling_params(
    f: &SamplingFields,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
    prompt_len: usize,
    limits: &LengthCheck<'_>,
    vocab_size: usize,
) -> Result<SamplingParams, ApiError> {
    let max_len = limits.max_model_len as u64;
    let n_in = prompt_len as u64;
    if prompt_len == 0 {
        return Err(ApiError::invalid_param(limits.prompt_param, "The prompt cannot be empty."));
    }
    if n_in >= max_len {
        return Err(ApiError::invalid_param(
            limits.prompt_param,
            format!(
                "This model's maximum context length is {max_len} tokens. However, your request has \
                 {n_in} input tokens. Please reduce the length of the input messages."
            ),
        ));
    }
    if let Some(m) = max_tokens {
        if m as u64 + n_in > max_len {
            return Err(ApiError::invalid_param(
                limits.max_tokens_param,
                format!(
                    "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum \
                     context length is {max_len} tokens and your request has {n_in} input tokens \
                     ({m} > {max_len} - {n_in})."
                ),
            ));
        }
    }
    if let Some(stop) = &f.stop {
        if stop.as_slice().iter().any(String::is_empty) {
            // vLLM's SamplingParams._verify_args.
            return Err(ApiError::invalid_param("stop", "stop cannot contain an empty string."));
        }
    }
    let n = f.n.unwrap_or(1);
    if n > ferry_transport::MAX_N {
        return Err(ApiError::invalid_param("n", format!("n must be at most {}, got {n}.", ferry_transport::MAX_N)));
    }
    let d = SamplingParams::default();
    let p = SamplingParams {
        n,
        temperature: f.temperature.unwrap_or(d.temperature),
        top_p: f.top_p.unwrap_or(d.top_p),
        top_k: f.top_k.unwrap_or(d.top_k),
        min_p: f.min_p.unwrap_or(d.min_p),
        repetition_penalty: f.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: f.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: f.frequency_penalty.unwrap_or(d.frequency_penalty),
        // Any 64-bit pattern is a seed; negative ones keep their bits.
        seed: f.seed.map(|s| s as u64),
        max_tokens: max_tokens.unwrap_or((max_len - n_in) as u32),
        min_tokens: f.min_tokens.unwrap_or(0),
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs,
        prompt_logprobs: f.prompt_logprobs,
        logit_bias: logit_bias(f.logit_bias.as_ref(), vocab_size)?,
        constraint: None,
        priority: f.priority.unwrap_or(0),
    };
    sampler::validate(&p, vocab_size)
        .map_err(|e| ApiError::invalid_param(e.param.to_string(), e.message.clone()))?;
    Ok(p)
}

/// OpenAI's `logit_bias` map as the engine takes it: keys are token ids
/// written as integers, biases are clamped to [-100, 100] (vLLM's
/// `to_sampling_params`), and ids outside the vocabulary are refused with
/// vLLM's message, which names every one of them (`token_id(s) [..] in
/// logit_bias contain out-of-vocab token ids`). Keys that are no integers at
/// all are likewise named together. The keys come in the map's (sorted)
/// order, not the body's.
fn logit_bias(map: Option<&std::collections::BTreeMap<String, f64>>, vocab_size: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = map else { return Ok(Vec::new()) };
    let mut out = Vec::with_capacity(map.len());
    let mut outside: Vec<String> = Vec::new();
    let mut not_ids: Vec<&str> = Vec::new();
    for (k, &b) in map {
        let key = k.trim();
        let digits = key.strip_prefix(['-', '+']).unwrap_or(key);
        if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
            not_ids.push(k);
            continue;
        }
        // Any integer is an id to check (Python's int() has no bound), so one
        // past u32 is out of the vocabulary, not malformed.
        match key.parse::<u32>() {
            Ok(t) if (t as usize) < vocab_size => out.push((t, b.clamp(-100.0, 100.0) as f32)),
            _ => outside.push(key.strip_prefix('+').unwrap_or(key).to_string()),
        }
    }
    if !not_ids.is_empty() {
        return Err(ApiError::invalid_param(
            "logit_bias",
            format!("logit_bias keys must be token ids (integers), got {}.", not_ids.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")),
        ));
    }
    if !outside.is_empty() {
        return Err(ApiError::invalid_param(
            "logit_bias",
            format!(
                "token_id(s) [{}] in logit_bias contain out-of-vocab token ids. Vocabulary size: {vocab_size}",
                outside.join(", ")
            ),
        ));
    }
    // Keys like "5" and " 5" name one token: the last one wins, as in a Python dict.
    out.sort_by_key(|&(t, _)| t);
    out.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            earlier.1 = later.1;
        }
        same
    });
    Ok(out)
}

/// A `model` field must name a served model; absent means the first one.
pub(crate) fn resolve_model(requested: Option<&str>, served: &[String]) -> Result<String, ApiError> {
    match requested {
        None => served.first().cloned().ok_or_else(|| ApiError::internal("no model is served")),
        Some(m) if served.iter().any(|s| s == m) => Ok(m.to_string()),
        Some(m) => Err(ApiError::model_not_found(m)),
    }
}

/// Deserialize helper for tests that hold a `Value` already.
#[cfg(test)]
pub(crate) fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    parse_json(&serde_json::to_vec(&v).map_err(|e| ApiError::bad_request(e.to_string()))?)
}

/// vLLM's `X-data-parallel-rank` header: send the request to that engine rank.
pub(crate) fn data_parallel_rank(headers: &axum::http::HeaderMap) -> Result<Option<u32>, ApiError> {
    let Some(v) = headers.get("x-data-parallel-rank") else { return Ok(None) };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map(Some)
        .ok_or_else(|| ApiError::bad_request("X-data-parallel-rank must be a non-negative integer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{ChatCompletionRequest, CompletionRequest};
    use serde_json::json;

    const LIMITS: LengthCheck<'static> =
        LengthCheck { max_model_len: 100, prompt_param: "prompt", max_tokens_param: "max_tokens" };

    /// Build params for a completions body with a 10-token prompt; Err(param, msg).
    fn build(body: Value) -> Result<SamplingParams, (Option<String>, String)> {
        let r: CompletionRequest = from_value(body).map_err(|e| (e.param, e.message))?;
        StreamPlan::from_fields(&r.sampling).map_err(|e| (e.param.clone(), e.message.clone()))?;
        sampling_params(&r.sampling, r.max_tokens, r.logprobs, 10, &LIMITS, 1000)
            .map_err(|e| (e.param, e.message))
    }

    fn bad_param(body: Value) -> String {
        match build(body.clone()) {
            Err((Some(p), _)) => p,
            other => panic!("{body} should fail naming a param, got {other:?}"),
        }
    }

    #[test]
    fn logit_bias_is_clamped_sorted_and_keyed_by_id() {
        let p = build(json!({"logit_bias": {"7": 250, "3": -1e9, " 5": 0.5}})).unwrap();
        assert_eq!(p.logit_bias, vec![(3, -100.0), (5, 0.5), (7, 100.0)]);
        assert!(build(json!({"logit_bias": null})).unwrap().logit_bias.is_empty());
    }

    #[test]
    fn vllms_messages_for_seed_logit_bias_and_stop() {
        let msg = |body: Value| build(body.clone()).err().unwrap_or_else(|| panic!("{body} must fail")).1;
        assert!(build(json!({"seed": i64::MAX})).is_ok() && build(json!({"seed": i64::MIN})).is_ok());
        for (body, want) in [
            (json!({"seed": 9_223_372_036_854_775_808_u64}), "Input should be less than or equal to 9223372036854775807"),
            (json!({"seed": 1e30}), "Input should be less than or equal to 9223372036854775807"),
            (json!({"seed": -1e30}), "Input should be greater than or equal to -9223372036854775808"),
            (json!({"seed": 1.5}), "Input should be a valid integer, got a number with a fractional part"),
        ] {
            let m = msg(body.clone());
            assert!(m.contains(want), "{body}: {m}");
            assert_eq!(bad_param(body), "seed");
        }
        assert_eq!(
            msg(json!({"logit_bias": {"5": 1, "1000": 1, "-1": 2, "99999999999999999999": 3}})),
            "token_id(s) [-1, 1000, 99999999999999999999] in logit_bias contain out-of-vocab token ids. Vocabulary size: 1000"
        );
        let m = msg(json!({"logit_bias": {"abc": 1, "1.5": 1, "7": 1}}));
        assert!(m.contains("\"1.5\"") && m.contains("\"abc\""), "{m}");
        for stop in [json!(""), json!(["a", ""])] {
            assert_eq!(msg(json!({"stop": stop})), "stop cannot contain an empty string.");
            assert_eq!(bad_param(json!({"stop": stop})), "stop");
        }
        assert!(build(json!({"stop": ["a", " "]})).is_ok());
    }

    #[test]
    fn each_bad_field_names_its_param() {
        let cases = [
            (json!({"temperature": -1.0}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"min_p": 2.0}), "min_p"),
            (json!({"repetition_penalty": 0.0}), "repetition_penalty"),
            (json!({"presence_penalty": 3.0}), "presence_penalty"),
            (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
            (json!({"n": 0}), "n"),
            (json!({"n": 100000}), "n"),
            (json!({"n": -1}), "n"),
            (json!({"n": 2, "temperature": 0}), "n"), // vLLM: greedy means n = 1
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": -5}), "max_tokens"),
            (json!({"max_tokens": 91}), "max_tokens"),
            (json!({"min_tokens": 20, "max_tokens": 5}), "min_tokens"),
            (json!({"logprobs": 21}), "logprobs"),
            (json!({"logprobs": -1}), "logprobs"),
            (json!({"stop_token_ids": [5000]}), "stop_token_ids"),
            (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
            (json!({"logit_bias": {"1.5": 1}}), "logit_bias"),
            (json!({"logit_bias": {"5": "big"}}), "logit_bias"),
            (json!({"logit_bias": {"1000": 1}}), "logit_bias"),
            (json!({"logit_bias": {"-1": 1}}), "logit_bias"),
            (json!({"logit_bias": [1, 2]}), "logit_bias"),
            (json!({"prompt_logprobs": 21}), "prompt_logprobs"),
            (json!({"stop": 5}), "stop"),
            (json!({"stream": "yes"}), "stream"),
            (json!({"stream_options": {"include_usage": true}}), "stream_options"),
            (json!({"seed": 1.5}), "seed"),
            (json!({"echo": 3}), "echo"),
            (json!({"prompt": {"x": 1}}), "prompt"),
        ];
        for (body, param) in cases {
            assert_eq!(bad_param(body.clone()), param, "{body}");
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let p = build(json!({})).unwrap();
        assert_eq!(p.max_tokens, 90); // all the room left: 100 - 10
        assert_eq!((p.n, p.temperature, p.top_p, p.top_k, p.logprobs), (1, 1.0, 1.0, 0, None));
        let p = build(json!({"max_tokens": 90, "temperature": 0.5, "seed": -1, "top_k": -1, "n": 3,
            "stop_token_ids": [7], "ignore_eos": true, "logprobs": 2, "min_tokens": 4})).unwrap();
        assert_eq!(p.max_tokens, 90);
        assert_eq!(p.temperature, 0.5);
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!((p.top_k, p.n, p.min_tokens, p.logprobs), (-1, 3, 4, Some(2)));
        assert_eq!(p.stop_token_ids, vec![7]);
        assert!(p.ignore_eos);
    }

    #[test]
    fn length_errors_use_vllms_wording() {
        let f = SamplingFields::default();
        let e = sampling_params(&f, None, None, 100, &LIMITS, 1000).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert_eq!(e.message, "This model's maximum context length is 100 tokens. However, your request has 100 input tokens. Please reduce the length of the input messages.");
        let limits = LengthCheck { prompt_param: "messages", max_tokens_param: "max_completion_tokens", ..LIMITS };
        let e = sampling_params(&f, Some(50), None, 60, &limits, 1000).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
        assert_eq!(e.message, "'max_tokens' or 'max_completion_tokens' is too large: 50. This model's maximum context length is 100 tokens and your request has 60 input tokens (50 > 100 - 60).");
        assert!(sampling_params(&f, Some(40), None, 60, &limits, 1000).is_ok());
        let e = sampling_params(&f, None, None, 0, &LIMITS, 1000).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn json_errors() {
        let e = parse_json::<CompletionRequest>(b"{not json").unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.clone()), (400, None));
        assert!(e.message.starts_with("Invalid JSON"));
        let e = parse_json::<CompletionRequest>(b"[1,2]").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = parse_json::<ChatCompletionRequest>(br#"{"messages": "hi"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let ok = parse_json::<ChatCompletionRequest>(br#"{"messages": [], "whatever": {"a": [1]}}"#).unwrap();
        assert_eq!(ok.messages.map(|m| m.len()), Some(0));
    }

    #[test]
    fn stream_plan_rules() {
        let f = |v: Value| StreamPlan::from_fields(&from_value::<CompletionRequest>(v).unwrap().sampling);
        assert_eq!(f(json!({})).unwrap(), StreamPlan::default());
        assert_eq!(
            f(json!({"stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}})).unwrap(),
            StreamPlan { stream: true, include_usage: true, continuous_usage: true }
        );
        assert_eq!(
            f(json!({"stream": true, "stream_options": {"continuous_usage_stats": true}})).unwrap(),
            StreamPlan { stream: true, include_usage: false, continuous_usage: false }
        );
    }

    #[test]
    fn model_resolution() {
        let served = vec!["a".to_string(), "b".to_string()];
        assert_eq!(resolve_model(None, &served).unwrap(), "a");
        assert_eq!(resolve_model(Some("b"), &served).unwrap(), "b");
        assert_eq!(resolve_model(Some("c"), &served).unwrap_err().status.as_u16(), 404);
    }
}
