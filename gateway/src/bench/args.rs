//! Command-line flags of `ferry bench serve` and `ferry bench compare`.
//!
//! Names and meanings follow `vllm bench serve` so that a command line moves
//! between the two tools unchanged; the HTTP-version and TLS flags are ferry's own.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

pub(crate) use super::http_types::HttpVersion;

/// Where the prompts come from.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DatasetName {
    /// Synthetic prompts of about --random-input-len tokens.
    Random,
    /// A JSON-lines file: one object per line with "prompt" and optional "output_len".
    Jsonl,
}

/// `ferry bench serve`: load an OpenAI-compatible server and measure it.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub(crate) struct BenchServeArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000 or https://127.0.0.1:8443.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,

    /// API endpoint: /v1/completions or /v1/chat/completions.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,

    /// Model name sent in each request; when absent, the first model of GET /v1/models.
    #[arg(long)]
    pub model: Option<String>,

    /// HTTP version to speak: 1.1, 2 or 3.
    #[arg(long = "http", value_enum, default_value = "1.1")]
    pub http: HttpVersion,

    /// Accept the server certificate whose SubjectPublicKeyInfo has this SHA-256 (base64).
    #[arg(long)]
    pub tls_spki_pin: Option<String>,

    /// PEM file of CA certificates to trust for https:// and HTTP/3.
    #[arg(long)]
    pub cacert: Option<PathBuf>,

    /// Accept any server certificate (development only).
    #[arg(long, default_value_t = false)]
    pub insecure: bool,

    /// Number of prompts to send.
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,

    /// Requests per second (Poisson arrivals, or gamma with --burstiness); "inf" sends all at once.
    #[arg(long, default_value = "inf", value_parser = parse_rate)]
    pub request_rate: f64,

    /// Burstiness of arrivals: the gamma shape; 1.0 is a Poisson process, <1 burstier, >1 steadier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,

    /// At most this many requests in flight at once.
    #[arg(long)]
    pub max_concurrency: Option<usize>,

    /// Seed of the prompt generator and of the arrival process.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Ask the server to ignore end-of-sequence tokens (vLLM's `ignore_eos`).
    #[arg(long, default_value_t = false)]
    pub ignore_eos: bool,

    /// Requests sent (with the first prompt) before the measured run.
    #[arg(long, default_value_t = 0)]
    pub num_warmups: usize,

    /// Dataset: random or jsonl.
    #[arg(long, value_enum, default_value = "random")]
    pub dataset_name: DatasetName,

    /// Path of the JSONL dataset.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,

    /// Input length (tokens, approximately) of random prompts, not counting the prefix.
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,

    /// Output length (max_tokens) of each request; also the JSONL default.
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,

    /// Lengths are drawn uniformly from [len*(1-r), len*(1+r)]; r in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,

    /// Length (tokens, approximately) of a prefix shared by every random prompt.
    #[arg(long, default_value_t = 0)]
    pub random_prefix_len: usize,

    /// Comma-separated percentiles to report, e.g. "50,90,99".
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,

    /// Comma-separated metrics to report percentiles of: ttft,tpot,itl,e2el.
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub percentile_metrics: String,

    /// Write every figure, per-request records and all settings to this JSON file.
    #[arg(long)]
    pub save_result: Option<PathBuf>,

    /// Per-request timeout in seconds (connect to last byte).
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,

    /// Stop the run after this many seconds; requests still open or unsent are counted as failed.
    #[arg(long, default_value_t = 3600.0)]
    pub max_duration: f64,

    /// Sampling temperature sent with each request.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Hide the progress bar.
    #[arg(long, default_value_t = false)]
    pub disable_tqdm: bool,

    /// A JSON object merged into every request body (vLLM's `--extra-body`),
    /// e.g. '{"structured_outputs": {"json": {...}}}'.
    #[arg(long, value_parser = parse_extra_body)]
    pub extra_body: Option<serde_json::Map<String, serde_json::Value>>,
}

fn parse_extra_body(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("--extra-body must be a JSON object".into()),
        Err(e) => Err(format!("--extra-body is not valid JSON: {e}")),
    }
}

/// `ferry bench compare`: print saved results side by side.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BenchCompareArgs {
    /// Result files written by `ferry bench serve --save-result`; ratios are to the first.
    #[arg(required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
}

/// The metrics that can carry percentiles, in report order.
pub(crate) const METRIC_NAMES: [&str; 4] = ["ttft", "tpot", "itl", "e2el"];

fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "inf" || t == "infinity" {
        return Ok(f64::INFINITY);
    }
    let v: f64 = t
        .parse()
        .map_err(|_| format!("request rate {s:?} is not a number or \"inf\""))?;
    if v.is_nan() || v <= 0.0 {
        return Err(format!("request rate must be > 0, got {s}"));
    }
    Ok(v)
}

/// Parses "50,90,99" into percentiles, each in [0, 100].
pub(crate) fn parse_percentiles(s: &str) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: f64 = part
            .parse()
            .with_context(|| format!("--metric-percentiles: {part:?} is not a number"))?;
        if !(0.0..=100.0).contains(&p) {
            bail!("--metric-percentiles: {p} is outside [0, 100]");
        }
        out.push(p);
    }
    Ok(out)
}

