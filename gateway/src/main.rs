use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry", version, about = "Serve large language models over the OpenAI API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt, offline (no server).
    Generate(ferry::generate::GenerateArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The engine's raw prompt and decode speed, in process (no HTTP).
    Engine(ferry::engine_bench::EngineBenchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => ferry::generate::run(a),
        Command::Bench(BenchCommand::Engine(a)) => ferry::engine_bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
