//! One call through tollgate. [`handle`] is the whole data path:
//!
//! ```text
//! classify ─▶ route ─▶ limit ─▶ deadline ─▶ forward ─▶ observe response
//!   │           │        │                     │
//!   │           │        │                     └─ upstream unreachable: UNAVAILABLE naming it
//!   │           │        └─ refused: trailers-only status, nothing reaches the upstream
//!   │           └─ no route: UNIMPLEMENTED (trailers-only)
//!   └─ not gRPC: an HTTP status with a one-line reason
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{CallTimer, Proxied, RequestBody, ResponseBody, Tally};
use crate::call::CallState;
use crate::config::Config;
use crate::grpc::status::{trailers_only, Code};
use crate::grpc::{path, timeout};
use crate::limit::CallInfo;
use crate::metrics;
use crate::routes::{self, RouteTable};
use crate::upstream::{Pool, UpstreamSpec};

/// A loaded config, ready to serve; swapped whole on reload.
pub struct Active {
    /// The config as loaded (for `/config`).
    pub config: Config,
    /// Routes.
    pub routes: RouteTable,
    /// Upstreams by name.
    pub upstreams: HashMap<String, Arc<UpstreamSpec>>,
    /// Largest message, either direction.
    pub max_message_bytes: u32,
    /// Where limits are decided; a reload with the same Redis settings
    /// keeps the Redis store (and its connections).
    pub stores: crate::limit::step::Stores,
}

// === impl Active ===

impl Active {
    /// Builds the serving state of a validated config.
    pub fn build(
        config: Config,
        base: Option<&std::path::Path>,
        stores: crate::limit::step::Stores,
    ) -> Result<Active, String> {
        let upstreams = routes::upstream_specs(&config, base)?;
        let routes = RouteTable::build(&config, &upstreams, &stores)?;
        Ok(Active {
            stores,
            max_message_bytes: u32::try_from(config.listener.max_message_bytes).unwrap_or(u32::MAX),
            routes,
            upstreams,
            config,
        })
    }
}

/// State shared by every worker.
pub struct Shared {
    /// The config in force; calls load it once at their start, so a reload
    /// never changes a call in flight.
    pub active: ArcSwap<Active>,
    /// Where the config came from (reloads read it again).
    pub config_path: PathBuf,
    /// Set on SIGTERM: `/ready` fails (listeners stop accepting when the
    /// workers are told to drain, `drain_delay` later).
    pub draining: AtomicBool,
    /// Client connections open now (`listener.max_connections`).
    pub connections: std::sync::atomic::AtomicUsize,
    /// Client connections in their TLS handshake or preface now
    /// (`listener.max_handshaking`).
    pub handshaking: std::sync::atomic::AtomicUsize,
    /// Set once every listener is bound.
    pub listening: AtomicBool,
    /// Reloads attempted (valid or not) since start.
    pub reload_attempts: std::sync::atomic::AtomicU64,
    /// In-process limit state; kept across reloads, so limits that did not
    /// change keep counting where they were.
    pub limit_store: Arc<crate::limit::memory::MemoryStore>,
}

/// One worker thread's state: its own upstream connections.
pub struct Worker {
    /// This worker's number (0..workers): picks its own Redis connection.
    pub index: usize,
    /// What all workers share.
    pub shared: Arc<Shared>,
    pools: Mutex<HashMap<Arc<str>, Arc<Pool>>>,
}

// === impl Worker ===

