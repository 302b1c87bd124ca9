//! End-to-end runs against small servers written here: HTTP/1.1 over a raw
//! tokio TCP socket, HTTP/2 with hyper's server, HTTP/3 with quinn + h3. Each
//! request's prompt picks its behaviour: a good stream, HTTP 500, a stall past
//! the timeout, a connection closed mid-stream, a bad JSON chunk, or a body
//! that ends without [DONE].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::record::FailureKind;
use super::*;

const PROMPT_TOKENS: u64 = 42;
const FIRST_DELAY_MS: u64 = 40;
const GAP_MS: u64 = 15;

#[derive(Debug, Clone)]
enum Act {
    Head200,
    Error500(String),
    Chunk(String),
    Sleep(u64),
    /// Drop the connection (or reset the stream) without finishing the body.
    Abort,
    /// End the body cleanly.
    Finish,
}

fn content_chunk(text: &str) -> String {
    format!("data: {}\n\n", serde_json::json!({"choices": [{"index": 0, "text": text, "finish_reason": null}]}))
}

/// The behaviour the prompt asks for.
fn script(prompt: &str, max_tokens: u64) -> Vec<Act> {
    let mut acts = Vec::new();
    let word = prompt.split_whitespace().next().unwrap_or("ok");
    if word == "fail" {
        return vec![Act::Error500("{\"error\":{\"message\":\"injected failure\",\"type\":\"server_error\"}}".into())];
    }
    acts.push(Act::Head200);
    acts.push(Act::Sleep(FIRST_DELAY_MS));
    match word {
        "stall" => {
            acts.push(Act::Chunk(content_chunk("a")));
            acts.push(Act::Sleep(120_000));
            acts.push(Act::Finish);
        }
        "close" => {
            acts.push(Act::Chunk(content_chunk("a")));
            acts.push(Act::Sleep(GAP_MS));
            acts.push(Act::Chunk(content_chunk("b")));
            acts.push(Act::Abort);
        }
        "badjson" => {
            acts.push(Act::Chunk(content_chunk("a")));
            acts.push(Act::Chunk("data: {\"choices\": [\n\n".into()));
            acts.push(Act::Chunk("data: [DONE]\n\n".into()));
            acts.push(Act::Finish);
        }
        "nodone" => {
            acts.push(Act::Chunk(content_chunk("a")));
            acts.push(Act::Finish);
        }
        _ => {
            for i in 0..max_tokens {
                if i > 0 {
                    acts.push(Act::Sleep(GAP_MS));
                }
                acts.push(Act::Chunk(content_chunk(&format!(" t{i}"))));
            }
            acts.push(Act::Chunk(format!(
                "data: {}\n\n",
                serde_json::json!({"choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": max_tokens, "total_tokens": PROMPT_TOKENS + max_tokens}})
            )));
            acts.push(Act::Chunk("data: [DONE]\n\n".into()));
            acts.push(Act::Finish);
        }
    }
    acts
}

/// What the servers saw, for assertions.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    bodies: Mutex<Vec<serde_json::Value>>,
}

const MODELS_JSON: &str = "{\"object\":\"list\",\"data\":[{\"id\":\"mock-model\",\"object\":\"model\"}]}";

/// Parses a request body and returns the script for it.
fn plan_for(body: &[u8], seen: &Seen) -> Vec<Act> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let prompt = v
        .get("prompt")
        .and_then(|p| p.as_str())
        .or_else(|| v.pointer("/messages/0/content").and_then(|p| p.as_str()))
        .unwrap_or("")
        .to_string();
    let max_tokens = v.get("max_tokens").and_then(serde_json::Value::as_u64).unwrap_or(4);
    seen.bodies.lock().unwrap().push(v);
    script(&prompt, max_tokens)
}

// ---------------------------------------------------------------- HTTP/1.1

async fn h1_server(seen: Arc<Seen>) -> String {
    h1_server_tls(seen, None).await
}

/// HTTP/1.1 over plain TCP, or over TLS when given an acceptor.
async fn h1_server_tls(seen: Arc<Seen>, tls: Option<tokio_rustls::TlsAcceptor>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            seen.connections.fetch_add(1, Ordering::SeqCst);
            let (seen, tls) = (seen.clone(), tls.clone());
            tokio::spawn(async move {
                let _ = match tls {
                    None => h1_conn(sock, seen).await,
                    Some(acc) => match acc.accept(sock).await {
                        Ok(s) => h1_conn(s, seen).await,
                        Err(_) => Ok(()),
                    },
                };
            });
        }
    });
    format!("{scheme}://localhost:{}", addr.port())
}

