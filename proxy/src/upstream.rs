//! Upstream clusters: HTTP/2 connections to each endpoint, reused and
//! multiplexed by every call, reopened when they close.
//!
//! Each worker thread has its own [`Pool`] per upstream, so calls on one
//! worker share connections without crossing threads. Within a pool, calls
//! go round robin over endpoints (and over `connections` per endpoint).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::config;
use crate::metrics;

/// TLS settings for an upstream.
pub struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

/// A configured upstream cluster.
pub struct UpstreamSpec {
    /// Its name in the config.
    pub name: Arc<str>,
    /// The config it was built from (to tell whether a reload changed it).
    pub config: config::Upstream,
    endpoints: Vec<(String, u16)>,
    tls: Option<UpstreamTls>,
}

/// Why a call could not be forwarded.
#[derive(Debug)]
pub struct UpstreamError {
    /// The upstream's name.
    pub upstream: Arc<str>,
    /// The endpoint.
    pub endpoint: String,
    /// Short label for metrics.
    pub kind: &'static str,
    /// What happened.
    pub detail: String,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "upstream {} ({}) unavailable: {}",
            self.upstream, self.endpoint, self.detail
        )
    }
}

// === impl UpstreamSpec ===

impl UpstreamSpec {
    /// Builds the spec of a validated upstream; TLS files are read here.
    pub fn new(name: &str, u: &config::Upstream, base: Option<&Path>) -> Result<Self, String> {
        let endpoints = u
            .addresses
            .iter()
            .map(|a| config::parse_host_port(a))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = match &u.tls {
            None => None,
            Some(t) => {
                let roots = crate::tls::root_store(&config::resolve(&t.ca, base))?;
                let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                cfg.alpn_protocols = vec![b"h2".to_vec()];
                let server_name = match &t.server_name {
                    Some(n) => Some(
                        ServerName::try_from(n.clone())
                            .map_err(|e| format!("tls.server_name {n:?}: {e}"))?,
                    ),
                    None => None,
                };
                Some(UpstreamTls {
                    connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
                    server_name,
                })
            }
        };
        Ok(UpstreamSpec {
            name: name.into(),
            config: u.clone(),
            endpoints,
            tls,
        })
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> http::uri::Scheme {
        if self.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        }
    }

    fn error(
        &self,
        endpoint: usize,
        kind: &'static str,
        detail: impl Into<String>,
    ) -> UpstreamError {
        let (h, p) = &self.endpoints[endpoint];
        metrics::get().upstream_error(&self.name, kind);
        UpstreamError {
            upstream: self.name.clone(),
            endpoint: format!("{h}:{p}"),
            kind,
            detail: detail.into(),
        }
    }
}

struct Slot {
    endpoint: usize,
    sender: Mutex<Option<SendRequest<RequestBody>>>,
    /// Held while (re)connecting, so concurrent calls wait for one connect
    /// instead of opening one connection each.
    connecting: tokio::sync::Mutex<()>,
}

/// One worker's connections to one upstream.
pub struct Pool {
    spec: Arc<UpstreamSpec>,
    slots: Vec<Slot>,
    next: AtomicUsize,
}

// === impl Pool ===

impl Pool {
    /// An empty pool; connections open on first use.
    pub fn new(spec: Arc<UpstreamSpec>) -> Self {
        let per = spec.config.connections.max(1);
        let slots = (0..spec.endpoints.len() * per)
            .map(|i| Slot {
                endpoint: i / per,
                sender: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            })
            .collect();
        Pool {
            spec,
            slots,
            next: AtomicUsize::new(0),
        }
    }

    /// The spec this pool was built for.
    pub fn spec(&self) -> &Arc<UpstreamSpec> {
        &self.spec
    }

