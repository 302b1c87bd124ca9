//! `ferry generate`: one prompt through the real engine, printed as it decodes.
//! For quick checks without a server; it drives the engine over the same
//! in-process link the gateway uses.

use crate::engine_flags::EngineFlags;
use crate::local_engine::start_local_engine;
use crate::model_source;
use clap::Args;
use ferry_engine::tokenizer::{ChatMessage, IncrementalDetokenizer};
use ferry_engine::{load_model, loader::ProgressBar};
use ferry_transport::{EngineCommand, EngineRequest, FinishReason, FromEngine, SamplingParams, ToEngine};
use std::io::Write;
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// A GGUF file or a Hugging Face folder (default: SmolLM2-135M-Instruct).
    pub model: Option<String>,
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// 0 is greedy (the default here, for reproducible checks).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: i32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Seed of this request (the engine's --seed seeds requests without one).
    #[arg(long = "request-seed")]
    pub request_seed: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub n: u32,
    #[arg(long, value_delimiter = ',')]
    pub stop_token_ids: Vec<u32>,
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0)]
    pub min_tokens: u32,
    /// Print each token's logprob and this many alternatives to stderr.
    #[arg(long)]
    pub logprobs: Option<u32>,
    #[command(flatten)]
    pub engine: EngineFlags,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let (path, name) = model_source::resolve(args.model.as_deref())?;
    let model = load_model(&path, args.engine.load_format(), args.engine.dummy_type(), &ProgressBar::new(&name))?;
    let tok = model.tokenizer.clone();
    let text = if args.chat {
        let msgs = [ChatMessage { role: "user".into(), content: args.prompt.clone() }];
        tok.apply_chat_template(&msgs, true)?
    } else {
        args.prompt.clone()
    };
    let prompt_tokens = tok.encode(&text, true)?;
    let sampling = SamplingParams {
        n: args.n,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        seed: args.request_seed,
        max_tokens: args.max_tokens,
        min_tokens: args.min_tokens,
        stop_token_ids: args.stop_token_ids.clone(),
        ignore_eos: args.ignore_eos,
        logprobs: args.logprobs,
    };
    let n_prompt = prompt_tokens.len();
    let mut engine = start_local_engine(&model, &args.engine.engine_args(), 0, &name)?;
    engine.end.tx.send(ToEngine::Command(EngineCommand::Add(EngineRequest { id: 1, prompt_tokens, sampling })))?;

    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let started = Instant::now();
    let n = args.n.max(1) as usize;
    let mut detoks: Vec<IncrementalDetokenizer> = (0..n).map(|_| IncrementalDetokenizer::new(tok.clone(), true)).collect();
    let mut texts = vec![String::new(); n];
    let mut finishes: Vec<Option<FinishReason>> = vec![None; n];
    let mut generated = 0usize;
    let mut first_token_at = None;
    let stdout = std::io::stdout();
    while finishes.iter().any(|f| f.is_none()) {
        let msg = rt.block_on(engine.end.rx.recv())?;
        let FromEngine::Outputs(batch) = msg else { continue };
        for out in batch.outputs {
            let i = out.index as usize;
            if i >= n {
                continue;
            }
            first_token_at.get_or_insert_with(Instant::now);
            generated += out.new_tokens.len();
            for (k, &t) in out.new_tokens.iter().enumerate() {
                let piece = detoks[i].push(t);
                if n == 1 {
                    let mut o = stdout.lock();
                    let _ = o.write_all(piece.as_bytes());
                    let _ = o.flush();
                }
                texts[i].push_str(&piece);
                if let Some(lp) = out.logprobs.as_ref().and_then(|l| l.get(k)) {
                    let alts: Vec<String> = lp.top.iter().map(|(id, p)| format!("{}:{:.4}", id, p)).collect();
                    eprintln!("token {:>6} {:>9.4}  {:?}  top [{}]", lp.token, lp.logprob, tok.id_to_piece(t).unwrap_or_default(), alts.join(" "));
                }
            }
            if let Some(f) = out.finish {
                let tail = detoks[i].finish();
                if n == 1 {
                    print!("{tail}");
                }
                texts[i].push_str(&tail);
                if let FinishReason::Error(e) = &f {
                    anyhow::bail!("the engine refused the request: {e}");
                }
                finishes[i] = Some(f);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if n == 1 {
        println!();
    } else {
        for (i, t) in texts.iter().enumerate() {
            println!("--- completion {i} ({:?})\n{t}", finishes[i].as_ref().expect("loop ended"));
        }
    }
    let decode_time = first_token_at.map_or(elapsed, |t| t.elapsed().as_secs_f64());
    eprintln!(
        "[{n_prompt} prompt tokens, {generated} generated in {elapsed:.2}s; {:.1} tokens/s after the first; finish: {:?}]",
        generated.saturating_sub(n) as f64 / decode_time.max(1e-9),
        finishes[0].as_ref().expect("loop ended")
    );
    engine.end.tx.send(ToEngine::Command(EngineCommand::Shutdown))?;
    engine.threads.join();
    Ok(())
}
