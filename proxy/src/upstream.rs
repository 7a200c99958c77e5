//! Upstream clusters: HTTP/2 connections to each endpoint, reused and
//! multiplexed by every call, reopened when they close.
//!
//! Each worker thread has its own [`Pool`] per upstream, so calls on one
//! worker share connections without crossing threads. Within a pool, calls
//! go round robin over endpoints (and over `connections` per endpoint).
//!
//! Calls are sent with the `h2` crate directly: the request's first message
//! (already received for a unary call) is queued together with its HEADERS,
//! so both leave in one write and the upstream wakes once per call. The rest
//! of a streaming body follows with flow-control backpressure.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http_body::Body as _;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::body::{OpenStream, RequestBody};
use crate::config;
use crate::grpc::status::Code;
use crate::metrics;

/// TLS settings for an upstream.
pub(crate) struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

/// A configured upstream cluster.
pub(crate) struct UpstreamSpec {
    /// Its name in the config.
    pub(crate) name: Arc<str>,
    /// The config it was built from (to tell whether a reload changed it).
    pub(crate) config: config::Upstream,
    endpoints: Vec<(String, u16)>,
    tls: Option<UpstreamTls>,
    /// A hash of the files it read (the CA bundle): a reload that finds
    /// them changed under the same paths builds new connections.
    pub(crate) files: u64,
}

/// Why a call could not be forwarded.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamError {
    /// The upstream's name.
    pub(crate) upstream: Arc<str>,
    /// The endpoint.
    pub(crate) endpoint: String,
    /// Short label for metrics (`connect_refused`, `reset`, …).
    pub(crate) kind: &'static str,
    /// What happened, with internal details: for logs, never for clients.
    pub(crate) detail: String,
    /// How the stream ended, when the upstream (or its connection) ended it.
    pub(crate) ended: Option<Ended>,
}

/// How an upstream ended a stream before its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// RST_STREAM with this code.
    Reset(h2::Reason),
    /// The connection went away (GOAWAY, or closed).
    ConnectionLost,
    /// The upstream broke the HTTP/2 protocol.
    Protocol,
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

// === impl UpstreamError ===

impl UpstreamError {
    /// The status a client gets: the gRPC spec's mapping of how the stream
    /// ended, and a message naming the upstream and what happened, without
    /// addresses or TLS text (those are logged).
    pub(crate) fn status(&self) -> (Code, String) {
        (self.code(), self.message())
    }

    /// The status code alone (see [`status`](Self::status)).
    pub(crate) fn code(&self) -> Code {
        match self.ended {
            Some(Ended::Reset(reason)) => crate::grpc::status::reset_code(reason),
            Some(Ended::Protocol) => Code::Internal,
            Some(Ended::ConnectionLost) | None => Code::Unavailable,
        }
    }

    fn message(&self) -> String {
        let up = &self.upstream;
        match self.ended {
            Some(Ended::Reset(reason)) => format!("upstream {up} reset the call ({reason:?})"),
            Some(Ended::ConnectionLost) => {
                format!("upstream {up} closed its connection before answering")
            }
            Some(Ended::Protocol) => format!("upstream {up} broke the HTTP/2 protocol"),
            None => format!("upstream {up} unavailable: {}", kind_text(self.kind)),
        }
    }
}

/// A metric kind label, as words for a client.
fn kind_text(kind: &str) -> &'static str {
    match kind {
        "connect_refused" => "connection refused",
        "connect_timeout" => "connect timed out",
        "resolve" => "its address does not resolve",
        "tls" => "TLS handshake failed",
        "handshake" => "HTTP/2 handshake failed",
        _ => "cannot connect",
    }
}

// === impl UpstreamSpec ===

