//! Listeners and workers.
//!
//! Each worker is a thread with its own single-threaded tokio runtime, its
//! own listening socket on the shared address (`SO_REUSEPORT`: the kernel
//! spreads connections), and its own upstream connections. Nothing on the
//! data path crosses threads. On drain every worker stops accepting, sends
//! GOAWAY on its connections and waits for their streams, up to the drain
//! timeout.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::metrics;
use crate::proxy::{self, Shared, Worker};

/// The listener's TLS acceptor; `None` serves cleartext HTTP/2. Swapped when
/// the certificate files change.
pub type TlsState = Arc<ArcSwapOption<tokio_rustls::TlsAcceptor>>;

/// Binds `addr` with `SO_REUSEPORT`, so every worker can own a socket on it.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Runs one worker until `drain` turns true and its connections are done
/// (or the drain timeout passes).
pub async fn run_worker(
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
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(shared.active.load().config.listener.max_concurrent_streams)
        .initial_stream_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .max_pending_accept_reset_streams(Some(1000))
        // gRPC has no use for `date`; it is an unindexable literal per response.
        .auto_date_header(false);
    let builder = Arc::new(builder);
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
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(60))
                .with_interval(Duration::from_secs(10))
                .with_retries(3),
        );
        let acceptor = tls.load_full();
        let worker = worker.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            serve_connection(stream, peer, acceptor, worker, builder, watcher).await;
        });
    }
    drop(listener);
    let timeout = proxy::drain_timeout(&shared);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("worker drained"),
        _ = tokio::time::sleep(timeout) => tracing::warn!(timeout = ?timeout, "drain timeout reached with calls still in flight"),
    }
}

/// The HTTP/2 client preface: what a gRPC client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the first bytes on a connection are (so far) the HTTP/2 preface.
/// Peeking once per connection keeps every later read free of a detection
/// layer.
async fn speaks_h2(stream: &TcpStream) -> bool {
    let mut buf = [0u8; PREFACE.len()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 || buf[..n] != PREFACE[..n] {
            return false;
        }
        if n == PREFACE.len() {
            return true;
        }
        // Only part of the preface has arrived: wait for the rest.
        let _ = tokio::time::timeout_at(deadline, stream.readable()).await;
        tokio::task::yield_now().await;
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<Arc<tokio_rustls::TlsAcceptor>>,
    worker: Arc<Worker>,
    builder: Arc<hyper::server::conn::http2::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    struct Open;
    impl Drop for Open {
        fn drop(&mut self) {
            metrics::get().active_connections.dec();
        }
    }
    metrics::get().active_connections.inc();
    let _open = Open;
    let service = |conn: proxy::Conn| {
        let conn = Arc::new(conn);
        hyper::service::service_fn(move |req| {
            // Boxed where it is made: hyper moves the call's future into
            // the stream's task, and a pointer moves cheaper than the
            // future's kilobyte and more.
            let call = Box::pin(proxy::handle(worker.clone(), req, conn.clone()));
            async move { Ok::<_, std::convert::Infallible>(call.await) }
        })
    };
    let result = match acceptor {
        None => {
            if !speaks_h2(&stream).await {
                http1_refusal(stream).await;
                return;
            }
            let service = service(proxy::Conn::new(peer, None));
            watcher
                .watch(builder.serve_connection(TokioIo::new(stream), service))
                .await
        }
        Some(acceptor) => {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                http1_refusal(tls).await;
                return;
            }
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|c| crate::tls::client_identity(c));
            let service = service(proxy::Conn::new(peer, identity));
            watcher
                .watch(builder.serve_connection(TokioIo::new(tls), service))
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Answers an HTTP/1 client with 505 and a one-line reason, then closes.
async fn http1_refusal<IO>(io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(proxy::http1_refusal())
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
}

/// Whether the process serves: config loaded, listeners bound, not draining.
pub fn is_ready(shared: &Shared) -> bool {
    shared.listening.load(Ordering::SeqCst) && !shared.draining.load(Ordering::SeqCst)
}
