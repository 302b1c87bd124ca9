//! `ferry bench serve`: a serving benchmark for any OpenAI-compatible server
//! (ferry, vLLM, llama.cpp's server) over HTTP/1.1, HTTP/2 or HTTP/3, with
//! vLLM's flags, metrics and report; `ferry bench compare` sets saved results
//! side by side.

pub(crate) mod args;
pub(crate) mod arrival;
pub(crate) mod client;
pub(crate) mod compare;
pub(crate) mod dataset;
pub(crate) mod h3_client;
pub(crate) mod http_types;
pub(crate) mod metrics;
pub(crate) mod record;
pub(crate) mod report;
pub(crate) mod request;
pub(crate) mod rng;
pub(crate) mod runner;
pub(crate) mod sse;
pub(crate) mod tls;

#[cfg(test)]
mod e2e_tests;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub(crate) use args::{BenchCompareArgs, BenchServeArgs, DatasetName, HttpVersion};

use client::Client;
use dataset::{jsonl_dataset, random_dataset, RandomSpec};
use request::RequestSettings;

/// Runs `ferry bench serve` and prints (and optionally saves) the report.
/// Fails only on bad settings, an unreachable server before the run, or when
/// every request failed (after the report is printed and saved).
pub(crate) async fn run_bench_serve(args: BenchServeArgs) -> Result<()> {
    let outcome = bench_serve(&args).await?;
    print!("{}", outcome.text);
    if let Some(path) = &args.save_result {
        println!("Saved the result to {}", path.display());
    }
    if outcome.metrics.completed == 0 {
        let first = outcome.records.iter().find_map(|r| r.failure.as_ref()).map(std::string::ToString::to_string).unwrap_or_default();
        bail!("all {} requests failed; first failure: {first}", outcome.records.len());
    }
    Ok(())
}

/// Everything a run produced; the CLI prints `text`, tests inspect the rest.
#[cfg_attr(not(test), allow(dead_code, reason = "the CLI reads only `text`; the tests read the rest"))]
pub(crate) struct BenchOutcome {
    pub text: String,
    pub metrics: metrics::BenchMetrics,
    pub records: Vec<record::RequestRecord>,
    pub warmup_failures: usize,
}

