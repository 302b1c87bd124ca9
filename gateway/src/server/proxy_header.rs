//! The PROXY protocol header (HAProxy's, v1 text and v2 binary) that TCP load
//! balancers (AWS NLB, GCP, HAProxy, nginx `proxy_protocol on`) put before
//! the client's bytes to say whose connection it is. Sans-IO: `parse` looks at
//! the bytes read so far and says whether a header is there, complete, and
//! what it names; `proxy_io` reads from the socket.
//!
//! Hand-written rather than a crate: only the source address is needed, the
//! format is two short, fixed layouts, and owning the parser keeps the bounds
//! (length, what counts as malformed) in one page that the tests pin.
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A v1 header is at most 107 bytes, CRLF included (the spec's bound).
pub(crate) const V1_MAX: usize = 107;
/// The v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The most of a v2 header (16 fixed bytes and the addresses and TLVs after)
/// accepted. The spec lets TLVs run to 64 KiB; balancers send tens of bytes
/// (AWS's VPC endpoint id, GCP's connection id), so 2 KiB is ample and bounds
/// what one connection makes us buffer before it is served.
pub(crate) const V2_MAX: usize = 2048;
const V1_SIG: &[u8; 6] = b"PROXY ";

/// What the bytes read so far at the start of a connection are.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Too few bytes to tell: read more.
    Incomplete,
    /// Not a PROXY header: the connection's own protocol (HTTP, TLS) begins here.
    NotProxy,
    /// A whole header of `len` bytes; `source` is the client it names, or
    /// `None` when it names none (v1 `UNKNOWN`, v2 `LOCAL`, a Unix socket):
    /// then the connection is the proxy's own (its health checks) and is
    /// known by the proxy's address.
    Header { len: usize, source: Option<SocketAddr> },
    /// A header that breaks the format; the connection is closed.
    Invalid(&'static str),
}

/// Looks at the first bytes of a connection.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    if starts_like(buf, V1_SIG) {
        return if buf.len() < V1_SIG.len() { Parsed::Incomplete } else { parse_v1(buf) };
    }
    if starts_like(buf, V2_SIG) {
        return if buf.len() < V2_SIG.len() { Parsed::Incomplete } else { parse_v2(buf) };
    }
    Parsed::NotProxy
}

/// `buf` and `sig` agree on their common length.
fn starts_like(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf[..n] == sig[..n]
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX { Parsed::Invalid("a PROXY v1 header longer than 107 bytes") } else { Parsed::Incomplete };
    };
    let len = end + 2;
    let Ok(line) = std::str::from_utf8(&buf[V1_SIG.len()..end]) else {
        return Parsed::Invalid("a PROXY v1 header that is not text");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        // "UNKNOWN" may be followed by anything; the receiver ignores it.
        ["UNKNOWN", ..] => Parsed::Header { len, source: None },
        [proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v4 = *proto == "TCP4";
            let addr = |s: &str| -> Option<IpAddr> {
                if v4 {
                    s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
                }
            };
            match (addr(src), addr(dst), port(sport), port(dport)) {
                (Some(src), Some(_), Some(sport), Some(_)) => Parsed::Header { len, source: Some(SocketAddr::new(src, sport)) },
                _ => Parsed::Invalid("a PROXY v1 header with a malformed address or port"),
            }
        }
        _ => Parsed::Invalid("a PROXY v1 header of an unknown form"),
    }
}

