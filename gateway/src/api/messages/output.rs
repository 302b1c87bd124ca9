//! A chat generation's typed output (`api::output`) as Anthropic's: the
//! message from the whole choice, and the stream's events from its steps.
//! Sans-IO, and no chat JSON in between.
//!
//! The stop reason: a stop sequence that matched is `stop_sequence` (and is
//! named); tool calls read from the output are `tool_use`; `length` is
//! `max_tokens`, or `model_context_window_exceeded` when `max_tokens` was cut
//! to the room the context left; any other end is `end_turn`.

use serde_json::Value;

use super::types::{BlockDelta, MessageDeltaBody, MessageResponse, MessageUsage, OutputBlock, StreamEvent};
use crate::api::generation::Finish;
use crate::api::output::{ChatChoiceOutput, ChatStep};
use crate::api::tools::stream::Piece;
use crate::api::types::{StopReason, Usage};

/// What every rendering of one request's message repeats.
pub(super) struct Head {
    pub id: String,
    pub model: String,
    /// `max_tokens` was cut to the room the context left.
    pub capped: bool,
}

impl Head {
    fn message(&self, content: Vec<OutputBlock>, stop: Option<(&'static str, Option<String>)>, usage: MessageUsage) -> MessageResponse {
        let (stop_reason, stop_sequence) = stop.map_or((None, None), |(r, s)| (Some(r), s));
        MessageResponse { id: self.id.clone(), kind: "message", role: "assistant", model: self.model.clone(), content, stop_reason, stop_sequence, usage }
    }
}

/// Token counts as Anthropic's usage.
pub(super) fn usage(u: &Usage) -> MessageUsage {
    MessageUsage { input_tokens: u.prompt_tokens, output_tokens: u.completion_tokens }
}

/// Anthropic's stop reason (and the stop sequence that matched) for a finish.
pub(super) fn stop_reason(finish: Option<&Finish>, called: bool, capped: bool) -> (&'static str, Option<String>) {
    match finish {
        Some(Finish { stop_reason: Some(StopReason::Text(s)), .. }) => ("stop_sequence", Some(s.clone())),
        Some(Finish { reason: "tool_calls", .. }) => ("tool_use", None),
        Some(Finish { reason: "length", .. }) if capped => ("model_context_window_exceeded", None),
        Some(Finish { reason: "length", .. }) => ("max_tokens", None),
        // A named tool choice keeps chat's "stop"; Anthropic says tool_use.
        _ if called => ("tool_use", None),
        _ => ("end_turn", None),
    }
}

/// A call's arguments as the block's `input`: the JSON they hold, or an empty
/// object when they do not parse (cut by `max_tokens`, which the stop reason says).
fn input(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| Value::Object(serde_json::Map::new()))
}

/// A whole chat choice (choice 0) as the message: its text (an empty text
/// block when it said nothing at all), then its calls.
pub(super) fn message(head: &Head, choice: &ChatChoiceOutput, u: &Usage, new_tool_id: &mut dyn FnMut() -> String) -> MessageResponse {
    let mut content = Vec::with_capacity(1 + choice.tool_calls.len());
    if !choice.content.is_empty() || choice.tool_calls.is_empty() {
        content.push(OutputBlock::Text { text: choice.content.clone() });
    }
    for c in &choice.tool_calls {
        content.push(OutputBlock::ToolUse { id: new_tool_id(), name: c.name.clone(), input: input(&c.arguments) });
    }
    let stop = stop_reason(choice.finish.as_ref(), !choice.tool_calls.is_empty(), head.capped);
    head.message(content, Some(stop), usage(u))
}

/// The block open in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    Text,
    /// The tool call with this index among the choice's calls.
    Call(usize),
}

/// Renders the steps of choice 0 as Anthropic's stream events, in
/// Anthropic's order: message_start; per block content_block_start (the
/// first followed by a ping), its deltas, content_block_stop; then
/// message_delta with the stop reason and the usage, and message_stop.
pub(super) struct StreamRenderer {
    head: Head,
    /// Blocks opened so far; the open one is the last.
    blocks: usize,
    open: Option<Open>,
    called: bool,
    finish: Option<Finish>,
}

impl StreamRenderer {
    pub(super) fn new(head: Head) -> Self {
        StreamRenderer { head, blocks: 0, open: None, called: false, finish: None }
    }

    /// The event that opens the stream: the empty message, its prompt counted.
    pub(super) fn start(&self, prompt_tokens: u32) -> StreamEvent {
        let usage = MessageUsage { input_tokens: prompt_tokens, output_tokens: 0 };
        StreamEvent::MessageStart { message: self.head.message(Vec::new(), None, usage) }
    }