impl UpstreamSpec {
    /// Builds the spec of a validated upstream; TLS files are read here.
    pub(crate) fn new(
        name: &str,
        u: &config::Upstream,
        base: Option<&Path>,
    ) -> Result<Self, String> {
        let endpoints = u
            .addresses
            .iter()
            .map(|a| a.value().map(|e| (e.host.clone(), e.port)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut files = 0;
        let tls = match &u.tls {
            None => None,
            Some(t) => {
                let ca = config::resolve(&t.ca, base);
                files = crate::tls::fingerprint(&ca);
                let roots = crate::tls::root_store(&ca)?;
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
            files,
        })
    }

    /// `http` or `https`.
    pub(crate) fn scheme(&self) -> http::uri::Scheme {
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
            ended: None,
        }
    }
}

/// One HTTP/2 connection to an endpoint, as calls see it.
#[derive(Clone)]
struct Conn {
    sender: SendRequest<Bytes>,
    /// Calls open on it now.
    open: Arc<AtomicUsize>,
}

impl Conn {
    /// Whether it may carry one more call: below `max` of our own and
    /// below the upstream's SETTINGS_MAX_CONCURRENT_STREAMS.
    fn has_room(&self, max: usize) -> bool {
        let n = self.open.load(Ordering::Relaxed);
        n < max && n < self.sender.current_max_send_streams()
    }
}

struct Slot {
    endpoint: usize,
    conn: Mutex<Option<Conn>>,
    /// Held while (re)connecting, so concurrent calls wait for one connect
    /// instead of opening one connection each.
    connecting: tokio::sync::Mutex<()>,
}

/// One worker's connections to one upstream: per endpoint, `connections`
/// that calls take turns on, and up to `max_connections` when those are
/// full (`max_streams_per_connection`), so that calls whose clients read
/// slowly never hold every call's connection.
pub(crate) struct Pool {
    spec: Arc<UpstreamSpec>,
    /// Per endpoint, `max_connections` slots; the first `connections` take
    /// turns.
    slots: Vec<Slot>,
    next: AtomicUsize,
    /// Per endpoint, when its last connect failed and how: for `HOLD_DOWN`
    /// after that, calls that need a new connection try the other endpoints
    /// first, and calls that waited for that connect get its error.
    failed: Vec<Mutex<Option<(Instant, UpstreamError)>>>,
}

/// How long an endpoint that refused a connection is passed over by calls
/// that can connect to another one.
const HOLD_DOWN: Duration = Duration::from_millis(500);

// === impl Pool ===

impl Pool {
    /// An empty pool; connections open on first use.
    pub(crate) fn new(spec: Arc<UpstreamSpec>) -> Self {
        let max = spec
            .config
            .max_connections
            .max(spec.config.connections)
            .max(1);
        let slots = (0..spec.endpoints.len() * max)
            .map(|i| Slot {
                endpoint: i / max,
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            })
            .collect();
        let failed = (0..spec.endpoints.len())
            .map(|_| Mutex::new(None))
            .collect();
        Pool {
            spec,
            slots,
            next: AtomicUsize::new(0),
            failed,
        }
    }

    /// The spec this pool was built for.
    pub(crate) fn spec(&self) -> &Arc<UpstreamSpec> {
        &self.spec
    }

    /// The slot for the next call, and its connection if it has one: the
    /// next in turn, or when that one is full, another with room, or one
    /// not connected yet (a new connection).
    fn pick(&self) -> (&Slot, Option<Conn>) {
        let c = &self.spec.config;
        let (per, max) = (
            c.connections.max(1),
            c.max_connections.max(c.connections).max(1),
        );
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % (self.spec.endpoints.len() * per);
        let base = turn / per * max;
        let first = &self.slots[base + turn % per];
        let conn = Self::live(first);
        match &conn {
            Some(live) if !live.has_room(c.max_streams_per_connection) => {}
            _ => return (first, conn),
        }
        let mut fresh = None;
        for slot in &self.slots[base..base + max] {
            match Self::live(slot) {
                Some(live) if live.has_room(c.max_streams_per_connection) => {
                    return (slot, Some(live))
                }
                Some(_) => {}
                None => {
                    fresh.get_or_insert(slot);
                }
            }
        }
        match fresh {
            Some(slot) => (slot, None),
            // All full: the call waits its turn on the upstream's streams.
            None => (first, conn),
        }
    }

    /// Sends a call on a pooled connection and returns the upstream's
    /// response, with the call counted on its connection until the
    /// response ends. A connection found closing before the call was sent
    /// is replaced and the call sent on the new one; when its endpoint
    /// cannot be reached, on one to another endpoint (the call was never
    /// sent, so that is safe).
    pub(crate) async fn send(
        &self,
        req: http::Request<RequestBody>,
    ) -> Result<(http::Response<RecvStream>, OpenStream), UpstreamError> {
        let c = &self.spec.config;
        let mut tries = 0;
        let (slot, conn) = loop {
            let (slot, conn) = self.pick();
            let (slot, conn) = match conn {
                Some(conn) => (slot, conn),
                None => self.connect_any(slot).await?,
            };
            // Calls that waited for a connect together look again: those
            // beyond its room go to another connection.
            if tries >= c.max_connections || conn.has_room(c.max_streams_per_connection) {
                break (slot, conn);
            }
            tries += 1;
        };
        // Counted before any wait, so that calls picking meanwhile see it.
        let Conn { sender, open } = conn;
        let mut open = OpenStream::new(open);
        let (parts, mut body) = req.into_parts();
        let (slot, mut sender, replaced) = self.ready(slot, sender).await?;
        if let Some(other) = replaced {
            open = OpenStream::new(other);
        }
        let eos = body.is_end_stream();
        let (response, mut stream) = sender
            .send_request(http::Request::from_parts(parts, ()), eos)
            .map_err(|e| self.h2_error(slot.endpoint, &e))?;
        if !eos {
            // Queue what the client already sent, in this same turn, so it
            // goes out in the write that carries the HEADERS.
            if poll_fn(|cx| Poll::Ready(pipe(&mut body, &mut stream, cx, false)))
                .await
                .is_pending()
            {
                tokio::spawn(async move {
                    poll_fn(|cx| pipe(&mut body, &mut stream, cx, true)).await;
                });
            }
        }
        match response.await {
            Ok(r) => Ok((r, open)),
            Err(e) => Err(self.h2_error(slot.endpoint, &e)),
        }
    }

