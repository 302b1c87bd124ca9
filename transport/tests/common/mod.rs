//! Shared by the integration tests: a throwaway cluster CA, TLS configs, and a
//! connected pair of ends for each link (the real quinn on 127.0.0.1).
#![allow(dead_code, reason = "every test binary compiles this module and uses only part of it")]

use std::net::SocketAddr;
use std::sync::Arc;

use ferry_transport::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub(crate) struct Ca {
    cert: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap().der().clone();
        Ca { cert, issuer: rcgen::Issuer::new(params, key) }
    }

    /// A leaf certificate for `name` signed by this CA, and its key.
    pub(crate) fn leaf(&self, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        // As a ferry node certificate: the node's name is its common name.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        Arc::new(roots)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The API node's TLS: its certificate from `ca`, client certificates required
/// and checked against `ca`.
pub(crate) fn server_tls(ca: &Ca) -> Arc<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(ca.roots(), provider()).build().unwrap();
    let (chain, key) = ca.leaf("localhost");
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(cfg)
}

/// A headless node's TLS: trusts `trust` for the server, presents a certificate from `issuer`.
pub(crate) fn client_tls(trust: &Ca, issuer: &Ca) -> Arc<rustls::ClientConfig> {
    let (chain, key) = issuer.leaf("headless-node");
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(ca_roots(trust))
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(cfg)
}

fn ca_roots(ca: &Ca) -> rustls::RootCertStore {
    (*ca.roots()).clone()
}

pub(crate) fn listener(ca: &Ca) -> (RpcListener, SocketAddr) {
    let l = RpcListener::bind("127.0.0.1:0".parse().unwrap(), server_tls(ca)).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

pub(crate) async fn flume_pair() -> (GatewayEnd, EngineEnd) {
    flume_link()
}

pub(crate) async fn quic_pair() -> (GatewayEnd, EngineEnd) {
    let ca = Ca::new("test cluster CA");
    let (l, addr) = listener(&ca);
    let tls = client_tls(&ca, &ca);
    let (accepted, dialed) = tokio::join!(l.accept(), dial(addr, "localhost", tls));
    let (gw, _peer) = accepted.expect("listener open").expect("accepted");
    // The listener's handle may go: its endpoint lives while connections do.
    (gw, dialed.expect("dialed"))
}

pub(crate) fn hello(rank: u32, vocab_size: u32) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        rank,
        model: "test-model".into(),
        fingerprint: ModelFingerprint { config: 1, tensors: 2 },
        vocab_size,
        max_model_len: 1 << 20,
        num_kv_blocks: 64,
        block_size: 16,
        node: "n".into(),
    }
}

pub(crate) fn add(id: RequestId, prompt_tokens: Vec<u32>) -> ToEngine {
    ToEngine::Command(EngineCommand::Add(Box::new(EngineRequest::new(id, prompt_tokens, SamplingParams::default()))))
}

pub(crate) fn outputs(rank: u32, id: RequestId, new_tokens: Vec<u32>) -> FromEngine {
    FromEngine::Outputs(EngineOutputs {
        rank,
        outputs: vec![TokenOutput { id, index: 0, new_tokens, logprobs: None, finish: None, num_cached_tokens: 0, prompt_logprobs: None, timing: None }],
        stats: EngineStats::default(),
        kv_events: Vec::new(),
    })
}

pub(crate) fn accepted() -> ToEngine {
    ToEngine::Welcome(Welcome { protocol_version: PROTOCOL_VERSION, accepted: true, reason: None, rank: 0, retry: false })
}

