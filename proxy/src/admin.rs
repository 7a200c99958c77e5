//! The admin server (default 127.0.0.1:9901), on its own port away from
//! traffic: `/metrics`, `/live`, `/ready`, `/config`, and `/limits` (a
//! key's state in the store in use, changing nothing; loopback clients
//! only, whatever address the server is bound to).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics;
use crate::server;
use crate::state::Shared;

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Answers one admin request.
pub(crate) fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "admin endpoints answer GET\n",
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::get().render(),
        ),
        "/live" => reply(StatusCode::OK, TEXT, "live\n"),
        "/ready" => {
            if server::is_ready(shared) {
                reply(StatusCode::OK, TEXT, "ready\n")
            } else if shared.draining.load(std::sync::atomic::Ordering::SeqCst) {
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "draining\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n")
            }
        }
        "/config" => {
            let active = shared.active.load();
            match serde_json::to_string_pretty(&active.config.redacted()) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, e.to_string()),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; admin endpoints: /metrics /live /ready /config /limits\n",
        ),
    }
}

/// Longest query `/limits` reads.
const MAX_QUERY_BYTES: usize = 4096;

/// `GET /limits`: with no `route`, every route with limits and its limits;
/// with `route` (a route's name, or a call's `/package.Service/Method`),
/// that route's limits; with `limit` and `key` too, that key's state in
/// the store in use (JSON), changing nothing.
async fn limits(shared: &Shared, peer: SocketAddr, query: &str) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let refuse = |status, why: String| reply(status, TEXT, why + "\n");
    // An IPv4 client of a dual-stack bind is ::ffff:127.0.0.1.
    if !peer.ip().to_canonical().is_loopback() {
        return refuse(
            StatusCode::FORBIDDEN,
            "/limits answers loopback clients only: ask from tollgate's own host or pod (tollgate inspect, kubectl exec or kubectl port-forward)".into(),
        );
    }
    if query.len() > MAX_QUERY_BYTES {
        return refuse(
            StatusCode::URI_TOO_LONG,
            format!(
                "the query is {} bytes; /limits reads at most {MAX_QUERY_BYTES}",
                query.len()
            ),
        );
    }
    let (mut route, mut limit, mut key) = (None, None, None);
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match name.as_ref() {
            "route" => &mut route,
            "limit" => &mut limit,
            "key" => &mut key,
            other => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown parameter {}; /limits takes route, limit and key",
                        crate::config::shown(other)
                    ),
                )
            }
        };
        if slot.replace(value.into_owned()).is_some() {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("parameter {name} is given twice: give it once"),
            );
        }
    }
    let active = shared.active.load_full();
    let store = match &active.stores.redis {
        Some(r) => r.backend(),
        None => "memory",
    };
    let with_limits = || {
        active
            .routes
            .iter()
            .filter_map(|r| r.limits.as_ref().map(|l| (r, l)))
    };
    let Some(route) = route else {
        let routes: Vec<serde_json::Value> = with_limits()
            .map(|(r, l)| serde_json::json!({ "route": &*r.name, "limits": l.describe() }))
            .collect();
        return json_reply(
            StatusCode::OK,
            &serde_json::json!({ "store": store, "routes": routes }),
        );
    };
    if route.starts_with("rls:") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the rate limit service's keys are asked with ShouldRateLimit itself: a descriptor whose own hits_addend is 0 takes nothing and answers what is left".into(),
        );
    }
    let found = match route.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, method)) => active.routes.find(service, method),
        None => active.routes.iter().find(|r| *r.name == *route),
    };
    let Some(found) = found else {
        let names: Vec<&str> = with_limits().map(|(r, _)| &*r.name).collect();
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "no route {}; routes with limits: {}",
                crate::config::shown(&route),
                names.join(", ")
            ),
        );
    };
    let Some(step) = &found.limits else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("route {:?} has no limits", &*found.name),
        );
    };
    let (limit, key) = match (limit, key) {
        (Some(l), Some(k)) => (l, k),
        (None, None) => {
            return json_reply(
                StatusCode::OK,
                &serde_json::json!({ "store": store, "route": &*found.name, "limits": step.describe() }),
            )
        }
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "a key's state needs both limit and key (its values joined by /, as tollgate explain prints them)".into(),
            )
        }
    };
    let asked = match step.ask(&limit, &key) {
        Ok(a) => a,
        Err(why) => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("route {:?}: {why}", &*found.name),
            )
        }
    };
    let worker = active
        .stores
        .redis
        .as_ref()
        .map_or(0, |r| r.control_worker());
    match crate::limit::step::state(&active.stores, worker, asked).await {
        Ok(mut state) => {
            state["route"] = (*found.name).into();
            json_reply(StatusCode::OK, &state)
        }
        Err(why) => refuse(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

fn json_reply(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(v) {
        Ok(mut json) => {
            json.push('\n');
            reply(status, "application/json", json)
        }
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            e.to_string(),
        ),
    }
}

/// Serves the admin endpoints until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    if *stop.borrow() {
        return;
    }
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move {
                    let asks = req.method() == Method::GET || req.method() == Method::HEAD;
                    let r = if req.uri().path() == "/limits" && asks {
                        limits(&shared, peer, req.uri().query().unwrap_or("")).await
                    } else {
                        respond(&shared, &req)
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
