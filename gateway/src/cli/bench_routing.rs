//! `ferry bench routing`: prefix-aware routing against least-loaded on a
//! shared-prefix workload, and the pause a stream sees when it moves.
//!
//! One process loads the model once. For each rank count (`--ranks 2,4`) and
//! each policy, fresh in-process ranks (empty caches) serve the same
//! workload: `--num-prefixes` distinct long system prompts, each followed by
//! `--requests-per-prefix` short distinct questions, in a seeded shuffled
//! order, token ids straight into the coordinator at `--max-concurrency`.
//! Reported per run: the prefix-cache hit rate (vLLM's: cached prompt tokens
//! over queried prompt tokens, summed over ranks), mean and P99 TTFT, output
//! tokens/s, and each rank's share of requests.
//!
//! Then the move: on two ranks, streams with a `--migration-context`-token
//! context (prompt plus the tokens already generated) are running when one
//! rank is drained with no grace; its streams move to the other rank and
//! resume. The pause each moved stream sees is the gap between its last
//! token before the drain and its first after; P50 and P99 over
//! `--migration-rounds` rounds.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferry_engine::quant::GgmlType;
use ferry_engine::{load_model, EngineArgs, LoadFormat, LoadedModel};
use ferry_transport::{FinishReason, SamplingParams};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};

use crate::bench::dataset::{random_dataset, RandomSpec};
use crate::cli::model_source;
use crate::cli::progress::ProgressBar;
use crate::engines::coordinator::{start_engine_clients_with, Coordinator, CoordinatorConfig};
use crate::engines::local::{expectations, start_local_ranks};
use crate::engines::rank_link::SeqEvent;
use crate::engines::routing::{RoutingConfig, RoutingPolicy};

#[derive(clap::Args, Debug, Clone, Serialize)]
pub(crate) struct BenchRoutingArgs {
    /// A GGUF file or a Hugging Face folder (default: SmolLM2-135M-Instruct).
    pub model: Option<String>,
    /// Rank counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub ranks: Vec<u32>,
    /// Distinct system prompts.
    #[arg(long, default_value_t = 8)]
    pub num_prefixes: usize,
    /// Requests per system prompt, each with its own question.
    #[arg(long, default_value_t = 8)]
    pub requests_per_prefix: usize,
    /// System prompt length in tokens (bench serve's random words).
    #[arg(long, default_value_t = 400)]
    pub prefix_len: usize,
    /// Question length in tokens.
    #[arg(long, default_value_t = 16)]
    pub question_len: usize,
    /// Tokens generated per request (greedy, ignore_eos).
    #[arg(long, default_value_t = 16)]
    pub output_len: usize,
    #[arg(long, default_value_t = 8)]
    pub max_concurrency: usize,
    /// KV cache bytes per rank (default: room for about twice its share of
    /// the system prompts, so caches are finite, as in production).
    #[arg(long)]
    pub kv_cache_memory_bytes: Option<usize>,
    /// CPU threads per rank.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rounds of the migration-pause measurement (0 skips it).
    #[arg(long, default_value_t = 4)]
    pub migration_rounds: usize,
    /// Context of a stream when it moves (prompt plus generated tokens).
    #[arg(long, default_value_t = 300)]
    pub migration_context: usize,
    /// Streams running on the two ranks when one is drained (about half move).
    #[arg(long, default_value_t = 2)]
    pub migration_streams: usize,
    /// Write the figures to this JSON file.
    #[arg(long)]
    pub save_result: Option<PathBuf>,
}

