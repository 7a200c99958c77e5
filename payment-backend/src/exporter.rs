//! The `/metrics` endpoint on its own port: each scrape first refreshes the
//! gauges read from the database and the pool, then encodes
//! [`crate::metrics`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics;
use crate::store::Store;

/// Refreshes the gauges that are read from the database and the pool.
async fn refresh(store: &Store) {
    let m = metrics::get();
    let pool = store.pool();
    metrics::set_pool(
        pool.size(),
        pool.num_idle(),
        pool.options().get_max_connections(),
    );
    // A scrape must answer even while the database is down: keep the last
    // values when the query does not finish in time.
    if let Ok(Ok(stats)) =
        tokio::time::timeout(Duration::from_millis(500), store.outbox_stats()).await
    {
        m.outbox_pending.set(stats.pending);
        let age = stats
            .oldest_pending_at
            .map(|t| (store.now_micros() - t).max(0) as f64 / 1e6)
            .unwrap_or(0.0);
        m.outbox_oldest_age.set(age);
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let store = store.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(handle(req, &store).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(req: Request<hyper::body::Incoming>, store: &Store) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        r
    };
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/metrics") => {
            refresh(store).await;
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::get().render(),
            )
        }
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use GET /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".into(),
        ),
    }
}