/// A TLS acceptor on a fresh self-signed "localhost" certificate offering `alpn`; and its pin.
fn tls_acceptor(alpn: &[u8]) -> (tokio_rustls::TlsAcceptor, String) {
    use base64::Engine as _;
    use sha2::Digest as _;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
    let pin = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&key)));
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    (tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), pin)
}

/// Serves requests on one keep-alive connection until the client leaves.
async fn h1_conn<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut sock: S, seen: Arc<Seen>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut tmp = [0u8; 4096];
            let n = sock.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut tmp = [0u8; 4096];
            let n = sock.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        let body: Vec<u8> = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        if head.starts_with("get /v1/models") {
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{MODELS_JSON}", MODELS_JSON.len());
            sock.write_all(resp.as_bytes()).await?;
            continue;
        }
        for act in plan_for(&body, &seen) {
            match act {
                Act::Head200 => {
                    sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n").await?;
                }
                Act::Error500(b) => {
                    let r = format!("HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len());
                    sock.write_all(r.as_bytes()).await?;
                }
                Act::Chunk(c) => sock.write_all(format!("{:x}\r\n{c}\r\n", c.len()).as_bytes()).await?,
                Act::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Act::Abort => return Ok(()),
                Act::Finish => sock.write_all(b"0\r\n\r\n").await?,
            }
        }
    }
}

// ---------------------------------------------------------------- HTTP/2

/// A response body fed through a channel; an Err item resets the stream.
struct ChanBody(tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, std::io::Error>>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx)
    }
}

async fn h2_server(seen: Arc<Seen>) -> String {
    h2_server_tls(seen, None).await
}

async fn h2_server_tls(seen: Arc<Seen>, tls: Option<tokio_rustls::TlsAcceptor>) -> String {
    use http_body_util::BodyExt;
    use hyper::body::Frame;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls_on = tls.is_some();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            seen.connections.fetch_add(1, Ordering::SeqCst);
            let (seen, tls) = (seen.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let (tx, rx) = tokio::sync::mpsc::channel(64);
                        let is_models = req.uri().path() == "/v1/models";
                        let body = req.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
                        let acts = if is_models {
                            vec![Act::Chunk(MODELS_JSON.into()), Act::Finish]
                        } else {
                            plan_for(&body, &seen)
                        };
                        let status = if matches!(acts.first(), Some(Act::Error500(_))) { 500 } else { 200 };
                        tokio::spawn(async move {
                            for act in acts {
                                match act {
                                    Act::Head200 => {}
                                    Act::Error500(b) | Act::Chunk(b) => {
                                        if tx.send(Ok(Frame::data(Bytes::from(b)))).await.is_err() {
                                            return;
                                        }
                                    }
                                    Act::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                                    Act::Abort => {
                                        let _ = tx.send(Err(std::io::Error::other("abort"))).await;
                                        return;
                                    }
                                    Act::Finish => return,
                                }
                            }
                        });
                        let mut resp = hyper::Response::new(ChanBody(rx));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = match tls {
                    None => builder.serve_connection(hyper_util::rt::TokioIo::new(sock), svc).await,
                    Some(acc) => match acc.accept(sock).await {
                        Ok(s) => builder.serve_connection(hyper_util::rt::TokioIo::new(s), svc).await,
                        Err(_) => Ok(()),
                    },
                };
            });
        }
    });
    let scheme = if tls_on { "https" } else { "http" };
    format!("{scheme}://localhost:{}", addr.port())
}

// ---------------------------------------------------------------- HTTP/3

