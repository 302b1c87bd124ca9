//! Prometheus metrics under vLLM's names, types, labels and bucket bounds,
//! recorded with the `metrics` crate and exposed by `metrics-exporter-prometheus`.
//!
//! Each `Metrics` owns its recorder (not the process-global one), so several
//! servers in one process, as in the tests, never mix their series. Handles
//! for every series are made once per engine rank, so recording is a lock-free
//! atomic update. The gateway counts tokens and times requests itself; queue
//! figures, KV usage, preemptions and prefix-cache totals come from each
//! rank's latest `EngineStats` at scrape time, as do the token counts of its
//! steps (`vllm:iteration_tokens_total`, counted as vLLM's `IterationStats`:
//! tokens made plus each whole prompt at its first token), and the engine reports each
//! finished sequence's queue / prefill / decode times. Every series carries
//! `model_name` and `engine` (the rank index) labels, as vLLM's do; counter
//! names end in `_total`, as Python's prometheus_client writes them.

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::engines::coordinator::{CoordinatorCounters, RankScrape};
use crate::engines::routing::RouteReason;
use ferry_transport::SeqTiming;

pub(crate) const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub(crate) const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's `request_latency_buckets`: e2e, queue, inference, prefill, decode.
pub(crate) const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
];
pub(crate) const ITERATION_TOKEN_BUCKETS: &[f64] = &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
pub(crate) const PARAMS_N_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];

/// The finish reasons vLLM labels `request_success` with, all exported from the start.
pub(crate) const FINISH_REASONS: [&str; 3] = ["stop", "length", "abort"];

/// vLLM's `build_1_2_5_buckets(max_model_len)`: 1, 2, 5, 10, 20, 50, ... up to the limit.
pub(crate) fn buckets_1_2_5(max: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1u64;
    loop {
        for m in [1u64, 2, 5] {
            match m.checked_mul(scale) {
                Some(v) if v <= max => out.push(v as f64),
                _ => return out,
            }
        }
        scale = match scale.checked_mul(10) {
            Some(s) => s,
            None => return out,
        };
    }
}

const TOKEN_HISTOGRAMS: [&str; 3] = ["vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_max_num_generation_tokens"];
const LATENCY_HISTOGRAMS: [&str; 5] = [
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
];
const TPOT_HISTOGRAMS: [&str; 3] =
    ["vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds", "vllm:request_time_per_output_token_seconds"];