    /// Closes the open block, if any, and opens `block`.
    fn open(&mut self, open: Open, block: OutputBlock, out: &mut Vec<StreamEvent>) {
        self.close(out);
        out.push(StreamEvent::ContentBlockStart { index: self.blocks, content_block: block });
        if self.blocks == 0 {
            out.push(StreamEvent::Ping);
        }
        self.blocks += 1;
        self.open = Some(open);
    }

    fn close(&mut self, out: &mut Vec<StreamEvent>) {
        if self.open.take().is_some() {
            out.push(StreamEvent::ContentBlockStop { index: self.blocks - 1 });
        }
    }

    /// The events for one step (of choice 0; a Messages request has one).
    pub(super) fn step(&mut self, step: ChatStep, new_tool_id: &mut dyn FnMut() -> String) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if step.index != 0 {
            return out;
        }
        for piece in step.pieces {
            match piece {
                Piece::Content(text) if text.is_empty() => {}
                Piece::Content(text) => {
                    if self.open != Some(Open::Text) {
                        self.open(Open::Text, OutputBlock::Text { text: String::new() }, &mut out);
                    }
                    out.push(StreamEvent::ContentBlockDelta { index: self.blocks - 1, delta: BlockDelta::TextDelta { text } });
                }
                Piece::ToolCalls(calls) => {
                    for c in calls {
                        if self.open != Some(Open::Call(c.index)) {
                            let name = c.head.map(|h| h.name).unwrap_or_default();
                            let block = OutputBlock::ToolUse { id: new_tool_id(), name, input: Value::Object(serde_json::Map::new()) };
                            self.open(Open::Call(c.index), block, &mut out);
                            self.called = true;
                        }
                        if !c.arguments.is_empty() {
                            let delta = BlockDelta::InputJsonDelta { partial_json: c.arguments };
                            out.push(StreamEvent::ContentBlockDelta { index: self.blocks - 1, delta });
                        }
                    }
                }
            }
        }
        if step.finish.is_some() {
            self.finish = step.finish;
        }
        out
    }

    /// The events that close the last block and the message, with its stop
    /// reason and usage. A message that said nothing still has its (empty)
    /// text block, as the message answered whole has.
    pub(super) fn finish(&mut self, u: &Usage) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.blocks == 0 {
            self.open(Open::Text, OutputBlock::Text { text: String::new() }, &mut out);
        }
        self.close(&mut out);
        let (stop_reason, stop_sequence) = stop_reason(self.finish.as_ref(), self.called, self.head.capped);
        out.push(StreamEvent::MessageDelta { delta: MessageDeltaBody { stop_reason, stop_sequence }, usage: usage(u) });
        out.push(StreamEvent::MessageStop);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tools::{ToolCall, ToolCallDelta, ToolCallHead};
    use serde_json::json;

    fn head(capped: bool) -> Head {
        Head { id: "msg_1".into(), model: "m".into(), capped }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("toolu_{n}")
        }
    }

    fn finish(reason: &'static str, stop: Option<StopReason>) -> Finish {
        Finish { reason, stop_reason: stop }
    }

    fn step(pieces: Vec<Piece>, f: Option<Finish>) -> ChatStep {
        ChatStep { index: 0, pieces, logprobs: vec![], finish: f }
    }

    fn text(t: &str) -> Piece {
        Piece::Content(t.into())
    }

    fn names(ev: &[StreamEvent]) -> Vec<&'static str> {
        ev.iter().map(StreamEvent::name).collect()
    }

    #[test]
    fn stop_reasons() {
        let sr = |f: Option<Finish>, called, capped| stop_reason(f.as_ref(), called, capped);
        assert_eq!(sr(Some(finish("stop", None)), false, false), ("end_turn", None));
        assert_eq!(sr(Some(finish("stop", Some(StopReason::Token(7)))), false, false), ("end_turn", None));
        assert_eq!(sr(Some(finish("stop", Some(StopReason::Text("END".into())))), false, false), ("stop_sequence", Some("END".into())));
        assert_eq!(sr(Some(finish("length", None)), false, false), ("max_tokens", None));
        assert_eq!(sr(Some(finish("length", None)), false, true), ("model_context_window_exceeded", None));
        assert_eq!(sr(Some(finish("tool_calls", None)), true, false), ("tool_use", None));
        assert_eq!(sr(Some(finish("stop", None)), true, false), ("tool_use", None), "a named choice finishes with stop");
        assert_eq!(sr(Some(finish("length", None)), true, false), ("max_tokens", None));
        assert_eq!(sr(None, false, false), ("end_turn", None));
    }

    #[test]
    fn a_text_stream_in_anthropics_order() {
        let mut r = StreamRenderer::new(head(false));
        let mut id = ids();
        let mut ev = vec![r.start(9)];
        ev.extend(r.step(step(vec![text("Hel")], None), &mut id));
        ev.extend(r.step(step(vec![], None), &mut id)); // text held back: nothing
        ev.extend(r.step(step(vec![text("lo")], Some(finish("stop", Some(StopReason::Text("\n\n".into()))))), &mut id));
        ev.extend(r.finish(&Usage::new(9, 3)));
        assert_eq!(names(&ev), [
            "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
            "content_block_stop", "message_delta", "message_stop",
        ]);
        let v: Vec<Value> = ev.iter().map(|e| serde_json::to_value(e).unwrap()).collect();
        assert_eq!(v[0]["message"], json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 9, "output_tokens": 0}}));
        assert_eq!(v[1], json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}));
        assert_eq!(v[3], json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}));
        assert_eq!(v[6], json!({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "\n\n"},
            "usage": {"input_tokens": 9, "output_tokens": 3}}));
    }

    #[test]
    fn tool_calls_stream_as_tool_use_blocks() {
        let mut r = StreamRenderer::new(head(false));
        let mut id = ids();
        let call = |index, head: Option<&str>, arguments: &str| ToolCallDelta {
            index,
            head: head.map(|n| ToolCallHead { id: "chatcmpl-tool-x".into(), name: n.into() }),
            arguments: arguments.into(),
        };
        let mut ev = r.step(step(vec![text("Sure. "), Piece::ToolCalls(vec![call(0, Some("f"), "")])], None), &mut id);
        ev.extend(r.step(step(vec![Piece::ToolCalls(vec![call(0, None, "{\"x\":")])], None), &mut id));
        ev.extend(r.step(step(vec![Piece::ToolCalls(vec![call(0, None, "1}"), call(1, Some("g"), "{}")])], Some(finish("stop", None))), &mut id));
        ev.extend(r.finish(&Usage::new(1, 5)));
        assert_eq!(names(&ev), [
            "content_block_start", "ping", "content_block_delta", "content_block_stop",
            "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
            "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop",
        ]);
        let v: Vec<Value> = ev.iter().map(|e| serde_json::to_value(e).unwrap()).collect();
        assert_eq!(v[4], json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}));
        assert_eq!(v[6]["delta"], json!({"type": "input_json_delta", "partial_json": "1}"}));
        assert_eq!((v[8]["index"].clone(), v[8]["content_block"]["name"].clone()), (json!(2), json!("g")));
        assert_eq!(v[11]["delta"]["stop_reason"], "tool_use");
    }

    #[test]
    fn an_empty_answer_still_has_its_text_block() {
        let mut r = StreamRenderer::new(head(true));
        let mut ev = r.step(step(vec![], Some(finish("length", None))), &mut ids());
        ev.extend(r.finish(&Usage::new(1, 0)));
        assert_eq!(names(&ev), ["content_block_start", "ping", "content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(serde_json::to_value(&ev[3]).unwrap()["delta"]["stop_reason"], "model_context_window_exceeded");
    }

    #[test]
    fn a_whole_choice_as_a_message() {
        let choice = ChatChoiceOutput {
            content: "Hi".into(),
            tool_calls: vec![
                ToolCall { id: "chatcmpl-tool-1".into(), name: "g".into(), arguments: "{\"a\": [1]}".into() },
                ToolCall { id: "chatcmpl-tool-2".into(), name: "h".into(), arguments: "{\"cut".into() },
            ],
            logprobs: vec![],
            finish: Some(finish("tool_calls", None)),
        };
        let m = serde_json::to_value(message(&head(false), &choice, &Usage::new(4, 2), &mut ids())).unwrap();
        assert_eq!(m, json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": "Hi"},
                        {"type": "tool_use", "id": "toolu_1", "name": "g", "input": {"a": [1]}},
                        {"type": "tool_use", "id": "toolu_2", "name": "h", "input": {}}],
            "stop_reason": "tool_use", "stop_sequence": null, "usage": {"input_tokens": 4, "output_tokens": 2}}));
        let calls_only = ChatChoiceOutput { content: String::new(), tool_calls: choice.tool_calls[..1].to_vec(), ..choice.clone() };
        let m = message(&head(false), &calls_only, &Usage::new(4, 2), &mut ids());
        assert_eq!(m.content.len(), 1, "no empty text beside calls");
        let silent = ChatChoiceOutput { content: String::new(), tool_calls: vec![], finish: Some(finish("stop", None)), ..choice };
        let m = message(&head(false), &silent, &Usage::new(4, 1), &mut ids());
        assert_eq!((m.content, m.stop_reason), (vec![OutputBlock::Text { text: String::new() }], Some("end_turn")));
    }
}
