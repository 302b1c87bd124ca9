//! The load loop: send each request at its arrival time, respect
//! --max-concurrency, stop at --max-duration, collect one record per request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;

use super::client::Client;
use super::dataset::SampleRequest;
use super::record::{Failure, FailureKind, RequestRecord};
use super::request::{run_request, RequestSettings};

pub(crate) struct LoadPlan {
    pub samples: Vec<SampleRequest>,
    /// Send offsets in seconds from the run's start, one per sample.
    pub arrivals: Vec<f64>,
    pub max_concurrency: Option<usize>,
    pub max_duration: Duration,
    pub show_progress: bool,
}

pub(crate) struct LoadResult {
    /// One record per sample, in sample order.
    pub records: Vec<RequestRecord>,
    /// From the first send to the last response (or the --max-duration cut).
    pub duration_s: f64,
}

fn progress_bar(n: usize, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(n as u64);
    if let Ok(style) = ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}") {
        pb.set_style(style);
    }
    pb
}

/// Runs the measured load. Never fails: every request ends as a record.
pub(crate) async fn run_load(client: Arc<Client>, settings: Arc<RequestSettings>, plan: LoadPlan) -> LoadResult {
    let n = plan.samples.len();
    let samples = Arc::new(plan.samples);
    let sem = plan.max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let pb = progress_bar(n, plan.show_progress);
    let run_start = Instant::now();
    let deadline = run_start + plan.max_duration;
    let mut tasks = Vec::with_capacity(n);
    let mut unsent = Vec::new();
    for i in 0..n {
        let target = run_start + Duration::from_secs_f64(plan.arrivals.get(i).copied().unwrap_or(0.0).max(0.0));
        if target > Instant::now() {
            tokio::time::sleep_until(target.min(deadline).into()).await;
        }
        if Instant::now() >= deadline {
            // The run's time is up: the rest are never sent, and say so.
            for j in i..n {
                let s = &samples[j];
                unsent.push(RequestRecord::failed(
                    j,
                    run_start.elapsed().as_secs_f64(),
                    0.0,
                    s.prompt_len_estimate as u64,
                    s.output_len as u64,
                    Failure::new(FailureKind::Cancelled, "not sent: --max-duration reached"),
                ));
                pb.inc(1);
            }
            break;
        }
        let (client, settings, samples, sem, pb) = (client.clone(), settings.clone(), samples.clone(), sem.clone(), pb.clone());
        tasks.push(tokio::spawn(async move {
            let arrived = Instant::now();
            let sample = &samples[i];
            let _permit = match &sem {
                None => None,
                Some(sem) => tokio::select! {
                    p = sem.clone().acquire_owned() => p.ok(),
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        pb.inc(1);
                        return RequestRecord::failed(
                            i,
                            run_start.elapsed().as_secs_f64(),
                            arrived.elapsed().as_secs_f64(),
                            sample.prompt_len_estimate as u64,
                            sample.output_len as u64,
                            Failure::new(FailureKind::Cancelled, "not sent: --max-duration reached while waiting for a --max-concurrency slot"),
                        );
                    }
                },
            };
            let queue = arrived.elapsed().as_secs_f64();
            let rec = run_request(&client, &settings, sample, i, run_start, queue, deadline).await;
            pb.inc(1);
            rec
        }));
    }
    let mut records = unsent;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(r) => records.push(r),
            Err(e) => {
                let s = &samples[i];
                records.push(RequestRecord::failed(
                    i,
                    0.0,
                    0.0,
                    s.prompt_len_estimate as u64,
                    s.output_len as u64,
                    Failure::new(FailureKind::Transport, format!("request task failed: {e}")),
                ));
            }
        }
    }
    let duration_s = run_start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    records.sort_by_key(|r| r.index);
    LoadResult { records, duration_s }
}

/// Sends `count` copies of the first prompt before the measured run (as vLLM's
/// warmup), at most `max_concurrency` at once; returns the failures.
pub(crate) async fn warmup(client: Arc<Client>, settings: Arc<RequestSettings>, first: &SampleRequest, count: usize, max_concurrency: Option<usize>, max_duration: Duration) -> Vec<RequestRecord> {
    if count == 0 {
        return Vec::new();
    }
    let plan = LoadPlan {
        samples: vec![first.clone(); count],
        arrivals: vec![0.0; count],
        max_concurrency,
        max_duration,
        show_progress: false,
    };
    run_load(client, settings, plan).await.records.into_iter().filter(|r| !r.success()).collect()
}
