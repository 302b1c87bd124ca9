//! The `ferry` commands: `serve`, `generate`, `bench engine`, `bench gateway`,
//! and the flags and model lookup they share.

pub mod bench_engine;
pub mod bench_gateway;
pub mod engine_flags;
pub mod generate;
pub mod model_source;
pub mod progress;
pub mod serve;
