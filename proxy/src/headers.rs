//! Request header policy and the client's address, applied before limits
//! and forwarded upstream: keys (and the backend's idempotency scope) can
//! rest on who really sent a call, not on a header the client chose.
//!
//! - [`HeaderPolicy`]: `request_headers: { remove: [...], set: { name:
//!   "text %tls_identity% %peer_ip%" } }`, on the listener and per route
//!   (the listener's first).
//! - [`ClientIp`]: the client's IP read from `x-forwarded-for` when the
//!   connection comes from a trusted proxy, at most `hops` entries from the
//!   right, stopping at the first address that is not a trusted proxy.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{self, Network};

/// A piece of a value template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    TlsIdentity,
    PeerIp,
}

/// A header's new value: text and placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template(Vec<Piece>);

/// Headers removed, then set, on every call it applies to.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeaderPolicy {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, Template)>,
}

/// What a call's new header values come from.
pub(crate) struct Facts<'a> {
    /// The client certificate's identity (mTLS).
    pub(crate) tls_identity: Option<&'a str>,
    /// The client's IP (after trusted `x-forwarded-for` hops).
    pub(crate) peer_ip: IpAddr,
}

// === impl Template ===

impl Template {
    /// Parses `text %tls_identity% %peer_ip%` (`%%` is a `%`); `Err` says
    /// what is wrong.
    pub(crate) fn parse(s: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = s;
        while let Some(at) = rest.find('%') {
            text.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let Some(end) = after.find('%') else {
                return Err(
                    "has a '%' that opens no placeholder; write %% for a percent sign".into(),
                );
            };
            let piece = match &after[..end] {
                "" => {
                    text.push('%');
                    None
                }
                "tls_identity" => Some(Piece::TlsIdentity),
                "peer_ip" => Some(Piece::PeerIp),
                other => {
                    return Err(format!(
                        "has an unknown placeholder {}; use %tls_identity% or %peer_ip%",
                        config::shown(other)
                    ))
                }
            };
            if let Some(p) = piece {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(p);
            }
            rest = &after[end + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        for p in &pieces {
            if let Piece::Text(t) = p {
                if HeaderValue::from_str(t).is_err() {
                    return Err("is not a valid header value (visible ASCII and spaces)".into());
                }
            }
        }
        Ok(Template(pieces))
    }

    /// Whether it reads the client certificate.
    pub(crate) fn needs_tls_identity(&self) -> bool {
        self.0.contains(&Piece::TlsIdentity)
    }

    /// The value for a call; `None` when a placeholder has no value (no
    /// client certificate) or the result is not a header value.
    fn render(&self, f: &Facts<'_>) -> Option<HeaderValue> {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::TlsIdentity => out.push_str(f.tls_identity?),
                Piece::PeerIp => out.push_str(&f.peer_ip.to_canonical().to_string()),
            }
        }
        HeaderValue::from_str(&out).ok()
    }
}

// === impl HeaderPolicy ===

impl HeaderPolicy {
    /// Compiles validated rules; `None` when they do nothing.
    pub(crate) fn build(rules: Option<&config::RequestHeaders>) -> Result<Option<Self>, String> {
        let Some(r) = rules else { return Ok(None) };
        if r.remove.is_empty() && r.set.is_empty() {
            return Ok(None);
        }
        let name = |h: &str| {
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("{h:?} is not a header name"))
        };
        Ok(Some(HeaderPolicy {
            remove: r.remove.iter().map(|h| name(h)).collect::<Result<_, _>>()?,
            set: r
                .set
                .iter()
                .map(|(h, v)| Ok((name(h)?, Template::parse(v)?)))
                .collect::<Result<_, String>>()?,
        }))
    }

    /// Applies the policy to a call's headers: removes, then sets (a value
    /// whose placeholder has none leaves the header absent).
    pub(crate) fn apply(&self, headers: &mut HeaderMap, f: &Facts<'_>) {
        for h in &self.remove {
            headers.remove(h);
        }
        for (h, t) in &self.set {
            match t.render(f) {
                Some(v) => {
                    headers.insert(h.clone(), v);
                }
                None => {
                    headers.remove(h);
                }
            }
        }
    }
}

/// Which connections may say who the client is in `x-forwarded-for`.
#[derive(Debug, Clone)]
pub(crate) struct ClientIp {
    proxies: Vec<Network>,
    hops: usize,
}

impl ClientIp {
    /// From the listener's settings; `None` when no hop is trusted.
    pub(crate) fn build(t: Option<&config::TrustForwardedFor>) -> Option<Self> {
        let t = t.filter(|t| t.hops > 0 && !t.proxies.is_empty())?;
        Some(ClientIp {
            proxies: t
                .proxies
                .iter()
                .filter_map(|p| p.value().ok().copied())
                .collect(),
            hops: t.hops,
        })
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.proxies.iter().any(|n| n.contains(ip))
    }