/// Hello from the engine, Welcome from the gateway; both checked with the handshake.
pub(crate) async fn handshake(gw: &mut GatewayEnd, eng: EngineEnd, rank: u32, vocab: u32) -> EngineEnd {
    let eng = std::thread::spawn(move || {
        let mut eng = eng;
        eng.tx.send(FromEngine::Hello(hello(rank, vocab))).unwrap();
        match eng.rx.recv().unwrap() {
            ToEngine::Welcome(w) => handshake::check_welcome(&w, rank).unwrap(),
            other => panic!("expected Welcome, got {other:?}"),
        }
        eng
    });
    let FromEngine::Hello(h) = gw.rx.recv().await.unwrap() else { panic!("expected Hello") };
    let exp = handshake::Expectations {
        protocol_version: PROTOCOL_VERSION,
        data_parallel_size: rank + 1,
        elastic: false,
        config_fingerprint: 1,
        tensors_fingerprint: None,
        block_size: None,
    };
    let checked = handshake::check_hello(&h, &exp, &|_| false);
    gw.tx.send(ToEngine::Welcome(handshake::welcome(&h, &checked))).unwrap();
    checked.unwrap();
    tokio::task::spawn_blocking(move || eng.join().unwrap()).await.unwrap()
}

/// The payload of `msg` as a hostile peer writes it: the codec version and the
/// postcard bytes, with none of the sender's checks or splitting.
pub(crate) fn raw_payload<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut payload = vec![codec::CODEC_VERSION];
    payload.extend(postcard::to_stdvec(msg).unwrap());
    payload
}

/// The link's preamble (private to the transport; written here by hand).
pub(crate) const PREAMBLE: &[u8; 8] = b"ferry\0l1";

/// One end of a QUIC link driven byte by byte by a test: a hostile peer that
/// got through TLS (it holds a certificate of the cluster CA).
pub(crate) struct RawEnd {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub endpoint: quinn::Endpoint,
}

impl RawEnd {
    /// Writes a frame of `payload` (its length prefix first).
    pub(crate) async fn frame(&mut self, payload: &[u8]) -> Result<(), quinn::WriteError> {
        self.send.write_all(&(payload.len() as u32).to_be_bytes()).await?;
        self.send.write_all(payload).await
    }

    /// The reason the other end closed the connection with, once it has.
    pub(crate) async fn close_reason(&self) -> String {
        match self.conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => String::from_utf8_lossy(&c.reason).into_owned(),
            other => format!("not closed by the peer: {other}"),
        }
    }
}

/// A QUIC client config for `tls`, sending at most `send_window` bytes ahead
/// (so a test that writes a large frame does not buffer it all itself).
pub(crate) fn quic_client_config(tls: Arc<rustls::ClientConfig>, send_window: u64) -> quinn::ClientConfig {
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![quic_link::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quic_link::transport_config();
    transport.send_window(send_window);
    config.transport_config(Arc::new(transport));
    config
}

/// A hostile rank: dials the API node at `addr` with a certificate of `ca`,
/// opens the stream and exchanges the preamble, then does what the test says.
pub(crate) async fn raw_rank(addr: SocketAddr, ca: &Ca) -> RawEnd {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint.connect_with(quic_client_config(client_tls(ca, ca), 256 << 10), addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(PREAMBLE).await.unwrap();
    let mut answer = [0u8; PREAMBLE.len()];
    recv.read_exact(&mut answer).await.unwrap();
    RawEnd { conn, send, recv, endpoint }
}

/// A hostile API node listening with a server certificate of `ca`.
pub(crate) fn raw_api_node(ca: &Ca) -> (quinn::Endpoint, SocketAddr) {
    let mut tls = (*server_tls(ca)).clone();
    tls.alpn_protocols = vec![quic_link::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(quic_link::transport_config()));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

/// The hostile API node takes one dialing rank and exchanges the preamble.
pub(crate) async fn raw_accept(endpoint: &quinn::Endpoint) -> RawEnd {
    let conn = endpoint.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let mut preamble = [0u8; PREAMBLE.len()];
    recv.read_exact(&mut preamble).await.unwrap();
    send.write_all(PREAMBLE).await.unwrap();
    RawEnd { conn, send, recv, endpoint: endpoint.clone() }
}

/// A listener with other slot bounds.
pub(crate) fn listener_with(ca: &Ca, limits: admission::Limits) -> (RpcListener, SocketAddr) {
    let l = RpcListener::bind_with_limits("127.0.0.1:0".parse().unwrap(), server_tls(ca), limits).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}
