//! Binding sockets, with errors that say what to do.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use tokio::net::TcpListener;

use super::ServeError;

/// A hint appended to a bind error.
pub(crate) fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            " (another process already uses this port: stop it or choose another port)"
        }
        io::ErrorKind::PermissionDenied => " (ports below 1024 need extra privileges)",
        io::ErrorKind::AddrNotAvailable => " (this address does not belong to this machine)",
        _ => "",
    }
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, ServeError> {
    // A bare IPv6 literal may come with brackets ("[::1]").
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let found = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|source| ServeError::Resolve {
            host: host.to_string(),
            source,
        })?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in found {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.is_empty() {
        return Err(ServeError::Resolve {
            host: host.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        });
    }
    Ok(addrs)
}

/// Connections the kernel may hold completed but not yet accepted (capped by
/// `net.core.somaxconn`). The standard library's 128 overflows when a load
/// balancer opens a thousand connections at once; the overflow is not
/// refused but delayed by SYN retries of a second or more. nginx takes 511,
/// uvicorn 2048.
pub(crate) const LISTEN_BACKLOG: u32 = 1024;

/// A TCP listener as `TcpListener::bind` makes one (SO_REUSEADDR on Unix),
/// with a deeper backlog.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    #[cfg(unix)]
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

/// Bind TCP on every address `host` resolves to. The first must succeed;
/// later ones (e.g. `::1` for `localhost` on a host without IPv6) only warn.
/// With port 0 every address gets the port the first one drew.
pub(crate) async fn tcp(
    host: &str,
    port: u16,
    what: &'static str,
) -> Result<Vec<TcpListener>, ServeError> {
    let addrs = resolve(host, port).await?;
    let mut out: Vec<TcpListener> = Vec::new();
    for mut addr in addrs {
        if let Some(first) = out.first().and_then(|l| l.local_addr().ok()) {
            addr.set_port(first.port());
        }
        match listen(addr) {
            Ok(l) => out.push(l),
            Err(source) if out.is_empty() => return Err(ServeError::Bind { what, addr, source }),
            Err(e) => tracing::warn!("cannot listen for {what} on {addr}: {e}; skipping it"),
        }
    }
    Ok(out)
}

/// Bind TLS (TCP) and HTTP/3 (UDP) on the same port number. With port 0 the
/// TCP port drawn may be taken on UDP; then draw again (a few times).
pub(crate) async fn tcp_and_udp(
    host: &str,
    port: u16,
) -> Result<(Vec<TcpListener>, Vec<UdpSocket>), ServeError> {
    let tries = if port == 0 { 16 } else { 1 };
    let mut last_err = None;
    for _ in 0..tries {
        let listeners = tcp(host, port, "HTTPS (TLS over TCP)").await?;
        match udp_beside(&listeners) {
            Ok(udp) => return Ok((listeners, udp)),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| ServeError::Tls("UDP bind failed".into())))
}

fn udp_beside(listeners: &[TcpListener]) -> Result<Vec<UdpSocket>, ServeError> {
    let mut out = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        let Ok(addr) = l.local_addr() else { continue };
        let bound = UdpSocket::bind(addr).and_then(|s| s.set_nonblocking(true).map(|_| s));
        match bound {
            Ok(s) => out.push(s),
            Err(source) if i == 0 => {
                return Err(ServeError::Bind {
                    what: "HTTP/3 (QUIC over UDP)",
                    addr,
                    source,
                })
            }
            Err(e) => tracing::warn!("cannot listen for HTTP/3 on {addr}: {e}; skipping it"),
        }
    }
    Ok(out)
}