/// A decimal port, as the spec writes it: 0 to 65535, no sign, no leading zero.
fn port(s: &str) -> Option<u16> {
    let ok = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    ok.then(|| s.parse().ok()).flatten()
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Incomplete;
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    let body_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body_len;
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("a PROXY v2 header of another version");
    }
    if len > V2_MAX {
        return Parsed::Invalid("a PROXY v2 header longer than 2048 bytes");
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Parsed::Invalid("a PROXY v2 header with an unknown command"),
    };
    if buf.len() < len {
        return Parsed::Incomplete;
    }
    let body = &buf[16..len];
    if local {
        return Parsed::Header { len, source: None };
    }
    // Address family (high nibble): 1 IPv4, 2 IPv6; anything else (unspecified,
    // Unix sockets) names no address we could key a client by.
    let source = match fam >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([body[8], body[9]])))
        }
        2 if body.len() >= 36 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&body[..16]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), u16::from_be_bytes([body[32], body[33]])))
        }
        1 | 2 => return Parsed::Invalid("a PROXY v2 header too short for its addresses"),
        _ => None,
    };
    Parsed::Header { len, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::unnecessary_wraps, reason = "the expected `source` of a parsed header, which is an Option")]
    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut b = V2_SIG.to_vec();
        b.push(0x20 | cmd);
        b.push(fam);
        b.extend_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 198.51.100.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(parse(h), Parsed::Header { len: 44, source: sa("198.51.100.7:56324") });
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 8000\r\n";
        assert_eq!(parse(h), Parsed::Header { len: h.len(), source: sa("[2001:db8::7]:65535") });
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parsed::Header { len: 15, source: None });
        assert_eq!(parse(b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\nX"), Parsed::Header { len: 39, source: None });
        // The longest legal header fits the bound.
        let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), V1_MAX);
        assert!(matches!(parse(longest), Parsed::Header { len: V1_MAX, .. }));
    }

    #[test]
    fn v1_partial_malformed_and_oversized() {
        for partial in [&b"P"[..], b"PROX", b"PROXY ", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"] {
            assert_eq!(parse(partial), Parsed::Incomplete, "{:?}", String::from_utf8_lossy(partial));
        }
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \xff\xfe\r\n",
            b"PROXY \r\n",
        ] {
            assert!(matches!(parse(bad), Parsed::Invalid(_)), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(V1_MAX, b'1');
        assert_eq!(parse(&long), Parsed::Invalid("a PROXY v1 header longer than 107 bytes"));
        long.resize(V1_MAX - 1, b'1');
        assert_eq!(parse(&long), Parsed::Incomplete, "one byte short of the bound may still end");
    }

    #[test]
    fn not_a_proxy_header() {
        for other in [&b"GET / HTTP/1.1\r\n"[..], b"PRI * HTTP/2.0\r\n", b"\x16\x03\x01\x02\x00", b"POST", b"PROXZ", b"\r\n\r\nX"] {
            assert_eq!(parse(other), Parsed::NotProxy, "{:?}", String::from_utf8_lossy(other));
        }
        assert_eq!(parse(b""), Parsed::Incomplete);
    }

    #[test]
    fn v2_inet_inet6_local_unix_and_tlvs() {
        let mut body = vec![198, 51, 100, 7, 10, 0, 0, 1];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x11, &body);
        assert_eq!(parse(&h), Parsed::Header { len: 28, source: sa("198.51.100.7:56324") });
        // TLVs after the addresses are skipped with the header.
        let mut with_tlv = body.clone();
        with_tlv.extend_from_slice(&[0xea, 0, 3, b'v', b'p', b'c']);
        let mut h = v2(1, 0x11, &with_tlv);
        h.extend_from_slice(b"GET /");
        assert_eq!(parse(&h), Parsed::Header { len: 34, source: sa("198.51.100.7:56324") });

        let mut body6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        body6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body6.extend_from_slice(&[0x1f, 0x90, 0x01, 0xbb]);
        assert_eq!(parse(&v2(1, 0x21, &body6)), Parsed::Header { len: 52, source: sa("[2001:db8::7]:8080") });

        // LOCAL (the balancer's own health check) and Unix sockets name no client.
        assert_eq!(parse(&v2(0, 0x00, &[])), Parsed::Header { len: 16, source: None });
        assert_eq!(parse(&v2(0, 0x11, &body)), Parsed::Header { len: 28, source: None });
        assert_eq!(parse(&v2(1, 0x31, &[0u8; 216])), Parsed::Header { len: 232, source: None });
        assert_eq!(parse(&v2(1, 0x00, &[])), Parsed::Header { len: 16, source: None });
    }

    #[test]
    fn v2_partial_malformed_and_oversized() {
        let mut body = vec![198, 51, 100, 7, 10, 0, 0, 1];
        body.extend_from_slice(&[0, 1, 0, 2]);
        let h = v2(1, 0x11, &body);
        for n in 1..h.len() {
            assert_eq!(parse(&h[..n]), Parsed::Incomplete, "{n} bytes");
        }
        let mut bad_ver = h.clone();
        bad_ver[12] = 0x11;
        assert!(matches!(parse(&bad_ver), Parsed::Invalid(_)));
        let mut bad_cmd = h.clone();
        bad_cmd[12] = 0x22;
        assert!(matches!(parse(&bad_cmd), Parsed::Invalid(_)));
        assert!(matches!(parse(&v2(1, 0x11, &body[..8])), Parsed::Invalid(_)), "too short for IPv4");
        assert!(matches!(parse(&v2(1, 0x21, &[0u8; 35])), Parsed::Invalid(_)), "too short for IPv6");
        // An oversized length is refused from the fixed 16 bytes, before any of it is read.
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&huge), Parsed::Invalid("a PROXY v2 header longer than 2048 bytes"));
        let at_bound = v2(1, 0x11, &vec![0u8; V2_MAX - 16]);
        assert!(matches!(parse(&at_bound), Parsed::Header { len: V2_MAX, .. }));
    }
}
