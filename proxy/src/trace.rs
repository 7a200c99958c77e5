//! OpenTelemetry tracing of calls (`tracing:` in the config).
//!
//! W3C trace context comes from the client's `traceparent`, read strictly
//! (a malformed one starts a new trace and drops `tracestate`, as the spec
//! says). Sampling is parent-based: a call whose parent is sampled is
//! traced, one whose parent is not is passed on untouched, and a new trace
//! is sampled at `tracing.sample` (OpenTelemetry's trace-id ratio), its
//! `traceparent` written for the upstream either way so that every service
//! behind agrees.
//!
//! A sampled call gets a server span, with a child for its limit decision
//! (and, under it, the Redis round trip) and a client span for the upstream
//! call, whose id the upstream sees as its parent. The spans are built from
//! the call's [`Record`](crate::access::Record) as it goes and ended when it
//! is let go; a batch processor on a thread of its own sends them to the
//! collector over OTLP/gRPC. A full queue drops spans, and an exporter that
//! fails or hangs never slows a call.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use http::header::HeaderValue;
use http::HeaderMap;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator as _, RandomIdGenerator, Sampler,
    SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;

use crate::config;
use crate::grpc::status::Code;

/// Spans sent in one export at most.
const BATCH: usize = 512;

/// Whether `endpoint` is one the exporter can reach: `http://host:port`.
pub(crate) fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let shown = config::shown(endpoint);
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| format!("{shown} is not a URL; write e.g. http://127.0.0.1:4317"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{shown}: https collectors are not supported; send to a collector agent on the node or in the pod over http://"
            ))
        }
        _ => {
            return Err(format!(
                "{shown} is not an http:// URL; write e.g. http://127.0.0.1:4317"
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{shown} names no host"));
    }
    Ok(())
}

/// A loaded `tracing` config.
pub(crate) struct Tracing {
    tracer: SdkTracer,
    request_id: bool,
    /// Keeps the exporter (and its thread) while this config can trace.
    exporter: Arc<Exporter>,
}

/// One OTLP exporter: its provider, and the runtime its gRPC channel runs
/// on. Shut down on a thread of its own when the last config using it goes.
struct Exporter {
    config: config::Tracing,
    provider: SdkTracerProvider,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

/// The exporter of the config in force (a reload with the same `tracing`
/// keeps it).
static CURRENT: LazyLock<Mutex<Option<Arc<Exporter>>>> = LazyLock::new(|| Mutex::new(None));

// === impl Tracing ===

impl Tracing {
    /// The tracing of a validated config: reuses the exporter in force when
    /// its settings are the same.
    pub(crate) fn build(c: &config::Tracing) -> Result<Self, String> {
        let same = CURRENT
            .lock()
            .ok()
            .and_then(|cur| cur.as_ref().filter(|e| e.config == *c).cloned());
        let exporter = match same {
            Some(e) => e,
            None => Arc::new(Exporter::start(c)?),
        };
        Ok(Tracing {
            tracer: exporter.provider.tracer("tollgate"),
            request_id: c.request_id,
            exporter,
        })
    }

    /// Puts this config's exporter in force (the one before is shut down
    /// once no config uses it).
    pub(crate) fn install(this: Option<&Tracing>) {
        if let Ok(mut cur) = CURRENT.lock() {
            *cur = this.map(|t| t.exporter.clone());
        }
    }

    /// Begins a call with request headers `headers`: sets its
    /// `x-request-id` if it has none, and its trace context. Spans for the
    /// call if it is sampled.
    pub(crate) fn begin(&self, headers: &mut HeaderMap, call: Begin<'_>) -> Option<Box<CallSpans>> {
        if self.request_id && !headers.contains_key("x-request-id") {
            headers.insert("x-request-id", request_id());
        }
        let parent = headers.get("traceparent").and_then(|v| parse(v.as_bytes()));
        let parent_cx = match parent {
            // Not sampled upstream of us: passed on as it came.
            Some(p) if p.flags & 1 == 0 => return None,
            Some(p) => {
                let state = headers
                    .get("tracestate")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<TraceState>().ok())
                    .unwrap_or_default();
                Context::new().with_remote_span_context(SpanContext::new(
                    p.trace,
                    p.span,
                    TraceFlags::new(p.flags & 3),
                    true,
                    state,
                ))
            }
            None => {
                // A new trace: a tracestate without a (valid) traceparent
                // is void.
                headers.remove("tracestate");
                Context::new()
            }
        };
        // Named and described only once sampled: a call out of the sample
        // allocates nothing here.
        let mut span = self.tracer.build_with_context(
            opentelemetry::trace::SpanBuilder::from_name("call").with_kind(SpanKind::Server),
            &parent_cx,
        );
        if !span.span_context().is_sampled() {
            // A new trace not in the sample: those behind see it is not.
            headers.insert("traceparent", traceparent(span.span_context()));
            return None;
        }
        let name: Cow<'static, str> = name(call.service, call.method).into();
        span.update_name(name.clone());
        span.set_attributes([
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", crate::access::cut(call.service).to_owned()),
            KeyValue::new("rpc.method", crate::access::cut(call.method).to_owned()),
            KeyValue::new("tollgate.route", call.route.to_owned()),
            KeyValue::new("client.address", call.peer.to_canonical().to_string()),
        ]);
        Some(Box::new(CallSpans {
            _exporter: self.exporter.clone(),
            tracer: self.tracer.clone(),
            call: Context::new().with_span(span),
            name,
            upstream: None,
        }))
    }
}

/// What a call is when it begins.
pub(crate) struct Begin<'a> {
    pub(crate) service: &'a str,
    pub(crate) method: &'a str,
    pub(crate) route: &'a str,
    pub(crate) peer: std::net::IpAddr,
}

