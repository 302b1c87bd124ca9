//! The Responses API's output rendered from a chat generation's typed
//! output (`api::output`): the response object from the whole choice, and
//! the stream's events from its steps. Sans-IO, and no chat JSON in between.

use serde_json::{json, Value};

use crate::api::output::{ChatChoiceOutput, ChatStep};
use crate::api::tools::stream::Piece;
use crate::api::types::Usage;

/// What every response object of one request repeats from the request.
pub(super) struct Echo {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub request: Value,
}

impl Echo {
    /// The response object around `output`; `status` "in_progress",
    /// "completed" or "incomplete".
    pub(super) fn response(&self, status: &str, output: Vec<Value>, usage: Option<Value>, incomplete: bool) -> Value {
        let r = &self.request;
        let get = |k: &str, default: Value| r.get(k).filter(|v| !v.is_null()).cloned().unwrap_or(default);
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": get("instructions", Value::Null),
            "max_output_tokens": get("max_output_tokens", Value::Null),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": get("parallel_tool_calls", json!(true)),
            "previous_response_id": null,
            "reasoning": null,
            "store": false,
            "temperature": get("temperature", json!(1.0)),
            "text": get("text", json!({"format": {"type": "text"}})),
            "tool_choice": get("tool_choice", json!("auto")),
            "tools": get("tools", json!([])),
            "top_p": get("top_p", json!(1.0)),
            "truncation": "disabled",
            "usage": usage,
            "user": get("user", Value::Null),
            "metadata": get("metadata", json!({})),
        })
    }
}

/// Token counts as the Responses API's usage object.
pub(super) fn usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "in_progress" { json!([]) } else { json!([text_part(text)]) };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": status})
}

/// A whole chat choice (choice 0) as the response object.
pub(super) fn response(echo: &Echo, choice: &ChatChoiceOutput, u: &Usage, new_id: &mut dyn FnMut(&str) -> String) -> Value {
    let mut output = Vec::new();
    if !choice.content.is_empty() || choice.tool_calls.is_empty() {
        output.push(message_item(&new_id("msg"), &choice.content, "completed"));
    }
    for c in &choice.tool_calls {
        output.push(call_item(&new_id("fc"), &c.id, &c.name, &c.arguments, "completed"));
    }
    let incomplete = choice.finish.as_ref().is_some_and(|f| f.reason == "length");
    echo.response(if incomplete { "incomplete" } else { "completed" }, output, Some(usage(u)), incomplete)
}

/// One output item being streamed.
enum Item {
    Text { id: String, text: String },
    Call { id: String, call_id: String, name: String, arguments: String },
}

/// Renders the steps of choice 0 as Responses stream events, in the order
/// OpenAI sends them: created, in_progress; per item added, its deltas, its
/// done events; completed.
pub(super) struct StreamRenderer {
    echo: Echo,
    seq: u64,
    items: Vec<Item>,
    /// Output index of the tool call with this index.
    calls: Vec<(usize, usize)>,
    text_at: Option<usize>,
    finish: Option<&'static str>,
}

/// (event type, event JSON).
pub(super) type Event = (String, Value);

impl StreamRenderer {
    pub(super) fn new(echo: Echo) -> Self {
        StreamRenderer { echo, seq: 0, items: Vec::new(), calls: Vec::new(), text_at: None, finish: None }
    }

    fn event(&mut self, ty: &str, mut body: Value) -> Event {
        body["type"] = ty.into();
        body["sequence_number"] = self.seq.into();
        self.seq += 1;
        (ty.to_string(), body)
    }

    /// The events that open the stream.
    pub(super) fn start(&mut self) -> Vec<Event> {
        let r = self.echo.response("in_progress", vec![], None, false);
        vec![self.event("response.created", json!({"response": r.clone()})), self.event("response.in_progress", json!({"response": r}))]
    }

