//! Tool calls in a streamed chat: per choice, which text goes out as content
//! now, and which is held until the calls it holds can be sent as
//! `delta.tool_calls`.
//!
//! - named choice: every piece of text is the arguments, streamed as they come;
//! - required: the JSON array is held and sent as whole calls at the end;
//! - auto: content streams until the parser's start (a `<tool_call>` tag, or
//!   JSON at the very beginning) may have begun; from there the text is held
//!   and, at the end, sent as calls, or as content if it held none.

use super::{hermes, json as json_parser, read_output, ParserKind, ToolCallDelta, ToolCallHead, ToolMode};

/// What a choice's stream sends next.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Piece {
    Content(String),
    ToolCalls(Vec<ToolCallDelta>),
}

pub(crate) struct ToolStream {
    mode: ToolMode,
    /// Text held back, not sent yet.
    held: String,
    /// Auto mode: the parser's start was seen, so everything from here is held.
    holding: bool,
    /// Named mode: the call's id and name went out with its first piece.
    opened: bool,
}

impl ToolStream {
    pub(crate) fn new(mode: ToolMode) -> ToolStream {
        ToolStream { mode, held: String::new(), holding: false, opened: false }
    }

    /// The pieces to send for new text.
    pub(crate) fn push(&mut self, text: &str) -> Vec<Piece> {
        if text.is_empty() {
            return Vec::new();
        }
        match &self.mode {
            ToolMode::Off => vec![Piece::Content(text.to_string())],
            ToolMode::Named(name) => {
                let head = (!self.opened).then(|| ToolCallHead { id: super::super::new_response_id("chatcmpl-tool"), name: name.clone() });
                self.opened = true;
                vec![Piece::ToolCalls(vec![ToolCallDelta { index: 0, head, arguments: text.to_string() }])]
            }
            ToolMode::Required => {
                self.held.push_str(text);
                Vec::new()
            }
            ToolMode::Auto(parser) => {
                self.held.push_str(text);
                if self.holding {
                    return Vec::new();
                }
                let keep = match parser {
                    ParserKind::Hermes => match self.held.find(hermes::START) {
                        Some(at) => {
                            self.holding = true;
                            self.held.len() - at
                        }
                        None => hermes::partial_start(&self.held),
                    },
                    ParserKind::Json => {
                        // JSON calls are the whole output: decided by its start.
                        if json_parser::may_start(&self.held) {
                            self.holding = !self.held.trim_start().is_empty();
                            self.held.len()
                        } else {
                            0
                        }
                    }
                };
                let send: String = self.held.drain(..self.held.len() - keep).collect();
                if send.is_empty() {
                    Vec::new()
                } else {
                    vec![Piece::Content(send)]
                }
            }
        }
    }

    /// The pieces still held when the choice ends, and its finish reason.
    pub(crate) fn finish(&mut self, reason: &'static str) -> (Vec<Piece>, &'static str) {
        let held = std::mem::take(&mut self.held);
        match &self.mode {
            ToolMode::Off | ToolMode::Named(_) => (content(held), reason),
            mode => {
                let (text, calls, reason) = read_output(mode, held, reason);
                let mut pieces = content(text);
                if !calls.is_empty() {
                    pieces.push(Piece::ToolCalls(calls.into_iter().enumerate().map(|(i, c)| ToolCallDelta::whole(i, c)).collect()));
                }
                (pieces, reason)
            }
        }
    }
}

fn content(text: String) -> Vec<Piece> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![Piece::Content(text)]
    }
}