fn name(service: &str, method: &str) -> String {
    let (service, method) = (crate::access::cut(service), crate::access::cut(method));
    format!("{service}/{method}")
}

/// A sampled call's spans while it runs.
pub(crate) struct CallSpans {
    /// Keeps the exporter until this call's spans are ended, across a
    /// reload that replaces it.
    _exporter: Arc<Exporter>,
    tracer: SdkTracer,
    /// Holds the call's server span: the parent of the others.
    call: Context,
    /// `service/method`, the spans' name.
    name: Cow<'static, str>,
    upstream: Option<opentelemetry_sdk::trace::Span>,
}

/// How a call ended, for its spans.
pub(crate) struct Ended<'a> {
    pub(crate) end: SystemTime,
    /// None: cancelled before any status.
    pub(crate) status: Option<Code>,
    pub(crate) limit: Option<&'a str>,
    pub(crate) endpoint: Option<&'a str>,
    pub(crate) request: (u64, u64),
    pub(crate) response: (u64, u64),
}

// === impl CallSpans ===

impl CallSpans {
    /// The limit decision took from `start` to `end` (with a Redis round
    /// trip from `redis.0` to `redis.1`) and ended `outcome`.
    pub(crate) fn limited(
        &self,
        start: SystemTime,
        end: SystemTime,
        redis: Option<(SystemTime, SystemTime)>,
        outcome: &str,
    ) {
        let span = self.tracer.build_with_context(
            opentelemetry::trace::SpanBuilder::from_name("limit")
                .with_kind(SpanKind::Internal)
                .with_start_time(start)
                .with_attributes([KeyValue::new("tollgate.limit", outcome.to_owned())]),
            &self.call,
        );
        let cx = Context::new().with_span(span);
        if let Some((began, ended)) = redis {
            let mut r = self.tracer.build_with_context(
                opentelemetry::trace::SpanBuilder::from_name("redis")
                    .with_kind(SpanKind::Client)
                    .with_start_time(began)
                    .with_attributes([KeyValue::new("db.system", "redis")]),
                &cx,
            );
            r.end_with_timestamp(ended);
        }
        cx.span().end_with_timestamp(end);
    }

    /// The trace's id, as W3C writes it.
    pub(crate) fn trace_id(&self) -> String {
        self.call.span().span_context().trace_id().to_string()
    }

