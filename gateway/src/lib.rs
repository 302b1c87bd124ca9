//! The `ferry` package: the gateway (the OpenAI API over HTTP/3, HTTP/2 and
//! HTTP/1.1), the CLI, and the tools around them.
//!
//! # Embedding
//! The public surface is small: [`Llm`] runs a model's engine ranks in this
//! process and generates with no HTTP at all ([`Llm::generate`],
//! [`Llm::stream`]); [`Server`] serves an [`Llm`] over the OpenAI API on the
//! caller's tokio runtime ([`server::ServeConfig`] says where). Both return
//! [`Error`], whose [`ErrorKind`] says what failed. Building an [`Llm`] draws
//! nothing on the terminal unless asked ([`LlmBuilder::progress_bar`]). See
//! `gateway/examples/`.
//!
//! # Inside
//! Laid out by concept: `cli` (the commands), `server` (listeners and the HTTP
//! versions), `api` (the OpenAI and vLLM endpoints), `engines` (the coordinator
//! and the links to engine ranks), `metrics`, `webui` (the chat page at `/`),
//! `embed` and `error` (the surface above), and `bench` (the benchmark client, which uses nothing of the gateway).

// What an application embeds is re-exported below; the rest is the gateway's
// own and stays inside the crate.
pub(crate) mod api;
pub(crate) mod bench;
pub(crate) mod cli;
pub(crate) mod embed;
pub(crate) mod engines;
pub(crate) mod membership;
mod error;
pub(crate) mod metrics;
pub(crate) mod otel;
pub mod server;
pub(crate) mod webui;

pub use api::generation::{ChoiceDelta, Finish};
/// The `ferry` binary's entry point (not part of the embedding surface).
#[doc(hidden)]
pub use cli::command::main as run_cli;
pub use embed::{Completion, Llm, LlmBuilder, Prompt, Server, Stream, TextParams};
pub use error::{Error, ErrorKind};
pub use ferry_engine::EngineArgs;
pub use ferry_transport::SamplingParams;