/// A quinn + h3 server on a fresh self-signed certificate; returns the URL,
/// the SPKI pin and the certificate's PEM.
async fn h3_server(seen: Arc<Seen>) -> (String, String, String) {
    use base64::Engine as _;
    use sha2::Digest as _;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
    let pin = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&key)));
    let cert_pem = cert.pem();
    let cert_der = cert.der().clone();
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let qtls = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let cfg = quinn::ServerConfig::with_crypto(Arc::new(qtls));
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let Ok(mut h3c) = h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(conn)).await else { return };
                while let Ok(Some(resolver)) = h3c.accept().await {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let Ok((req, mut stream)) = resolver.resolve_request().await else { return };
                        let mut body = Vec::new();
                        while let Ok(Some(mut chunk)) = stream.recv_data().await {
                            use bytes::Buf;
                            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
                        }
                        let acts = if req.uri().path() == "/v1/models" {
                            vec![Act::Head200, Act::Chunk(MODELS_JSON.into()), Act::Finish]
                        } else {
                            plan_for(&body, &seen)
                        };
                        for act in acts {
                            let r = match act {
                                Act::Head200 => stream.send_response(http::Response::builder().status(200).header("content-type", "text/event-stream").body(()).unwrap()).await,
                                Act::Error500(b) => {
                                    let _ = stream.send_response(http::Response::builder().status(500).body(()).unwrap()).await;
                                    let _ = stream.send_data(Bytes::from(b)).await;
                                    stream.finish().await
                                }
                                Act::Chunk(c) => stream.send_data(Bytes::from(c)).await,
                                Act::Sleep(ms) => {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                    Ok(())
                                }
                                Act::Abort => {
                                    stream.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                                    return;
                                }
                                Act::Finish => stream.finish().await,
                            };
                            if r.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
    });
    (format!("https://localhost:{}", addr.port()), pin, cert_pem)
}

// ---------------------------------------------------------------- helpers

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    a: BenchServeArgs,
}

fn args(list: &[&str]) -> BenchServeArgs {
    let mut v = vec!["bench"];
    v.extend_from_slice(list);
    Cli::try_parse_from(v).unwrap().a
}