    /// The call is sent to `upstream`: its client span begins, and the
    /// upstream's `traceparent` names it.
    pub(crate) fn sending(&mut self, headers: &mut HeaderMap, upstream: &str) {
        let span = self.tracer.build_with_context(
            opentelemetry::trace::SpanBuilder::from_name(self.name.clone())
                .with_kind(SpanKind::Client)
                .with_attributes([
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("tollgate.upstream", upstream.to_owned()),
                ]),
            &self.call,
        );
        headers.insert("traceparent", traceparent(span.span_context()));
        self.upstream = Some(span);
    }

    /// Ends the spans.
    pub(crate) fn end(mut self, e: Ended<'_>) {
        let code = e.status.map_or(Code::Cancelled as i64, |c| c as i64);
        if let Some(mut up) = self.upstream.take() {
            up.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
            if let Some(ep) = e.endpoint {
                if let Some((host, port)) = ep.rsplit_once(':') {
                    up.set_attribute(KeyValue::new("server.address", host.to_owned()));
                    if let Ok(p) = port.parse::<i64>() {
                        up.set_attribute(KeyValue::new("server.port", p));
                    }
                }
            }
            if code != 0 {
                up.set_status(Status::error(status_name(e.status)));
            }
            up.end_with_timestamp(e.end);
        }
        let call = self.call.span();
        call.set_attributes([
            KeyValue::new("rpc.grpc.status_code", code),
            KeyValue::new("tollgate.request.messages", e.request.0 as i64),
            KeyValue::new("tollgate.request.bytes", e.request.1 as i64),
            KeyValue::new("tollgate.response.messages", e.response.0 as i64),
            KeyValue::new("tollgate.response.bytes", e.response.1 as i64),
        ]);
        if let Some(l) = e.limit {
            call.set_attribute(KeyValue::new("tollgate.limit", l.to_owned()));
        }
        // A server's error, as the RPC conventions count them.
        let server_error = matches!(
            e.status,
            Some(
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            )
        );
        if server_error {
            call.set_status(Status::error(status_name(e.status)));
        }
        call.end_with_timestamp(e.end);
    }
}

fn status_name(status: Option<Code>) -> &'static str {
    status.map_or("CANCELLED", Code::name)
}

/// Writes `bytes` as lowercase hex into `out` (twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (o, b) in out.chunks_exact_mut(2).zip(bytes) {
        o[0] = HEX[usize::from(b >> 4)];
        o[1] = HEX[usize::from(b & 0xf)];
    }
}

/// A `traceparent` naming `sc` as the parent: written in place, one
/// allocation (the header's).
fn traceparent(sc: &SpanContext) -> HeaderValue {
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut v[3..35], &sc.trace_id().to_bytes());
    hex_into(&mut v[36..52], &sc.span_id().to_bytes());
    hex_into(&mut v[53..55], &[sc.trace_flags().to_u8() & 3]);
    unique(&v)
}

/// A random UUID (version 4) for `x-request-id`.
fn request_id() -> HeaderValue {
    let mut b = RandomIdGenerator::default().new_trace_id().to_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut v = *b"00000000-0000-0000-0000-000000000000";
    hex_into(&mut v[0..8], &b[0..4]);
    hex_into(&mut v[9..13], &b[4..6]);
    hex_into(&mut v[14..18], &b[6..8]);
    hex_into(&mut v[19..23], &b[8..10]);
    hex_into(&mut v[24..36], &b[10..16]);
    unique(&v)
}

/// A header value that is new with every call: marked sensitive, so that
/// HPACK sends it as a literal never indexed instead of filling the
/// connection's dynamic table with values never seen again (and pushing
/// out the ones that repeat). Measured: indexed, the two values cost the
/// upstream connection's encoder about 5,700 instructions a call.
fn unique(v: &[u8]) -> HeaderValue {
    let mut h = HeaderValue::from_bytes(v).unwrap_or_else(|_| HeaderValue::from_static(""));
    h.set_sensitive(true);
    h
}

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parent {
    pub(crate) trace: TraceId,
    pub(crate) span: SpanId,
    pub(crate) flags: u8,
}