/// (name, kind, help) of every family, registered up front so an idle server
/// already lists them all (as vLLM does).
const FAMILIES: &[(&str, Kind, &str)] = &[
    ("ferry:engine_up", Kind::Gauge, "1 while the engine rank is connected and serving, else 0."),
    ("ferry:rank_breaker_state", Kind::Gauge, "The rank's circuit breaker: 0 closed (in rotation), 1 open (out for a cool-down), 2 half-open (on trial)."),
    ("ferry:prefix_cache_hit_rate", Kind::Gauge, "Prefix cache hits over queries since the rank started, in tokens (0 before any query)."),
    ("ferry:rank_cached_blocks", Kind::Gauge, "Full KV blocks the rank reports holding in its prefix cache (what prefix-aware routing reads)."),
    ("ferry:migrations_total", Kind::Counter, "Moves of in-flight requests that had delivered tokens to another rank (resumed token for token)."),
    ("ferry:request_retries_total", Kind::Counter, "Moves of requests that had delivered nothing yet to another rank."),
    ("ferry:migration_failures_total", Kind::Counter, "Requests that needed a move and ended with an error (out of --migration-limit, or no rank to take them)."),
    ("ferry:trace_spans_dropped_total", Kind::Counter, "Trace spans dropped because the export queue was full (--otlp-traces-endpoint)."),
    ("ferry:breaker_trips_total", Kind::Counter, "Times a rank's circuit breaker took it out of rotation."),
    ("ferry:routing_decisions_total", Kind::Counter, "Placements of requests on ranks, by why that rank was chosen."),
    ("vllm:num_requests_running", Kind::Gauge, "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", Kind::Gauge, "Number of requests waiting to be processed."),
    ("vllm:num_requests_waiting_by_reason", Kind::Gauge, "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting."),
    ("vllm:kv_cache_usage_perc", Kind::Gauge, "KV-cache usage. 1 means 100 percent usage."),
    ("vllm:cache_config_info", Kind::Gauge, "Information of the LLMEngine CacheConfig"),
    ("vllm:engine_sleep_state", Kind::Gauge, "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2."),
    ("vllm:num_preemptions_total", Kind::Counter, "Cumulative number of preemption from the engine."),
    ("vllm:prefix_cache_queries_total", Kind::Counter, "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits_total", Kind::Counter, "Prefix cache hits, in terms of number of cached tokens."),
    ("vllm:spec_decode_num_drafts_total", Kind::Counter, "Number of spec decoding drafts."),
    ("vllm:spec_decode_num_draft_tokens_total", Kind::Counter, "Number of draft tokens."),
    ("vllm:spec_decode_num_accepted_tokens_total", Kind::Counter, "Number of accepted tokens."),
    ("vllm:spec_decode_num_accepted_tokens_per_pos_total", Kind::Counter, "Accepted draft tokens per draft position."),
    ("vllm:prompt_tokens_total", Kind::Counter, "Number of prefill tokens processed."),
    ("vllm:generation_tokens_total", Kind::Counter, "Number of generation tokens processed."),
    ("vllm:request_success_total", Kind::Counter, "Count of successfully processed requests."),
    ("vllm:iteration_tokens_total", Kind::Histogram, "Histogram of number of tokens per engine_step."),
    ("vllm:request_prompt_tokens", Kind::Histogram, "Number of prefill tokens processed."),
    ("vllm:request_generation_tokens", Kind::Histogram, "Number of generation tokens processed."),
    ("vllm:request_max_num_generation_tokens", Kind::Histogram, "Histogram of maximum number of requested generation tokens."),
    ("vllm:request_params_n", Kind::Histogram, "Histogram of the n request parameter."),
    ("vllm:request_params_max_tokens", Kind::Histogram, "Histogram of the max_tokens request parameter."),
    ("vllm:time_to_first_token_seconds", Kind::Histogram, "Histogram of time to first token in seconds."),
    ("vllm:inter_token_latency_seconds", Kind::Histogram, "Histogram of inter-token latency in seconds."),
    ("vllm:time_per_output_token_seconds", Kind::Histogram, "Histogram of time per output token in seconds.DEPRECATED: Use vllm:inter_token_latency_seconds instead."),
    ("vllm:request_time_per_output_token_seconds", Kind::Histogram, "Histogram of time_per_output_token_seconds per request."),
    ("vllm:e2e_request_latency_seconds", Kind::Histogram, "Histogram of e2e request latency in seconds."),
    ("vllm:request_queue_time_seconds", Kind::Histogram, "Histogram of time spent in WAITING phase for request."),
    ("vllm:request_inference_time_seconds", Kind::Histogram, "Histogram of time spent in RUNNING phase for request."),
    ("vllm:request_prefill_time_seconds", Kind::Histogram, "Histogram of time spent in PREFILL phase for request."),
    ("vllm:request_decode_time_seconds", Kind::Histogram, "Histogram of time spent in DECODE phase for request."),
];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Gauge,
    Counter,
    Histogram,
}

/// vLLM's `sleep_state` labels of `vllm:engine_sleep_state`, each with the
/// value ferry's ranks always have: ferry has no sleep mode (vLLM's
/// `/sleep`), so a rank is awake and has neither offloaded its weights
/// (level 1) nor discarded them (level 2). Served so that dashboards written
/// for vLLM find the family.
const SLEEP_STATES: [(&str, f64); 3] = [("awake", 1.0), ("weights_offloaded", 0.0), ("discard_all", 0.0)];

/// One rank's series.
struct EngineSeries {
    labels: Vec<Label>,
    up: Gauge,
    breaker: Gauge,
    hit_rate: Gauge,
    cached_blocks: Gauge,
    running: Gauge,
    waiting: Gauge,
    /// vLLM's `vllm:num_requests_waiting_by_reason`, `reason="capacity"`:
    /// every sequence the engine reports waiting. Ferry's scheduler holds a
    /// sequence back only for room (KV blocks, sequence slots, the step's
    /// token budget; preempted ones included): it has no LoRA budget, no KV
    /// transfer and no blocked states, which are what vLLM calls deferred.
    waiting_capacity: Gauge,
    /// `reason="deferred"`: always 0, for the reasons above, served so that
    /// the family has vLLM's two series and still sums to
    /// `vllm:num_requests_waiting`.
    waiting_deferred: Gauge,
    kv_usage: Gauge,
    preemptions: Counter,
    prefix_queries: Counter,
    prefix_hits: Counter,
    spec_drafts: Counter,
    spec_draft_tokens: Counter,
    spec_accepted: Counter,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    success: [Counter; FINISH_REASONS.len()],
    iteration_tokens: Histogram,
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
    request_max_generation_tokens: Histogram,
    params_n: Histogram,
    params_max_tokens: Histogram,
    ttft: Histogram,
    itl: Histogram,
    tpot: Histogram,
    request_tpot: Histogram,
    e2e: Histogram,
    queue: Histogram,
    inference: Histogram,
    prefill: Histogram,
    decode: Histogram,
}