/// One request's life as the bench sees it.
#[derive(Debug, Default, Clone)]
struct Trace {
    rank: usize,
    submitted: Option<Instant>,
    token_times: Vec<Instant>,
    failed: Option<String>,
    /// The rank it moved to, if it moved.
    moved_to: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RoutingRun {
    pub ranks: u32,
    pub policy: String,
    pub requests: usize,
    pub failed: usize,
    pub hit_rate: f64,
    pub mean_ttft_ms: f64,
    pub p99_ttft_ms: f64,
    pub output_tokens_per_s: f64,
    /// Requests each rank took, over the mean.
    pub shares: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct MigrationPause {
    pub moved_streams: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    args: BenchRoutingArgs,
    runs: Vec<RoutingRun>,
    migration: Option<MigrationPause>,
}

/// A trace, locked: plain data, usable after a panic elsewhere.
fn locked(t: &Mutex<Trace>) -> std::sync::MutexGuard<'_, Trace> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Linear interpolation between closest ranks (numpy's default).
    let x = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (x - lo as f64)
}

/// Runs one request through the coordinator, recording into `trace`.
async fn run_request(coordinator: Coordinator, prompt: Vec<u32>, sampling: SamplingParams, trace: Arc<Mutex<Trace>>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    locked(&trace).submitted = Some(Instant::now());
    let guard = match coordinator.submit(prompt, sampling, tx, None, None) {
        Ok(g) => g,
        Err(e) => {
            locked(&trace).failed = Some(e.to_string());
            return;
        }
    };
    locked(&trace).rank = guard.rank_index();
    loop {
        let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(600), rx.recv()).await else {
            locked(&trace).failed = Some("no finish".into());
            return;
        };
        let mut t = locked(&trace);
        match ev {
            SeqEvent::Failed { message, .. } => {
                t.failed = Some(message);
                return;
            }
            SeqEvent::Moved { rank, .. } => t.moved_to = Some(rank),
            SeqEvent::Output(o) => {
                let now = Instant::now();
                t.token_times.extend(o.new_tokens.iter().map(|_| now));
                match o.finish {
                    Some(FinishReason::Error(e)) => {
                        t.failed = Some(e.message);
                        return;
                    }
                    Some(_) => return,
                    None => {}
                }
            }
        }
    }
}

struct Ranks {
    coordinator: Coordinator,
    threads: Vec<ferry_engine::EngineThreads>,
}

