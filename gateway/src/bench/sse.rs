//! Server-sent events: bytes in, OpenAI stream items out.
//!
//! One parser for every HTTP version: the transports only hand over body
//! chunks, which may split a line or an event anywhere (even inside a UTF-8
//! character). Field handling follows the WHATWG EventSource rules that
//! matter here: `data:` lines (one optional space after the colon) joined by
//! newlines, `event:` names, `:` comments, and an event ends at a blank line;
//! lines end with LF, CRLF or CR.

/// One complete SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` name, when the server gave one ("error" matters).
    pub event: Option<String>,
    pub data: String,
}

#[derive(Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    /// A CR ended the previous chunk: a LF at the start of the next one belongs to it.
    pending_cr: bool,
}

impl SseParser {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Feeds a body chunk; returns the events it completed.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let mut bytes = chunk;
        if self.pending_cr {
            self.pending_cr = false;
            if bytes.first() == Some(&b'\n') {
                bytes = &bytes[1..];
            }
        }
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                let line = String::from_utf8_lossy(&self.buf[start..i]).into_owned();
                if b == b'\r' {
                    if i + 1 < self.buf.len() {
                        if self.buf[i + 1] == b'\n' {
                            i += 1;
                        }
                    } else {
                        self.pending_cr = true;
                    }
                }
                self.line(&line, &mut out);
                start = i + 1;
            }
            i += 1;
        }
        self.buf.drain(..start);
        out
    }

    /// Ends the stream: a last event not followed by a blank line is still delivered.
    pub(crate) fn finish(&mut self) -> Option<SseEvent> {
        if !self.buf.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            let mut sink = Vec::new();
            self.line(&line, &mut sink);
            if let Some(e) = sink.pop() {
                return Some(e);
            }
        }
        self.dispatch()
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        self.data.take().map(|data| SseEvent { event, data })
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if let Some(e) = self.dispatch() {
                out.push(e);
            }
            return;
        }
        if line.starts_with(':') {
            return; // comment / keep-alive ping
        }
        let (field, value) = match line.find(':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = Some(value.to_string()),
            _ => {} // id, retry and unknown fields do not matter to a benchmark
        }
    }
}

/// Token counts a server reports in `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

/// What one SSE event means for an OpenAI streaming response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StreamItem {
    /// `data: [DONE]`.
    Done,
    /// A JSON chunk: `content` is the new text (None when the chunk carries none,
    /// like a chat role-only delta or a usage-only chunk).
    Chunk { content: Option<String>, usage: Option<Usage>, has_choices: bool },
    /// The server reported an error inside the stream.
    ServerError(String),
    /// The data was not valid JSON.
    BadJson(String),
}

/// Interprets one event of a completions or chat-completions stream.
pub(crate) fn interpret(ev: &SseEvent) -> StreamItem {
    let data = ev.data.trim();
    if data == "[DONE]" {
        return StreamItem::Done;
    }
    let v: serde_json::Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => {
            return StreamItem::BadJson(format!("{e}: {}", truncate(data, 200)));
        }
    };
    if let Some(err) = v.get("error") {
        let msg = err
            .get("message")
            .and_then(|m| m.as_str()).map_or_else(|| err.to_string(), str::to_string);
        return StreamItem::ServerError(msg);
    }
    if ev.event.as_deref() == Some("error") {
        return StreamItem::ServerError(truncate(data, 300));
    }
    let usage = v.get("usage").filter(|u| u.is_object()).map(|u| Usage {
        prompt_tokens: u.get("prompt_tokens").and_then(serde_json::Value::as_u64),
        completion_tokens: u.get("completion_tokens").and_then(serde_json::Value::as_u64),
    });
    let choice = v.get("choices").and_then(|c| c.as_array()).and_then(|c| c.first());
    let content = choice.and_then(|c| {
        let text = c.get("text").and_then(|t| t.as_str());
        let delta = c.get("delta");
        let chat = delta.and_then(|d| d.get("content")).and_then(|t| t.as_str());
        let reasoning = delta
            .and_then(|d| d.get("reasoning_content").or_else(|| d.get("reasoning")))
            .and_then(|t| t.as_str());
        let mut s = String::new();
        for part in [text, reasoning, chat].into_iter().flatten() {
            s.push_str(part);
        }
        (!s.is_empty()).then_some(s)
    });
    StreamItem::Chunk { content, usage, has_choices: choice.is_some() }
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> SseEvent {
        SseEvent { event: None, data: s.to_string() }
    }

    #[test]
    fn events_split_at_every_byte_boundary_parse_the_same() {
        let stream = "data: {\"a\":1}\n\n: ping\r\n\r\nevent: error\ndata: x\ndata: y\r\n\r\ndata:[DONE]\r\r";
        let want = vec![
            data("{\"a\":1}"),
            SseEvent { event: Some("error".into()), data: "x\ny".into() },
            data("[DONE]"),
        ];
        let mut p = SseParser::new();
        assert_eq!(p.push(stream.as_bytes()), want);
        for cut in 0..stream.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&stream.as_bytes()[..cut]);
            got.extend(p.push(&stream.as_bytes()[cut..]));
            got.extend(p.finish());
            assert_eq!(got, want, "cut at {cut}");
        }
        // One byte at a time, and a multi-byte character split across chunks.
        let s2 = "data: {\"t\":\"é\"}\n\n";
        let mut p = SseParser::new();
        let mut got = Vec::new();
        for b in s2.as_bytes() {
            got.extend(p.push(std::slice::from_ref(b)));
        }
        assert_eq!(got, vec![data("{\"t\":\"é\"}")]);
    }

    #[test]
    fn last_event_without_blank_line_is_delivered_at_finish() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: [DONE]").is_empty());
        assert_eq!(p.finish(), Some(data("[DONE]")));
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn interprets_openai_chunks() {
        assert_eq!(interpret(&data("[DONE]")), StreamItem::Done);
        let c = interpret(&data(r#"{"choices":[{"index":0,"text":"Hi","finish_reason":null}]}"#));
        assert_eq!(c, StreamItem::Chunk { content: Some("Hi".into()), usage: None, has_choices: true });
        let role = interpret(&data(r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#));
        assert_eq!(role, StreamItem::Chunk { content: None, usage: None, has_choices: true });
        let chat = interpret(&data(r#"{"choices":[{"delta":{"content":" there"}}]}"#));
        assert_eq!(chat, StreamItem::Chunk { content: Some(" there".into()), usage: None, has_choices: true });
        let usage = interpret(&data(
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#,
        ));
        assert_eq!(
            usage,
            StreamItem::Chunk {
                content: None,
                usage: Some(Usage { prompt_tokens: Some(12), completion_tokens: Some(5) }),
                has_choices: false
            }
        );
        let err = interpret(&data(r#"{"error":{"message":"boom","type":"x"}}"#));
        assert_eq!(err, StreamItem::ServerError("boom".into()));
        let ev = SseEvent { event: Some("error".into()), data: "\"overloaded\"".into() };
        assert!(matches!(interpret(&ev), StreamItem::ServerError(_)));
        assert!(matches!(interpret(&data("{not json")), StreamItem::BadJson(_)));
    }
}
