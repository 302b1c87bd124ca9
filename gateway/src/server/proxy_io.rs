//! Reading a PROXY header off a trusted peer's connection, bounded in bytes
//! (the parser's limits) and in time, and handing what follows it to HTTP or
//! TLS unchanged.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::proxy_header::{self, Parsed};

/// A stream with some bytes already read off it in front: reads give those
/// first. Writes go straight through.
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(inner: S, prefix: Bytes) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyHeaderError {
    #[error("{0}")]
    Invalid(&'static str),
    #[error("the peer closed before its first bytes")]
    Closed,
    #[error("no first bytes within {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads the start of a connection from a trusted peer: a PROXY header, if
/// it begins with one, is taken off and its source returned; the bytes after
/// it (or all, when there is none) are kept for whoever reads next. Waits at
/// most `timeout` for the header (an HTTP or TLS client speaks first too, so
/// an honest peer's first bytes come at once).
pub(crate) async fn read_proxy_header<S>(mut io: S, timeout: Duration) -> Result<(Prefixed<S>, Option<SocketAddr>), ProxyHeaderError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(512);
    let parsed = tokio::time::timeout(timeout, async {
        loop {
            match proxy_header::parse(&buf) {
                Parsed::Incomplete => {}
                done => return Ok(done),
            }
            // Incomplete means short of a header that fits the parser's bounds
            // (V2_MAX is the larger), so this never reads far past one.
            let want = proxy_header::V2_MAX.saturating_sub(buf.len()).max(1);
            buf.reserve(want);
            if io.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
                return Err(ProxyHeaderError::Closed);
            }
        }
    })
    .await
    .map_err(|_| ProxyHeaderError::TimedOut(timeout))??;
    match parsed {
        Parsed::NotProxy => Ok((Prefixed::new(io, buf.freeze()), None)),
        Parsed::Header { len, source } => {
            let rest = buf.freeze().slice(len..);
            Ok((Prefixed::new(io, rest), source))
        }
        Parsed::Invalid(why) => Err(ProxyHeaderError::Invalid(why)),
        Parsed::Incomplete => Err(ProxyHeaderError::Invalid("unreachable: an incomplete header")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn run(chunks: Vec<&'static [u8]>) -> Result<(Vec<u8>, Option<SocketAddr>), String> {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            for c in chunks {
                client.write_all(c).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.shutdown().await.unwrap();
        });
        let r = read_proxy_header(server, Duration::from_secs(2)).await;
        let out = match r {
            Ok((mut io, src)) => {
                let mut rest = Vec::new();
                io.read_to_end(&mut rest).await.unwrap();
                Ok((rest, src))
            }
            Err(e) => Err(e.to_string()),
        };
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_taken_off_and_the_rest_kept() {
        let (rest, src) = run(vec![b"PRO", b"XY TCP4 198.51.100.7 10.0.0.1 5 443\r", b"\nGET / HTTP/1.1\r\n\r\n"]).await.unwrap();
        assert_eq!(src, Some("198.51.100.7:5".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn no_header_leaves_every_byte() {
        let (rest, src) = run(vec![b"GET / HTTP/1.1\r\n", b"\r\n"]).await.unwrap();
        assert_eq!((rest.as_slice(), src), (&b"GET / HTTP/1.1\r\n\r\n"[..], None));
        // A prefix that looks like a header at first ("P") and then is not.
        let (rest, src) = run(vec![b"P", b"OST / HTTP/1.1\r\n\r\n"]).await.unwrap();
        assert_eq!((rest.as_slice(), src), (&b"POST / HTTP/1.1\r\n\r\n"[..], None));
    }

    #[tokio::test]
    async fn malformed_oversized_closed_and_silent_peers_are_refused() {
        assert!(run(vec![b"PROXY TCP4 nope\r\n"]).await.unwrap_err().contains("unknown form"));
        assert!(run(vec![b"PROXY TCP9 1 2 3 4\r\n"]).await.is_err());
        let long: &'static [u8] = Box::leak(vec![b'9'; 4096].into_boxed_slice());
        assert!(run(vec![b"PROXY TCP4 ", long]).await.unwrap_err().contains("107"));
        assert!(run(vec![b"PROXY TCP4 1.2"]).await.unwrap_err().contains("closed"));
        // A peer that says nothing is dropped after the timeout.
        let (_client, server) = tokio::io::duplex(1024);
        let t = std::time::Instant::now();
        let e = read_proxy_header(server, Duration::from_millis(100)).await.err().unwrap();
        assert!(matches!(e, ProxyHeaderError::TimedOut(_)) && t.elapsed() < Duration::from_secs(1));
    }
}