    /// The events for one step (of choice 0; a Responses request has one).
    pub(super) fn step(&mut self, step: ChatStep, new_id: &mut dyn FnMut(&str) -> String) -> Vec<Event> {
        let mut out = Vec::new();
        if step.index != 0 {
            return out;
        }
        for piece in step.pieces {
            match piece {
                Piece::Content(text) => self.text(&text, new_id, &mut out),
                Piece::ToolCalls(calls) => {
                    for c in calls {
                        let at = match self.calls.iter().find(|(i, _)| *i == c.index) {
                            Some(&(_, at)) => at,
                            None => {
                                let id = new_id("fc");
                                let at = self.items.len();
                                let (call_id, name) = c.head.map(|h| (h.id, h.name)).unwrap_or_default();
                                out.push(self.event("response.output_item.added", json!({"output_index": at, "item": call_item(&id, &call_id, &name, "", "in_progress")})));
                                self.items.push(Item::Call { id, call_id, name, arguments: String::new() });
                                self.calls.push((c.index, at));
                                at
                            }
                        };
                        if c.arguments.is_empty() {
                            continue;
                        }
                        if let Item::Call { id, arguments, .. } = &mut self.items[at] {
                            arguments.push_str(&c.arguments);
                            let id = id.clone();
                            out.push(self.event("response.function_call_arguments.delta", json!({"item_id": id, "output_index": at, "delta": c.arguments})));
                        }
                    }
                }
            }
        }
        if let Some(f) = step.finish {
            self.finish = Some(f.reason);
        }
        out
    }

    /// A text delta: the message item (and its part) opened first if need be.
    fn text(&mut self, text: &str, new_id: &mut dyn FnMut(&str) -> String, out: &mut Vec<Event>) {
        if text.is_empty() {
            return;
        }
        let at = match self.text_at {
            Some(at) => at,
            None => {
                let id = new_id("msg");
                let at = self.items.len();
                out.push(self.event("response.output_item.added", json!({"output_index": at, "item": message_item(&id, "", "in_progress")})));
                out.push(self.event(
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": at, "content_index": 0, "part": text_part("")}),
                ));
                self.items.push(Item::Text { id, text: String::new() });
                self.text_at = Some(at);
                at
            }
        };
        if let Item::Text { id, text: all } = &mut self.items[at] {
            all.push_str(text);
            let id = id.clone();
            out.push(self.event(
                "response.output_text.delta",
                json!({"item_id": id, "output_index": at, "content_index": 0, "delta": text, "logprobs": []}),
            ));
        }
    }

