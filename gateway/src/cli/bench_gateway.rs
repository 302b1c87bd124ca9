//! `ferry bench gateway`: the latency the gateway adds per token.
//!
//! One process loads the model once and starts one engine behind the full
//! gateway server (as `ferry serve` does, on ephemeral ports). The same prompts
//! (bench serve's random dataset and seed), greedy, with `ignore_eos` and a fixed
//! `max_tokens`, then go through four paths at the same concurrency:
//!
//! - in-process: token ids straight into the [`Coordinator`], timed from
//!   `submit` to each token event (no HTTP, JSON or detokenization);
//! - HTTP/1.1 and HTTP/2 (prior knowledge) on the plain port, and HTTP/3 pinned
//!   to the server's certificate, each through bench serve's client and runner
//!   (streamed /v1/completions, timed as `ferry bench serve` times them).
//!
//! The paths take turns every `--max-concurrency` prompts, so drift of the
//! machine (heat, other load) touches every path alike; the whole set runs
//! `--rounds` times and each figure reported is the median over the rounds.
//! Prefix caching is off: later paths must not find the prompts already cached
//! by earlier ones.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crate::cli::progress::ProgressBar;
use ferry_engine::quant::GgmlType;
use ferry_engine::{load_model, EngineArgs, LoadFormat};
use ferry_transport::SamplingParams;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use crate::bench::client::Client;
use crate::bench::dataset::{random_dataset, RandomSpec, SampleRequest};
use crate::bench::metrics::{self, BenchMetrics};
use crate::bench::record::{Failure, FailureKind, RequestRecord};
use crate::bench::request::{EndpointKind, RequestSettings};
use crate::bench::runner::{self, LoadPlan};
use crate::bench::tls::Trust;
use crate::bench::HttpVersion;
use crate::api::{router, AppState};
use crate::engines::coordinator::{start_engine_clients, Coordinator};
use crate::engines::rank_link::SeqEvent;
use crate::engines::local::{expectations, start_local_engine};
use crate::cli::model_source;
use crate::server::{serve, ServeConfig};

/// `ferry bench gateway`: per-token latency over HTTP/1.1, HTTP/2 and HTTP/3
/// against calling the engine in-process.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub(crate) struct BenchGatewayArgs {
    /// A GGUF file or a Hugging Face folder (default: SmolLM2-135M-Instruct).
    pub model: Option<String>,
    /// Prompts per path and round.
    #[arg(long, default_value_t = 32)]
    pub num_prompts: usize,
    /// Prompt length in tokens (approximately; bench serve's random words).
    #[arg(long, default_value_t = 128)]
    pub random_input_len: usize,
    /// Tokens generated per request (max_tokens, with ignore_eos).
    #[arg(long, default_value_t = 64)]
    pub random_output_len: usize,
    /// Seed of the prompt generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Requests in flight at once on every path.
    #[arg(long, default_value_t = 1)]
    pub max_concurrency: usize,
    /// Untimed requests sent on each path before each of its measured runs.
    #[arg(long, default_value_t = 2)]
    pub num_warmups: usize,
    /// Times the whole set of paths runs, in turn; figures are the median over rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// CPU threads for the model's arithmetic (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write the per-round figures, the medians and the deltas to this JSON file.
    #[arg(long)]
    pub save_result: Option<PathBuf>,
}

/// Per-request timeout on every path; a stuck request fails instead of hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// The figures of one path in one round (or their medians), in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub(crate) struct PathFigures {
    pub mean_ttft_ms: f64,
    pub median_ttft_ms: f64,
    pub mean_itl_ms: f64,
    pub median_itl_ms: f64,
    pub p99_itl_ms: f64,
    pub mean_tpot_ms: f64,
}

