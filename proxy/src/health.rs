//! `tollgate health`: asks a running tollgate's admin `/ready`, for a
//! container's HEALTHCHECK or an exec probe, so an image needs no curl;
//! and the admin client `tollgate inspect` shares.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Where the admin server listens when nothing says otherwise.
pub(crate) const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

/// Most of the answer's body shown in a failure.
const SHOWN_BODY: usize = 200;

/// The address to dial for a listen address: a wildcard bind (`0.0.0.0`,
/// `[::]`) is reached on loopback of the same family.
pub(crate) fn dial_address(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

/// `GET /ready` on the admin server at `admin`: `Ok` with the answer's
/// first line when it is 200, otherwise what went wrong, in words.
pub(crate) async fn check_ready(admin: SocketAddr, timeout: Duration) -> Result<String, String> {
    let (status, body) = get(admin, "/ready", timeout).await?;
    let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN_BODY)]);
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    if status == http::StatusCode::OK {
        Ok(line)
    } else {
        Err(format!(
            "tollgate is not ready: /ready answered {status}: {line}"
        ))
    }
}

/// `GET path` on the admin server at `admin`, within `timeout`: the
/// answer's status and body, or what went wrong, in words.
pub(crate) async fn get(
    admin: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), String> {
    let endpoint = path.split('?').next().unwrap_or(path);
    match tokio::time::timeout(timeout, ask(admin, path)).await {
        Ok(answer) => answer,
        Err(_) => Err(format!(
            "tollgate admin at {admin} did not answer {endpoint} within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn ask(admin: SocketAddr, path: &str) -> Result<(http::StatusCode, Bytes), String> {
    let tcp = tokio::net::TcpStream::connect(admin).await.map_err(|e| {
        format!("cannot reach tollgate's admin server at {admin}: {e} (is tollgate running, and is admin.address or TOLLGATE_ADMIN_LISTEN this address?)")
    })?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("tollgate admin at {admin}: {e}"))?;
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, admin.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = send
        .send_request(request)
        .await
        .map_err(|e| format!("tollgate admin at {admin}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("tollgate admin at {admin}: the answer broke off: {e}"))?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_bind_is_dialled_on_loopback() {
        let dial = |a: &str| dial_address(a.parse().unwrap()).to_string();
        assert_eq!(dial("0.0.0.0:9901"), "127.0.0.1:9901");
        assert_eq!(dial("[::]:9901"), "[::1]:9901");
        assert_eq!(dial("10.1.2.3:9901"), "10.1.2.3:9901");
        assert_eq!(dial("127.0.0.1:9902"), "127.0.0.1:9902");
    }
}