/// What the gateway knows of one finished sequence (vLLM counts each of a
/// request's `n` completions as a finished request).
#[derive(Clone, Debug, Default)]
pub(crate) struct FinishedSeq {
    pub reason: &'static str,
    pub e2e_secs: f64,
    pub prompt_tokens: u32,
    pub generation_tokens: u32,
    pub n: u32,
    pub max_tokens: u32,
    /// The engine's account of the phases, when it sent one.
    pub timing: Option<SeqTiming>,
}

/// The gateway's metrics: one recorder, one set of series per engine rank.
/// Updates for a rank index outside the range are ignored.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    model_name: String,
    /// Rank k's series, made when first needed: a static cluster's all at
    /// the start (listed from the start), an elastic one's as ranks join.
    engines: Vec<std::sync::OnceLock<EngineSeries>>,
    /// Ranks join and leave (`--data-parallel-elastic`): a rank that is
    /// not a member is left out of the exposition.
    elastic: bool,
    cluster: ClusterSeries,
}

/// The coordinator's series (one set per API node).
struct ClusterSeries {
    migrations: Counter,
    retries: Counter,
    migration_failures: Counter,
    breaker_trips: Counter,
    routed: [Counter; RouteReason::ALL.len()],
    spans_dropped: Counter,
}

impl ClusterSeries {
    fn new(rec: &PrometheusRecorder, model_name: &str) -> Self {
        let md = metadata();
        let labels = vec![Label::new("model_name", model_name.to_string())];
        let counter = |name: &'static str, extra: Option<(&'static str, &'static str)>| {
            let mut l = labels.clone();
            l.extend(extra.map(|(k, v)| Label::new(k, v)));
            let c = rec.register_counter(&Key::from_parts(name, l), &md);
            c.increment(0);
            c
        };
        ClusterSeries {
            migrations: counter("ferry:migrations_total", None),
            retries: counter("ferry:request_retries_total", None),
            migration_failures: counter("ferry:migration_failures_total", None),
            breaker_trips: counter("ferry:breaker_trips_total", None),
            spans_dropped: counter("ferry:trace_spans_dropped_total", None),
            routed: RouteReason::ALL.map(|r| counter("ferry:routing_decisions_total", Some(("reason", r.label())))),
        }
    }

    fn set(&self, c: &CoordinatorCounters) {
        self.migrations.absolute(c.migrations);
        self.retries.absolute(c.retries);
        self.migration_failures.absolute(c.moves_failed);
        self.breaker_trips.absolute(c.breaker_trips);
        self.spans_dropped.absolute(c.trace_spans_dropped);
        for (counter, &v) in self.routed.iter().zip(&c.routed) {
            counter.absolute(v);
        }
    }
}

