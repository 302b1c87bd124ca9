//! End-to-end tests of the transport with clients written elsewhere: curl
//! (HTTP/1.1, h2c, HTTPS h2), hyper's own HTTP/2 client (RST_STREAM), aioquic
//! (HTTP/3, from PyPI), openssl (the SPKI pin). A test whose client is missing
//! prints a NOTICE and passes without checking.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use super::*;

// ---------- the app under test ----------

/// Sets its flag when dropped: stands in for the API layer's abort guard.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Clone, Default)]
struct Flags {
    /// The streaming body of /stall was dropped.
    stall: Arc<AtomicBool>,
    /// The handler future of /pending was dropped.
    pending: Arc<AtomicBool>,
}

fn sse_response(body: Body) -> axum::response::Response {
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap()
}

fn test_app(flags: Flags) -> Router {
    let stall = flags.stall.clone();
    let pending = flags.pending.clone();
    Router::new()
        .route(
            "/json",
            get(
                |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>, req: Request| async move {
                    axum::Json(serde_json::json!({
                        "version": format!("{:?}", req.version()),
                        "peer_ip": peer.ip().to_string(),
                        "client_ip": req.extensions().get::<ClientAddr>().map(|c| c.0.to_string()),
                    }))
                },
            ),
        )
        .route("/health", get(|| async { "ok" }))
        .route(
            "/sse",
            get(|| async {
                // Five events 200 ms apart: the client must see them one by one.
                let s = stream::unfold(0u32, |i| async move {
                    if i == 5 {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Some((
                        Ok::<_, Infallible>(Bytes::from(format!("data: token-{i}\n\n"))),
                        i + 1,
                    ))
                });
                sse_response(Body::from_stream(s))
            }),
        )
        .route(
            "/stall",
            get(move || {
                let guard = DropFlag(stall.clone());
                async move {
                    // One event, then nothing: a request waiting on the engine.
                    // Only a real disconnect signal can end it, not a failed write.
                    let s = stream::unfold((0u32, guard), |(i, g)| async move {
                        if i == 0 {
                            Some((
                                Ok::<_, Infallible>(Bytes::from_static(b"data: first\n\n")),
                                (1, g),
                            ))
                        } else {
                            std::future::pending::<()>().await;
                            None
                        }
                    });
                    sse_response(Body::from_stream(s))
                }
            }),
        )
        .route(
            "/pending",
            get(move || {
                let guard = DropFlag(pending.clone());
                async move {
                    let _g = guard;
                    std::future::pending::<()>().await;
                    "never"
                }
            }),
        )
        .route(
            "/echo",
            post(|body: Bytes| async move {
                let sum: u64 = body.iter().map(|b| *b as u64).sum();
                format!("{} {}", body.len(), sum)
            }),
        )
        .layer(DefaultBodyLimit::max(8 * 1024 * 1024))
}

// ---------- harness ----------

struct Harness {
    server: Option<RunningServer>,
    stop: Option<oneshot::Sender<()>>,
    /// Holds the server's certificates for as long as the server runs.
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(app: Router, limits: Limits) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServeConfig {
            host: "127.0.0.1".into(),
            port: 0,
            tls_port: Some(0),
            cert_dir: Some(dir.path().join("certs")),
            limits,
            ..ServeConfig::default()
        };
        let (tx, rx) = oneshot::channel::<()>();
        let server = serve(app, cfg, async move {
            let _ = rx.await;
        })
        .await
        .expect("server starts");
        Harness {
            server: Some(server),
            stop: Some(tx),
            _dir: dir,
        }
    }
    fn s(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }
    fn http_port(&self) -> u16 {
        self.s().http_addr().port()
    }
    fn tls_port(&self) -> u16 {
        self.s().tls_port().unwrap()
    }
    fn cert(&self) -> PathBuf {
        self.s().cert_path.clone().unwrap()
    }
    async fn shutdown(mut self) -> Duration {
        let t = Instant::now();
        let _ = self.stop.take().unwrap().send(());
        let s = self.server.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), s.wait())
            .await
            .expect("server stops")
            .expect("no task failed");
        t.elapsed()
    }
}

