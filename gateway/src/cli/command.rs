//! The `ferry` command line itself: its subcommands and their dispatch.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry", version, about = "Serve large language models over the OpenAI API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over the OpenAI API (HTTP/1.1, HTTP/2, HTTP/3).
    Serve(Box<crate::cli::serve::ServeArgs>),
    /// Generate a completion for one prompt, offline (no server).
    Generate(crate::cli::generate::GenerateArgs),
    /// TLS material for a cluster: its CA and node certificates.
    #[command(subcommand)]
    Certs(crate::cli::certs::CertsCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The engine's raw prompt and decode speed, in process (no HTTP).
    Engine(crate::cli::bench_engine::EngineBenchArgs),
    /// Load-test any OpenAI-compatible server, like `vllm bench serve`.
    Serve(crate::bench::BenchServeArgs),
    /// Print saved `bench serve` results side by side, with ratios to the first.
    Compare(crate::bench::BenchCompareArgs),
    /// The latency the gateway adds per token: TTFT and ITL over HTTP/1.1, HTTP/2
    /// and HTTP/3 against calling the engine in-process, same prompts and seed.
    Gateway(crate::cli::bench_gateway::BenchGatewayArgs),
    /// Prefix-aware against least-loaded routing on a shared-prefix
    /// workload, and the pause a stream sees when it moves to another rank.
    Routing(crate::cli::bench_routing::BenchRoutingArgs),
}

/// A server holds a socket per client: the common soft limit of 1024 open
/// files would refuse connections (EMFILE at accept) long before
/// `--max-connections` (4096). Raise the soft limit to the hard one, as
/// nginx's `worker_rlimit_nofile` and most servers do; failing that, go on.
fn raise_open_file_limit() {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!("could not raise the open-file limit: {e}");
    }
}

/// The `ferry` command line: parses the arguments, runs the command, and exits
/// with status 1 and the error's chain on failure.
pub fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    raise_open_file_limit();
    let result = match cli.command {
        Command::Serve(a) if a.cluster.headless => crate::cli::headless::run(*a),
        Command::Serve(a) => crate::cli::serve::run(*a),
        Command::Generate(a) => crate::cli::generate::run(a),
        Command::Certs(c) => crate::cli::certs::run(c),
        Command::Bench(BenchCommand::Serve(a)) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(crate::bench::run_bench_serve(a))),
        Command::Bench(BenchCommand::Compare(a)) => crate::bench::run_bench_compare(a),
        Command::Bench(BenchCommand::Gateway(a)) => crate::cli::bench_gateway::run(a),
        Command::Bench(BenchCommand::Routing(a)) => crate::cli::bench_routing::run(a),
        Command::Bench(BenchCommand::Engine(a)) => crate::cli::bench_engine::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