impl Metrics {
    /// `max_model_len` bounds the token-count histograms' buckets, as in vLLM.
    pub(crate) fn new(model_name: impl Into<String>, num_engines: usize, max_model_len: u32) -> Self {
        let tokens = buckets_1_2_5(max_model_len.max(1) as u64);
        let mut b = PrometheusBuilder::new();
        let set = |b: PrometheusBuilder, name: &str, bounds: &[f64]| {
            b.set_buckets_for_metric(Matcher::Full(name.to_string()), bounds).expect("bucket lists are non-empty")
        };
        b = set(b, "vllm:time_to_first_token_seconds", TTFT_BUCKETS);
        for n in TPOT_HISTOGRAMS {
            b = set(b, n, ITL_BUCKETS);
        }
        for n in LATENCY_HISTOGRAMS {
            b = set(b, n, E2E_BUCKETS);
        }
        for n in TOKEN_HISTOGRAMS.into_iter().chain(["vllm:request_params_max_tokens"]) {
            b = set(b, n, &tokens);
        }
        b = set(b, "vllm:iteration_tokens_total", ITERATION_TOKEN_BUCKETS);
        b = set(b, "vllm:request_params_n", PARAMS_N_BUCKETS);
        let recorder = b.build_recorder();
        let handle = recorder.handle();
        for &(name, kind, help) in FAMILIES {
            let key = KeyName::from(name);
            match kind {
                Kind::Gauge => recorder.describe_gauge(key, None::<Unit>, help.into()),
                Kind::Counter => recorder.describe_counter(key, None::<Unit>, help.into()),
                Kind::Histogram => recorder.describe_histogram(key, None::<Unit>, help.into()),
            }
        }
        let model_name = model_name.into();
        let engines = (0..num_engines).map(|k| std::sync::OnceLock::from(EngineSeries::new(&recorder, &model_name, k))).collect();
        let cluster = ClusterSeries::new(&recorder, &model_name);
        Metrics { recorder, handle, model_name, engines, elastic: false, cluster }
    }

    /// Series for up to `slots` ranks that join and leave: each rank's
    /// appear when it joins and go when it is no longer a member.
    pub(crate) fn elastic(mut self, slots: usize) -> Self {
        self.engines.resize_with(slots.max(self.engines.len()), std::sync::OnceLock::new);
        self.elastic = true;
        self
    }

    fn engine(&self, k: usize) -> Option<&EngineSeries> {
        self.engines.get(k).map(|e| e.get_or_init(|| EngineSeries::new(&self.recorder, &self.model_name, k)))
    }

    pub(crate) fn add_prompt_tokens(&self, engine: usize, n: u64) {
        if let Some(e) = self.engine(engine) {
            e.prompt_tokens.increment(n);
        }
    }

    pub(crate) fn add_generation_tokens(&self, engine: usize, n: u64) {
        if let Some(e) = self.engine(engine) {
            e.generation_tokens.increment(n);
        }
    }

    pub(crate) fn observe_ttft(&self, engine: usize, secs: f64) {
        if let (Some(e), true) = (self.engine(engine), sane(secs)) {
            e.ttft.record(secs);
        }
    }

    pub(crate) fn observe_inter_token(&self, engine: usize, secs: f64) {
        if let (Some(e), true) = (self.engine(engine), sane(secs)) {
            e.itl.record(secs);
            e.tpot.record(secs);
        }
    }

    /// A sequence ended: counted under its finish reason, with its lengths,
    /// parameters and (when the engine said) phase times.
    pub(crate) fn sequence_finished(&self, engine: usize, f: &FinishedSeq) {
        let Some(e) = self.engine(engine) else { return };
        if let Some(k) = FINISH_REASONS.iter().position(|r| *r == f.reason) {
            e.success[k].increment(1);
        }
        if sane(f.e2e_secs) {
            e.e2e.record(f.e2e_secs);
        }
        e.request_prompt_tokens.record(f.prompt_tokens as f64);
        e.request_generation_tokens.record(f.generation_tokens as f64);
        e.request_max_generation_tokens.record(f.max_tokens as f64);
        e.params_n.record(f.n as f64);
        e.params_max_tokens.record(f.max_tokens as f64);
        if let Some(t) = f.timing {
            let (q, p, d) = (t.queue_secs as f64, t.prefill_secs as f64, t.decode_secs as f64);
            for (h, v) in [(&e.queue, q), (&e.prefill, p), (&e.decode, d), (&e.inference, p + d)] {
                if sane(v) {
                    h.record(v);
                }
            }
            if f.generation_tokens > 1 && sane(d) {
                e.request_tpot.record(d / (f.generation_tokens - 1) as f64);
            }
        }
    }