/// A JSONL dataset whose prompts choose each request's behaviour.
fn dataset(dir: &std::path::Path, prompts: &[&str], output_len: u64) -> String {
    let p = dir.join("d.jsonl");
    let text: String = prompts
        .iter()
        .map(|pr| format!("{}\n", serde_json::json!({"prompt": pr, "output_len": output_len})))
        .collect();
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn count(outcome: &BenchOutcome, kind: FailureKind) -> usize {
    outcome.records.iter().filter(|r| r.failure.as_ref().map(|f| f.kind) == Some(kind)).count()
}

/// Checks every successful request against what the mock server did.
fn check_good_requests(outcome: &BenchOutcome, output_len: u64) {
    for r in outcome.records.iter().filter(|r| r.success()) {
        assert_eq!(r.output_tokens, output_len);
        assert!(r.output_tokens_from_server);
        assert_eq!(r.prompt_tokens, PROMPT_TOKENS);
        assert!(r.prompt_tokens_from_server);
        assert_eq!(r.itl.len() as u64, output_len - 1);
        // The server's sleeps are lower bounds (scheduling only lengthens them);
        // single gaps are not, since two events can arrive in one read.
        assert!(r.ttft >= FIRST_DELAY_MS as f64 / 1000.0, "ttft {}", r.ttft);
        let min_e2e = (FIRST_DELAY_MS + (output_len - 1) * GAP_MS) as f64 / 1000.0;
        assert!(r.latency >= min_e2e, "e2e {} < {min_e2e}", r.latency);
        let want_e2e = r.ttft + r.itl.iter().sum::<f64>();
        assert!((r.latency - want_e2e).abs() < 1e-6, "{} vs {want_e2e}", r.latency);
    }
    let m = &outcome.metrics;
    // TPOT recomputed by hand from the records: (e2e - ttft) / (tokens - 1), in ms.
    let ok: Vec<_> = outcome.records.iter().filter(|r| r.success()).collect();
    let tpot_hand = ok.iter().map(|r| (r.latency - r.ttft) / (r.output_tokens - 1) as f64).sum::<f64>() / ok.len() as f64 * 1000.0;
    assert!((m.tpot_ms.mean - tpot_hand).abs() < 1e-9, "{} vs {tpot_hand}", m.tpot_ms.mean);
    assert_eq!(m.total_output_tokens, output_len * m.completed as u64);
    assert_eq!(m.total_input_tokens, PROMPT_TOKENS * m.completed as u64);
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_run_measures_good_requests_and_counts_each_failure() {
    let seen = Arc::new(Seen::default());
    let base = h1_server(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let prompts = ["ok a", "fail a", "ok b", "stall", "ok c", "close", "badjson", "ok d", "nodone", "fail b", "ok e"];
    let ds = dataset(dir.path(), &prompts, 6);
    let result_path = dir.path().join("r.json");
    let a = args(&[
        "--base-url", &base, "--dataset-name", "jsonl", "--dataset-path", &ds,
        "--num-prompts", "11", "--timeout", "1.5", "--max-duration", "30", "--disable-tqdm",
        "--metric-percentiles", "50,99", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--save-result", result_path.to_str().unwrap(),
    ]);
    let t0 = Instant::now();
    let outcome = bench_serve(&a).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "run took {:?}", t0.elapsed());

    assert_eq!(outcome.metrics.completed, 5, "{}", outcome.text);
    assert_eq!(outcome.metrics.failed, 6);
    assert_eq!(count(&outcome, FailureKind::HttpStatus), 2);
    assert_eq!(count(&outcome, FailureKind::Timeout), 1);
    assert_eq!(count(&outcome, FailureKind::ConnectionReset), 1, "{}", outcome.text);
    assert_eq!(count(&outcome, FailureKind::BadJson), 1);
    assert_eq!(count(&outcome, FailureKind::StreamClosedEarly), 1);
    let http_fail = outcome.records[1].failure.as_ref().unwrap();
    assert_eq!(http_fail.status, Some(500));
    assert_eq!(http_fail.message, "injected failure");
    check_good_requests(&outcome, 6);

    // The model came from GET /v1/models; bodies carry vLLM's streaming fields.
    let bodies = seen.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 11);
    for b in &bodies {
        assert_eq!(b["model"], "mock-model");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["max_tokens"], 6);
        assert_eq!(b["temperature"], 0.0);
    }

    assert!(outcome.text.contains("HTTP 500:"), "{}", outcome.text);
    assert!(outcome.text.contains("P50 E2EL (ms):"));
    run_bench_compare(BenchCompareArgs { files: vec![result_path.clone()] }).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&result_path).unwrap()).unwrap();
    assert_eq!(saved["completed"], 5);
    assert_eq!(saved["failures_by_reason"]["HTTP 500"], 2);
    assert_eq!(saved["requests"].as_array().unwrap().len(), 11);
    assert_eq!(saved["settings"]["timeout"], 1.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_stops_a_stalled_run() {
    let seen = Arc::new(Seen::default());
    let base = h1_server(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), &["stall", "stall", "stall", "stall"], 4);
    // Rate 2/s: arrivals at about 0.5 s apart, so some are never sent before the 1.2 s cut.
    let a = args(&[
        "--base-url", &base, "--model", "m", "--dataset-name", "jsonl", "--dataset-path", &ds,
        "--num-prompts", "4", "--request-rate", "2", "--burstiness", "inf", "--timeout", "100",
        "--max-duration", "1.2", "--disable-tqdm",
    ]);
    let t0 = Instant::now();
    let outcome = bench_serve(&a).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(outcome.metrics.completed, 0);
    assert_eq!(count(&outcome, FailureKind::Cancelled), 4);
    let msgs: Vec<&str> = outcome.records.iter().map(|r| r.failure.as_ref().unwrap().message.as_str()).collect();
    // Arrivals at 0.5, 1.0, 1.5, 2.0 s: two were in flight, two never sent.
    assert_eq!(msgs.iter().filter(|m| m.starts_with("in flight")).count(), 2, "{msgs:?}");
    assert_eq!(msgs.iter().filter(|m| m.starts_with("not sent")).count(), 2, "{msgs:?}");
    // run_bench_serve turns "nothing succeeded" into an error after reporting.
    assert!(run_bench_serve(a).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_multiplexes_over_one_connection() {
    let seen = Arc::new(Seen::default());
    let base = h2_server(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), &["ok", "ok", "fail", "ok", "close", "ok", "ok", "ok"], 5);
    let a = args(&[
        "--base-url", &base, "--http", "2", "--dataset-name", "jsonl", "--dataset-path", &ds,
        "--num-prompts", "8", "--timeout", "5", "--disable-tqdm",
    ]);
    let outcome = bench_serve(&a).await.unwrap();
    assert_eq!(outcome.metrics.completed, 6, "{}", outcome.text);
    assert_eq!(count(&outcome, FailureKind::HttpStatus), 1);
    assert_eq!(count(&outcome, FailureKind::ConnectionReset), 1, "{}", outcome.text);
    check_good_requests(&outcome, 5);
    // All 8 requests ran at once (rate inf) over a single HTTP/2 connection.
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    assert!(outcome.metrics.max_concurrent_requests >= 2);
    assert!(outcome.text.contains("HTTP/2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_with_spki_pin_over_one_quic_connection() {
    let seen = Arc::new(Seen::default());
    let (base, pin, pem) = h3_server(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), &["ok", "ok", "fail", "ok", "close", "ok", "ok"], 4);
    let a = args(&[
        "--base-url", &base, "--http", "3", "--tls-spki-pin", &pin, "--dataset-name", "jsonl",
        "--dataset-path", &ds, "--num-prompts", "7", "--max-concurrency", "3", "--timeout", "5",
        "--num-warmups", "2", "--disable-tqdm", "--endpoint", "/v1/chat/completions",
    ]);
    let outcome = bench_serve(&a).await.unwrap();
    assert_eq!(outcome.warmup_failures, 0);
    assert_eq!(outcome.metrics.completed, 5, "{}", outcome.text);
    assert_eq!(count(&outcome, FailureKind::HttpStatus), 1);
    assert_eq!(count(&outcome, FailureKind::ConnectionReset), 1, "{}", outcome.text);
    check_good_requests(&outcome, 4);
    assert!(outcome.metrics.max_concurrent_requests <= 3);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    // Chat bodies: messages, no prompt.
    let bodies = seen.bodies.lock().unwrap().clone();
    assert!(bodies.iter().all(|b| b["messages"][0]["role"] == "user" && b.get("prompt").is_none()));
    assert!(outcome.text.contains("HTTP/3"));

    // The same server trusted through --cacert, and through --insecure.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pem).unwrap();
    let mut by_ca = a.clone();
    by_ca.tls_spki_pin = None;
    by_ca.cacert = Some(ca);
    by_ca.num_prompts = 2;
    by_ca.num_warmups = 0;
    assert_eq!(bench_serve(&by_ca).await.unwrap().metrics.completed, 2);
    let mut insecure = by_ca.clone();
    insecure.cacert = None;
    insecure.insecure = true;
    assert_eq!(bench_serve(&insecure).await.unwrap().metrics.completed, 2);
    // A CA that did not sign the server's certificate is refused.
    let other = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
    let wrong_ca = dir.path().join("wrong.pem");
    std::fs::write(&wrong_ca, other.pem()).unwrap();
    let mut bad_ca = by_ca.clone();
    bad_ca.cacert = Some(wrong_ca);
    assert!(bench_serve(&bad_ca).await.is_err());

    // A wrong pin never reaches the server's handler.
    let mut wrong = a.clone();
    wrong.tls_spki_pin = Some(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]));
    let err = bench_serve(&wrong).await.err().expect("wrong pin must fail");
    assert!(format!("{err:#}").contains("handshake"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_alpn_for_http2_and_http11() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), &["ok", "ok", "fail", "ok"], 3);
    for (version, alpn) in [("2", &b"h2"[..]), ("1.1", &b"http/1.1"[..])] {
        let seen = Arc::new(Seen::default());
        let (acc, pin) = tls_acceptor(alpn);
        let base = if version == "2" { h2_server_tls(seen.clone(), Some(acc)).await } else { h1_server_tls(seen.clone(), Some(acc)).await };
        let a = args(&[
            "--base-url", &base, "--http", version, "--tls-spki-pin", &pin, "--model", "m",
            "--dataset-name", "jsonl", "--dataset-path", &ds, "--num-prompts", "4",
            "--max-concurrency", "1", "--timeout", "5", "--disable-tqdm",
        ]);
        let outcome = bench_serve(&a).await.unwrap();
        assert_eq!(outcome.metrics.completed, 3, "HTTP/{version}: {}", outcome.text);
        assert_eq!(count(&outcome, FailureKind::HttpStatus), 1);
        check_good_requests(&outcome, 3);
        // One at a time: HTTP/2 keeps its one connection; HTTP/1.1 opens one
        // per request (a server's close after a response must not race reuse).
        let want = if version == "2" { 1 } else { 4 };
        assert_eq!(seen.connections.load(Ordering::SeqCst), want, "HTTP/{version}");
    }
}
