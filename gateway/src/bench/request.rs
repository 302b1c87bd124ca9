//! One streamed request: build the OpenAI body, send it, time the chunks.
//!
//! Timing follows vLLM's request functions: TTFT is the first content chunk
//! minus the send time, each later content chunk adds one inter-token gap,
//! and the end-to-end latency ends at the last content chunk. Token counts
//! come from the server's `usage` (asked for with stream_options.include_usage)
//! and fall back to counting content chunks.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use super::client::Client;
use super::dataset::SampleRequest;
use super::record::{Failure, FailureKind, RequestRecord};
use super::sse::{interpret, truncate, SseParser, StreamItem};

pub(crate) use super::http_types::EndpointKind;

/// What every request of a run shares.
#[derive(Debug, Clone)]
pub(crate) struct RequestSettings {
    pub kind: EndpointKind,
    pub endpoint: String,
    pub model: String,
    pub temperature: f64,
    pub ignore_eos: bool,
    pub timeout: Duration,
    /// Merged into every body last (`--extra-body`).
    pub extra_body: serde_json::Map<String, serde_json::Value>,
}

/// The JSON body for one request.
pub(crate) fn build_body(s: &RequestSettings, prompt: &str, max_tokens: usize) -> serde_json::Value {
    let mut body = match s.kind {
        EndpointKind::Completions => json!({ "model": s.model, "prompt": prompt }),
        EndpointKind::Chat => json!({
            "model": s.model,
            "messages": [{ "role": "user", "content": prompt }],
        }),
    };
    let obj = body.as_object_mut().expect("literal object");
    // max_tokens (not max_completion_tokens) for chat too: every server here accepts it.
    obj.insert("max_tokens".into(), json!(max_tokens));
    obj.insert("temperature".into(), json!(s.temperature));
    obj.insert("stream".into(), json!(true));
    obj.insert("stream_options".into(), json!({ "include_usage": true }));
    if s.ignore_eos {
        obj.insert("ignore_eos".into(), json!(true));
    }
    for (k, v) in &s.extra_body {
        obj.insert(k.clone(), v.clone());
    }
    body
}

/// What the stream showed so far; kept outside the timed future so a timeout
/// still reports how far the request got.
#[derive(Default)]
struct Progress {
    ttft: Option<f64>,
    itl: Vec<f64>,
    last_content: Option<f64>,
    chunks: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// Sends one request and measures it; never fails, a failure is in the record.
/// `deadline` is the run's --max-duration end.
pub(crate) async fn run_request(
    client: &Client,
    settings: &RequestSettings,
    sample: &SampleRequest,
    index: usize,
    run_start: Instant,
    queue_time: f64,
    deadline: Instant,
) -> RequestRecord {
    let sent = Instant::now();
    let start_time = sent.duration_since(run_start).as_secs_f64();
    let mut rec = RequestRecord::failed(
        index,
        start_time,
        queue_time,
        sample.prompt_len_estimate as u64,
        sample.output_len as u64,
        Failure::new(FailureKind::Transport, "not run"),
    );
    if sent >= deadline {
        rec.failure = Some(Failure::new(FailureKind::Cancelled, "not sent: --max-duration reached"));
        return rec;
    }
    let body = Bytes::from(build_body(settings, &sample.prompt, sample.output_len).to_string());
    let mut p = Progress::default();
    let own_deadline = sent + settings.timeout;
    let stop = own_deadline.min(deadline);
    let outcome = tokio::time::timeout_at(stop.into(), stream_one(client, &settings.endpoint, body, sent, &mut p)).await;
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(f)) => Some(f),
        Err(_) if own_deadline <= deadline => Some(Failure::new(
            FailureKind::Timeout,
            format!("no complete response within --timeout {:.1}s ({} content chunks so far)", settings.timeout.as_secs_f64(), p.chunks),
        )),
        Err(_) => Some(Failure::new(
            FailureKind::Cancelled,
            format!("in flight when --max-duration ended the run ({} content chunks so far)", p.chunks),
        )),
    };
    rec.ttft = p.ttft.unwrap_or(0.0);
    rec.itl = p.itl;
    rec.content_chunks = p.chunks;
    rec.latency = match (&failure, p.last_content) {
        (None, Some(t)) => t,
        _ => sent.elapsed().as_secs_f64(),
    };
    if let Some(pt) = p.prompt_tokens {
        rec.prompt_tokens = pt;
        rec.prompt_tokens_from_server = true;
    }
    match p.completion_tokens {
        Some(ct) => {
            rec.output_tokens = ct;
            rec.output_tokens_from_server = true;
        }
        None => rec.output_tokens = p.chunks,
    }
    rec.failure = failure;
    rec
}

