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