    /// The client's IP for a call from `peer`: `peer` itself unless it is a
    /// trusted proxy; then each `x-forwarded-for` entry from the right, at
    /// most `hops`, until one that is not a trusted proxy (or is not an
    /// address).
    pub(crate) fn of(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let mut client = peer;
        let mut hops = self.hops;
        // From the last value back; a value that is not text stops the
        // walk like an entry that is not an address: skipping it would
        // read what the client wrote further left.
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else {
                return client;
            };
            for entry in value.rsplit(',') {
                if hops == 0 {
                    return client;
                }
                hops -= 1;
                let Some(ip) = parse_forwarded(entry.trim()) else {
                    return client;
                };
                client = ip;
                if !self.trusted(ip) {
                    return client;
                }
            }
        }
        client
    }
}

/// An `x-forwarded-for` entry: an IP, optionally `[v6]` or with a port.
fn parse_forwarded(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
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
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn trusting(proxies: &[&str], hops: usize) -> ClientIp {
        ClientIp {
            proxies: proxies.iter().map(|p| Network::parse(p).unwrap()).collect(),
            hops,
        }
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies_and_only_so_far() {
        let lb = trusting(&["10.0.0.0/8"], 1);
        // A client connecting straight: its header is ignored.
        assert_eq!(
            lb.of(ip("203.0.113.9"), &xff(&["1.2.3.4"])),
            ip("203.0.113.9")
        );
        // Through the load balancer: the entry it added.
        assert_eq!(
            lb.of(ip("10.1.1.1"), &xff(&["1.2.3.4, 198.51.100.7"])),
            ip("198.51.100.7")
        );
        // One hop: what the client wrote before it is not read.
        assert_eq!(
            lb.of(ip("10.1.1.1"), &xff(&["6.6.6.6", "198.51.100.7"])),
            ip("198.51.100.7")
        );
        // No header, or junk: the proxy's address stays.
        assert_eq!(lb.of(ip("10.1.1.1"), &HeaderMap::new()), ip("10.1.1.1"));
        assert_eq!(lb.of(ip("10.1.1.1"), &xff(&["nonsense"])), ip("10.1.1.1"));
        // Two hops: through a second trusted proxy to the client; an
        // untrusted address stops the walk however many hops are left.
        let two = trusting(&["10.0.0.0/8", "192.0.2.0/24"], 2);
        assert_eq!(
            two.of(ip("10.1.1.1"), &xff(&["198.51.100.7, 192.0.2.5"])),
            ip("198.51.100.7")
        );
        assert_eq!(
            two.of(ip("10.1.1.1"), &xff(&["6.6.6.6, 198.51.100.7"])),
            ip("198.51.100.7")
        );
        assert_eq!(
            two.of(ip("10.1.1.1"), &xff(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        assert_eq!(
            two.of(ip("::ffff:10.1.1.1"), &xff(&["198.51.100.7:1234"])),
            ip("198.51.100.7")
        );
        // A value that is not text stops the walk: what lies left of it
        // is the client's own writing.
        let mut h = xff(&["6.6.6.6"]);
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff, 192.0.2.5").unwrap(),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("192.0.2.9"));
        let three = trusting(&["10.0.0.0/8", "192.0.2.0/24"], 3);
        assert_eq!(three.of(ip("10.1.1.1"), &h), ip("192.0.2.9"));
        assert_eq!(two.of(ip("10.1.1.1"), &xff(&[""])), ip("10.1.1.1"));
    }

    #[test]
    fn templates_parse_and_render() {
        let t = Template::parse("id=%tls_identity% from %peer_ip% 100%%").unwrap();
        let f = Facts {
            tls_identity: Some("spiffe://a/b"),
            peer_ip: ip("::ffff:10.0.0.1"),
        };
        assert_eq!(t.render(&f).unwrap(), "id=spiffe://a/b from 10.0.0.1 100%");
        assert!(t.needs_tls_identity());
        let none = Facts {
            tls_identity: None,
            ..f
        };
        assert_eq!(t.render(&none), None);
        assert!(Template::parse("%nope%")
            .unwrap_err()
            .contains("unknown placeholder \"nope\""));
        assert!(Template::parse("50%")
            .unwrap_err()
            .contains("write %% for a percent sign"));
        assert!(Template::parse("a\nb")
            .unwrap_err()
            .contains("not a valid header value"));
    }

    #[test]
    fn a_policy_removes_then_sets() {
        let rules = config::RequestHeaders {
            remove: vec!["x-client-id".into(), "x-debug".into()],
            set: [("x-client-id".to_string(), "%peer_ip%".to_string())].into(),
        };
        let p = HeaderPolicy::build(Some(&rules)).unwrap().unwrap();
        let mut h = HeaderMap::new();
        h.append("x-client-id", HeaderValue::from_static("spoofed"));
        h.append("x-client-id", HeaderValue::from_static("twice"));
        h.insert("x-debug", HeaderValue::from_static("1"));
        p.apply(
            &mut h,
            &Facts {
                tls_identity: None,
                peer_ip: ip("192.0.2.1"),
            },
        );
        assert_eq!(
            h.get_all("x-client-id").iter().collect::<Vec<_>>(),
            ["192.0.2.1"]
        );
        assert!(h.get("x-debug").is_none());
    }
}
