//! The `ferry` package: the gateway (the OpenAI API over HTTP/3, HTTP/2 and
//! HTTP/1.1), the CLI, and the tools around them.

pub mod api;
pub mod bench;
pub mod coordinator;
pub mod engine_bench;
pub mod engine_client;
pub mod engine_flags;
pub mod generate;
pub mod local_engine;
pub mod metrics;
pub mod model_source;
pub mod serve;
pub mod server;
