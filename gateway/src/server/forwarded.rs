//! Who the client is behind a proxy: `--forwarded-allow-ips` (uvicorn's flag)
//! names the peers trusted to say so, and `X-Forwarded-For` is believed only
//! hop by hop through them. Sans-IO: the trust list and the walk over the
//! header are plain functions of their inputs.
//!
//! The walk is uvicorn's and nginx's `real_ip_recursive`: start at the address
//! the connection came from; while that address is trusted, step one entry to
//! the left in `X-Forwarded-For` (each proxy appends the address it heard
//! from). The first untrusted address is the client. A proxy can only vouch
//! for the hop it saw, so entries left of an untrusted one are the client's
//! own words and are never read.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// The address per-client limits know a request by: the connection's peer, or
/// behind trusted proxies the client they name. Set on every request the
/// server hands the app (beside `ConnectInfo<SocketAddr>`, which stays the TCP
/// or QUIC peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// `X-Forwarded-For` entries read at most, right to left: more hops than any
/// real chain of proxies, and a bound on the work a header can ask for.
const MAX_HOPS: usize = 32;

/// One network of a trust list (an address is a network of its full length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn parse(s: &str) -> Option<Net> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = canonical(a.trim_start_matches('[').trim_end_matches(']').parse().ok()?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
        };
        Some(Net { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => same_prefix(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => same_prefix(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn same_prefix(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// IPv4 peers of a dual-stack socket arrive as `::ffff:a.b.c.d`; a trust
/// list written in IPv4 must match them.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The peers whose word on the client's address is believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    any: bool,
    nets: Vec<Net>,
}

impl TrustedProxies {
    /// Trust nobody (the default).
    pub fn none() -> Self {
        Self::default()
    }

    /// A comma-separated list of IP addresses and CIDR networks, or `*` for
    /// every peer (uvicorn's `--forwarded-allow-ips`). Empty trusts nobody.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut out = TrustedProxies::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                out.any = true;
                continue;
            }
            let net = Net::parse(item).ok_or_else(|| {
                format!("{item:?} is not an IP address or network (give e.g. 10.0.0.1, 10.0.0.0/8, ::1 or *)")
            })?;
            out.nets.push(net);
        }
        Ok(out)
    }

    /// No proxy is trusted (the default): client addresses are the peers'.
    pub fn is_empty(&self) -> bool {
        !self.any && self.nets.is_empty()
    }

    /// `ip` (IPv4-mapped IPv6 read as IPv4) is a proxy whose forwarded headers are believed.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        if self.any {
            return true;
        }
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The client of a request that came from `from` (the connection's peer,
    /// or the address a trusted peer's PROXY header gave) with `headers`.
    pub fn client_of(&self, from: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(from) {
            // The common case costs one lookup and reads no header.
            return from;
        }
        // Several X-Forwarded-For fields are one list, in order (RFC 9110 5.3).
        // A value that is not text reads as one entry that is no address, which
        // ends the walk.
        let entries = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .flat_map(|v| v.to_str().unwrap_or("?").rsplit(','));
        self.walk(from, entries)
    }

    /// The walk over `X-Forwarded-For` entries given right to left.
    fn walk<'a>(&self, from: IpAddr, entries_right_to_left: impl Iterator<Item = &'a str>) -> IpAddr {
        let mut client = from;
        for entry in entries_right_to_left.take(MAX_HOPS) {
            if !self.trusts(client) {
                break;
            }
            // An entry that is no address ("unknown", garbage) ends the walk at
            // the last hop a trusted proxy vouched for: nobody vouches for
            // anything left of it.
            match parse_entry(entry) {
                Some(ip) => client = ip,
                None => break,
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, perhaps with a port
/// (`1.2.3.4:5678`, `[::1]:80`, as some cloud balancers write it), perhaps
/// bracketed.
fn parse_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    s.strip_prefix('[')?.strip_suffix(']')?.parse().ok().map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn trust_lists_take_addresses_networks_and_star() {
        let t = TrustedProxies::parse("127.0.0.1, 10.0.0.0/8,fd00::/8 , ::1").unwrap();
        assert!(t.trusts(ip("127.0.0.1")) && !t.trusts(ip("127.0.0.2")));
        assert!(t.trusts(ip("10.255.1.2")) && !t.trusts(ip("11.0.0.1")));
        assert!(t.trusts(ip("fd12:3456::1")) && !t.trusts(ip("fe80::1")));
        assert!(t.trusts(ip("::1")));
        // A dual-stack socket's IPv4 peer.
        assert!(t.trusts(ip("::ffff:10.1.2.3")));
        let odd = TrustedProxies::parse("192.168.1.0/23").unwrap();
        assert!(odd.trusts(ip("192.168.0.7")) && odd.trusts(ip("192.168.1.7")) && !odd.trusts(ip("192.168.2.1")));
        assert!(TrustedProxies::parse("0.0.0.0/0").unwrap().trusts(ip("8.8.8.8")));
        let all = TrustedProxies::parse("*").unwrap();
        assert!(all.trusts(ip("8.8.8.8")) && all.trusts(ip("2001:db8::1")));
        assert!(TrustedProxies::parse("").unwrap().is_empty());
        assert!(TrustedProxies::none().is_empty() && !TrustedProxies::none().trusts(ip("127.0.0.1")));
        for bad in ["localhost", "10.0.0.0/33", "::1/129", "1.2.3", "10.0.0.1/x", "/8"] {
            let e = TrustedProxies::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let t = TrustedProxies::parse("127.0.0.1").unwrap();
        assert_eq!(t.client_of(ip("203.0.113.9"), &xff(&["1.1.1.1"])), ip("203.0.113.9"));
        assert_eq!(TrustedProxies::none().client_of(ip("127.0.0.1"), &xff(&["1.1.1.1"])), ip("127.0.0.1"));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let t = TrustedProxies::parse("127.0.0.1,10.0.0.0/8").unwrap();
        let peer = ip("127.0.0.1");
        // The client forged "6.6.6.6"; the edge proxy appended what it saw.
        assert_eq!(t.client_of(peer, &xff(&["6.6.6.6, 198.51.100.7, 10.0.0.5"])), ip("198.51.100.7"));
        // Several fields are one list.
        assert_eq!(t.client_of(peer, &xff(&["6.6.6.6", "198.51.100.7", "10.0.0.5"])), ip("198.51.100.7"));
        // Every hop trusted: the left-most (uvicorn's answer).
        assert_eq!(t.client_of(peer, &xff(&["10.1.1.1, 10.0.0.5"])), ip("10.1.1.1"));
        // No header: the peer.
        assert_eq!(t.client_of(peer, &HeaderMap::new()), peer);
        // Ports and brackets as cloud balancers write them.
        assert_eq!(t.client_of(peer, &xff(&["198.51.100.7:4711"])), ip("198.51.100.7"));
        assert_eq!(t.client_of(peer, &xff(&["[2001:db8::7]:443"])), ip("2001:db8::7"));
        assert_eq!(t.client_of(peer, &xff(&["[2001:db8::7]"])), ip("2001:db8::7"));
        assert_eq!(t.client_of(peer, &xff(&[" 2001:db8::8 "])), ip("2001:db8::8"));
    }

    #[test]
    fn malformed_entries_end_the_walk_at_the_last_vouched_hop() {
        let t = TrustedProxies::parse("127.0.0.1,10.0.0.0/8").unwrap();
        let peer = ip("127.0.0.1");
        assert_eq!(t.client_of(peer, &xff(&["198.51.100.7, garbage"])), peer);
        assert_eq!(t.client_of(peer, &xff(&["garbage, 10.0.0.5"])), ip("10.0.0.5"));
        assert_eq!(t.client_of(peer, &xff(&["unknown"])), peer);
        assert_eq!(t.client_of(peer, &xff(&[""])), peer);
        assert_eq!(t.client_of(peer, &xff(&["1.2.3.4,,"])), peer);
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", http::HeaderValue::from_bytes(b"1.2.3.4, \xff").unwrap());
        assert_eq!(t.client_of(peer, &h), peer);
    }

    #[test]
    fn a_long_chain_is_read_only_so_far() {
        let t = TrustedProxies::parse("*").unwrap();
        let chain: Vec<String> = (0..1000).map(|i| format!("10.0.{}.{}", i / 256, i % 256)).collect();
        let got = t.client_of(ip("127.0.0.1"), &xff(&[&chain.join(",")]));
        // Trusting every hop, the walk stops after MAX_HOPS entries from the right.
        assert_eq!(got, ip(&chain[1000 - MAX_HOPS]));
    }
}
