//! The printed result block (vLLM's layout, plus the HTTP version and the
//! failures) and the saved JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use super::metrics::{BenchMetrics, Stats};
use super::record::{FailureKind, RequestRecord};

/// What the report needs beyond the metrics.
pub(crate) struct RunInfo<'a> {
    pub http_version: &'a str,
    pub base_url: &'a str,
    pub endpoint: &'a str,
    pub model: &'a str,
    pub request_rate: f64,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub num_prompts: usize,
    pub percentile_metrics: &'a [String],
}

/// "99" for 99.0, "99.9" for 99.9, as vLLM names its keys.
pub(crate) fn p_word(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

fn metric_rows() -> [(&'static str, &'static str, &'static str); 4] {
    [
        ("ttft", "TTFT", "Time to First Token"),
        ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
        ("itl", "ITL", "Inter-token Latency"),
        ("e2el", "E2EL", "End-to-end Latency"),
    ]
}

fn stats_of<'m>(m: &'m BenchMetrics, key: &str) -> &'m Stats {
    match key {
        "ttft" => &m.ttft_ms,
        "tpot" => &m.tpot_ms,
        "itl" => &m.itl_ms,
        _ => &m.e2el_ms,
    }
}

/// Failures grouped by kind (with status for HTTP errors), counts in order.
pub(crate) fn failure_counts(records: &[RequestRecord]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for f in records.iter().filter_map(|r| r.failure.as_ref()) {
        let key = match (f.kind, f.status) {
            (FailureKind::HttpStatus, Some(s)) => format!("HTTP {s}"),
            (k, _) => k.label().to_string(),
        };
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

/// The text block printed at the end of a run.
pub(crate) fn render(info: &RunInfo<'_>, m: &BenchMetrics, records: &[RequestRecord]) -> String {
    let mut s = String::new();
    let line = |s: &mut String, label: &str, v: String| {
        let _ = writeln!(s, "{label:<40} {v:<10}");
    };
    let f2 = |v: f64| format!("{v:.2}");
    let _ = writeln!(s, "{:=^50}", " Serving Benchmark Result ");
    line(&mut s, "HTTP version:", info.http_version.to_string());
    line(&mut s, "Successful requests:", m.completed.to_string());
    line(&mut s, "Failed requests:", m.failed.to_string());
    if let Some(c) = info.max_concurrency {
        line(&mut s, "Maximum request concurrency:", c.to_string());
    }
    if info.request_rate.is_finite() {
        line(&mut s, "Request rate configured (RPS):", f2(info.request_rate));
    }
    line(&mut s, "Benchmark duration (s):", f2(m.duration_s));
    line(&mut s, "Total input tokens:", m.total_input_tokens.to_string());
    line(&mut s, "Total generated tokens:", m.total_output_tokens.to_string());
    line(&mut s, "Request throughput (req/s):", f2(m.request_throughput));
    line(&mut s, "Output token throughput (tok/s):", f2(m.output_throughput));
    line(&mut s, "Peak output token throughput (tok/s):", f2(m.max_output_tokens_per_s));
    line(&mut s, "Peak concurrent requests:", f2(m.max_concurrent_requests as f64));
    line(&mut s, "Total Token throughput (tok/s):", f2(m.total_token_throughput));
    if m.completed > 0 && (m.input_tokens_from_server < m.completed || m.output_tokens_from_server < m.completed) {
        // Say plainly when token totals are partly the client's own estimate.
        line(
            &mut s,
            "Token counts from server usage:",
            format!("input {}/{}, output {}/{}", m.input_tokens_from_server, m.completed, m.output_tokens_from_server, m.completed),
        );
    }
    for (key, name, header) in metric_rows() {
        if !info.percentile_metrics.iter().any(|k| k == key) {
            continue;
        }
        let st = stats_of(m, key);
        let _ = writeln!(s, "{header:-^50}");
        line(&mut s, &format!("Mean {name} (ms):"), f2(st.mean));
        line(&mut s, &format!("Median {name} (ms):"), f2(st.median));
        for (p, v) in &st.percentiles {
            line(&mut s, &format!("P{} {name} (ms):", p_word(*p)), f2(*v));
        }
    }
    if m.failed > 0 {
        let _ = writeln!(s, "{:-^50}", "Failed Requests");
        for (reason, n) in failure_counts(records) {
            line(&mut s, &format!("{reason}:"), n.to_string());
        }
        for r in records.iter().filter(|r| !r.success()).take(10) {
            if let Some(f) = &r.failure {
                let _ = writeln!(s, "  request {}: {}", r.index, super::sse::truncate(&f.to_string(), 200));
            }
        }
        if m.failed > 10 {
            let _ = writeln!(s, "  ... {} more in the saved result", m.failed - 10);
        }
    }
    let _ = writeln!(s, "{}", "=".repeat(50));
    s
}

/// The saved JSON: vLLM's flat keys, the full metrics, failures, every
/// request record and all settings.
pub(crate) fn result_json(info: &RunInfo<'_>, settings: &Value, m: &BenchMetrics, records: &[RequestRecord]) -> Value {
    let mut o = Map::new();
    o.insert("ferry_bench_result_version".into(), json!(1));
    o.insert("date_unix_s".into(), json!(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())));
    o.insert("http_version".into(), json!(info.http_version));
    o.insert("base_url".into(), json!(info.base_url));
    o.insert("endpoint".into(), json!(info.endpoint));
    o.insert("model_id".into(), json!(info.model));
    o.insert("num_prompts".into(), json!(info.num_prompts));
    o.insert("request_rate".into(), if info.request_rate.is_finite() { json!(info.request_rate) } else { json!("inf") });
    o.insert("burstiness".into(), if info.burstiness.is_finite() { json!(info.burstiness) } else { json!("inf") });
    o.insert("max_concurrency".into(), json!(info.max_concurrency));
    o.insert("duration".into(), json!(m.duration_s));
    o.insert("completed".into(), json!(m.completed));
    o.insert("failed".into(), json!(m.failed));
    o.insert("total_input_tokens".into(), json!(m.total_input_tokens));
    o.insert("total_output_tokens".into(), json!(m.total_output_tokens));
    o.insert("request_throughput".into(), json!(m.request_throughput));
    o.insert("output_throughput".into(), json!(m.output_throughput));
    o.insert("total_token_throughput".into(), json!(m.total_token_throughput));
    o.insert("max_output_tokens_per_s".into(), json!(m.max_output_tokens_per_s));
    o.insert("max_concurrent_requests".into(), json!(m.max_concurrent_requests));
    for (key, _, _) in metric_rows() {
        let st = stats_of(m, key);
        o.insert(format!("mean_{key}_ms"), json!(st.mean));
        o.insert(format!("median_{key}_ms"), json!(st.median));
        o.insert(format!("std_{key}_ms"), json!(st.std));
        for (p, v) in &st.percentiles {
            o.insert(format!("p{}_{key}_ms", p_word(*p)), json!(v));
        }
    }
    o.insert("failures_by_reason".into(), json!(failure_counts(records)));
    o.insert(
        "errors".into(),
        Value::Array(
            records
                .iter()
                .filter_map(|r| r.failure.as_ref().map(|f| json!({ "index": r.index, "kind": f.kind, "status": f.status, "message": f.message })))
                .collect(),
        ),
    );
    o.insert("metrics".into(), serde_json::to_value(m).unwrap_or(Value::Null));
    o.insert("settings".into(), settings.clone());
    o.insert("requests".into(), serde_json::to_value(records).unwrap_or(Value::Null));
    Value::Object(o)
}

pub(crate) fn save(path: &Path, v: &Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(v).context("cannot encode the result")?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::super::metrics::compute;
    use super::super::record::Failure;
    use super::*;

    #[test]
    fn block_has_vllm_lines_and_failures() {
        let ok = RequestRecord {
            index: 0,
            start_time: 0.0,
            queue_time: 0.0,
            ttft: 0.1,
            itl: vec![0.05],
            latency: 0.15,
            prompt_tokens: 5,
            prompt_tokens_from_server: true,
            output_tokens: 2,
            output_tokens_from_server: true,
            content_chunks: 2,
            requested_output_len: 2,
            failure: None,
        };
        let mut bad = ok.clone();
        bad.index = 1;
        bad.failure = Some(Failure { kind: FailureKind::HttpStatus, status: Some(500), message: "boom".into() });
        let recs = vec![ok, bad];
        let m = compute(&recs, 1.0, &[99.0, 99.9]);
        let pm = vec!["ttft".to_string(), "itl".to_string()];
        let info = RunInfo {
            http_version: "HTTP/2",
            base_url: "http://x",
            endpoint: "/v1/completions",
            model: "m",
            request_rate: f64::INFINITY,
            burstiness: 1.0,
            max_concurrency: None,
            num_prompts: 2,
            percentile_metrics: &pm,
        };
        let text = render(&info, &m, &recs);
        assert!(text.starts_with("============ Serving Benchmark Result ============\n"));
        assert!(text.contains(&format!("{:<40} {:<10}\n", "Successful requests:", 1)));
        assert!(text.contains("HTTP version:                            HTTP/2"));
        assert!(text.contains("---------------Time to First Token----------------"));
        assert!(text.contains("P99.9 TTFT (ms):"));
        assert!(!text.contains("TPOT")); // not selected
        assert!(text.contains("HTTP 500:"));
        assert!(text.contains("request 1: HTTP error status 500: boom"));
        let v = result_json(&info, &json!({"seed": 0}), &m, &recs);
        assert_eq!(v["p99_ttft_ms"], json!(100.0));
        assert_eq!(v["failures_by_reason"]["HTTP 500"], 1);
        assert_eq!(v["errors"][0]["status"], 500);
        assert_eq!(v["requests"].as_array().unwrap().len(), 2);
        assert_eq!(v["request_rate"], "inf");
    }
}