fn have(cmd: &str, args: &[&str]) -> bool {
    std::process::Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have_curl() -> bool {
    let ok = have("curl", &["--version"]);
    if !ok {
        eprintln!("NOTICE: curl not found; skipping curl checks");
    }
    ok
}

fn have_aioquic() -> bool {
    let ok = have("python3", &["-c", "import aioquic"]);
    if !ok {
        eprintln!(
            "NOTICE: python3 with aioquic not found (pip install aioquic); skipping HTTP/3 checks"
        );
    }
    ok
}

async fn curl(args: &[String]) -> (bool, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Split `curl -i` output into (lowercased header block, body).
fn split_head(out: &str) -> (String, String) {
    let (h, b) = out.split_once("\r\n\r\n").unwrap_or((out, ""));
    (h.to_ascii_lowercase(), b.to_string())
}

/// The aioquic client the server tests drive (it lives with the other test clients).
fn h3_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/h3_test_client.py")
}

/// Run the aioquic client to completion; its JSON lines.
async fn h3_run(h: &Harness, mode: &str, path: &str, arg: Option<&str>) -> Vec<serde_json::Value> {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(h3_script())
        .args(["127.0.0.1", &h.tls_port().to_string()])
        .arg(h.cert())
        .args([mode, path]);
    if let Some(a) = arg {
        cmd.arg(a);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("h3 client finishes")
        .expect("run python3");
    assert!(
        out.status.success(),
        "h3 client {mode} {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

async fn wait_flag(flag: &AtomicBool, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if flag.load(Ordering::SeqCst) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    flag.load(Ordering::SeqCst)
}

// ---------- TCP: curl ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_h1_h2c_https_h2_and_alt_svc() {
    let h = Harness::start(test_app(Flags::default()), Limits::default()).await;
    if !have_curl() {
        return;
    }
    let (hp, tp) = (h.http_port(), h.tls_port());
    let alt = format!("alt-svc: h3=\":{tp}\"; ma=86400");
    let resolve = format!("localhost:{tp}:127.0.0.1");
    let https = format!("https://localhost:{tp}/json");
    let cacert = h.cert().display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "-i".into(),
                "--http1.1".into(),
                format!("http://127.0.0.1:{hp}/json"),
            ],
            "HTTP/1.1",
        ),
        (
            vec![
                "-i".into(),
                "--http2-prior-knowledge".into(),
                format!("http://127.0.0.1:{hp}/json"),
            ],
            "HTTP/2.0",
        ),
        // Verified TLS: the self-signed certificate must name localhost.
        (
            vec![
                "-i".into(),
                "--http2".into(),
                "--cacert".into(),
                cacert.clone(),
                "--resolve".into(),
                resolve.clone(),
                https.clone(),
            ],
            "HTTP/2.0",
        ),
        (
            vec![
                "-i".into(),
                "--http1.1".into(),
                "--cacert".into(),
                cacert.clone(),
                "--resolve".into(),
                resolve.clone(),
                https.clone(),
            ],
            "HTTP/1.1",
        ),
        (
            vec![
                "-i".into(),
                "-k".into(),
                "--http2".into(),
                format!("https://127.0.0.1:{tp}/json"),
            ],
            "HTTP/2.0",
        ),
    ];
    for (args, want) in cases {
        let (ok, out, err) = curl(&args).await;
        assert!(ok, "curl {args:?}: {err}");
        let (head, body) = split_head(&out);
        assert!(head.contains(&alt), "no alt-svc in {head}");
        let v: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(v["version"], want, "curl {args:?}");
        assert_eq!(v["peer_ip"], "127.0.0.1");
    }

    // curl computes the pin itself: ours must match, and a wrong one must fail.
    let pin = h.s().spki_sha256_base64.clone().unwrap();
    let (ok, _, err) = curl(&[
        "-k".into(),
        "--pinnedpubkey".into(),
        format!("sha256//{pin}"),
        https.clone(),
        "--resolve".into(),
        resolve.clone(),
    ])
    .await;
    assert!(ok, "pinned request failed: {err}");
    let (ok, _, _) = curl(&[
        "-k".into(),
        "--pinnedpubkey".into(),
        "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
        https,
        "--resolve".into(),
        resolve,
    ])
    .await;
    assert!(!ok, "a wrong pin was accepted");

    // And the openssl pipeline from Chromium's documentation agrees.
    if have("openssl", &["version"]) {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl x509 -pubkey -noout -in '{cacert}' | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64"
            ))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pin);
    } else {
        eprintln!("NOTICE: openssl CLI missing; pin not cross-checked with it");
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_oversized_headers_get_431() {
    let limits = Limits {
        max_header_bytes: 16 * 1024,
        ..Limits::default()
    };
    let h = Harness::start(test_app(Flags::default()), limits).await;
    if !have_curl() {
        return;
    }
    let url = format!("http://127.0.0.1:{}/json", h.http_port());
    let big = format!("x-big: {}", "a".repeat(20 * 1024));
    let (_, out, _) = curl(&[
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "-H".into(),
        big,
        url.clone(),
    ])
    .await;
    assert_eq!(out, "431");
    let small = format!("x-small: {}", "a".repeat(4 * 1024));
    let (_, out, _) = curl(&[
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "-H".into(),
        small,
        url,
    ])
    .await;
    assert_eq!(out, "200");
    h.shutdown().await;
}

// ---------- TCP: disconnects ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_connection_close_drops_the_stream() {
    let flags = Flags::default();
    let h = Harness::start(test_app(flags.clone()), Limits::default()).await;
    let mut s = tokio::net::TcpStream::connect(h.s().http_addr())
        .await
        .unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: first") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!flags.stall.load(Ordering::SeqCst));
    drop(s);
    assert!(
        wait_flag(&flags.stall, Duration::from_secs(2)).await,
        "body not dropped after TCP close"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_connection_close_drops_a_pending_handler() {
    let flags = Flags::default();
    let h = Harness::start(test_app(flags.clone()), Limits::default()).await;
    let mut s = tokio::net::TcpStream::connect(h.s().http_addr())
        .await
        .unwrap();
    s.write_all(b"GET /pending HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    assert!(
        wait_flag(&flags.pending, Duration::from_secs(2)).await,
        "handler not dropped after TCP close"
    );
    h.shutdown().await;
}

/// hyper's HTTP/2 client resets the stream (RST_STREAM CANCEL) when the
/// response body is dropped; the connection itself stays up and serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rst_stream_drops_the_stream_and_keeps_the_connection() {
    use http_body_util::{BodyExt, Empty};
    let flags = Flags::default();
    let h = Harness::start(test_app(flags.clone()), Limits::default()).await;
    let tcp = tokio::net::TcpStream::connect(h.s().http_addr())
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn_task = tokio::spawn(conn);
    let req = |path: &str| {
        http::Request::get(format!("http://127.0.0.1/{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = sender.send_request(req("stall")).await.unwrap();
    assert_eq!(
        resp.headers()["alt-svc"],
        format!("h3=\":{}\"; ma=86400", h.tls_port())
    );
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    drop(body); // RST_STREAM
    assert!(
        wait_flag(&flags.stall, Duration::from_secs(2)).await,
        "body not dropped after RST_STREAM"
    );
    // Same connection, next request.
    let resp = sender.send_request(req("json")).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["version"], "HTTP/2.0");
    assert!(!conn_task.is_finished());

    // Closing the whole connection also reaches a pending handler.
    let mut sender2 = sender.clone();
    let pending = tokio::spawn(async move { sender2.send_request(req("pending")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn_task.abort();
    drop(sender);
    pending.abort();
    assert!(
        wait_flag(&flags.pending, Duration::from_secs(2)).await,
        "handler not dropped after h2 close"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_are_closed_but_busy_ones_are_not() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let h = Harness::start(test_app(Flags::default()), limits).await;
    // Busy: an SSE stream of 800 ms with 200 ms gaps outlives the idle timeout.
    let mut s = tokio::net::TcpStream::connect(h.s().http_addr())
        .await
        .unwrap();
    s.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("token-4") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "busy connection closed");
        got.extend_from_slice(&buf[..n]);
    }
    // Idle afterwards: the server closes it (EOF) within about 2x the timeout.
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return 0;
            }
        }
    })
    .await
    .expect("idle connection closed");
    assert_eq!(n, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    h.shutdown().await;
}

// ---------- HTTP/3: aioquic ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_json_sse_post_and_limits() {
    let limits = Limits {
        max_header_bytes: 16 * 1024,
        max_concurrent_streams: 37,
        ..Limits::default()
    };
    let h = Harness::start(test_app(Flags::default()), limits).await;
    if !have_aioquic() {
        return;
    }
    let r = h3_run(&h, "get", "/json", None).await;
    assert_eq!(r[0]["status"], 200);
    let v: serde_json::Value = serde_json::from_str(r[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(v["version"], "HTTP/3.0");
    assert_eq!(v["peer_ip"], "127.0.0.1");

    // SSE: events arrive one by one, as the handler yields them (200 ms apart).
    let r = h3_run(&h, "sse", "/sse", None).await;
    assert_eq!(r[0]["headers"]["content-type"], "text/event-stream");
    let chunks: Vec<&serde_json::Value> = r.iter().filter(|l| l.get("data").is_some()).collect();
    let text: String = chunks.iter().map(|c| c["data"].as_str().unwrap()).collect();
    let want: String = (0..5).map(|i| format!("data: token-{i}\n\n")).collect();
    assert_eq!(text, want);
    assert_eq!(chunks.len(), 5, "events were batched: {chunks:?}");
    let t: Vec<f64> = chunks.iter().map(|c| c["t"].as_f64().unwrap()).collect();
    for w in t.windows(2) {
        assert!(w[1] - w[0] > 0.1, "events not spaced: {t:?}");
    }
    assert_eq!(r.last().unwrap(), "end");

    // A 3 MB upload streams through the QUIC flow-control windows (1 MiB per stream).
    let size = 3 * 1024 * 1024;
    let r = h3_run(&h, "post", "/echo", Some(&size.to_string())).await;
    let sum: u64 = (0..size as u64).map(|i| i % 251).sum();
    assert_eq!(r[0]["body"], format!("{size} {sum}"));

    // Oversized header block: 431 from h3's SETTINGS_MAX_FIELD_SECTION_SIZE.
    let r = h3_run(&h, "bigheader", "/json", Some("20000")).await;
    assert_eq!(r[0]["status"], 431);

    // The concurrent-stream bound reaches the client as a transport parameter.
    let r = h3_run(&h, "params", "/", None).await;
    assert_eq!(r[0]["max_streams_bidi"], 37);
    assert_eq!(r[0]["alpn"], "h3");
    h.shutdown().await;
}

/// A client cancelling an HTTP/3 request mid-stream (STOP_SENDING, with or
/// without RESET_STREAM) or closing the connection reaches the handler at once,
/// while the connection (for stream-level cancels) stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_cancel_drops_the_stream() {
    if !have_aioquic() {
        return;
    }
    for (path, kind) in [
        ("/stall", "stop"),
        ("/stall", "both"),
        ("/stall", "close"),
        ("/pending", "early-both"),
        ("/pending", "early-close"),
    ] {
        let flags = Flags::default();
        let flag = if path == "/stall" {
            flags.stall.clone()
        } else {
            flags.pending.clone()
        };
        let h = Harness::start(test_app(flags), Limits::default()).await;
        let mut child = tokio::process::Command::new("python3")
            .arg(h3_script())
            .args(["127.0.0.1", &h.tls_port().to_string()])
            .arg(h.cert())
            .args(["cancel", path, kind])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .expect("client cancels")
            .unwrap();
        assert_eq!(line.as_deref(), Some("\"cancelled\""), "{path} {kind}");
        // The client keeps its connection (and process) alive for 5 s: the
        // flag must come from the cancel itself, not from the process exiting.
        assert!(
            wait_flag(&flag, Duration::from_secs(2)).await,
            "{path}: not dropped after {kind}"
        );
        assert!(child.try_wait().unwrap().is_none(), "client exited early");
        let _ = child.kill().await;
        h.shutdown().await;
    }
}

// ---------- shutdown ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_streams_and_stops_listening() {
    let h = Harness::start(test_app(Flags::default()), Limits::default()).await;
    let addr = h.s().http_addr();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // Shut down once the response has started.
    let mut first = [0u8; 4096];
    let n = s.read(&mut first).await.unwrap();
    let first = String::from_utf8_lossy(&first[..n]).into_owned();
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all).await;
        first + &String::from_utf8_lossy(&all)
    });
    let took = h.shutdown().await;
    // The in-flight stream ran to its end, then the connection closed.
    let got = reader.await.unwrap();
    assert!(got.contains("token-4"), "stream cut: {got}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_graceful_shutdown_finishes_streams() {
    if !have_aioquic() {
        return;
    }
    let h = Harness::start(test_app(Flags::default()), Limits::default()).await;
    let mut child = tokio::process::Command::new("python3")
        .arg(h3_script())
        .args(["127.0.0.1", &h.tls_port().to_string()])
        .arg(h.cert())
        .args(["sse", "/sse"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // Shut down once the response has started (headers line received).
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(15), stdout.read_line(&mut text))
        .await
        .expect("response starts")
        .unwrap();
    let took = h.shutdown().await;
    stdout.read_to_string(&mut text).await.unwrap();
    assert!(
        text.contains("token-4") && text.contains("\"end\""),
        "stream cut: {text}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_expiry_cuts_stalled_streams() {
    let flags = Flags::default();
    let limits = Limits {
        shutdown_grace: Duration::from_millis(300),
        ..Limits::default()
    };
    let h = Harness::start(test_app(flags.clone()), limits).await;
    let mut s = tokio::net::TcpStream::connect(h.s().http_addr())
        .await
        .unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf).await.unwrap();
    let took = h.shutdown().await;
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(flags.stall.load(Ordering::SeqCst));
}

// ---------- startup errors ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let base = ServeConfig {
        host: "127.0.0.1".into(),
        port: 0,
        tls_port: Some(0),
        cert_dir: Some(dir.path().join("certs")),
        ..ServeConfig::default()
    };
    let app = || test_app(Flags::default());

    // Port in use.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = serve(
        app(),
        ServeConfig {
            port,
            ..base.clone()
        },
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("already uses"),
        "{e}"
    );

    // Bad PEM.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = serve(
        app(),
        ServeConfig {
            ssl_certfile: Some(junk.clone()),
            ssl_keyfile: Some(junk.clone()),
            ..base.clone()
        },
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("junk.pem") && e.contains("CERTIFICATE"), "{e}");

    // Only one of the two files.
    let e = serve(
        app(),
        ServeConfig {
            ssl_certfile: Some(junk),
            ..base.clone()
        },
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ServeError::HalfTlsFiles), "{e}");

    // Certificate and key that do not belong together.
    let a = ferry_certs::create_self_signed(&dir.path().join("a"), &["localhost".into()]).unwrap();
    let b = ferry_certs::create_self_signed(&dir.path().join("b"), &["localhost".into()]).unwrap();
    let e = serve(
        app(),
        ServeConfig {
            ssl_certfile: a.cert_path.clone(),
            ssl_keyfile: b.key_path.clone(),
            ..base.clone()
        },
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot be used together"), "{e}");

    // Unresolvable host.
    let e = serve(
        app(),
        ServeConfig {
            host: "no-such-host.invalid".into(),
            ..base.clone()
        },
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("no-such-host.invalid"), "{e}");

    // The operator's own files work, and the pin is theirs.
    let (tx, rx) = oneshot::channel::<()>();
    let s = serve(
        app(),
        ServeConfig {
            ssl_certfile: a.cert_path.clone(),
            ssl_keyfile: a.key_path.clone(),
            ..base
        },
        async move {
            let _ = rx.await;
        },
    )
    .await
    .unwrap();
    assert_eq!(
        s.spki_sha256_base64.as_deref(),
        Some(a.spki_sha256_base64.as_str())
    );
    let _ = tx.send(());
    s.wait().await.unwrap();
}

