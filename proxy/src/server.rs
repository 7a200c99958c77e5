//! Listeners and workers, and the life of a client connection.
//!
//! Each worker is a thread with its own single-threaded tokio runtime, its
//! own listening socket on the shared address (`SO_REUSEPORT`: the kernel
//! spreads connections), and its own upstream connections. Nothing on the
//! data path crosses threads.
//!
//! A connection, from accept to close:
//!
//! ```text
//! accept ─▶ admit ─▶ handshake ─────────▶ serve HTTP/2 ──────────────▶ close
//!             │        │ TLS (optional),     │ keepalive PINGs
//!             │        │ then the preface,   │ no call open for idle_timeout: GOAWAY
//!             │        │ by header_read_     │ older than max_connection_age: GOAWAY
//!             │        │ timeout             │ drain: GOAWAY; calls get drain_timeout
//!             │        └─ not HTTP/2: 505 and close
//!             └─ over max_connections or max_handshaking: closed at once
//! ```
//!
//! On drain every worker stops accepting, sends GOAWAY on its connections
//! and waits for their calls, up to the drain timeout.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::call::Activity;
use crate::config;
use crate::metrics;
use crate::proxy;
use crate::respond;
use crate::state::{self, Conn, Shared, Worker};

/// The listener's TLS acceptor; `None` serves cleartext HTTP/2. Swapped when
/// the certificate files change.
pub(crate) type TlsState = Arc<ArcSwapOption<tokio_rustls::TlsAcceptor>>;

/// Binds `addr` with `SO_REUSEPORT`, so every worker can own a socket on it.
pub(crate) fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

pub(crate) type H2Builder = hyper::server::conn::http2::Builder<TokioExecutor>;

/// The HTTP/2 server settings of a listener config.
pub(crate) fn h2_builder(l: &config::Listener) -> H2Builder {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.max_concurrent_streams)
        .initial_stream_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .max_pending_accept_reset_streams(Some(l.max_pending_resets))
        // gRPC has no use for `date`; it is an unindexable literal per response.
        .auto_date_header(false);
    if !l.keepalive.interval.is_zero() {
        builder
            .keep_alive_interval(l.keepalive.interval.0)
            .keep_alive_timeout(l.keepalive.timeout.0);
    }
    builder
}

/// What every connection of a worker needs, rebuilt when a reload changes
/// the listener settings (new connections take them; open ones keep theirs).
struct Serving {
    listener: config::Listener,
    builder: H2Builder,
}

/// Runs one worker until `drain` turns true and its connections are done
/// (or the drain timeout passes).
pub(crate) async fn run_worker(
    index: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tls: TlsState,
    mut drain: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the listening socket");
            return;
        }
    };
    let worker = Arc::new(Worker::new(index, shared.clone()));
    // Every connection task holds a receiver; when all are dropped, the
    // worker's connections are done.
    let (open_tx, open_rx) = watch::channel(());
    let mut serving: Option<Arc<Serving>> = None;
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some(admitted) = Admitted::new(&shared) else {
            drop(stream);
            continue;
        };
        let current = {
            let active = shared.active.load();
            match &serving {
                Some(s) if s.listener == active.config.listener => s.clone(),
                _ => {
                    let s = Arc::new(Serving {
                        builder: h2_builder(&active.config.listener),
                        listener: active.config.listener.clone(),
                    });
                    serving = Some(s.clone());
                    s
                }
            }
        };
        // A client that vanished is let go within 90 s of silence.
        crate::tcp::tune(&stream, Duration::from_secs(60));
        let acceptor = tls.load_full();
        let (worker, drain, open) = (worker.clone(), drain.clone(), open_rx.clone());
        tokio::spawn(async move {
            serve_connection(stream, peer, acceptor, worker, current, drain, admitted).await;
            drop(open);
        });
    }
    drop(listener);
    drop(open_rx);
    let timeout = state::drain_timeout(&shared);
    tokio::select! {
        _ = open_tx.closed() => tracing::debug!("worker drained"),
        _ = tokio::time::sleep(timeout) => tracing::warn!(timeout = ?timeout, "drain timeout reached with calls still in flight"),
    }
}

/// A connection counted against `listener.max_connections` while it lives.
pub(crate) struct Admitted {
    shared: Arc<Shared>,
}

impl Admitted {
    /// Counts a new connection, or `None` (counted as refused) when the
    /// listener is full.
    pub(crate) fn new(shared: &Arc<Shared>) -> Option<Self> {
        let max = shared.active.load().config.listener.max_connections;
        if shared.connections.fetch_add(1, Ordering::AcqRel) >= max {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            metrics::get().connection_refused("max_connections");
            return None;
        }
        metrics::get().active_connections.inc();
        Some(Admitted {
            shared: shared.clone(),
        })
    }