    /// Sends a request on a pooled connection. A request that a closing
    /// connection refused before sending is retried once on a new one.
    pub async fn send(
        &self,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        let mut sender = self.sender(slot).await?;
        match sender.try_send_request(req).await {
            Ok(r) => Ok(r),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    self.forget(slot, &sender);
                    let mut sender = self.sender(slot).await?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| self.spec.error(slot.endpoint, "request", e.to_string()))
                }
                None => Err(self.request_error(slot.endpoint, e.into_error())),
            },
        }
    }

    fn request_error(&self, endpoint: usize, e: hyper::Error) -> UpstreamError {
        let detail = match std::error::Error::source(&e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        };
        self.spec.error(endpoint, "request", detail)
    }

    fn forget(&self, slot: &Slot, dead: &SendRequest<RequestBody>) {
        if let Ok(mut s) = slot.sender.lock() {
            if s.as_ref()
                .is_some_and(|c| c.is_closed() || dead.is_closed())
            {
                *s = None;
            }
        }
    }

    fn live(slot: &Slot) -> Option<SendRequest<RequestBody>> {
        let guard = slot.sender.lock().ok()?;
        guard.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    async fn sender(&self, slot: &Slot) -> Result<SendRequest<RequestBody>, UpstreamError> {
        if let Some(s) = Self::live(slot) {
            return Ok(s);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(s) = Self::live(slot) {
            return Ok(s);
        }
        // Boxed: the connect path (TCP, TLS, HTTP/2 handshake) is rare, and
        // inlined it would make every call's future several KiB larger.
        let s = Box::pin(self.connect(slot.endpoint)).await?;
        if let Ok(mut g) = slot.sender.lock() {
            *g = Some(s.clone());
        }
        Ok(s)
    }

    async fn connect(&self, endpoint: usize) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let spec = &self.spec;
        let timeout = spec.config.connect_timeout.0;
        let (host, port) = &spec.endpoints[endpoint];
        let connect = async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|e| {
                    spec.error(endpoint, "resolve", format!("cannot resolve {host}: {e}"))
                })?
                .collect();
            let mut last = None;
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    spec.error(endpoint, "connect_refused", "connection refused")
                }
                Some(e) => spec.error(endpoint, "connect", e.to_string()),
                None => spec.error(endpoint, "resolve", format!("{host} has no addresses")),
            })
        };
        let tcp = tokio::time::timeout(timeout, connect).await.map_err(|_| {
            spec.error(
                endpoint,
                "connect_timeout",
                format!(
                    "connect timed out after {}",
                    humantime::format_duration(timeout)
                ),
            )
        })??;
        let _ = tcp.set_nodelay(true);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(30))
                .with_interval(Duration::from_secs(10))
                .with_retries(3),
        );
        match &spec.tls {
            None => self.handshake(endpoint, tcp).await,
            Some(tls) => {
                let name = match &tls.server_name {
                    Some(n) => n.clone(),
                    None => ServerName::try_from(host.clone())
                        .map_err(|e| spec.error(endpoint, "tls", e.to_string()))?,
                };
                let stream = tokio::time::timeout(timeout, tls.connector.connect(name, tcp))
                    .await
                    .map_err(|_| {
                        spec.error(endpoint, "connect_timeout", "TLS handshake timed out")
                    })?
                    .map_err(|e| {
                        spec.error(endpoint, "tls", format!("TLS handshake failed: {e}"))
                    })?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(spec.error(
                        endpoint,
                        "tls",
                        "the upstream did not agree to HTTP/2 (ALPN h2)",
                    ));
                }
                self.handshake(endpoint, stream).await
            }
        }
    }

    async fn handshake<IO>(
        &self,
        endpoint: usize,
        io: IO,
    ) -> Result<SendRequest<RequestBody>, UpstreamError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        // No HTTP/2 keep-alive pings: they cost a clock read per frame.
        // Dead upstreams are found by TCP keepalive (set at connect) and by
        // the next call's error.
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024)
            .max_concurrent_reset_streams(10_000)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                self.spec.error(
                    endpoint,
                    "handshake",
                    format!("HTTP/2 handshake failed: {e}"),
                )
            })?;
        let name = self.spec.name.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %name, error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}