// ---------- connection caps, PROXY protocol, X-Forwarded-For ----------

/// Sends `head` (and `body`) on a fresh connection and reads until the server
/// closes it (or 10 s pass): the whole answer.
async fn raw_exchange(addr: std::net::SocketAddr, head: &[u8], body: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Holds a connection open with a stalled stream; dropping it closes it.
async fn hold(addr: std::net::SocketAddr, prefix: &[u8]) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(prefix).await.unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    s
}

fn json_body(answer: &str) -> serde_json::Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // A chunked body: the JSON is the line that starts with '{'.
    let line = body.lines().find(|l| l.starts_with('{')).unwrap_or(body);
    serde_json::from_str(line).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_every_http_version_reads_503_and_probes_answer() {
    let limits = Limits { max_connections: 2, ..Limits::default() };
    let h = Harness::start(test_app(Flags::default()), limits).await;
    let addr = h.s().http_addr();
    let held = vec![hold(addr, b"").await, hold(addr, b"").await];

    // HTTP/1.1: 503, Retry-After, OpenAI's error shape, then the connection closes.
    let a = raw_exchange(addr, b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n", b"").await;
    let head = a.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 503"), "{a}");
    assert!(head.contains("retry-after: 1\r\n") && head.contains("connection: close"), "{a}");
    let v = json_body(&a);
    assert_eq!(v["error"]["type"], "ServiceUnavailableError", "{a}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--max-connections"), "{a}");
    // A client still sending a body reads the answer too.
    let body = vec![b'x'; 100_000];
    let head = format!("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len());
    let a = raw_exchange(addr, head.as_bytes(), &body).await;
    assert!(a.starts_with("HTTP/1.1 503"), "{a}");
    // The probe path still reaches the app.
    let a = raw_exchange(addr, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", b"").await;
    assert!(a.starts_with("HTTP/1.1 200") && a.ends_with("ok"), "{a}");

    // HTTP/2 (prior knowledge): the stream gets the 503, then GOAWAY ends the connection.
    use http_body_util::{BodyExt, Empty};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn_task = tokio::spawn(conn);
    let req = http::Request::get("http://127.0.0.1/json").body(Empty::<Bytes>::new()).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["error"]["code"], 503);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn_task).await;
    assert!(ended.is_ok(), "the refused HTTP/2 connection stays open");

    // HTTP/3: the request is answered 503 too.
    if have_aioquic() {
        let r = h3_run(&h, "get", "/json", None).await;
        assert_eq!(r[0]["status"], 503, "{r:?}");
        assert_eq!(r[0]["headers"]["retry-after"], "1", "{r:?}");
        let r = h3_run(&h, "get", "/health", None).await;
        assert_eq!(r[0]["status"], 200, "{r:?}");
    }

    // Places freed are served in full again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = raw_exchange(addr, b"GET /json HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", b"").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    h.shutdown().await;
}

