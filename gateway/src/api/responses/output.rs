//! Chat completions output as Responses API output: the response object, and
//! the typed stream events translated from chat chunks. Sans-IO.

use serde_json::{json, Value};

/// What every response object of one request repeats from the request.
pub struct Echo {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub request: Value,
}

impl Echo {
    /// The response object around `output`; `status` "in_progress",
    /// "completed" or "incomplete".
    pub fn response(&self, status: &str, output: Vec<Value>, usage: Option<Value>, incomplete: bool) -> Value {
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

/// Chat's usage object as the Responses API's.
pub fn usage(chat_usage: &Value) -> Option<Value> {
    if !chat_usage.is_object() {
        return None;
    }
    let n = |k: &str| chat_usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    let cached = chat_usage.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_u64).unwrap_or(0);
    Some(json!({
        "input_tokens": n("prompt_tokens"),
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": n("completion_tokens"),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": n("total_tokens"),
    }))
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

/// A whole chat completion (choice 0) as the response object.
pub fn from_chat(echo: &Echo, chat: &Value, new_id: &mut dyn FnMut(&str) -> String) -> Value {
    let choice = &chat["choices"][0];
    let msg = &choice["message"];
    let text = msg["content"].as_str().unwrap_or("");
    let calls = msg["tool_calls"].as_array().cloned().unwrap_or_default();
    let mut output = Vec::new();
    if !text.is_empty() || calls.is_empty() {
        output.push(message_item(&new_id("msg"), text, "completed"));
    }
    for c in &calls {
        let f = &c["function"];
        output.push(call_item(
            &new_id("fc"),
            c["id"].as_str().unwrap_or(""),
            f["name"].as_str().unwrap_or(""),
            f["arguments"].as_str().unwrap_or(""),
            "completed",
        ));
    }
    let incomplete = choice["finish_reason"] == "length";
    echo.response(if incomplete { "incomplete" } else { "completed" }, output, usage(&chat["usage"]), incomplete)
}

/// One output item being streamed.
enum Item {
    Text { id: String, text: String },
    Call { id: String, call_id: String, name: String, arguments: String },
}

/// Turns chat chunks (choice 0) into Responses stream events, in the order
/// OpenAI sends them: created, in_progress; per item added, its deltas, its
/// done events; completed.
pub struct StreamTranslator {
    echo: Echo,
    seq: u64,
    items: Vec<Item>,
    /// Output index of the chat tool call with this index.
    calls: Vec<(u64, usize)>,
    text_at: Option<usize>,
    finish: Option<String>,
    usage: Option<Value>,
}

/// (event type, event JSON).
pub type Event = (String, Value);

impl StreamTranslator {
    pub fn new(echo: Echo) -> Self {
        StreamTranslator { echo, seq: 0, items: Vec::new(), calls: Vec::new(), text_at: None, finish: None, usage: None }
    }

    fn event(&mut self, ty: &str, mut body: Value) -> Event {
        body["type"] = ty.into();
        body["sequence_number"] = self.seq.into();
        self.seq += 1;
        (ty.to_string(), body)
    }

    /// The events that open the stream.
    pub fn start(&mut self) -> Vec<Event> {
        let r = self.echo.response("in_progress", vec![], None, false);
        vec![self.event("response.created", json!({"response": r.clone()})), self.event("response.in_progress", json!({"response": r}))]
    }

    /// The events for one chat chunk.
    pub fn chunk(&mut self, chunk: &Value, new_id: &mut dyn FnMut(&str) -> String) -> Vec<Event> {
        let mut out = Vec::new();
        if chunk.get("usage").is_some_and(Value::is_object) {
            self.usage = usage(&chunk["usage"]);
        }
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.iter().find(|c| c["index"] == 0)) else {
            return out;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
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
        for tc in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = tc["index"].as_u64().unwrap_or(0);
            let at = match self.calls.iter().find(|(i, _)| *i == index) {
                Some(&(_, at)) => at,
                None => {
                    let id = new_id("fc");
                    let at = self.items.len();
                    let call_id = tc["id"].as_str().unwrap_or("").to_string();
                    let name = tc["function"]["name"].as_str().unwrap_or("").to_string();
                    out.push(self.event("response.output_item.added", json!({"output_index": at, "item": call_item(&id, &call_id, &name, "", "in_progress")})));
                    self.items.push(Item::Call { id, call_id, name, arguments: String::new() });
                    self.calls.push((index, at));
                    at
                }
            };
            if let Some(args) = tc["function"]["arguments"].as_str().filter(|a| !a.is_empty()) {
                if let Item::Call { id, arguments, .. } = &mut self.items[at] {
                    arguments.push_str(args);
                    let id = id.clone();
                    out.push(self.event("response.function_call_arguments.delta", json!({"item_id": id, "output_index": at, "delta": args})));
                }
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
        out
    }

    /// The events that close every item and the response.
    pub fn finish(&mut self, new_id: &mut dyn FnMut(&str) -> String) -> Vec<Event> {
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
        let incomplete = self.finish.as_deref() == Some("length");
        let r = self.echo.response(if incomplete { "incomplete" } else { "completed" }, done_items, self.usage.clone(), incomplete);
        out.push(self.event("response.completed", json!({"response": r})));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_text_stream_in_openais_order() {
        let mut t = StreamTranslator::new(echo());
        let mut id = ids();
        let mut ev = t.start();
        ev.extend(t.chunk(&json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}), &mut id));
        ev.extend(t.chunk(&json!({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}), &mut id));
        ev.extend(t.chunk(&json!({"choices": [{"index": 0, "delta": {"content": "lo"}}]}), &mut id));
        ev.extend(t.chunk(&json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), &mut id));
        ev.extend(t.chunk(&json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}), &mut id));
        ev.extend(t.finish(&mut id));
        let types: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(types, [
            "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
            "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done", "response.completed",
        ]);
        assert!(ev.iter().enumerate().all(|(i, e)| e.1["sequence_number"] == i as u64));
        let done = &ev.last().unwrap().1["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["usage"]["input_tokens"], 3);
        assert_eq!(done["temperature"], 0);
    }

    #[test]
    fn tool_calls_stream_as_function_call_items() {
        let mut t = StreamTranslator::new(echo());
        let mut id = ids();
        let _ = t.start();
        let c1 = json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]});
        let c2 = json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":"}}]}}]});
        let c3 = json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, "finish_reason": "tool_calls"}]});
        let mut ev = Vec::new();
        for c in [c1, c2, c3] {
            ev.extend(t.chunk(&c, &mut id));
        }
        ev.extend(t.finish(&mut id));
        let done = &ev.last().unwrap().1["response"]["output"][0];
        assert_eq!(done["type"], "function_call");
        assert_eq!(done["call_id"], "call_a");
        assert_eq!(done["arguments"], "{\"x\":1}");
        assert_eq!(ev.iter().filter(|e| e.0 == "response.function_call_arguments.delta").count(), 2);
    }

    #[test]
    fn a_whole_chat_completion_as_a_response() {
        let chat = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "tool_calls": []}, "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2}}});
        let r = from_chat(&echo(), &chat, &mut ids());
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(r["output"][0]["content"][0]["text"], "Hi");
        assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], 2);
    }
}
