//! The figures of a run, as vLLM's `calculate_metrics` defines them.
//!
//! Only successful requests enter the latency and token figures; failures are
//! counted (and listed by the report). Statistics use numpy's conventions:
//! population standard deviation and linear-interpolation percentiles, and an
//! empty list yields 0 (vLLM evaluates `np.mean(xs or 0)`).

use serde::{Deserialize, Serialize};

use super::record::RequestRecord;

/// Summary of one metric, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub(crate) struct Stats {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    /// (percentile, value) pairs in the order requested.
    pub percentiles: Vec<(f64, f64)>,
    pub count: usize,
}

/// numpy.percentile with the default "linear" method on sorted data.
pub(crate) fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Mean, median, population std and percentiles of `seconds`, reported in ms.
pub(crate) fn summarize(seconds: &[f64], percentiles: &[f64]) -> Stats {
    if seconds.is_empty() {
        return Stats { percentiles: percentiles.iter().map(|&p| (p, 0.0)).collect(), ..Stats::default() };
    }
    let mut v: Vec<f64> = seconds.iter().map(|s| s * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    Stats {
        mean,
        median: percentile_sorted(&v, 50.0),
        std: var.sqrt(),
        percentiles: percentiles.iter().map(|&p| (p, percentile_sorted(&v, p))).collect(),
        count: v.len(),
    }
}

/// All figures of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BenchMetrics {
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    /// How many successful requests had their prompt / output counts from the server's usage.
    pub input_tokens_from_server: usize,
    pub output_tokens_from_server: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Most content chunks received within one wall-clock second.
    pub max_output_tokens_per_s: f64,
    /// Most successful requests open at one instant.
    pub max_concurrent_requests: usize,
    pub ttft_ms: Stats,
    pub tpot_ms: Stats,
    pub itl_ms: Stats,
    pub e2el_ms: Stats,
}

/// TPOT of one request: (e2e − ttft) / (output_tokens − 1); None below 2 tokens.
pub(crate) fn tpot(r: &RequestRecord) -> Option<f64> {
    (r.output_tokens > 1).then(|| (r.latency - r.ttft) / (r.output_tokens - 1) as f64)
}

pub(crate) fn compute(records: &[RequestRecord], duration_s: f64, percentiles: &[f64]) -> BenchMetrics {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success()).collect();
    let total_input: u64 = ok.iter().map(|r| r.prompt_tokens).sum();
    let total_output: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft).collect();
    let tpots: Vec<f64> = ok.iter().filter_map(|r| tpot(r)).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
    let e2els: Vec<f64> = ok.iter().map(|r| r.latency).collect();
    let dur = if duration_s > 0.0 { duration_s } else { f64::MIN_POSITIVE };
    BenchMetrics {
        completed: ok.len(),
        failed: records.len() - ok.len(),
        duration_s,
        total_input_tokens: total_input,
        total_output_tokens: total_output,
        input_tokens_from_server: ok.iter().filter(|r| r.prompt_tokens_from_server).count(),
        output_tokens_from_server: ok.iter().filter(|r| r.output_tokens_from_server).count(),
        request_throughput: ok.len() as f64 / dur,
        output_throughput: total_output as f64 / dur,
        total_token_throughput: (total_input + total_output) as f64 / dur,
        max_output_tokens_per_s: peak_chunks_per_second(&ok),
        max_concurrent_requests: peak_concurrency(&ok),
        ttft_ms: summarize(&ttfts, percentiles),
        tpot_ms: summarize(&tpots, percentiles),
        itl_ms: summarize(&itls, percentiles),
        e2el_ms: summarize(&e2els, percentiles),
    }
}

/// Content chunks bucketed per whole second from the first request's start.
fn peak_chunks_per_second(ok: &[&RequestRecord]) -> f64 {
    let Some(min_start) = ok.iter().map(|r| r.start_time).min_by(f64::total_cmp) else {
        return 0.0;
    };
    let max_end = ok.iter().map(|r| r.start_time + r.latency).fold(min_start, f64::max);
    let buckets = (max_end - min_start).ceil() as usize + 1;
    let mut counts = vec![0u64; buckets];
    for r in ok {
        let mut t = r.start_time + r.ttft;
        let times = std::iter::once(t).chain(r.itl.iter().map(|g| {
            t += g;
            t
        }));
        for tt in times {
            let b = (tt - min_start).max(0.0) as usize;
            if b < buckets {
                counts[b] += 1;
            }
        }
    }
    counts.into_iter().max().unwrap_or(0) as f64
}

/// Sweep over half-open [start, end) intervals; a departure at the same instant goes first.
fn peak_concurrency(ok: &[&RequestRecord]) -> usize {
    let mut events: Vec<(f64, i32)> = Vec::with_capacity(ok.len() * 2);
    for r in ok {
        events.push((r.start_time, 1));
        events.push((r.start_time + r.latency, -1));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut peak) = (0i64, 0i64);
    for (_, d) in events {
        cur += d as i64;
        peak = peak.max(cur);
    }
    peak as usize
}

#[cfg(test)]
mod tests {
    use super::super::record::{Failure, FailureKind};
    use super::*;

