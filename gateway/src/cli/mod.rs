//! The `ferry` commands: `serve` (and `serve --headless`), `generate`, `certs`,
//! `bench engine`, `bench gateway`,
//! and the flags and model lookup they share.

pub mod bench_engine;
pub mod bench_gateway;
pub mod bench_routing;
pub mod certs;
pub mod command;
pub mod cluster_flags;
pub mod engine_flags;
pub mod generate;
pub mod headless;
pub mod model_source;
pub mod progress;
pub mod serve;
pub mod signals;
