//! `ferry bench engine`: the engine's raw speed, without HTTP: prompt tokens/s,
//! and decode tokens/s at several concurrency levels. It drives the sans-IO
//! EngineCore directly; `scripts/bench/bench_engine.sh` runs it beside llama.cpp's
//! batched API on the same file and threads and prints the two side by side.

use crate::cli::engine_flags::EngineFlags;
use crate::cli::model_source;
use clap::Args;
use ferry_engine::model::weights::NoProgress;
use ferry_engine::rng::{RngCore, SplitMix64};
use ferry_engine::{build_engine_core, load_model, EngineCore};
use ferry_transport::{Constraint, EngineRequest, SamplingParams};
use std::time::Instant;

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
    let model = load_model(&path, args.engine.load_format(), args.engine.dummy_type(), &NoProgress)?;
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
    println!("{out}");
    Ok(())
}