/// Parses "ttft,tpot,itl" into known metric names.
pub(crate) fn parse_percentile_metrics(s: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let m = part.to_ascii_lowercase();
        if !METRIC_NAMES.contains(&m.as_str()) {
            bail!("--percentile-metrics: unknown metric {part:?} (known: ttft, tpot, itl, e2el)");
        }
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

impl BenchServeArgs {
    /// Checks the combinations clap cannot express, with messages that say what to change.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.num_prompts == 0 {
            bail!("--num-prompts must be at least 1");
        }
        if self.burstiness.is_nan() || self.burstiness <= 0.0 {
            bail!("--burstiness must be > 0, got {}", self.burstiness);
        }
        if self.max_concurrency == Some(0) {
            bail!("--max-concurrency must be at least 1");
        }
        if !(0.0..1.0).contains(&self.random_range_ratio) {
            bail!("--random-range-ratio must be in [0, 1), got {}", self.random_range_ratio);
        }
        if !self.timeout.is_finite() || self.timeout <= 0.0 {
            bail!("--timeout must be a positive number of seconds");
        }
        if !self.max_duration.is_finite() || self.max_duration <= 0.0 {
            bail!("--max-duration must be a positive number of seconds");
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("--temperature must be >= 0");
        }
        match self.dataset_name {
            DatasetName::Jsonl if self.dataset_path.is_none() => {
                bail!("--dataset-name jsonl needs --dataset-path FILE")
            }
            DatasetName::Random if self.dataset_path.is_some() => {
                bail!("--dataset-path is only used with --dataset-name jsonl")
            }
            DatasetName::Random if self.random_input_len + self.random_prefix_len == 0 => {
                bail!("--random-input-len plus --random-prefix-len must be at least 1")
            }
            _ => {}
        }
        if self.random_output_len == 0 {
            bail!("--random-output-len must be at least 1");
        }
        if !self.endpoint.starts_with('/') {
            bail!("--endpoint must start with '/', got {:?}", self.endpoint);
        }
        if endpoint_kind(&self.endpoint).is_none() {
            bail!(
                "--endpoint {:?} is not supported: use /v1/completions or /v1/chat/completions",
                self.endpoint
            );
        }
        parse_percentiles(&self.metric_percentiles)?;
        parse_percentile_metrics(&self.percentile_metrics)?;
        let is_https = self.base_url.starts_with("https://");
        if !is_https && !self.base_url.starts_with("http://") {
            bail!("--base-url must start with http:// or https://, got {:?}", self.base_url);
        }
        if self.http == HttpVersion::Http3 && !is_https {
            bail!("--http 3 needs an https:// base URL (QUIC always uses TLS)");
        }
        let trust_flags = [self.tls_spki_pin.is_some(), self.cacert.is_some(), self.insecure]
            .iter()
            .filter(|b| **b)
            .count();
        if trust_flags > 1 {
            bail!("use only one of --tls-spki-pin, --cacert and --insecure");
        }
        if is_https && trust_flags == 0 {
            bail!(
                "https:// needs a way to trust the server: --cacert PEM, --tls-spki-pin BASE64, \
                 or --insecure (development only)"
            );
        }
        Ok(())
    }
}

/// Which OpenAI API the endpoint path names; chat is matched first because its
/// path also ends in "completions".
pub(crate) fn endpoint_kind(endpoint: &str) -> Option<super::http_types::EndpointKind> {
    use super::request::EndpointKind;
    let path = endpoint.split('?').next().unwrap_or(endpoint).trim_end_matches('/');
    if path.ends_with("/chat/completions") {
        Some(EndpointKind::Chat)
    } else if path.ends_with("/completions") {
        Some(EndpointKind::Completions)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: BenchServeArgs,
    }

    #[test]
    fn defaults_match_vllm() {
        let c = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(c.a.endpoint, "/v1/completions");
        assert!(c.a.request_rate.is_infinite());
        assert_eq!(c.a.burstiness, 1.0);
        assert_eq!(c.a.metric_percentiles, "99");
        assert_eq!(c.a.percentile_metrics, "ttft,tpot,itl");
        assert_eq!(c.a.temperature, 0.0);
        assert_eq!(c.a.num_prompts, 1000);
        c.a.validate().unwrap();
    }

    #[test]
    fn parses_flags_and_rejects_bad_ones() {
        let c = Cli::try_parse_from([
            "x", "--http", "3", "--base-url", "https://127.0.0.1:9", "--insecure",
            "--request-rate", "2.5", "--metric-percentiles", "50,90,99.9",
        ])
        .unwrap();
        assert_eq!(c.a.http, HttpVersion::Http3);
        assert_eq!(c.a.request_rate, 2.5);
        c.a.validate().unwrap();
        assert_eq!(parse_percentiles(&c.a.metric_percentiles).unwrap(), vec![50.0, 90.0, 99.9]);

        assert!(Cli::try_parse_from(["x", "--request-rate", "0"]).is_err());
        let h3_plain = Cli::try_parse_from(["x", "--http", "3"]).unwrap();
        assert!(h3_plain.a.validate().unwrap_err().to_string().contains("https"));
        let no_trust = Cli::try_parse_from(["x", "--base-url", "https://h:1"]).unwrap();
        assert!(no_trust.a.validate().is_err());
        assert!(parse_percentile_metrics("ttft,bogus").is_err());
        assert!(parse_percentiles("101").is_err());
        let bad_ep = Cli::try_parse_from(["x", "--endpoint", "/v1/embeddings"]).unwrap();
        assert!(bad_ep.a.validate().is_err());
    }
}
