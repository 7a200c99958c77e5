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
//!
//! Every way out before the upstream answers is a
//! [`CallError`](crate::respond::CallError): counted under its status and
//! answered in one place (`respond`).

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::access::Record;
use crate::body::{CallTimer, Proxied, RequestBody, ResponseBody, Tally};
use crate::call::CallState;
use crate::grpc::frame::{compressed, FrameObserver};
use crate::grpc::status::{parse_status, Code};
use crate::grpc::{path, timeout};
use crate::headers::Facts;
use crate::hold::{first_message, Encoding, Held, HoldError};
use crate::limit::{CallInfo, FirstMessage, Rejection};
use crate::metrics::MethodStats;
use crate::respond::CallError;
use crate::state::{Conn, Worker};

/// The call's tally, writing its access log line too when it has one.
fn tally(stats: Arc<MethodStats>, start: Instant, record: &Option<Arc<Record>>) -> Tally {
    Tally::start(stats, start).with_record(record.clone())
}

/// Notes a refusal by a limit in the call's access log line.
fn refused(record: &Option<Arc<Record>>, rejection: &Rejection) {
    if let Some(r) = record {
        let by = rejection.by.as_ref().map_or("", |(name, _)| name.as_str());
        r.limited(&format!("refused {by}"));
    }
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Serves one request.
pub(crate) async fn handle(
    worker: Arc<Worker>,
    req: Request<Incoming>,
    conn: Arc<Conn>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let peer = conn.peer;
    // Classify: gRPC is HTTP/2, POST, application/grpc*.
    if req.version() != Version::HTTP_2 {
        return CallError::Http1.into_response();
    }
    if req.method() != Method::POST {
        return CallError::NotPost.into_response();
    }
    if !is_grpc(&req) {
        return CallError::NotGrpc.into_response();
    }
    let (mut parts, mut body) = req.into_parts();
    let Some(call) = path::parse(parts.uri.path()) else {
        return CallError::MalformedPath.into_response();
    };

    // Route: the config is loaded once per call.
    let active = worker.shared.active.load();
    let Some(route) = active.routes.find(call.service, call.method) else {
        let path = format!("/{}/{}", call.service, call.method);
        return CallError::NoRoute(path).into_response();
    };
    let route = route.clone();
    let mut stats = route.stats.method(call.method);
    // Not known yet: kept, to learn it if the upstream answers it.
    // A thin box (8 bytes in the call's future, not 16): rare.
    let unknown: Option<Box<String>> = route
        .stats
        .is_unknown(&stats)
        .then(|| Box::new(call.method.to_owned()));

    // Who the client is: before limits, and forwarded.
    let peer = match &active.client_ip {
        Some(c) => std::net::SocketAddr::new(c.of(peer.ip(), &parts.headers), peer.port()),
        None => peer,
    };
    // Its request id and trace context, and spans when it is sampled.
    let spans = active.tracing.as_ref().and_then(|t| {
        let begin = crate::trace::Begin {
            service: call.service,
            method: call.method,
            route: &route.name,
            peer: peer.ip(),
        };
        t.begin(&mut parts.headers, begin)
    });
    // What the access log's line and the spans are made of, for a call in
    // the log's sample or traced: with the headers as the client sent them.
    let record = crate::access::begin(
        active.access_log.as_ref(),
        spans,
        crate::access::Call {
            start,
            route: &route.name,
            upstream: &route.upstream.name,
            service: call.service,
            method: call.method,
            peer: peer.ip(),
            headers: &parts.headers,
        },
    );

    // The client's deadline, read before any limit is charged: a malformed
    // or repeated grpc-timeout is refused, never forwarded.
    let client_timeout = match client_timeout(&parts.headers) {
        Ok(t) => t,
        Err(why) => return CallError::BadTimeout(why).answer(tally(stats, start, &record)),
    };

    // The headers the listener and route set: before limits, and forwarded.
    for policy in [&active.request_headers, &route.request_headers]
        .into_iter()
        .flatten()
    {
        let facts = Facts {
            tls_identity: conn.tls_identity.as_deref(),
            peer_ip: peer.ip(),
        };
        policy.apply(&mut parts.headers, &facts);
    }

    // Deadline: the client's grpc-timeout, capped by the route's timeout.
    let (budget, why) = match (client_timeout, route.timeout) {
        (Some(c), Some(r)) if r < c => (Some(r), "deadline exceeded: the route's timeout"),
        (Some(c), _) => (Some(c), "deadline exceeded: the call's grpc-timeout"),
        (None, Some(r)) => (Some(r), "deadline exceeded: the route's timeout"),
        (None, None) => (None, ""),
    };
    let deadline = budget.map(|b| start + b);

    // Limit: those that read request fields see the first message, held
    // until it has arrived.
    let mut held = None;
    let mut extra_headers = None;
    // Boxed, and only with message limits or charges: the call's future
    // stays small.
    let mut ongoing: Option<Box<crate::limit::Ongoing>> = None;
    if let Some(limits) = &route.limits {
        if limits.reads_fields() {
            let idle = active.config.listener.stream_idle_timeout.0;
            let inspect = &active.config.limiter.inspect;
            let most = u64::from(active.max_message_bytes);
            let hold = hold_first(
                &parts.headers,
                &mut body,
                inspect,
                deadline,
                idle,
                why,
                most,
            );
            match Box::pin(hold).await {
                Ok(h) => held = Some(Box::new(h)),
                Err(e) => return e.answer(tally(stats, start, &record)),
            }
        }
        // The call's facts in a block of their own: not kept in the
        // call's future across the await.
        let decision = {
            let info = CallInfo {
                service: call.service,
                method: call.method,
                headers: &parts.headers,
                peer,
                tls_identity: conn.tls_identity.as_deref(),
                worker: worker.index,
                message: held.as_deref().map_or(FirstMessage::NotHeld, Held::message),
                record: record.as_deref(),
            };
            if let Some(r) = &record {
                r.limiting();
            }
            // The meters and charges first.
            match limits.ongoing(&info) {
                Ok(mut o) => {
                    for side in [&mut o.client, &mut o.server].into_iter().flatten() {
                        side.set_deadline(deadline);
                    }
                    ongoing = (!o.is_empty()).then(|| Box::new(o));
                }
                Err(rejection) => {
                    refused(&record, &rejection);
                    return CallError::Limited(rejection).answer(tally(stats, start, &record));
                }
            }
            limits.check(info)
        };
        match decision.await {
            Ok(h) => extra_headers = h,
            Err(rejection) => {
                refused(&record, &rejection);
                return CallError::Limited(rejection).answer(tally(stats, start, &record));
            }
        }
        if let Some(r) = &record {
            r.limited("allowed");
        }
    }

    // Forward.
    let compressed_ok = compressed(&parts.headers);
    if let Some(d) = deadline {
        // The upstream gets what is left of the deadline, not the whole of
        // it: the limit check (and, below, the connect) took some.
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return CallError::DeadlineExceeded(why.into()).answer(tally(stats, start, &record));
        }
        if let Ok(v) = HeaderValue::from_str(&timeout::encode(left)) {
            parts.headers.insert("grpc-timeout", v);
        }
    }
    add_forwarded_for(&mut parts.headers, &conn);
    if let Some(r) = &record {
        r.sending(&mut parts.headers);
    }
    let spec = &route.upstream;
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(spec.scheme());
    uri.authority = parts.uri.authority().cloned().or_else(|| {
        spec.config
            .addresses
            .first()
            .and_then(|a| a.text().parse().ok())
    });
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = match http::Uri::from_parts(uri) {
        Ok(u) => u,
        Err(_) => return CallError::UpstreamUri.into_response(),
    };
    let state = Arc::new(CallState::default());
    let max = active.max_message_bytes;
    let idle = active.config.listener.stream_idle_timeout.0;
    drop(active);
    let upstream_req = Request::from_parts(
        parts,
        RequestBody::new(
            body,
            held.map(|h| h.frames),
            ongoing.as_mut().and_then(|o| o.client.take()),
            max,
            compressed_ok,
            state.clone(),
            route.clone(),
        )
        .with_record(record.clone()),
    );
    // Sent on: charged when it ends, however it ends.
    if let Some(c) = ongoing.as_mut().and_then(|o| o.charges.as_mut()) {
        c.arm();
    }
    let pool = worker.pool(spec);
    if let Some(r) = &record {
        r.sent();
    }
    let mut tally = tally(stats.clone(), start, &record);
    // Boxed: the send future is large, and a call's whole future is copied
    // into its task when hyper spawns it; one allocation is cheaper.
    let mut sent = Box::pin(pool.send(upstream_req, deadline, route.priority));
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
        Ok(Ok(r)) => r,
        Err(message) => return CallError::DeadlineExceeded(message.into()).answer(tally),
        Ok(Err(e)) => {
            // A message limit, or the client's own framing, refused on the
            // way, is what ended it.
            if let Some(why) = state.limited() {
                return CallError::Limited(Box::new(Rejection {
                    code: Code::ResourceExhausted,
                    message: why,
                    headers: http::HeaderMap::new(),
                    by: None,
                }))
                .answer(tally);
            }
            if let Some(fe) = state.request_error() {
                return CallError::Frame(fe).answer(tally);
            }
            tracing::debug!(route = %route.name, error = %e, "forwarding failed");
            return CallError::Upstream(e).answer(tally);
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
    let (response, mut upstream_open) = response;
    if let Some(r) = &record {
        r.answered(upstream_open.endpoint(&pool));
    }
    let (mut parts, body) = response.into_parts();
    if let Some(h) = extra_headers {
        parts.headers.extend(h);
    }
    let resp_compressed_ok = compressed(&parts.headers);
    let mut charges = ongoing.as_mut().and_then(|o| o.charges.take());
    if let Some(c) = charges.as_mut() {
        c.response_headers(&parts.headers);
    }
    if let Some(status) = parts.headers.get("grpc-status") {
        // Trailers-only response from the upstream.
        let mut tally = tally;
        let code = parse_status(status);
        upstream_open.settle(code == Some(Code::Unavailable));
        tally.finish(code);
        if let Some(c) = charges.as_mut() {
            c.settle(Some(&parts.headers), 0);
        }
        return Response::from_parts(parts, ResponseBody::Empty);
    }
    let proxied = Proxied::new(
        body,
        FrameObserver::new(max, resp_compressed_ok),
        state,
        route,
        timer,
        tally,
        upstream_open,
    )
    .with_meters(ongoing.and_then(|o| o.server))
    .with_charges(charges);
    Response::from_parts(parts, ResponseBody::Proxied(Box::new(proxied)))
}

/// Holds the request `body` until its first message has arrived, within the call's
/// deadline (or, without one, the stream idle timeout).
async fn hold_first(
    headers: &http::HeaderMap,
    body: &mut Incoming,
    inspect: &crate::config::Inspect,
    deadline: Option<Instant>,
    idle: Duration,
    why: &'static str,
    max_message_bytes: u64,
) -> Result<Held, CallError> {
    let gzip = headers
        .get("grpc-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let encoding = if gzip && inspect.decompress {
        Encoding::Gzip
    } else {
        Encoding::Opaque
    };
    let until = deadline.or_else(|| (!idle.is_zero()).then(|| Instant::now() + idle));
    let max = usize::try_from(inspect.max_bytes.min(max_message_bytes)).unwrap_or(usize::MAX);
    first_message(body, max, encoding, until)
        .await
        .map_err(|e| match e {
            HoldError::TooLarge { max, decompressed } => CallError::Limited(Box::new(Rejection {
                code: Code::ResourceExhausted,
                message: format!(
                    "the first request message is larger{} than the {max} bytes limits read fields from (limiter.inspect.max_bytes)",
                    if decompressed { " decompressed" } else { "" }
                ),
                headers: http::HeaderMap::new(),
                by: None,
            })),
            HoldError::TimedOut if deadline.is_some() => CallError::DeadlineExceeded(why.into()),
            HoldError::TimedOut => CallError::DeadlineExceeded(
                "no request message within the stream idle timeout".into(),
            ),
            HoldError::Client => CallError::Cancelled,
        })
}

/// Whether a response says the upstream has the call's method: a gRPC
/// answer (HTTP 200, `application/grpc`) that is not a trailers-only
/// UNIMPLEMENTED.
fn answers_method<B>(response: &http::Response<B>) -> bool {
    let h = response.headers();
    response.status() == StatusCode::OK
        && h.get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        && h.get("grpc-status").and_then(parse_status) != Some(Code::Unimplemented)
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