async fn start_ranks(model: &LoadedModel, eargs: &EngineArgs, ranks: u32, config: CoordinatorConfig, name: &str) -> Result<Ranks> {
    let local = start_local_ranks(model, eargs, 0..ranks, name)?;
    let ends = local.ends.into_iter().map(|(_, e)| e).collect();
    let coordinator = start_engine_clients_with(ends, expectations(&model.cfg, Some(&model.weights), ranks, false), config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !coordinator.all_healthy() {
        if Instant::now() > deadline {
            bail!("in-process ranks did not join within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Ranks { coordinator, threads: local.threads })
}

fn stop_ranks(r: Ranks) {
    r.coordinator.shutdown();
    drop(r.coordinator);
    for t in r.threads {
        t.join();
    }
}

async fn routing_run(args: &BenchRoutingArgs, model: &LoadedModel, eargs: &EngineArgs, workload: &[Vec<u32>], ranks: u32, policy: RoutingPolicy) -> Result<RoutingRun> {
    let config = CoordinatorConfig { routing: RoutingConfig { policy, ..Default::default() }, ..Default::default() };
    let r = start_ranks(model, eargs, ranks, config, "bench").await?;
    let sampling = SamplingParams { temperature: 0.0, ignore_eos: true, max_tokens: args.output_len as u32, ..Default::default() };
    let sem = Arc::new(Semaphore::new(args.max_concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut traces = Vec::new();
    for prompt in workload.iter().cloned() {
        let trace = Arc::new(Mutex::new(Trace::default()));
        traces.push(trace.clone());
        let (sem, c, sampling) = (sem.clone(), r.coordinator.clone(), sampling.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok();
            run_request(c, prompt, sampling, trace).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = start.elapsed().as_secs_f64();
    // The last batch's figures have arrived with the last token.
    let (mut hits, mut queries) = (0u64, 0u64);
    for s in r.coordinator.scrape().into_iter().flatten() {
        hits += s.stats.prefix_cache_hits;
        queries += s.stats.prefix_cache_queries;
    }
    stop_ranks(r);
    let traces: Vec<Trace> = traces.iter().map(|t| locked(t).clone()).collect();
    let ok: Vec<&Trace> = traces.iter().filter(|t| t.failed.is_none() && !t.token_times.is_empty()).collect();
    let mut ttfts: Vec<f64> = ok.iter().filter_map(|t| Some((t.token_times[0] - t.submitted?).as_secs_f64() * 1e3)).collect();
    ttfts.sort_by(f64::total_cmp);
    let tokens: usize = ok.iter().map(|t| t.token_times.len()).sum();
    let mut counts = vec![0usize; ranks as usize];
    for t in &ok {
        counts[t.rank] += 1;
    }
    let mean_share = ok.len() as f64 / ranks as f64;
    Ok(RoutingRun {
        ranks,
        policy: format!("{policy:?}"),
        requests: traces.len(),
        failed: traces.len() - ok.len(),
        hit_rate: if queries == 0 { 0.0 } else { hits as f64 / queries as f64 },
        mean_ttft_ms: ttfts.iter().sum::<f64>() / ttfts.len().max(1) as f64,
        p99_ttft_ms: percentile(&ttfts, 99.0),
        output_tokens_per_s: tokens as f64 / wall,
        shares: counts.iter().map(|&c| c as f64 / mean_share.max(1e-9)).collect(),
    })
}

/// One round: streams on two ranks; once each has a `context`-token context,
/// rank 0 is drained with no grace; returns the pause of each moved stream.
async fn migration_round(args: &BenchRoutingArgs, model: &LoadedModel, eargs: &EngineArgs, round: usize) -> Result<Vec<f64>> {
    let config = CoordinatorConfig { drain_timeout: Duration::ZERO, ..Default::default() };
    let r = start_ranks(model, eargs, 2, config, "bench").await?;
    let streams = args.migration_streams.max(1);
    let generated_before_move = 32.min(args.migration_context / 2);
    let prompt_len = args.migration_context - generated_before_move;
    let samples = random_dataset(&RandomSpec { num_requests: streams, input_len: prompt_len, output_len: 1, range_ratio: 0.0, prefix_len: 0, seed: args.seed + 1000 + round as u64 })?;
    let sampling = SamplingParams { temperature: 0.0, ignore_eos: true, max_tokens: (generated_before_move * 3) as u32, ..Default::default() };
    let mut traces = Vec::new();
    let mut tasks = Vec::new();
    for s in &samples {
        let mut prompt = model.tokenizer.encode(&s.prompt, true).map_err(|e| anyhow::anyhow!("cannot tokenize: {e}"))?;
        prompt.truncate(prompt_len);
        let trace = Arc::new(Mutex::new(Trace::default()));
        traces.push(trace.clone());
        tasks.push(tokio::spawn(run_request(r.coordinator.clone(), prompt, sampling.clone(), trace)));
    }
    let ready = || traces.iter().all(|t| locked(t).token_times.len() >= generated_before_move);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ready() {
        if Instant::now() > deadline {
            bail!("streams did not reach their context in 300 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drained_at = Instant::now();
    r.coordinator.drain_rank(0)?;
    for t in tasks {
        let _ = t.await;
    }
    stop_ranks(r);
    let mut pauses = Vec::new();
    for t in &traces {
        let t = locked(t);
        if t.moved_to.is_none() || t.failed.is_some() {
            continue;
        }
        let before = t.token_times.iter().rev().find(|&&x| x <= drained_at);
        let after = t.token_times.iter().find(|&&x| x > drained_at);
        if let (Some(b), Some(a)) = (before, after) {
            pauses.push((*a - *b).as_secs_f64() * 1e3);
        }
    }
    Ok(pauses)
}

pub(crate) fn run(args: BenchRoutingArgs) -> Result<()> {
    if args.num_prefixes == 0 || args.requests_per_prefix == 0 || args.ranks.contains(&0) {
        bail!("--num-prefixes, --requests-per-prefix and every --ranks entry must be at least 1");
    }
    let (path, name) = model_source::resolve(args.model.as_deref())?;
    let model = load_model(&path, LoadFormat::Auto, GgmlType::F32, &ProgressBar::new(&name))?;
    // The prompts: each system prompt with its own questions, shuffled.
    let mut workload = Vec::new();
    for p in 0..args.num_prefixes {
        let samples = random_dataset(&RandomSpec {
            num_requests: args.requests_per_prefix,
            input_len: args.question_len,
            output_len: args.output_len,
            range_ratio: 0.0,
            prefix_len: args.prefix_len,
            seed: args.seed.wrapping_add(p as u64),
        })?;
        for s in samples {
            workload.push(model.tokenizer.encode(&s.prompt, true).map_err(|e| anyhow::anyhow!("cannot tokenize: {e}"))?);
        }
    }
    let mut rng = ferry_engine::rng::splitmix(args.seed);
    for i in (1..workload.len()).rev() {
        let j = (ferry_engine::rng::RngCore::next_u64(&mut rng) % (i as u64 + 1)) as usize;
        workload.swap(i, j);
    }
    let prompt_tokens = workload.iter().map(Vec::len).max().unwrap_or(0);
    let kv_per_token = model.cfg.num_layers * 2 * model.cfg.num_kv_heads * model.cfg.head_dim * 2;
    let max_ranks = *args.ranks.iter().max().unwrap_or(&1) as usize;
    // Room for about twice a rank's share of the system prompts, plus the running requests.
    let share = args.num_prefixes.div_ceil(max_ranks) * 2;
    let default_kv = (share * args.prefix_len + args.max_concurrency * (prompt_tokens + args.output_len)) * kv_per_token;
    let eargs = EngineArgs {
        kv_cache_memory_bytes: Some(args.kv_cache_memory_bytes.unwrap_or(default_kv)),
        max_num_seqs: args.max_concurrency.max(8),
        threads: args.threads.max(1),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = rt.block_on(async {
        let mut runs = Vec::new();
        for &ranks in &args.ranks {
            for policy in [RoutingPolicy::LeastLoaded, RoutingPolicy::PrefixAware] {
                let run = routing_run(&args, &model, &eargs, &workload, ranks, policy).await?;
                eprintln!(
                    "{} ranks {:>12}: hit rate {:.3}, TTFT mean {:.1} ms P99 {:.1} ms, {:.1} output tok/s, shares {:?}, failed {}",
                    run.ranks,
                    run.policy,
                    run.hit_rate,
                    run.mean_ttft_ms,
                    run.p99_ttft_ms,
                    run.output_tokens_per_s,
                    run.shares.iter().map(|s| (s * 100.0).round() / 100.0).collect::<Vec<_>>(),
                    run.failed
                );
                runs.push(run);
            }
        }
        let mut pauses = Vec::new();
        for round in 0..args.migration_rounds {
            pauses.extend(migration_round(&args, &model, &eargs, round).await?);
        }
        pauses.sort_by(f64::total_cmp);
        let migration = (!pauses.is_empty()).then(|| MigrationPause {
            moved_streams: pauses.len(),
            p50_ms: percentile(&pauses, 50.0),
            p99_ms: percentile(&pauses, 99.0),
            max_ms: *pauses.last().unwrap_or(&0.0),
        });
        if let Some(m) = &migration {
            eprintln!(
                "migration pause at a {}-token context, {} streams on 2 ranks: P50 {:.1} ms, P99 {:.1} ms, max {:.1} ms over {} moved streams",
                args.migration_context, args.migration_streams, m.p50_ms, m.p99_ms, m.max_ms, m.moved_streams
            );
        }
        anyhow::Ok(Report { args: args.clone(), runs, migration })
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(p) = &args.save_result {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