/// A W3C `traceparent` as the spec has it (`00-<32 hex>-<16 hex>-<2 hex>`,
/// lowercase, ids not all zeros; a later version may add fields), or None.
pub(crate) fn parse(v: &[u8]) -> Option<Parent> {
    let s = std::str::from_utf8(v).ok()?;
    let mut parts = s.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2);
    if !valid {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok()?;
    let span = u64::from_str_radix(span, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace != 0 && span != 0).then(|| Parent {
        trace: TraceId::from(trace),
        span: SpanId::from(span),
        flags,
    })
}

/// Waits for the spans in the queue to be sent (at most a few seconds):
/// for a drain's end.
pub(crate) fn flush() {
    let current = CURRENT.lock().ok().and_then(|c| c.clone());
    if let Some(e) = current {
        let _ = e.provider.force_flush();
    }
}

// === impl Exporter ===

impl Exporter {
    fn start(c: &config::Tracing) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tracing: cannot start its exporter: {e}"))?;
        let otlp = {
            let _in = rt.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(c.endpoint.clone())
                .with_timeout(c.timeout.0)
                .build()
                .map_err(|e| format!("tracing.endpoint: {e}"))?
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tollgate-otlp".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                })
            })
            .map_err(|e| format!("tracing: cannot start its exporter: {e}"))?;
        let m = crate::metrics::get();
        let exporter = Counted {
            inner: otlp,
            exported: m.trace_spans("exported"),
            failed: m.trace_spans("failed"),
        };
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(c.max_queue)
            .with_max_export_batch_size(BATCH.min(c.max_queue))
            .with_scheduled_delay(c.flush_interval.0)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build(),
            )
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                c.sample,
            ))))
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(c.service_name.clone())
                    .build(),
            )
            .build();
        Ok(Exporter {
            config: c.clone(),
            provider,
            stop: Mutex::new(Some(stop)),
        })
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Sends what is queued and stops: off the caller's thread, which
        // may be one serving calls.
        let provider = self.provider.clone();
        // Longer than one export may take.
        let wait = self.config.timeout.0 + Duration::from_secs(1);
        let stop = self.stop.lock().ok().and_then(|mut s| s.take());
        let _ = std::thread::Builder::new()
            .name("tollgate-otlp-stop".into())
            .spawn(move || {
                let _ = provider.shutdown_with_timeout(wait);
                if let Some(s) = stop {
                    let _ = s.send(());
                }
            });
    }
}

/// The OTLP exporter, counting what it sends.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    exported: IntCounter,
    failed: IntCounter,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let r = self.inner.export(batch).await;
        match &r {
            Ok(()) => self.exported.inc_by(n),
            Err(e) => {
                self.failed.inc_by(n);
                tracing::debug!(error = %e, spans = n, "tracing: export failed");
            }
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn shutdown(&self) -> OTelSdkResult {
        self.inner.shutdown()
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_as_the_spec_says() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = parse(good.as_bytes()).expect("valid");
        assert_eq!(p.trace.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span.to_string(), "00f067aa0ba902b7");
        assert_eq!(p.flags, 1);
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "garbage",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
        }
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(
            parse(later.as_bytes()).is_some(),
            "a later version may add fields"
        );
    }

    #[test]
    fn traceparents_are_written_as_the_spec_says() {
        let sc = SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            SpanId::from(0x00f0_67aa_0ba9_02b7),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        assert_eq!(
            traceparent(&sc),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let a = request_id();
        let s = a.to_str().unwrap_or_default();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(request_id(), a);
    }

    #[test]
    fn endpoints_must_be_plain_http_urls() {
        assert!(check_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(check_endpoint("https://collector:4317")
            .unwrap_err()
            .contains("https"));
        assert!(check_endpoint("collector:4317").is_err());
        assert!(check_endpoint("not a url").is_err());
    }
}