impl PathFigures {
    pub(crate) fn from_metrics(m: &BenchMetrics) -> Self {
        let p99 = m.itl_ms.percentiles.iter().find(|(p, _)| *p == 99.0).map_or(0.0, |(_, v)| *v);
        PathFigures {
            mean_ttft_ms: m.ttft_ms.mean,
            median_ttft_ms: m.ttft_ms.median,
            mean_itl_ms: m.itl_ms.mean,
            median_itl_ms: m.itl_ms.median,
            p99_itl_ms: p99,
            mean_tpot_ms: m.tpot_ms.mean,
        }
    }

    fn fields(&self) -> [f64; 6] {
        [self.mean_ttft_ms, self.median_ttft_ms, self.mean_itl_ms, self.median_itl_ms, self.p99_itl_ms, self.mean_tpot_ms]
    }

    fn from_fields(f: [f64; 6]) -> Self {
        PathFigures { mean_ttft_ms: f[0], median_ttft_ms: f[1], mean_itl_ms: f[2], median_itl_ms: f[3], p99_itl_ms: f[4], mean_tpot_ms: f[5] }
    }

    /// Each figure's median over the rounds (numpy's median: the mean of the
    /// middle two for an even count).
    pub(crate) fn median_of(rounds: &[PathFigures]) -> Self {
        let mut out = [0.0; 6];
        for (k, o) in out.iter_mut().enumerate() {
            let mut v: Vec<f64> = rounds.iter().map(|r| r.fields()[k]).collect();
            v.sort_by(f64::total_cmp);
            *o = metrics::percentile_sorted(&v, 50.0);
        }
        PathFigures::from_fields(out)
    }
}

/// What a path adds over the in-process path, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct AddedLatency {
    pub mean_ttft_ms: f64,
    pub median_ttft_ms: f64,
    pub mean_itl_ms: f64,
    pub median_itl_ms: f64,
    pub mean_tpot_ms: f64,
}

pub(crate) fn added_latency(path: &PathFigures, in_process: &PathFigures) -> AddedLatency {
    AddedLatency {
        mean_ttft_ms: path.mean_ttft_ms - in_process.mean_ttft_ms,
        median_ttft_ms: path.median_ttft_ms - in_process.median_ttft_ms,
        mean_itl_ms: path.mean_itl_ms - in_process.mean_itl_ms,
        median_itl_ms: path.median_itl_ms - in_process.median_itl_ms,
        mean_tpot_ms: path.mean_tpot_ms - in_process.mean_tpot_ms,
    }
}

/// The paths, in the order each round runs them; the first is the reference.
const PATHS: [Option<HttpVersion>; 4] = [None, Some(HttpVersion::Http11), Some(HttpVersion::Http2), Some(HttpVersion::Http3)];

fn path_label(p: Option<HttpVersion>) -> &'static str {
    p.map_or("in-process", HttpVersion::label)
}

/// The table: one row per path, then the added latency of each HTTP version.
pub(crate) fn render(medians: &[(&str, PathFigures)], rounds: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "{:=^98}", format!(" Gateway latency (ms, median of {rounds} round{}) ", if rounds == 1 { "" } else { "s" }));
    let _ = writeln!(s, "{:<12} {:>13} {:>13} {:>11} {:>12} {:>10} {:>11}", "path", "mean TTFT", "median TTFT", "mean ITL", "median ITL", "p99 ITL", "mean TPOT");
    for (label, f) in medians {
        let _ = writeln!(
            s,
            "{label:<12} {:>13.3} {:>13.3} {:>11.3} {:>12.3} {:>10.3} {:>11.3}",
            f.mean_ttft_ms, f.median_ttft_ms, f.mean_itl_ms, f.median_itl_ms, f.p99_itl_ms, f.mean_tpot_ms
        );
    }
    if let Some((base_label, base)) = medians.first() {
        let _ = writeln!(s, "{:-^98}", format!(" added over {base_label} "));
        let _ = writeln!(s, "{:<12} {:>13} {:>13} {:>11} {:>12} {:>10} {:>11}", "path", "mean TTFT", "median TTFT", "mean ITL", "median ITL", "", "mean TPOT");
        for (label, f) in &medians[1..] {
            let d = added_latency(f, base);
            let _ = writeln!(
                s,
                "{label:<12} {:>+13.3} {:>+13.3} {:>+11.3} {:>+12.3} {:>10} {:>+11.3}",
                d.mean_ttft_ms, d.median_ttft_ms, d.mean_itl_ms, d.median_itl_ms, "", d.mean_tpot_ms
            );
        }
    }
    s
}

