//! Router-level tests: requests go through the real Router (`oneshot`, no sockets)
//! to a fake engine thread at the far end of a real `flume_link`, which plays a
//! scripted list of token ids. Text is checked against the real SmolLM2 tokenizer's
//! full decode of the script (independent of the incremental path under test).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use ferry_engine::model::gguf::GgufFile;
use ferry_engine::tokenizer::Tokenizer;
use ferry_transport::{
    flume_link, EngineCommand, EngineEnd, EngineOutputs, EngineStats, FinishReason, FromEngine, Hello,
    TokenLogprob, TokenOutput, ToEngine, PROTOCOL_VERSION,
};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{router, AppState};
use crate::engines::coordinator::start_engine_clients;

/// A script id that makes the fake engine drop its link (the rank dies).
const DIE: u32 = u32::MAX;

fn tokenizer() -> Option<Arc<Tokenizer>> {
    static TOK: OnceLock<Option<Arc<Tokenizer>>> = OnceLock::new();
    TOK.get_or_init(|| {
        let p = std::env::var("FERRY_TEST_MODEL")
            .unwrap_or_else(|_| "/work/cache/SmolLM2-135M-Instruct.Q4_1.gguf".into());
        if !std::path::Path::new(&p).exists() {
            eprintln!("skipping: test model {p} not found (set FERRY_TEST_MODEL)");
            return None;
        }
        let g = GgufFile::open(&p).expect("open test model");
        Some(Arc::new(Tokenizer::from_gguf(&g).expect("tokenizer from gguf")))
    })
    .clone()
}

type Log = Arc<Mutex<Vec<EngineCommand>>>;

struct Active {
    id: u64,
    n: u32,
    max: u32,
    logprobs: Option<u32>,
    pos: Vec<usize>,
    done: Vec<bool>,
}