/// The benchmark without printing the report (it does write --save-result).
pub(crate) async fn bench_serve(args: &BenchServeArgs) -> Result<BenchOutcome> {
    args.validate()?;
    let percentiles = args::parse_percentiles(&args.metric_percentiles)?;
    let percentile_metrics = args::parse_percentile_metrics(&args.percentile_metrics)?;
    let kind = args::endpoint_kind(&args.endpoint).context("unsupported --endpoint")?;
    let trust = tls::Trust::from_flags(args.tls_spki_pin.as_deref(), args.cacert.as_deref(), args.insecure)?;
    let timeout = Duration::from_secs_f64(args.timeout);
    let max_duration = Duration::from_secs_f64(args.max_duration);

    let samples = match args.dataset_name {
        DatasetName::Random => random_dataset(&RandomSpec {
            num_requests: args.num_prompts,
            input_len: args.random_input_len,
            output_len: args.random_output_len,
            range_ratio: args.random_range_ratio,
            prefix_len: args.random_prefix_len,
            seed: args.seed,
        })?,
        DatasetName::Jsonl => {
            let path = args.dataset_path.as_deref().context("--dataset-path is required for jsonl")?;
            jsonl_dataset(path, args.num_prompts, args.random_output_len)?
        }
    };
    // The arrival process has its own stream so prompt choices do not shift it.
    let mut arrival_rng = rng::Rng::new(args.seed ^ 0xA5A5_5A5A_0F0F_F0F0);
    let arrivals = arrival::arrival_offsets(samples.len(), args.request_rate, args.burstiness, &mut arrival_rng);

    let client = tokio::time::timeout(timeout, Client::new(&args.base_url, args.http, trust.as_ref()))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {} took longer than --timeout", args.base_url))??;
    let client = Arc::new(client);
    let model = match &args.model {
        Some(m) => m.clone(),
        None => tokio::time::timeout(timeout, first_model(&client))
            .await
            .map_err(|_| anyhow::anyhow!("GET /v1/models took longer than --timeout"))??,
    };
    let settings = Arc::new(RequestSettings {
        kind,
        endpoint: args.endpoint.clone(),
        model: model.clone(),
        temperature: args.temperature,
        ignore_eos: args.ignore_eos,
        timeout,
        extra_body: args.extra_body.clone().unwrap_or_default(),
    });

    let show_progress = !args.disable_tqdm;
    let mut warmup_failures = 0;
    if args.num_warmups > 0 {
        eprintln!("Warming up with {} requests...", args.num_warmups);
        let failures = runner::warmup(client.clone(), settings.clone(), &samples[0], args.num_warmups, args.max_concurrency, max_duration).await;
        warmup_failures = failures.len();
        if let Some(f) = failures.first().and_then(|r| r.failure.as_ref()) {
            eprintln!("Warmup: {} of {} requests failed (first: {f})", failures.len(), args.num_warmups);
        } else {
            eprintln!("Warmup run completed.");
        }
    }

    let distribution = if args.burstiness == 1.0 { "Poisson process" } else { "Gamma distribution" };
    eprintln!("Starting main benchmark run ({} to {}{} as {model:?})...", args.http.label(), args.base_url, args.endpoint);
    eprintln!("Traffic request rate: {}", if args.request_rate.is_finite() { args.request_rate.to_string() } else { "inf".into() });
    eprintln!("Burstiness factor: {:?} ({distribution})", args.burstiness);
    eprintln!("Maximum request concurrency: {}", args.max_concurrency.map_or_else(|| "None".into(), |c| c.to_string()));

    let plan = runner::LoadPlan {
        samples,
        arrivals,
        max_concurrency: args.max_concurrency,
        max_duration,
        show_progress,
    };
    let result = runner::run_load(client.clone(), settings, plan).await;
    client.close().await;

    let m = metrics::compute(&result.records, result.duration_s, &percentiles);
    let info = report::RunInfo {
        http_version: args.http.label(),
        base_url: &args.base_url,
        endpoint: &args.endpoint,
        model: &model,
        request_rate: args.request_rate,
        burstiness: args.burstiness,
        max_concurrency: args.max_concurrency,
        num_prompts: args.num_prompts,
        percentile_metrics: &percentile_metrics,
    };
    let text = report::render(&info, &m, &result.records);
    let mut settings_json = serde_json::to_value(args).unwrap_or(serde_json::Value::Null);
    if let Some(o) = settings_json.as_object_mut() {
        // JSON has no infinity; keep the flag's spelling.
        if !args.request_rate.is_finite() {
            o.insert("request_rate".into(), serde_json::json!("inf"));
        }
        o.insert("model_resolved".into(), serde_json::json!(model));
    }
    let json = report::result_json(&info, &settings_json, &m, &result.records);
    if let Some(path) = &args.save_result {
        report::save(path, &json)?;
    }
    Ok(BenchOutcome { text, metrics: m, records: result.records, warmup_failures })
}

/// The first model id of GET /v1/models, as vLLM does when --model is absent.
async fn first_model(client: &Client) -> Result<String> {
    let mut resp = client
        .get("/v1/models")
        .await
        .map_err(|f| anyhow::anyhow!("GET /v1/models failed ({f}); pass --model NAME"))?;
    let text = resp.body.read_to_string(1 << 20).await;
    if resp.status != 200 {
        bail!("GET /v1/models returned HTTP {}: {}; pass --model NAME", resp.status, sse::truncate(&text, 200));
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("GET /v1/models did not return JSON; pass --model NAME")?;
    v.get("data")
        .and_then(|d| d.as_array())
        .and_then(|d| d.first())
        .and_then(|m| m.get("id"))
        .and_then(|id| id.as_str())
        .map(str::to_string)
        .context("GET /v1/models listed no model; pass --model NAME")
}

/// Runs `ferry bench compare` and prints the table.
pub(crate) fn run_bench_compare(args: BenchCompareArgs) -> Result<()> {
    if args.files.is_empty() {
        bail!("give at least one result file");
    }
    let loaded = args.files.iter().map(|p| compare::load(p)).collect::<Result<Vec<_>>>()?;
    print!("{}", compare::render(&loaded));
    Ok(())
}
