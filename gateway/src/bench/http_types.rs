//! The HTTP vocabulary the benchmark client's modules share: the version it
//! speaks, the endpoint it drives, and request and error helpers. A leaf module:
//! it imports none of its siblings, so the client, the HTTP/3 client and the
//! request loop depend on it and not on each other in a cycle.

/// Which HTTP version the benchmark client speaks.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) enum HttpVersion {
    /// HTTP/1.1 (one request per connection at a time; a pool of connections).
    #[value(name = "1.1")]
    #[serde(rename = "1.1")]
    Http11,
    /// HTTP/2: prior knowledge over http://, ALPN "h2" over https://; one multiplexed connection.
    #[value(name = "2")]
    #[serde(rename = "2")]
    Http2,
    /// HTTP/3 over QUIC (https:// only); one multiplexed connection.
    #[value(name = "3")]
    #[serde(rename = "3")]
    Http3,
}

impl HttpVersion {
    pub(crate) fn label(self) -> &'static str {
        match self {
            HttpVersion::Http11 => "HTTP/1.1",
            HttpVersion::Http2 => "HTTP/2",
            HttpVersion::Http3 => "HTTP/3",
        }
    }
}

/// Which OpenAI endpoint a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EndpointKind {
    Completions,
    Chat,
}

/// A request builder with the bearer token from OPENAI_API_KEY, as vLLM's client sends.
pub(crate) fn base_request(method: http::Method, uri: &str) -> http::request::Builder {
    let mut b = http::Request::builder().method(method).uri(uri);
    if let Ok(key) = std::env::var("OPENAI_API_KEY") {
        if !key.is_empty() {
            b = b.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
    }
    b
}

/// The full error text: hyper's outer errors hide the useful cause in `source()`.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