/// The engine's side: says hello, then every millisecond gives each running
/// sequence its next script token. EOS ends a sequence with Stop, max_tokens with
/// Length; a script that runs out first leaves the sequence waiting (for an Abort).
fn fake_engine(end: EngineEnd, script: Vec<u32>, eos: u32, log: Log) {
    let EngineEnd { rx: mut cmd_rx, tx: mut out_tx } = end;
    let (ctx, crx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(m) = cmd_rx.recv() {
            if ctx.send(m).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        let hello = Hello { protocol_version: PROTOCOL_VERSION, rank: 0, model: "smol".into(), fingerprint: Default::default(), vocab_size: 1 << 17, max_model_len: 64, num_kv_blocks: 64, block_size: 16, node: "n".into() };
        if out_tx.send(FromEngine::Hello(hello)).is_err() {
            return;
        }
        let mut active: Vec<Active> = Vec::new();
        loop {
            loop {
                match crx.try_recv() {
                    Ok(ToEngine::Command(c)) => {
                        log.lock().unwrap().push(c.clone());
                        match c {
                            EngineCommand::Add(r) => active.push(Active {
                                id: r.id,
                                n: r.sampling.n,
                                max: r.sampling.max_tokens,
                                logprobs: r.sampling.logprobs,
                                pos: vec![0; r.sampling.n as usize],
                                done: vec![false; r.sampling.n as usize],
                            }),
                            EngineCommand::Abort(ids) => active.retain(|a| !ids.contains(&a.id)),
                            EngineCommand::Shutdown => return,
                        }
                    }
                    Ok(ToEngine::Welcome(_)) => {}
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            }
            let mut outputs = Vec::new();
            for a in active.iter_mut() {
                for j in 0..a.n as usize {
                    if a.done[j] || a.pos[j] >= script.len() {
                        continue;
                    }
                    let t = script[a.pos[j]];
                    if t == DIE {
                        return; // drops out_tx: the link closes
                    }
                    a.pos[j] += 1;
                    let finish = if t == eos {
                        Some(FinishReason::Stop)
                    } else if a.pos[j] as u32 >= a.max {
                        Some(FinishReason::Length)
                    } else {
                        None
                    };
                    a.done[j] = finish.is_some();
                    let logprobs = a.logprobs.map(|k| {
                        let top = [(t, -0.25f32), (t + 1, -1.5), (t + 2, f32::NEG_INFINITY)];
                        vec![TokenLogprob { token: t, logprob: -0.25, rank: 1, top: top[..k as usize].to_vec() }]
                    });
                    outputs.push(TokenOutput { id: a.id, index: j as u32, new_tokens: vec![t], logprobs, finish, num_cached_tokens: 0, prompt_logprobs: None, timing: None });
                }
            }
            active.retain(|a| a.done.iter().any(|d| !d));
            if !outputs.is_empty() {
                let stats = EngineStats { num_running: active.len() as u32, ..Default::default() };
                if out_tx.send(FromEngine::Outputs(EngineOutputs { rank: 0, outputs, stats, kv_events: Vec::new() })).is_err() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

struct Harness {
    app: Router,
    state: AppState,
    log: Log,

}

const MAX_MODEL_LEN: u32 = 64;

async fn harness_with(script: &[u32], configure: impl FnOnce(AppState) -> AppState) -> Option<Harness> {
    let tok = tokenizer()?;
    let (gw, eng) = flume_link();
    let log: Log = Arc::default();
    fake_engine(eng, script.to_vec(), tok.eos_token_id().unwrap(), log.clone());
    let coord = start_engine_clients(vec![gw], crate::engines::coordinator::tests_support::expect_default_fingerprint(1));
    let state = configure(AppState::new(vec!["smol".into()], "/models/smol.gguf", tok.clone(), MAX_MODEL_LEN, coord));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !state.is_ready() {
        assert!(Instant::now() < deadline, "fake engine never said hello");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Some(Harness { app: router(state.clone()), state, log })
}

async fn harness(script: &[u32]) -> Option<Harness> {
    harness_with(script, |s| s).await
}

fn post(path: &str, body: Value) -> Request<Body> {
    Request::post(path).header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).unwrap()
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (parts.status, parts.headers, bytes.to_vec())
}

async fn json_of(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let (s, _, b) = send(app, req).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// The events of an SSE body: JSON values, and the final "[DONE]" as a string.
fn sse_events(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "stream must end with [DONE]: {text}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let d = e.strip_prefix("data: ").unwrap_or_else(|| panic!("bad event {e:?}"));
            if d == "[DONE]" {
                Value::String(d.into())
            } else {
                serde_json::from_str(d).unwrap()
            }
        })
        .collect()
}

fn encode(tok: &Tokenizer, s: &str) -> Vec<u32> {
    tok.encode(s, false).unwrap()
}

async fn wait_for_abort(log: &Log) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if log.lock().unwrap().iter().any(|c| matches!(c, EngineCommand::Abort(_))) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

#[tokio::test]
async fn completion_streamed_equals_unstreamed_and_usage_counts() {
    let Some(tok) = tokenizer() else { return };
    let script = encode(&tok, " The café is open: naïve résumé 🚀 done!");
    let Some(h) = harness(&script).await else { return };
    let prompt = "Say something";
    let prompt_len = tok.encode(prompt, true).unwrap().len() as u32;
    let n = script.len() as u32;

    let (s, v) = json_of(&h.app, post("/v1/completions", json!({"model": "smol", "prompt": prompt, "max_tokens": n}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let want = tok.decode(&script, true).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], "smol");
    assert_eq!(v["choices"][0]["text"], want);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["stop_reason"], Value::Null);
    assert_eq!(v["usage"], json!({"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n,
        "prompt_tokens_details": {"cached_tokens": 0}}));

    let body = json!({"prompt": prompt, "max_tokens": n, "stream": true,
        "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
    let (s, headers, bytes) = send(&h.app, post("/v1/completions", body)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
    let ev = sse_events(&bytes);
    let (last, chunks) = ev.split_last().unwrap();
    assert_eq!(last, "[DONE]");
    let (usage_chunk, text_chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], n);
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], prompt_len);
    let streamed: String = text_chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, want);
    assert!(text_chunks.len() > 3, "tokens must flow as separate chunks");
    // Continuous usage grows; every chunk has vLLM's fields.
    let counts: Vec<u64> = text_chunks.iter().map(|c| c["usage"]["completion_tokens"].as_u64().unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]) && *counts.last().unwrap() == n as u64);
    for c in text_chunks {
        assert_eq!(c["object"], "text_completion");
        let ch = &c["choices"][0];
        for k in ["index", "text", "logprobs", "finish_reason", "stop_reason"] {
            assert!(ch.get(k).is_some(), "missing {k} in {c}");
        }
    }
    assert_eq!(text_chunks.last().unwrap()["choices"][0]["finish_reason"], "length");

    // Metrics saw both requests.
    let (s, headers, m) = send(&h.app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
    let m = String::from_utf8(m).unwrap();
    let sample = |name: &str| -> f64 {
        let line = m.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(sample("vllm:generation_tokens_total{model_name=\"smol\",engine=\"0\"}"), 2.0 * n as f64);
    assert_eq!(sample("vllm:prompt_tokens_total{model_name=\"smol\",engine=\"0\"}"), 2.0 * prompt_len as f64);
    assert_eq!(sample("vllm:request_success_total{model_name=\"smol\",engine=\"0\",finished_reason=\"length\"}"), 2.0);
    assert_eq!(sample("vllm:time_to_first_token_seconds_count{model_name=\"smol\",engine=\"0\"}"), 2.0);
    assert_eq!(sample("vllm:e2e_request_latency_seconds_count{model_name=\"smol\",engine=\"0\"}"), 2.0);
}

#[tokio::test]
async fn chat_stream_shapes_eos_and_equality() {
    let Some(tok) = tokenizer() else { return };
    let eos = tok.eos_token_id().unwrap();
    let mut script = encode(&tok, "Hi! I'm fine, thanks.");
    let text_len = script.len() as u32;
    script.push(eos);
    script.extend(encode(&tok, " never sent"));
    let Some(h) = harness(&script).await else { return };
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}]);
    let rendered = tok
        .apply_chat_template(&serde_json::from_value::<Vec<_>>(messages.clone()).unwrap(), true)
        .unwrap();
    let prompt_len = tok.encode(&rendered, false).unwrap().len() as u32;
    let want = tok.decode(&script[..text_len as usize], true).unwrap();

    let (s, v) = json_of(&h.app, post("/v1/chat/completions", json!({"messages": messages}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], Value::Null); // EOS
    // EOS counts as a generated token, as in vLLM.
    assert_eq!(v["usage"]["completion_tokens"], text_len + 1);
    assert_eq!(v["usage"]["prompt_tokens"], prompt_len);

    let body = json!({"messages": messages, "stream": true, "stream_options": {"include_usage": true}});
    let (_, _, bytes) = send(&h.app, post("/v1/chat/completions", body)).await;
    let ev = sse_events(&bytes);
    assert_eq!(ev[0]["object"], "chat.completion.chunk");
    assert_eq!(ev[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    assert!(ev[0].get("usage").is_none());
    let n = ev.len();
    assert_eq!(ev[n - 1], "[DONE]");
    assert_eq!(ev[n - 2]["choices"], json!([]));
    assert_eq!(ev[n - 2]["usage"], json!({"prompt_tokens": prompt_len, "completion_tokens": text_len + 1, "total_tokens": prompt_len + text_len + 1,
        "prompt_tokens_details": {"cached_tokens": 0}}));
    let content: Vec<&Value> = ev[1..n - 2].iter().collect();
    let streamed: String = content.iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or("")).collect();
    assert_eq!(streamed, want);
    // OpenAI's order: the text, then an empty delta with the finish reason.
    let last = content.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert!(last["choices"][0].get("stop_reason").is_some());
    assert!(content[..content.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()
        && c["choices"][0].get("stop_reason").is_none() && c["choices"][0]["delta"].get("role").is_none()));
}

#[tokio::test]
async fn stop_string_across_tokens_aborts_the_engine_request() {
    let Some(tok) = tokenizer() else { return };
    // The script never finishes by itself: only the stop string can end it.
    let script = encode(&tok, "One two three. Stop here please, four five");
    let Some(h) = harness(&script).await else { return };
    let full = tok.decode(&script, true).unwrap();
    let stop = "e, fo"; // spans tokens ("please", ",", " four")
    let cut = full.find(stop).unwrap();
    for (include, stream) in [(false, false), (true, false), (false, true)] {
        h.log.lock().unwrap().clear();
        let body = json!({"prompt": "x", "max_tokens": 40, "stop": ["never", stop],
            "include_stop_str_in_output": include, "stream": stream});
        let (s, _, bytes) = send(&h.app, post("/v1/completions", body)).await;
        assert_eq!(s, StatusCode::OK);
        let (text, finish, stop_reason) = if stream {
            let ev = sse_events(&bytes);
            let chunks = &ev[..ev.len() - 1];
            let t: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
            let l = &chunks.last().unwrap()["choices"][0];
            (t, l["finish_reason"].clone(), l["stop_reason"].clone())
        } else {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            let c = &v["choices"][0];
            (c["text"].as_str().unwrap().to_string(), c["finish_reason"].clone(), c["stop_reason"].clone())
        };
        let want = if include { &full[..cut + stop.len()] } else { &full[..cut] };
        assert_eq!(text, want);
        assert_eq!((finish, stop_reason), (json!("stop"), json!(stop)));
        assert!(wait_for_abort(&h.log).await, "stop string must abort the engine request");
    }
    // At once: the Abort goes out while the client still holds the open stream.
    h.log.lock().unwrap().clear();
    let body = json!({"prompt": "x", "max_tokens": 40, "stop": stop, "stream": true});
    let resp = h.app.clone().oneshot(post("/v1/completions", body)).await.unwrap();
    let mut stream = resp.into_body().into_data_stream();
    loop {
        let chunk = stream.next().await.expect("stream ended before the stop chunk").unwrap();
        let v: Value = serde_json::from_slice(&chunk[6..chunk.len() - 2]).unwrap();
        if v["choices"][0]["finish_reason"] == "stop" {
            break;
        }
    }
    assert!(wait_for_abort(&h.log).await, "Abort must not wait for the stream to close");
    drop(stream);
}

#[tokio::test]
async fn dropped_stream_aborts_and_overload_is_503() {
    let Some(tok) = tokenizer() else { return };
    let script = encode(&tok, "Streaming forever and ever");
    let Some(h) = harness_with(&script, |s| s.with_max_concurrent_requests(1)).await else { return };
    let resp = h
        .app
        .clone()
        .oneshot(post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "stream": true})))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body().into_data_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {"));
    let second = body.next().await.unwrap().unwrap(); // a token arrived
    assert!(std::str::from_utf8(&second).unwrap().contains("\"content\""));
    // The one admission slot is taken: the next request is turned away.
    let (s, headers, b) = send(&h.app, post("/v1/completions", json!({"prompt": "x"}))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], 503);
    assert!(h.log.lock().unwrap().iter().all(|c| !matches!(c, EngineCommand::Abort(_))));
    drop(body); // the client goes away
    assert!(wait_for_abort(&h.log).await, "dropping the body must abort the engine request");
    // Its slot is free again.
    let (s, _, _) = send(&h.app, post("/v1/completions", json!({"prompt": "x", "max_tokens": 2}))).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn n_choices_logprobs_and_echo() {
    let Some(tok) = tokenizer() else { return };
    let script = encode(&tok, " alpha beta gamma");
    let Some(h) = harness(&script).await else { return };
    let body = json!({"prompt": ["A", "B"], "n": 2, "temperature": 0.7, "max_tokens": 2, "logprobs": 2, "echo": true});
    let (s, v) = json_of(&h.app, post("/v1/completions", body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    let gen = tok.decode(&script[..2], true).unwrap();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let prompt = if i < 2 { "A" } else { "B" };
        assert_eq!(c["text"], format!("{prompt}{gen}"));
        let lp = &c["logprobs"];
        let n_prompt = tok.encode(prompt, true).unwrap().len();
        assert_eq!(lp["tokens"].as_array().unwrap().len(), n_prompt + 2);
        assert_eq!(lp["token_logprobs"][0], Value::Null); // echoed prompt token
        assert_eq!(lp["token_logprobs"][n_prompt], -0.25);
        let top = lp["top_logprobs"][n_prompt].as_object().unwrap();
        assert_eq!(top.len(), 2);
        let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
        assert_eq!(offsets[0], 0);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    }
    assert_eq!(v["usage"]["completion_tokens"], 8);

    // Chat logprobs: -inf becomes -9999.0, bytes are the token's UTF-8.
    let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "logprobs": true, "top_logprobs": 3});
    let (s, v) = json_of(&h.app, post("/v1/chat/completions", body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0]["logprobs"]["content"][0];
    let token = tok.decode(&script[..1], false).unwrap();
    assert_eq!(c["token"], token);
    assert_eq!(c["bytes"], json!(token.as_bytes()));
    assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(c["top_logprobs"][2]["logprob"], -9999.0);
}

#[tokio::test]
async fn errors_have_openai_shape_and_status() {
    let Some(h) = harness(&[]).await else { return };
    let err = |v: &Value| (v["error"]["type"].clone(), v["error"]["param"].clone(), v["error"]["code"].clone());

    let raw = Request::post("/v1/completions").header(header::CONTENT_TYPE, "application/json").body(Body::from("{\"prompt\": ")).unwrap();
    let (s, v) = json_of(&h.app, raw).await;
    assert_eq!((s, err(&v)), (StatusCode::BAD_REQUEST, (json!("BadRequestError"), Value::Null, json!(400))));

    let (s, v) = json_of(&h.app, post("/v1/completions", json!({"prompt": "x", "temperature": "hot"}))).await;
    assert_eq!((s, v["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("temperature")));
    let (s, v) = json_of(&h.app, post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "top_p": 7}))).await;
    assert_eq!((s, v["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("top_p")));
    let (s, v) = json_of(&h.app, post("/v1/chat/completions", json!({"messages": []}))).await;
    assert_eq!((s, v["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("messages")));
    let (s, v) = json_of(&h.app, post("/v1/completions", json!({"prompt": [999999]}))).await;
    assert_eq!((s, v["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("prompt")));

    let (s, v) = json_of(&h.app, post("/v1/completions", json!({"model": "gpt-4", "prompt": "x"}))).await;
    assert_eq!((s, err(&v)), (StatusCode::NOT_FOUND, (json!("NotFoundError"), json!("model"), json!(404))));
    assert_eq!(v["error"]["message"], "The model `gpt-4` does not exist.");

    let long = "hello ".repeat(200);
    let (s, v) = json_of(&h.app, post("/v1/completions", json!({"prompt": long}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("maximum context length is {MAX_MODEL_LEN} tokens")) && msg.contains("input tokens"), "{msg}");
    let (s, v) = json_of(&h.app, post("/v1/completions", json!({"prompt": "hello", "max_tokens": 64}))).await;
    assert_eq!((s, v["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("max_tokens")));
    assert!(v["error"]["message"].as_str().unwrap().contains("(64 > 64 - "));

    let big = vec![b' '; super::MAX_BODY_BYTES + 10];
    let req = Request::post("/v1/completions").header(header::CONTENT_TYPE, "application/json").body(Body::from(big)).unwrap();
    let (s, v) = json_of(&h.app, req).await;
    assert_eq!((s, v["error"]["code"].clone()), (StatusCode::PAYLOAD_TOO_LARGE, json!(413)));

    let req = Request::post("/v1/completions").header(header::CONTENT_TYPE, "text/plain").body(Body::from("{}")).unwrap();
    assert_eq!(json_of(&h.app, req).await.0, StatusCode::BAD_REQUEST);
    let (s, v) = json_of(&h.app, Request::get("/v1/nothing").body(Body::empty()).unwrap()).await;
    assert_eq!((s, v["error"]["code"].clone()), (StatusCode::NOT_FOUND, json!(404)));
    let (s, v) = json_of(&h.app, Request::get("/v1/completions").body(Body::empty()).unwrap()).await;
    assert_eq!((s, v["error"]["code"].clone()), (StatusCode::METHOD_NOT_ALLOWED, json!(405)));
    // None of that disturbed the engine.
    assert!(h.log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn api_key_health_models_version_tokenize() {
    let Some(tok) = tokenizer() else { return };
    let Some(h) = harness_with(&[], |s| s.with_api_key(Some("sekret".into())).with_version("9.9.9")).await else { return };
    let get = |p: &str| Request::get(p).body(Body::empty()).unwrap();
    let (s, v) = json_of(&h.app, get("/v1/models")).await;
    assert_eq!((s, v["error"]["code"].clone()), (StatusCode::UNAUTHORIZED, json!(401)));
    let wrong = Request::get("/v1/models").header(header::AUTHORIZATION, "Bearer nope").body(Body::empty()).unwrap();
    assert_eq!(json_of(&h.app, wrong).await.0, StatusCode::UNAUTHORIZED);
    for open in ["/health", "/metrics", "/version"] {
        assert_eq!(send(&h.app, get(open)).await.0, StatusCode::OK, "{open}");
    }
    let (_, v) = json_of(&h.app, get("/version")).await;
    assert_eq!(v, json!({"version": "9.9.9"}));
    let authed = |r: Request<Body>| {
        let (mut parts, body) = r.into_parts();
        parts.headers.insert(header::AUTHORIZATION, "Bearer sekret".parse().unwrap());
        Request::from_parts(parts, body)
    };
    let (s, v) = json_of(&h.app, authed(get("/v1/models"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "smol");
    assert_eq!(v["data"][0]["max_model_len"], MAX_MODEL_LEN);

    let (s, v) = json_of(&h.app, authed(post("/tokenize", json!({"prompt": "Hello world", "return_token_strs": true})))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids = tok.encode("Hello world", true).unwrap();
    assert_eq!(v["tokens"], json!(ids));
    assert_eq!(v["count"], ids.len());
    assert_eq!(v["max_model_len"], MAX_MODEL_LEN);
    assert_eq!(v["token_strs"].as_array().unwrap().len(), ids.len());
    let (s, v) = json_of(&h.app, authed(post("/detokenize", json!({"tokens": ids})))).await;
    // vLLM's `prompt`, and llama.cpp's `content` for a request that names no model.
    assert_eq!((s, v), (StatusCode::OK, json!({"prompt": "Hello world", "content": "Hello world"})));
    // One that names its model is a vLLM client's: vLLM's answer exactly.
    let (s, v) = json_of(&h.app, authed(post("/detokenize", json!({"model": "smol", "tokens": ids})))).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"prompt": "Hello world"})));
    // llama.cpp's form: `content`, `add_special` (default false), `with_pieces`.
    let (s, v) = json_of(&h.app, authed(post("/tokenize", json!({"content": "Hello world"})))).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"tokens": tok.encode("Hello world", false).unwrap()})));
    let (s, v) = json_of(&h.app, authed(post("/tokenize", json!({"content": "Hello world", "add_special": true})))).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"tokens": ids})));
    let (s, v) = json_of(&h.app, authed(post("/tokenize", json!({"content": "Hello 🚀", "with_pieces": true})))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let want: Vec<Value> = tok
        .encode("Hello 🚀", false)
        .unwrap()
        .into_iter()
        .map(|id| {
            let b = tok.id_to_bytes(id).unwrap();
            let piece = std::str::from_utf8(b).map_or_else(|_| json!(b), |t| json!(t));
            json!({"id": id, "piece": piece})
        })
        .collect();
    assert_eq!(v, json!({"tokens": want}));
    // The rocket is split over byte tokens, which come back as byte lists.
    assert!(want.iter().any(|t| t["piece"].is_array()), "{v}");
    assert_eq!(want.iter().find(|t| t["piece"].is_string()).unwrap()["piece"], "Hello");
    let (s, _) = json_of(&h.app, authed(post("/tokenize", json!({"content": "a", "prompt": "b"})))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = json_of(&h.app, authed(post("/tokenize", json!({"messages": [{"role": "user", "content": "Hi"}]})))).await;
    assert_eq!(s, StatusCode::OK);
    let rendered = tok.apply_chat_template(&[ferry_engine::tokenizer::ChatMessage::new("user", "Hi")], true).unwrap();
    assert_eq!(v["tokens"], json!(tok.encode(&rendered, false).unwrap()));

    // Not ready: draining flips /health to 503 and requests to 503.
    h.state.accepting.store(false, std::sync::atomic::Ordering::Relaxed);
    let (s, headers, _) = send(&h.app, get("/health")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.get(header::RETRY_AFTER).is_some());
    let (s, _) = json_of(&h.app, authed(post("/v1/completions", json!({"prompt": "x"})))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

/// With a key set, the chat page and its files load without one (the page
/// asks for the key itself) while the API it calls still needs it; with the
/// page off (the library's default, `--no-webui`), its paths are unknown.
#[tokio::test]
async fn webui_is_open_the_api_closed_and_off_means_unknown() {
    let get = |p: &str| Request::get(p).body(Body::empty()).unwrap();
    let with_key = |p: &str| Request::get(p).header(header::AUTHORIZATION, "Bearer sekret").body(Body::empty()).unwrap();
    let Some(on) = harness_with(&[], |s| s.with_api_key(Some("sekret".into())).with_webui(true)).await else { return };
    for path in ["/", "/webui/app.js", "/webui/app.css", "/webui/markdown.js"] {
        let (s, h, body) = send(&on.app, get(path)).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(h.contains_key(header::CONTENT_SECURITY_POLICY), "{path}");
        assert!(!body.is_empty());
    }
    assert_eq!(send(&on.app, get("/v1/models")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(&on.app, get("/webui/other.js")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(&on.app, with_key("/webui/other.js")).await.0, StatusCode::NOT_FOUND);
    let Some(off) = harness_with(&[], |s| s.with_api_key(Some("sekret".into()))).await else { return };
    assert_eq!(send(&off.app, get("/")).await.0, StatusCode::UNAUTHORIZED);
    for path in ["/", "/webui/app.js"] {
        assert_eq!(send(&off.app, with_key(path)).await.0, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn rank_dying_mid_stream_ends_with_error_event_and_health_503() {
    let Some(tok) = tokenizer() else { return };
    let mut script = encode(&tok, "Partial answer");
    script.push(DIE);
    let Some(h) = harness(&script).await else { return };
    let (s, _, bytes) = send(&h.app, post("/v1/completions", json!({"prompt": "x", "max_tokens": 30, "stream": true}))).await;
    assert_eq!(s, StatusCode::OK);
    let ev = sse_events(&bytes);
    let err = &ev[ev.len() - 2];
    assert_eq!(err["error"]["code"], 503, "{ev:?}");
    let text: String = ev[..ev.len() - 2].iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(text, tok.decode(&script[..script.len() - 1], true).unwrap());
    assert_eq!(send(&h.app, Request::get("/health").body(Body::empty()).unwrap()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = json_of(&h.app, post("/v1/completions", json!({"prompt": "x"}))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

/// The events of a Responses stream: (type, JSON), checking OpenAI's framing.
fn responses_events(body: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(body).unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (ty, data) = e.split_once('\n').unwrap_or_else(|| panic!("bad event {e:?}"));
            let ty = ty.strip_prefix("event: ").unwrap_or_else(|| panic!("bad event {e:?}"));
            let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(v["type"], ty);
            (ty.to_string(), v)
        })
        .collect()
}

#[tokio::test]
async fn responses_streamed_equals_unstreamed_and_chat() {
    let Some(tok) = tokenizer() else { return };
    let mut script = encode(&tok, "Hi! I'm fine.");
    let text_len = script.len() as u32;
    script.push(tok.eos_token_id().unwrap());
    let Some(h) = harness(&script).await else { return };
    let want = tok.decode(&script[..text_len as usize], true).unwrap();
    let body = json!({"input": "How are you?", "instructions": "Be brief.", "temperature": 0, "metadata": {"k": "v"}});
    let (s, r) = json_of(&h.app, post("/v1/responses", body.clone())).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!((r["object"].clone(), r["status"].clone(), r["temperature"].clone()), (json!("response"), json!("completed"), json!(0)));
    assert_eq!(r["metadata"], json!({"k": "v"}));
    assert_eq!(r["output"][0]["content"][0]["text"], want);
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}]);
    let (_, chat) = json_of(&h.app, post("/v1/chat/completions", json!({"messages": messages}))).await;
    assert_eq!(r["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(r["usage"]["output_tokens"], text_len + 1);

    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let (s, headers, bytes) = send(&h.app, post("/v1/responses", stream_body)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
    let ev = responses_events(&bytes);
    assert!(ev.iter().enumerate().all(|(i, e)| e.1["sequence_number"] == i as u64));
    assert_eq!((ev[0].0.as_str(), ev[1].0.as_str()), ("response.created", "response.in_progress"));
    let streamed: String = ev.iter().filter(|e| e.0 == "response.output_text.delta").map(|e| e.1["delta"].as_str().unwrap()).collect();
    assert_eq!(streamed, want);
    let (last, _) = ev.split_last().unwrap();
    assert_eq!(last.0, "response.completed");
    assert_eq!(last.1["response"]["output"][0]["content"][0]["text"], want);
    assert_eq!(last.1["response"]["usage"], r["usage"]);
}

#[tokio::test]
async fn responses_stream_ends_with_an_error_event_when_the_rank_dies() {
    let Some(tok) = tokenizer() else { return };
    let mut script = encode(&tok, "Partial answer");
    script.push(DIE);
    let Some(h) = harness(&script).await else { return };
    let (s, _, bytes) = send(&h.app, post("/v1/responses", json!({"input": "x", "max_output_tokens": 30, "stream": true}))).await;
    assert_eq!(s, StatusCode::OK);
    let ev = responses_events(&bytes);
    let (last, before) = ev.split_last().unwrap();
    assert_eq!((last.0.as_str(), last.1["code"].clone()), ("error", json!(503)), "{ev:?}");
    let text: String = before.iter().filter(|e| e.0 == "response.output_text.delta").map(|e| e.1["delta"].as_str().unwrap()).collect();
    assert_eq!(text, tok.decode(&script[..script.len() - 1], true).unwrap());
    assert!(before.iter().all(|e| e.0 != "response.completed"));
}

/// vLLM's response shapes: `prompt_logprobs` on every completion choice (null
/// unless asked), at the chat response's level; continuous usage on every
/// chunk, the finishing one included, then a usage chunk with no choices.
#[tokio::test]
async fn prompt_logprobs_null_and_usage_in_every_chunk() {
    let Some(tok) = tokenizer() else { return };
    let script = encode(&tok, "One two three four");
    let n = script.len() as u32;
    let Some(h) = harness(&script).await else { return };

    let (s, v) = json_of(&h.app, post("/v1/completions", json!({"prompt": ["a", "b"], "max_tokens": n}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for c in v["choices"].as_array().unwrap() {
        assert_eq!(c.get("prompt_logprobs"), Some(&Value::Null), "{c}");
    }
    let (s, v) = json_of(&h.app, post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": n}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v.get("prompt_logprobs"), Some(&Value::Null), "{v}");
    assert!(v["choices"][0].get("prompt_logprobs").is_none());

    let opts = json!({"include_usage": true, "continuous_usage_stats": true});
    let (_, _, b) = send(&h.app, post("/v1/completions", json!({"prompt": "a", "max_tokens": n, "stream": true, "stream_options": opts}))).await;
    let ev = sse_events(&b);
    let prompt_len = tok.encode("a", true).unwrap().len() as u64;
    let (usage, chunks) = ev[..ev.len() - 1].split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], n);
    for c in chunks {
        assert!(c["choices"][0].get("prompt_logprobs").is_none(), "{c}");
        let u = &c["usage"];
        assert_eq!(u["prompt_tokens"], prompt_len, "{c}");
        assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt_len + u["completion_tokens"].as_u64().unwrap());
    }
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], n);

    let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": n, "stream": true, "stream_options": opts});
    let (_, _, b) = send(&h.app, post("/v1/chat/completions", body)).await;
    let ev = sse_events(&b);
    let (usage, chunks) = ev[..ev.len() - 1].split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], n);
    let p = usage["usage"]["prompt_tokens"].clone();
    for c in chunks {
        let u = &c["usage"];
        assert_eq!(u["prompt_tokens"], p, "{c}");
        assert_eq!(u["total_tokens"].as_u64().unwrap(), p.as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap());
    }
    let last = chunks.last().unwrap();
    assert_eq!((last["choices"][0]["finish_reason"].clone(), last["usage"]["completion_tokens"].clone()), (json!("length"), json!(n)));
    assert_eq!(chunks[0]["usage"]["completion_tokens"], 0);

    // include_usage alone: no usage on the chunks, one usage chunk at the end.
    let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": n, "stream": true, "stream_options": {"include_usage": true}});
    let (_, _, b) = send(&h.app, post("/v1/chat/completions", body)).await;
    let ev = sse_events(&b);
    let (usage, chunks) = ev[..ev.len() - 1].split_last().unwrap();
    assert_eq!((usage["choices"].clone(), usage["usage"]["completion_tokens"].clone()), (json!([]), json!(n)));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));

    // An empty stop string is refused as vLLM refuses it.
    let (s, v) = json_of(&h.app, post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "stop": ["x", ""]}))).await;
    assert_eq!((s, v["error"]["message"].clone(), v["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("stop cannot contain an empty string."), json!("stop")));
}

fn with_header(r: Request<Body>, name: &'static str, value: &str) -> Request<Body> {
    let (mut parts, body) = r.into_parts();
    parts.headers.insert(name, value.parse().unwrap());
    Request::from_parts(parts, body)
}

/// Anthropic's Messages API on the chat path: the message, its stream (text
/// equal, Anthropic's event order), usage equal to chat's and to
/// count_tokens, and max_tokens as a ceiling cut to the context's room.
#[tokio::test]
async fn messages_streamed_equals_unstreamed_and_counts() {
    let Some(tok) = tokenizer() else { return };
    let mut script = encode(&tok, "Hi! I'm fine.");
    let text_len = script.len() as u32;
    script.push(tok.eos_token_id().unwrap());
    let Some(h) = harness(&script).await else { return };
    let want = tok.decode(&script[..text_len as usize], true).unwrap();
    let body = json!({"model": "smol", "max_tokens": 4096, "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "How are you?"}]}], "temperature": 0, "metadata": {"user_id": "u"}});
    let (s, m) = json_of(&h.app, with_header(post("/v1/messages", body.clone()), "anthropic-version", "2023-06-01")).await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"), "{m}");
    assert_eq!((m["type"].clone(), m["role"].clone(), m["model"].clone()), (json!("message"), json!("assistant"), json!("smol")));
    assert_eq!(m["content"], json!([{"type": "text", "text": want}]));
    assert_eq!((m["stop_reason"].clone(), m["stop_sequence"].clone()), (json!("end_turn"), Value::Null));
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}]);
    let (_, chat) = json_of(&h.app, post("/v1/chat/completions", json!({"messages": messages}))).await;
    assert_eq!(m["usage"], json!({"input_tokens": chat["usage"]["prompt_tokens"], "output_tokens": text_len + 1}));
    let (s, count) = json_of(&h.app, post("/v1/messages/count_tokens", json!({"model": "smol", "system": "Be brief.", "messages": body["messages"]}))).await;
    assert_eq!((s, count), (StatusCode::OK, json!({"input_tokens": m["usage"]["input_tokens"]})));

    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let (s, headers, bytes) = send(&h.app, post("/v1/messages", stream_body)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
    let ev = responses_events(&bytes);
    let names: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(&names[..3], ["message_start", "content_block_start", "ping"]);
    assert_eq!(&names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
    assert!(names[3..names.len() - 3].iter().all(|n| *n == "content_block_delta"), "{names:?}");
    let start = &ev[0].1["message"];
    assert_eq!((start["id"].as_str().unwrap().starts_with("msg_"), start["content"].clone()), (true, json!([])));
    assert_eq!(start["usage"], json!({"input_tokens": m["usage"]["input_tokens"], "output_tokens": 0}));
    let streamed: String = ev.iter().filter(|e| e.0 == "content_block_delta").map(|e| e.1["delta"]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, want);
    let delta = &ev[ev.len() - 2].1;
    assert_eq!(delta["delta"], json!({"stop_reason": "end_turn", "stop_sequence": null}));
    assert_eq!(delta["usage"], m["usage"]);
}

#[tokio::test]
async fn messages_stop_reasons_for_max_tokens_the_context_and_stop_sequences() {
    let Some(tok) = tokenizer() else { return };
    // Never ends by itself: max_tokens, the context or a stop sequence ends it.
    let script = encode(&tok, &"One two three. Stop here please, four five six seven eight nine ten.".repeat(4));
    let Some(h) = harness(&script).await else { return };
    let ask = |extra: Value| {
        let mut body = json!({"max_tokens": 3, "messages": [{"role": "user", "content": "Count."}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        post("/v1/messages", body)
    };
    let (s, m) = json_of(&h.app, ask(json!({}))).await;
    assert_eq!((s, m["stop_reason"].clone(), m["usage"]["output_tokens"].clone()), (StatusCode::OK, json!("max_tokens"), json!(3)), "{m}");
    let (_, m) = json_of(&h.app, ask(json!({"max_tokens": 100000}))).await;
    assert_eq!(m["stop_reason"], "model_context_window_exceeded", "{m}");
    let used = m["usage"]["input_tokens"].as_u64().unwrap() + m["usage"]["output_tokens"].as_u64().unwrap();
    assert_eq!(used, u64::from(MAX_MODEL_LEN), "the answer filled the context");
    let (_, m) = json_of(&h.app, ask(json!({"max_tokens": 20, "stop_sequences": ["Stop", "never"]}))).await;
    assert_eq!((m["stop_reason"].clone(), m["stop_sequence"].clone()), (json!("stop_sequence"), json!("Stop")), "{m}");
    assert_eq!(m["content"][0]["text"], "One two three. ");
    let (_, _, bytes) = send(&h.app, ask(json!({"max_tokens": 20, "stop_sequences": ["Stop"], "stream": true}))).await;
    let ev = responses_events(&bytes);
    assert_eq!(ev[ev.len() - 2].1["delta"], json!({"stop_reason": "stop_sequence", "stop_sequence": "Stop"}));
    // max_tokens 0 (Anthropic's cache warm-up): counted, nothing generated.
    // Adds only: an Abort of an earlier request may still arrive.
    let adds = |log: &Log| log.lock().unwrap().iter().filter(|c| matches!(c, EngineCommand::Add(_))).count();
    let commands = adds(&h.log);
    let (s, m) = json_of(&h.app, ask(json!({"max_tokens": 0}))).await;
    assert_eq!((s, m["stop_reason"].clone(), m["content"].clone()), (StatusCode::OK, json!("max_tokens"), json!([{"type": "text", "text": ""}])), "{m}");
    let (_, count) = json_of(&h.app, post("/v1/messages/count_tokens", json!({"messages": [{"role": "user", "content": "Count."}]}))).await;
    assert_eq!(m["usage"], json!({"input_tokens": count["input_tokens"], "output_tokens": 0}));
    let (_, _, bytes) = send(&h.app, ask(json!({"max_tokens": 0, "stream": true}))).await;
    let names: Vec<String> = responses_events(&bytes).into_iter().map(|e| e.0).collect();
    assert_eq!(names, ["message_start", "content_block_start", "ping", "content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(adds(&h.log), commands, "the engine was not asked");
}

/// Every answer on the Messages routes is in Anthropic's error shape, and
/// `x-api-key` is a key as `Authorization: Bearer` is.
#[tokio::test]
async fn messages_errors_have_anthropics_shape_and_x_api_key_is_a_key() {
    let Some(tok) = tokenizer() else { return };
    let script = encode(&tok, "Fine, thanks.");
    let Some(h) = harness_with(&script, |s| s.with_api_key(Some("sekret".into()))).await else { return };
    let hello = json!({"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]});
    let kind = |v: &Value| (v["type"].clone(), v["error"]["type"].clone());

    let (s, v) = json_of(&h.app, post("/v1/messages", hello.clone())).await;
    assert_eq!((s, kind(&v)), (StatusCode::UNAUTHORIZED, (json!("error"), json!("authentication_error"))), "{v}");
    let (s, v) = json_of(&h.app, with_header(post("/v1/messages", hello.clone()), "x-api-key", "nope")).await;
    assert_eq!((s, kind(&v)), (StatusCode::UNAUTHORIZED, (json!("error"), json!("authentication_error"))));
    let (s, v) = json_of(&h.app, post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hi"}]}))).await;
    assert_eq!((s, v["error"]["code"].clone()), (StatusCode::UNAUTHORIZED, json!(401)), "OpenAI's routes keep OpenAI's shape");

    let key = |r| with_header(r, "x-api-key", "sekret");
    let (s, v) = json_of(&h.app, key(post("/v1/messages", hello.clone()))).await;
    assert_eq!((s, v["content"][0]["text"].clone()), (StatusCode::OK, json!(tok.decode(&script[..2], true).unwrap())), "{v}");
    let (s, _) = json_of(&h.app, with_header(post("/v1/messages", hello.clone()), "authorization", "Bearer sekret")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = json_of(&h.app, key(post("/v1/messages", json!({"messages": [{"role": "user", "content": "Hi"}]})))).await;
    assert_eq!((s, v), (StatusCode::BAD_REQUEST, json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}})));
    let (s, v) = json_of(&h.app, key(post("/v1/messages", json!({"max_tokens": 2, "temperature": "hot", "messages": []})))).await;
    assert_eq!((s, kind(&v)), (StatusCode::BAD_REQUEST, (json!("error"), json!("invalid_request_error"))));
    assert!(v["error"]["message"].as_str().unwrap().starts_with("temperature: "), "{v}");
    let mut unknown = hello.clone();
    unknown["model"] = json!("claude-sonnet-4");
    let (s, v) = json_of(&h.app, key(post("/v1/messages", unknown))).await;
    assert_eq!((s, kind(&v)), (StatusCode::NOT_FOUND, (json!("error"), json!("not_found_error"))));
    let (s, v) = json_of(&h.app, key(post("/v1/messages/count_tokens", json!({"model": "claude-sonnet-4", "messages": hello["messages"]})))).await;
    assert_eq!((s, kind(&v)), (StatusCode::NOT_FOUND, (json!("error"), json!("not_found_error"))));
    let raw = key(Request::post("/v1/messages").header(header::CONTENT_TYPE, "application/json").body(Body::from("{\"max_tokens\": ")).unwrap());
    let (s, v) = json_of(&h.app, raw).await;
    assert_eq!((s, kind(&v)), (StatusCode::BAD_REQUEST, (json!("error"), json!("invalid_request_error"))));
    let big = vec![b' '; super::MAX_BODY_BYTES + 10];
    let raw = key(Request::post("/v1/messages").header(header::CONTENT_TYPE, "application/json").body(Body::from(big)).unwrap());
    let (s, v) = json_of(&h.app, raw).await;
    assert_eq!((s, kind(&v)), (StatusCode::PAYLOAD_TOO_LARGE, (json!("error"), json!("request_too_large"))));
    let (s, v) = json_of(&h.app, key(Request::get("/v1/messages").body(Body::empty()).unwrap())).await;
    assert_eq!((s, kind(&v)), (StatusCode::METHOD_NOT_ALLOWED, (json!("error"), json!("invalid_request_error"))));
    // Full: Anthropic's 529 overloaded_error, with Retry-After.
    h.state.accepting.store(false, std::sync::atomic::Ordering::Relaxed);
    let (s, headers, b) = send(&h.app, key(post("/v1/messages", hello))).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!((s.as_u16(), kind(&v)), (529, (json!("error"), json!("overloaded_error"))));
    assert!(headers.get(header::RETRY_AFTER).is_some());
}

#[tokio::test]
async fn messages_stream_ends_with_an_error_event_when_the_rank_dies() {
    let Some(tok) = tokenizer() else { return };
    let mut script = encode(&tok, "Partial answer");
    script.push(DIE);
    let Some(h) = harness(&script).await else { return };
    let body = json!({"max_tokens": 30, "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let (s, _, bytes) = send(&h.app, post("/v1/messages", body)).await;
    assert_eq!(s, StatusCode::OK);
    let ev = responses_events(&bytes);
    let (last, before) = ev.split_last().unwrap();
    assert_eq!((last.0.as_str(), last.1["error"]["type"].clone()), ("error", json!("overloaded_error")), "{ev:?}");
    let text: String = before.iter().filter(|e| e.0 == "content_block_delta").map(|e| e.1["delta"]["text"].as_str().unwrap()).collect();
    assert_eq!(text, tok.decode(&script[..script.len() - 1], true).unwrap());
    assert!(before.iter().all(|e| e.0 != "message_stop"));
}
