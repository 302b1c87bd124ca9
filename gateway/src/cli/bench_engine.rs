//! `ferry bench engine`: the engine's raw speed, without HTTP: prompt tokens/s,
//! and decode tokens/s at several concurrency levels. It drives the sans-IO
//! EngineCore directly; `scripts/bench/bench_engine.sh` runs it beside llama.cpp's
//! batched API on the same file and threads and prints the two side by side.
//!
//! It also reports the single-stream floor ([`ferry_engine::floor`]): the
//! memory's streaming read speed, measured here, over the bytes of weights a
//! decode step reads; and with `--profile`, where a single-stream token's time
//! goes, in microseconds.

use crate::cli::engine_flags::EngineFlags;
use crate::cli::model_source;
use clap::Args;
use ferry_engine::cpu::profile::{self, Part};
use ferry_engine::model::weights::NoProgress;
use ferry_engine::rng::{RngCore, SplitMix64};
use ferry_engine::{build_engine_core, load_model, EngineCore};
use ferry_transport::{Constraint, EngineRequest, SamplingParams};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub(crate) struct EngineBenchArgs {
    pub model: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub decode_len: u32,
    /// Prompt length of each sequence in the decode runs.
    #[arg(long, default_value_t = 16)]
    pub short_prompt_len: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<usize>,
    /// Each figure is the best of this many runs.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also decode under this JSON-schema constraint (structured outputs),
    /// each run right after its unconstrained twin, and report both with
    /// what the masks cost.
    #[arg(long)]
    pub json_schema: Option<String>,
    /// Run random weights (`--load-format dummy`, of `--dtype`) in the shape
    /// of this Hugging Face config.json, with MODEL's tokenizer: a larger
    /// model than the one at hand (e.g. scripts/bench/llama-3.2-1b.json).
    #[arg(long)]
    pub hf_config: Option<PathBuf>,
    /// MiB of the buffer the floor's bandwidth probe streams (much more than
    /// the last-level cache); 0 skips the probe.
    #[arg(long, default_value_t = 1024)]
    pub floor_mib: usize,
    /// Passes of the bandwidth probe; the fastest counts.
    #[arg(long, default_value_t = 5)]
    pub floor_passes: usize,
    /// Also time the parts of a single-stream decode (the CPU backend's
    /// profile) and print a per-token budget in microseconds.
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub engine: EngineFlags,
}

fn random_prompt(rng: &mut SplitMix64, n: usize, vocab: usize) -> Vec<u32> {
    // Stay clear of the special tokens at the start of most vocabularies.
    (0..n).map(|_| (100 + rng.next_u64() % (vocab as u64 - 200)) as u32).collect()
}

fn prompt_rate(core: &mut EngineCore, rng: &mut SplitMix64, len: usize, id: &mut u64) -> f64 {
    let vocab = core.vocab_size();
    let sampling = SamplingParams { temperature: 0.0, max_tokens: 1, ..Default::default() };
    *id += 1;
    core.add_request(EngineRequest::new(*id, random_prompt(rng, len, vocab), sampling), Instant::now()).expect("valid");
    let t = Instant::now();
    while core.has_work() {
        core.step(Instant::now());
    }
    len as f64 / t.elapsed().as_secs_f64()
}

/// Aggregate decode tokens/s of `n` sequences: prefill first, then time only the
/// steps in which every sequence decodes.
fn decode_rate(
    core: &mut EngineCore,
    rng: &mut SplitMix64,
    n: usize,
    prompt_len: usize,
    decode_len: u32,
    id: &mut u64,
    constraint: Option<&Constraint>,
) -> f64 {
    let vocab = core.vocab_size();
    let sampling = SamplingParams {
        temperature: 0.0,
        max_tokens: decode_len + 1,
        ignore_eos: true,
        constraint: constraint.cloned(),
        ..Default::default()
    };
    for _ in 0..n {
        *id += 1;
        let req = EngineRequest::new(*id, random_prompt(rng, prompt_len, vocab), sampling.clone());
        core.add_request(req, Instant::now()).expect("valid");
    }
    let mut first_tokens = 0;
    while first_tokens < n {
        first_tokens += core.step(Instant::now()).iter().filter(|o| !o.new_tokens.is_empty()).count();
    }
    let t = Instant::now();
    let mut tokens = 0usize;
    while core.has_work() {
        tokens += core.step(Instant::now()).iter().map(|o| o.new_tokens.len()).sum::<usize>();
    }
    tokens as f64 / t.elapsed().as_secs_f64()
}