    /// The exposition text, after taking in what each rank reported since
    /// the last scrape (`ranks[k]`: rank k, or None when it never joined,
    /// or, in an elastic cluster, is not a member now).
    pub(crate) fn render(&self, ranks: &[Option<RankScrape>], counters: &CoordinatorCounters) -> String {
        self.cluster.set(counters);
        // Ranks with series that are not members now (an elastic cluster's).
        let mut gone = Vec::new();
        for k in 0..self.engines.len() {
            let r = ranks.get(k).and_then(|r| r.as_ref());
            if self.elastic && r.is_none() {
                if self.engines[k].get().is_some() {
                    gone.push(format!("engine=\"{k}\""));
                }
                continue;
            }
            let Some(e) = self.engine(k) else { continue };
            e.up.set(f64::from(u8::from(r.is_some_and(|r| r.up))));
            let Some(r) = r else { continue };
            let st = &r.stats;
            e.breaker.set(r.breaker.gauge_value());
            e.cached_blocks.set(r.cached_blocks as f64);
            if r.up {
                let rate = if st.prefix_cache_queries == 0 { 0.0 } else { st.prefix_cache_hits as f64 / st.prefix_cache_queries as f64 };
                e.hit_rate.set(rate);
            }
            e.running.set(st.num_running as f64);
            e.waiting.set(st.num_waiting as f64);
            e.waiting_capacity.set(st.num_waiting as f64);
            e.waiting_deferred.set(0.0);
            e.kv_usage.set(st.kv_usage as f64);
            if r.up {
                // Totals since the rank started: a rank that came back starts over.
                e.preemptions.absolute(st.num_preemptions);
                e.prefix_queries.absolute(st.prefix_cache_queries);
                e.prefix_hits.absolute(st.prefix_cache_hits);
                e.spec_drafts.absolute(st.spec.num_drafts);
                e.spec_draft_tokens.absolute(st.spec.num_draft_tokens);
                e.spec_accepted.absolute(st.spec.num_accepted_tokens);
                // One series per draft position, as vLLM labels them; a
                // position appears once a draft has reached it.
                for (pos, &n) in st.spec.accepted_per_pos.iter().enumerate() {
                    let mut labels = e.labels.clone();
                    labels.push(Label::new("position", pos.to_string()));
                    let key = Key::from_parts("vllm:spec_decode_num_accepted_tokens_per_pos_total", labels);
                    self.recorder.register_counter(&key, &metadata()).absolute(n);
                }
            }
            for &t in &r.steps {
                e.iteration_tokens.record(t as f64);
            }
            let info = [
                ("block_size", r.hello.block_size.to_string()),
                ("cache_dtype", "auto".to_string()),
                ("enable_prefix_caching", "True".to_string()),
                ("num_gpu_blocks", r.hello.num_kv_blocks.to_string()),
                ("num_cpu_blocks", "None".to_string()),
            ];
            let mut labels = e.labels.clone();
            labels.extend(info.into_iter().map(|(k, v)| Label::new(k, v)));
            let key = Key::from_parts("vllm:cache_config_info", labels);
            self.recorder.register_gauge(&key, &metadata()).set(1.0);
        }
        let text = self.handle.render();
        if gone.is_empty() {
            return text;
        }
        // The recorder cannot forget a series: a rank that left is cut from
        // the text (its counters carry on if it joins again).
        let mut kept = String::with_capacity(text.len());
        for line in text.lines().filter(|l| !gone.iter().any(|g| l.contains(g.as_str()))) {
            kept.push_str(line);
            kept.push('\n');
        }
        kept
    }
}

fn sane(v: f64) -> bool {
    v.is_finite() && v >= 0.0 // a clock oddity never poisons a sum
}

fn metadata() -> metrics::Metadata<'static> {
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

