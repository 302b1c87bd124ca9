//! Prometheus metrics under vLLM's names, written in the text exposition format.
//!
//! The gateway counts tokens and times requests itself; queue figures, KV usage,
//! preemptions and prefix-cache totals come from each rank's latest `EngineStats`
//! at scrape time. Every series carries `model_name` and `engine` (the rank index)
//! labels, in that order, as vLLM's do; counters get the `_total` suffix on their
//! HELP/TYPE lines and samples, as Python's prometheus_client writes them.

use std::fmt::Write;
use std::sync::{Mutex, MutexGuard};

use ferry_transport::EngineStats;

pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
];

/// The finish reasons vLLM labels `request_success` with, all exported from the start.
pub const FINISH_REASONS: [&str; 3] = ["stop", "length", "abort"];

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last slot is +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    fn observe(&mut self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return; // a clock oddity; never poison the sum
        }
        let slot = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.counts[slot] += 1;
        self.sum += v;
    }
}

#[derive(Clone, Debug)]
struct EngineCounters {
    prompt_tokens: u64,
    generation_tokens: u64,
    success: [u64; FINISH_REASONS.len()],
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

impl EngineCounters {
    fn new() -> Self {
        EngineCounters {
            prompt_tokens: 0,
            generation_tokens: 0,
            success: [0; FINISH_REASONS.len()],
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

/// The gateway's own counts, one set per engine rank. Updates for a rank index
/// outside the range are ignored.
pub struct Metrics {
    model_name: String,
    engines: Vec<Mutex<EngineCounters>>,
}

impl Metrics {
    pub fn new(model_name: impl Into<String>, num_engines: usize) -> Self {
        Metrics {
            model_name: model_name.into(),
            engines: (0..num_engines).map(|_| Mutex::new(EngineCounters::new())).collect(),
        }
    }

    fn engine(&self, k: usize) -> Option<MutexGuard<'_, EngineCounters>> {
        self.engines.get(k).map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn add_prompt_tokens(&self, engine: usize, n: u64) {
        if let Some(mut e) = self.engine(engine) {
            e.prompt_tokens += n;
        }
    }

    pub fn add_generation_tokens(&self, engine: usize, n: u64) {
        if let Some(mut e) = self.engine(engine) {
            e.generation_tokens += n;
        }
    }

    pub fn observe_ttft(&self, engine: usize, secs: f64) {
        if let Some(mut e) = self.engine(engine) {
            e.ttft.observe(secs);
        }
    }

    pub fn observe_inter_token(&self, engine: usize, secs: f64) {
        if let Some(mut e) = self.engine(engine) {
            e.itl.observe(secs);
        }
    }

    /// A sequence ended: `reason` is "stop", "length" or "abort" (others are counted
    /// under their own label), `e2e_secs` from arrival to its end.
    pub fn request_finished(&self, engine: usize, reason: &str, e2e_secs: f64) {
        if let Some(mut e) = self.engine(engine) {
            if let Some(k) = FINISH_REASONS.iter().position(|r| *r == reason) {
                e.success[k] += 1;
            }
            e.e2e.observe(e2e_secs);
        }
    }

    /// The exposition text. `stats[k]` is rank k's latest report, `up[k]` whether
    /// rank k serves now.
    pub fn render(&self, stats: &[EngineStats], up: &[bool]) -> String {
        let snap: Vec<EngineCounters> = (0..self.engines.len())
            .filter_map(|k| self.engine(k).map(|e| e.clone()))
            .collect();
        let mut out = String::with_capacity(8192);
        let labels = |k: usize| format!("model_name=\"{}\",engine=\"{k}\"", escape(&self.model_name));
        let default_stats = EngineStats::default();
        let st = |k: usize| stats.get(k).unwrap_or(&default_stats);

        let gauge = |out: &mut String, name: &str, help: &str, f: &dyn Fn(usize) -> f64| {
            header(out, name, help, "gauge");
            for k in 0..snap.len() {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(k), num(f(k)));
            }
        };
        gauge(&mut out, "ferry:engine_up", "1 while the engine rank is connected and serving, else 0.", &|k| f64::from(u8::from(up.get(k).copied().unwrap_or(false))));
        gauge(&mut out, "vllm:num_requests_running", "Number of requests in model execution batches.", &|k| st(k).num_running as f64);
        gauge(&mut out, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", &|k| st(k).num_waiting as f64);
        gauge(&mut out, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", &|k| st(k).kv_usage as f64);

        let counter = |out: &mut String, name: &str, help: &str, f: &dyn Fn(usize) -> u64| {
            let name = format!("{name}_total");
            header(out, &name, help, "counter");
            for k in 0..snap.len() {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(k), num(f(k) as f64));
            }
        };
        counter(&mut out, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", &|k| st(k).prefix_cache_queries);
        counter(&mut out, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", &|k| st(k).prefix_cache_hits);
        counter(&mut out, "vllm:num_preemptions", "Cumulative number of preemption from the engine.", &|k| st(k).num_preemptions);
        counter(&mut out, "vllm:prompt_tokens", "Number of prefill tokens processed.", &|k| snap[k].prompt_tokens);
        counter(&mut out, "vllm:generation_tokens", "Number of generation tokens processed.", &|k| snap[k].generation_tokens);

        header(&mut out, "vllm:request_success_total", "Count of successfully processed requests.", "counter");
        for (k, e) in snap.iter().enumerate() {
            for (r, reason) in FINISH_REASONS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "vllm:request_success_total{{{},finished_reason=\"{reason}\"}} {}",
                    labels(k),
                    num(e.success[r] as f64)
                );
            }
        }

        let hist = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&EngineCounters) -> &Histogram| {
            header(out, name, help, "histogram");
            for (k, e) in snap.iter().enumerate() {
                let h = f(e);
                let l = labels(k);
                let mut cum = 0u64;
                for (i, b) in h.bounds.iter().enumerate() {
                    cum += h.counts[i];
                    let _ = writeln!(out, "{name}_bucket{{{l},le=\"{}\"}} {}", num(*b), num(cum as f64));
                }
                cum += h.counts[h.bounds.len()];
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", num(cum as f64));
                let _ = writeln!(out, "{name}_count{{{l}}} {}", num(cum as f64));
                let _ = writeln!(out, "{name}_sum{{{l}}} {}", num(h.sum));
            }
        };
        hist(&mut out, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", &|e| &e.ttft);
        hist(&mut out, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", &|e| &e.itl);
        hist(&mut out, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", &|e| &e.e2e);
        out
    }
}

/// Prometheus' text content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Numbers as Python's prometheus_client writes them: integral values with ".0".
fn num(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    if v.is_nan() {
        return "NaN".into();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A small parser of the text format, independent of the writer: sample lines
    /// become (name{labels}) -> value, and every sample's family must have been
    /// declared by a TYPE line before it.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                types.insert(it.next().unwrap().to_string(), it.next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            let family = types.keys().find(|f| {
                name == f.as_str()
                    || (types[*f] == "histogram"
                        && ["_bucket", "_count", "_sum"].iter().any(|s| name == format!("{f}{s}")))
            });
            assert!(family.is_some(), "sample {name} has no TYPE");
            let v = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap(),
            };
            samples.insert(series.to_string(), v);
        }
        samples
    }

    #[test]
    fn exposition_has_vllm_names_labels_and_values() {
        let m = Metrics::new("smol\"lm", 2);
        m.add_prompt_tokens(1, 12);
        m.add_generation_tokens(1, 5);
        m.observe_ttft(1, 0.003);
        m.observe_ttft(1, 0.5);
        m.observe_ttft(1, 9999.0);
        m.request_finished(1, "length", 1.2);
        m.request_finished(7, "stop", 1.0); // no such rank: ignored
        let stats = vec![
            EngineStats::default(),
            EngineStats { num_waiting: 2, num_running: 3, kv_usage: 0.5, num_preemptions: 4, prefix_cache_queries: 100, prefix_cache_hits: 40, ..Default::default() },
        ];
        let text = m.render(&stats, &[false, true]);
        let s = parse(&text);
        let l1 = "model_name=\"smol\\\"lm\",engine=\"1\"";
        assert_eq!(s[&format!("ferry:engine_up{{{l1}}}")], 1.0);
        assert_eq!(s["ferry:engine_up{model_name=\"smol\\\"lm\",engine=\"0\"}"], 0.0);
        assert_eq!(s[&format!("vllm:num_requests_running{{{l1}}}")], 3.0);
        assert_eq!(s[&format!("vllm:num_requests_waiting{{{l1}}}")], 2.0);
        assert_eq!(s[&format!("vllm:kv_cache_usage_perc{{{l1}}}")], 0.5);
        assert_eq!(s[&format!("vllm:prefix_cache_queries_total{{{l1}}}")], 100.0);
        assert_eq!(s[&format!("vllm:prefix_cache_hits_total{{{l1}}}")], 40.0);
        assert_eq!(s[&format!("vllm:num_preemptions_total{{{l1}}}")], 4.0);
        assert_eq!(s[&format!("vllm:prompt_tokens_total{{{l1}}}")], 12.0);
        assert_eq!(s[&format!("vllm:generation_tokens_total{{{l1}}}")], 5.0);
        assert_eq!(s[&format!("vllm:request_success_total{{{l1},finished_reason=\"length\"}}")], 1.0);
        assert_eq!(s[&format!("vllm:request_success_total{{{l1},finished_reason=\"stop\"}}")], 0.0);
        // Cumulative buckets: 0.003 <= 0.005; 0.5 <= 0.5; 9999 only in +Inf.
        let b = |le: &str| s[&format!("vllm:time_to_first_token_seconds_bucket{{{l1},le=\"{le}\"}}")];
        assert_eq!((b("0.001"), b("0.005"), b("0.25"), b("0.5"), b("2560.0"), b("+Inf")), (0.0, 1.0, 1.0, 2.0, 2.0, 3.0));
        assert_eq!(s[&format!("vllm:time_to_first_token_seconds_count{{{l1}}}")], 3.0);
        assert!((s[&format!("vllm:time_to_first_token_seconds_sum{{{l1}}}")] - 9999.503).abs() < 1e-9);
        assert_eq!(s[&format!("vllm:e2e_request_latency_seconds_bucket{{{l1},le=\"1.5\"}}")], 1.0);
        assert_eq!(s[&format!("vllm:e2e_request_latency_seconds_bucket{{{l1},le=\"1.0\"}}")], 0.0);
        // Rank 0 exists too, all zero, and every bucket list is complete.
        assert_eq!(s["vllm:inter_token_latency_seconds_count{model_name=\"smol\\\"lm\",engine=\"0\"}"], 0.0);
        let n_buckets = text.lines().filter(|l| l.starts_with("vllm:inter_token_latency_seconds_bucket") && l.contains("engine=\"0\"")).count();
        assert_eq!(n_buckets, ITL_BUCKETS.len() + 1);
        assert!(text.contains("# TYPE vllm:prompt_tokens_total counter\n"));
        assert!(text.contains("# TYPE vllm:e2e_request_latency_seconds histogram\n"));
    }
}