fn proxy_v2(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut b = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    b.extend_from_slice(&[0x21, 0x11, 0, 12]);
    b.extend_from_slice(&src);
    b.extend_from_slice(&[127, 0, 0, 1]);
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&80u16.to_be_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_name_the_client_and_others_do_not() {
    let limits = Limits {
        trusted_proxies: TrustedProxies::parse("127.0.0.1").unwrap(),
        max_connections_per_addr: Some(1),
        ..Limits::default()
    };
    let h = Harness::start(test_app(Flags::default()), limits).await;
    let addr = h.s().http_addr();
    let get = b"GET /json HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let client = |a: &str| json_body(a)["client_ip"].as_str().map(str::to_string);

    let a = raw_exchange(addr, &[&b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 80\r\n"[..], get].concat(), b"").await;
    assert_eq!(client(&a).as_deref(), Some("198.51.100.7"), "{a}");
    assert_eq!(json_body(&a)["peer_ip"], "127.0.0.1");
    let a = raw_exchange(addr, &[&proxy_v2([198, 51, 100, 8], 4242)[..], get].concat(), b"").await;
    assert_eq!(client(&a).as_deref(), Some("198.51.100.8"), "{a}");
    // No header from a trusted peer: the peer itself, or whom X-Forwarded-For names.
    let a = raw_exchange(addr, get, b"").await;
    assert_eq!(client(&a).as_deref(), Some("127.0.0.1"), "{a}");
    let xff = b"GET /json HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 6.6.6.6, 198.51.100.9\r\nconnection: close\r\n\r\n";
    let a = raw_exchange(addr, xff, b"").await;
    assert_eq!(client(&a).as_deref(), Some("198.51.100.9"), "{a}");
    // A malformed header closes the connection unanswered.
    let a = raw_exchange(addr, &[&b"PROXY TCP4 1.2.3.4 nope\r\n"[..], get].concat(), b"").await;
    assert_eq!(a, "");

    // The per-address cap counts the named client, not the proxy.
    let held = hold(addr, b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 80\r\n").await;
    let _also_held = hold(addr, b"PROXY TCP4 198.51.100.6 127.0.0.1 5555 80\r\n").await;
    let a = raw_exchange(addr, &[&b"PROXY TCP4 198.51.100.7 127.0.0.1 5556 80\r\n"[..], get].concat(), b"").await;
    assert!(a.starts_with("HTTP/1.1 503") && a.contains("--max-connections-per-addr"), "{a}");
    let a = raw_exchange(addr, &[&b"PROXY TCP4 198.51.100.5 127.0.0.1 5556 80\r\n"[..], get].concat(), b"").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    drop(held);
    h.shutdown().await;

    // Trusting nobody: the header is not read (HTTP refuses it as a request)
    // and X-Forwarded-For is ignored.
    let h = Harness::start(test_app(Flags::default()), Limits::default()).await;
    let addr = h.s().http_addr();
    let a = raw_exchange(addr, &[&b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 80\r\n"[..], get].concat(), b"").await;
    assert!(!a.contains("198.51.100.7") && !a.starts_with("HTTP/1.1 200"), "{a}");
    let a = raw_exchange(addr, xff, b"").await;
    assert_eq!(client(&a).as_deref(), Some("127.0.0.1"), "{a}");
    h.shutdown().await;
}
