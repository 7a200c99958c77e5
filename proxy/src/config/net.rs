//! Addresses and paths as the config writes them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::parsed::FromText;

/// Resolves a config-relative path.
pub fn resolve(path: &Path, base: Option<&Path>) -> PathBuf {
    match base {
        Some(b) if path.is_relative() => b.join(path),
        _ => path.to_owned(),
    }
}

/// An upstream endpoint: a host name or IP address, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// The host name, or the IP address (IPv6 without brackets).
    pub host: String,
    /// 1 to 65535.
    pub port: u16,
}

impl FromText for HostPort {
    fn from_text(a: &str) -> Result<Self, String> {
        parse_host_port(a).map(|(host, port)| HostPort { host, port })
    }
}

/// Splits `host:port`, checking both parts.
fn parse_host_port(a: &str) -> Result<(String, u16), String> {
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    let Some((host, port)) = a.rsplit_once(':') else {
        return Err(format!("{a:?} is not host:port"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{a:?}: port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(format!("{a:?}: port must not be 0"));
    }
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
    {
        return Err(format!("{a:?}: {host:?} is not a host name or IP address"));
    }
    Ok((host.to_owned(), port))
}

/// An IP network: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Network {
    /// Its first address (the bits past the prefix cleared).
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl FromText for Network {
    fn from_text(s: &str) -> Result<Self, String> {
        Network::parse(s)
    }
}

impl Network {
    /// Parses `address/prefix` or an address.
    pub fn parse(s: &str) -> Result<Network, String> {
        let shown = super::error::shown(s);
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = a.trim().parse().map_err(|_| {
            format!("{shown} is not a network like 10.0.0.0/8, 2001:db8::/32 or one address")
        })?;
        let addr = addr.to_canonical();
        let most = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            "" => most,
            p => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= most)
                .ok_or_else(|| format!("{shown}: the prefix length must be 0 to {most}"))?,
        };
        Ok(Network {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` is in it (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

/// `ip` with the bits past its first `prefix` cleared (a prefix past the
/// address's length keeps it whole).
pub(crate) fn mask(ip: std::net::IpAddr, prefix: u8) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let bits = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            IpAddr::V4((u32::from(v4) & bits).into())
        }
        IpAddr::V6(v6) => {
            let bits = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            IpAddr::V6((u128::from(v6) & bits).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let n = Network::parse("10.1.2.3/8").unwrap();
        assert!(n.contains("10.200.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(Network::parse("2001:db8::/32")
            .unwrap()
            .contains("2001:db8:1::1".parse().unwrap()));
        assert!(Network::parse("192.0.2.7")
            .unwrap()
            .contains("192.0.2.7".parse().unwrap()));
        assert!(!Network::parse("192.0.2.7")
            .unwrap()
            .contains("192.0.2.8".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Network::parse("10.0.0.0/33")
            .unwrap_err()
            .contains("0 to 32"));
        assert!(Network::parse("ten").unwrap_err().contains("not a network"));
    }
}