pub(crate) fn run(args: EngineBenchArgs) -> anyhow::Result<()> {
    let mut eargs = args.engine.engine_args()?;
    let (path, name) = model_source::resolve(args.model.as_deref())?;
    let model = match &args.hf_config {
        Some(config) => ferry_engine::load_dummy_shaped(&path, config, args.engine.dummy_type())?,
        None => load_model(&path, args.engine.load_format(), args.engine.dummy_type(), &NoProgress)?,
    };
    let name = match &args.hf_config {
        Some(config) => format!("{} (dummy {:?} weights)", config.display(), args.engine.dummy_type()),
        None => name,
    };
    let weight_bytes = ferry_engine::floor::weight_bytes_per_token(&model.weights);
    let most = args.concurrency.iter().copied().max().unwrap_or(1);
    eargs.max_num_seqs = eargs.max_num_seqs.max(most);
    // Timings must not be helped by earlier runs' cached prompts.
    eargs.enable_prefix_caching = false;
    let (mut core, _) = build_engine_core(&model, &eargs, 0).map_err(anyhow::Error::msg)?;
    let mut rng = ferry_engine::rng::splitmix(42);
    let mut id = 0;
    // One untimed warm-up pages the weights in.
    decode_rate(&mut core, &mut rng, 1, args.short_prompt_len, 4, &mut id, None);
    let best = |f: &mut dyn FnMut() -> f64| (0..args.repeats.max(1)).map(|_| f()).fold(0.0, f64::max);
    let prompt = best(&mut || prompt_rate(&mut core, &mut rng, args.prompt_len, &mut id));
    let mut decode = serde_json::Map::new();
    let constraint = args.json_schema.clone().map(Constraint::JsonSchema);
    let mut constrained = serde_json::Map::new();
    for &n in &args.concurrency {
        let Some(c) = &constraint else {
            let r = best(&mut || decode_rate(&mut core, &mut rng, n, args.short_prompt_len, args.decode_len, &mut id, None));
            decode.insert(n.to_string(), r.into());
            continue;
        };
        // Twin runs, one after the other, so a busy machine slows both alike.
        let (mut free, mut json) = (0.0f64, 0.0f64);
        let before = core.mask_timing();
        for _ in 0..args.repeats.max(1) {
            free = free.max(decode_rate(&mut core, &mut rng, n, args.short_prompt_len, args.decode_len, &mut id, None));
            json = json.max(decode_rate(&mut core, &mut rng, n, args.short_prompt_len, args.decode_len, &mut id, Some(c)));
        }
        let t = core.mask_timing();
        let (masks, steps) = ((t.masks - before.masks).max(1) as f64, (t.steps - before.steps).max(1) as f64);
        decode.insert(n.to_string(), free.into());
        constrained.insert(
            n.to_string(),
            serde_json::json!({
                "decode_tokens_per_s": json,
                "ratio_to_unconstrained": json / free,
                "mask_us_per_token": (t.compute - before.compute).as_secs_f64() * 1e6 / masks,
                "mask_us_per_step": (t.compute - before.compute).as_secs_f64() * 1e6 / steps,
                "stall_us_per_step": (t.stall - before.stall).as_secs_f64() * 1e6 / steps,
            }),
        );
    }
    let threads = ferry_engine::executor::default_threads(eargs.threads);
    let budget = args.profile.then(|| profile_decode(&mut core, &mut rng, args.short_prompt_len, args.decode_len.max(1), &mut id));
    let mut out = serde_json::json!({
        "engine": format!("ferry {}", env!("CARGO_PKG_VERSION")),
        "model": name,
        "threads": threads,
        "prompt_tokens_per_s": prompt,
        "decode_tokens_per_s": decode,
    });
    if constraint.is_some() {
        out["json_schema"] = constrained.into();
    }
    let single = decode.get("1").and_then(serde_json::Value::as_f64);
    let mut floor_tps = None;
    if args.floor_mib > 0 {
        let bw = ferry_engine::floor::stream_read_bytes_per_s(threads, args.floor_mib << 20, args.floor_passes);
        let tps = bw / weight_bytes as f64;
        floor_tps = Some(tps);
        eprintln!(
            "floor: {:.2} GB/s ({threads}-thread read of {} MiB, best of {}) / {:.2} MB of weights per token = {tps:.1} tokens/s",
            bw / 1e9,
            args.floor_mib,
            args.floor_passes,
            weight_bytes as f64 / 1e6
        );
        if let Some(s) = single {
            eprintln!("single-stream decode: {s:.1} tokens/s = {:.3} of the floor", s / tps);
        }
        out["floor"] = serde_json::json!({
            "bandwidth_gb_per_s": bw / 1e9,
            "probe_mib": args.floor_mib,
            "probe_threads": threads,
            "weight_bytes_per_token": weight_bytes,
            "floor_tokens_per_s": tps,
            "single_stream_fraction": single.map(|s| s / tps),
        });
    }
    if let Some(b) = budget {
        out["profile"] = b.report(threads, weight_bytes, floor_tps);
    }
    println!("{out}");
    Ok(())
}

/// Where a profiled single-stream decode's time went, summed over its steps.
struct Budget {
    tokens: usize,
    /// The CPU backend's parts.
    parts: profile::Totals,
    /// Scheduling and building the step's input (`begin_step`).
    begin: Duration,
    /// `run_step` as the engine sees it (the backend's `execute` inside).
    run: Duration,
    /// Taking the picked tokens back into the sequences (`finish_step`).
    finish: Duration,
}

