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

/// Whether an address is a globally routable unicast address, judged with IANA's special-purpose
/// registries (RFC 6890 and its successors). IPv4: not loopback, private, link-local, carrier-grade
/// NAT, unspecified, multicast, broadcast, documentation, benchmarking, protocol assignments,
/// the 6to4 relay anycast or reserved. IPv6: only global unicast (`2000::/3`), less IETF protocol
/// assignments (`2001::/23`: Teredo, benchmarking, ORCHID…) and the documentation prefixes; an
/// IPv4 address carried in an IPv6 form (mapped, translated, NAT64 `64:ff9b::/96`, 6to4
/// `2002::/16`) is judged as that IPv4 address, and the IPv4-compatible (`::a.b.c.d`),
/// local-use NAT64 (`64:ff9b:1::/48`) and discard-only (`100::/64`) forms lie outside `2000::/3`.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

/// The IPv4 address an IPv6 address stands for, in the forms that reach an IPv4 host.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| {
        let ([a, b], [c, d]) = (hi.to_be_bytes(), lo.to_be_bytes());
        Some(Ipv4Addr::new(a, b, c, d))
    };
    match s {
        // ::ffff:0:0/96, IPv4-mapped.
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => v4(hi, lo),
        // ::ffff:0:0:0/96, IPv4-translated (SIIT).
        [0, 0, 0, 0, 0xffff, 0, hi, lo] => v4(hi, lo),
        // 64:ff9b::/96, the well-known NAT64 prefix.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => v4(hi, lo),
        // 2002::/16, 6to4: the next 32 bits are the IPv4 address of the site.
        [0x2002, hi, lo, ..] => v4(hi, lo),
        _ => None,
    }
}

fn is_public_v6(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    let global_unicast = s[0] & 0xe000 == 0x2000; // 2000::/3
    let protocol_assignments = s[0] == 0x2001 && s[1] < 0x0200; // 2001::/23
    let documentation = (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] < 0x1000); // 2001:db8::/32, 3fff::/20
    global_unicast && !protocol_assignments && !documentation
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
        || (a == 192 && b == 88 && c == 99) // 192.88.99.0/24 6to4 relay anycast (deprecated)
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

    /// IANA's IPv4 and IPv6 special-purpose registries, and IPv4 in every IPv6 form.
    #[test]
    fn only_globally_routable_unicast_addresses_are_public() {
        let public = [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "192.0.1.1",
            "192.88.98.1",
            "2606:4700::1111",
            "2a00:1450:4001::200e",
            "2001:4860:4860::8888",
            "2001:200::1",
            "3ffe::1",
            "::ffff:8.8.8.8",
            "::ffff:0:808:808",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ];
        for ip in public {
            assert!(is_public(ip.parse().unwrap()), "{ip} should be public");
        }
        let not_public = [
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
            "192.0.2.1",
            "192.88.99.1",
            "198.18.0.1",
            "198.51.100.7",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "203.0.113.5",
            // IPv6 special-purpose addresses.
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
            "100::1",
            "100:0:0:1::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:1::1",
            "2001:2::1",
            "2001:3::1",
            "2001:10::1",
            "2001:20::1",
            "2001:30::1",
            "2001:1ff::1",
            "2001:db8::1",
            "3fff::1",
            "5f00::1",
            "4000::1",
            "e000::1",
            // IPv4 inside IPv6: mapped, translated, compatible, NAT64 (well-known and local), 6to4.
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0:7f00:1",
            "::7f00:1",
            "::808:808",
            "64:ff9b::a00:1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::7f00:1",
            "64:ff9b:1::808:808",
            "2002:7f00:1::1",
            "2002:a00:1::1",
            "2002:c0a8:101::1",
        ];
        for ip in not_public {
            assert!(!is_public(ip.parse().unwrap()), "{ip} should not be public");
        }
    }

    #[test]
    fn urls_are_checked_at_submit() {
        let check = |u: &str, allow| check_url(&url::Url::parse(u).unwrap(), allow);
        assert!(check("https://hooks.example.com/x?token=1", false).is_ok());
        assert!(check("http://203.0.113.5/", false).unwrap_err().contains("not a public address"));
        assert!(check("http://[::1]:9000/", false).is_err());
        // The IPv6 forms of loopback and non-global ranges a hostile client tried.
        let forms =
            ["::7f00:1", "::ffff:0:7f00:1", "64:ff9b:1::7f00:1", "2002:7f00:1::1", "2001::1", "100::1", "2001:20::1"];
        for form in forms {
            let error = check(&format!("http://[{form}]:9000/hook"), false).unwrap_err();
            assert!(error.contains("not a public address"), "{form}: {error}");
        }
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