    fn h2_error(&self, endpoint: usize, e: &h2::Error) -> UpstreamError {
        let (kind, ended) = match e.reason() {
            Some(reason) if e.is_reset() => ("reset", Ended::Reset(reason)),
            _ if e.is_go_away() && e.is_remote() => ("goaway", Ended::ConnectionLost),
            _ if e.is_io() => ("io", Ended::ConnectionLost),
            // A GOAWAY of our own: the upstream broke the protocol.
            _ => ("protocol", Ended::Protocol),
        };
        let mut error = self.spec.error(endpoint, kind, e.to_string());
        error.ended = Some(ended);
        error
    }

    /// `sender` ready for one more stream; a closed connection is replaced
    /// once (then its slot and call counter come too).
    async fn ready<'a>(
        &'a self,
        slot: &'a Slot,
        sender: SendRequest<Bytes>,
    ) -> Result<(&'a Slot, SendRequest<Bytes>, Option<Arc<AtomicUsize>>), UpstreamError> {
        match sender.ready().await {
            Ok(sender) => Ok((slot, sender, None)),
            Err(_) => {
                self.forget(slot);
                let (slot, Conn { sender, open }) = self.connect_any(slot).await?;
                match sender.ready().await {
                    Ok(sender) => Ok((slot, sender, Some(open))),
                    Err(e) => Err(self.h2_error(slot.endpoint, &e)),
                }
            }
        }
    }

