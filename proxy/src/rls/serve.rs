//! The `rls` listener of one worker: Envoy's `RateLimitService` with
//! `grpc.health.v1` and server reflection beside it, on h2c or TLS (the
//! mode set at start; certificates reload). Its connections count against
//! `listener.max_connections` and `max_handshaking` like the proxy's.
//! The services are tonic's; the connections are served by the proxy
//! listener's own HTTP/2 server and settings (its windows, stream and
//! keepalive limits, rapid-reset guard), each drained with GOAWAY.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tollgate_proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use tollgate_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

use crate::server::Admitted;
use crate::state::Shared;

/// Largest request accepted: descriptors are small.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The service of one worker.
struct Service {
    shared: Arc<Shared>,
    worker: usize,
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let active = self.shared.active.load_full();
        let Some(rls) = &active.rls else {
            return Err(tonic::Status::unavailable(
                "tollgate's rate limit service is off: its config has no rls section (restart tollgate to close this listener)",
            ));
        };
        rls.decide(&active.stores, self.worker, request.get_ref())
            .await
            .map(tonic::Response::new)
    }
}

/// A connection's stream with its admission, released when it closes.
struct Counted<IO> {
    io: IO,
    _admitted: Admitted,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves the `rls` listener of worker `worker` until `drain`.
pub(crate) async fn serve(
    worker: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tls: bool,
    drain: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the rls listening socket");
            return;
        }
    };
    if tls {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept_tls(listener, shared.clone(), tx, drain.clone()));
        run(worker, shared, ReceiverStream::new(rx), drain).await;
    } else {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept_plain(listener, shared.clone(), tx, drain.clone()));
        run(worker, shared, ReceiverStream::new(rx), drain).await;
    }
}

async fn accept(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    drain: &mut watch::Receiver<bool>,
) -> Option<Option<(TcpStream, Admitted)>> {
    let (stream, _) = tokio::select! {
        biased;
        // The guard `wait_for` returns is dropped at once: the future stays `Send`.
        _ = async { drop(drain.wait_for(|d| *d).await) } => return None,
        accepted = listener.accept() => match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "rls: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Some(None);
            }
        },
    };
    // A full listener closes this connection, and goes on accepting.
    let Some(admitted) = Admitted::new(shared) else {
        return Some(None);
    };
    crate::tcp::tune(&stream, Duration::from_secs(60));
    Some(Some((stream, admitted)))
}

/// The HTTP/2 client preface every h2c client sends first.
const PREFACE_LEN: usize = 24;

/// Whether the client sent its HTTP/2 preface within `within` (peeked,
/// so the server still reads it): a connection that sends nothing does
/// not hold a place among `listener.max_connections`.
async fn preface(stream: &TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; PREFACE_LEN];
    let waited = tokio::time::timeout(within, async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n >= PREFACE_LEN => return true,
                // Part of it: wait for more to arrive.
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await;
    waited.unwrap_or(false)
}

async fn accept_plain(
    listener: TcpListener,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<Counted<TcpStream>, std::io::Error>>,
    mut drain: watch::Receiver<bool>,
) {
    while let Some(accepted) = accept(&listener, &shared, &mut drain).await {
        let Some((io, admitted)) = accepted else {
            continue;
        };
        let limits = {
            let l = &shared.active.load().config.listener;
            (l.max_handshaking, l.header_read_timeout.0)
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let Some(place) = admitted.handshake(limits.0) else {
                return;
            };
            let ready = preface(&io, limits.1).await;
            drop(place);
            if !ready {
                crate::metrics::get().connection_refused("handshake");
                return;
            }
            let _ = tx
                .send(Ok(Counted {
                    io,
                    _admitted: admitted,
                }))
                .await;
        });
    }
}

async fn accept_tls(
    listener: TcpListener,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<Counted<tokio_rustls::server::TlsStream<TcpStream>>, std::io::Error>>,
    mut drain: watch::Receiver<bool>,
) {
    while let Some(accepted) = accept(&listener, &shared, &mut drain).await {
        let Some((stream, admitted)) = accepted else {
            continue;
        };
        let (acceptor, limits) = {
            let active = shared.active.load();
            let l = &active.config.listener;
            (
                active.rls.as_ref().and_then(|r| r.tls.clone()),
                (l.max_handshaking, l.header_read_timeout.0),
            )
        };
        let Some(acceptor) = acceptor else {
            // The reload that turned TLS off takes effect at the restart.
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let Some(place) = admitted.handshake(limits.0) else {
                return;
            };
            let done = tokio::time::timeout(limits.1, acceptor.accept(stream)).await;
            drop(place);
            match done {
                Ok(Ok(io)) => {
                    let _ = tx
                        .send(Ok(Counted {
                            io,
                            _admitted: admitted,
                        }))
                        .await;
                }
                Ok(Err(e)) => {
                    crate::metrics::get().connection_refused("handshake");
                    tracing::debug!(error = %e, "rls: TLS handshake failed");
                }
                Err(_) => crate::metrics::get().connection_refused("handshake"),
            }
        });
    }
}

async fn run<IO>(
    worker: usize,
    shared: Arc<Shared>,
    mut incoming: ReceiverStream<Result<Counted<IO>, std::io::Error>>,
    mut drain: watch::Receiver<bool>,
) where
    Counted<IO>: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RateLimitServiceServer<Service>>()
        .await;
    // grpc.reflection.v1, and v1alpha for the clients that only know it.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tollgate_proto::ENVOY_RLS_V3_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (v1, v1alpha) = match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "rls: cannot build the reflection service");
            return;
        }
    };
    let service = RateLimitServiceServer::new(Service {
        shared: shared.clone(),
        worker,
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let routes = tonic::service::Routes::new(health)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(service)
        .prepare();
    let routes = hyper_util::service::TowerToHyperService::new(routes);
    // The proxy listener's HTTP/2 server and settings, at start.
    let listener = shared.active.load().config.listener.clone();
    let builder = crate::server::h2_builder(&listener);
    // Every connection task holds a receiver: when all are dropped, the
    // connections are done.
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let io = tokio::select! {
            _ = drain.wait_for(|d| *d) => break,
            next = tokio_stream::StreamExt::next(&mut incoming) => match next {
                Some(Ok(io)) => io,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), routes.clone());
        let (mut drain, open) = (drain.clone(), open_rx.clone());
        tokio::spawn(async move {
            let _open = open;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = drain.wait_for(|d| *d) => {}
            }
            // Drain: GOAWAY, and the requests in flight are answered.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(open_rx);
    let _ = tokio::time::timeout(listener.drain_timeout.0, open_tx.closed()).await;
}