    /// The events that close every item and the response, with its usage.
    pub(super) fn finish(&mut self, u: &Usage, new_id: &mut dyn FnMut(&str) -> String) -> Vec<Event> {
        let mut out = Vec::new();
        if self.items.is_empty() {
            // Nothing was said: still one (empty) message, as the non-streamed form has.
            let id = new_id("msg");
            out.push(self.event("response.output_item.added", json!({"output_index": 0, "item": message_item(&id, "", "in_progress")})));
            out.push(self.event("response.content_part.added", json!({"item_id": id, "output_index": 0, "content_index": 0, "part": text_part("")})));
            self.items.push(Item::Text { id, text: String::new() });
        }
        let mut done_items = Vec::new();
        let items = std::mem::take(&mut self.items);
        for (at, item) in items.iter().enumerate() {
            match item {
                Item::Text { id, text } => {
                    out.push(self.event("response.output_text.done", json!({"item_id": id, "output_index": at, "content_index": 0, "text": text, "logprobs": []})));
                    out.push(self.event("response.content_part.done", json!({"item_id": id, "output_index": at, "content_index": 0, "part": text_part(text)})));
                    let done = message_item(id, text, "completed");
                    out.push(self.event("response.output_item.done", json!({"output_index": at, "item": done.clone()})));
                    done_items.push(done);
                }
                Item::Call { id, call_id, name, arguments } => {
                    out.push(self.event("response.function_call_arguments.done", json!({"item_id": id, "output_index": at, "arguments": arguments, "name": name})));
                    let done = call_item(id, call_id, name, arguments, "completed");
                    out.push(self.event("response.output_item.done", json!({"output_index": at, "item": done.clone()})));
                    done_items.push(done);
                }
            }
        }
        let incomplete = self.finish == Some("length");
        let r = self.echo.response(if incomplete { "incomplete" } else { "completed" }, done_items, Some(usage(u)), incomplete);
        out.push(self.event("response.completed", json!({"response": r})));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::generation::Finish;
    use crate::api::tools::{ToolCall, ToolCallDelta, ToolCallHead};

    fn echo() -> Echo {
        Echo { id: "resp_1".into(), created_at: 7, model: "m".into(), request: json!({"input": "hi", "temperature": 0}) }
    }

    fn ids() -> impl FnMut(&str) -> String {
        let mut n = 0;
        move |p: &str| {
            n += 1;
            format!("{p}_{n}")
        }
    }

    fn step(pieces: Vec<Piece>, finish: Option<&'static str>) -> ChatStep {
        ChatStep { index: 0, pieces, logprobs: vec![], finish: finish.map(|reason| Finish { reason, stop_reason: None }) }
    }

    fn text(t: &str) -> Piece {
        Piece::Content(t.into())
    }

    /// The stream is rendered from typed steps: no chat chunk, no SSE, is read.
    #[test]
    fn a_text_stream_in_openais_order() {
        let mut t = StreamRenderer::new(echo());
        let mut id = ids();
        let mut ev = t.start();
        ev.extend(t.step(step(vec![text("Hel")], None), &mut id));
        ev.extend(t.step(step(vec![], None), &mut id)); // text held back: nothing
        ev.extend(t.step(step(vec![text("lo")], Some("stop")), &mut id));
        ev.extend(t.finish(&Usage::new(3, 2), &mut id));
        let types: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(types, [
            "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
            "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done", "response.completed",
        ]);
        assert!(ev.iter().enumerate().all(|(i, e)| e.1["sequence_number"] == i as u64 && e.1["type"] == e.0));
        assert_eq!(ev[4].1["delta"], "Hel");
        assert_eq!(ev[4].1["item_id"], ev[2].1["item"]["id"]);
        let done = &ev.last().unwrap().1["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["usage"]["input_tokens"], 3);
        assert_eq!(done["usage"]["total_tokens"], 5);
        assert_eq!(done["temperature"], 0);
    }

    #[test]
    fn tool_calls_stream_as_function_call_items() {
        let mut t = StreamRenderer::new(echo());
        let mut id = ids();
        let _ = t.start();
        let head = Some(ToolCallHead { id: "call_a".into(), name: "f".into() });
        let piece = |head, arguments: &str| Piece::ToolCalls(vec![ToolCallDelta { index: 0, head, arguments: arguments.into() }]);
        let mut ev = Vec::new();
        ev.extend(t.step(step(vec![text("Sure. "), piece(head, "")], None), &mut id));
        ev.extend(t.step(step(vec![piece(None, "{\"x\":")], None), &mut id));
        ev.extend(t.step(step(vec![piece(None, "1}")], Some("tool_calls")), &mut id));
        ev.extend(t.finish(&Usage::new(1, 1), &mut id));
        let types: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(types, [
            "response.output_item.added", "response.content_part.added", "response.output_text.delta",
            "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.delta",
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.function_call_arguments.done", "response.output_item.done", "response.completed",
        ]);
        let done = &ev.last().unwrap().1["response"]["output"];
        assert_eq!(done[0]["content"][0]["text"], "Sure. ");
        assert_eq!(done[1]["type"], "function_call");
        assert_eq!(done[1]["call_id"], "call_a");
        assert_eq!(done[1]["arguments"], "{\"x\":1}");
        assert_eq!(ev.last().unwrap().1["response"]["status"], "completed");
    }

    #[test]
    fn an_empty_answer_still_has_its_message_and_length_is_incomplete() {
        let mut t = StreamRenderer::new(echo());
        let mut id = ids();
        let _ = t.start();
        let mut ev = t.step(step(vec![], Some("length")), &mut id);
        ev.extend(t.finish(&Usage::new(1, 0), &mut id));
        assert_eq!(ev[0].0, "response.output_item.added");
        let r = &ev.last().unwrap().1["response"];
        assert_eq!((r["status"].clone(), r["incomplete_details"]["reason"].clone()), (json!("incomplete"), json!("max_output_tokens")));
        assert_eq!(r["output"][0]["content"][0]["text"], "");
    }

    #[test]
    fn a_whole_choice_as_a_response() {
        let choice = ChatChoiceOutput {
            content: "Hi".into(),
            tool_calls: vec![ToolCall { id: "call_b".into(), name: "g".into(), arguments: "{}".into() }],
            logprobs: vec![],
            finish: Some(Finish { reason: "length", stop_reason: None }),
        };
        let r = response(&echo(), &choice, &Usage::new(4, 1).with_cached(2), &mut ids());
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(r["output"][0]["content"][0]["text"], "Hi");
        assert_eq!((r["output"][1]["call_id"].clone(), r["output"][1]["name"].clone()), (json!("call_b"), json!("g")));
        assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], 2);
        let calls_only = ChatChoiceOutput { content: String::new(), finish: Some(Finish { reason: "tool_calls", stop_reason: None }), ..choice };
        let r = response(&echo(), &calls_only, &Usage::new(4, 1), &mut ids());
        assert_eq!((r["status"].clone(), r["output"].as_array().unwrap().len()), (json!("completed"), 1), "no empty message beside calls");
    }
}