impl EngineSeries {
    fn new(rec: &PrometheusRecorder, model_name: &str, k: usize) -> Self {
        let labels = vec![Label::new("model_name", model_name.to_string()), Label::new("engine", k.to_string())];
        let key = |name: &'static str| Key::from_parts(name, labels.clone());
        let md = metadata();
        let gauge = |name| rec.register_gauge(&key(name), &md);
        let counter = |name| {
            let c = rec.register_counter(&key(name), &md);
            c.increment(0); // listed from the start, at 0
            c
        };
        let hist = |name| rec.register_histogram(&key(name), &md);
        let success = FINISH_REASONS.map(|reason| {
            let mut l = labels.clone();
            l.push(Label::new("finished_reason", reason));
            let c = rec.register_counter(&Key::from_parts("vllm:request_success_total", l), &md);
            c.increment(0);
            c
        });
        let by_reason = |reason: &'static str| {
            let mut l = labels.clone();
            l.push(Label::new("reason", reason));
            let g = rec.register_gauge(&Key::from_parts("vllm:num_requests_waiting_by_reason", l), &md);
            g.set(0.0);
            g
        };
        // Set once: the state never changes (see SLEEP_STATES), and the
        // recorder keeps a series whose handle is dropped.
        for (state, value) in SLEEP_STATES {
            let mut l = labels.clone();
            l.push(Label::new("sleep_state", state));
            rec.register_gauge(&Key::from_parts("vllm:engine_sleep_state", l), &md).set(value);
        }
        EngineSeries {
            waiting_capacity: by_reason("capacity"),
            waiting_deferred: by_reason("deferred"),
            up: gauge("ferry:engine_up"),
            breaker: gauge("ferry:rank_breaker_state"),
            hit_rate: gauge("ferry:prefix_cache_hit_rate"),
            cached_blocks: gauge("ferry:rank_cached_blocks"),
            running: gauge("vllm:num_requests_running"),
            waiting: gauge("vllm:num_requests_waiting"),
            kv_usage: gauge("vllm:kv_cache_usage_perc"),
            preemptions: counter("vllm:num_preemptions_total"),
            prefix_queries: counter("vllm:prefix_cache_queries_total"),
            prefix_hits: counter("vllm:prefix_cache_hits_total"),
            spec_drafts: counter("vllm:spec_decode_num_drafts_total"),
            spec_draft_tokens: counter("vllm:spec_decode_num_draft_tokens_total"),
            spec_accepted: counter("vllm:spec_decode_num_accepted_tokens_total"),
            prompt_tokens: counter("vllm:prompt_tokens_total"),
            generation_tokens: counter("vllm:generation_tokens_total"),
            success,
            iteration_tokens: hist("vllm:iteration_tokens_total"),
            request_prompt_tokens: hist("vllm:request_prompt_tokens"),
            request_generation_tokens: hist("vllm:request_generation_tokens"),
            request_max_generation_tokens: hist("vllm:request_max_num_generation_tokens"),
            params_n: hist("vllm:request_params_n"),
            params_max_tokens: hist("vllm:request_params_max_tokens"),
            ttft: hist("vllm:time_to_first_token_seconds"),
            itl: hist("vllm:inter_token_latency_seconds"),
            tpot: hist("vllm:time_per_output_token_seconds"),
            request_tpot: hist("vllm:request_time_per_output_token_seconds"),
            e2e: hist("vllm:e2e_request_latency_seconds"),
            queue: hist("vllm:request_queue_time_seconds"),
            inference: hist("vllm:request_inference_time_seconds"),
            prefill: hist("vllm:request_prefill_time_seconds"),
            decode: hist("vllm:request_decode_time_seconds"),
            labels,
        }
    }
}