/// One request straight into the coordinator: TTFT from `submit` to the first
/// token event, one gap per later event that carries tokens.
pub(crate) async fn run_in_process_request(
    coordinator: &Coordinator,
    prompt_tokens: Vec<u32>,
    sampling: SamplingParams,
    index: usize,
    run_start: Instant,
    queue_time: f64,
) -> RequestRecord {
    let prompt_len = prompt_tokens.len() as u64;
    let requested = sampling.max_tokens as u64;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let start_time = start.duration_since(run_start).as_secs_f64();
    let failed = |kind, msg: String| RequestRecord::failed(index, start_time, queue_time, prompt_len, requested, Failure::new(kind, msg));
    // Dropping the guard at the end aborts the request if it is still running.
    let _guard = match coordinator.submit(prompt_tokens, sampling, tx, None, None) {
        Ok(g) => g,
        Err(e) => return failed(FailureKind::Connect, e.to_string()),
    };
    let (mut ttft, mut last, mut itl, mut tokens, mut chunks) = (None, 0.0, Vec::new(), 0u64, 0u64);
    let deadline = tokio::time::Instant::from_std(start + REQUEST_TIMEOUT);
    loop {
        let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return failed(FailureKind::Timeout, format!("no finish within {} s", REQUEST_TIMEOUT.as_secs())),
            Ok(None) => return failed(FailureKind::StreamClosedEarly, "the engine link closed before the request finished".into()),
            Ok(Some(SeqEvent::Failed { message, .. })) => return failed(FailureKind::ServerError, message),
            Ok(Some(SeqEvent::Output(o))) => o,
            Ok(Some(SeqEvent::Moved { .. })) => continue,
        };
        if !ev.new_tokens.is_empty() {
            let now = start.elapsed().as_secs_f64();
            match ttft {
                None => ttft = Some(now),
                Some(_) => itl.push(now - last),
            }
            last = now;
            tokens += ev.new_tokens.len() as u64;
            chunks += 1;
        }
        if let Some(finish) = ev.finish {
            if let ferry_transport::FinishReason::Error(e) = &finish {
                return failed(FailureKind::ServerError, e.message.clone());
            }
            break;
        }
    }
    let Some(ttft) = ttft else {
        return failed(FailureKind::NoContent, "the request finished without a token".into());
    };
    RequestRecord {
        index,
        start_time,
        queue_time,
        ttft,
        itl,
        latency: last,
        prompt_tokens: prompt_len,
        prompt_tokens_from_server: true,
        output_tokens: tokens,
        output_tokens_from_server: true,
        content_chunks: chunks,
        requested_output_len: requested,
        failure: None,
    }
}