/// Decodes `decode_len` tokens of one sequence with the CPU backend's profile
/// on, timing the engine's three phases of each step around it.
fn profile_decode(core: &mut EngineCore, rng: &mut SplitMix64, prompt_len: usize, decode_len: u32, id: &mut u64) -> Budget {
    let vocab = core.vocab_size();
    let sampling = SamplingParams { temperature: 0.0, max_tokens: decode_len + 1, ignore_eos: true, ..Default::default() };
    *id += 1;
    core.add_request(EngineRequest::new(*id, random_prompt(rng, prompt_len, vocab), sampling), Instant::now()).expect("valid");
    // The prompt's step, unprofiled.
    while core.step(Instant::now()).iter().all(|o| o.new_tokens.is_empty()) {}
    profile::take();
    profile::set_enabled(true);
    let (mut begin, mut run, mut finish, mut tokens) = (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0);
    loop {
        let t0 = Instant::now();
        let Some(mut step) = core.begin_step(t0) else { break };
        let t1 = Instant::now();
        let result = core.run_step(&mut step);
        let t2 = Instant::now();
        let outs = core.finish_step(step, result, t2);
        let t3 = Instant::now();
        (begin, run, finish) = (begin + (t1 - t0), run + (t2 - t1), finish + (t3 - t2));
        tokens += outs.iter().map(|o| o.new_tokens.len()).sum::<usize>();
    }
    profile::set_enabled(false);
    Budget { tokens: tokens.max(1), parts: profile::take(), begin, run, finish }
}

impl Budget {
    /// The per-token budget in microseconds: printed as a table on stderr,
    /// and returned as JSON.
    fn report(&self, threads: usize, weight_bytes: u64, floor_tps: Option<f64>) -> serde_json::Value {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / self.tokens as f64;
        let p = |part: Part| us(self.parts.get(part));
        // What each kind of phase's wall time has beyond its work per thread.
        // The team's quantizing of each phase's input is inside the matmul
        // phases' walls; all of it comes off the layers' row (the LM head's
        // is one phase's of 4 a layer plus 1).
        let wait_matmuls = p(Part::MatmulWall) - p(Part::MatmulBusy) - p(Part::SwigluBusy) - p(Part::TeamQuantize);
        let wait_lm_head = p(Part::LmHeadWall) - p(Part::LmHeadBusy);
        let wait_attention = p(Part::AttentionWall) - p(Part::AttentionBusy);
        let mut rows: Vec<(&str, f64)> = vec![
            ("weights streamed: layer matmuls", p(Part::MatmulBusy)),
            ("weights streamed: LM head", p(Part::LmHeadBusy)),
            ("activation quantization (matmul inputs)", p(Part::QuantizeActs) + p(Part::TeamQuantize)),
            ("attention", p(Part::AttentionBusy)),
            ("KV cache writes", p(Part::KvWrite)),
            ("RMS norms", p(Part::Norm)),
            ("rope", p(Part::Rope)),
            ("SwiGLU", p(Part::SwigluBusy)),
            ("residual adds", p(Part::Residual)),
            ("step buffers and embedding row", p(Part::Buffers)),
            ("thread synchronisation: layer matmuls", wait_matmuls),
            ("thread synchronisation: LM head", wait_lm_head),
            ("thread synchronisation: attention", wait_attention),
        ];
        let counted: f64 = rows.iter().map(|r| r.1).sum();
        rows.push(("forward pass, the rest", p(Part::Forward) - counted));
        rows.push(("sampling", p(Part::Sample)));
        rows.push(("backend, the rest (entering the pool)", p(Part::Execute) - p(Part::Forward) - p(Part::Sample)));
        rows.push(("engine loop (schedule, step input, executor)", us(self.begin) + us(self.run) - p(Part::Execute)));
        rows.push(("output path (tokens back to the sequences, outputs)", us(self.finish)));
        let total = us(self.begin + self.run + self.finish);
        eprintln!("per-token budget, single stream, {} tokens, {threads} threads:", self.tokens);
        eprintln!("| part | µs/token | share |");
        eprintln!("|---|---:|---:|");
        for (name, v) in &rows {
            eprintln!("| {name} | {v:.1} | {:.1}% |", 100.0 * v / total);
        }
        eprintln!("| total | {total:.1} | 100% |");
        let at_floor = floor_tps.map(|f| 1e6 / f);
        if let Some(f) = at_floor {
            eprintln!("(the weights' {:.2} MB at the floor's bandwidth: {f:.1} µs/token)", weight_bytes as f64 / 1e6);
        }
        let parts: serde_json::Map<String, serde_json::Value> = rows.iter().map(|(n, v)| ((*n).to_string(), (*v).into())).collect();
        serde_json::json!({
            "tokens": self.tokens,
            "us_per_token": parts,
            "total_us_per_token": total,
            "weights_at_floor_us_per_token": at_floor,
        })
    }
}
