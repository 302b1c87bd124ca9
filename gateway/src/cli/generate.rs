//! `ferry generate`: one prompt through the real engine, printed as it decodes.
//! For quick checks without a server; it runs the same coordinator and
//! generation code as `ferry serve`, through the embedding API ([`crate::Llm`]).

use crate::cli::engine_flags::EngineFlags;
use crate::embed::{Llm, Prompt};
use clap::Args;
use ferry_engine::LoadFormat;
use ferry_transport::SamplingParams;
use std::io::Write;
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub(crate) struct GenerateArgs {
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

pub(crate) fn run(args: GenerateArgs) -> anyhow::Result<()> {
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
        ..Default::default()
    };
    let prompt = if args.chat { Prompt::user(args.prompt.clone()) } else { Prompt::text(args.prompt.clone()) };
    let engine_args = args.engine.engine_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let mut builder = Llm::builder().engine_args(engine_args).progress_bar(true);
        if let Some(m) = &args.model {
            builder = builder.model(m.clone());
        }
        if args.engine.load_format() == LoadFormat::Dummy {
            builder = builder.dummy_weights(args.engine.dummy_type());
        }
        let llm = builder.build().await?;
        let n = args.n.max(1) as usize;
        let started = Instant::now();
        let mut first_token_at = None;
        let mut stream = llm.stream(prompt, sampling).await.map_err(|e| anyhow::anyhow!("the engine refused the request: {}", e.message()))?;
        let stdout = std::io::stdout();
        while let Some(delta) = stream.next().await {
            let d = delta.map_err(|e| anyhow::anyhow!("the engine refused the request: {}", e.message()))?;
            if !d.token_ids.is_empty() {
                first_token_at.get_or_insert_with(Instant::now);
            }
            if n == 1 {
                let mut o = stdout.lock();
                let _ = o.write_all(d.text.as_bytes());
                let _ = o.flush();
            }
            for lp in &d.logprobs {
                let alts: Vec<String> = lp.top.iter().map(|(id, p)| format!("{id}:{p:.4}")).collect();
                eprintln!("token {:>6} {:>9.4}  {:?}  top [{}]", lp.token, lp.logprob, llm.tokenizer().id_to_piece(lp.token).unwrap_or_default(), alts.join(" "));
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let done = stream.completions();
        drop(stream);
        if n == 1 {
            println!();
        } else {
            for (i, c) in done.iter().enumerate() {
                println!("--- completion {i} ({})\n{}", c.finish_reason, c.text);
            }
        }
        let generated: usize = done.iter().map(|c| c.token_ids.len()).sum();
        let decode_time = first_token_at.map_or(elapsed, |t: Instant| t.elapsed().as_secs_f64());
        eprintln!(
            "[{generated} tokens generated in {elapsed:.2}s; {:.1} tokens/s after the first; finish: {}]",
            generated.saturating_sub(n) as f64 / decode_time.max(1e-9),
            done[0].finish_reason
        );
        llm.shutdown().await;
        anyhow::Ok(())
    })
}