/// Prometheus' text content type.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use ferry_transport::EngineStats;

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

    #[allow(clippy::unnecessary_wraps, reason = "a slot of the coordinator's scrape, which is an Option")]
    fn scrape(up: bool, stats: EngineStats, steps: Vec<u32>) -> Option<RankScrape> {
        let hello = ferry_transport::Hello {
            protocol_version: ferry_transport::PROTOCOL_VERSION,
            rank: 1,
            model: "m".into(),
            fingerprint: Default::default(),
            vocab_size: 10,
            max_model_len: 100,
            num_kv_blocks: 64,
            block_size: 16,
            node: "n".into(),
        };
        Some(RankScrape { up, stats, steps, hello, breaker: crate::engines::breaker::BreakerState::Open, cached_blocks: 5, draining: false })
    }

    #[test]
    fn exposition_has_vllm_names_labels_and_values() {
        let m = Metrics::new("smol\"lm", 2, 2048);
        m.add_prompt_tokens(1, 12);
        m.add_generation_tokens(1, 5);
        m.observe_ttft(1, 0.003);
        m.observe_ttft(1, 0.5);
        m.observe_ttft(1, 9999.0);
        m.observe_inter_token(1, 0.02);
        let timing = SeqTiming { queue_secs: 0.25, prefill_secs: 0.5, decode_secs: 1.0 };
        let fin = FinishedSeq { reason: "length", e2e_secs: 1.2, prompt_tokens: 12, generation_tokens: 5, n: 2, max_tokens: 5, timing: Some(timing) };
        m.sequence_finished(1, &fin);
        m.sequence_finished(7, &FinishedSeq { reason: "stop", ..fin.clone() }); // no such rank: ignored
        let spec = ferry_transport::SpecDecodeStats { num_drafts: 6, num_draft_tokens: 20, num_accepted_tokens: 9, accepted_per_pos: vec![5, 3, 1] };
        let stats = EngineStats { num_waiting: 2, num_running: 3, kv_usage: 0.5, num_preemptions: 4, prefix_cache_queries: 100, prefix_cache_hits: 40, spec, ..Default::default() };
        let counters = CoordinatorCounters { migrations: 3, retries: 1, routed: [0, 9, 2, 0, 0, 0], ..Default::default() };
        let text = m.render(&[None, scrape(true, stats, vec![1, 7, 300])], &counters);
        let s = parse(&text);
        let l1 = "model_name=\"smol\\\"lm\",engine=\"1\"";
        let l0 = "model_name=\"smol\\\"lm\",engine=\"0\"";
        let g = |name: &str| s.get(&format!("{name}{{{l1}}}")).copied().unwrap_or_else(|| panic!("{name} missing in\n{text}"));
        assert_eq!(g("ferry:engine_up"), 1.0);
        assert_eq!(s[&format!("ferry:engine_up{{{l0}}}")], 0.0);
        assert_eq!(g("vllm:num_requests_running"), 3.0);
        assert_eq!(g("vllm:num_requests_waiting"), 2.0);
        // vLLM's reasons: all of ferry's waiting is for capacity.
        assert_eq!(s[&format!("vllm:num_requests_waiting_by_reason{{{l1},reason=\"capacity\"}}")], 2.0);
        assert_eq!(s[&format!("vllm:num_requests_waiting_by_reason{{{l1},reason=\"deferred\"}}")], 0.0);
        assert_eq!(s[&format!("vllm:num_requests_waiting_by_reason{{{l0},reason=\"capacity\"}}")], 0.0);
        assert!(text.contains("# TYPE vllm:num_requests_waiting_by_reason gauge\n"));
        assert_eq!(g("vllm:kv_cache_usage_perc"), 0.5);
        assert_eq!(g("vllm:prefix_cache_queries_total"), 100.0);
        assert_eq!(g("vllm:spec_decode_num_drafts_total"), 6.0);
        assert_eq!(g("vllm:spec_decode_num_draft_tokens_total"), 20.0);
        assert_eq!(g("vllm:spec_decode_num_accepted_tokens_total"), 9.0);
        for (pos, n) in [5.0, 3.0, 1.0].into_iter().enumerate() {
            assert_eq!(s[&format!("vllm:spec_decode_num_accepted_tokens_per_pos_total{{{l1},position=\"{pos}\"}}")], n);
        }
        assert_eq!(s[&format!("vllm:spec_decode_num_drafts_total{{{l0}}}")], 0.0);
        assert_eq!(g("vllm:prefix_cache_hits_total"), 40.0);
        assert_eq!(g("vllm:num_preemptions_total"), 4.0);
        assert_eq!(g("vllm:prompt_tokens_total"), 12.0);
        assert_eq!(g("vllm:generation_tokens_total"), 5.0);
        assert_eq!(s[&format!("vllm:request_success_total{{{l1},finished_reason=\"length\"}}")], 1.0);
        assert_eq!(s[&format!("vllm:request_success_total{{{l1},finished_reason=\"stop\"}}")], 0.0);
        // Cumulative buckets: 0.003 <= 0.005; 0.5 <= 0.5; 9999 only in +Inf.
        let b = |name: &str, le: &str| s[&format!("{name}_bucket{{{l1},le=\"{le}\"}}")];
        let ttft = "vllm:time_to_first_token_seconds";
        assert_eq!((b(ttft, "0.001"), b(ttft, "0.005"), b(ttft, "0.25"), b(ttft, "0.5"), b(ttft, "2560"), b(ttft, "+Inf")), (0.0, 1.0, 1.0, 2.0, 2.0, 3.0));
        assert_eq!(g("vllm:time_to_first_token_seconds_count"), 3.0);
        assert!((g("vllm:time_to_first_token_seconds_sum") - 9999.503).abs() < 1e-9);
        assert_eq!(b("vllm:e2e_request_latency_seconds", "1.5"), 1.0);
        assert_eq!(b("vllm:e2e_request_latency_seconds", "1"), 0.0);
        // The engine's phases: queue 0.25, prefill 0.5, decode 1.0, inference 1.5;
        // per-request TPOT 1.0 / 4.
        assert_eq!(b("vllm:request_queue_time_seconds", "0.3"), 1.0);
        assert_eq!(b("vllm:request_prefill_time_seconds", "0.3"), 0.0);
        assert_eq!(b("vllm:request_inference_time_seconds", "1.5"), 1.0);
        assert_eq!(b("vllm:request_inference_time_seconds", "1"), 0.0);
        assert_eq!(b("vllm:request_time_per_output_token_seconds", "0.3"), 1.0);
        assert_eq!(b("vllm:request_time_per_output_token_seconds", "0.2"), 0.0);
        assert_eq!(g("vllm:time_per_output_token_seconds_count"), 1.0);
        // Token counts and parameters, in 1-2-5 buckets up to max_model_len.
        assert_eq!(b("vllm:request_prompt_tokens", "20"), 1.0);
        assert_eq!(b("vllm:request_prompt_tokens", "10"), 0.0);
        assert_eq!(b("vllm:request_params_n", "2"), 1.0);
        assert_eq!(b("vllm:request_params_max_tokens", "5"), 1.0);
        assert!(text.contains("vllm:request_prompt_tokens_bucket{model_name=\"smol\\\"lm\",engine=\"1\",le=\"2000\"}"));
        // Steps: 1 <= 1, 7 <= 8, 300 <= 512.
        let it = "vllm:iteration_tokens_total";
        assert_eq!((b(it, "1"), b(it, "8"), b(it, "256"), b(it, "512")), (1.0, 2.0, 2.0, 3.0));
        // cache_config_info is an info-style gauge.
        assert!(text.lines().any(|l| l.starts_with("vllm:cache_config_info{") && l.contains("block_size=\"16\"") && l.contains("num_gpu_blocks=\"64\"") && l.ends_with(" 1")), "{text}");
        assert!(text.contains("# TYPE vllm:prompt_tokens_total counter\n"));
        assert!(text.contains("# TYPE vllm:e2e_request_latency_seconds histogram\n"));
        // A later scrape does not count the steps again.
        // The coordinator's counters and each rank's routing figures.
        assert_eq!(s["ferry:migrations_total{model_name=\"smol\\\"lm\"}"], 3.0);
        assert_eq!(s["ferry:request_retries_total{model_name=\"smol\\\"lm\"}"], 1.0);
        assert_eq!(s["ferry:routing_decisions_total{model_name=\"smol\\\"lm\",reason=\"prefix_hit\"}"], 9.0);
        assert_eq!(s["ferry:routing_decisions_total{model_name=\"smol\\\"lm\",reason=\"balance_guard\"}"], 0.0);
        assert_eq!(g("ferry:rank_breaker_state"), 1.0);
        assert_eq!(g("ferry:rank_cached_blocks"), 5.0);
        assert_eq!(g("ferry:prefix_cache_hit_rate"), 0.4);
        let again = parse(&m.render(&[None, scrape(true, EngineStats::default(), vec![])], &counters));
        assert_eq!(again[&format!("{it}_count{{{l1}}}")], 3.0);
    }

    /// vLLM's sleep gauge, per rank, whether the rank is up or never joined:
    /// ferry's ranks never sleep.
    #[test]
    fn engine_sleep_state_is_awake_on_every_rank() {
        let m = Metrics::new("smol", 2, 128);
        let text = m.render(&[None, scrape(true, EngineStats::default(), vec![])], &CoordinatorCounters::default());
        let s = parse(&text);
        assert!(text.contains("# TYPE vllm:engine_sleep_state gauge\n"), "{text}");
        for engine in ["0", "1"] {
            let v = |state: &str| s[&format!("vllm:engine_sleep_state{{model_name=\"smol\",engine=\"{engine}\",sleep_state=\"{state}\"}}")];
            assert_eq!((v("awake"), v("weights_offloaded"), v("discard_all")), (1.0, 0.0, 0.0));
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("vllm:engine_sleep_state{")).count(), 6);
    }

    #[test]
    fn one_two_five_buckets_as_vllm() {
        assert_eq!(buckets_1_2_5(100), vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
        assert_eq!(buckets_1_2_5(8192).last(), Some(&5000.0));
        assert_eq!(buckets_1_2_5(1), vec![1.0]);
    }
}