impl Worker {
    /// A worker with no connections yet.
    pub fn new(index: usize, shared: Arc<Shared>) -> Self {
        Worker {
            index,
            shared,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// This worker's pool for `spec`, rebuilt when a reload changed it.
    fn pool(&self, spec: &Arc<UpstreamSpec>) -> Arc<Pool> {
        let Ok(mut pools) = self.pools.lock() else {
            return Arc::new(Pool::new(spec.clone()));
        };
        if let Some(p) = pools.get(&spec.name) {
            if Arc::ptr_eq(p.spec(), spec)
                || (p.spec().config == spec.config && p.spec().files == spec.files)
            {
                return p.clone();
            }
        }
        let p = Arc::new(Pool::new(spec.clone()));
        pools.insert(spec.name.clone(), p.clone());
        p
    }
}

/// What a call knows of its connection; made once per connection.
pub struct Conn {
    /// The client's address.
    pub peer: SocketAddr,
    /// The client's IP as an `x-forwarded-for` value.
    forwarded_for: Option<HeaderValue>,
    /// The identity of the client's verified TLS certificate, if any.
    pub tls_identity: Option<String>,
    /// What its calls are doing (its lifecycle task reads it).
    pub activity: Arc<crate::call::Activity>,
}

impl Conn {
    /// Facts of a new connection from `peer`, with the identity of its
    /// client certificate (mTLS).
    pub fn new(peer: SocketAddr, tls_identity: Option<String>) -> Self {
        Conn {
            peer,
            forwarded_for: HeaderValue::from_str(&peer.ip().to_string()).ok(),
            tls_identity,
            activity: Arc::new(crate::call::Activity::default()),
        }
    }
}

/// The answer to an HTTP/1 request: 505 with the reason.
pub fn http1_refusal() -> Response<ResponseBody> {
    let mut r = plain(
        StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        "tollgate forwards gRPC, which needs HTTP/2: use h2c (prior knowledge) or TLS with ALPN h2\n",
    );
    r.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    metrics::get().non_grpc(status.as_u16());
    let mut r = Response::new(ResponseBody::Fixed(Some(Bytes::from_static(
        text.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Serves one request.
pub async fn handle(
    worker: Arc<Worker>,
    req: Request<Incoming>,
    conn: Arc<Conn>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let peer = conn.peer;
    // Classify: gRPC is HTTP/2, POST, application/grpc*.
    if req.version() != Version::HTTP_2 {
        return http1_refusal();
    }
    if req.method() != Method::POST {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "tollgate forwards gRPC only: POST with content-type application/grpc\n",
        );
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    if !is_grpc(&req) {
        return plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "tollgate forwards gRPC only: content-type must be application/grpc\n",
        );
    }
    let Some(call) = path::parse(req.uri().path()) else {
        return trailers_only(
            Code::Unimplemented,
            "malformed gRPC path: expected /package.Service/Method",
        );
    };

    // Route: the config is loaded once per call.
    let active = worker.shared.active.load();
    let Some(route) = active.routes.find(call.service, call.method) else {
        return trailers_only(
            Code::Unimplemented,
            &format!("no route for /{}/{}", call.service, call.method),
        );
    };
    let route = route.clone();
    let mut stats = route.stats.method(call.method);
    // Not known yet: kept, to learn it if the upstream answers it.
    let unknown: Option<Box<str>> = route.stats.is_unknown(&stats).then(|| call.method.into());

    // The client's deadline, read before any limit is charged: a malformed
    // or repeated grpc-timeout is refused, never forwarded.
    let client_timeout = match client_timeout(req.headers()) {
        Ok(t) => t,
        Err(why) => {
            let mut tally = Tally::start(stats, start);
            tally.finish(Some(Code::InvalidArgument as u8));
            return trailers_only(Code::InvalidArgument, why);
        }
    };

    // Limit.
    let mut extra_headers = None;
    if let Some(limits) = &route.limits {
        let info = CallInfo {
            service: call.service,
            method: call.method,
            headers: req.headers(),
            peer,
            tls_identity: conn.tls_identity.as_deref(),
            worker: worker.index,
        };
        match limits.check(info).await {
            Ok(h) => extra_headers = h,
            Err(rejection) => {
                let mut tally = Tally::start(stats, start);
                tally.finish(Some(rejection.code as u8));
                let mut r: Response<ResponseBody> =
                    trailers_only(rejection.code, &rejection.message);
                r.headers_mut().extend(rejection.headers);
                return r;
            }
        }
    }

    // Deadline: the client's grpc-timeout, capped by the route's timeout.
    let (budget, why) = match (client_timeout, route.timeout) {
        (Some(c), Some(r)) if r < c => (Some(r), "deadline exceeded: the route's timeout"),
        (Some(c), _) => (Some(c), "deadline exceeded: the call's grpc-timeout"),
        (None, Some(r)) => (Some(r), "deadline exceeded: the route's timeout"),
        (None, None) => (None, ""),
    };
    let deadline = budget.map(|b| start + b);

    // Forward.
    let (mut parts, body) = req.into_parts();
    let compressed_ok = parts
        .headers
        .get("grpc-encoding")
        .is_some_and(|v| v.as_bytes() != b"identity");
    if let Some(d) = deadline {
        // The upstream gets what is left of the deadline, not the whole of
        // it: the limit check (and, below, the connect) took some.
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let mut tally = Tally::start(stats, start);
            tally.finish(Some(Code::DeadlineExceeded as u8));
            return trailers_only(Code::DeadlineExceeded, why);
        }
        if let Ok(v) = HeaderValue::from_str(&timeout::encode(left)) {
            parts.headers.insert("grpc-timeout", v);
        }
    }
    add_forwarded_for(&mut parts.headers, &conn);
    let spec = &route.upstream;
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(spec.scheme());
    uri.authority = parts
        .uri
        .authority()
        .cloned()
        .or_else(|| spec.config.addresses.first().and_then(|a| a.parse().ok()));
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = match http::Uri::from_parts(uri) {
        Ok(u) => u,
        Err(_) => return trailers_only(Code::Internal, "cannot build the upstream URI"),
    };
    let state = Arc::new(CallState::default());
    let max = active.max_message_bytes;
    let idle = active.config.listener.stream_idle_timeout.0;
    drop(active);
    let upstream_req = Request::from_parts(
        parts,
        RequestBody::new(body, max, compressed_ok, state.clone(), route.clone()),
    );
    let pool = worker.pool(spec);
    let mut tally = Tally::start(stats.clone(), start);
    // Boxed: the send future is large, and a call's whole future is copied
    // into its task when hyper spawns it; one allocation is cheaper.
    let mut sent = Box::pin(pool.send(upstream_req));
    // What ends the call if it takes too long: its deadline, or (for a call
    // without one) its connection watching it for the stream idle timeout.
    let mut timer = CallTimer {
        deadline: deadline.map(|d| (Box::pin(tokio::time::sleep_until(d)), why)),
        idle: None,
    };
    if !idle.is_zero() && budget.is_none_or(|b| b > idle) {
        timer.idle = conn.activity.watch(&state).map(|w| (w, idle));
    }
    let waited = if timer.is_none() {
        Ok(sent.await)
    } else {
        let expired = std::future::poll_fn(|cx| timer.poll_expired(&state, cx));
        tokio::select! {
            biased;
            r = &mut sent => Ok(r),
            why = expired => Err(why),
        }
    };
    let response = match waited {
        Ok(r) => r,
        Err(message) => {
            let mut tally = tally;
            tally.finish(Some(Code::DeadlineExceeded as u8));
            return trailers_only(Code::DeadlineExceeded, &message);
        }
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            let mut tally = tally;
            if let Some(fe) = state.request_error() {
                let code = crate::body::frame_error_code(&fe);
                tally.finish(Some(code as u8));
                return trailers_only(code, &fe.to_string());
            }
            tracing::debug!(route = %route.name, error = %e, "forwarding failed");
            let (code, message) = e.status();
            tally.finish(Some(code as u8));
            return trailers_only(code, &message);
        }
    };
    // A method the upstream answers (anything but UNIMPLEMENTED) is a real
    // one: from now on it has its own label, this call included.
    if let Some(method) = unknown.filter(|_| answers_method(&response.0)) {
        stats = route.stats.learn(&method);
        tally.relabel(stats.clone());
    }
    stats
        .upstream_duration
        .observe(start.elapsed().as_secs_f64());

    // Observe the response on its way back.
    let (response, upstream_open) = response;
    let (mut parts, body) = response.into_parts();
    if let Some(h) = extra_headers {
        parts.headers.extend(h);
    }
    let resp_compressed_ok = parts
        .headers
        .get("grpc-encoding")
        .is_some_and(|v| v.as_bytes() != b"identity");
    if let Some(status) = parts.headers.get("grpc-status") {
        // Trailers-only response from the upstream.
        let status = crate::grpc::status::parse_status(status);
        let mut tally = tally;
        tally.finish(status);
        return Response::from_parts(parts, ResponseBody::Empty);
    }
    let proxied = Proxied::new(
        body,
        crate::grpc::frame::FrameObserver::new(max, resp_compressed_ok),
        state,
        route,
        timer,
        tally,
        upstream_open,
    );
    Response::from_parts(parts, ResponseBody::Proxied(Box::new(proxied)))
}

/// Whether a response says the upstream has the call's method: a gRPC
/// answer (HTTP 200, `application/grpc`) that is not a trailers-only
/// UNIMPLEMENTED.
fn answers_method<B>(response: &http::Response<B>) -> bool {
    let h = response.headers();
    response.status() == StatusCode::OK
        && h.get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        && h.get("grpc-status")
            .and_then(crate::grpc::status::parse_status)
            != Some(Code::Unimplemented as u8)
}

/// The call's `grpc-timeout`, if any; a malformed or repeated one is an
/// error (the message says what is wrong without echoing the value).
fn client_timeout(headers: &http::HeaderMap) -> Result<Option<Duration>, &'static str> {
    let mut values = headers.get_all("grpc-timeout").iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("grpc-timeout appears more than once: send one deadline");
    }
    timeout::parse(v.as_bytes())
        .map(Some)
        .ok_or("malformed grpc-timeout: 1 to 8 digits and a unit (H, M, S, m, u or n), e.g. 500m")
}

fn add_forwarded_for(headers: &mut http::HeaderMap, conn: &Conn) {
    let Some(ip) = &conn.forwarded_for else {
        return;
    };
    match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => {
            let joined = format!("{prev}, {}", conn.peer.ip());
            if let Ok(v) = HeaderValue::from_str(&joined) {
                headers.insert("x-forwarded-for", v);
            }
        }
        _ => {
            headers.insert("x-forwarded-for", ip.clone());
        }
    }
}

/// Marks the process as draining.
pub fn start_draining(shared: &Shared) {
    shared.draining.store(true, Ordering::SeqCst);
}

/// How long to wait for in-flight calls when draining.
pub fn drain_timeout(shared: &Shared) -> Duration {
    shared.active.load().config.listener.drain_timeout.0
}

#[cfg(test)]
mod tests {
    fn size_of_return<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every call's future is moved into a task allocation: a large one costs
    /// copies and large-chunk mallocs on the hot path.
    #[test]
    fn the_call_future_is_small() {
        let size = size_of_return(super::handle);
        eprintln!("handle future: {size} bytes");
        assert!(size <= 1536, "handle's future grew to {size} bytes");
    }
}
