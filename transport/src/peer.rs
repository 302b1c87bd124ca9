//! The other end of a QUIC link, named for logs: its address, and the name in
//! its certificate when it presented one. Both nodes log every link they drop
//! under this name, with the reason, not only tell the peer.

use std::fmt;
use std::net::SocketAddr;

use rustls::pki_types::CertificateDer;

/// The peer of a link: its address and certificate name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's UDP address, as QUIC saw it.
    pub addr: SocketAddr,
    /// The common name of the certificate the peer presented (a ferry node
    /// certificate carries the node's name there), when it presented one.
    pub name: Option<String>,
}

impl Peer {
    /// The peer of `conn`, once its TLS handshake is done.
    pub fn of(conn: &quinn::Connection) -> Peer {
        let name = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().and_then(cert_name));
        Peer { addr: conn.remote_address(), name }
    }

    /// A peer known only by its address (its handshake did not finish).
    pub fn at(addr: SocketAddr) -> Peer {
        Peer { addr, name: None }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{} ({name})", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Most characters of a certificate name put in a log line.
const MAX_NAME_CHARS: usize = 64;

/// The subject common name of a certificate, printable and short. Only
/// certificates the TLS configuration verified reach here, but the name is
/// still the peer's text, so it is cleaned before it goes into a log line.
pub(crate) fn cert_name(der: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    let raw = common_name(cert.subject())?;
    let name: String = String::from_utf8_lossy(raw).chars().filter(|c| !c.is_control()).take(MAX_NAME_CHARS).collect();
    (!name.is_empty()).then_some(name)
}

/// The id-at-commonName attribute type (2.5.4.3), DER contents.
const CN_OID: &[u8] = &[0x55, 0x04, 0x03];

/// The value of the first common name in a DER Name's contents (a sequence
/// of SETs of SEQUENCE { type OID, value }).
fn common_name(name: &[u8]) -> Option<&[u8]> {
    let mut sets = name;
    while let Some((_, set, rest)) = der_next(sets) {
        sets = rest;
        let mut attrs = set;
        while let Some((_, attr, rest)) = der_next(attrs) {
            attrs = rest;
            let Some((_, oid, value)) = der_next(attr) else { continue };
            if oid == CN_OID {
                return der_next(value).map(|(_, text, _)| text);
            }
        }
    }
    None
}

/// The DER element at the front of `der`: (tag, contents, what follows).
/// Lengths of up to four bytes; anything malformed is None.
fn der_next(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = rest.get(..n)?.iter().fold(0usize, |len, &b| len << 8 | usize::from(b));
        (len, rest.get(n..)?)
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_of_several_attributes_yields_its_common_name() {
        // SET { SEQ { OID 2.5.4.10 (O), "ferry" } }, SET { SEQ { OID 2.5.4.3 (CN), "node-a" } }
        let name = [
            0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x05, b'f', b'e', b'r', b'r', b'y', //
            0x31, 0x0f, 0x30, 0x0d, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x06, b'n', b'o', b'd', b'e', b'-', b'a',
        ];
        assert_eq!(common_name(&name), Some(&b"node-a"[..]));
        assert_eq!(common_name(&name[..16]), None, "no CN");
        for cut in 0..name.len() {
            let _ = common_name(&name[..cut]); // Truncated: None or a prefix, never a panic.
        }
        assert_eq!(der_next(&[0x04, 0x84, 0xff, 0xff, 0xff, 0xff]), None, "a length past the end");
    }

    #[test]
    fn peers_are_shown_with_their_name_when_known() {
        let addr: SocketAddr = "10.0.0.1:9000".parse().unwrap();
        assert_eq!(Peer::at(addr).to_string(), "10.0.0.1:9000");
        assert_eq!(Peer { addr, name: Some("node-a".into()) }.to_string(), "10.0.0.1:9000 (node-a)");
    }
}
