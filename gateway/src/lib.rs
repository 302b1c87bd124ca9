//! The `ferry` package: the gateway (the OpenAI API over HTTP/3, HTTP/2 and
//! HTTP/1.1), the CLI, and the tools around them.
//!
//! Laid out by concept: [`cli`] (the commands), [`server`] (listeners and the
//! HTTP versions), [`api`] (the OpenAI and vLLM endpoints), [`engines`] (the
//! coordinator and the links to engine ranks), [`metrics`], and [`bench`] (the
//! benchmark client, which uses nothing of the gateway).

pub mod api;
pub mod bench;
pub mod cli;
pub mod embed;
pub mod engines;
pub mod metrics;
pub mod server;

pub use api::errors::ApiError;
pub use embed::{Completion, Llm, LlmBuilder, Prompt, Server, Stream, TextParams};
pub use ferry_engine::EngineArgs;
pub use ferry_transport::SamplingParams;
