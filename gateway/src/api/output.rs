//! A chat generation's output as typed events: what every chat-like API
//! renders its wire format from (chat completions' chunks and response, the
//! Responses API's events and response object, and the Anthropic Messages
//! API's next). No API reads another's JSON or event stream.
//!
//! Streamed, [`ChatGeneration::next`] gives [`ChatStep`]s: for one choice, the
//! content and tool-call pieces its tool-call parser ([`ToolStream`]) lets out,
//! its logprobs, and its finish. Not streamed, [`ChatGeneration::collect`]
//! gives each choice whole ([`ChatChoiceOutput`]), its calls read from its
//! whole text, through the one collect of every API ([`Generation::collect`]).

use ferry_transport::TokenLogprob;

use super::errors::ApiError;
use super::generation::{Finish, Generation};
use super::tools::stream::{Piece, ToolStream};
use super::tools::{read_output, ToolCall, ToolMode};
use super::types::Usage;

/// What one engine output added to one chat choice.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ChatStep {
    pub index: u32,
    /// Content and tool-call pieces, in order (none while text is held back
    /// for the tool-call parser).
    pub pieces: Vec<Piece>,
    /// One per token counted, when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// On the choice's last step; the reason is "tool_calls" when calls were read.
    pub finish: Option<Finish>,
}

/// One chat choice, whole.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ChatChoiceOutput {
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub logprobs: Vec<TokenLogprob>,
    /// None if the generation ended before the choice did; the reason is
    /// "tool_calls" when calls were read.
    pub finish: Option<Finish>,
}

/// A chat request's generation running: the engines' deltas read, choice by
/// choice, through the request's tool-call parsing.
pub(crate) struct ChatGeneration {
    gen: Generation,
    mode: ToolMode,
    /// Per choice: what of its text may be tool calls.
    tools: Vec<ToolStream>,
}

impl ChatGeneration {
    pub(crate) fn new(gen: Generation, mode: ToolMode) -> Self {
        let tools = (0..gen.num_choices()).map(|_| ToolStream::new(mode.clone())).collect();
        ChatGeneration { gen, mode, tools }
    }

    /// The generation underneath: its counts, prompt logprobs and tokenizer.
    pub(crate) fn generation(&self) -> &Generation {
        &self.gen
    }

    /// How tool calls are read out of the text.
    pub(crate) fn tool_mode(&self) -> &ToolMode {
        &self.mode
    }

    /// Tokens so far over every prompt and choice.
    pub(crate) fn usage(&self) -> Usage {
        Usage::new(self.gen.prompt_lens().iter().sum(), self.gen.total_completion_tokens()).with_cached(self.gen.cached_tokens())
    }

    /// The next step of some choice; `None` once every choice has finished.
    /// An error ends the generation.
    pub(crate) async fn next(&mut self) -> Option<Result<ChatStep, ApiError>> {
        let d = match self.gen.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        let tools = &mut self.tools[d.index as usize];
        let mut pieces = tools.push(&d.text);
        let finish = d.finish.map(|f| {
            let (rest, reason) = tools.finish(f.reason);
            pieces.extend(rest);
            Finish { reason, ..f }
        });
        Some(Ok(ChatStep { index: d.index, pieces, logprobs: d.logprobs, finish }))
    }

    /// Every choice whole, read to the end of the generation.
    pub(crate) async fn collect(&mut self) -> Result<Vec<ChatChoiceOutput>, ApiError> {
        let outputs = self.gen.collect().await?;
        Ok(outputs
            .into_iter()
            .map(|o| {
                let reason = o.finish.as_ref().map_or("stop", |f| f.reason);
                let (content, tool_calls, reason) = read_output(&self.mode, o.text, reason);
                ChatChoiceOutput { content, tool_calls, logprobs: o.logprobs, finish: o.finish.map(|f| Finish { reason, ..f }) }
            })
            .collect())
    }
}