    /// A place among the connections still handshaking, or `None` (counted
    /// as refused) when `listener.max_handshaking` are.
    pub(crate) fn handshake(&self, max: usize) -> Option<Handshaking<'_>> {
        let n = &self.shared.handshaking;
        if n.fetch_add(1, Ordering::AcqRel) >= max {
            n.fetch_sub(1, Ordering::AcqRel);
            metrics::get().connection_refused("max_handshaking");
            return None;
        }
        Some(Handshaking(n))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
        metrics::get().active_connections.dec();
    }
}

/// A connection counted against `listener.max_handshaking` until its
/// handshake ends.
pub(crate) struct Handshaking<'a>(&'a AtomicUsize);

impl Drop for Handshaking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The HTTP/2 client preface: what a gRPC client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection said.
enum Opening {
    /// The whole HTTP/2 preface.
    H2,
    /// Something else (HTTP/1, most likely), after `usize` bytes.
    Other(usize),
    /// The client closed, failed, or was too slow.
    Gone,
}

/// Reads the first bytes of a connection into `buf`, until they are the
/// whole HTTP/2 preface, stop matching it, or `deadline` passes. The bytes
/// are consumed (a read clears the socket's readiness, so a client that
/// sends half the preface and waits costs nothing), and [`Prefixed`] gives
/// them back to the HTTP parser.
async fn read_opening<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut [u8; 24],
    deadline: Instant,
) -> Opening {
    let mut have = 0;
    let read = async {
        loop {
            match io.read(&mut buf[have..]).await {
                Ok(0) | Err(_) => return Opening::Gone,
                Ok(n) => {
                    let was = have;
                    have += n;
                    if buf[was..have] != PREFACE[was..have] {
                        return Opening::Other(have);
                    }
                    if have == PREFACE.len() {
                        return Opening::H2;
                    }
                }
            }
        }
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or(Opening::Gone)
}

/// A connection whose first bytes were already read: they are read again
/// first, then the stream itself. Writes pass straight through (vectored
/// writes included, so HTTP/2 still batches its frames).
pub(crate) struct Prefixed<IO> {
    prefix: [u8; 24],
    len: u8,
    pos: u8,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    fn new(inner: IO, prefix: [u8; 24], len: usize) -> Self {
        Prefixed {
            prefix,
            len: len.min(24) as u8,
            pos: 0,
            inner,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.len {
            let rest = &this.prefix[usize::from(this.pos)..usize::from(this.len)];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n as u8;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<Arc<tokio_rustls::TlsAcceptor>>,
    worker: Arc<Worker>,
    serving: Arc<Serving>,
    drain: watch::Receiver<bool>,
    admitted: Admitted,
) {
    let l = &serving.listener;
    let Some(handshaking) = admitted.handshake(l.max_handshaking) else {
        return;
    };
    let deadline = Instant::now() + l.header_read_timeout.0;
    let mut first = [0u8; 24];
    let result = match acceptor {
        None => match read_opening(&mut stream, &mut first, deadline).await {
            Opening::H2 => {
                drop(handshaking);
                let io = Prefixed::new(stream, first, PREFACE.len());
                serve_h2(io, Conn::new(peer, None), worker, &serving, drain).await
            }
            Opening::Other(n) => {
                drop(handshaking);
                http1_refusal(Prefixed::new(stream, first, n)).await;
                return;
            }
            Opening::Gone => {
                metrics::get().connection_refused("handshake");
                return;
            }
        },
        Some(acceptor) => {
            let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    metrics::get().connection_refused("handshake");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    metrics::get().connection_refused("handshake");
                    return;
                }
            };
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                drop(handshaking);
                http1_refusal(tls).await;
                return;
            }
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|c| crate::tls::client_identity(c));
            match read_opening(&mut tls, &mut first, deadline).await {
                Opening::H2 => {
                    drop(handshaking);
                    let io = Prefixed::new(tls, first, PREFACE.len());
                    let conn = Conn::new(peer, identity);
                    serve_h2(io, conn, worker, &serving, drain).await
                }
                Opening::Other(_) | Opening::Gone => {
                    metrics::get().connection_refused("handshake");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Serves HTTP/2 on a connection whose preface has arrived, until it ends:
/// GOAWAY when it has been idle for `idle_timeout`, when it is older than
/// `max_connection_age`, or on drain; then its calls get
/// `drain_timeout`. Those timers live in a task of their own
/// ([`lifecycle`]): the connection's task only looks at one flag per poll.
async fn serve_h2<IO>(
    io: IO,
    conn: Conn,
    worker: Arc<Worker>,
    serving: &Serving,
    drain: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let l = &serving.listener;
    let goaway = Arc::new(GoAway::default());
    let (ended, ended_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(lifecycle(
        l.clone(),
        conn.activity.clone(),
        conn.peer.port(),
        goaway.clone(),
        drain,
        ended_rx,
    ));
    let conn = Arc::new(conn);
    let service = hyper::service::service_fn(move |req| {
        let open = conn.activity.open();
        // Boxed where it is made: hyper moves the call's future into the
        // stream's task, and a pointer moves cheaper than the future's
        // kilobyte and more.
        let call = Box::pin(proxy::handle(worker.clone(), req, conn.clone()));
        async move {
            let mut response = call.await;
            response.body_mut().hold(open);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let connection = serving.builder.serve_connection(TokioIo::new(io), service);
    let served = Served {
        connection: Box::pin(connection),
        goaway,
        registered: false,
        shutting: false,
    };
    let r = served.await;
    drop(ended);
    r
}

/// What the lifecycle task asks of its connection.
#[derive(Default)]
struct GoAway {
    /// 0: nothing; 1: send GOAWAY and let calls finish; 2: close now.
    asked: std::sync::atomic::AtomicU8,
    waker: futures::task::AtomicWaker,
}

impl GoAway {
    fn ask(&self, level: u8) {
        self.asked.fetch_max(level, Ordering::AcqRel);
        self.waker.wake();
    }
}

/// A hyper connection that obeys its [`GoAway`].
struct Served<C> {
    connection: Pin<Box<C>>,
    goaway: Arc<GoAway>,
    /// The task's waker is with the [`GoAway`] (a task's waker does not
    /// change: registered once, and again after each wake).
    registered: bool,
    shutting: bool,
}

impl<IO, S> Future for Served<hyper::server::conn::http2::Connection<TokioIo<IO>, S, TokioExecutor>>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::body::ResponseBody>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = Result<(), hyper::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if !this.registered {
            this.registered = true;
            this.goaway.waker.register(cx.waker());
        }
        match this.goaway.asked.load(Ordering::Acquire) {
            0 => {}
            1 => {
                if !this.shutting {
                    this.shutting = true;
                    this.goaway.waker.register(cx.waker());
                    this.connection.as_mut().graceful_shutdown();
                }
            }
            // The calls had their drain timeout.
            _ => return Poll::Ready(Ok(())),
        }
        this.connection.as_mut().poll(cx)
    }
}

/// The timers of one connection: asks it to go away when it has been idle
/// for `idle_timeout` (looking every half of it: it goes between one and
/// one and a half idle timeouts after its last call), when it is older
/// than `max_connection_age`, or on drain, then closes it after
/// `drain_timeout`; and every quarter of `stream_idle_timeout` looks at
/// its calls without a deadline. Ends with the connection.
async fn lifecycle(
    l: config::Listener,
    activity: Arc<Activity>,
    port: u16,
    goaway: Arc<GoAway>,
    mut drain: watch::Receiver<bool>,
    mut ended: tokio::sync::oneshot::Receiver<()>,
) {
    let born = Instant::now();
    // ±10% (from the peer's port), so connections made together do not all
    // come back at once.
    let spread = f64::from(port % 201) / 1000.0 - 0.1;
    let age = (!l.max_connection_age.is_zero())
        .then(|| born + l.max_connection_age.0.mul_f64(1.0 + spread));
    let idle_every = (!l.idle_timeout.is_zero()).then(|| l.idle_timeout.0 / 2);
    let look_every = (!l.stream_idle_timeout.is_zero()).then(|| l.stream_idle_timeout.0 / 4);
    let mut next_idle = idle_every.map(|h| born + h);
    let mut next_look = look_every.map(|h| born + h);
    let (mut seen, mut quiet) = (activity.idle(), 0);
    let far = born + Duration::from_secs(86_400 * 365);
    loop {
        let wake = [age, next_idle, next_look]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(far);
        tokio::select! {
            biased;
            _ = &mut ended => return,
            _ = drain.wait_for(|d| *d) => break,
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if age.is_some_and(|a| a <= now) {
                    tracing::debug!("connection reached max_connection_age: GOAWAY");
                    break;
                }
                if let (Some(at), Some(h)) = (next_look, look_every) {
                    if at <= now {
                        activity.look();
                        next_look = Some(now + h);
                    }
                }
                if let (Some(at), Some(h)) = (next_idle, idle_every) {
                    if at <= now {
                        // No call open, and none ended since the last look:
                        // idle all that half idle timeout.
                        let current = activity.idle();
                        quiet = if current.0 && current == seen { quiet + 1 } else { 0 };
                        seen = current;
                        if quiet >= 2 {
                            tracing::debug!("connection idle for idle_timeout: GOAWAY");
                            break;
                        }
                        next_idle = Some(now + h);
                    }
                }
            }
        }
    }
    goaway.ask(1);
    tokio::select! {
        _ = &mut ended => {}
        _ = tokio::time::sleep(l.drain_timeout.0) => goaway.ask(2),
    }
}

/// Answers an HTTP/1 client with 505 and a one-line reason, then closes.
async fn http1_refusal<IO>(io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(respond::http1_refusal())
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
}

/// Whether the process serves: config loaded, listeners bound, not draining.
pub(crate) fn is_ready(shared: &Shared) -> bool {
    shared.listening.load(Ordering::SeqCst) && !shared.draining.load(Ordering::SeqCst)
}
