//! Which webhook targets the server POSTs to.
//!
//! A webhook URL comes from the client, and the server sends it a request: without a policy any
//! client could make the server call its own loopback services or the private network
//! (server-side request forgery). By default only public addresses are allowed: an IP literal is
//! checked when the request is submitted (422 naming `fal_webhook`), a host name when the
//! delivery connects (the resolver used for the connection drops non-public addresses, so a
//! name that changes its answer between check and connection gains nothing). URLs with
//! credentials (`user:pass@`) are refused, and redirects are not followed. `allow_private`
//! (`--allow-private-webhooks`) lifts the address rule for receivers on the same host or network.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// Whether an address is reachable on the public internet: not loopback, private, link-local,
/// carrier-grade NAT, unspecified, multicast, broadcast, documentation or reserved (IPv4-mapped
/// and NAT64 IPv6 addresses are judged by their IPv4 address).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                // 64:ff9b::/96, NAT64: the last 32 bits are an IPv4 address.
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32 documentation
                || v6 == Ipv6Addr::from([0u16; 8]))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // 0.0.0.0/8
        || (a == 100 && (64..128).contains(&b)) // 100.64.0.0/10 carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24 protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // 198.18.0.0/15 benchmarking
        || a >= 240) // 240.0.0.0/4 reserved
}

/// Checks a webhook URL when a request is submitted; the error says what is wrong and what is
/// allowed.
pub fn check_url(url: &url::Url, allow_private: bool) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("must be an http(s) URL, got {:?}", url.as_str()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (user:password@); put a token in the path or query instead".into());
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        Some(url::Host::Domain(_)) => None,
        None => return Err("must name a host".into()),
    };
    if let Some(ip) = ip.filter(|ip| !allow_private && !is_public(*ip)) {
        return Err(format!(
            "{ip} is not a public address (loopback, private and link-local targets are refused unless the server runs with --allow-private-webhooks)"
        ));
    }
    Ok(())
}

/// The resolver webhook connections use: the system's, keeping only public addresses unless
/// private ones are allowed.
#[derive(Debug, Clone, Copy)]
pub struct PolicyResolver {
    /// Keep every address.
    pub allow_private: bool,
}

impl ureq::Resolver for PolicyResolver {
    fn resolve(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        let addresses: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        if self.allow_private {
            return Ok(addresses);
        }
        let public: Vec<SocketAddr> = addresses.iter().copied().filter(|a| is_public(a.ip())).collect();
        if public.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{netloc} resolves only to non-public addresses ({addresses:?}); refused (see --allow-private-webhooks)"),
            ));
        }
        Ok(public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_and_non_public_addresses() {
        let public = ["8.8.8.8", "1.1.1.1", "100.63.255.255", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"];
        for ip in public {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        let private = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "203.0.113.5",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2001:db8::1",
        ];
        for ip in private {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn urls_are_checked_at_submit() {
        let check = |u: &str, allow| check_url(&url::Url::parse(u).unwrap(), allow);
        assert!(check("https://hooks.example.com/x?token=1", false).is_ok());
        assert!(check("http://203.0.113.5/", false).unwrap_err().contains("not a public address"));
        assert!(check("http://[::1]:9000/", false).is_err());
        assert!(check("http://127.0.0.1:9000/", true).is_ok());
        assert!(check("http://user:pass@hooks.example.com/", true).unwrap_err().contains("credentials"));
        assert!(check("ftp://hooks.example.com/", false).unwrap_err().contains("http(s)"));
        // A name is judged when it is resolved for the connection.
        assert!(check("http://localhost:9000/", false).is_ok());
        use ureq::Resolver;
        let strict = PolicyResolver { allow_private: false };
        let err = strict.resolve("localhost:9000").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(PolicyResolver { allow_private: true }.resolve("localhost:9000").is_ok());
    }
}
