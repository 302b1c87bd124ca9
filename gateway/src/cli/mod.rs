//! The `ferry` commands: `serve` (and `serve --headless`), `generate`, `certs`,
//! `bench engine`, `bench gateway`,
//! and the flags and model lookup they share.

pub(crate) mod bench_engine;
pub(crate) mod bench_gateway;
pub(crate) mod bench_routing;
pub(crate) mod certs;
pub(crate) mod command;
pub(crate) mod cluster_flags;
pub(crate) mod engine_flags;
pub(crate) mod generate;
pub(crate) mod headless;
pub(crate) mod model_source;
pub(crate) mod progress;
pub(crate) mod serve;
pub(crate) mod signals;
