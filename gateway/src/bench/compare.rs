//! `ferry bench compare`: saved results side by side, with each value's ratio
//! to the first file's.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Rows shown, in order; percentile rows are added from the files' own keys.
const FIXED_ROWS: &[(&str, &str)] = &[
    ("completed", "Successful requests"),
    ("failed", "Failed requests"),
    ("duration", "Benchmark duration (s)"),
    ("total_input_tokens", "Total input tokens"),
    ("total_output_tokens", "Total generated tokens"),
    ("request_throughput", "Request throughput (req/s)"),
    ("output_throughput", "Output token throughput (tok/s)"),
    ("total_token_throughput", "Total token throughput (tok/s)"),
    ("max_output_tokens_per_s", "Peak output tokens/s"),
    ("max_concurrent_requests", "Peak concurrent requests"),
];

pub(crate) struct Loaded {
    pub label: String,
    pub value: Value,
}

pub(crate) fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if !value.is_object() || value.get("request_throughput").is_none() {
        bail!("{} is not a `ferry bench serve --save-result` file", path.display());
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let label = match value.get("http_version").and_then(|v| v.as_str()) {
        Some(h) => format!("{stem} ({h})"),
        None => stem,
    };
    Ok(Loaded { label, value })
}

/// The latency rows present in the first file: mean/median/pXX for each metric.
fn latency_rows(first: &Value) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for (key, name) in [("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")] {
        for stat in ["mean", "median"] {
            let k = format!("{stat}_{key}_ms");
            if first.get(&k).is_some() {
                rows.push((k, format!("{} {name} (ms)", capitalize(stat))));
            }
        }
        let mut ps: Vec<(f64, String)> = first
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, _)| {
                let rest = k.strip_prefix('p')?.strip_suffix(&format!("_{key}_ms"))?;
                Some((rest.parse::<f64>().ok()?, k.clone()))
            })
            .collect();
        ps.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (_, k) in ps {
            let label = format!("P{} {name} (ms)", &k[1..k.find('_').unwrap_or(1)]);
            rows.push((k, label));
        }
    }
    rows
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// The comparison table as text.
pub(crate) fn render(files: &[Loaded]) -> String {
    let mut rows: Vec<(String, String)> = FIXED_ROWS.iter().map(|(k, l)| (k.to_string(), l.to_string())).collect();
    if let Some(first) = files.first() {
        rows.extend(latency_rows(&first.value));
    }
    let col = 24usize;
    let mut s = String::new();
    let _ = write!(s, "{:<34}", "Metric");
    for f in files {
        let _ = write!(s, " {:>col$}", super::sse::truncate(&f.label, col));
    }
    s.push('\n');
    let _ = writeln!(s, "{}", "-".repeat(34 + files.len() * (col + 1)));
    for (key, label) in rows {
        let base = files.first().and_then(|f| f.value.get(&key)).and_then(serde_json::Value::as_f64);
        let _ = write!(s, "{label:<34}");
        for (i, f) in files.iter().enumerate() {
            let raw = f.value.get(&key);
            // Counts print as integers, measurements with two decimals.
            let shown = |v: f64| if raw.is_some_and(|r| r.is_u64() || r.is_i64()) { format!("{v:.0}") } else { format!("{v:.2}") };
            let cell = match raw.and_then(serde_json::Value::as_f64) {
                None => "-".to_string(),
                Some(v) if i == 0 => shown(v),
                Some(v) => match base {
                    Some(b) if b != 0.0 => format!("{} ({:.2}x)", shown(v), v / b),
                    _ => shown(v),
                },
            };
            let _ = write!(s, " {cell:>col$}");
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratios_are_to_the_first_file() {
        let a = Loaded {
            label: "a".into(),
            value: json!({"request_throughput": 2.0, "completed": 10, "failed": 0, "mean_ttft_ms": 100.0, "p99_ttft_ms": 150.0, "p99.9_ttft_ms": 160.0}),
        };
        let b = Loaded {
            label: "b".into(),
            value: json!({"request_throughput": 3.0, "completed": 10, "failed": 1, "mean_ttft_ms": 50.0, "p99_ttft_ms": 75.0}),
        };
        let t = render(&[a, b]);
        let line = |prefix: &str| t.lines().find(|l| l.starts_with(prefix)).unwrap().to_string();
        assert!(line("Request throughput").contains("3.00 (1.50x)"), "{t}");
        assert!(line("Mean TTFT").contains("50.00 (0.50x)"), "{t}");
        assert!(line("P99 TTFT").contains("75.00 (0.50x)"), "{t}");
        assert!(line("P99.9 TTFT").trim_end().ends_with('-'), "{t}");
        // Failed: base 0, so no ratio.
        assert!(line("Failed requests").trim_end().ends_with(" 1"), "{t}");
        assert!(line("Successful requests").contains("10 (1.00x)"), "{t}");
    }

    #[test]
    fn rejects_files_that_are_not_results() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        std::fs::write(&p, "{\"a\":1}").unwrap();
        assert!(load(&p).is_err());
        std::fs::write(&p, "nope").unwrap();
        assert!(load(&p).is_err());
        std::fs::write(&p, "{\"request_throughput\":1,\"http_version\":\"HTTP/3\"}").unwrap();
        assert_eq!(load(&p).unwrap().label, "x (HTTP/3)");
    }
}