    fn rec(start: f64, ttft: f64, itl: &[f64], out: u64) -> RequestRecord {
        let latency = ttft + itl.iter().sum::<f64>();
        RequestRecord {
            index: 0,
            start_time: start,
            queue_time: 0.0,
            ttft,
            itl: itl.to_vec(),
            latency,
            prompt_tokens: 10,
            prompt_tokens_from_server: true,
            output_tokens: out,
            output_tokens_from_server: true,
            content_chunks: itl.len() as u64 + 1,
            requested_output_len: out,
            failure: None,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * (1.0 + b.abs())
    }

    #[test]
    fn percentiles_match_numpy_linear_by_hand() {
        // Values 1..=10 (already in ms after scaling from s).
        let xs: Vec<f64> = (1..=10).map(|i| i as f64 / 1000.0).collect();
        let s = summarize(&xs, &[50.0, 90.0, 99.0, 0.0, 100.0, 25.0]);
        // numpy: rank = p/100 * 9. p99 -> 8.91 -> 9 + 0.91*(10-9) = 9.91
        // p90 -> 8.1 -> 9 + 0.1 = 9.1; p25 -> 2.25 -> 3 + 0.25 = 3.25; median 5.5.
        let want = [(50.0, 5.5), (90.0, 9.1), (99.0, 9.91), (0.0, 1.0), (100.0, 10.0), (25.0, 3.25)];
        for ((p, v), (wp, wv)) in s.percentiles.iter().zip(want) {
            assert_eq!(*p, wp);
            assert!(close(*v, wv), "p{p}: {v} vs {wv}");
        }
        assert!(close(s.median, 5.5));
        assert!(close(s.mean, 5.5));
        // Population std of 1..10: sqrt(99/12) = 2.8722813232690143.
        assert!(close(s.std, 2.8722813232690143));
        // Unsorted input with a repeated value, odd count: numpy gives p99 of [1,3,3,7,20] = 19.48.
        let ys = [0.020, 0.003, 0.001, 0.007, 0.003];
        let s = summarize(&ys, &[99.0]);
        assert!(close(s.percentiles[0].1, 7.0 + 0.96 * 13.0), "{:?}", s.percentiles);
        assert!(close(s.median, 3.0));
        // Empty input: vLLM's np.mean(0) etc. give zeros.
        let e = summarize(&[], &[99.0]);
        assert_eq!((e.mean, e.median, e.std, e.percentiles.clone()), (0.0, 0.0, 0.0, vec![(99.0, 0.0)]));
    }

    #[test]
    fn tpot_itl_e2el_follow_vllm_definitions() {
        // Request A: sent at 0, first chunk at 0.5, then chunks 0.1, 0.2, 0.3 apart; 4 tokens.
        let a = rec(0.0, 0.5, &[0.1, 0.2, 0.3], 4);
        // Request B: one output token only: excluded from TPOT, kept in TTFT and E2EL.
        let b = rec(0.25, 0.2, &[], 1);
        // Request C: 2 chunks but server says 6 tokens (chunks bundle tokens).
        let c = rec(1.0, 0.3, &[0.5], 6);
        let mut failed = rec(0.0, 0.0, &[], 0);
        failed.failure = Some(Failure::new(FailureKind::Timeout, "x"));
        let m = compute(&[a, b, c, failed], 2.0, &[50.0]);
        assert_eq!(m.completed, 3);
        assert_eq!(m.failed, 1);
        // TPOT A = (1.1 - 0.5) / 3 = 0.2 s; C = (0.8 - 0.3) / 5 = 0.1 s.
        assert!(close(m.tpot_ms.mean, 150.0), "{}", m.tpot_ms.mean);
        assert_eq!(m.tpot_ms.count, 2);
        // ITLs: 100, 200, 300, 500 ms.
        assert_eq!(m.itl_ms.count, 4);
        assert!(close(m.itl_ms.mean, 275.0));
        assert!(close(m.itl_ms.median, 250.0));
        // TTFT 500, 200, 300 ms; E2EL 1100, 200, 800 ms.
        assert!(close(m.ttft_ms.mean, 1000.0 / 3.0));
        assert!(close(m.e2el_ms.median, 800.0));
        // Tokens: input 3*10; output 4+1+6 = 11; throughputs over 2 s.
        assert_eq!(m.total_input_tokens, 30);
        assert_eq!(m.total_output_tokens, 11);
        assert!(close(m.request_throughput, 1.5));
        assert!(close(m.output_throughput, 5.5));
        assert!(close(m.total_token_throughput, 20.5));
        // A spans [0, 1.1), B [0.25, 0.45), C [1.0, 1.8): peak 2.
        assert_eq!(m.max_concurrent_requests, 2);
        // Chunk times: A 0.5,0.6,0.8,1.1; B 0.45; C 1.3,1.8 -> second 0 has 4, second 1 has 3.
        assert_eq!(m.max_output_tokens_per_s, 4.0);
    }

    #[test]
    fn touching_intervals_do_not_overlap() {
        let a = rec(0.0, 0.5, &[0.5], 2); // [0, 1)
        let b = rec(1.0, 0.5, &[0.5], 2); // [1, 2)
        let m = compute(&[a, b], 2.0, &[]);
        assert_eq!(m.max_concurrent_requests, 1);
    }
}