/// All prompts through the coordinator, at most `max_concurrency` at once.
async fn run_in_process(coordinator: &Coordinator, prompts: &[(Vec<u32>, SamplingParams)], max_concurrency: usize) -> (Vec<RequestRecord>, f64) {
    let sem = Arc::new(Semaphore::new(max_concurrency.max(1)));
    let run_start = Instant::now();
    let mut tasks = Vec::with_capacity(prompts.len());
    for (i, (toks, sampling)) in prompts.iter().cloned().enumerate() {
        let (sem, coordinator) = (sem.clone(), coordinator.clone());
        tasks.push(tokio::spawn(async move {
            let arrived = Instant::now();
            let _permit = sem.acquire_owned().await.ok();
            run_in_process_request(&coordinator, toks, sampling, i, run_start, arrived.elapsed().as_secs_f64()).await
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for (i, t) in tasks.into_iter().enumerate() {
        records.push(t.await.unwrap_or_else(|e| {
            RequestRecord::failed(i, 0.0, 0.0, 0, 0, Failure::new(FailureKind::Transport, format!("request task failed: {e}")))
        }));
    }
    (records, run_start.elapsed().as_secs_f64())
}

/// Runs `ferry bench gateway`: prints the table and saves the JSON.
pub(crate) fn run(args: BenchGatewayArgs) -> Result<()> {
    if args.num_prompts == 0 || args.max_concurrency == 0 || args.rounds == 0 {
        bail!("--num-prompts, --max-concurrency and --rounds must be at least 1");
    }
    if args.random_input_len == 0 || args.random_output_len == 0 {
        bail!("--random-input-len and --random-output-len must be at least 1");
    }
    let threads = ferry_engine::executor::default_threads(args.threads.unwrap_or(0));
    let (path, name) = model_source::resolve(args.model.as_deref())?;
    let model = load_model(&path, LoadFormat::Auto, GgmlType::F32, &ProgressBar::new(&name))?;
    let eargs = EngineArgs {
        enable_prefix_caching: false,
        max_num_seqs: args.max_concurrency.max(EngineArgs::default().max_num_seqs),
        threads,
        ..Default::default()
    };
    let (engine_end, engine) = start_local_engine(&model, &eargs, 0, &name)?;

    let samples = random_dataset(&RandomSpec {
        num_requests: args.num_prompts,
        input_len: args.random_input_len,
        output_len: args.random_output_len,
        range_ratio: 0.0,
        prefix_len: 0,
        seed: args.seed,
    })?;
    // The server's /v1/completions encodes with special tokens (BOS); so do we.
    let prompts = samples
        .iter()
        .map(|s| {
            let toks = model.tokenizer.encode(&s.prompt, true).map_err(|e| anyhow::anyhow!("cannot tokenize a prompt: {e}"))?;
            let sampling = SamplingParams { temperature: 0.0, ignore_eos: true, max_tokens: s.output_len as u32, ..Default::default() };
            Ok((toks, sampling))
        })
        .collect::<Result<Vec<_>>>()?;
    let cert_dir = std::env::temp_dir().join(format!("ferry-bench-gateway-{}", std::process::id()));

    // As `ferry serve`: the engine's threads do the arithmetic, two async threads move bytes.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(async {
        let coordinator = start_engine_clients(vec![engine_end], expectations(&model.cfg, Some(&model.weights), 1, false));
        let state = AppState::new(vec![name.clone()], path.display().to_string(), model.tokenizer.clone(), engine.shape.max_model_len as u32, coordinator.clone());
        let cfg = ServeConfig { host: "127.0.0.1".into(), port: 0, tls_port: Some(0), cert_dir: Some(cert_dir.clone()), ..Default::default() };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = serve(router(state), cfg, async {
            let _ = stop_rx.await;
        })
        .await?;
        let outcome = measure(&args, &coordinator, &prompts, &samples, &server, &name).await;
        let _ = stop_tx.send(());
        server.wait().await?;
        outcome
    });
    let _ = std::fs::remove_dir_all(&cert_dir);
    // Stopping the runtime drops the last handle on the engine's link, which ends its threads.
    drop(rt);
    engine.threads.join();
    let (text, json) = result?;
    print!("{text}");
    if let Some(p) = &args.save_result {
        crate::bench::report::save(p, &json)?;
        println!("Saved the result to {}", p.display());
    }
    Ok(())
}

/// Where one path sends its requests.
enum Target {
    InProcess,
    Http(Arc<Client>),
}

/// Runs prompts `range` on one path; records come back indexed and timed from
/// the chunk's start.
async fn run_chunk(
    target: &Target,
    coordinator: &Coordinator,
    settings: &Arc<RequestSettings>,
    prompts: &[(Vec<u32>, SamplingParams)],
    samples: &[SampleRequest],
    range: std::ops::Range<usize>,
    max_concurrency: usize,
) -> (Vec<RequestRecord>, f64) {
    match target {
        Target::InProcess => run_in_process(coordinator, &prompts[range], max_concurrency).await,
        Target::Http(client) => {
            let n = range.len();
            let plan = LoadPlan {
                samples: samples[range].to_vec(),
                arrivals: vec![0.0; n],
                max_concurrency: Some(max_concurrency),
                max_duration: REQUEST_TIMEOUT,
                show_progress: false,
            };
            let r = runner::run_load(client.clone(), settings.clone(), plan).await;
            (r.records, r.duration_s)
        }
    }
}

/// The measurements; returns the printed table and the JSON result.
///
/// Paths take turns chunk by chunk (`max_concurrency` prompts at a time, the
/// order rotating each chunk), so that load from elsewhere on the machine falls
/// on every path alike rather than on whichever ran during it.
async fn measure(
    args: &BenchGatewayArgs,
    coordinator: &Coordinator,
    prompts: &[(Vec<u32>, SamplingParams)],
    samples: &[SampleRequest],
    server: &crate::server::RunningServer,
    model: &str,
) -> Result<(String, serde_json::Value)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !coordinator.all_healthy() {
        if Instant::now() > deadline {
            bail!("the engine did not say hello within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let plain = format!("http://{}", server.http_addr());
    let secure = format!("https://127.0.0.1:{}", server.tls_port().context("the server has no TLS port")?);
    let trust = Trust::from_flags(server.spki_sha256_base64.as_deref(), None, false)?;
    let mut targets = vec![Target::InProcess];
    for http in [HttpVersion::Http11, HttpVersion::Http2, HttpVersion::Http3] {
        let url = if http == HttpVersion::Http3 { &secure } else { &plain };
        targets.push(Target::Http(Arc::new(Client::new(url, http, trust.as_ref()).await?)));
    }
    let settings = Arc::new(RequestSettings {
        kind: EndpointKind::Completions,
        endpoint: "/v1/completions".into(),
        model: model.to_string(),
        temperature: 0.0,
        ignore_eos: true,
        timeout: REQUEST_TIMEOUT,
        extra_body: Default::default(),
    });
    let c = args.max_concurrency;
    if args.num_warmups > 0 {
        eprintln!("Warming up every path with {} requests...", args.num_warmups);
        for (t, label) in targets.iter().zip(PATHS.map(path_label)) {
            let first: Vec<usize> = vec![0; args.num_warmups];
            let warm_prompts: Vec<_> = first.iter().map(|&i| prompts[i].clone()).collect();
            let warm_samples: Vec<_> = first.iter().map(|&i| samples[i].clone()).collect();
            let (records, _) = run_chunk(t, coordinator, &settings, &warm_prompts, &warm_samples, 0..args.num_warmups, c).await;
            if let Some(f) = records.iter().find_map(|r| r.failure.as_ref()) {
                bail!("{label} warmup failed: {f}");
            }
        }
    }

    let n = prompts.len();
    let chunks: Vec<std::ops::Range<usize>> = (0..n).step_by(c).map(|a| a..(a + c).min(n)).collect();
    // per_path[k][round] = (records, measured seconds)
    let mut per_path: Vec<Vec<(Vec<RequestRecord>, f64)>> = (0..targets.len()).map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        eprintln!("Round {}/{}: {} prompts, {} at a time, paths in turn...", round + 1, args.rounds, n, c);
        per_path.iter_mut().for_each(|p| p.push((Vec::new(), 0.0)));
        for (ci, range) in chunks.iter().enumerate() {
            for j in 0..targets.len() {
                let k = (j + ci + round) % targets.len();
                let (mut records, dur) = run_chunk(&targets[k], coordinator, &settings, prompts, samples, range.clone(), c).await;
                if let Some(f) = records.iter().find_map(|r| r.failure.as_ref()) {
                    bail!("{} request failed: {f}", path_label(PATHS[k]));
                }
                let (all, elapsed) = per_path[k].last_mut().expect("pushed above");
                for r in &mut records {
                    r.index += range.start;
                    r.start_time += *elapsed;
                }
                all.extend(records);
                *elapsed += dur;
            }
        }
    }
    for t in &targets {
        if let Target::Http(client) = t {
            client.close().await;
        }
    }

    let mut rounds_json: Vec<serde_json::Map<String, serde_json::Value>> = vec![serde_json::Map::new(); args.rounds];
    let mut medians = Vec::new();
    let mut totals = Vec::new();
    for (k, runs) in per_path.iter().enumerate() {
        let label = path_label(PATHS[k]);
        let mut figs = Vec::new();
        for (round, (records, dur)) in runs.iter().enumerate() {
            let m = metrics::compute(records, *dur, &[99.0]);
            totals.push((m.total_input_tokens, m.total_output_tokens));
            let f = PathFigures::from_metrics(&m);
            rounds_json[round].insert(label.into(), json!({ "figures": f, "metrics": m }));
            figs.push(f);
        }
        medians.push((label, PathFigures::median_of(&figs)));
    }
    // Every path must have done the same work, or the comparison means nothing.
    if totals.windows(2).any(|w| w[0] != w[1]) {
        eprintln!("warning: token totals (input, output) differ between paths or rounds: {totals:?}");
    }
    let text = render(&medians, args.rounds);
    let base = medians[0].1;
    let json = json!({
        "ferry_bench_gateway_version": 1,
        "settings": args,
        "model_id": model,
        "total_input_tokens": totals[0].0,
        "total_output_tokens": totals[0].1,
        "median": medians.iter().map(|(l, f)| (l.to_string(), json!(f))).collect::<serde_json::Map<_, _>>(),
        "added_over_in_process": medians[1..].iter().map(|(l, f)| (l.to_string(), json!(added_latency(f, &base)))).collect::<serde_json::Map<_, _>>(),
        "rounds": rounds_json,
    });
    Ok((text, json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::coordinator::start_engine_clients;
    use ferry_transport::{flume_link, EngineCommand, EngineOutputs, FinishReason, FromEngine, Hello, ToEngine, TokenOutput, PROTOCOL_VERSION};

    fn figs(x: f64) -> PathFigures {
        PathFigures::from_fields([x, x + 1.0, x + 2.0, x + 3.0, x + 4.0, x + 5.0])
    }

    #[test]
    fn medians_over_rounds_and_deltas_match_hand_figures() {
        // Odd count: the middle value; even count: the mean of the middle two.
        assert_eq!(PathFigures::median_of(&[figs(10.0), figs(2.0), figs(7.0)]), figs(7.0));
        assert_eq!(PathFigures::median_of(&[figs(4.0), figs(1.0)]), figs(2.5));
        assert_eq!(PathFigures::median_of(&[figs(3.0)]), figs(3.0));
        let base = PathFigures { mean_ttft_ms: 10.0, median_ttft_ms: 9.0, mean_itl_ms: 5.0, median_itl_ms: 4.5, p99_itl_ms: 8.0, mean_tpot_ms: 5.2 };
        let http = PathFigures { mean_ttft_ms: 11.5, median_ttft_ms: 9.25, mean_itl_ms: 5.125, median_itl_ms: 4.25, p99_itl_ms: 9.0, mean_tpot_ms: 5.7 };
        let d = added_latency(&http, &base);
        assert_eq!((d.mean_ttft_ms, d.median_ttft_ms, d.mean_itl_ms, d.median_itl_ms), (1.5, 0.25, 0.125, -0.25));
        assert!((d.mean_tpot_ms - 0.5).abs() < 1e-12);
        let t = render(&[("in-process", base), ("HTTP/2", http)], 2);
        let row = t.lines().filter(|l| l.starts_with("HTTP/2")).nth(1).unwrap();
        assert!(row.contains("+1.500") && row.contains("+0.250") && row.contains("+0.125") && row.contains("-0.250"), "{t}");
    }

    #[test]
    fn p99_itl_is_read_from_the_metrics() {
        let rec = |itl: &[f64]| RequestRecord {
            index: 0, start_time: 0.0, queue_time: 0.0, ttft: 0.1, itl: itl.to_vec(), latency: 0.1 + itl.iter().sum::<f64>(),
            prompt_tokens: 1, prompt_tokens_from_server: true, output_tokens: itl.len() as u64 + 1, output_tokens_from_server: true,
            content_chunks: itl.len() as u64 + 1, requested_output_len: 3, failure: None,
        };
        // ITLs 1..=10 ms: numpy p99 = 9.91 ms; TPOT of each request = its mean gap.
        let m = metrics::compute(&[rec(&[0.001, 0.002, 0.003, 0.004, 0.005]), rec(&[0.006, 0.007, 0.008, 0.009, 0.010])], 1.0, &[99.0]);
        let f = PathFigures::from_metrics(&m);
        assert!((f.p99_itl_ms - 9.91).abs() < 1e-9, "{f:?}");
        assert!((f.mean_itl_ms - 5.5).abs() < 1e-9 && (f.mean_tpot_ms - 5.5).abs() < 1e-9, "{f:?}");
        assert!((f.mean_ttft_ms - 100.0).abs() < 1e-9);
    }

    /// A scripted engine: answers one request with the given token events.
    #[tokio::test]
    async fn in_process_request_times_token_events_and_reports_failures() {
        let (gw, mut eng) = flume_link();
        let coordinator = start_engine_clients(vec![gw], crate::engines::coordinator::tests_support::expect_default_fingerprint(1));
        let hello = Hello { protocol_version: PROTOCOL_VERSION, rank: 0, model: "m".into(), fingerprint: Default::default(), vocab_size: 1 << 17, max_model_len: 64, num_kv_blocks: 4, block_size: 16, node: "n".into() };
        eng.tx.send(FromEngine::Hello(hello)).unwrap();
        while !coordinator.all_healthy() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let engine = std::thread::spawn(move || {
            let mut served = 0;
            while served < 2 {
                let Ok(msg) = eng.rx.recv() else { return };
                let ToEngine::Command(EngineCommand::Add(req)) = msg else { continue };
                served += 1;
                let out = |toks: Vec<u32>, finish| TokenOutput { id: req.id, index: 0, new_tokens: toks, logprobs: None, finish, num_cached_tokens: 0, prompt_logprobs: None, timing: None };
                let outs = if served == 1 {
                    // An empty event (no tokens) must not count; one event carries two tokens.
                    vec![out(vec![], None), out(vec![5], None), out(vec![6, 7], None), out(vec![8], Some(FinishReason::Length))]
                } else {
                    vec![out(vec![1], Some(FinishReason::Error(ferry_transport::EngineError::internal("boom"))))]
                };
                for o in outs {
                    std::thread::sleep(Duration::from_millis(20));
                    let batch = EngineOutputs { rank: 0, outputs: vec![o], stats: Default::default(), kv_events: Vec::new() };
                    if eng.tx.send(FromEngine::Outputs(batch)).is_err() {
                        return;
                    }
                }
            }
        });
        let sampling = SamplingParams { max_tokens: 4, ..Default::default() };
        let t0 = Instant::now();
        let r = run_in_process_request(&coordinator, vec![1, 2, 3], sampling.clone(), 7, t0, 0.0).await;
        assert!(r.success(), "{:?}", r.failure);
        assert_eq!((r.index, r.prompt_tokens, r.output_tokens, r.content_chunks, r.requested_output_len), (7, 3, 4, 3, 4));
        assert_eq!(r.itl.len(), 2);
        // The first token came after two 20 ms sleeps, each gap after one.
        assert!(r.ttft >= 0.039, "{}", r.ttft);
        assert!(r.itl.iter().all(|g| *g >= 0.019), "{:?}", r.itl);
        assert!((r.latency - (r.ttft + r.itl.iter().sum::<f64>())).abs() < 1e-9);
        let bad = run_in_process_request(&coordinator, vec![1], sampling, 8, t0, 0.0).await;
        assert_eq!(bad.failure.map(|f| (f.kind, f.message)), Some((FailureKind::ServerError, "boom".to_string())));
        engine.join().unwrap();
    }
}