async fn stream_one(client: &Client, endpoint: &str, body: Bytes, sent: Instant, p: &mut Progress) -> Result<(), Failure> {
    let mut resp = client.post_json(endpoint, body).await?;
    if resp.status != 200 {
        let text = resp.body.read_to_string(4096).await;
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?;
                Some(e.get("message").and_then(|m| m.as_str()).map_or_else(|| e.to_string(), str::to_string))
            })
            .or_else(|| v_detail(&text))
            .unwrap_or_else(|| truncate(text.trim(), 300));
        return Err(Failure { kind: FailureKind::HttpStatus, status: Some(resp.status), message });
    }
    let mut parser = SseParser::new();
    let mut done = false;
    while !done {
        match resp.body.chunk().await? {
            Some(bytes) => {
                for ev in parser.push(&bytes) {
                    if handle(&ev, sent, p)? {
                        done = true;
                        break;
                    }
                }
            }
            None => {
                if let Some(ev) = parser.finish() {
                    done = handle(&ev, sent, p)?;
                }
                if !done {
                    return Err(Failure::new(
                        FailureKind::StreamClosedEarly,
                        format!("body ended after {} content chunks without data: [DONE]", p.chunks),
                    ));
                }
            }
        }
    }
    if p.chunks == 0 {
        return Err(Failure::new(FailureKind::NoContent, "stream finished without any content chunk"));
    }
    // Drain what is left (normally just the end of the chunked body) so the
    // HTTP/1.1 connection can go back to the pool; bounded, and not timed.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = resp.body.chunk().await {}
    })
    .await;
    Ok(())
}

/// FastAPI-style `{"detail": ...}` error bodies (llama-cpp-python's server).
fn v_detail(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let d = v.get("detail")?;
    Some(d.as_str().map_or_else(|| truncate(&d.to_string(), 300), str::to_string))
}

/// Applies one event; Ok(true) at [DONE].
fn handle(ev: &super::sse::SseEvent, sent: Instant, p: &mut Progress) -> Result<bool, Failure> {
    match interpret(ev) {
        StreamItem::Done => Ok(true),
        StreamItem::ServerError(m) => Err(Failure::new(FailureKind::ServerError, m)),
        StreamItem::BadJson(m) => Err(Failure::new(FailureKind::BadJson, m)),
        StreamItem::Chunk { content, usage, .. } => {
            if content.is_some() {
                let t = sent.elapsed().as_secs_f64();
                match p.last_content {
                    None => p.ttft = Some(t),
                    Some(prev) => p.itl.push(t - prev),
                }
                p.last_content = Some(t);
                p.chunks += 1;
            }
            if let Some(u) = usage {
                if u.prompt_tokens.is_some() {
                    p.prompt_tokens = u.prompt_tokens;
                }
                if u.completion_tokens.is_some() {
                    p.completion_tokens = u.completion_tokens;
                }
            }
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_the_openai_shapes() {
        let mut s = RequestSettings {
            kind: EndpointKind::Completions,
            endpoint: "/v1/completions".into(),
            model: "m".into(),
            temperature: 0.0,
            ignore_eos: false,
            timeout: Duration::from_secs(1),
            extra_body: Default::default(),
        };
        let b = build_body(&s, "hi", 7);
        assert_eq!(b["prompt"], "hi");
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert!(b.get("ignore_eos").is_none());
        s.kind = EndpointKind::Chat;
        s.ignore_eos = true;
        let b = build_body(&s, "hi", 7);
        assert_eq!(b["messages"][0]["role"], "user");
        assert_eq!(b["messages"][0]["content"], "hi");
        assert_eq!(b["ignore_eos"], true);
        assert!(b.get("prompt").is_none());
        s.extra_body.insert("guided_regex".into(), json!("a+"));
        assert_eq!(build_body(&s, "hi", 7)["guided_regex"], "a+");
    }
}