    /// A connection for a call not sent yet: `slot`'s, or when its endpoint
    /// cannot be reached, one to each other endpoint in turn: first those
    /// that have not failed within `HOLD_DOWN`, then those that have. The
    /// first error when none connects.
    async fn connect_any<'a>(&'a self, slot: &'a Slot) -> Result<(&'a Slot, Conn), UpstreamError> {
        let n = self.spec.endpoints.len();
        let (fresh, held): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|step| (slot.endpoint + step) % n)
            .partition(|&e| n == 1 || !self.held_down(e));
        let mut first = None;
        for endpoint in fresh.into_iter().chain(held) {
            let s = if endpoint == slot.endpoint {
                slot
            } else {
                self.endpoint_slot(endpoint)
            };
            match self.connection(s).await {
                Ok(c) => return Ok((s, c)),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or_else(|| self.spec.error(slot.endpoint, "connect", "no address")))
    }

    /// The last failed connect to `endpoint` when it came at or after
    /// `since`.
    fn failed_since(&self, endpoint: usize, since: Instant) -> Option<UpstreamError> {
        let last = self.failed[endpoint].lock().ok()?;
        match &*last {
            Some((at, e)) if *at >= since => Some(e.clone()),
            _ => None,
        }
    }

    fn held_down(&self, endpoint: usize) -> bool {
        self.failed[endpoint].lock().ok().is_some_and(|last| {
            last.as_ref()
                .is_some_and(|(at, _)| at.elapsed() < HOLD_DOWN)
        })
    }

    /// The slot a call sent to `endpoint` takes: a connected one with room,
    /// else one not connected yet, else its first.
    fn endpoint_slot(&self, endpoint: usize) -> &Slot {
        let c = &self.spec.config;
        let max = c.max_connections.max(c.connections).max(1);
        let slots = &self.slots[endpoint * max..(endpoint + 1) * max];
        slots
            .iter()
            .find(|s| Self::live(s).is_some_and(|l| l.has_room(c.max_streams_per_connection)))
            .or_else(|| slots.iter().find(|s| Self::live(s).is_none()))
            .unwrap_or(&slots[0])
    }

    fn forget(&self, slot: &Slot) {
        if let Ok(mut s) = slot.conn.lock() {
            *s = None;
        }
    }

    fn live(slot: &Slot) -> Option<Conn> {
        let guard = slot.conn.lock().ok()?;
        guard.clone()
    }

    async fn connection(&self, slot: &Slot) -> Result<Conn, UpstreamError> {
        if let Some(c) = Self::live(slot) {
            return Ok(c);
        }
        let asked = Instant::now();
        let _connecting = slot.connecting.lock().await;
        if let Some(c) = Self::live(slot) {
            return Ok(c);
        }
        // The connect this call waited for failed: its answer now, rather
        // than another connect timeout in turn.
        if let Some(e) = self.failed_since(slot.endpoint, asked) {
            return Err(e);
        }
        // Boxed: the connect path (TCP, TLS, HTTP/2 handshake) is rare, and
        // inlined it would make every call's future several KiB larger.
        let c = match Box::pin(self.connect(slot.endpoint)).await {
            Ok(c) => c,
            Err(e) => {
                if let Ok(mut last) = self.failed[slot.endpoint].lock() {
                    *last = Some((Instant::now(), e.clone()));
                }
                return Err(e);
            }
        };
        if let Ok(mut g) = slot.conn.lock() {
            *g = Some(c.clone());
        }
        Ok(c)
    }

    async fn connect(&self, endpoint: usize) -> Result<Conn, UpstreamError> {
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
        // A host that vanished: probes find it when nothing is in flight
        // (within a minute), and data unacknowledged for 30 s drops the
        // connection instead of retransmitting for ~15 minutes.
        let sock = crate::tcp::tune(&tcp, Duration::from_secs(30));
        let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(30)));
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

    async fn handshake<IO>(&self, endpoint: usize, io: IO) -> Result<Conn, UpstreamError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let c = &self.spec.config;
        // Each call may hold a whole stream window unread (its client reads
        // slowly): the connection window covers every call the connection
        // may carry, so those never stall the others.
        let window = (STREAM_WINDOW as usize).saturating_mul(c.max_streams_per_connection);
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(window.min(MAX_WINDOW) as u32)
            .max_concurrent_reset_streams(10_000)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| {
                self.spec.error(
                    endpoint,
                    "handshake",
                    format!("HTTP/2 handshake failed: {e}"),
                )
            })?;
        let open = Arc::new(AtomicUsize::new(0));
        let name = self.spec.name.clone();
        let pings = conn.ping_pong();
        let ended = name.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %ended, error = %e, "upstream connection ended");
            }
        });
        // PINGs in a task of their own: the connection's task polls nothing
        // else. An unanswered PING aborts the connection.
        if let Some(pings) = pings.filter(|_| !c.keepalive.interval.is_zero()) {
            let (keepalive, calls) = (c.keepalive, open.clone());
            tokio::spawn(async move {
                if keep_alive(pings, keepalive, calls, &task).await {
                    task.abort();
                    metrics::get().upstream_error(&name, "keepalive");
                    tracing::warn!(upstream = %name, timeout = %keepalive.timeout, "upstream did not answer a PING: connection dropped, calls on it fail, the next call reconnects");
                }
            });
        }
        Ok(Conn { sender, open })
    }
}

/// The stream window each upstream call gets: what one call may hold
/// unread while its client is slow to read.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// HTTP/2's largest window.
const MAX_WINDOW: usize = (1 << 31) - 1;

/// PINGs the upstream every `interval` while calls are open on the
/// connection (an idle connection is left alone: some servers count pings
/// without calls as abuse). `true`: one was not answered in time; `false`:
/// the connection (its task, `conn`) ended.
async fn keep_alive(
    mut pings: h2::PingPong,
    k: config::Keepalive,
    calls: Arc<AtomicUsize>,
    conn: &tokio::task::JoinHandle<()>,
) -> bool {
    loop {
        tokio::time::sleep(k.interval.0).await;
        if conn.is_finished() {
            return false;
        }
        if calls.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match tokio::time::timeout(k.timeout.0, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return false,
            Err(_) => return true,
        }
    }
}

/// Moves the client's request body to the upstream stream. With
/// `backpressure`, waits for the upstream's flow-control window before
/// taking more from the client (the eager first pass does not: what it sends
/// was already received). Ready when the body is done (or failed, in which
/// case the upstream stream is reset).
fn pipe(
    body: &mut RequestBody,
    stream: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    backpressure: bool,
) -> Poll<()> {
    loop {
        if backpressure {
            stream.reserve_capacity(1);
            if stream.capacity() == 0 {
                loop {
                    match std::task::ready!(stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
            } else if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        match std::task::ready!(Pin::new(&mut *body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    if stream.send_data(data, eos).is_err() || eos {
                        return Poll::Ready(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        stream.reserve_capacity(0);
                        let _ = stream.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            },
            Some(Err(_)) => {
                // The client's stream failed or its framing was refused:
                // the upstream must not see a partial call as complete.
                stream.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(());
            }
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return Poll::Ready(());
            }
        }
    }
}
