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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
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
    let worker = Arc::new(Worker::new(shared.clone()));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    {
        let max_streams = shared.active.load().config.listener.max_concurrent_streams;
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(max_streams)
            .initial_stream_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024)
            .max_pending_accept_reset_streams(Some(1000))
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .keep_alive_timeout(Duration::from_secs(20));
    }
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

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<Arc<tokio_rustls::TlsAcceptor>>,
    worker: Arc<Worker>,
    builder: Arc<auto::Builder<TokioExecutor>>,
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
    let service = hyper::service::service_fn(move |req| {
        let worker = worker.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy::handle(worker, req, peer).await) }
    });
    let result = match acceptor {
        None => {
            watcher
                .watch(
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned(),
                )
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
            watcher
                .watch(
                    builder
                        .serve_connection(TokioIo::new(tls), service)
                        .into_owned(),
                )
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Whether the process serves: config loaded, listeners bound, not draining.
pub fn is_ready(shared: &Shared) -> bool {
    shared.listening.load(Ordering::SeqCst) && !shared.draining.load(Ordering::SeqCst)
}
